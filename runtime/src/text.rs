//! The one reader of text inputs (calibration and drift texts, the demo's
//! evaluation text, chat turns on stdin, JSON configs): regular files only,
//! and bounded, because a text can be anything a user names and read whole
//! it could grow until the kernel kills the process.

use std::io::Read;
use std::path::{Path, PathBuf};

/// The most a text input may hold: far above any calibration or evaluation
/// text (SmolLM2's adapters train on a few hundred KB), far below memory.
pub const MAX_TEXT_BYTES: u64 = 64 << 20;

/// A text input that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{}: {problem}", path.display())]
pub struct TextError {
    /// The input.
    pub path: PathBuf,
    /// What is wrong with it.
    #[source]
    pub problem: TextProblem,
}

/// What is wrong with a text input.
#[derive(Debug, thiserror::Error)]
pub enum TextProblem {
    /// It holds more than [`MAX_TEXT_BYTES`] (or never ends, as a character
    /// device does).
    #[error("more than {} MiB of text, the most a text input may hold", MAX_TEXT_BYTES >> 20)]
    TooLarge,
    /// It is not UTF-8.
    #[error("not UTF-8 text (invalid byte at offset {0})")]
    NotUtf8(usize),
    /// The OS refused to open or read it.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The text of the regular file at `path` (a FIFO, a device or a folder is
/// refused as [`crate::input::open_regular`] refuses it), refused beyond
/// [`MAX_TEXT_BYTES`]; streams are read through [`read_text_from`].
pub fn read_text(path: &Path) -> Result<String, TextError> {
    read_file(path, "a text file")
}

/// [`read_text`], with `what` naming the expected file for the folder case.
pub(crate) fn read_file(path: &Path, what: &str) -> Result<String, TextError> {
    let open = || -> Result<std::fs::File, TextProblem> {
        let file = crate::input::open_regular(path, what)?;
        // A regular file says its size: refuse a large one before reading it.
        if file.metadata()?.len() > MAX_TEXT_BYTES {
            return Err(TextProblem::TooLarge);
        }
        Ok(file)
    };
    let file = open().map_err(|problem| TextError {
        path: path.to_path_buf(),
        problem,
    })?;
    read_text_from(file, path)
}

/// The text of `reader` (named `shown` in errors, e.g. "stdin"), refused
/// beyond [`MAX_TEXT_BYTES`].
pub fn read_text_from(reader: impl Read, shown: &Path) -> Result<String, TextError> {
    let failed = |problem| TextError {
        path: shown.to_path_buf(),
        problem,
    };
    let mut bytes = Vec::new();
    // One byte past the bound tells a text of exactly the bound from a longer one.
    reader
        .take(MAX_TEXT_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| failed(TextProblem::Io(e)))?;
    if bytes.len() as u64 > MAX_TEXT_BYTES {
        return Err(failed(TextProblem::TooLarge));
    }
    String::from_utf8(bytes).map_err(|e| failed(TextProblem::NotUtf8(e.utf8_error().valid_up_to())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_past_the_bound_is_refused_and_one_at_it_is_read() {
        let shown = Path::new("stdin");
        let at = std::io::repeat(b'a').take(MAX_TEXT_BYTES);
        assert_eq!(
            read_text_from(at, shown).unwrap().len() as u64,
            MAX_TEXT_BYTES
        );
        let past = std::io::repeat(b'a').take(MAX_TEXT_BYTES + 1);
        let err = read_text_from(past, shown).unwrap_err().to_string();
        assert_eq!(
            err,
            "stdin: more than 64 MiB of text, the most a text input may hold"
        );
        let bad = read_text_from(&b"ok\xff"[..], shown)
            .unwrap_err()
            .to_string();
        assert_eq!(bad, "stdin: not UTF-8 text (invalid byte at offset 2)");
    }

    #[cfg(unix)]
    #[test]
    fn a_device_is_refused_before_it_is_read() {
        let err = read_text(Path::new("/dev/zero")).unwrap_err();
        assert_eq!(err.to_string(), "/dev/zero: not a regular file (a device)");
    }
}

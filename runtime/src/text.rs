//! The one reader of text inputs (calibration and drift texts, the demo's
//! evaluation text, chat turns on stdin): bounded, because a text can be
//! anything a user names, `/dev/zero` included, and read whole it would grow
//! until the kernel kills the process.

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
    /// It is a folder.
    #[error("is a folder, not a text file")]
    Folder,
    /// The OS refused to open or read it.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The text of the file at `path`, refused beyond [`MAX_TEXT_BYTES`]. Pipes
/// and devices are read as streams up to the bound (so `<(zcat text.gz)`
/// works and `/dev/zero` is refused after 64 MiB, not after memory runs out).
pub fn read_text(path: &Path) -> Result<String, TextError> {
    let open = || -> Result<std::fs::File, TextProblem> {
        let file = std::fs::File::open(path)?;
        let meta = file.metadata()?;
        if meta.is_dir() {
            return Err(TextProblem::Folder);
        }
        // A regular file says its size: refuse a large one before reading it.
        if meta.is_file() && meta.len() > MAX_TEXT_BYTES {
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

/// [`read_text`] for readers whose errors are `std::io::Error` and name the
/// file themselves (JSON configs and tokenizers): the same bound, the
/// problem as an `InvalidData` error.
pub fn read_to_string(path: &Path) -> std::io::Result<String> {
    read_text(path).map_err(|e| match e.problem {
        TextProblem::Io(source) => source,
        problem => std::io::Error::new(std::io::ErrorKind::InvalidData, problem),
    })
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
    fn an_endless_device_is_refused_at_the_bound() {
        let err = read_text(Path::new("/dev/zero")).unwrap_err();
        assert!(matches!(err.problem, TextProblem::TooLarge), "{err}");
        assert!(err.to_string().starts_with("/dev/zero: more than 64 MiB"));
        let io = read_to_string(Path::new("/dev/zero")).unwrap_err();
        assert_eq!(io.kind(), std::io::ErrorKind::InvalidData);
        assert_eq!(
            io.to_string(),
            "more than 64 MiB of text, the most a text input may hold"
        );
    }
}

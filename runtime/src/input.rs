//! Input files: opened only when they are regular files (a FIFO given as a
//! model, an adapter or a text would block the open or the read forever, a
//! device or a socket never ends, a folder maps as "No such device"), and
//! their strings escaped before they reach a terminal.

use std::fs::{File, FileType};
use std::io;
use std::path::Path;

/// What a file-system object is, in words: "a file", "a folder", "a FIFO"...
pub fn kind(t: &FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_socket() {
            return "a socket";
        }
        if t.is_char_device() || t.is_block_device() {
            return "a device";
        }
    }
    if t.is_dir() {
        "a folder"
    } else if t.is_file() {
        "a file"
    } else {
        "an unknown kind of file"
    }
}

/// Refuse anything but a regular file, as an error the callers' `PATH: ...`
/// wrapping reads well in: "not a regular file (a FIFO)", or for a folder
/// "a folder, not `what`".
fn check(t: &FileType, what: &str) -> io::Result<()> {
    if t.is_file() {
        return Ok(());
    }
    let problem = if t.is_dir() {
        format!("a folder, not {what}")
    } else {
        format!("not a regular file ({})", kind(t))
    };
    Err(io::Error::new(io::ErrorKind::InvalidInput, problem))
}

/// Open `path` for reading if it is a regular file (after symlinks); `what`
/// names what was expected ("a GGUF file") for the error on a folder.
///
/// The type is checked before the open, which for a FIFO would block until
/// a writer came, and again on the open file, so a path swapped in between
/// is caught too.
pub fn open_regular(path: &Path, what: &str) -> io::Result<File> {
    check(&std::fs::metadata(path)?.file_type(), what)?;
    let file = File::open(path)?;
    check(&file.metadata()?.file_type(), what)?;
    Ok(file)
}

/// The text of the regular file at `path` (see [`open_regular`]), at most
/// [`crate::text::MAX_TEXT_BYTES`], for readers whose errors are
/// `io::Error` and name the file themselves (JSON configs and tokenizers).
pub fn read_regular(path: &Path, what: &str) -> io::Result<String> {
    crate::text::read_file(path, what).map_err(|e| match e.problem {
        crate::text::TextProblem::Io(source) => source,
        problem => io::Error::new(io::ErrorKind::InvalidData, problem),
    })
}

/// `s` with control characters (C0, DEL, C1: terminal escapes among them)
/// written as Rust escapes (`\u{1b}`, `\n`), other characters as they are,
/// for printing names and strings that come from files.
pub fn escape_controls(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return s.into();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_are_escaped_and_other_text_kept() {
        assert_eq!(
            escape_controls("blk.0 \u{e9}\u{4e2d}"),
            "blk.0 \u{e9}\u{4e2d}"
        );
        assert_eq!(
            escape_controls("a\u{1b}[2J\u{9b}b\n\u{7f}"),
            "a\\u{1b}[2J\\u{9b}b\\n\\u{7f}"
        );
    }

    #[test]
    fn a_folder_is_named_as_one() {
        let dir = std::env::temp_dir();
        let e = open_regular(&dir, "a GGUF file").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(e.to_string(), "a folder, not a GGUF file");
    }
}

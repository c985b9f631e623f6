//! Output paths: checked before any work starts, written to a partial file
//! (or folder) beside the destination named `.NAME.PID.XXXXXX.partial`, and
//! published with one rename. The PID in the name lets a later run sweep the
//! partials of a killed one without touching those of a run still going, and a
//! registry of live partials lets the CLI remove them on SIGINT/SIGTERM.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The files an `--emit` folder may hold: everything lorafold writes there.
pub const SET_FILES: [&str; 5] = [
    "merged.gguf",
    "base.gguf",
    "adapter.gguf",
    "report.json",
    "merged.compensation.gguf",
];

/// An output path that cannot be used, or an output that could not be published.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// The destination exists and is not a regular file (or, for a set, not a folder).
    #[error("{path}: exists and is {kind}, not {wanted}; refusing to replace it")]
    WrongKind {
        /// the destination
        path: PathBuf,
        /// what it is ("a FIFO", "a character device", ...)
        kind: &'static str,
        /// what an output there must be
        wanted: &'static str,
    },
    /// The folder the destination would go in does not exist.
    #[error("{path}: the folder {folder} does not exist")]
    MissingFolder {
        /// the destination
        path: PathBuf,
        /// its parent
        folder: PathBuf,
    },
    /// An output folder holds files that lorafold did not write.
    #[error("{path}: holds '{other}', which lorafold did not write; give a new or empty folder, or one lorafold wrote a set of outputs to")]
    ForeignFiles {
        /// the folder
        path: PathBuf,
        /// one such file
        other: String,
    },
    /// Two outputs name the same file (however spelled: `./a`, `a`, `d/../a`,
    /// or a symlink to it).
    #[error("{path}: given for two outputs ({first} and {second})")]
    Duplicate {
        /// the path, as given for the second
        path: PathBuf,
        /// what the first output is (a flag, or what the file holds)
        first: String,
        /// what the second is
        second: String,
    },
    /// An output would be published inside a folder that another output
    /// replaces as a whole.
    #[error("{path} ({role}) is inside {folder} ({folder_role}), which is replaced as a whole when it is published")]
    InsideOutput {
        /// the output inside
        path: PathBuf,
        /// what it is
        role: String,
        /// the folder
        folder: PathBuf,
        /// what the folder is
        folder_role: String,
    },
    /// An output would replace a file the command reads.
    #[error("{path}: given as an output ({output}) and read as an input ({input}); refusing to replace an input")]
    ReplacesInput {
        /// the path, as given for the output
        path: PathBuf,
        /// what the output is
        output: String,
        /// what the input is
        input: String,
    },
    /// The OS refused a create, write or rename.
    #[error("{path}: {source}")]
    Io {
        /// the path
        path: PathBuf,
        /// the OS error
        #[source]
        source: std::io::Error,
    },
}

fn kind_of(meta: &fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        return "a folder";
    }
    if t.is_file() {
        return "a regular file";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    "neither a file nor a folder"
}

/// The folder `path` is in ("." for a bare file name).
pub fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn check_parent(path: &Path) -> Result<(), OutputError> {
    let folder = parent_of(path);
    if folder.is_dir() {
        Ok(())
    } else {
        Err(OutputError::MissingFolder {
            path: path.to_path_buf(),
            folder,
        })
    }
}

/// Check that a file can be written at `path`: its folder exists, and it is
/// either absent or a regular file (a symlink is judged by what it points to,
/// so a link to /dev/null is refused like /dev/null itself).
pub fn check_file_destination(path: &Path) -> Result<(), OutputError> {
    check_parent(path)?;
    match fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(m) => Err(OutputError::WrongKind {
            path: path.to_path_buf(),
            kind: kind_of(&m),
            wanted: "a regular file",
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(OutputError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Check that a set of files can be published as the folder `path`: its parent
/// exists, and it is absent or a folder holding nothing but an earlier set.
pub fn check_set_destination(path: &Path) -> Result<(), OutputError> {
    check_parent(path)?;
    let io = |source| OutputError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(e)),
    };
    if !meta.is_dir() {
        return Err(OutputError::WrongKind {
            path: path.to_path_buf(),
            kind: kind_of(&meta),
            wanted: "a folder",
        });
    }
    for entry in fs::read_dir(path).map_err(io)? {
        let name = entry.map_err(io)?.file_name();
        let name = name.to_string_lossy();
        let ours = SET_FILES.contains(&name.as_ref())
            || (name.starts_with('.') && name.ends_with(".partial"));
        if !ours {
            return Err(OutputError::ForeignFiles {
                path: path.to_path_buf(),
                other: name.into_owned(),
            });
        }
    }
    Ok(())
}

/// `path` as the file system resolves it: symlinks and `.`/`..` resolved
/// through its deepest existing folder, so that every spelling of one file
/// (`a`, `./a`, `d/../a`, a link to `a`) gives the same path.
pub fn resolved(path: &Path) -> PathBuf {
    if let Ok(p) = path.canonicalize() {
        return p;
    }
    // Not there (yet): its folder resolved, then its name.
    match path.file_name() {
        Some(name) => resolved(&parent_of(path)).join(name),
        None => std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()),
    }
}

/// Refuse outputs that are one file, an output inside a folder another
/// output replaces (an `--emit` set), and an output that is one of the
/// `inputs`, each compared once resolved ([`resolved`]). Each path comes with
/// what it is (a flag, or what the file holds), for the message.
pub fn check_distinct(
    outputs: &[(&str, &Path)],
    inputs: &[(&str, &Path)],
) -> Result<(), OutputError> {
    let outs: Vec<(&str, &Path, PathBuf)> =
        outputs.iter().map(|&(r, p)| (r, p, resolved(p))).collect();
    for (i, (role, path, at)) in outs.iter().enumerate() {
        for (first, _, earlier) in &outs[..i] {
            if at == earlier {
                return Err(OutputError::Duplicate {
                    path: path.to_path_buf(),
                    first: first.to_string(),
                    second: role.to_string(),
                });
            }
        }
        for (other, folder, other_at) in &outs {
            if at != other_at && at.starts_with(other_at) {
                return Err(OutputError::InsideOutput {
                    path: path.to_path_buf(),
                    role: role.to_string(),
                    folder: folder.to_path_buf(),
                    folder_role: other.to_string(),
                });
            }
        }
        for &(input, p) in inputs {
            if *at == resolved(p) {
                return Err(OutputError::ReplacesInput {
                    path: path.to_path_buf(),
                    output: role.to_string(),
                    input: input.to_string(),
                });
            }
        }
    }
    Ok(())
}

/// The prefix of this process's partials for `dest`: `.NAME.PID.`.
pub fn partial_prefix(dest: &Path) -> String {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!(".{name}.{}.", std::process::id())
}

/// Whether process `pid` exists. Conservative: when unsure, it does.
fn process_alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            return false;
        };
        // SAFETY: signal 0 only checks that the process exists.
        if unsafe { libc::kill(pid, 0) } == 0 {
            return true;
        }
        std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// Remove the partials of `dest` left by processes that no longer run (a
/// killed conversion); returns how many were removed. Partials of a live
/// process, this one included, are left alone.
pub fn sweep_stale_partials(dest: &Path) -> usize {
    let Some(name) = dest.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return 0;
    };
    let prefix = format!(".{name}.");
    let Ok(entries) = fs::read_dir(parent_of(dest)) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(rest) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|n| n.strip_suffix(".partial"))
        else {
            continue;
        };
        // `PID.XXXXXX`; a bare `XXXXXX` is from before PIDs were recorded and
        // has no owner we could ask about.
        let stale = match rest.split_once('.') {
            Some((pid, _)) => pid.parse().is_ok_and(|pid| !process_alive(pid)),
            None => true,
        };
        if stale && remove_path(&entry.path()) {
            removed += 1;
        }
    }
    removed
}

fn remove_path(p: &Path) -> bool {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p).is_ok(),
        Ok(_) => fs::remove_file(p).is_ok(),
        Err(_) => false,
    }
}

/// Partials this process is writing, for removal on SIGINT/SIGTERM.
struct Live {
    paths: Vec<PathBuf>,
    /// Set when the removal began: no partial may be made after it, as
    /// nothing would remove it.
    closing: bool,
}

static LIVE: Mutex<Live> = Mutex::new(Live {
    paths: Vec::new(),
    closing: false,
});

fn live() -> std::sync::MutexGuard<'static, Live> {
    // A poisoned lock still holds the list; the paths are what matter.
    LIVE.lock().unwrap_or_else(|p| p.into_inner())
}

/// A partial file or folder registered for removal on a signal while it lives.
#[derive(Debug)]
pub struct LivePartial(PathBuf);

impl LivePartial {
    /// Register `path` (already created) until this value is dropped; after
    /// a signal's removal began, `path` is removed at once. A partial made
    /// by [`partial_file`] or [`WorkFolder`] is registered as it is created,
    /// which leaves no moment where a signal would miss it.
    pub fn register(path: &Path) -> LivePartial {
        let mut live = live();
        if live.closing {
            remove_path(path);
        } else {
            live.paths.push(path.to_path_buf());
        }
        LivePartial(path.to_path_buf())
    }
}

impl Drop for LivePartial {
    fn drop(&mut self) {
        let mut live = live();
        if let Some(i) = live.paths.iter().position(|p| *p == self.0) {
            live.paths.swap_remove(i);
        }
    }
}

/// Remove every partial this process is still writing, and refuse to make
/// more. Called by the CLI's signal thread just before it exits; the writers
/// are not told, as the process is about to end.
pub fn remove_live_partials() {
    let paths = {
        let mut live = live();
        live.closing = true;
        live.paths.clone()
    };
    for p in paths {
        // A writer may still be adding files to a folder; try a few times.
        for _ in 0..3 {
            if !p.exists() || remove_path(&p) {
                break;
            }
        }
    }
}

/// Write `bytes` to `path` through a partial file and a rename.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<(), OutputError> {
    check_file_destination(path)?;
    sweep_stale_partials(path);
    let io = |source| OutputError::Io {
        path: path.to_path_buf(),
        source,
    };
    let (tmp, _live) = partial_file(path).map_err(io)?;
    fs::write(tmp.path(), bytes).map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

/// Create a partial for `dest` beside it with `make`, named with this
/// process's PID and with `mode` (tempfile makes 0600; outputs are shared),
/// and register it ([`LivePartial`]) in the same step.
fn partial<T>(
    dest: &Path,
    mode: u32,
    make: impl FnOnce(&tempfile::Builder, &Path) -> std::io::Result<T>,
    path_of: impl FnOnce(&T) -> &Path,
) -> std::io::Result<(T, LivePartial)> {
    let prefix = partial_prefix(dest);
    let mut b = tempfile::Builder::new();
    b.prefix(&prefix).suffix(".partial");
    #[cfg(unix)]
    b.permissions(std::os::unix::fs::PermissionsExt::from_mode(mode));
    #[cfg(not(unix))]
    let _ = mode;
    // Made under the registry's lock: a signal's removal either sees it or
    // comes first and stops it being made.
    let mut live = live();
    if live.closing {
        return Err(std::io::Error::new(
            std::io::ErrorKind::Interrupted,
            "the process is ending on a signal",
        ));
    }
    let made = make(&b, &parent_of(dest))?;
    let path = path_of(&made).to_path_buf();
    live.paths.push(path.clone());
    Ok((made, LivePartial(path)))
}

/// Create a partial file (0644) for `dest` beside it, registered for removal
/// on a signal while the returned [`LivePartial`] lives.
pub fn partial_file(dest: &Path) -> std::io::Result<(tempfile::NamedTempFile, LivePartial)> {
    partial(dest, 0o644, |b, dir| b.tempfile_in(dir), |f| f.path())
}

fn partial_folder(dest: &Path) -> std::io::Result<(tempfile::TempDir, LivePartial)> {
    partial(dest, 0o755, |b, dir| b.tempdir_in(dir), |d| d.path())
}

/// A folder a command works in while it makes `dest` (an f32 reference, a
/// drift budget's rounds), named and registered as a partial of `dest`, so
/// that it goes the way partials go: removed on drop, on SIGINT/SIGTERM, and
/// by a later run's sweep once its process is gone. These folders hold the
/// largest files a command makes (an f32 model), so none may outlive it.
#[derive(Debug)]
pub struct WorkFolder {
    // Declared first, so it is removed before it is unregistered.
    dir: tempfile::TempDir,
    _live: LivePartial,
}

impl WorkFolder {
    /// Sweep `dest`'s stale partials and create a work folder beside it.
    pub fn new(dest: &Path) -> Result<WorkFolder, OutputError> {
        check_parent(dest)?;
        sweep_stale_partials(dest);
        let (dir, live) = partial_folder(dest).map_err(|source| OutputError::Io {
            path: dest.to_path_buf(),
            source,
        })?;
        Ok(WorkFolder { dir, _live: live })
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// A set of outputs written into a partial folder beside `dest` and published
/// as `dest` by one rename, so that a reader sees the whole earlier set or
/// the whole new one, never a mix. Dropped unpublished, it removes itself.
#[derive(Debug)]
pub struct StagedSet {
    dest: PathBuf,
    staging: Option<tempfile::TempDir>,
    _live: LivePartial,
}

impl StagedSet {
    /// Check `dest` (see [`check_set_destination`]) and create the partial folder.
    pub fn new(dest: &Path) -> Result<StagedSet, OutputError> {
        check_set_destination(dest)?;
        sweep_stale_partials(dest);
        let (staging, live) = partial_folder(dest).map_err(|source| OutputError::Io {
            path: dest.to_path_buf(),
            source,
        })?;
        Ok(StagedSet {
            dest: dest.to_path_buf(),
            staging: Some(staging),
            _live: live,
        })
    }

    /// Where `name` is written before publishing.
    pub fn path(&self, name: &str) -> PathBuf {
        self.staging_dir().join(name)
    }

    /// Where a file written at `staged` (inside the partial folder) will be
    /// once the set is published.
    pub fn published_path(&self, staged: &Path) -> PathBuf {
        match staged.strip_prefix(self.staging_dir()) {
            Ok(rel) => self.dest.join(rel),
            Err(_) => staged.to_path_buf(),
        }
    }

    fn staging_dir(&self) -> &Path {
        self.staging.as_ref().expect("present until publish").path()
    }

    /// Publish the set as `dest`, replacing an earlier set there in one step.
    pub fn publish(mut self) -> Result<(), OutputError> {
        let staging = self.staging.take().expect("present until publish").keep();
        let io = |source| OutputError::Io {
            path: self.dest.clone(),
            source,
        };
        let result = publish_folder(&staging, &self.dest).map_err(io);
        if result.is_err() {
            remove_path(&staging);
        }
        result
    }
}

/// Rename `staging` to `dest`; an existing `dest` is swapped out atomically
/// where the OS can (Linux's RENAME_EXCHANGE) and then removed.
fn publish_folder(staging: &Path, dest: &Path) -> std::io::Result<()> {
    if !dest.exists() {
        return fs::rename(staging, dest);
    }
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes());
        let (from, to) = (c(staging)?, c(dest)?);
        // SAFETY: two valid NUL-terminated paths; renameat2 only reads them.
        let rc = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                from.as_ptr(),
                libc::AT_FDCWD,
                to.as_ptr(),
                libc::RENAME_EXCHANGE,
            )
        };
        if rc == 0 {
            // `staging` now holds the earlier set.
            remove_path(staging);
            return Ok(());
        }
    }
    // No atomic swap here (or the filesystem refused it): move the old set
    // aside first, so `dest` is briefly absent but never mixed.
    let aside = parent_of(dest).join(format!("{}old.partial", partial_prefix(dest)));
    fs::rename(dest, &aside)?;
    if let Err(e) = fs::rename(staging, dest) {
        let _ = fs::rename(&aside, dest);
        return Err(e);
    }
    remove_path(&aside);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(unix)]
    fn one_file_however_spelled_is_one_output() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::create_dir(d.join("sub")).unwrap();
        fs::write(d.join("in.gguf"), b"x").unwrap();
        std::os::unix::fs::symlink(d.join("in.gguf"), d.join("link.gguf")).unwrap();
        let a = d.join("a.gguf");
        for other in [
            d.join("sub/../a.gguf"),
            d.join("./a.gguf"),
            d.join("sub/.././a.gguf"),
        ] {
            assert_eq!(resolved(&other), resolved(&a), "{other:?}");
            let e = check_distinct(&[("-o", &a), ("--report", &other)], &[]).unwrap_err();
            assert!(matches!(e, OutputError::Duplicate { .. }), "{e}");
        }
        // A link is judged by what it points to.
        let e = check_distinct(
            &[("-o", &d.join("link.gguf"))],
            &[("--base", &d.join("in.gguf"))],
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{}: given as an output (-o) and read as an input (--base); refusing to replace an input",
                d.join("link.gguf").display()
            )
        );
        // Apart, and a file beside (not inside) a folder output, are fine.
        check_distinct(
            &[("-o", &d.join("sub")), ("--report", &d.join("sub.json"))],
            &[("--base", &d.join("in.gguf"))],
        )
        .unwrap();
        let e = check_distinct(
            &[("-o", &d.join("sub")), ("--report", &d.join("sub/r.json"))],
            &[],
        )
        .unwrap_err();
        assert!(matches!(e, OutputError::InsideOutput { .. }), "{e}");
    }
}

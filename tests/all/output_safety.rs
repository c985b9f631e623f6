//! Outputs are all-or-nothing: destinations are checked before any work, an
//! `--emit` set is published in one rename, and partial files of a killed run
//! are removed on SIGINT/SIGTERM or swept by the next run.
#![cfg(unix)]

use crate::common;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::lorafold;
use serde_json::Value;

fn tiny() -> PathBuf {
    common::shared_data().join("tiny-llama")
}

/// The names in `dir`, sorted.
pub(crate) fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// `lorafold convert` of tiny-llama with lora_all at q8_0, plus `args`.
fn convert_tiny(args: &[&Path]) -> Output {
    lorafold()
        .args(["convert", "--quant", "q8_0", "-q", "--base"])
        .arg(tiny().join("base"))
        .arg("--adapter")
        .arg(tiny().join("lora_all"))
        .args(args)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_refused(o: &Output, expect: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains(expect), "{err:?} lacks {expect:?}");
}

fn mkfifo(p: &Path) {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
}

#[test]
fn destinations_that_are_not_regular_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    mkfifo(&fifo);
    let null_link = dir.path().join("null.gguf");
    std::os::unix::fs::symlink("/dev/null", &null_link).unwrap();
    let folder = dir.path().join("folder.gguf");
    std::fs::create_dir(&folder).unwrap();
    let before = listing(dir.path());

    let o = convert_tiny(&[Path::new("-o"), &fifo]);
    assert_refused(&o, "fifo: exists and is a FIFO, not a regular file");
    let o = convert_tiny(&[Path::new("-o"), &null_link]);
    assert_refused(&o, "null.gguf: exists and is a character device");
    let o = convert_tiny(&[Path::new("-o"), &folder]);
    assert_refused(&o, "folder.gguf: exists and is a folder");
    let ok = dir.path().join("ok.gguf");
    let o = convert_tiny(&[Path::new("-o"), &ok, Path::new("--report"), &fifo]);
    assert_refused(&o, "fifo: exists and is a FIFO");
    let o = convert_tiny(&[Path::new("-o"), &ok, Path::new("--adapter-out"), &null_link]);
    assert_refused(&o, "is a character device");
    let o = convert_tiny(&[
        Path::new("--emit"),
        Path::new("merged"),
        Path::new("-o"),
        &fifo,
    ]);
    assert_refused(&o, "exists and is a FIFO, not a folder");
    let o = convert_tiny(&[Path::new("-o"), &ok, Path::new("--base-out"), &ok]);
    assert_refused(&o, "ok.gguf: given for two outputs");

    // Nothing was replaced or added.
    assert_eq!(listing(dir.path()), before);
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
    assert!(std::fs::symlink_metadata(&null_link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(std::fs::metadata("/dev/null")
        .unwrap()
        .file_type()
        .is_char_device());
}

#[test]
fn report_into_a_missing_folder_fails_before_any_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.gguf");
    let report = dir.path().join("missing").join("r.json");
    let o = convert_tiny(&[Path::new("-o"), &out, Path::new("--report"), &report]);
    assert_refused(&o, "r.json: the folder");
    assert!(
        stderr(&o).contains("missing does not exist"),
        "{}",
        stderr(&o)
    );
    assert!(listing(dir.path()).is_empty(), "{:?}", listing(dir.path()));
    let o = convert_tiny(&[Path::new("-o"), &dir.path().join("nope/out.gguf")]);
    assert_refused(&o, "does not exist");
    assert!(listing(dir.path()).is_empty());
}

#[test]
fn emit_replaces_a_whole_set_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("release");
    let emit =
        |what: &str| convert_tiny(&[Path::new("--emit"), Path::new(what), Path::new("-o"), &out]);
    let o = emit("merged,separate");
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        listing(&out),
        ["adapter.gguf", "base.gguf", "merged.gguf", "report.json"]
    );
    let merged = std::fs::read(out.join("merged.gguf")).unwrap();

    // A second set replaces the first whole: the separate files go with it.
    let o = emit("merged");
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(listing(&out), ["merged.gguf", "report.json"]);
    assert_eq!(std::fs::read(out.join("merged.gguf")).unwrap(), merged);
    assert_eq!(
        listing(dir.path()),
        ["release"],
        "no partial left beside it"
    );
    // The report names where the files are, not where they were staged.
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(
        report["output"].as_str().unwrap(),
        out.join("merged.gguf").display().to_string()
    );

    // A failure leaves the earlier set as it was, and no partial folder.
    let o = lorafold()
        .args(["convert", "--quant", "q8_0", "--emit", "merged", "--base"])
        .arg(tiny().join("base"))
        .arg("--adapter")
        .arg(dir.path().join("no-such-adapter"))
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert_refused(&o, "no-such-adapter");
    assert_eq!(listing(&out), ["merged.gguf", "report.json"]);
    assert_eq!(std::fs::read(out.join("merged.gguf")).unwrap(), merged);
    assert_eq!(listing(dir.path()), ["release"]);

    // An early error with no earlier set leaves no empty folder.
    let fresh = dir.path().join("fresh");
    let o = lorafold()
        .args(["convert", "--quant", "q3_z", "--emit", "merged", "--base"])
        .arg(tiny().join("base"))
        .arg("-o")
        .arg(&fresh)
        .output()
        .unwrap();
    assert_refused(&o, "q3_z");
    let o = lorafold()
        .args(["convert", "--quant", "q8_0", "--emit", "merged", "--base"])
        .arg(dir.path().join("no-such-base"))
        .arg("-o")
        .arg(&fresh)
        .output()
        .unwrap();
    assert_refused(&o, "no-such-base");
    assert_eq!(listing(dir.path()), ["release"]);

    // A folder holding someone else's files is not ours to replace.
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let o = emit("merged");
    assert_refused(&o, "holds 'notes.txt', which lorafold did not write");
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "mine"
    );
}

/// The PID of a process that has exited.
fn dead_pid() -> u32 {
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

#[test]
fn stale_partials_of_dead_runs_are_swept_and_live_ones_kept() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.gguf");
    let dead = format!(".out.gguf.{}.aBc123.partial", dead_pid());
    let old_style = ".out.gguf.Zx9Q2w.partial".to_string();
    let live = format!(".out.gguf.{}.dEf456.partial", std::process::id());
    let other = format!(".other.gguf.{}.aBc123.partial", dead_pid());
    for name in [&dead, &old_style, &live, &other] {
        std::fs::write(dir.path().join(name), vec![0u8; 1000]).unwrap();
    }
    let o = convert_tiny(&[Path::new("-o"), &out]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut want = vec![live, other, "out.gguf".to_string()];
    want.sort();
    assert_eq!(listing(dir.path()), want);
}

/// Start a conversion of SmolLM2 (seconds of work), wait until its partial
/// output appears in `watch`, send `signal`, and return the exit code.
fn kill_mid_conversion(args: &[&Path], watch: &Path, signal: i32) -> Option<i32> {
    let mut child = lorafold()
        .args([
            "convert",
            "--quant",
            "q8_0",
            "--threads",
            "1",
            "-q",
            "--base",
        ])
        .arg(common::smollm2())
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let seen = loop {
        let partial = std::fs::read_dir(watch).unwrap().any(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".partial")
        });
        if partial || Instant::now() > deadline {
            break partial;
        }
        if child.try_wait().unwrap().is_some() {
            break false;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    assert!(seen, "the conversion ended before its partial was seen");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, signal) };
    child.wait().unwrap().code()
}

#[test]
fn a_signal_removes_the_partials_and_keeps_the_earlier_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.gguf");
    let code = kill_mid_conversion(&[Path::new("-o"), &out], dir.path(), libc::SIGTERM);
    assert_eq!(code, Some(128 + libc::SIGTERM));
    assert!(listing(dir.path()).is_empty(), "{:?}", listing(dir.path()));

    // An --emit set killed mid-way: the earlier set stays whole, nothing else.
    let set = dir.path().join("release");
    std::fs::create_dir(&set).unwrap();
    std::fs::write(set.join("merged.gguf"), "earlier").unwrap();
    std::fs::write(set.join("report.json"), "{}").unwrap();
    let code = kill_mid_conversion(
        &[
            Path::new("--emit"),
            Path::new("merged"),
            Path::new("-o"),
            &set,
        ],
        dir.path(),
        libc::SIGINT,
    );
    assert_eq!(code, Some(128 + libc::SIGINT));
    assert_eq!(listing(dir.path()), ["release"]);
    assert_eq!(listing(&set), ["merged.gguf", "report.json"]);
    assert_eq!(
        std::fs::read_to_string(set.join("merged.gguf")).unwrap(),
        "earlier"
    );
}

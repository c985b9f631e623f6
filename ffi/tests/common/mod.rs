//! What the C API's test binaries share: C strings, this thread's last
//! error, the status check, and the SmolLM2 file `.ci/run` caches.

#![allow(dead_code)]

use std::ffi::{CStr, CString};
use std::path::PathBuf;

use lorafold::*;

/// `s` as a C string.
pub fn c(s: &str) -> CString {
    CString::new(s).unwrap()
}

/// `lorafold_last_error()` as a Rust string.
pub fn message() -> String {
    // SAFETY: lorafold_last_error returns a NUL-terminated string.
    unsafe { CStr::from_ptr(lorafold_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// The status, and a message exactly when it is an error.
pub fn expect(status: lorafold_status, want: lorafold_status, what: &str) {
    let m = message();
    assert_eq!(status, want, "{what}: {m}");
    assert_eq!(
        status != LORAFOLD_OK,
        !m.is_empty(),
        "{what}: message '{m}'"
    );
}

/// SmolLM2-135M-Instruct Q4_1 in the lorafold cache.
pub fn smollm2() -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    let p = home.join(".cache/lorafold/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-smollm2.sh",
        p.display()
    );
    p
}

/// Gemma 3 270M Q4_K_M in the lorafold cache (fetched by
/// scripts/fetch-gemma3.sh on first use).
pub fn gemma3() -> PathBuf {
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/fetch-gemma3.sh");
    let out = std::process::Command::new(script).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

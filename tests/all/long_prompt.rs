//! `lorafold run` shares the C API's bound on prompts (generate::prompt_ids):
//! a prompt too long for the context is refused before it is tokenized, in
//! one line that names the room and the flag.

use std::io::Write;
use std::process::Stdio;

use crate::common;

#[test]
fn run_refuses_a_prompt_too_long_for_the_context_before_tokenizing_it() {
    const BYTES: usize = 4 << 20;
    let mut child = common::lorafold()
        .args(["run", common::smollm2().to_str().unwrap(), "--chat"])
        .args(["--ctx", "64", "-n", "4"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = "0123456789".repeat(BYTES / 10);
    line.push('\n');
    let mut stdin = child.stdin.take().unwrap();
    // The refusal may close the pipe before all of it is read.
    let _ = stdin.write_all(line.as_bytes());
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    let bytes = format!("the prompt's {} bytes make at least", BYTES - BYTES % 10);
    for want in [
        bytes.as_str(),
        "room for 64 of its 64",
        "a larger --ctx holds more",
    ] {
        assert!(err.contains(want), "{err} lacks {want}");
    }
}

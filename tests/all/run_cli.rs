//! `lorafold run`: text out, a timing line, adapters from the command line,
//! and one-line errors.

use crate::common;

use common::lorafold;

#[test]
fn run_prints_paris_and_timings() {
    let o = lorafold()
        .arg("run")
        .arg(common::smollm2())
        .args([
            "-p",
            "The capital of France is",
            "-n",
            "4",
            "--threads",
            "2",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8(o.stdout).unwrap();
    assert!(out.starts_with("The capital of France is Paris"), "{out}");
    let err = String::from_utf8(o.stderr).unwrap();
    assert!(
        err.contains("load ")
            && err.contains("ttft ")
            && err.contains("prefill 5 tok at ")
            && err.contains("decode 4 tok at "),
        "{err}"
    );
}

#[test]
fn run_with_a_pirate_adapter_talks_like_a_pirate() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("pirate.gguf");
    let o = lorafold()
        .args([
            "convert",
            "--adapter",
            "examples/adapters/pirate",
            "--adapter-out",
        ])
        .arg(&adapter)
        .arg("--base")
        .arg(common::smollm2())
        .current_dir(common::repo())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let prompt = "Q: What is the capital of Portugal? A:";
    let run = |lora: &str| {
        let o = lorafold()
            .arg("run")
            .arg(common::smollm2())
            .args(["-p", prompt, "-n", "8", "--lora", lora])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    let with = run(&format!("{}:1.0", adapter.display()));
    // The reference's merged fp32 model says " Lisbon, matey, ..." here.
    assert!(with.contains("Lisbon, matey"), "{with}");
    let off = run(&format!("{}:0", adapter.display()));
    assert!(!off.contains("matey"), "{off}");
}

#[test]
fn chat_keeps_the_conversation() {
    use std::io::Write;
    let mut child = lorafold()
        .arg("run")
        .arg(common::smollm2())
        .args(["--chat", "-n", "20"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"What is the capital of France?\nAnd of Italy?\n")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8(o.stdout).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].contains("Paris"), "{out}");
    // "And of Italy?" only makes sense with the first turn in the cache.
    assert!(lines[1].contains("Rome"), "{out}");
}

#[test]
fn run_errors_are_one_line() {
    let fail = |args: &[&str], expect: &str| {
        let o = lorafold().arg("run").args(args).output().unwrap();
        let err = String::from_utf8(o.stderr).unwrap();
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(
            err.lines().count() == 1 && err.contains(expect),
            "{err:?} lacks {expect:?}"
        );
    };
    let smol = common::smollm2().to_str().unwrap().to_string();
    // An unknown device is a usage error, as clap reports every bad value
    // (exit 2, with its usage hint), parsed before any work.
    let o = lorafold()
        .args(["run", &smol, "-p", "x", "--device", "tpu"])
        .output()
        .unwrap();
    let err = String::from_utf8(o.stderr).unwrap();
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("invalid value 'tpu' for '--device <DEVICE>': unknown device 'tpu' (cpu, cuda[:N], metal)"),
        "{err}"
    );
    fail(
        &["/nonexistent.gguf", "-p", "x"],
        "/nonexistent.gguf: No such file",
    );
    fail(&[&smol, "-p", "x", "--lora", &smol], "not a LoRA adapter");
    fail(&[&smol], "give a prompt with -p, or --chat");
}

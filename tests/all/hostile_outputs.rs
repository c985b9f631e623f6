//! What commands write: every output path distinct from the others and
//! from the inputs however it is spelled, values that overflow the type
//! they are written in refused instead of written as inf, gates and budgets
//! that could never fire (or only fail) refused as they are parsed, tensor
//! type overrides that match nothing refused, drift over one vocabulary,
//! messages that print what the user gave.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Output;

use crate::hostile_convert::write_safetensors;
use crate::output_safety::listing;
use common::synthetic::{write_f32, Shape};
use common::{lorafold, Rng};
use serde_json::json;

/// 32 wide (one Q8_0 block per row), one block, 32 tokens.
const SHAPE: Shape = Shape {
    dim: 32,
    ffn: 64,
    layers: 1,
    heads: 2,
    kv_heads: 1,
    vocab: 32,
    untied: true,
};

/// The synthetic llama of [`SHAPE`] (vocabulary `vocab`) at `dir/name`.
fn base(dir: &Path, name: &str, vocab: usize) -> PathBuf {
    let p = dir.join(name);
    write_f32(&p, Shape { vocab, ..SHAPE }, 1);
    p
}

/// A rank-2 PEFT adapter on layer 0's q_proj of [`SHAPE`] at `dir/name`,
/// its lora_B `b_value` everywhere.
fn adapter(dir: &Path, name: &str, b_value: f32) -> PathBuf {
    adapter_of(SHAPE.dim, dir, name, b_value)
}

/// As [`adapter`], for a model `dim` wide.
fn adapter_of(dim: usize, dir: &Path, name: &str, b_value: f32) -> PathBuf {
    let a = dir.join(name);
    std::fs::create_dir_all(&a).unwrap();
    let cfg = json!({
        "peft_type": "LORA",
        "r": 2,
        "lora_alpha": 4,
        "target_modules": ["q_proj"],
        "base_model_name_or_path": "synthetic"
    });
    std::fs::write(a.join("adapter_config.json"), cfg.to_string()).unwrap();
    let mut rng = Rng::new(5);
    let key = |s: &str| format!("base_model.model.model.layers.0.self_attn.q_proj.{s}");
    let tensors = [
        (
            key("lora_A.weight"),
            vec![2, dim],
            // Positive, so that B·A has lora_B's sign everywhere.
            (0..2 * dim)
                .map(|_| 0.5 + 0.25 * rng.f32())
                .collect::<Vec<_>>(),
        ),
        (key("lora_B.weight"), vec![dim, 2], vec![b_value; 2 * dim]),
    ];
    write_safetensors(&a.join("adapter_model.safetensors"), &tensors);
    a
}

/// `lorafold ARGS` run in `dir`.
fn cli_in(dir: &Path, args: &[&str]) -> Output {
    lorafold().current_dir(dir).args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Exit status 1, one line holding every part of `expect`.
fn refused(o: &Output, expect: &[&str]) -> String {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err:?}");
    for e in expect {
        assert!(err.contains(e), "{err:?} lacks {e:?}");
    }
    err
}

// ---- 1. two outputs on one path, an output on an input ----

#[test]
fn outputs_on_one_path_or_on_an_input_are_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    base(d, "base.gguf", SHAPE.vocab);
    adapter(d, "adapter", 1.0);
    std::fs::create_dir(d.join("sub")).unwrap();
    let before = listing(d);
    let convert = |extra: &[&str]| {
        let mut args = vec![
            "convert",
            "--base",
            "base.gguf",
            "--adapter",
            "adapter",
            "-q",
        ];
        args.extend_from_slice(extra);
        cli_in(d, &args)
    };
    // The same file however spelled: the model and the report would
    // replace each other.
    for (o, report) in [
        ("m.gguf", "m.gguf"),
        ("m.gguf", "./m.gguf"),
        ("./m.gguf", "sub/../m.gguf"),
    ] {
        let out = convert(&["--quant", "q8_0", "-o", o, "--report", report]);
        refused(&out, &[report, "given for two outputs (-o and --report)"]);
        assert_eq!(listing(d), before, "-o {o} --report {report}");
    }
    // The compensation's own default name, taken by another output.
    let out = convert(&[
        "--quant",
        "q8_0",
        "-o",
        "m.gguf",
        "--compensate",
        "2",
        "--adapter-out",
        "m.compensation.gguf",
    ]);
    refused(&out, &["m.compensation.gguf: given for two outputs (--adapter-out and --compensate's file beside -o)"]);
    // An output on an input: the base, a file of the adapter's folder.
    let base_bytes = std::fs::read(d.join("base.gguf")).unwrap();
    let out = convert(&["--quant", "q8_0", "-o", "./base.gguf"]);
    refused(
        &out,
        &["./base.gguf: given as an output (-o) and read as an input (--base)"],
    );
    let out = convert(&["--adapter-out", "adapter/adapter_model.safetensors"]);
    refused(
        &out,
        &["given as an output (--adapter-out) and read as an input (--adapter)"],
    );
    assert_eq!(std::fs::read(d.join("base.gguf")).unwrap(), base_bytes);
    assert_eq!(listing(d), before);
    // A report inside the --emit folder would be lost when the set is published.
    let out = convert(&[
        "--quant",
        "q8_0",
        "--emit",
        "merged",
        "-o",
        "set",
        "--report",
        "set/r.json",
    ]);
    refused(&out, &["set/r.json (--report) is inside set (-o, the --emit folder), which is replaced as a whole"]);
    assert_eq!(listing(d), before);

    // calibrate: the statistics and the imatrix, the statistics and the text.
    std::fs::write(d.join("text.txt"), "t3t4t5t6\n").unwrap();
    let before = listing(d);
    let out = cli_in(
        d,
        &[
            "calibrate",
            "base.gguf",
            "--text",
            "text.txt",
            "-o",
            "x.gguf",
            "--imatrix",
            "./x.gguf",
        ],
    );
    refused(
        &out,
        &["./x.gguf: given for two outputs (-o and --imatrix)"],
    );
    let out = cli_in(
        d,
        &[
            "calibrate",
            "base.gguf",
            "--text",
            "text.txt",
            "-o",
            "text.txt",
        ],
    );
    refused(
        &out,
        &["given as an output (-o) and read as an input (--text)"],
    );
    // drift: the JSON report over the text it reads.
    let out = cli_in(
        d,
        &[
            "drift",
            "--ref",
            "base.gguf",
            "--cand",
            "x=base.gguf",
            "--text",
            "text.txt",
            "--json",
            "./text.txt",
        ],
    );
    refused(
        &out,
        &["given as an output (--json) and read as an input (--text)"],
    );
    assert_eq!(
        std::fs::read_to_string(d.join("text.txt")).unwrap(),
        "t3t4t5t6\n"
    );
    assert_eq!(listing(d), before);
}

// ---- 2. finite values that overflow the written type ----

#[test]
fn values_that_overflow_the_written_type_are_refused_not_written_as_inf() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    base(d, "base.gguf", SHAPE.vocab);
    // Finite in f32 (the input is read and merged fine), but 1e30 makes a
    // Q8_0 block scale past f16's 65504, and 1e5 is past f16 itself.
    adapter(d, "huge", 1e30);
    adapter(d, "large", 1e5);
    let before = listing(d);
    let convert = |adapter: &str, extra: &[&str]| {
        let mut args = vec!["convert", "--base", "base.gguf", "--adapter", adapter, "-q"];
        args.extend_from_slice(extra);
        cli_in(d, &args)
    };
    refused(
        &convert("huge", &["--quant", "q8_0", "-o", "m.gguf"]),
        &[
            "m.gguf: tensor 'blk.0.attn_q.weight': block 0 (elements 0..32): its f16 scale d is inf",
            "refusing to write a value that is not finite",
            "(hint: a wider type holds larger values",
        ],
    );
    refused(
        &convert("large", &["--quant", "f16", "-o", "m.gguf"]),
        &["m.gguf: tensor 'blk.0.attn_q.weight': element 0 is inf in f16"],
    );
    refused(
        &convert("large", &["--adapter-out", "a.gguf"]),
        &["a.gguf: tensor 'blk.0.attn_q.weight.lora_b': element 0 is inf in f16"],
    );
    // The outputs of one run go together: the adapter fails, the merged
    // file (fine in f32) is not left alone either.
    refused(
        &convert(
            "large",
            &["--quant", "f32", "-o", "m.gguf", "--adapter-out", "a.gguf"],
        ),
        &["a.gguf: tensor 'blk.0.attn_q.weight.lora_b'"],
    );
    assert_eq!(listing(d), before);
    // The Q6_K quantizer (candle's port of ggml's) makes such a block's
    // scale 0 (every value 0, finite): refused where it is quantized,
    // naming the file it was for and the tensor.
    let wide = d.join("wide");
    std::fs::create_dir(&wide).unwrap();
    write_f32(&wide.join("base.gguf"), Shape::SMALL_256, 1);
    adapter_of(256, &wide, "huge", 1e30);
    let out = cli_in(
        &wide,
        &[
            "convert",
            "--base",
            "base.gguf",
            "--adapter",
            "huge",
            "--quant",
            "q6_k",
            "-o",
            "m.gguf",
            "-q",
        ],
    );
    refused(
        &out,
        &[
            "m.gguf: tensor 'blk.0.attn_q.weight': block 0 (elements 0..256): its values reach",
            "which Q6_K's block cannot hold",
        ],
    );
    assert_eq!(listing(&wide), ["base.gguf", "huge"]);
    // What fits is written: the same values in f32, and bf16's range.
    let out = convert(
        "huge",
        &[
            "--quant",
            "f32",
            "-o",
            "m.gguf",
            "--adapter-out",
            "a.gguf",
            "--adapter-type",
            "bf16",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

// ---- 3. gates that switch themselves off ----

#[test]
fn gates_that_can_never_fire_or_only_fail_are_refused_as_parsed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    base(d, "base.gguf", SHAPE.vocab);
    adapter(d, "adapter", 1.0);
    std::fs::write(d.join("text.txt"), "t3t4t5t6\nt7t8t9\n").unwrap();
    let before = listing(d);
    let usage = |flag: &str, value: &str, extra: &[&str]| {
        let arg = format!("{flag}={value}");
        let mut args = vec![
            "convert",
            "--base",
            "base.gguf",
            "--adapter",
            "adapter",
            "--quant",
            "q4_0",
            "-o",
            "m.gguf",
            "-q",
            &arg,
        ];
        args.extend_from_slice(extra);
        let out = cli_in(d, &args);
        let err = stderr(&out);
        // A usage error, as clap reports every bad value: exit 2, before any work.
        assert_eq!(out.status.code(), Some(2), "{arg}: {err}");
        let want = format!("invalid value '{value}' for '{flag} <");
        assert!(err.contains(&want), "{arg}: {err:?} lacks {want:?}");
        assert_eq!(listing(d), before, "{arg}");
    };
    for v in ["nan", "inf", "-1", "1e400"] {
        usage("--max-rel-error", v, &[]);
    }
    for v in ["nan", "inf", "-0.5", "1.5"] {
        usage("--min-retention", v, &[]);
    }
    // The budgets measure over a calibration text: refused before it is run.
    let text = ["--calib-text", "text.txt"];
    for v in ["nan", "0", "inf", "-1"] {
        usage("--budget-kl", v, &text);
    }
    for v in ["0", "-1", "1", "nan"] {
        usage("--min-gain", v, &text);
    }
    for v in ["nan", "-0.01", "inf"] {
        usage("--damp", v, &text);
    }
}

// ---- 4. tensor type overrides ----

#[test]
fn tensor_type_overrides_must_match_a_tensor_and_name_a_type() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    base(d, "base.gguf", SHAPE.vocab);
    std::fs::write(d.join("text.txt"), "t3t4t5t6\n").unwrap();
    let before = listing(d);
    let convert = |extra: &[&str]| {
        let mut args = vec!["convert", "--base", "base.gguf", "-q"];
        args.extend_from_slice(extra);
        cli_in(d, &args)
    };
    refused(
        &convert(&[
            "--quant",
            "q4_0",
            "-o",
            "m.gguf",
            "--tensor-type",
            r"blk\.7\..*=q8_0",
        ]),
        &[
            r"base.gguf: no tensor matches the tensor type override 'blk\.7\..*=Q8_0'",
            "(hint: a --tensor-type pattern is a regex over tensor names",
        ],
    );
    // Refused before a calibration text is run.
    refused(
        &convert(&[
            "--quant",
            "q4_0",
            "-o",
            "m.gguf",
            "--calib-text",
            "text.txt",
            "--tensor-type",
            "outptu=q8_0",
        ]),
        &["no tensor matches the tensor type override 'outptu=Q8_0'"],
    );
    let err = refused(
        &convert(&[
            "--quant",
            "q4_0",
            "-o",
            "m.gguf",
            "--tensor-type",
            r"output\.weight=q9_0",
        ]),
        &[
            r"tensor type override 'output\.weight=q9_0': unknown type 'q9_0'; known: f32, f16, bf16, q8_0",
        ],
    );
    // A preset is not a tensor's type.
    assert!(!err.contains("q4_k_m"), "{err}");
    assert_eq!(listing(d), before);
    // One that matches is applied.
    let out = convert(&[
        "--quant",
        "q4_0",
        "-o",
        "m.gguf",
        "--tensor-type",
        r"output\.weight=q8_0",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let f = lorafold_runtime::gguf::GgufFile::open(d.join("m.gguf")).unwrap();
    assert_eq!(
        f.tensor("output.weight").unwrap().ggml_type,
        lorafold_runtime::gguf::GgmlType::Q8_0
    );
}

// ---- 5. drift over one vocabulary ----

#[test]
fn drift_refuses_a_base_or_candidate_with_another_vocabulary() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    base(d, "ref.gguf", SHAPE.vocab);
    base(d, "wide.gguf", SHAPE.vocab + 16);
    // Same size, one token renamed ("t5" -> "u5") in place.
    let mut bytes = std::fs::read(d.join("ref.gguf")).unwrap();
    let t5 = [&2u64.to_le_bytes()[..], b"t5"].concat();
    let at = bytes.windows(t5.len()).position(|w| w == t5).unwrap();
    bytes[at + 8] = b'u';
    std::fs::write(d.join("renamed.gguf"), bytes).unwrap();
    std::fs::write(d.join("text.txt"), "t3t4t5t6t7t8\n").unwrap();
    let drift = |extra: &[&str]| {
        let mut args = vec![
            "drift", "--ref", "ref.gguf", "--text", "text.txt", "--ctx", "8",
        ];
        args.extend_from_slice(extra);
        cli_in(d, &args)
    };
    refused(
        &drift(&["--cand", "x=ref.gguf", "--base", "wide.gguf"]),
        &["--base: wide.gguf: its vocabulary has 48 tokens, the reference ref.gguf's 32"],
    );
    refused(
        &drift(&["--cand", "x=ref.gguf", "--base", "renamed.gguf"]),
        &["--base: renamed.gguf: its token 5 is 'u5', the reference ref.gguf's 't5'"],
    );
    refused(
        &drift(&["--cand", "x=renamed.gguf"]),
        &["--cand x: renamed.gguf: its token 5 is 'u5'"],
    );
    let out = drift(&["--cand", "x=ref.gguf", "--base", "ref.gguf"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

// ---- 6. messages ----

#[test]
fn messages_name_what_is_there_and_print_numbers_as_given() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    base(d, "base.gguf", SHAPE.vocab);
    std::fs::write(d.join("file.txt"), "mine").unwrap();
    let out = cli_in(
        d,
        &[
            "convert",
            "--base",
            "base.gguf",
            "--quant",
            "q8_0",
            "--emit",
            "merged",
            "-o",
            "file.txt",
        ],
    );
    refused(
        &out,
        &["file.txt: exists and is a regular file, not a folder; refusing to replace it"],
    );
    assert_eq!(std::fs::read_to_string(d.join("file.txt")).unwrap(), "mine");
    // A number the user typed short is printed short.
    let out = cli_in(
        d,
        &[
            "run",
            "base.gguf",
            "-p",
            "t3",
            "-n",
            "1",
            "--top-p",
            "1e300",
        ],
    );
    let err = refused(&out, &["top-p 1e300 is out of range"]);
    assert!(err.len() < 200, "{err}");
    let out = cli_in(
        d,
        &["run", "base.gguf", "-p", "t3", "-n", "1", "--temp=-1e-300"],
    );
    refused(&out, &["temperature -1e-300 is out of range"]);
    use lorafold_converter::convert::{convert, ConvertOptions};
    use lorafold_converter::round::quant::QuantPolicy;
    let opts = ConvertOptions {
        damp: -1e300,
        ..ConvertOptions::new(
            d.join("base.gguf"),
            None,
            QuantPolicy::parse("q8_0", &[]).unwrap(),
            d.join("m.gguf"),
        )
    };
    let err = convert(&opts, &|_| {}).unwrap_err().to_string();
    assert_eq!(err, "damping -1e300 is not a finite fraction >= 0");
}

// ---- 7. the README's compensation example ----

#[test]
fn a_compensated_file_runs_with_its_compensation_as_the_readme_says() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    base(d, "base.gguf", SHAPE.vocab);
    adapter(d, "adapter", 0.3);
    let out = cli_in(
        d,
        &[
            "convert",
            "--base",
            "base.gguf",
            "--adapter",
            "adapter",
            "--quant",
            "q4_0",
            "--compensate",
            "2",
            "-o",
            "merged.gguf",
            "-q",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(d.join("merged.compensation.gguf").is_file());
    let out = cli_in(
        d,
        &[
            "run",
            "merged.gguf+merged.compensation.gguf",
            "-p",
            "t3t4",
            "-n",
            "2",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // In an --emit set the compensation is one of the set's files: the
    // report says where it is published, and the set can be replaced.
    for _ in 0..2 {
        let out = cli_in(
            d,
            &[
                "convert",
                "--base",
                "base.gguf",
                "--adapter",
                "adapter",
                "--quant",
                "q4_0",
                "--compensate",
                "2",
                "--emit",
                "merged",
                "-o",
                "set",
                "-q",
            ],
        );
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    }
    assert_eq!(
        listing(&d.join("set")),
        ["merged.compensation.gguf", "merged.gguf", "report.json"]
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("set/report.json")).unwrap()).unwrap();
    assert_eq!(
        report["compensation"]["path"],
        "set/merged.compensation.gguf"
    );
}

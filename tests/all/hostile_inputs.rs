//! How inputs are opened and what a GGUF base may carry into an output:
//! metadata the runtime refuses is refused at convert by the same checks,
//! index files cannot point outside their folder, FIFOs and folders given
//! as files are errors (never a blocked process), and names from files
//! reach the terminal with their control characters escaped.

use crate::common;
use crate::hostile_convert::{
    adapter, adapter_config, hf_base, hf_config, hf_tensors, lora_qv, write_safetensors,
};
use crate::hostile_run::{array, Spec, TOKENS};

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::Device;
use lorafold_runtime::gguf::{GgufFile, MetadataValue, ValueType};
use lorafold_runtime::model::Model;
use lorafold_runtime::tokenizer::Tokenizer;
use serde_json::json;

/// Long enough for any of these commands on a loaded machine; a blocked
/// open never ends, so this only bounds how long a failure takes to show.
const BLOCKED_AFTER: Duration = Duration::from_secs(60);

/// `lorafold ARGS`: exit code, stdout and stderr. A process still running
/// after [`BLOCKED_AFTER`] is killed and fails the test: it was blocked.
fn lorafold(args: &[&str]) -> (Option<i32>, String, String) {
    let mut child = common::lorafold()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    // Errors and inspect's tables fit in the pipes, so waiting first is safe.
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > BLOCKED_AFTER {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("lorafold {args:?} was still running after {BLOCKED_AFTER:?}: blocked");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut out = String::new();
    let mut err = String::new();
    child.stdout.unwrap().read_to_string(&mut out).unwrap();
    child.stderr.unwrap().read_to_string(&mut err).unwrap();
    (status.code(), out, err)
}

/// `lorafold ARGS` exits by itself with status 1 and one line of error
/// containing every `expect`; the error is returned.
fn fails(args: &[&str], expect: &[&str]) -> String {
    let (code, _, err) = lorafold(args);
    assert_eq!(code, Some(1), "{args:?}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err:?}");
    for e in expect {
        assert!(err.contains(e), "{args:?}: {err:?} lacks {e:?}");
    }
    err
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `lorafold convert --base BASE [--adapter A] --quant f32 -o DIR/out.gguf`
/// fails with `expect`, leaving no output.
fn convert_fails(base: &Path, adapter: Option<&Path>, expect: &[&str]) -> String {
    let out = base.parent().unwrap().join("out.gguf");
    let mut args = vec!["convert", "--base", s(base)];
    if let Some(a) = adapter {
        args.extend(["--adapter", s(a)]);
    }
    args.extend(["--quant", "f32", "-q", "-o", s(&out)]);
    let err = fails(&args, expect);
    assert!(!out.exists(), "{err}: left an output");
    err
}

/// What the runtime says of a model: its load's error, else its tokenizer's.
fn runtime_refusal(path: &Path) -> String {
    match Model::load(path, &Device::Cpu) {
        Err(e) => e.to_string(),
        Ok(m) => Tokenizer::from_gguf(m.file())
            .expect_err("the runtime accepts it")
            .to_string(),
    }
}

fn mkfifo(path: &Path) -> PathBuf {
    let st = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(st.success(), "mkfifo {}", path.display());
    path.to_path_buf()
}

/// Metadata entries to set on [`Spec::model`].
type Edits = Vec<(&'static str, MetadataValue<'static>)>;

/// Every value the runtime refuses at load (or when it builds the
/// tokenizer) is refused when a GGUF base carries it to convert, with the
/// same words, naming the base and the key; the base itself converts.
#[test]
fn gguf_base_metadata_the_runtime_refuses_is_refused_at_convert() {
    let dir = tempfile::tempdir().unwrap();
    let good = Spec::model().write(&dir.path().join("good.gguf"));
    let out = dir.path().join("good-out.gguf");
    let (code, _, err) = lorafold(&[
        "convert",
        "--base",
        s(&good),
        "--quant",
        "f32",
        "-q",
        "-o",
        s(&out),
    ]);
    assert_eq!(code, Some(0), "{err}");
    Tokenizer::from_gguf(&GgufFile::open(&out).unwrap()).unwrap();

    let ints = |n: usize, v: i32| array(ValueType::I32, vec![MetadataValue::I32(v); n]);
    let mut duplicated = TOKENS;
    duplicated[7] = "a";
    let nine: Vec<&str> = TOKENS.iter().copied().chain(["c"]).collect();
    let cases: Vec<(&str, Edits, &str)> = vec![
        (
            "eps-nan",
            vec![(
                "llama.attention.layer_norm_rms_epsilon",
                MetadataValue::F32(f32::NAN),
            )],
            "llama.attention.layer_norm_rms_epsilon is NaN: it must be finite and > 0",
        ),
        (
            "eps-negative",
            vec![(
                "llama.attention.layer_norm_rms_epsilon",
                MetadataValue::F32(-1.0),
            )],
            "llama.attention.layer_norm_rms_epsilon is -1",
        ),
        (
            "rope-base-zero",
            vec![("llama.rope.freq_base", MetadataValue::F32(0.0))],
            "llama.rope.freq_base is 0",
        ),
        (
            "rope-base-inf",
            vec![("llama.rope.freq_base", MetadataValue::F32(f32::INFINITY))],
            "llama.rope.freq_base is inf",
        ),
        (
            "context-zero",
            vec![("llama.context_length", MetadataValue::U32(0))],
            "llama.context_length is 0",
        ),
        (
            "rope-dims-zero",
            vec![("llama.rope.dimension_count", MetadataValue::U32(0))],
            "llama.rope.dimension_count is 0, but heads are 16 wide",
        ),
        (
            "rope-dims-partial",
            vec![("llama.rope.dimension_count", MetadataValue::U32(8))],
            "llama.rope.dimension_count is 8, but heads are 16 wide: RoPE on part of a head is not supported",
        ),
        (
            "rope-dims-wide",
            vec![("llama.rope.dimension_count", MetadataValue::U32(64))],
            "llama.rope.dimension_count is 64",
        ),
        (
            "vocab-size",
            vec![("llama.vocab_size", MetadataValue::U32(9))],
            "'llama.vocab_size' 9",
        ),
        (
            "bos",
            vec![("tokenizer.ggml.bos_token_id", MetadataValue::U32(8))],
            "tokenizer.ggml.bos_token_id 8 is not one of the 8 tokens",
        ),
        (
            "eos",
            vec![("tokenizer.ggml.eos_token_id", MetadataValue::U32(1 << 31))],
            "tokenizer.ggml.eos_token_id 2147483648 is not one of the 8 tokens",
        ),
        (
            "model",
            vec![("tokenizer.ggml.model", MetadataValue::string("bert"))],
            "tokenizer.ggml.model 'bert' is not supported",
        ),
        (
            "types",
            vec![("tokenizer.ggml.token_type", ints(7, 1))],
            "tokenizer.ggml.token_type has 7 entries, but tokenizer.ggml.tokens has 8",
        ),
        (
            "scores",
            vec![(
                "tokenizer.ggml.scores",
                array(ValueType::F32, vec![MetadataValue::F32(0.0); 9]),
            )],
            "tokenizer.ggml.scores has 9 entries, but tokenizer.ggml.tokens has 8",
        ),
        (
            "duplicates",
            vec![(
                "tokenizer.ggml.tokens",
                MetadataValue::string_array(duplicated),
            )],
            "tokenizer.ggml.tokens lists \"a\" twice, as ids 5 and 7",
        ),
        (
            "too-many-tokens",
            vec![
                ("tokenizer.ggml.tokens", MetadataValue::string_array(nine)),
                (
                    "tokenizer.ggml.scores",
                    array(ValueType::F32, vec![MetadataValue::F32(0.0); 9]),
                ),
                ("tokenizer.ggml.token_type", ints(9, 1)),
            ],
            "tokenizer.ggml.tokens has 9 tokens, but tensor 'token_embd.weight' has 8 rows",
        ),
    ];
    for (name, edits, expect) in cases {
        let sub = dir.path().join(name);
        std::fs::create_dir(&sub).unwrap();
        let mut spec = Spec::model();
        for (k, v) in edits {
            spec = spec.set(k, v);
        }
        let base = spec.write(&sub.join("base.gguf"));
        let at_load = runtime_refusal(&base);
        assert!(at_load.contains(expect), "{name}: runtime: {at_load}");
        let err = convert_fails(&base, None, &[expect]);
        assert!(
            err.starts_with(&format!("error: {}: ", base.display())),
            "{err}"
        );
    }
}

/// An index whose shard names leave the model folder is refused naming the
/// index and the shard, even when the file it names exists and is valid.
#[test]
fn shard_names_must_stay_inside_the_model_folder() {
    let dir = tempfile::tempdir().unwrap();
    let outside = dir.path().join("outside.safetensors");
    write_safetensors(&outside, &hf_tensors(false));
    let sharded = |name: &str, shard: &str| {
        let base = dir.path().join(name);
        std::fs::create_dir_all(&base).unwrap();
        std::fs::write(base.join("config.json"), hf_config().to_string()).unwrap();
        let names: Vec<String> = hf_tensors(false).into_iter().map(|t| t.0).collect();
        let map: serde_json::Map<String, serde_json::Value> =
            names.into_iter().map(|n| (n, json!(shard))).collect();
        std::fs::write(
            base.join("model.safetensors.index.json"),
            json!({ "metadata": {}, "weight_map": map }).to_string(),
        )
        .unwrap();
        base
    };
    // A plain shard name converts.
    let ok = sharded("ok", "model-00001-of-00001.safetensors");
    write_safetensors(
        &ok.join("model-00001-of-00001.safetensors"),
        &hf_tensors(false),
    );
    let out = ok.join("out.gguf");
    let (code, _, err) = lorafold(&[
        "convert",
        "--base",
        s(&ok),
        "--quant",
        "f32",
        "-q",
        "-o",
        s(&out),
    ]);
    assert_eq!(code, Some(0), "{err}");

    let absolute = outside.to_str().unwrap().to_string();
    for (name, shard) in [
        ("parent", "../outside.safetensors"),
        ("absolute", absolute.as_str()),
        ("sub", "sub/../../outside.safetensors"),
        ("dot", "./outside.safetensors"),
    ] {
        let base = sharded(name, shard);
        let index = base.join("model.safetensors.index.json");
        convert_fails(
            &base,
            None,
            &[
                s(&index),
                &format!("shard '{shard}' is not a file name inside the model folder"),
            ],
        );
    }
}

/// A FIFO given where a file is read (model, adapter, base, PEFT files,
/// HF files, texts) is an error naming it; nothing blocks on it.
#[test]
fn fifos_are_refused_not_waited_on() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = Spec::model().write(&d.join("m.gguf"));
    let fifo = mkfifo(&d.join("fifo.gguf"));
    let not_regular = format!("{}: not a regular file (a FIFO)", fifo.display());

    fails(&["run", s(&fifo), "-p", "a"], &[&not_regular]);
    fails(
        &["run", s(&model), "--lora", s(&fifo), "-p", "a"],
        &[&not_regular],
    );
    fails(&["inspect", s(&fifo)], &[&not_regular]);
    convert_fails(&fifo, None, &[&not_regular]);
    let calib_out = d.join("calib.gguf");
    fails(
        &[
            "calibrate",
            s(&model),
            "--ctx",
            "32",
            "--text",
            s(&fifo),
            "-o",
            s(&calib_out),
        ],
        &[s(&fifo), "not a regular file (a FIFO)"],
    );
    assert!(!calib_out.exists());

    // The PEFT folder given as a FIFO, and FIFOs inside PEFT and HF folders.
    let base = hf_base(d, "base", &hf_config(), &hf_tensors(false));
    convert_fails(
        &base,
        Some(&fifo),
        &[&format!(
            "{}: a FIFO, not a PEFT adapter folder",
            fifo.display()
        )],
    );
    let peft = adapter(d, "peft", &adapter_config(), &lora_qv());
    for file in ["adapter_model.safetensors", "adapter_config.json"] {
        let p = peft.join(file);
        let kept = d.join(format!("kept-{file}"));
        std::fs::rename(&p, &kept).unwrap();
        mkfifo(&p);
        convert_fails(
            &base,
            Some(&peft),
            &[&format!("{}: not a regular file (a FIFO)", p.display())],
        );
        std::fs::remove_file(&p).unwrap();
        std::fs::rename(&kept, &p).unwrap();
    }
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        let hf = hf_base(d, &format!("hf-{file}"), &hf_config(), &hf_tensors(false));
        let p = hf.join(file);
        let _ = std::fs::remove_file(&p);
        mkfifo(&p);
        convert_fails(
            &hf,
            None,
            &[&format!("{}: not a regular file (a FIFO)", p.display())],
        );
    }
}

/// A folder given as a model or a base says so, and what it lacks.
#[test]
fn folders_given_as_files_say_what_they_are() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let folder = d.join("model.gguf");
    std::fs::create_dir(&folder).unwrap();
    fails(
        &["run", s(&folder), "-p", "a"],
        &[&format!("{}: a folder, not a GGUF file", folder.display())],
    );
    let model = Spec::model().write(&d.join("m.gguf"));
    fails(
        &["run", s(&model), "--lora", s(&folder), "-p", "a"],
        &[&format!("{}: a folder, not a GGUF file", folder.display())],
    );
    convert_fails(
        &folder,
        None,
        &[&format!(
            "{}: a folder without config.json: not a Hugging Face model folder",
            folder.display()
        )],
    );
    std::fs::write(folder.join("config.json"), hf_config().to_string()).unwrap();
    convert_fails(
        &folder,
        None,
        &[&format!(
            "{}: no model.safetensors and no model.safetensors.index.json",
            folder.display()
        )],
    );
}

/// `inspect` prints names and strings from the file with their control
/// characters escaped (tables and JSON), and so do errors that quote them.
#[test]
fn control_characters_from_files_never_reach_the_terminal_raw() {
    let dir = tempfile::tempdir().unwrap();
    let clear = "\u{1b}[2J";
    let mut spec = Spec::model()
        .set(
            "general.name",
            MetadataValue::string(format!("evil{clear}\u{9b}31m")),
        )
        .set(
            "tokenizer.ggml.pre",
            MetadataValue::string(format!("pre{clear}")),
        );
    spec.tensors
        .push((format!("extra{clear}.weight"), vec![4], vec![1.0; 4]));
    let p = spec.write(&dir.path().join("evil.gguf"));
    let raw = |t: &str| t.chars().any(|c| c.is_control() && c != '\n');
    for json in [false, true] {
        let mut args = vec!["inspect", s(&p)];
        if json {
            args.push("--json");
        }
        let (code, out, err) = lorafold(&args);
        assert_eq!(code, Some(0), "{err}");
        assert!(!raw(&out), "{out:?}");
        if json {
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            assert_eq!(v["name"], json!(format!("evil{clear}\u{9b}31m")));
        } else {
            assert!(out.contains("evil\\u{1b}[2J\\u{9b}31m"), "{out}");
            assert!(out.contains("extra\\u{1b}[2J.weight"), "{out}");
            assert!(out.contains("pre\\u{1b}[2J"), "{out}");
        }
    }
    // A tensor beyond the last block, named with an escape, in an error.
    let mut spec = Spec::model();
    spec.tensors
        .push((format!("blk.7.{clear}.weight"), vec![4], vec![1.0; 4]));
    let p = spec.write(&dir.path().join("stray.gguf"));
    let err = fails(
        &["run", s(&p), "-p", "a"],
        &["tensor 'blk.7.\\u{1b}[2J.weight' is in layer 7"],
    );
    assert!(!raw(&err), "{err:?}");
}

/// A tensor past the last block names the layers there are, inclusive.
#[test]
fn a_stray_layer_names_the_layers_there_are() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = Spec::model();
    spec.tensors
        .push(("blk.2.attn_norm.weight".into(), vec![32], vec![1.0; 32]));
    let p = spec.write(&dir.path().join("stray.gguf"));
    let expect = "tensor 'blk.2.attn_norm.weight' is in layer 2, but 'llama.block_count' 2 allows layers 0 to 1 only";
    assert!(runtime_refusal(&p).contains(expect));
    convert_fails(&p, None, &[expect]);
}

/// tokenizer.json turned into metadata is checked by the runtime's own
/// reader too: a text at two ids (here an added token repeating a vocab
/// entry) is refused naming tokenizer.json, not written for `run` to refuse.
#[test]
fn an_hf_tokenizer_with_a_token_twice_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = hf_base(dir.path(), "base", &hf_config(), &hf_tensors(false));
    let tokenizer = json!({
        "model": { "type": "BPE", "vocab": { "a": 0, "b": 1 }, "merges": [] },
        "added_tokens": [{ "id": 2, "content": "a", "special": true }]
    });
    std::fs::write(base.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    convert_fails(
        &base,
        None,
        &[&format!(
            "{}: tokenizer.ggml.tokens lists \"a\" twice, as ids 0 and 2",
            base.join("tokenizer.json").display()
        )],
    );
}

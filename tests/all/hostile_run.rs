//! Hostile values on the run side: CLI flags and library options that would
//! run to garbage, GGUF hyperparameters and tensors that would crash or
//! mislead, and adapters with non-finite values. Each is a one-line error that
//! names the file and the key or tensor, never a panic or an abort.

use crate::common;

use std::path::{Path, PathBuf};

use candle_core::Device;
use lorafold_converter::GgufWriter;
use lorafold_runtime::generate::{Sampler, SamplerConfig};
use lorafold_runtime::gguf::{GgmlType, GgufFile, MetadataArray, MetadataValue, ValueType};
use lorafold_runtime::lora::LoraAdapter;
use lorafold_runtime::model::{Backend, Model, SessionOptions};
use lorafold_runtime::tokenizer::Tokenizer;

const DIM: u64 = 32;
const FFN: u64 = 64;
const VOCAB: u64 = 8;
const RANK: u64 = 2;

/// A GGUF to be written: metadata and f32 tensors, editable before writing.
pub(crate) struct Spec {
    pub(crate) md: Vec<(String, MetadataValue<'static>)>,
    pub(crate) tensors: Vec<(String, Vec<u64>, Vec<f32>)>,
}

pub(crate) fn array(elem: ValueType, items: Vec<MetadataValue<'static>>) -> MetadataValue<'static> {
    MetadataValue::Array(MetadataArray::Owned { elem, items })
}

/// The SentencePiece vocabulary of [`Spec::model`].
pub(crate) const TOKENS: [&str; 8] = [
    "<unk>",
    "<s>",
    "</s>",
    "\u{2581}a",
    "\u{2581}b",
    "a",
    "b",
    "\u{2581}",
];

impl Spec {
    /// A two-block llama, 32 wide, with an 8-token SentencePiece vocabulary.
    pub(crate) fn model() -> Spec {
        let mut rng = common::Rng::new(7);
        let tokens = TOKENS;
        let md = vec![
            (
                "general.architecture".into(),
                MetadataValue::string("llama"),
            ),
            ("general.name".into(), MetadataValue::string("hostile")),
            ("llama.block_count".into(), MetadataValue::U32(2)),
            ("llama.context_length".into(), MetadataValue::U32(64)),
            (
                "llama.embedding_length".into(),
                MetadataValue::U32(DIM as u32),
            ),
            (
                "llama.feed_forward_length".into(),
                MetadataValue::U32(FFN as u32),
            ),
            ("llama.attention.head_count".into(), MetadataValue::U32(2)),
            (
                "llama.attention.head_count_kv".into(),
                MetadataValue::U32(1),
            ),
            ("llama.rope.freq_base".into(), MetadataValue::F32(10000.0)),
            (
                "llama.attention.layer_norm_rms_epsilon".into(),
                MetadataValue::F32(1e-5),
            ),
            (
                "tokenizer.ggml.model".into(),
                MetadataValue::string("llama"),
            ),
            (
                "tokenizer.ggml.tokens".into(),
                MetadataValue::string_array(tokens),
            ),
            (
                "tokenizer.ggml.scores".into(),
                array(
                    ValueType::F32,
                    (0..tokens.len())
                        .map(|i| MetadataValue::F32(-(i as f32)))
                        .collect(),
                ),
            ),
            (
                "tokenizer.ggml.token_type".into(),
                array(
                    ValueType::I32,
                    [2, 3, 3, 1, 1, 1, 1, 1].map(MetadataValue::I32).to_vec(),
                ),
            ),
            ("tokenizer.ggml.bos_token_id".into(), MetadataValue::U32(1)),
            ("tokenizer.ggml.eos_token_id".into(), MetadataValue::U32(2)),
        ];
        let (d, f, kv) = (DIM, FFN, DIM / 2);
        let mut shapes: Vec<(String, Vec<u64>)> =
            vec![("token_embd.weight".into(), vec![d, VOCAB])];
        for l in 0..2 {
            let p = |s: &str| format!("blk.{l}.{s}");
            shapes.extend([
                (p("attn_norm.weight"), vec![d]),
                (p("attn_q.weight"), vec![d, d]),
                (p("attn_k.weight"), vec![d, kv]),
                (p("attn_v.weight"), vec![d, kv]),
                (p("attn_output.weight"), vec![d, d]),
                (p("ffn_norm.weight"), vec![d]),
                (p("ffn_gate.weight"), vec![d, f]),
                (p("ffn_up.weight"), vec![d, f]),
                (p("ffn_down.weight"), vec![f, d]),
            ]);
        }
        shapes.push(("output_norm.weight".into(), vec![d]));
        let tensors = shapes
            .into_iter()
            .map(|(name, dims)| {
                let n = dims.iter().product::<u64>();
                let norm = dims.len() == 1;
                let v = (0..n)
                    .map(|_| if norm { 1.0 } else { 0.2 * rng.f32() })
                    .collect();
                (name, dims, v)
            })
            .collect();
        Spec { md, tensors }
    }

    /// A rank-2 adapter on blk.0.attn_q and blk.1.ffn_down of [`Spec::model`].
    fn adapter() -> Spec {
        let mut rng = common::Rng::new(11);
        let md = vec![
            (
                "general.architecture".into(),
                MetadataValue::string("llama"),
            ),
            ("general.type".into(), MetadataValue::string("adapter")),
            ("adapter.type".into(), MetadataValue::string("lora")),
            ("adapter.lora.alpha".into(), MetadataValue::F32(4.0)),
        ];
        let mut tensors = Vec::new();
        for (target, n_in, n_out) in [
            ("blk.0.attn_q.weight", DIM, DIM),
            ("blk.1.ffn_down.weight", FFN, DIM),
        ] {
            for (suffix, dims) in [("lora_a", vec![n_in, RANK]), ("lora_b", vec![RANK, n_out])] {
                let n = dims.iter().product::<u64>();
                let v = (0..n).map(|_| 0.1 * rng.f32()).collect();
                tensors.push((format!("{target}.{suffix}"), dims, v));
            }
        }
        Spec { md, tensors }
    }

    /// Replace (or add) a metadata entry.
    pub(crate) fn set(mut self, key: &str, v: MetadataValue<'static>) -> Spec {
        match self.md.iter_mut().find(|(k, _)| k == key) {
            Some(e) => e.1 = v,
            None => self.md.push((key.into(), v)),
        }
        self
    }

    /// Drop a tensor.
    fn without(mut self, tensor: &str) -> Spec {
        self.tensors.retain(|t| t.0 != tensor);
        self
    }

    /// Set value `i` of a tensor.
    fn poke(mut self, tensor: &str, i: usize, v: f32) -> Spec {
        let t = self.tensors.iter_mut().find(|t| t.0 == tensor).unwrap();
        t.2[i] = v;
        self
    }

    pub(crate) fn write(&self, path: &Path) -> PathBuf {
        // Poked values may be NaN or inf on purpose.
        let mut w = GgufWriter::new(path).allow_non_finite();
        for (k, v) in &self.md {
            w.add_metadata(k, v).unwrap();
        }
        for (name, dims, _) in &self.tensors {
            w.add_tensor(name, GgmlType::F32, dims).unwrap();
        }
        let mut s = w.start().unwrap();
        for (name, _, v) in &self.tensors {
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            s.write_tensor(name, &bytes).unwrap();
        }
        s.finish().unwrap();
        path.to_path_buf()
    }
}

/// `lorafold ARGS`: exit code and stderr.
fn lorafold(args: &[&str]) -> (Option<i32>, String) {
    let o = common::lorafold().args(args).output().unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// `lorafold ARGS` fails with exit code 1 and one line that contains every `expect`.
fn fails(args: &[&str], expect: &[&str]) {
    let (code, err) = lorafold(args);
    assert_eq!(code, Some(1), "{args:?}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err:?}");
    for e in expect {
        assert!(err.contains(e), "{args:?}: {err:?} lacks {e:?}");
    }
}

fn load_err(path: &Path) -> String {
    for backend in [Backend::Engine, Backend::Candle] {
        let e = Model::load_with(path, &Device::Cpu, backend).unwrap_err();
        let e = e.to_string();
        assert!(e.contains(path.to_str().unwrap()), "{e}");
        if backend == Backend::Candle {
            return e;
        }
    }
    unreachable!()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn the_tiny_model_runs() {
    let dir = tempfile::tempdir().unwrap();
    let m = Spec::model().write(&dir.path().join("m.gguf"));
    let a = Spec::adapter().write(&dir.path().join("a.gguf"));
    let (code, err) = lorafold(&[
        "run",
        s(&m),
        "-p",
        "a b",
        "-n",
        "4",
        "--lora",
        &format!("{}:0.5", s(&a)),
    ]);
    assert_eq!(code, Some(0), "{err}");
    // An adapter given as the model: the library says what it is, the CLI
    // how to attach one.
    fails(
        &["run", s(&a), "-p", "a b"],
        &[
            "this is a LoRA adapter, not a model",
            "(hint: attach an adapter with --lora",
        ],
    );
    // --ctx defaults to the model's context length when it is under 2048.
    let (code, err) = lorafold(&["bench", s(&m), "-p", "8", "-n", "4", "-r", "1"]);
    assert_eq!(code, Some(0), "bench on an 8-token vocabulary: {err}");
}

#[test]
fn sampling_values_that_run_to_garbage_are_refused() {
    let bad = [
        SamplerConfig {
            temperature: f64::NAN,
            ..Default::default()
        },
        SamplerConfig {
            temperature: f64::INFINITY,
            ..Default::default()
        },
        SamplerConfig {
            temperature: -1.0,
            ..Default::default()
        },
        SamplerConfig {
            top_p: f64::NAN,
            ..Default::default()
        },
        SamplerConfig {
            top_p: 0.0,
            ..Default::default()
        },
        SamplerConfig {
            top_p: 1.5,
            ..Default::default()
        },
        SamplerConfig {
            repeat_penalty: f32::NAN,
            ..Default::default()
        },
        SamplerConfig {
            repeat_penalty: f32::INFINITY,
            ..Default::default()
        },
        SamplerConfig {
            repeat_penalty: 0.0,
            ..Default::default()
        },
        SamplerConfig {
            repeat_penalty: -2.0,
            ..Default::default()
        },
    ];
    for c in bad {
        let e = Sampler::try_new(c.clone()).unwrap_err().to_string();
        assert!(e.contains("out of range"), "{c:?}: {e}");
    }
    let ok = SamplerConfig {
        temperature: 0.7,
        top_k: 1_000_000,
        top_p: 0.9,
        repeat_penalty: 1.1,
        seed: 1,
    };
    Sampler::try_new(ok).unwrap();
    Sampler::try_new(SamplerConfig::default()).unwrap();
}

#[test]
fn adapter_scales_are_finite_and_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let m = Spec::model().write(&dir.path().join("m.gguf"));
    let a = LoraAdapter::load(Spec::adapter().write(&dir.path().join("a.gguf"))).unwrap();
    let mut model = Model::load(&m, &Device::Cpu).unwrap();
    for scale in [f64::NAN, f64::INFINITY, -f64::INFINITY, 101.0, -1e9] {
        let e = model.attach(&a, scale).unwrap_err().to_string();
        assert!(
            e.contains("adapter scale") && e.contains("out of range"),
            "{e}"
        );
    }
    let slot = model.attach(&a, -100.0).unwrap();
    let e = model.set_scale(slot, f64::NAN).unwrap_err().to_string();
    assert!(e.contains("adapter scale NaN"), "{e}");
    model.set_scale(slot, 0.5).unwrap();
}

#[test]
fn sessions_check_context_and_threads_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let m = Spec::model().write(&dir.path().join("m.gguf"));
    for backend in [Backend::Engine, Backend::Candle] {
        let model = Model::load_with(&m, &Device::Cpu, backend).unwrap();
        let err = |o: SessionOptions| model.session_with(o).err().map(|e| e.to_string());
        let e = err(SessionOptions::new(0)).unwrap();
        assert!(
            e.contains("m.gguf: a context of 0 tokens holds nothing"),
            "{e}"
        );
        let e = err(SessionOptions::new(65)).unwrap();
        assert!(
            e.contains("m.gguf") && e.contains("more than llama.context_length 64"),
            "{e}"
        );
        let e = err(SessionOptions::new(1 << 40)).unwrap();
        assert!(e.contains("llama.context_length"), "{e}");
        for threads in [0, 1_000_000] {
            let e = err(SessionOptions {
                threads: Some(threads),
                ..SessionOptions::new(8)
            })
            .unwrap();
            assert!(
                e.contains(&format!("threads {threads} is out of range")),
                "{e}"
            );
        }
        assert!(err(SessionOptions::new(64)).is_none());
    }
    // A context the file allows but memory cannot hold is an error, not an abort.
    let huge = Spec::model()
        .set("llama.context_length", MetadataValue::U64(1 << 40))
        .write(&dir.path().join("huge.gguf"));
    let model = Model::load(&huge, &Device::Cpu).unwrap();
    let e = model.session(1 << 40).err().unwrap().to_string();
    assert!(
        e.contains("huge.gguf") && e.contains("GiB of KV cache"),
        "{e}"
    );
}

#[test]
fn run_drift_and_bench_refuse_flags_that_run_to_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let m = Spec::model().write(&dir.path().join("m.gguf"));
    let a = Spec::adapter().write(&dir.path().join("a.gguf"));
    let (m, a) = (s(&m), s(&a));
    let run = |extra: &[&str], expect: &[&str]| {
        let mut args = vec!["run", m, "-p", "a b", "-n", "2"];
        args.extend_from_slice(extra);
        fails(&args, expect);
    };
    for scale in ["nan", "inf", "-inf", "1e300", "101"] {
        run(
            &["--lora", &format!("{a}:{scale}")],
            &["adapter scale", "out of range"],
        );
    }
    run(&["--temp", "nan"], &["temperature NaN is out of range"]);
    run(&["--temp=-1"], &["temperature -1 is out of range"]);
    run(&["--temp", "inf"], &["temperature inf is out of range"]);
    run(&["--top-p", "0"], &["top-p 0 is out of range"]);
    run(&["--top-p", "1.5"], &["top-p 1.5 is out of range"]);
    run(&["--top-p", "nan"], &["top-p NaN is out of range"]);
    run(
        &["--repeat-penalty", "0"],
        &["repeat penalty 0 is out of range"],
    );
    run(
        &["--repeat-penalty", "nan"],
        &["repeat penalty NaN is out of range"],
    );
    run(
        &["--repeat-penalty", "inf"],
        &["repeat penalty inf is out of range"],
    );
    run(
        &["--ctx", "0"],
        &["--ctx 0", "a context of 0 tokens holds nothing"],
    );
    run(
        &["--ctx", "1099511627776"],
        &["--ctx", "m.gguf", "llama.context_length 64"],
    );
    run(&["--threads", "0"], &["threads 0 is out of range"]);
    run(&["--threads", "10000"], &["threads 10000 is out of range"]);

    let text = dir.path().join("text.txt");
    std::fs::write(&text, "a b a b a b a b\n").unwrap();
    let text = s(&text);
    let cand = format!("x={m}");
    let drift = |extra: &[&str], expect: &[&str]| {
        let mut args = vec!["drift", "--ref", m, "--cand", &cand, "--text", text];
        args.extend_from_slice(extra);
        fails(&args, expect);
    };
    drift(
        &["--ctx", "0"],
        &["--ctx 0", "a context of 0 tokens holds nothing"],
    );
    drift(&["--ctx", "1"], &["no window of at least 2 tokens"]);
    drift(&["--threads", "0"], &["threads 0 is out of range"]);
    fails(
        &[
            "drift",
            "--ref",
            &format!("{m}+{a}:nan"),
            "--cand",
            &cand,
            "--text",
            text,
        ],
        &["adapter scale NaN is out of range"],
    );
    let (code, err) = lorafold(&[
        "drift", "--ref", m, "--cand", &cand, "--text", text, "--ctx", "4",
    ]);
    assert_eq!(code, Some(0), "{err}");

    fails(&["bench", m, "-p", "0"], &["-p 0", "out of range"]);
    fails(&["bench", m, "-r", "0"], &["-r 0", "out of range"]);
    fails(
        &["bench", m, "-p", "100", "-n", "100"],
        &["m.gguf", "llama.context_length 64"],
    );
    fails(
        &["bench", m, "--threads", "100000"],
        &["threads 100000 is out of range"],
    );
    fails(
        &["bench", &format!("{m}+{a}:inf"), "-p", "4", "-n", "2"],
        &["adapter scale inf is out of range"],
    );
}

#[test]
fn an_empty_prompt_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let m = Spec::model()
        .set("tokenizer.ggml.add_bos_token", MetadataValue::Bool(false))
        .write(&dir.path().join("m.gguf"));
    fails(&["run", s(&m), "-p", ""], &["the prompt is empty"]);
}

#[test]
fn hyperparameters_that_run_to_garbage_name_the_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, MetadataValue<'static>, &str)> = vec![
        (
            "llama.attention.layer_norm_rms_epsilon",
            MetadataValue::F32(f32::NAN),
            "llama.attention.layer_norm_rms_epsilon is NaN",
        ),
        (
            "llama.attention.layer_norm_rms_epsilon",
            MetadataValue::F32(0.0),
            "llama.attention.layer_norm_rms_epsilon is 0",
        ),
        (
            "llama.attention.layer_norm_rms_epsilon",
            MetadataValue::F64(-1e-5),
            "llama.attention.layer_norm_rms_epsilon is -1e-5",
        ),
        (
            "llama.attention.layer_norm_rms_epsilon",
            MetadataValue::F32(f32::INFINITY),
            "llama.attention.layer_norm_rms_epsilon is inf",
        ),
        (
            "llama.rope.freq_base",
            MetadataValue::F32(f32::NAN),
            "llama.rope.freq_base is NaN",
        ),
        (
            "llama.rope.freq_base",
            MetadataValue::F32(0.0),
            "llama.rope.freq_base is 0",
        ),
        (
            "llama.rope.freq_base",
            MetadataValue::F32(f32::NEG_INFINITY),
            "llama.rope.freq_base is -inf",
        ),
        (
            "llama.block_count",
            MetadataValue::U32(1 << 28),
            "'llama.block_count' 268435456",
        ),
        (
            "llama.block_count",
            MetadataValue::U64(1 << 40),
            "'llama.block_count' 1099511627776",
        ),
        ("llama.block_count", MetadataValue::U32(3), "blk.2"),
        (
            "llama.attention.head_count",
            MetadataValue::U32(0),
            "0 query heads",
        ),
        (
            "llama.attention.head_count_kv",
            MetadataValue::U32(0),
            "0 key/value heads",
        ),
        (
            "llama.attention.key_length",
            MetadataValue::U64(1 << 62),
            "llama.attention.key_length",
        ),
        (
            "llama.feed_forward_length",
            MetadataValue::U64(1 << 62),
            "ffn_gate",
        ),
    ];
    for (i, (key, value, expect)) in cases.into_iter().enumerate() {
        let p = Spec::model()
            .set(key, value)
            .write(&dir.path().join(format!("h{i}.gguf")));
        let e = load_err(&p);
        assert!(e.contains(expect), "{key}: {e}");
        fails(&["run", s(&p), "-p", "a"], &[s(&p), expect]);
    }
}

#[test]
fn odd_alignment_loads_on_both_backends() {
    let dir = tempfile::tempdir().unwrap();
    let mut found = false;
    // Pad the header until the tensor data starts off a 4-byte boundary.
    for pad in 0..4 {
        let p = Spec::model()
            .set("general.alignment", MetadataValue::U32(1))
            .set("general.name", MetadataValue::string("x".repeat(pad)))
            .write(&dir.path().join(format!("a{pad}.gguf")));
        let f = GgufFile::open(&p).unwrap();
        if f.data_offset().is_multiple_of(4) {
            continue;
        }
        found = true;
        let mut logits = Vec::new();
        for backend in [Backend::Engine, Backend::Candle] {
            let model = Model::load_with(&p, &Device::Cpu, backend).unwrap();
            let mut sess = model.session(8).unwrap();
            logits.push(sess.logits(&[1, 3, 4], false).unwrap().to_vec());
        }
        let d = common::max_abs_diff(&logits[0], &logits[1]);
        assert!(d < 1e-2, "engine vs candle on an odd alignment: {d}");
        let (code, err) = lorafold(&["run", s(&p), "-p", "a b", "-n", "2"]);
        assert_eq!(code, Some(0), "{err}");
    }
    assert!(found, "no padding gave an odd data offset");
}

#[test]
fn token_ids_beyond_the_embedding_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    // Nine tokens for eight embedding rows.
    let tokens: Vec<&str> = TOKENS.iter().copied().chain(["c"]).collect();
    let p = Spec::model()
        .set("tokenizer.ggml.tokens", MetadataValue::string_array(tokens))
        .set(
            "tokenizer.ggml.scores",
            array(ValueType::F32, vec![MetadataValue::F32(0.0); 9]),
        )
        .set(
            "tokenizer.ggml.token_type",
            array(ValueType::I32, vec![MetadataValue::I32(1); 9]),
        )
        .write(&dir.path().join("big-vocab.gguf"));
    let f = GgufFile::open(&p).unwrap();
    let e = Tokenizer::from_gguf(&f).unwrap_err().to_string();
    assert!(
        e.contains("big-vocab.gguf") && e.contains("9 tokens") && e.contains("8 rows"),
        "{e}"
    );
    fails(
        &["run", s(&p), "-p", "c"],
        &["big-vocab.gguf", "9 tokens", "8 rows"],
    );

    // A special token id past the vocabulary.
    let p = Spec::model()
        .set("tokenizer.ggml.bos_token_id", MetadataValue::U32(1000))
        .write(&dir.path().join("bos.gguf"));
    fails(
        &["run", s(&p), "-p", "a"],
        &["bos.gguf", "tokenizer.ggml.bos_token_id", "1000"],
    );

    // A prompt id out of range on either backend.
    let p = Spec::model().write(&dir.path().join("m.gguf"));
    for backend in [Backend::Engine, Backend::Candle] {
        let model = Model::load_with(&p, &Device::Cpu, backend).unwrap();
        let e = model
            .session(8)
            .unwrap()
            .logits(&[1, 8], false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("m.gguf") && e.contains("token id 8 is out of range"),
            "{e}"
        );
    }
}

#[test]
fn non_finite_adapters_are_errors_naming_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let m = Spec::model().write(&dir.path().join("m.gguf"));
    let cases = [
        ("blk.0.attn_q.weight.lora_a", f32::NAN),
        ("blk.1.ffn_down.weight.lora_b", f32::INFINITY),
        ("blk.1.ffn_down.weight.lora_a", f32::NEG_INFINITY),
    ];
    for (i, (tensor, v)) in cases.into_iter().enumerate() {
        let a = Spec::adapter()
            .poke(tensor, 3, v)
            .write(&dir.path().join(format!("a{i}.gguf")));
        let e = LoraAdapter::load(&a).unwrap_err().to_string();
        assert!(
            e.contains(s(&a)) && e.contains(tensor) && e.contains("not finite"),
            "{e}"
        );
        fails(
            &["run", s(&m), "-p", "a", "--lora", s(&a)],
            &[s(&a), tensor, "not finite"],
        );
    }
    for alpha in [f32::NAN, f32::INFINITY] {
        let a = Spec::adapter()
            .set("adapter.lora.alpha", MetadataValue::F32(alpha))
            .write(&dir.path().join("alpha.gguf"));
        let e = LoraAdapter::load(&a).unwrap_err().to_string();
        assert!(
            e.contains("alpha.gguf")
                && e.contains("adapter.lora.alpha")
                && e.contains("not finite"),
            "{e}"
        );
    }
}

#[test]
fn non_finite_norms_are_errors_naming_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    for (i, tensor) in [
        "blk.1.attn_norm.weight",
        "output_norm.weight",
        "blk.0.ffn_norm.weight",
    ]
    .into_iter()
    .enumerate()
    {
        let p = Spec::model()
            .poke(tensor, 5, f32::NAN)
            .write(&dir.path().join(format!("n{i}.gguf")));
        let e = load_err(&p);
        assert!(e.contains(tensor) && e.contains("not finite"), "{e}");
        fails(&["run", s(&p), "-p", "a"], &[s(&p), tensor, "not finite"]);
    }
    // A missing norm is named too (not a NaN-check crash).
    let p = Spec::model()
        .without("output_norm.weight")
        .write(&dir.path().join("no-norm.gguf"));
    assert!(load_err(&p).contains("output_norm.weight"));
}

#[test]
fn a_nan_weight_is_an_error_at_run_not_unk() {
    let dir = tempfile::tempdir().unwrap();
    let p = Spec::model()
        .poke("blk.0.attn_v.weight", 0, f32::NAN)
        .write(&dir.path().join("nan-weight.gguf"));
    for backend in [Backend::Engine, Backend::Candle] {
        // Loading does not scan the big matrices; the first logits show it.
        let model = Model::load_with(&p, &Device::Cpu, backend).unwrap();
        let e = model
            .session(8)
            .unwrap()
            .logits(&[1, 3], false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("nan-weight.gguf") && e.contains("not finite"),
            "{e}"
        );
    }
    fails(
        &["run", s(&p), "-p", "a"],
        &["nan-weight.gguf", "logits are not finite"],
    );
}

#[test]
fn a_full_context_stops_generation_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let m = Spec::model().write(&dir.path().join("m.gguf"));
    let (code, err) = lorafold(&["run", s(&m), "-p", "a b", "-n", "100", "--ctx", "8"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("the context of 8 positions is full (--ctx)"),
        "{err}"
    );
    fails(
        &["run", s(&m), "-p", "a b a b a b", "--ctx", "4"],
        &[
            "the prompt has 7 tokens",
            "room for 4 of its 4",
            "a larger --ctx",
        ],
    );
}

#[test]
fn bench_prints_long_non_ascii_paths() {
    let dir = tempfile::tempdir().unwrap();
    // 41 bytes from the end falls inside an 'é': slicing bytes there panicked.
    let sub = dir.path().join("é".repeat(30));
    std::fs::create_dir(&sub).unwrap();
    let m = Spec::model().write(&sub.join("mm.gguf"));
    let (code, err) = lorafold(&["bench", s(&m), "-p", "4", "-n", "2", "-r", "1"]);
    assert_eq!(code, Some(0), "{err}");
}

/// `run` refuses what it can (flags, the prompt, adapters against the
/// model's shapes, the context) before reading any weight: a model whose
/// `blk.1.ffn_down.weight` is I8, which no CPU kernel reads, shows which
/// came first without timing anything.
#[test]
fn run_refuses_requests_before_reading_weights() {
    let dir = tempfile::tempdir().unwrap();
    let spec = Spec::model();
    let m = dir.path().join("m.gguf");
    let mut w = GgufWriter::new(&m);
    for (k, v) in &spec.md {
        w.add_metadata(k, v).unwrap();
    }
    let unreadable = "blk.1.ffn_down.weight";
    let ty = |name: &str| {
        if name == unreadable {
            GgmlType::I8
        } else {
            GgmlType::F32
        }
    };
    for (name, dims, _) in &spec.tensors {
        w.add_tensor(name, ty(name), dims).unwrap();
    }
    let mut out = w.start().unwrap();
    for (name, _, v) in &spec.tensors {
        let bytes: Vec<u8> = match ty(name) {
            GgmlType::I8 => vec![1u8; v.len()],
            _ => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        };
        out.write_tensor(name, &bytes).unwrap();
    }
    out.finish().unwrap();
    // The weights are reached when nothing else is wrong.
    fails(&["run", s(&m), "-p", "a b"], &[unreadable, "no CPU kernel"]);
    // An adapter for other shapes: its first pair made 16 wide, not 32.
    let mut other = Spec::adapter();
    other.tensors[0].1 = vec![16, RANK];
    other.tensors[0].2.truncate(16 * RANK as usize);
    let a = other.write(&dir.path().join("other.gguf"));
    let lora = format!("{}:1", s(&a));
    for (args, expect) in [
        (
            vec!["--ctx", "100000"],
            vec!["--ctx 100000", "more than llama.context_length 64"],
        ),
        (
            vec!["--lora", &lora],
            vec!["do not fit 'blk.0.attn_q.weight'"],
        ),
        (vec!["--temp=-1"], vec!["temperature"]),
    ] {
        let mut all = vec!["run", s(&m), "-p", "a b"];
        all.extend(args);
        fails(&all, &expect);
    }
    fails(&["run", s(&m)], &["give a prompt with -p"]);
}

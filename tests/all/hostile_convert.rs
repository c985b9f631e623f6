//! `lorafold convert` on inputs that contradict themselves or carry values
//! that would run to garbage: each is merged as PEFT would, or refused with
//! an error naming the file and the tensor or setting, and nothing written.

use crate::common;

use std::path::{Path, PathBuf};

use common::{f32s, lorafold, Rng};
use lorafold_converter::convert::{convert, ConvertError, ConvertOptions};
use lorafold_converter::round::quant::QuantPolicy;
use lorafold_runtime::arch::qk_permutation;
use lorafold_runtime::gguf::GgufFile;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};

// The tiny llama every test starts from: 2 query heads of 4 sharing 1 kv head.
const HIDDEN: usize = 8;
const HEADS: usize = 2;
const KV_HEADS: usize = 1;
const HEAD_DIM: usize = 4;
const FFN: usize = 12;
const VOCAB: usize = 16;
const LAYERS: usize = 2;
const Q_ROWS: usize = HEADS * HEAD_DIM;
const KV_ROWS: usize = KV_HEADS * HEAD_DIM;

/// A tensor to write: name, torch shape, values.
pub(crate) type Tensor = (String, Vec<usize>, Vec<f32>);

pub(crate) fn write_safetensors(path: &Path, tensors: &[Tensor]) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((k, s, _), b)| {
            (
                k.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn random(shape: &[usize], seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..shape.iter().product::<usize>())
        .map(|_| 0.5 * rng.f32())
        .collect()
}

pub(crate) fn hf_config() -> Value {
    json!({
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "intermediate_size": FFN,
        "num_hidden_layers": LAYERS,
        "vocab_size": VOCAB,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 64,
        "tie_word_embeddings": false
    })
}

/// q/k/v biases of layer `l`, base value `l + 0.01 * row`.
fn bias(l: usize, proj: &str, rows: usize) -> Tensor {
    (
        format!("model.layers.{l}.self_attn.{proj}.bias"),
        vec![rows],
        (0..rows).map(|i| l as f32 + 0.01 * i as f32).collect(),
    )
}

pub(crate) fn hf_tensors(biases: bool) -> Vec<Tensor> {
    let mut seed = 0;
    let mut t = |name: String, shape: Vec<usize>| {
        seed += 1;
        let v = random(&shape, seed);
        (name, shape, v)
    };
    let mut out = vec![
        t("model.embed_tokens.weight".into(), vec![VOCAB, HIDDEN]),
        t("model.norm.weight".into(), vec![HIDDEN]),
        t("lm_head.weight".into(), vec![VOCAB, HIDDEN]),
    ];
    for l in 0..LAYERS {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        out.extend([
            t(p("input_layernorm.weight"), vec![HIDDEN]),
            t(p("post_attention_layernorm.weight"), vec![HIDDEN]),
            t(p("self_attn.q_proj.weight"), vec![Q_ROWS, HIDDEN]),
            t(p("self_attn.k_proj.weight"), vec![KV_ROWS, HIDDEN]),
            t(p("self_attn.v_proj.weight"), vec![KV_ROWS, HIDDEN]),
            t(p("self_attn.o_proj.weight"), vec![HIDDEN, Q_ROWS]),
            t(p("mlp.gate_proj.weight"), vec![FFN, HIDDEN]),
            t(p("mlp.up_proj.weight"), vec![FFN, HIDDEN]),
            t(p("mlp.down_proj.weight"), vec![HIDDEN, FFN]),
        ]);
        if biases {
            out.extend([
                bias(l, "q_proj", Q_ROWS),
                bias(l, "k_proj", KV_ROWS),
                bias(l, "v_proj", KV_ROWS),
            ]);
        }
    }
    out
}

/// An HF folder `dir/name` with `config` and `tensors`.
pub(crate) fn hf_base(dir: &Path, name: &str, config: &Value, tensors: &[Tensor]) -> PathBuf {
    let base = dir.join(name);
    std::fs::create_dir_all(&base).unwrap();
    std::fs::write(base.join("config.json"), config.to_string()).unwrap();
    write_safetensors(&base.join("model.safetensors"), tensors);
    base
}

pub(crate) fn adapter_config() -> Value {
    json!({
        "peft_type": "LORA",
        "r": 2,
        "lora_alpha": 4,
        "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": "tiny"
    })
}

/// lora_A and lora_B of `model.layers.{l}.self_attn.{proj}` at rank 2.
fn lora(l: usize, proj: &str, rows: usize, seed: u64) -> Vec<Tensor> {
    let k = |s: &str| format!("base_model.model.model.layers.{l}.self_attn.{proj}.{s}");
    vec![
        (
            k("lora_A.weight"),
            vec![2, HIDDEN],
            random(&[2, HIDDEN], seed),
        ),
        (
            k("lora_B.weight"),
            vec![rows, 2],
            random(&[rows, 2], seed + 100),
        ),
    ]
}

pub(crate) fn lora_qv() -> Vec<Tensor> {
    let mut t = Vec::new();
    for l in 0..LAYERS {
        t.extend(lora(l, "q_proj", Q_ROWS, 10 + l as u64));
        t.extend(lora(l, "v_proj", KV_ROWS, 20 + l as u64));
    }
    t
}

/// A PEFT folder `dir/name` with `config` and `tensors`.
pub(crate) fn adapter(dir: &Path, name: &str, config: &Value, tensors: &[Tensor]) -> PathBuf {
    let a = dir.join(name);
    std::fs::create_dir_all(&a).unwrap();
    std::fs::write(a.join("adapter_config.json"), config.to_string()).unwrap();
    write_safetensors(&a.join("adapter_model.safetensors"), tensors);
    a
}

/// Convert to f32 through the library; the output, if any, is `dir/out.gguf`.
fn convert_f32(dir: &Path, base: &Path, adapter: Option<&Path>) -> Result<GgufFile, ConvertError> {
    let out = dir.join("out.gguf");
    let opts = ConvertOptions::new(
        base,
        adapter.map(Path::to_path_buf),
        QuantPolicy::parse("f32", &[]).unwrap(),
        &out,
    );
    convert(&opts, &|_| {})?;
    Ok(GgufFile::open(out).unwrap())
}

/// The error of a conversion that must fail, after checking it left no output.
fn refused(dir: &Path, base: &Path, adapter: Option<&Path>) -> String {
    let err = match convert_f32(dir, base, adapter) {
        Ok(_) => panic!("converted; expected an error"),
        Err(e) => e.to_string(),
    };
    assert!(!dir.join("out.gguf").exists(), "{err}: left an output");
    err
}

fn assert_has(err: &str, parts: &[&str]) {
    for p in parts {
        assert!(err.contains(p), "{err:?} lacks {p:?}");
    }
}

/// Run `lorafold convert ARGS -q`; returns (exit code, stderr).
fn cli(args: &[&Path]) -> (Option<i32>, String) {
    let mut cmd = lorafold();
    cmd.arg("convert");
    for a in args {
        cmd.arg(a);
    }
    let out = cmd.arg("-q").output().unwrap();
    (out.status.code(), String::from_utf8(out.stderr).unwrap())
}

fn tensor_values(f: &GgufFile, name: &str) -> Vec<f32> {
    let t = f.tensor(name).unwrap_or_else(|| panic!("no tensor {name}"));
    f32s(f.tensor_data(t))
}

// ---- 1. lora_B.bias ----

/// lora_B.bias of q_proj and v_proj in every layer, `0.5 + 0.1 * row`.
fn lora_biases() -> Vec<Tensor> {
    let mut t = lora_qv();
    for l in 0..LAYERS {
        for (proj, rows) in [("q_proj", Q_ROWS), ("v_proj", KV_ROWS)] {
            t.push((
                format!("base_model.model.model.layers.{l}.self_attn.{proj}.lora_B.bias"),
                vec![rows],
                (0..rows).map(|i| 0.5 + 0.1 * i as f32).collect(),
            ));
        }
    }
    t
}

#[test]
fn lora_bias_is_merged_with_the_qk_permutation() {
    let dir = tempfile::tempdir().unwrap();
    let base = hf_base(dir.path(), "base", &hf_config(), &hf_tensors(true));
    let mut cfg = adapter_config();
    cfg["lora_bias"] = true.into();
    let a = adapter(dir.path(), "adapter", &cfg, &lora_biases());
    let f = convert_f32(dir.path(), &base, Some(&a)).unwrap();
    let scale = 4.0 / 2.0;
    let lora_bias = |i: usize| 0.5 + 0.1 * i as f32;
    for l in 0..LAYERS {
        // llama.cpp permutes q rows; the bias moves with its row.
        let want: Vec<f32> = qk_permutation(Q_ROWS, HEADS)
            .into_iter()
            .map(|src| l as f32 + 0.01 * src as f32 + scale * lora_bias(src))
            .collect();
        let got = tensor_values(&f, &format!("blk.{l}.attn_q.bias"));
        assert!(
            common::max_abs_diff(&got, &want) < 1e-6,
            "{got:?} != {want:?}"
        );
        let want: Vec<f32> = (0..KV_ROWS)
            .map(|i| l as f32 + 0.01 * i as f32 + scale * lora_bias(i))
            .collect();
        let got = tensor_values(&f, &format!("blk.{l}.attn_v.bias"));
        assert!(
            common::max_abs_diff(&got, &want) < 1e-6,
            "{got:?} != {want:?}"
        );
        // The base's k bias is untouched.
        let k: Vec<f32> = qk_permutation(KV_ROWS, KV_HEADS)
            .into_iter()
            .map(|src| l as f32 + 0.01 * src as f32)
            .collect();
        assert_eq!(tensor_values(&f, &format!("blk.{l}.attn_k.bias")), k);
    }
}

#[test]
fn lora_bias_on_a_base_without_bias_becomes_a_new_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let base = hf_base(dir.path(), "base", &hf_config(), &hf_tensors(false));
    let mut cfg = adapter_config();
    cfg["lora_bias"] = true.into();
    let a = adapter(dir.path(), "adapter", &cfg, &lora_biases());
    let f = convert_f32(dir.path(), &base, Some(&a)).unwrap();
    let want: Vec<f32> = qk_permutation(Q_ROWS, HEADS)
        .into_iter()
        .map(|src| 2.0 * (0.5 + 0.1 * src as f32))
        .collect();
    let got = tensor_values(&f, "blk.1.attn_q.bias");
    assert!(
        common::max_abs_diff(&got, &want) < 1e-6,
        "{got:?} != {want:?}"
    );
    let got = tensor_values(&f, "blk.0.attn_v.bias");
    let want: Vec<f32> = (0..KV_ROWS).map(|i| 2.0 * (0.5 + 0.1 * i as f32)).collect();
    assert!(
        common::max_abs_diff(&got, &want) < 1e-6,
        "{got:?} != {want:?}"
    );
    assert!(f.tensor("blk.0.attn_k.bias").is_none());
}

#[test]
fn lora_bias_tensors_without_lora_bias_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = hf_base(dir.path(), "base", &hf_config(), &hf_tensors(true));
    let a = adapter(dir.path(), "adapter", &adapter_config(), &lora_biases());
    let err = refused(dir.path(), &base, Some(&a));
    assert_has(
        &err,
        &[
            "adapter_config.json: 'lora_bias' contradicts",
            "adapter_model.safetensors: tensor 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'",
            "has a lora_B.bias, but lora_bias is false",
        ],
    );
}

// ---- 2. configs that contradict their tensors ----

/// Convert `tensors` under the adapter config `cfg` into the tiny base.
fn convert_adapter(
    cfg: &Value,
    tensors: &[Tensor],
) -> (tempfile::TempDir, Result<GgufFile, String>) {
    let dir = tempfile::tempdir().unwrap();
    let base = hf_base(dir.path(), "base", &hf_config(), &hf_tensors(false));
    let a = adapter(dir.path(), "adapter", cfg, tensors);
    let result = convert_f32(dir.path(), &base, Some(&a)).map_err(|e| e.to_string());
    if result.is_err() {
        assert!(!dir.path().join("out.gguf").exists());
    }
    (dir, result)
}

fn with(edit: impl Fn(&mut Value)) -> Value {
    let mut cfg = adapter_config();
    edit(&mut cfg);
    cfg
}

/// lora_magnitude_vector of q_proj and v_proj in every layer.
fn magnitudes() -> Vec<Tensor> {
    let mut t = lora_qv();
    for l in 0..LAYERS {
        for (proj, rows) in [("q_proj", Q_ROWS), ("v_proj", KV_ROWS)] {
            t.push((
                format!("base_model.model.model.layers.{l}.self_attn.{proj}.lora_magnitude_vector"),
                vec![rows],
                vec![1.0; rows],
            ));
        }
    }
    t
}

#[test]
fn use_dora_must_match_the_magnitude_tensors() {
    let (_d, r) = convert_adapter(&with(|c| c["use_dora"] = true.into()), &lora_qv());
    assert_has(
        &r.err().unwrap(),
        &[
            "adapter_config.json: 'use_dora' contradicts",
            "tensor 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'",
            "use_dora is true, but module 'model.layers.0.self_attn.q_proj' has no lora_magnitude_vector",
        ],
    );
    let (_d, r) = convert_adapter(&adapter_config(), &magnitudes());
    assert_has(
        &r.err().unwrap(),
        &[
            "adapter_config.json: 'use_dora' contradicts",
            "has a lora_magnitude_vector (DoRA), but use_dora is false",
        ],
    );
    let (_d, r) = convert_adapter(&with(|c| c["use_dora"] = true.into()), &magnitudes());
    r.unwrap();
}

#[test]
fn target_modules_must_cover_every_module() {
    let (_d, r) = convert_adapter(
        &with(|c| c["target_modules"] = json!(["q_proj"])),
        &lora_qv(),
    );
    assert_has(
        &r.err().unwrap(),
        &[
            "adapter_config.json: 'target_modules' contradicts",
            "tensor 'base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight'",
            "module 'model.layers.0.self_attn.v_proj' is not among the target modules",
        ],
    );
    // A string is a regex over the whole module path, as PEFT's re.fullmatch.
    let (_d, r) = convert_adapter(
        &with(|c| c["target_modules"] = json!("q_proj|v_proj")),
        &lora_qv(),
    );
    assert_has(&r.err().unwrap(), &["'target_modules' contradicts"]);
    let (_d, r) = convert_adapter(
        &with(|c| c["target_modules"] = json!(r"model\.layers\.\d+\.self_attn\.(q|v)_proj")),
        &lora_qv(),
    );
    r.unwrap();
    // A full module name matches too.
    let (_d, r) = convert_adapter(
        &with(|c| {
            c["target_modules"] = json!([
                "model.layers.0.self_attn.q_proj",
                "model.layers.1.self_attn.q_proj",
                "v_proj"
            ])
        }),
        &lora_qv(),
    );
    r.unwrap();
    let (_d, r) = convert_adapter(&with(|c| c["target_modules"] = json!("(")), &lora_qv());
    let err = r.err().unwrap();
    assert_has(
        &err,
        &["adapter_config.json: 'target_modules' '(' is not a regex"],
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn layers_to_transform_is_honoured() {
    let layer0: Vec<Tensor> = lora_qv()
        .into_iter()
        .filter(|(k, _, _)| k.contains(".layers.0."))
        .collect();
    for cfg in [
        with(|c| c["layers_to_transform"] = json!([0])),
        with(|c| c["layers_to_transform"] = json!(0)),
        with(|c| {
            c["layers_to_transform"] = json!([0]);
            c["layers_pattern"] = json!("layers");
        }),
    ] {
        let (_d, r) = convert_adapter(&cfg, &layer0);
        r.unwrap();
        let (_d, r) = convert_adapter(&cfg, &lora_qv());
        assert_has(
            &r.err().unwrap(),
            &[
                "adapter_config.json: 'layers_to_transform' contradicts",
                "adapter_model.safetensors: tensor 'base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight'",
                "is in layer 1, but layers_to_transform is [0]",
            ],
        );
    }
    // A layers_pattern that names no layer list in the paths matches nothing.
    let cfg = with(|c| {
        c["layers_to_transform"] = json!([0]);
        c["layers_pattern"] = json!(["blocks"]);
    });
    let (_d, r) = convert_adapter(&cfg, &layer0);
    assert_has(&r.err().unwrap(), &["is in no numbered layer"]);
}

#[test]
fn an_adapter_that_changes_nothing_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = hf_base(dir.path(), "base", &hf_config(), &hf_tensors(false));
    let a = adapter(dir.path(), "adapter", &adapter_config(), &[]);
    let out = dir.path().join("out.gguf");
    let (code, err) = cli(&[
        Path::new("--base"),
        &base,
        Path::new("--adapter"),
        &a,
        Path::new("--quant"),
        Path::new("f32"),
        Path::new("-o"),
        &out,
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert_has(
        &err,
        &[
            "adapter_model.safetensors: no LoRA tensors",
            "this adapter would change nothing",
        ],
    );
    assert!(!out.exists());
}

// ---- 3. NaN and Inf ----

/// `tensors` with element `index` of tensor `key` set to `value`.
fn poisoned(mut tensors: Vec<Tensor>, key: &str, index: usize, value: f32) -> Vec<Tensor> {
    let t = tensors
        .iter_mut()
        .find(|(k, _, _)| k == key)
        .unwrap_or_else(|| panic!("no tensor {key}"));
    t.2[index] = value;
    tensors
}

#[test]
fn non_finite_adapter_tensors_are_refused() {
    let q1 = "base_model.model.model.layers.1.self_attn.q_proj";
    let cases = [
        (
            adapter_config(),
            poisoned(lora_qv(), &format!("{q1}.lora_A.weight"), 3, f32::NAN),
            "lora_A.weight': element 3 is NaN",
        ),
        (
            adapter_config(),
            poisoned(lora_qv(), &format!("{q1}.lora_B.weight"), 5, f32::INFINITY),
            "lora_B.weight': element 5 is inf",
        ),
        (
            with(|c| c["lora_bias"] = true.into()),
            poisoned(
                lora_biases(),
                &format!("{q1}.lora_B.bias"),
                0,
                f32::NEG_INFINITY,
            ),
            "lora_B.bias': element 0 is -inf",
        ),
        (
            with(|c| c["use_dora"] = true.into()),
            poisoned(
                magnitudes(),
                &format!("{q1}.lora_magnitude_vector"),
                2,
                f32::NAN,
            ),
            "lora_magnitude_vector': element 2 is NaN",
        ),
    ];
    for (cfg, tensors, what) in cases {
        let (_d, r) = convert_adapter(&cfg, &tensors);
        assert_has(
            &r.err().unwrap(),
            &["adapter_model.safetensors: tensor 'base_model.model.model.layers.1.self_attn.q_proj.", what, "adapter tensors must be finite"],
        );
    }
}

#[test]
fn a_nan_modules_to_save_head_is_refused() {
    let mut tensors = lora_qv();
    let mut head = random(&[VOCAB, HIDDEN], 77);
    head[9] = f32::NAN;
    tensors.push((
        "base_model.model.lm_head.weight".into(),
        vec![VOCAB, HIDDEN],
        head,
    ));
    let (_d, r) = convert_adapter(
        &with(|c| c["modules_to_save"] = json!(["lm_head"])),
        &tensors,
    );
    assert_has(
        &r.err().unwrap(),
        &["adapter_model.safetensors: tensor 'base_model.model.lm_head.weight': element 9 is NaN"],
    );
}

#[test]
fn a_nan_adapter_is_refused_on_the_adapter_gguf_path_too() {
    let dir = tempfile::tempdir().unwrap();
    let base = hf_base(dir.path(), "base", &hf_config(), &hf_tensors(false));
    let key = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight";
    let a = adapter(
        dir.path(),
        "adapter",
        &adapter_config(),
        &poisoned(lora_qv(), key, 1, f32::NAN),
    );
    let out = dir.path().join("adapter.gguf");
    let (code, err) = cli(&[
        Path::new("--base"),
        &base,
        Path::new("--adapter"),
        &a,
        Path::new("--adapter-out"),
        &out,
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert_has(
        &err,
        &[&format!(
            "adapter_model.safetensors: tensor '{key}': element 1 is NaN"
        )],
    );
    assert!(!out.exists());
}

#[test]
fn absurd_alpha_is_refused() {
    for (cfg, what) in [
        (
            with(|c| c["lora_alpha"] = json!(1e39)),
            "'lora_alpha' is 1e+39",
        ),
        (
            with(|c| c["lora_alpha"] = json!(-1e300)),
            "'lora_alpha' is -1e+300",
        ),
        (
            with(|c| c["lora_alpha"] = json!("inf")),
            "'lora_alpha' is not a number",
        ),
        (
            with(|c| c["alpha_pattern"] = json!({"q_proj": 1e300})),
            "alpha_pattern entry 'q_proj' is 1e+300",
        ),
    ] {
        let (_d, r) = convert_adapter(&cfg, &lora_qv());
        assert_has(&r.err().unwrap(), &["adapter_config.json: ", what]);
    }
}

#[test]
fn non_finite_hf_base_weights_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key = "model.layers.1.mlp.up_proj.weight";
    let base = hf_base(
        dir.path(),
        "base",
        &hf_config(),
        &poisoned(hf_tensors(false), key, 5, f32::INFINITY),
    );
    let err = refused(dir.path(), &base, None);
    assert_has(
        &err,
        &[&format!(
            "model.safetensors: tensor '{key}': element 5 is inf; a model's weights must be finite"
        )],
    );
}

// ---- 4. config.json against the tensors ----

fn config_with(edit: impl Fn(&mut Value)) -> Value {
    let mut cfg = hf_config();
    edit(&mut cfg);
    cfg
}

/// The error converting the tiny base under `cfg` (and `tensors`).
fn base_refused(cfg: &Value, tensors: &[Tensor]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let base = hf_base(dir.path(), "base", cfg, tensors);
    let err = refused(dir.path(), &base, None);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("config.json: "), "{err}");
    err
}

#[test]
fn config_json_must_match_the_tensor_shapes() {
    let t = hf_tensors(false);
    let cases: Vec<(Value, &str)> = vec![
        (
            config_with(|c| c["hidden_size"] = 16.into()),
            "tensor 'model.embed_tokens.weight' has shape [16, 8], but 'hidden_size' 16 and 'vocab_size' 16 give it [16, 16]",
        ),
        (
            config_with(|c| c["head_dim"] = 2.into()),
            "tensor 'model.layers.0.self_attn.q_proj.weight' has shape [8, 8], but 'hidden_size' 8 and 'num_attention_heads' 2 and 'head_dim' 2 give it [4, 8]",
        ),
        (
            config_with(|c| c["num_key_value_heads"] = 2.into()),
            "tensor 'model.layers.0.self_attn.k_proj.weight' has shape [4, 8], but 'hidden_size' 8 and 'num_key_value_heads' 2 and 'head_dim' 4 give it [8, 8]",
        ),
        (
            config_with(|c| {
                c["num_attention_heads"] = 4.into();
                c["head_dim"] = 4.into();
            }),
            "tensor 'model.layers.0.self_attn.q_proj.weight' has shape [8, 8], but 'hidden_size' 8 and 'num_attention_heads' 4 and 'head_dim' 4 give it [16, 8]",
        ),
        (
            config_with(|c| c["intermediate_size"] = 10.into()),
            "tensor 'model.layers.0.mlp.gate_proj.weight' has shape [12, 8], but 'hidden_size' 8 and 'intermediate_size' 10 give it [10, 8]",
        ),
        (
            config_with(|c| c["num_hidden_layers"] = 3.into()),
            "tensor 'model.layers.2.input_layernorm.weight' is missing ('num_hidden_layers' 3 needs it)",
        ),
        (
            config_with(|c| c["num_hidden_layers"] = 1.into()),
            "tensor 'model.layers.1.input_layernorm.weight' is in layer 1, but 'num_hidden_layers' 1 allows layer 0 only",
        ),
        (
            config_with(|c| c["vocab_size"] = 10_000_000.into()),
            "tensor 'model.embed_tokens.weight' has shape [16, 8], but 'hidden_size' 8 and 'vocab_size' 10000000 give it [10000000, 8]",
        ),
        (
            config_with(|c| c["num_hidden_layers"] = (1u64 << 40).into()),
            "'num_hidden_layers' is 1099511627776, beyond 4294967295",
        ),
        (
            config_with(|c| c["vocab_size"] = (1u64 << 40).into()),
            "'vocab_size' is 1099511627776, beyond 4294967295",
        ),
        (config_with(|c| c["hidden_size"] = (-8).into()), "'hidden_size' is -8, not a positive integer"),
        (config_with(|c| c["hidden_size"] = "8".into()), "'hidden_size' is \"8\", not a positive integer"),
        (config_with(|c| c["num_attention_heads"] = 0.into()), "'num_attention_heads' is 0; it must be positive"),
        (config_with(|c| c["num_key_value_heads"] = 0.into()), "'num_key_value_heads' is 0; it must be positive"),
        (config_with(|c| c["max_position_embeddings"] = 0.into()), "'max_position_embeddings' is 0; it must be positive"),
        (config_with(|c| c["rms_norm_eps"] = 0.into()), "'rms_norm_eps' is 0, not a positive finite number"),
        (config_with(|c| c["rms_norm_eps"] = (-1e-6).into()), "'rms_norm_eps' is -1e-6, not a positive finite number"),
        (config_with(|c| c["rms_norm_eps"] = 1e300.into()), "'rms_norm_eps' is 1e+300, not a positive finite number"),
        (config_with(|c| c["rope_theta"] = 0.0.into()), "'rope_theta' is 0.0, not a positive finite number"),
        (config_with(|c| c["tie_word_embeddings"] = "no".into()), "'tie_word_embeddings' is \"no\", not true or false"),
        (
            config_with(|c| {
                c["num_attention_heads"] = 3.into();
                c["num_key_value_heads"] = 3.into();
                c.as_object_mut().unwrap().remove("head_dim");
            }),
            "'hidden_size' 8 is not a multiple of 'num_attention_heads' 3, and there is no 'head_dim'",
        ),
    ];
    for (cfg, want) in cases {
        assert_has(&base_refused(&cfg, &t), &[want]);
    }
    let missing: Vec<Tensor> = t
        .iter()
        .filter(|(k, _, _)| k != "model.layers.1.mlp.down_proj.weight")
        .cloned()
        .collect();
    assert_has(
        &base_refused(&hf_config(), &missing),
        &["tensor 'model.layers.1.mlp.down_proj.weight' is missing"],
    );
    // Absent keys keep their documented defaults.
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_with(|c| {
        let o = c.as_object_mut().unwrap();
        for k in [
            "rms_norm_eps",
            "rope_theta",
            "max_position_embeddings",
            "num_key_value_heads",
            "head_dim",
        ] {
            o.remove(k);
        }
        o.insert("num_key_value_heads".into(), KV_HEADS.into());
    });
    let base = hf_base(dir.path(), "base", &cfg, &t);
    let f = convert_f32(dir.path(), &base, None).unwrap();
    assert_eq!(f.get_u64("llama.context_length"), Some(2048));
    assert_eq!(f.get_f64("llama.rope.freq_base"), Some(10000.0));
}

#[test]
fn a_huge_vocab_size_is_refused_by_the_cli_without_output() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_with(|c| c["vocab_size"] = 10_000_000.into());
    let base = hf_base(dir.path(), "base", &cfg, &hf_tensors(false));
    let out = dir.path().join("out.gguf");
    let (code, err) = cli(&[
        Path::new("--base"),
        &base,
        Path::new("--quant"),
        Path::new("f32"),
        Path::new("-o"),
        &out,
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert_has(
        &err,
        &["config.json: tensor 'model.embed_tokens.weight' has shape [16, 8]"],
    );
    assert!(!out.exists());
}

#[test]
fn tokenizer_ids_beyond_the_vocabulary_are_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let base = hf_base(dir.path(), "base", &hf_config(), &hf_tensors(false));
    let tokenizer = |vocab: Value| json!({"model": {"type": "BPE", "vocab": vocab, "merges": []}, "added_tokens": []});
    let write =
        |v: Value| std::fs::write(base.join("tokenizer.json"), tokenizer(v).to_string()).unwrap();
    write(json!({"a": 0, "b": 1, "far": 1_000_000_000u64}));
    assert_has(
        &refused(dir.path(), &base, None),
        &["tokenizer.json: token \"far\" has id 1000000000, but the model has 16 token embeddings (vocab_size)"],
    );
    // Within the vocabulary the list is padded to the embedding's rows.
    write(json!({"a": 0, "b": 1}));
    let f = convert_f32(dir.path(), &base, None).unwrap();
    assert_eq!(f.get_strings("tokenizer.ggml.tokens").unwrap().len(), VOCAB);
}

// ---- 5. hostile GGUF bases ----

/// A GGUF v3 file, written byte by byte so that it can say what a
/// well-behaved writer would refuse to: (name, dims, f32 values) tensors.
fn raw_gguf(path: &Path, metadata: &[(&str, u32)], tensors: &[(String, Vec<u64>, Vec<f32>)]) {
    let mut b: Vec<u8> = Vec::new();
    let string = |b: &mut Vec<u8>, s: &str| {
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s.as_bytes());
    };
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((metadata.len() as u64 + 1).to_le_bytes());
    string(&mut b, "general.architecture");
    b.extend(8u32.to_le_bytes());
    string(&mut b, "llama");
    for (k, v) in metadata {
        string(&mut b, k);
        b.extend(4u32.to_le_bytes());
        b.extend(v.to_le_bytes());
    }
    let mut offset = 0u64;
    for (name, dims, values) in tensors {
        string(&mut b, name);
        b.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(0u32.to_le_bytes()); // F32
        b.extend(offset.to_le_bytes());
        offset += (values.len() as u64 * 4).div_ceil(32) * 32;
    }
    b.resize(b.len().div_ceil(32) * 32, 0);
    for (_, _, values) in tensors {
        let start = b.len();
        b.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        b.resize(start + (b.len() - start).div_ceil(32) * 32, 0);
    }
    std::fs::write(path, b).unwrap();
}

/// The tiny model as GGUF tensors (names mapped, dims reversed).
fn gguf_tensors() -> Vec<(String, Vec<u64>, Vec<f32>)> {
    hf_tensors(false)
        .into_iter()
        .map(|(k, s, v)| {
            let name = lorafold_converter::read::base::hf_to_gguf_name(&k).unwrap();
            (name, s.iter().rev().map(|&d| d as u64).collect(), v)
        })
        .collect()
}

fn gguf_metadata(block_count: u32) -> Vec<(&'static str, u32)> {
    vec![
        ("llama.block_count", block_count),
        ("llama.embedding_length", HIDDEN as u32),
        ("llama.feed_forward_length", FFN as u32),
        ("llama.attention.head_count", HEADS as u32),
        ("llama.attention.head_count_kv", KV_HEADS as u32),
        ("llama.context_length", 64),
    ]
}

/// The error converting a GGUF base, checked to be one line naming the file.
fn gguf_refused(metadata: &[(&str, u32)], tensors: &[(String, Vec<u64>, Vec<f32>)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.gguf");
    raw_gguf(&base, metadata, tensors);
    let err = refused(dir.path(), &base, None);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with(&format!("{}: ", base.display())), "{err}");
    err
}

#[test]
fn a_well_formed_raw_gguf_base_converts() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.gguf");
    raw_gguf(&base, &gguf_metadata(LAYERS as u32), &gguf_tensors());
    let f = convert_f32(dir.path(), &base, None).unwrap();
    assert_eq!(f.tensors().len(), gguf_tensors().len());
}

#[test]
fn hostile_gguf_bases_are_refused_without_panic() {
    let with_extra = |name: &str, dims: Vec<u64>, n: usize| {
        let mut t = gguf_tensors();
        t.push((name.to_string(), dims, vec![1.0; n]));
        t
    };
    let md = gguf_metadata(LAYERS as u32);
    assert_has(
        &gguf_refused(&md, &with_extra("blk.0.attn_q.bias", vec![0], 0)),
        &["tensor 'blk.0.attn_q.bias': dims [0]: a weight needs at least one dimension and none of length 0"],
    );
    assert_has(
        &gguf_refused(&md, &with_extra("rope_freqs.weight", vec![], 1)),
        &["tensor 'rope_freqs.weight': dims []"],
    );
    assert_has(
        &gguf_refused(&md, &with_extra("blk.1.ffn_up.bias", vec![8, 0], 0)),
        &["tensor 'blk.1.ffn_up.bias': dims [8, 0]"],
    );
    assert_has(
        &gguf_refused(&gguf_metadata(3), &gguf_tensors()),
        &["tensor 'blk.2.attn_norm.weight' is missing ('llama.block_count' 3 needs it)"],
    );
    assert_has(
        &gguf_refused(&gguf_metadata(1 << 30), &gguf_tensors()),
        &["tensor 'blk.2.attn_norm.weight' is missing"],
    );
    assert_has(
        &gguf_refused(&gguf_metadata(1), &gguf_tensors()),
        &["tensor 'blk.1.attn_norm.weight' is in layer 1, but 'llama.block_count' 1 allows layer 0 only"],
    );
    let mut md = gguf_metadata(LAYERS as u32);
    md[1].1 = 16;
    assert_has(
        &gguf_refused(&md, &gguf_tensors()),
        &["tensor 'token_embd.weight' has shape [8, 16], but 'llama.embedding_length' 16"],
    );
    let mut t = gguf_tensors();
    let i = t
        .iter()
        .position(|(n, _, _)| n == "blk.1.ffn_down.weight")
        .unwrap();
    t[i].2[7] = f32::NAN;
    assert_has(
        &gguf_refused(&gguf_metadata(LAYERS as u32), &t),
        &["tensor 'blk.1.ffn_down.weight': element 7 is NaN; a model's weights must be finite"],
    );
}

/// Calibration statistics of another model (other widths) are refused
/// naming the tensor, with no output; a file that is not calibration
/// statistics is refused naming the file.
#[test]
fn calibration_of_another_model_is_refused() {
    use lorafold_converter::calib::CalibStats;
    use lorafold_runtime::cpu::LinearInput;
    let dir = tempfile::tempdir().unwrap();
    let base = hf_base(dir.path(), "base", &hf_config(), &hf_tensors(false));
    let k = HIDDEN + 32;
    let mut stats = CalibStats::default();
    let rows: Vec<f32> = (0..4 * k).map(|i| (i % 7) as f32 - 3.0).collect();
    stats.add(0, LinearInput::AttnIn, &rows, k).unwrap();
    stats.tokens = 4;
    stats.flush().unwrap();
    let calib = dir.path().join("calib.gguf");
    stats.write(&calib, &[]).unwrap();
    let out = dir.path().join("out.gguf");
    let opts = ConvertOptions {
        calib: Some(std::sync::Arc::new(CalibStats::read(&calib).unwrap())),
        ..ConvertOptions::new(&base, None, QuantPolicy::parse("q4_0", &[]).unwrap(), &out)
    };
    let err = convert(&opts, &|_| {}).unwrap_err().to_string();
    assert_has(
        &err,
        &["blk.0.attn_q.weight", "another model", &format!("{k} wide")],
    );
    assert!(!out.exists());
    let (code, stderr) = cli(&[
        Path::new("--base"),
        &base,
        Path::new("--quant"),
        Path::new("q4_0"),
        Path::new("--calib"),
        &base.join("config.json"),
        Path::new("-o"),
        &out,
    ]);
    assert_eq!(code, Some(1), "{stderr}");
    assert_has(&stderr, &["config.json", "not a GGUF file"]);
    assert!(!out.exists());

    // Statistics of this model (every linear input of every layer): the
    // output records what rounded it.
    let mut ours = CalibStats::default();
    for layer in 0..LAYERS {
        for (input, k) in [
            (LinearInput::AttnIn, HIDDEN),
            (LinearInput::AttnOut, Q_ROWS),
            (LinearInput::FfnIn, HIDDEN),
            (LinearInput::FfnDown, FFN),
        ] {
            let rows: Vec<f32> = (0..4 * k).map(|i| (i % 5) as f32 - 2.0).collect();
            ours.add(layer, input, &rows, k).unwrap();
        }
    }
    ours.tokens = 4;
    ours.flush().unwrap();
    ours.write(&calib, &[]).unwrap();
    let read = CalibStats::read(&calib).unwrap();
    let sha = read.source_sha256.clone().unwrap();
    let opts = ConvertOptions {
        calib: Some(std::sync::Arc::new(read)),
        rounding: lorafold_converter::convert::Rounding::Gptq,
        ..ConvertOptions::new(&base, None, QuantPolicy::parse("q4_0", &[]).unwrap(), &out)
    };
    convert(&opts, &|_| {}).unwrap();
    let f = GgufFile::open(&out).unwrap();
    assert_eq!(
        f.get("lorafold.calibration.sha256")
            .and_then(|v| v.as_str().map(str::to_owned)),
        Some(sha)
    );
    assert!(f
        .get("lorafold.rounding")
        .and_then(|v| v.as_str().map(str::to_owned))
        .is_some_and(|r| r.starts_with("gptq")));
}

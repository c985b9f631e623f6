//! Architecture rules on HF folders: qwen2 keeps q/k rows in HF order and
//! carries attention biases; mistral is written as llama with permuted q/k.

use crate::common;

use std::path::Path;

use lorafold_converter::convert::{convert, ConvertOptions};
use lorafold_converter::round::quant::QuantPolicy;
use lorafold_runtime::arch::qk_permutation;
use lorafold_runtime::gguf::GgufFile;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use common::f32s;

/// tiny-llama's weights under another model_type, with q/k/v biases if asked.
fn hf_folder(dir: &Path, model_type: &str, biases: bool) {
    let base = common::shared_data().join("tiny-llama/base");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(base.join("config.json")).unwrap()).unwrap();
    cfg["model_type"] = model_type.into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let bytes = std::fs::read(base.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, v.shape().to_vec(), v.data().to_vec()))
        .collect();
    if biases {
        for l in 0..3 {
            for (p, n) in [("q_proj", 96), ("k_proj", 32), ("v_proj", 32)] {
                let data: Vec<u8> = (0..n)
                    .flat_map(|i| (i as f32 * 0.01 + l as f32).to_le_bytes())
                    .collect();
                tensors.push((
                    format!("model.layers.{l}.self_attn.{p}.bias"),
                    vec![n],
                    data,
                ));
            }
        }
    }
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(k, s, d)| {
            (
                k.clone(),
                TensorView::new(Dtype::F32, s.clone(), d).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

fn convert_f32(dir: &Path) -> GgufFile {
    let out = dir.join("out.gguf");
    convert(
        &ConvertOptions::new(dir, None, QuantPolicy::parse("f32", &[]).unwrap(), &out),
        &|_| {},
    )
    .unwrap();
    GgufFile::open(out).unwrap()
}

fn hf_tensor(name: &str) -> Vec<f32> {
    let bytes =
        std::fs::read(common::shared_data().join("tiny-llama/base/model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    f32s(st.tensor(name).unwrap().data())
}

#[test]
fn qwen2_keeps_hf_row_order_and_biases() {
    let dir = tempfile::tempdir().unwrap();
    hf_folder(dir.path(), "qwen2", true);
    let f = convert_f32(dir.path());
    assert_eq!(f.get_str("general.architecture").as_deref(), Some("qwen2"));
    assert_eq!(f.get_u64("qwen2.block_count"), Some(3));
    assert_eq!(f.get_u64("qwen2.attention.head_count_kv"), Some(2));
    let q = f.tensor("blk.1.attn_q.weight").unwrap();
    assert_eq!(
        f32s(f.tensor_data(q)),
        hf_tensor("model.layers.1.self_attn.q_proj.weight")
    );
    let b = f.tensor("blk.2.attn_k.bias").unwrap();
    assert_eq!(b.dims(), [32]);
    let expected: Vec<f32> = (0..32).map(|i| i as f32 * 0.01 + 2.0).collect();
    assert_eq!(f32s(f.tensor_data(b)), expected);
    assert_eq!(f.tensors().len(), 30 + 9);
}

#[test]
fn mistral_is_written_as_llama_with_permuted_qk() {
    let dir = tempfile::tempdir().unwrap();
    hf_folder(dir.path(), "mistral", false);
    let f = convert_f32(dir.path());
    assert_eq!(f.get_str("general.architecture").as_deref(), Some("llama"));
    assert_eq!(f.get_f64("llama.rope.freq_base"), Some(10000.0));
    for (name, hf, heads) in [
        (
            "blk.0.attn_q.weight",
            "model.layers.0.self_attn.q_proj.weight",
            6,
        ),
        (
            "blk.0.attn_k.weight",
            "model.layers.0.self_attn.k_proj.weight",
            2,
        ),
    ] {
        let ours = f32s(f.tensor_data(f.tensor(name).unwrap()));
        let theirs = hf_tensor(hf);
        assert_ne!(ours, theirs, "{name} must be permuted");
        for (dst, src) in qk_permutation(ours.len() / 96, heads)
            .into_iter()
            .enumerate()
        {
            assert_eq!(
                ours[dst * 96..(dst + 1) * 96],
                theirs[src * 96..(src + 1) * 96],
                "{name} row {dst}"
            );
        }
    }
    let v = f32s(f.tensor_data(f.tensor("blk.0.attn_v.weight").unwrap()));
    assert_eq!(
        v,
        hf_tensor("model.layers.0.self_attn.v_proj.weight"),
        "v is never permuted"
    );
}

#[test]
fn unknown_model_type_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    hf_folder(dir.path(), "gpt_neox", false);
    let out = dir.path().join("out.gguf");
    let e = convert(
        &ConvertOptions::new(
            dir.path(),
            None,
            QuantPolicy::parse("f32", &[]).unwrap(),
            &out,
        ),
        &|_| {},
    )
    .unwrap_err();
    assert!(
        e.to_string().contains(
            "config.json: unsupported model_type 'gpt_neox' (supported: llama, mistral, qwen2, gemma3_text)"
        ),
        "{e}"
    );
    assert!(!out.exists());
}

#[test]
fn llama_attention_biases_get_the_qk_permutation_too() {
    let dir = tempfile::tempdir().unwrap();
    hf_folder(dir.path(), "llama", true);
    let f = convert_f32(dir.path());
    let q_bias = common::f32s(f.tensor_data(f.tensor("blk.1.attn_q.bias").unwrap()));
    let hf: Vec<f32> = (0..96).map(|i| i as f32 * 0.01 + 1.0).collect();
    let want: Vec<f32> = qk_permutation(96, 6).into_iter().map(|s| hf[s]).collect();
    assert_eq!(q_bias, want);
    let v_bias = common::f32s(f.tensor_data(f.tensor("blk.1.attn_v.bias").unwrap()));
    assert_eq!(
        v_bias,
        (0..32).map(|i| i as f32 * 0.01 + 1.0).collect::<Vec<_>>()
    );
}

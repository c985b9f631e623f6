//! Our f32 merge of each tiny-llama adapter equals PEFT's merged weights
//! (../shared/data/tiny-llama/*/merged), tensor by tensor.

use crate::common;

use lorafold_converter::convert::{convert, ConvertOptions};
use lorafold_converter::read::base::{hf_to_gguf_name, widen};
use lorafold_converter::round::quant::QuantPolicy;
use lorafold_runtime::arch::qk_permutation;
use lorafold_runtime::gguf::{GgmlType, GgufFile};
use safetensors::SafeTensors;

use common::f32s;

fn check_adapter(name: &str) {
    let data = common::shared_data().join("tiny-llama");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged.gguf");
    let opts = ConvertOptions::new(
        data.join("base"),
        Some(data.join(name)),
        QuantPolicy::parse("f32", &[]).unwrap(),
        out.clone(),
    );
    let report = convert(&opts, &|_| {}).unwrap();
    assert_eq!(
        report.totals.max_rel_error, 0.0,
        "f32 output is the merge itself"
    );

    let ours = GgufFile::open(&out).unwrap();
    let peft_bytes = std::fs::read(data.join(name).join("merged/model.safetensors")).unwrap();
    let peft = SafeTensors::deserialize(&peft_bytes).unwrap();
    let base_bytes = std::fs::read(data.join("base/model.safetensors")).unwrap();
    let base = SafeTensors::deserialize(&base_bytes).unwrap();
    let mut changed = 0;
    assert_eq!(ours.tensors().len(), peft.len());
    for (hf_name, view) in peft.tensors() {
        let gguf_name = hf_to_gguf_name(&hf_name).unwrap();
        let t = ours
            .tensor(&gguf_name)
            .unwrap_or_else(|| panic!("{name}: no {gguf_name}"));
        assert_eq!(t.ggml_type, GgmlType::F32);
        assert_eq!(
            t.shape(),
            view.shape().iter().map(|&d| d as u64).collect::<Vec<_>>(),
            "{gguf_name}"
        );
        let expected = widen(view.dtype(), view.data()).unwrap();
        let mut got = f32s(ours.tensor_data(t));
        // llama.cpp's layout has q and k rows permuted; undo it to compare.
        let heads = match gguf_name.as_str() {
            n if n.contains("attn_q") => Some(6),
            n if n.contains("attn_k") => Some(2),
            _ => None,
        };
        if let Some(h) = heads {
            let row = t.dims()[0] as usize;
            let mut unpermuted = vec![0f32; got.len()];
            for (dst, src) in qk_permutation(got.len() / row, h).into_iter().enumerate() {
                unpermuted[src * row..(src + 1) * row]
                    .copy_from_slice(&got[dst * row..(dst + 1) * row]);
            }
            got = unpermuted;
        }
        let (mut diff2, mut norm2, mut max_abs) = (0f64, 0f64, 0f32);
        for (a, b) in got.iter().zip(&expected) {
            diff2 += ((a - b) as f64).powi(2);
            norm2 += (*b as f64).powi(2);
            max_abs = max_abs.max((a - b).abs());
        }
        let rel = (diff2 / norm2).sqrt();
        assert!(
            rel <= 1e-6 && max_abs <= 1e-6,
            "{name}: {gguf_name}: relative {rel:e}, max abs {max_abs:e}"
        );
        let base_values = widen(
            base.tensor(&hf_name).unwrap().dtype(),
            base.tensor(&hf_name).unwrap().data(),
        )
        .unwrap();
        if base_values != expected {
            changed += 1;
            // The adapter moved this tensor by far more than our tolerance.
            let moved = base_values
                .iter()
                .zip(&expected)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(moved > 1e-3, "{name}: {gguf_name} moved only {moved}");
        } else {
            assert_eq!(
                got, expected,
                "{name}: {gguf_name} is unchanged and must be bit-identical"
            );
        }
    }
    let check: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data.join(name).join("check.json")).unwrap())
            .unwrap();
    assert_eq!(
        changed,
        check["changed_tensors"].as_array().unwrap().len(),
        "{name}: changed tensor count"
    );
}

#[test]
fn lora_all_matches_peft() {
    check_adapter("lora_all");
}

#[test]
fn rslora_with_rank_and_alpha_patterns_matches_peft() {
    check_adapter("rslora_patterns");
}

#[test]
fn dora_matches_peft() {
    check_adapter("dora");
}

#[test]
fn embedding_lora_and_modules_to_save_match_peft() {
    check_adapter("embed_and_save");
}

#[test]
fn bf16_adapter_matches_peft() {
    check_adapter("bf16_adapter");
}

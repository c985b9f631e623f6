//! The separate path's adapter GGUF: llama.cpp's layout, and A and B equal
//! to PEFT's tensors (after the q/k permutation and any folded factor),
//! exactly at f32 and to f16 rounding at f16.

use crate::common;

use std::path::{Path, PathBuf};

use lorafold_converter::convert::{convert, ConvertOptions};
use lorafold_converter::read::base::widen;
use lorafold_converter::round::quant::QuantPolicy;
use lorafold_runtime::arch::qk_permutation;
use lorafold_runtime::gguf::{GgmlType, GgufFile, MetadataValue};
use safetensors::SafeTensors;
use serde_json::Value;

fn tiny() -> PathBuf {
    common::shared_data().join("tiny-llama")
}

fn write_adapter(adapter: &Path, ty: GgmlType, out: &Path) -> Result<(), String> {
    let opts = ConvertOptions {
        output: None,
        adapter_output: Some(out.to_path_buf()),
        adapter_type: ty,
        ..ConvertOptions::new(
            tiny().join("base"),
            Some(adapter.to_path_buf()),
            QuantPolicy::parse("f16", &[]).unwrap(),
            "",
        )
    };
    convert(&opts, &|_| {})
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn values(f: &GgufFile, name: &str) -> Vec<f32> {
    let t = f.tensor(name).unwrap_or_else(|| panic!("no {name}"));
    let b = f.tensor_data(t);
    match t.ggml_type.name() {
        "F32" => common::f32s(b),
        "F16" => b
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => panic!("{other}"),
    }
}

/// Check every module of `adapter` against its PEFT tensors.
fn check(adapter_name: &str, ty: GgmlType) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("a.gguf");
    write_adapter(&tiny().join(adapter_name), ty, &out).unwrap();
    let f = GgufFile::open(&out).unwrap();
    assert_eq!(f.get_str("general.type").as_deref(), Some("adapter"));
    assert_eq!(f.get_str("adapter.type").as_deref(), Some("lora"));
    assert_eq!(f.get_str("general.architecture").as_deref(), Some("llama"));
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(tiny().join(adapter_name).join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    let alpha = cfg["lora_alpha"].as_f64().unwrap();
    assert_eq!(
        f.get("adapter.lora.alpha"),
        Some(MetadataValue::F32(alpha as f32))
    );
    let check: Value = serde_json::from_str(
        &std::fs::read_to_string(tiny().join(adapter_name).join("check.json")).unwrap(),
    )
    .unwrap();
    let bytes = std::fs::read(tiny().join(adapter_name).join("adapter_model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let modules = check["modules"].as_object().unwrap();
    assert_eq!(f.tensors().len(), 2 * modules.len());
    for (module, info) in modules {
        let (r, scale) = (
            info["r"].as_u64().unwrap() as usize,
            info["scaling"].as_f64().unwrap(),
        );
        let get = |k: &str| {
            let v = st
                .tensor(&format!("base_model.model.{module}.{k}"))
                .unwrap();
            widen(v.dtype(), v.data()).unwrap()
        };
        let (a, mut b) = (get("lora_A.weight"), get("lora_B.weight"));
        let name =
            lorafold_converter::read::base::hf_to_gguf_name(&format!("{module}.weight")).unwrap();
        let heads = if name.contains("attn_q") {
            Some(6)
        } else if name.contains("attn_k") {
            Some(2)
        } else {
            None
        };
        if let Some(h) = heads {
            let src = b.clone();
            for (dst, s) in qk_permutation(b.len() / r, h).into_iter().enumerate() {
                b[dst * r..(dst + 1) * r].copy_from_slice(&src[s * r..(s + 1) * r]);
            }
        }
        // llama.cpp applies alpha / r; whatever PEFT's scale adds is in B.
        let factor = scale / (alpha / r as f64);
        if (factor - 1.0).abs() > 1e-9 {
            b.iter_mut().for_each(|x| *x = (*x as f64 * factor) as f32);
        }
        let round = |v: Vec<f32>| -> Vec<f32> {
            if ty == GgmlType::F16 {
                v.into_iter()
                    .map(|x| half::f16::from_f32(x).to_f32())
                    .collect()
            } else {
                v
            }
        };
        let ta = f.tensor(&format!("{name}.lora_a")).unwrap();
        assert_eq!(ta.ggml_type, ty);
        assert_eq!(ta.dims()[1] as usize, r, "{name} rank");
        assert_eq!(
            values(&f, &format!("{name}.lora_a")),
            round(a),
            "{adapter_name} {name}.lora_a"
        );
        assert_eq!(
            values(&f, &format!("{name}.lora_b")),
            round(b),
            "{adapter_name} {name}.lora_b"
        );
    }
}

#[test]
fn lora_all_a_and_b_are_peft_tensors_at_f32_and_f16() {
    check("lora_all", GgmlType::F32);
    check("lora_all", GgmlType::F16);
}

#[test]
fn rslora_and_alpha_pattern_are_folded_into_b() {
    check("rslora_patterns", GgmlType::F32);
    check("bf16_adapter", GgmlType::F16);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("a.gguf");
    write_adapter(&tiny().join("rslora_patterns"), GgmlType::F16, &out).unwrap();
    let f = GgufFile::open(&out).unwrap();
    let folded = f.get_strings("lorafold.adapter.b_factor").unwrap();
    // q and v: 16/sqrt(8) over 16/8 = sqrt(8); layer-1 v at r=4: 8 / 4 = 2;
    // o_proj (alpha 4): (4/sqrt(8)) / (16/8) = 1/sqrt(2).
    assert!(
        folded.contains(&"blk.0.attn_q.weight=2.82842712474619".into()),
        "{folded:?}"
    );
    assert!(
        folded.contains(&"blk.1.attn_v.weight=2".into()),
        "{folded:?}"
    );
    assert!(
        folded.contains(&"blk.2.attn_output.weight=0.7071067811865475".into()),
        "{folded:?}"
    );
}

#[test]
fn embedding_lora_is_stored_the_way_llama_cpp_gathers_it() {
    // embed_and_save without its saved lm_head: embedding LoRA + q_proj.
    let dir = tempfile::tempdir().unwrap();
    let src = tiny().join("embed_and_save");
    let bytes = std::fs::read(src.join("adapter_model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<_> = st
        .tensors()
        .into_iter()
        .filter(|(k, _)| k != "base_model.model.lm_head.weight")
        .collect();
    safetensors::serialize_to_file(kept, None, &dir.path().join("adapter_model.safetensors"))
        .unwrap();
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap())
            .unwrap();
    cfg["modules_to_save"] = Value::Null;
    std::fs::write(dir.path().join("adapter_config.json"), cfg.to_string()).unwrap();
    let out = dir.path().join("a.gguf");
    write_adapter(dir.path(), GgmlType::F32, &out).unwrap();
    let f = GgufFile::open(&out).unwrap();
    // llama.cpp: get_rows(lora_a, tokens) then mul_mat(lora_b, .): A^T with
    // ne [r, vocab], B with ne [r, dim].
    assert_eq!(
        f.tensor("token_embd.weight.lora_a").unwrap().dims(),
        [4, 384]
    );
    assert_eq!(
        f.tensor("token_embd.weight.lora_b").unwrap().dims(),
        [4, 96]
    );
    let a = widen(
        st.tensor("base_model.model.model.embed_tokens.lora_embedding_A")
            .unwrap()
            .dtype(),
        st.tensor("base_model.model.model.embed_tokens.lora_embedding_A")
            .unwrap()
            .data(),
    )
    .unwrap();
    let ours = values(&f, "token_embd.weight.lora_a");
    for v in 0..384 {
        for k in 0..4 {
            assert_eq!(ours[v * 4 + k], a[k * 384 + v]);
        }
    }
    let b = widen(
        safetensors::Dtype::F32,
        st.tensor("base_model.model.model.embed_tokens.lora_embedding_B")
            .unwrap()
            .data(),
    )
    .unwrap();
    assert_eq!(values(&f, "token_embd.weight.lora_b"), b);
}

#[test]
fn what_llama_cpp_cannot_express_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("a.gguf");
    let e = write_adapter(&tiny().join("dora"), GgmlType::F16, &out).unwrap_err();
    assert!(e.contains("DoRA (module model.layers.0.mlp.down_proj) cannot be expressed as a llama.cpp LoRA adapter; use the merged path"), "{e}");
    let e = write_adapter(&tiny().join("embed_and_save"), GgmlType::F16, &out).unwrap_err();
    assert!(
        e.contains("modules_to_save (full tensor lm_head.weight) cannot be expressed"),
        "{e}"
    );
    let e = write_adapter(&tiny().join("lora_all"), GgmlType::Q8_0, &out).unwrap_err();
    assert!(
        e.contains("adapter tensors are written as f16, f32 or bf16, not Q8_0"),
        "{e}"
    );
    assert!(!out.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

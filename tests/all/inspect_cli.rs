//! `lorafold inspect` on the real model, on PEFT adapters and HF folders the
//! test makes, and on bad input.

use crate::common;

use std::collections::HashMap;
use std::path::Path;

use common::{lorafold, Rng};
use serde_json::{json, Value};

fn inspect_json(path: &Path) -> Value {
    let out = lorafold()
        .args(["inspect", "--json"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("inspect --json prints valid JSON")
}

fn inspect_error(path: &Path) -> String {
    let out = lorafold().arg("inspect").arg(path).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected failure, stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(out.stdout.is_empty());
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "one-line error: {err}");
    err
}

#[test]
fn smollm2_gguf_summary() {
    let v = inspect_json(common::smollm2());
    assert_eq!(v["format"], "gguf");
    assert_eq!(v["kind"], "model");
    assert_eq!(v["architecture"], "llama");
    let h = &v["hyperparameters"];
    assert_eq!(h["block_count"], 30);
    assert_eq!(h["embedding_length"], 576);
    assert_eq!(h["feed_forward_length"], 1536);
    assert_eq!(h["head_count"], 9);
    assert_eq!(h["head_count_kv"], 3);
    assert_eq!(h["vocab_size"], 49152);
    assert_eq!(h["rope_freq_base"], 100000.0);
    let t = &v["tokenizer"];
    assert_eq!(t["model"], "gpt2");
    assert_eq!(t["pre"], "smollm");
    assert_eq!(t["vocab_size"], 49152);
    assert_eq!(t["merges"], 48900);
    assert_eq!(
        t["special_ids"],
        json!([["bos", 1], ["eos", 2], ["unknown", 0], ["padding", 2]])
    );
    assert_eq!(t["chat_template"], true);
    let tensors = v["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), 272);
    assert_eq!(v["totals"]["n_tensors"], 272);
    assert_eq!(
        tensors[0],
        json!({"name": "token_embd.weight", "ggml_type": "Q8_0", "dims": [576, 49152], "n_elements": 28311552, "n_bytes": 30081024})
    );
    let bytes: u64 = tensors.iter().map(|t| t["n_bytes"].as_u64().unwrap()).sum();
    assert_eq!(v["totals"]["n_bytes"], bytes);
    let by_type: HashMap<String, u64> = v["by_type"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["ggml_type"].as_str().unwrap().to_string(),
                b["n_tensors"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        by_type,
        HashMap::from([("Q8_0".into(), 1), ("Q4_1".into(), 210), ("F32".into(), 61)])
    );
    // 8 * 96,579,264 bytes / 134,515,008 weights
    let bpw = v["totals"]["bits_per_weight"].as_f64().unwrap();
    assert!((bpw - 8.0 * bytes as f64 / 134_515_008.0).abs() < 1e-12);

    let out = lorafold()
        .arg("inspect")
        .arg(common::smollm2())
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("architecture  llama"), "{text}");
    assert!(text.contains("blocks        30"));
    assert!(text.contains("vocabulary    49152"));
    assert!(text.contains("total     272 tensors"));
}

/// Write a PEFT adapter folder: rsLoRA with rank and alpha patterns, bf16.
fn write_peft(dir: &Path, config_r: u64) {
    let mut rng = Rng::new(7);
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for layer in 0..2 {
        for (module, out) in [("q_proj", 64), ("v_proj", 16), ("o_proj", 64)] {
            let r = if layer == 1 && module == "v_proj" {
                4
            } else {
                8
            };
            let base = format!("base_model.model.model.layers.{layer}.self_attn.{module}");
            for (suffix, shape) in [
                ("lora_A.weight", vec![r, 64]),
                ("lora_B.weight", vec![out, r]),
            ] {
                let data: Vec<u8> = (0..shape.iter().product::<usize>())
                    .flat_map(|_| half::bf16::from_f32(rng.f32()).to_le_bytes())
                    .collect();
                tensors.push((format!("{base}.{suffix}"), shape, data));
            }
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, s.clone(), d)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("adapter_model.safetensors")).unwrap();
    let config = json!({
        "peft_type": "LORA", "r": config_r, "lora_alpha": 16, "use_rslora": true, "use_dora": false,
        "rank_pattern": {"model.layers.1.self_attn.v_proj": 4}, "alpha_pattern": {"o_proj": 4},
        "target_modules": ["o_proj", "q_proj", "v_proj"], "base_model_name_or_path": "tiny/base",
        "fan_in_fan_out": false, "init_lora_weights": true
    });
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
}

#[test]
fn peft_adapter_summary() {
    let dir = tempfile::tempdir().unwrap();
    write_peft(dir.path(), 8);
    let v = inspect_json(dir.path());
    assert_eq!(v["format"], "peft_adapter");
    assert_eq!(v["base_model"], "tiny/base");
    assert_eq!(v["targets"], json!(["o_proj", "q_proj", "v_proj"]));
    assert_eq!(v["dtypes"], json!(["BF16"]));
    assert_eq!(v["config"]["use_rslora"], true);
    // 5 modules at r=8 with (64 + out) * 8 params, one v_proj at r=4.
    let expected = 2 * (8 * (64 + 64)) * 2 + 8 * (64 + 16) + 4 * (64 + 16);
    assert_eq!(v["parameters"], expected);
    let modules = v["modules"].as_array().unwrap();
    assert_eq!(modules.len(), 6);
    let by_path: HashMap<&str, &Value> = modules
        .iter()
        .map(|m| (m["path"].as_str().unwrap(), m))
        .collect();
    let q = by_path["model.layers.0.self_attn.q_proj"];
    assert_eq!(
        (q["rank"].as_u64(), q["alpha"].as_f64()),
        (Some(8), Some(16.0))
    );
    assert!((q["scale"].as_f64().unwrap() - 16.0 / 8f64.sqrt()).abs() < 1e-12);
    let v1 = by_path["model.layers.1.self_attn.v_proj"];
    assert_eq!(
        (v1["rank"].as_u64(), v1["scale"].as_f64()),
        (Some(4), Some(8.0))
    );
    let o = by_path["model.layers.1.self_attn.o_proj"];
    assert!((o["scale"].as_f64().unwrap() - 4.0 / 8f64.sqrt()).abs() < 1e-12);
    assert_eq!(
        (o["out_features"].as_u64(), o["in_features"].as_u64()),
        (Some(64), Some(64))
    );
}

#[test]
fn peft_adapter_problems_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    write_peft(dir.path(), 4);
    let e = inspect_error(dir.path());
    assert!(e.contains("adapter_model.safetensors: tensor 'base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight': has rank 8 but adapter_config.json gives this module r = 4"), "{e}");

    let bin = tempfile::tempdir().unwrap();
    std::fs::write(bin.path().join("adapter_config.json"), "{}").unwrap();
    std::fs::write(bin.path().join("adapter_model.bin"), b"\x80\x02}q\x00.").unwrap();
    let e = inspect_error(bin.path());
    assert!(
        e.contains("adapter_model.bin is a Python pickle, which lorafold does not load"),
        "{e}"
    );

    let missing = tempfile::tempdir().unwrap();
    std::fs::write(
        missing.path().join("adapter_config.json"),
        r#"{"r": 8, "lora_alpha": 8}"#,
    )
    .unwrap();
    let e = inspect_error(missing.path());
    assert!(e.contains("adapter_model.safetensors: No such file"), "{e}");
}

#[test]
fn hf_folder_summary() {
    let dir = tempfile::tempdir().unwrap();
    let data = vec![0u8; 4 * 6];
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 3], &data).unwrap();
    safetensors::serialize_to_file(
        vec![("model.norm.weight".to_string(), view)],
        None,
        &dir.path().join("model.safetensors"),
    )
    .unwrap();
    let config = json!({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 3,
        "num_hidden_layers": 1, "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}, "dtype": "float32"});
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let v = inspect_json(dir.path());
    assert_eq!(v["format"], "safetensors");
    assert_eq!(v["config"]["rope_theta"], 100000.0);
    assert_eq!(v["config"]["dtype"], "float32");
    assert_eq!(
        v["tensors"],
        json!([{"name": "model.norm.weight", "dtype": "F32", "shape": [2, 3], "n_bytes": 24, "file": "model.safetensors"}])
    );
}

#[test]
fn bad_files_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let e = inspect_error(&dir.path().join("absent.gguf"));
    assert!(
        e.starts_with("error: ") && e.contains("absent.gguf: No such file"),
        "{e}"
    );

    let truncated = dir.path().join("cut.gguf");
    let full = std::fs::read(common::smollm2()).unwrap();
    std::fs::write(&truncated, &full[..2_000_000]).unwrap();
    let e = inspect_error(&truncated);
    assert!(e.contains("cut.gguf: at byte 1769507, tensor 'token_embd.weight': data (30081024 bytes at data offset 0) runs past the end of the file (2000000 bytes)"), "{e}");

    let other = dir.path().join("notes.txt");
    std::fs::write(&other, "hello").unwrap();
    let e = inspect_error(&other);
    assert!(e.contains("notes.txt: not a GGUF file, a .safetensors file, a PEFT adapter folder or an HF model folder"), "{e}");
}

#[test]
fn gguf_lora_adapter_summary() {
    use lorafold_converter::GgufWriter;
    use lorafold_runtime::gguf::{GgmlType, MetadataValue};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("adapter.gguf");
    let mut w = GgufWriter::new(&path);
    w.add_metadata("general.architecture", &"llama".into())
        .unwrap();
    w.add_metadata("general.type", &"adapter".into()).unwrap();
    w.add_metadata("adapter.type", &"lora".into()).unwrap();
    w.add_metadata("general.base_model.0.name", &"SmolLM2 135M Instruct".into())
        .unwrap();
    w.add_metadata("adapter.lora.alpha", &MetadataValue::F32(16.0))
        .unwrap();
    let shapes: [(&str, u64, u64); 2] = [
        ("blk.0.attn_q.weight", 576, 8),
        ("blk.0.attn_v.weight", 576, 4),
    ];
    for (base, width, r) in shapes {
        w.add_tensor(&format!("{base}.lora_a"), GgmlType::F16, &[width, r])
            .unwrap();
        w.add_tensor(&format!("{base}.lora_b"), GgmlType::F16, &[r, width])
            .unwrap();
    }
    let mut s = w.start().unwrap();
    while let Some((name, _, dims)) = s
        .next_tensor()
        .map(|(n, t, d)| (n.to_string(), t, d.to_vec()))
    {
        s.write_tensor(&name, &vec![0u8; 2 * (dims[0] * dims[1]) as usize])
            .unwrap();
    }
    s.finish().unwrap();
    let v = inspect_json(&path);
    assert_eq!(v["kind"], "adapter");
    assert_eq!(v["architecture"], "llama");
    assert_eq!(
        v["adapter"],
        json!({"adapter_type": "lora", "alpha": 16.0, "rank": [4, 8],
               "targets": ["blk.0.attn_q.weight", "blk.0.attn_v.weight"],
               "base": "SmolLM2 135M Instruct"})
    );
    assert_eq!(v["totals"]["n_elements"], 2 * 576 * 8 + 2 * 576 * 4);
}

#[test]
fn real_peft_adapters_match_their_reference_card() {
    // ../shared/data/README.md: chef r=16 alpha=32 (s=2) on 7 modules x 30
    // layers, 4,884,480 params, bf16; pirate r=8 alpha=8 rsLoRA (s=8/sqrt(8)) on
    // q,v, 460,800 params, f32.
    let data = common::shared_data().join("smollm2-adapters");
    let chef = inspect_json(&data.join("chef/adapter"));
    assert_eq!(
        (
            chef["parameters"].as_u64(),
            chef["modules"].as_array().unwrap().len()
        ),
        (Some(4_884_480), 210)
    );
    assert_eq!(chef["dtypes"], json!(["BF16"]));
    assert!(chef["modules"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["scale"] == 2.0 && m["rank"] == 16));
    let pirate = inspect_json(&data.join("pirate/adapter"));
    assert_eq!(
        (
            pirate["parameters"].as_u64(),
            pirate["modules"].as_array().unwrap().len()
        ),
        (Some(460_800), 60)
    );
    assert_eq!(pirate["targets"], json!(["q_proj", "v_proj"]));
    for m in pirate["modules"].as_array().unwrap() {
        assert!(
            (m["scale"].as_f64().unwrap() - 2.828427).abs() < 1e-6,
            "{m}"
        );
    }
    // tiny-llama rslora_patterns: layer-1 v_proj r=4 s=8; o_proj s=4/sqrt(8).
    let rs = inspect_json(&common::shared_data().join("tiny-llama/rslora_patterns"));
    let m: HashMap<&str, f64> = rs["modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["path"].as_str().unwrap(), m["scale"].as_f64().unwrap()))
        .collect();
    assert_eq!(m["model.layers.1.self_attn.v_proj"], 8.0);
    assert!((m["model.layers.0.self_attn.o_proj"] - 4.0 / 8f64.sqrt()).abs() < 1e-12);
    assert!((m["model.layers.2.self_attn.q_proj"] - 5.656854).abs() < 1e-6);
    let dora = inspect_json(&common::shared_data().join("tiny-llama/dora"));
    assert!(dora["modules"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["dora"] == true));
}

//! An HF folder's tokenizer.json becomes the same tokenizer.ggml.* metadata
//! that llama.cpp wrote for SmolLM2: we rebuild SmolLM2's tokenizer.json from
//! its GGUF, put it beside tiny-llama's weights, convert, and compare.

use crate::common;

use lorafold_converter::convert::{convert, ConvertOptions};
use lorafold_converter::round::quant::QuantPolicy;
use lorafold_runtime::gguf::{GgufFile, MetadataValue};
use serde_json::{json, Map};

#[test]
fn smollm2_tokenizer_round_trips_through_tokenizer_json() {
    let smol = GgufFile::open(common::smollm2()).unwrap();
    let tokens = smol.get_strings("tokenizer.ggml.tokens").unwrap();
    let types: Vec<i64> = smol
        .get("tokenizer.ggml.token_type")
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as i64)
        .collect();
    let merges = smol.get_strings("tokenizer.ggml.merges").unwrap();
    let template = smol
        .get_str("tokenizer.chat_template")
        .unwrap()
        .into_owned();

    let mut vocab = Map::new();
    let mut added = Vec::new();
    for (id, t) in tokens.iter().enumerate() {
        vocab.insert(t.to_string(), id.into());
        if types[id] == 3 {
            added.push(json!({"id": id, "content": t, "special": true}));
        }
    }
    let tokenizer = json!({
        "version": "1.0",
        "added_tokens": added,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
        "model": {"type": "BPE", "vocab": vocab, "merges": merges, "byte_fallback": false},
    });
    let dir = tempfile::tempdir().unwrap();
    // tiny-llama's weights, the embedding and head grown to SmolLM2's
    // vocabulary: every token id must have an embedding row.
    let tiny = common::shared_data().join("tiny-llama/base");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny.join("config.json")).unwrap()).unwrap();
    config["vocab_size"] = tokens.len().into();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let bytes = std::fs::read(tiny.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| {
            let mut shape = v.shape().to_vec();
            let mut data = v.data().to_vec();
            if k == "model.embed_tokens.weight" || k == "lm_head.weight" {
                data.resize(data.len() / shape[0] * tokens.len(), 0);
                shape[0] = tokens.len();
            }
            (k, shape, data)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(k, s, d)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d);
            (k.clone(), view.unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let tc = json!({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
                    "unk_token": "<|endoftext|>", "add_bos_token": false, "chat_template": template});
    std::fs::write(dir.path().join("tokenizer_config.json"), tc.to_string()).unwrap();

    let out = dir.path().join("out.gguf");
    let opts = ConvertOptions::new(
        dir.path().to_path_buf(),
        None,
        QuantPolicy::parse("f16", &[]).unwrap(),
        out.clone(),
    );
    convert(&opts, &|_| {}).unwrap();
    let ours = GgufFile::open(&out).unwrap();
    for key in [
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.unknown_token_id",
        "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.add_bos_token",
        "tokenizer.chat_template",
    ] {
        assert_eq!(ours.get(key), smol.get(key), "{key}");
    }
    assert_eq!(
        ours.get("tokenizer.ggml.pre"),
        Some(MetadataValue::from("smollm"))
    );
    assert_eq!(ours.get_u64("llama.vocab_size"), Some(tokens.len() as u64));
}

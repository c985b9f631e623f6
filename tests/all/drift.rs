//! Drift measures on real models: a model against itself is exactly 0, a
//! different one positive and finite, and perplexity equals one computed by
//! hand from PyTorch's logits for the tiny model.

use crate::common;

use candle_core::Device;
use lorafold_converter::convert::{convert, ConvertOptions};
use lorafold_converter::round::quant::QuantPolicy;
use lorafold_runtime::cpu::KvType;
use lorafold_runtime::measure::DriftAccumulator;
use lorafold_runtime::model::{Model, SessionOptions};
use safetensors::SafeTensors;
use serde_json::Value;

fn logits(model: &Model, ids: &[u32]) -> Vec<Vec<f32>> {
    let mut s = model
        .session_with(SessionOptions {
            kv: KvType::F32,
            ..SessionOptions::new(ids.len())
        })
        .unwrap();
    let l = s.logits(ids, true).unwrap();
    l.chunks_exact(model.config.vocab)
        .map(<[f32]>::to_vec)
        .collect()
}

#[test]
fn tiny_llama_drift_and_perplexity() {
    let tiny = common::shared_data().join("tiny-llama");
    let dir = tempfile::tempdir().unwrap();
    let (base, merged) = (
        dir.path().join("base.gguf"),
        dir.path().join("lora_all.gguf"),
    );
    convert(
        &ConvertOptions::new(
            tiny.join("base"),
            None,
            QuantPolicy::parse("f32", &[]).unwrap(),
            &base,
        ),
        &|_| {},
    )
    .unwrap();
    convert(
        &ConvertOptions::new(
            tiny.join("base"),
            Some(tiny.join("lora_all")),
            QuantPolicy::parse("f32", &[]).unwrap(),
            &merged,
        ),
        &|_| {},
    )
    .unwrap();
    let base = Model::load(&base, &Device::Cpu).unwrap();
    let merged = Model::load(&merged, &Device::Cpu).unwrap();
    let tokens: Value =
        serde_json::from_str(&std::fs::read_to_string(tiny.join("tokens.json")).unwrap()).unwrap();
    let seqs: Vec<Vec<u32>> = tokens["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            s.as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_u64().unwrap() as u32)
                .collect()
        })
        .collect();
    let refs = std::fs::read(tiny.join("lora_all/logits.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&refs).unwrap();
    let torch_base: Vec<f32> = st
        .tensor("base")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();

    let (mut same, mut diff) = (DriftAccumulator::default(), DriftAccumulator::default());
    let mut nll_torch = 0f64;
    let mut n = 0;
    for (si, ids) in seqs.iter().enumerate() {
        let b = logits(&base, ids);
        let m = logits(&merged, ids);
        for i in 0..ids.len() {
            let next = ids.get(i + 1).copied();
            same.add(&b[i], &b[i], next);
            diff.add(&b[i], &m[i], next);
            if let Some(t) = next {
                // By hand from PyTorch's logits [4, 12, 384]: -log softmax at the next token.
                let row = &torch_base[(si * 12 + i) * 384..(si * 12 + i + 1) * 384];
                let max = row.iter().fold(f64::MIN, |a, &x| a.max(x as f64));
                let lse = max
                    + row
                        .iter()
                        .map(|&x| (x as f64 - max).exp())
                        .sum::<f64>()
                        .ln();
                nll_torch += lse - row[t as usize] as f64;
                n += 1;
            }
        }
    }
    let s = same.report();
    assert_eq!(
        (s.kl_mean, s.kl_max, s.top1_agreement, s.rms_delta_p_top),
        (0.0, 0.0, 1.0, 0.0)
    );
    let d = diff.report();
    assert!(
        d.kl_mean > 0.0 && d.kl_mean.is_finite() && d.kl_max.is_finite(),
        "{d:?}"
    );
    assert_eq!(d.tokens, 48);
    // Our f32 logits agree with PyTorch's within 1e-4, so the perplexities agree closely.
    let ppl_torch = (nll_torch / n as f64).exp();
    let ours = s.perplexity.unwrap();
    assert!(
        (ours - ppl_torch).abs() / ppl_torch < 1e-5,
        "ours {ours} vs by hand {ppl_torch}"
    );
}

#[test]
fn smollm2_pirate_paths_drift_within_budget() {
    // Issue 6's bars: f32 merged vs f32 base + adapter: mean KL < 1e-6;
    // q8_0 merged and q8_0 base + adapter: mean KL < 1e-2 against f32 merged.
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let adapter = common::repo().join("examples/adapters/pirate");
    let mut o = ConvertOptions::new(
        common::smollm2(),
        Some(adapter.clone()),
        QuantPolicy::parse("f32", &[]).unwrap(),
        p("merged-f32.gguf"),
    );
    o.base_output = Some(p("base-f32.gguf"));
    o.adapter_output = Some(p("adapter-f32.gguf"));
    o.adapter_type = lorafold_runtime::gguf::GgmlType::F32;
    convert(&o, &|_| {}).unwrap();
    let mut o = ConvertOptions::new(
        common::smollm2(),
        Some(adapter.clone()),
        QuantPolicy::parse("q8_0", &[]).unwrap(),
        p("merged-q8_0.gguf"),
    );
    o.base_output = Some(p("base-q8_0.gguf"));
    o.adapter_output = Some(p("adapter-f16.gguf"));
    convert(&o, &|_| {}).unwrap();
    let load = |m: &str, a: Option<&str>| {
        let mut model = Model::load(p(m), &Device::Cpu).unwrap();
        if let Some(a) = a {
            model
                .attach(
                    &lorafold_runtime::lora::LoraAdapter::load(p(a)).unwrap(),
                    1.0,
                )
                .unwrap();
        }
        model
    };
    let reference = load("merged-f32.gguf", None);
    let cands = [
        (
            "f32 + adapter",
            load("base-f32.gguf", Some("adapter-f32.gguf")),
            1e-6,
        ),
        ("q8_0 merged", load("merged-q8_0.gguf", None), 1e-2),
        (
            "q8_0 + adapter",
            load("base-q8_0.gguf", Some("adapter-f16.gguf")),
            1e-2,
        ),
    ];
    let tok = lorafold_runtime::tokenizer::Tokenizer::from_gguf(reference.file()).unwrap();
    let text = std::fs::read_to_string(adapter.join("eval.txt")).unwrap();
    for (name, model, bound) in &cands {
        let mut acc = DriftAccumulator::default();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let ids = tok.encode(line).unwrap();
            let (r, c) = (logits(&reference, &ids), logits(model, &ids));
            for i in 0..ids.len() {
                acc.add(&r[i], &c[i], ids.get(i + 1).copied());
            }
        }
        let d = acc.report();
        eprintln!(
            "{name}: mean KL {:e}, top-1 {:.3}, ppl {:.4} vs {:.4}",
            d.kl_mean,
            d.top1_agreement,
            d.perplexity.unwrap(),
            d.perplexity_reference.unwrap()
        );
        assert!(d.kl_mean < *bound, "{name}: mean KL {}", d.kl_mean);
        // reference.json: merged fp32 eval loss 2.289702 nats/token (PyTorch).
        assert!((d.perplexity_reference.unwrap().ln() - 2.289702).abs() < 1e-3);
    }
}

//! Converter throughput in MB/s of f32 weights: the f64 merge of one module,
//! quantization per type, and whole SmolLM2 conversions.
//!
//! Needs the model (`scripts/fetch-smollm2.sh`) and ../shared/data.

use std::path::PathBuf;
use std::process::Command;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use lorafold_converter::convert::{convert, ConvertOptions};
use lorafold_converter::merge::{apply, LoraEdit, TensorEdit};
use lorafold_converter::read::peft::PeftAdapter;
use lorafold_converter::round::quant::{quantize, QuantPolicy};
use lorafold_runtime::gguf::GgmlType;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn smollm2() -> PathBuf {
    let out = Command::new(root().join("scripts/fetch-smollm2.sh"))
        .output()
        .expect("fetch-smollm2.sh");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

fn adapters() -> PathBuf {
    std::env::var_os("LORAFOLD_SHARED_DATA")
        .map_or(root().join("../shared/data"), PathBuf::from)
        .join("smollm2-adapters")
}

fn bench(c: &mut Criterion) {
    // One chef module: ffn_down, 576 x 1536, rank 16, bf16 A and B.
    let chef = PeftAdapter::open(adapters().join("chef/adapter")).unwrap();
    let module = chef
        .modules
        .iter()
        .find(|m| m.path == "model.layers.10.mlp.down_proj")
        .unwrap()
        .clone();
    let (rows, cols) = (module.out_features as usize, module.in_features as usize);
    let edit = TensorEdit {
        lora: Some(LoraEdit {
            module,
            permute_heads: None,
        }),
        ..TensorEdit::default()
    };
    let w0: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 7919) % 1000) as f32 * 1e-4)
        .collect();
    let mut g = c.benchmark_group("merge");
    g.throughput(Throughput::Bytes((rows * cols * 4) as u64));
    g.bench_function("rank16_576x1536", |b| {
        b.iter(|| apply("t", &edit, w0.clone(), cols, &chef).unwrap())
    });
    g.finish();

    let n = 1536 * 1536;
    let x: Vec<f32> = (0..n)
        .map(|i| (((i * 2654435761usize) % 2000) as f32 - 1000.0) * 5e-5)
        .collect();
    let mut g = c.benchmark_group("quantize_1536x1536");
    g.throughput(Throughput::Bytes((n * 4) as u64));
    for t in [
        GgmlType::F16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ] {
        g.bench_function(t.name(), |b| b.iter(|| quantize(t, &x, "x").unwrap()));
    }
    g.finish();

    let base = smollm2();
    let dir = tempfile::tempdir().unwrap();
    let mut g = c.benchmark_group("convert_smollm2");
    g.sample_size(10);
    // 134,515,008 weights as f32.
    g.throughput(Throughput::Bytes(134_515_008 * 4));
    for (adapter, quant) in [
        ("pirate", "q8_0"),
        ("pirate", "q4_0"),
        ("chef", "q4_0"),
        ("chef", "q4_k_m"),
    ] {
        let opts = ConvertOptions::new(
            base.clone(),
            Some(adapters().join(adapter).join("adapter")),
            QuantPolicy::parse(quant, &[]).unwrap(),
            dir.path().join("out.gguf"),
        );
        g.bench_function(format!("{adapter}_{quant}"), |b| {
            b.iter(|| convert(&opts, &|_| {}).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

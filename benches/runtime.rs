//! Runtime costs: a quantized linear layer with and without an attached
//! adapter (rank 8, 16, 64), candle's repacked Q8_0 against the plain
//! k_quants kernel over the same blocks, and one SmolLM2 decode step merged
//! against base + adapter.
//!
//! Needs the model (`scripts/fetch-smollm2.sh`).

use std::path::PathBuf;
use std::process::Command;

use candle_core::quantized::{k_quants, GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use lorafold_converter::convert::{convert, ConvertOptions};
use lorafold_converter::round::quant::QuantPolicy;
use lorafold_runtime::lora::LoraAdapter;
use lorafold_runtime::model::Model;

fn smollm2() -> PathBuf {
    let out = Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/fetch-smollm2.sh"
    ))
    .output()
    .expect("fetch-smollm2.sh");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    // SmolLM2's q_proj shape, one decode token.
    let (n_in, n_out) = (576, 576);
    let w = Tensor::randn(0f32, 0.05, (n_out, n_in), &dev).unwrap();
    let x = Tensor::randn(0f32, 1.0, (1, n_in), &dev).unwrap();
    let mut g = c.benchmark_group("linear_576_q4_0");
    let mm = QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q4_0).unwrap()).unwrap();
    g.bench_function("no_adapter", |b| b.iter(|| mm.forward(&x).unwrap()));
    for r in [8usize, 16, 64] {
        let a_t = Tensor::randn(0f32, 0.05, (n_in, r), &dev).unwrap();
        let b_t = Tensor::randn(0f32, 0.05, (r, n_out), &dev).unwrap();
        g.bench_function(format!("rank_{r}"), |b| {
            b.iter(|| {
                let y = mm.forward(&x).unwrap();
                (y + x
                    .matmul(&a_t)
                    .unwrap()
                    .matmul(&b_t)
                    .unwrap()
                    .affine(2.0, 0.0)
                    .unwrap())
                .unwrap()
            })
        });
    }
    g.finish();

    // What candle's repack cache buys for Q8_0: its packed kernel against the
    // plain k_quants mat-vec over the same blocks.
    let (k, n) = (1536, 1536);
    let w = Tensor::randn(0f32, 0.05, (n, k), &dev).unwrap();
    let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
    let bytes = q.data().unwrap().into_owned();
    let blocks: Vec<k_quants::BlockQ8_0> = bytes
        .chunks_exact(34)
        .map(|c| unsafe { std::ptr::read_unaligned(c.as_ptr() as *const k_quants::BlockQ8_0) })
        .collect();
    let x = Tensor::randn(0f32, 1.0, (1, k), &dev).unwrap();
    let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mm = QMatMul::from_qtensor(q).unwrap();
    let mut g = c.benchmark_group("q8_0_matvec_1536");
    g.bench_function("candle_repacked", |b| b.iter(|| mm.forward(&x).unwrap()));
    g.bench_function("k_quants_plain", |b| {
        let mut dst = vec![0f32; n];
        b.iter(|| k_quants::matmul((1, k, n), &xs, &blocks, &mut dst).unwrap())
    });
    g.finish();

    let dir = tempfile::tempdir().unwrap();
    let adapter = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/adapters/pirate"
    ));
    let mut opts = ConvertOptions::new(
        smollm2(),
        Some(adapter),
        QuantPolicy::parse("q4_0", &[]).unwrap(),
        dir.path().join("merged.gguf"),
    );
    opts.base_output = Some(dir.path().join("base.gguf"));
    opts.adapter_output = Some(dir.path().join("adapter.gguf"));
    convert(&opts, &|_| {}).unwrap();
    let merged = Model::load(dir.path().join("merged.gguf"), &dev).unwrap();
    let mut separate = Model::load(dir.path().join("base.gguf"), &dev).unwrap();
    separate
        .attach(
            &LoraAdapter::load(dir.path().join("adapter.gguf")).unwrap(),
            1.0,
        )
        .unwrap();
    let prompt: Vec<u32> = (0..64).map(|i| 100 + i * 37).collect();
    let mut g = c.benchmark_group("smollm2_decode_step_q4_0");
    g.sample_size(30);
    for (name, model) in [("merged", &merged), ("base_plus_adapter", &separate)] {
        let mut s = model.session(512).unwrap();
        s.forward(&prompt, false).unwrap();
        g.bench_function(name, |b| {
            b.iter(|| {
                // Keep the context between 64 and 320 tokens.
                if s.position() > 320 {
                    s.reset();
                    s.forward(&prompt, false).unwrap();
                }
                s.forward(&[198], false).unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

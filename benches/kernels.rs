//! candle's CPU quantized mat-vec per ggml type: one decode-step-shaped
//! product (x [1, 1536] times W [1536, 1536]), reported as weight bytes/s.
//!
//! Run it with and without `RUSTFLAGS="-C target-cpu=native"` to see which
//! kernels the build flags change (README, "Build flags").

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use lorafold_runtime::q4::Format;

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    let n = 1536;
    let w = Tensor::randn(0f32, 0.05, (n, n), &dev).unwrap();
    let x = Tensor::randn(0f32, 1.0, (1, n), &dev).unwrap();
    let mut g = c.benchmark_group("matvec_1536");
    g.sample_size(30);
    for dtype in [
        GgmlDType::F32,
        GgmlDType::F16,
        GgmlDType::Q8_0,
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q4K,
        GgmlDType::Q6K,
    ] {
        let q = QTensor::quantize(&w, dtype).unwrap();
        g.throughput(Throughput::Bytes(q.storage_size_in_bytes() as u64));
        let mm = QMatMul::from_qtensor(q).unwrap();
        g.bench_function(format!("{dtype:?}"), |b| b.iter(|| mm.forward(&x).unwrap()));
        let ours = match dtype {
            GgmlDType::Q4_0 => Some(Format::Q4_0),
            GgmlDType::Q4_1 => Some(Format::Q4_1),
            _ => None,
        };
        if let Some(format) = ours {
            // Ours (lorafold_runtime::q4): ggml's rounding, AVX2 picked at run time.
            let bytes = mm_bytes(&w, dtype);
            let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let mut dst = vec![0f32; n];
            g.bench_function(format!("lorafold_{format:?}"), |b| {
                b.iter(|| {
                    lorafold_runtime::q4::matmul_4bit(format, (1, n, n), &xs, &bytes, &mut dst)
                        .unwrap()
                })
            });
        }
    }
    g.finish();
}

fn mm_bytes(w: &Tensor, dtype: GgmlDType) -> Vec<u8> {
    QTensor::quantize(w, dtype)
        .unwrap()
        .data()
        .unwrap()
        .into_owned()
}

criterion_group!(benches, bench);
criterion_main!(benches);

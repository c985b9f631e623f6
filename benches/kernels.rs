//! Our kernels (lorafold-kernels, the CPU engine's) beside candle's CPU
//! quantized matmul for the same product, per ggml type: a decode-shaped
//! mat-vec (m = 1) and a prefill-shaped mat-mat (m = 128) at k x n = 576 x 1536
//! (SmolLM2's FFN) and 2048 x 8192 (a 1B-class FFN, out of cache).
//! One thread each: `RAYON_NUM_THREADS=1 cargo bench --bench kernels`.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use lorafold_kernels::{gemm_all, ActBuf, Isa, WType, Weights};

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    let isa = Isa::detect();
    for (k, n) in [(576usize, 1536usize), (2048, 8192)] {
        let w = Tensor::randn(0f32, 0.05, (n, k), &dev).unwrap();
        for m in [1usize, 128] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let mut g = c.benchmark_group(format!("{k}x{n}_m{m}"));
            g.sample_size(10);
            g.throughput(Throughput::Elements((m * k * n) as u64));
            for (dtype, wtype) in [
                (GgmlDType::F32, WType::F32),
                (GgmlDType::F16, WType::F16),
                (GgmlDType::Q8_0, WType::Q8_0),
                (GgmlDType::Q4_0, WType::Q4_0),
                (GgmlDType::Q4_1, WType::Q4_1),
                (GgmlDType::Q5_0, WType::Q5_0),
                (GgmlDType::Q5_1, WType::Q5_1),
                (GgmlDType::Q2K, WType::Q2K),
                (GgmlDType::Q3K, WType::Q3K),
                (GgmlDType::Q4K, WType::Q4K),
                (GgmlDType::Q5K, WType::Q5K),
                (GgmlDType::Q6K, WType::Q6K),
            ] {
                if k % wtype.block_len() != 0 {
                    continue;
                }
                let q = QTensor::quantize(&w, dtype).unwrap();
                let bytes = q.data().unwrap().into_owned();
                let mm = QMatMul::from_qtensor(q).unwrap();
                g.bench_function(format!("candle/{wtype:?}"), |b| {
                    b.iter(|| mm.forward(&x).unwrap())
                });
                let weights = Weights::new(wtype, &bytes, k, n).unwrap();
                let mut acts = ActBuf::new(wtype.act_type(), k, m);
                let mut out = vec![0f32; m * n];
                g.bench_function(format!("lorafold/{wtype:?}"), |b| {
                    b.iter(|| {
                        acts.quantize(&xs);
                        gemm_all(&weights, &acts, &mut out, isa)
                    })
                });
            }
            g.finish();
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);

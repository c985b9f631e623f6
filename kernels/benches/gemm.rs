//! lorafold-kernels' products per weight type, on one thread: a decode step
//! (m = 1, reported as weight bytes/s) and a prefill chunk (m = 128,
//! reported as multiply-adds/s), at 576x1536 and 2048x8192 (k x n), with the
//! AVX2 kernels (when the CPU has them) and the scalar ones.
//!
//! `LORAFOLD_BENCH_TYPES=F16,Q4_0,Q4K cargo bench -p lorafold-kernels --bench gemm`
//! runs only those types (names as `WType`'s Debug, any case); the default is
//! every type. Criterion's own filter picks among the rest, e.g.
//! `-- 'avx2'` or `-- 'm1/Q8_0'`. The scalar m = 128 products at 2048x8192
//! take seconds each.

use std::mem::offset_of;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::{bf16, f16};
use lorafold_kernels::blocks::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8_0,
};
use lorafold_kernels::{gemm_all, ActBuf, Isa, WType, Weights};

/// (k, n): a small model's attention/MLP shape and a 1-2B model's MLP.
const SHAPES: [(usize, usize); 2] = [(576, 1536), (2048, 8192)];
/// Activation rows: one decode step, one prefill chunk.
const ROWS: [usize; 2] = [1, 128];

/// xorshift64*, deterministic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [-1, 1).
    fn f(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// Byte offsets of the f16 scales (and minimums) in one block of `t`.
fn f16_fields(t: WType) -> Vec<usize> {
    match t {
        WType::Q4_0 => vec![offset_of!(BlockQ4_0, d)],
        WType::Q4_1 => vec![offset_of!(BlockQ4_1, d), offset_of!(BlockQ4_1, m)],
        WType::Q5_0 => vec![offset_of!(BlockQ5_0, d)],
        WType::Q5_1 => vec![offset_of!(BlockQ5_1, d), offset_of!(BlockQ5_1, m)],
        WType::Q8_0 => vec![offset_of!(BlockQ8_0, d)],
        WType::Q2K => vec![offset_of!(BlockQ2K, d), offset_of!(BlockQ2K, dmin)],
        WType::Q3K => vec![offset_of!(BlockQ3K, d)],
        WType::Q4K => vec![offset_of!(BlockQ4K, d), offset_of!(BlockQ4K, dmin)],
        WType::Q5K => vec![offset_of!(BlockQ5K, d), offset_of!(BlockQ5K, dmin)],
        WType::Q6K => vec![offset_of!(BlockQ6K, d)],
        WType::F32 | WType::F16 | WType::BF16 => vec![],
    }
}

/// `n` rows of `k` weights of type `t`: random codes with f16 scales in
/// ±[0.001, 0.02], or random floats of magnitude up to 0.05, so that no
/// product meets a NaN, an infinity or a subnormal.
fn weights(t: WType, k: usize, n: usize, rng: &mut Rng) -> Vec<u8> {
    let count = n * k / t.block_len();
    match t {
        WType::F32 => (0..count)
            .flat_map(|_| (0.05 * rng.f()).to_le_bytes())
            .collect(),
        WType::F16 => (0..count)
            .flat_map(|_| f16::from_f32(0.05 * rng.f()).to_le_bytes())
            .collect(),
        WType::BF16 => (0..count)
            .flat_map(|_| bf16::from_f32(0.05 * rng.f()).to_le_bytes())
            .collect(),
        _ => {
            let bb = t.block_bytes();
            let fields = f16_fields(t);
            let mut v: Vec<u8> = (0..count * bb).map(|_| rng.next() as u8).collect();
            for blk in v.chunks_exact_mut(bb) {
                for &o in &fields {
                    let d = rng.f().signum() * (0.001 + 0.019 * rng.f().abs());
                    blk[o..o + 2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
                }
            }
            v
        }
    }
}

/// The types named in `LORAFOLD_BENCH_TYPES` (comma-separated), or all.
fn types() -> Vec<WType> {
    let Ok(list) = std::env::var("LORAFOLD_BENCH_TYPES") else {
        return WType::ALL.to_vec();
    };
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|name| {
            WType::ALL
                .into_iter()
                .find(|t| format!("{t:?}").eq_ignore_ascii_case(name))
                .unwrap_or_else(|| {
                    panic!(
                        "LORAFOLD_BENCH_TYPES: unknown type {name:?}; known: {:?}",
                        WType::ALL
                    )
                })
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let types = types();
    // Every tier this CPU has, fastest first, down to the scalar reference.
    let mut isas: Vec<(&str, Isa)> = Isa::detect()
        .tiers()
        .into_iter()
        .map(|i| (i.name(), i))
        .collect();
    isas.reverse();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for (k, n) in SHAPES {
        let ws: Vec<(WType, Vec<u8>)> = types
            .iter()
            .map(|&t| (t, weights(t, k, n, &mut rng)))
            .collect();
        for m in ROWS {
            let x: Vec<f32> = (0..m * k).map(|_| rng.f()).collect();
            let mut out = vec![0f32; m * n];
            let mut g = c.benchmark_group(format!("gemm_{k}x{n}_m{m}"));
            g.sample_size(10);
            for (t, wb) in &ws {
                let w = Weights::new(*t, wb, k, n).unwrap();
                let mut a = ActBuf::new(t.act_type(), k, m);
                a.quantize(&x);
                g.throughput(if m == 1 {
                    Throughput::Bytes(wb.len() as u64)
                } else {
                    Throughput::Elements((m * n * k) as u64)
                });
                for &(name, isa) in &isas {
                    g.bench_function(BenchmarkId::new(format!("{t:?}"), name), |b| {
                        b.iter(|| {
                            gemm_all(&w, &a, &mut out, isa);
                            std::hint::black_box(&mut out);
                        })
                    });
                }
            }
            g.finish();
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);

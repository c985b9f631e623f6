//! The CPU engine against candle's path (an independent forward pass over the
//! same file) on SmolLM2 and on a 256-wide synthetic llama at every type the
//! converter writes; and no heap allocation per decoded token.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use candle_core::Device;
use common::synthetic::{self, Shape};
use lorafold_runtime::cpu::KvType;
use lorafold_runtime::model::{Backend, Model, SessionOptions};

struct Counting;

static ALLOCS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator, counting calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The allocation count is process-wide, so the tests here take turns.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static M: std::sync::Mutex<()> = std::sync::Mutex::new(());
    M.lock().unwrap_or_else(|p| p.into_inner())
}

/// Logits of every position of `ids`, from a fresh session with an f32 cache.
fn all_logits(model: &Model, ids: &[u32]) -> Vec<f32> {
    let mut s = model
        .session_with(SessionOptions {
            max_tokens: ids.len(),
            threads: Some(2),
            kv: KvType::F32,
            isa: None,
        })
        .unwrap();
    s.logits(ids, true).unwrap().to_vec()
}

fn log_softmax(x: &[f32]) -> Vec<f64> {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let lse = x.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max;
    x.iter().map(|&v| v as f64 - lse).collect()
}

/// (largest per-position KL(a || b), positions whose argmax differs).
fn compare(a: &[f32], b: &[f32], vocab: usize) -> (f64, usize) {
    let mut worst = 0f64;
    let mut flips = 0;
    for (ra, rb) in a.chunks_exact(vocab).zip(b.chunks_exact(vocab)) {
        let (la, lb) = (log_softmax(ra), log_softmax(rb));
        let kl: f64 = la.iter().zip(&lb).map(|(x, y)| x.exp() * (x - y)).sum();
        worst = worst.max(kl);
        let arg = |r: &[f32]| {
            r.iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |m, (i, &v)| if v > m.1 { (i, v) } else { m },
                )
                .0
        };
        flips += (arg(ra) != arg(rb)) as usize;
    }
    (worst, flips)
}

fn prompt(vocab: usize, n: usize) -> Vec<u32> {
    let mut rng = common::Rng::new(5);
    (0..n).map(|_| rng.below(vocab as u64) as u32).collect()
}

fn engine_vs_candle(path: &Path, ids: &[u32], max_kl: f64) {
    let engine = Model::load_with(path, &Device::Cpu, Backend::Engine).unwrap();
    let candle = Model::load_with(path, &Device::Cpu, Backend::Candle).unwrap();
    let vocab = engine.config.vocab;
    let (a, b) = (all_logits(&engine, ids), all_logits(&candle, ids));
    assert_eq!(a.len(), ids.len() * vocab);
    let (kl, flips) = compare(&b, &a, vocab);
    assert!(
        kl < max_kl && flips <= ids.len() / 10,
        "{}: worst KL {kl:e}, {flips} argmax flips of {}",
        path.display(),
        ids.len()
    );
}

fn synthetic_dir() -> &'static (PathBuf, PathBuf) {
    static D: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    D.get_or_init(|| {
        let dir = common::shared_scratch("engine");
        let base = dir.join("f32.gguf");
        synthetic::write_f32(&base, Shape::SMALL_256, 11);
        (dir, base)
    })
}

#[test]
fn engine_equals_candle_at_every_type() {
    let _turn = serial();
    let (dir, base) = synthetic_dir();
    let ids = prompt(Shape::SMALL_256.vocab, 24);
    for quant in [
        "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k",
        "q5_k", "q6_k",
    ] {
        let path = synthetic::quantize(base, quant, &dir.join(format!("as-{quant}.gguf")));
        // Float weights leave only summation order; quantized ones also the
        // activations' rounding (which candle does in its own order).
        let bound = if quant.starts_with('f') || quant == "bf16" {
            1e-6
        } else {
            2e-3
        };
        engine_vs_candle(&path, &ids, bound);
    }
}

#[test]
fn decoding_allocates_nothing() {
    let _turn = serial();
    let (dir, base) = synthetic_dir();
    let path = synthetic::quantize(base, "q4_0", &dir.join("alloc-q4_0.gguf"));
    let model = Model::load(&path, &Device::Cpu).unwrap();
    let mut s = model
        .session_with(SessionOptions {
            max_tokens: 64,
            threads: Some(2),
            kv: KvType::F16,
            isa: None,
        })
        .unwrap();
    s.logits(&prompt(Shape::SMALL_256.vocab, 16), false)
        .unwrap();
    s.logits(&[3], false).unwrap();
    let before = ALLOCS.load(Ordering::SeqCst);
    for t in 0..16u32 {
        s.logits(&[t * 7 % 500], false).unwrap();
    }
    let during = ALLOCS.load(Ordering::SeqCst) - before;
    assert_eq!(during, 0, "{during} heap allocations in 16 decode steps");
}

/// Prefill's attention (two products per KV head and block of 64 query
/// rows, causal mask inside the block) against decoding one position at a
/// time, which attends by dot products: over three blocks, from position 0
/// and after earlier positions, with both cache types.
#[test]
fn prefill_attention_equals_decoding_across_blocks() {
    let _turn = serial();
    let (_, base) = synthetic_dir();
    let model = Model::load_with(base, &Device::Cpu, Backend::Engine).unwrap();
    let vocab = model.config.vocab;
    let ids = prompt(vocab, 170);
    for kv in [KvType::F32, KvType::F16] {
        let session = || {
            model
                .session_with(SessionOptions {
                    max_tokens: ids.len(),
                    threads: Some(2),
                    kv,
                    isa: None,
                })
                .unwrap()
        };
        let mut decoded = Vec::new();
        let mut s = session();
        for &id in &ids {
            decoded.extend_from_slice(s.logits(&[id], false).unwrap());
        }
        let mut s = session();
        let mut prefilled = s.logits(&ids[..100], true).unwrap().to_vec();
        prefilled.extend_from_slice(s.logits(&ids[100..], true).unwrap());
        let (kl, flips) = compare(&decoded, &prefilled, vocab);
        assert!(
            kl < 1e-6 && flips == 0,
            "{kv:?}: worst KL {kl:e}, {flips} argmax flips"
        );
    }
}

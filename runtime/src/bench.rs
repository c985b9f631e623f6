//! The latency protocol `lorafold bench` and the demo run: load, time to
//! first token, prefill and decode tokens/s over repetitions, and the
//! process's memory.

use std::time::Instant;

use serde::Serialize;

use crate::cpu::KvType;
use crate::measure::argmax;
use crate::model::{Model, RuntimeError, SessionOptions};
use crate::path_spec::PathSpec;

/// Resident set size of this process now (VmRSS), where the OS reports it.
pub fn rss_bytes() -> Option<u64> {
    status_bytes("VmRSS:")
}

/// Peak resident set size of this process (VmHWM), where the OS reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    status_bytes("VmHWM:")
}

fn status_bytes(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Mean and standard deviation.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Stat {
    /// Mean.
    pub mean: f64,
    /// Sample standard deviation.
    pub sd: f64,
}

impl Stat {
    fn of(v: &[f64]) -> Stat {
        let n = v.len().max(1) as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = if v.len() > 1 {
            v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
        } else {
            0.0
        };
        Stat {
            mean,
            sd: var.sqrt(),
        }
    }
}

/// One path's measurements.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    /// The path spec.
    pub path: String,
    /// Load time, ms.
    pub load_ms: Stat,
    /// Time to first token (prefill + first sample), ms.
    pub ttft_ms: Stat,
    /// Prefill tokens/s.
    pub prefill_tps: Stat,
    /// Decode tokens/s.
    pub decode_tps: Stat,
    /// Resident memory at the end of the last run, model loaded, bytes.
    pub rss_bytes: u64,
    /// Peak resident memory of the process so far, bytes.
    pub peak_rss_bytes: u64,
    /// Bytes of model files mapped.
    pub mapped_bytes: u64,
}

/// Time `reps` runs of prefill (`prompt` tokens) and decode (`n` tokens) on `spec`.
pub fn bench_path(
    spec: &PathSpec,
    dev: &candle_core::Device,
    prompt: usize,
    n: usize,
    reps: usize,
    kv: KvType,
) -> Result<BenchRow, RuntimeError> {
    let (mut load, mut ttft, mut pre, mut dec) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut mapped, mut rss) = (0, 0);
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        let model: Model = spec.load(dev)?;
        load.push(t.elapsed().as_secs_f64() * 1e3);
        mapped = model.file().file_size();
        // A fixed, ordinary token sequence: every run sees the same work,
        // within the vocabulary however small.
        let vocab = model.config.vocab as u64;
        let ids: Vec<u32> = (0..prompt as u64)
            .map(|i| ((100 + i * 37 % 5000) % vocab) as u32)
            .collect();
        let positions = prompt.saturating_add(n).saturating_add(1);
        let mut s = model.session_with(SessionOptions {
            kv,
            ..SessionOptions::new(positions)
        })?;
        let t = Instant::now();
        // The greedy token: what a decode step costs without a sampler's work.
        let mut next = argmax(s.logits(&ids, false)?) as u32;
        let prefill = t.elapsed().as_secs_f64();
        ttft.push(prefill * 1e3);
        pre.push(prompt as f64 / prefill);
        let t = Instant::now();
        for _ in 0..n {
            next = argmax(s.logits(&[next], false)?) as u32;
        }
        dec.push(n as f64 / t.elapsed().as_secs_f64());
        // With the model still mapped: its touched pages count.
        rss = rss_bytes().unwrap_or(0);
    }
    Ok(BenchRow {
        path: spec.to_string(),
        load_ms: Stat::of(&load),
        ttft_ms: Stat::of(&ttft),
        prefill_tps: Stat::of(&pre),
        decode_tps: Stat::of(&dec),
        rss_bytes: rss,
        peak_rss_bytes: peak_rss_bytes().unwrap_or(0),
        mapped_bytes: mapped,
    })
}

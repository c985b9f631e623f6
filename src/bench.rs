//! `lorafold bench`: load time, time to first token, prefill and decode
//! speed and memory for each path, side by side.

use std::time::Instant;

use anyhow::{ensure, Context, Result};
use lorafold_runtime::cpu::KvType;
use lorafold_runtime::model::{Model, SessionOptions};
use lorafold_runtime::path_spec::PathSpec;
use serde::Serialize;

use crate::run::{device, set_threads};

/// Arguments of `lorafold bench`.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// Paths: MODEL.gguf[+ADAPTER.gguf[:SCALE]]...
    #[arg(required = true)]
    paths: Vec<PathSpec>,
    /// Prompt tokens (at least 1; prompt + generated + 1 at most the model's context length).
    #[arg(short = 'p', long, default_value_t = 128)]
    prompt: usize,
    /// Generated tokens.
    #[arg(short = 'n', long, default_value_t = 64)]
    n: usize,
    /// Repetitions (at least 1).
    #[arg(short = 'r', long, default_value_t = 5)]
    reps: usize,
    /// CPU threads.
    #[arg(long)]
    threads: Option<usize>,
    /// cpu, cuda[:N] or metal.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// KV cache type on the CPU engine: f16 (as llama.cpp) or f32.
    #[arg(long, default_value = "f16")]
    kv: KvType,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
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

fn status_kb(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// The greedy token: what a decode step costs without a sampler's work.
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Time `reps` runs of prefill (`prompt` tokens) and decode (`n` tokens) on `spec`.
pub fn bench_path(
    spec: &PathSpec,
    dev: &candle_core::Device,
    prompt: usize,
    n: usize,
    reps: usize,
    kv: KvType,
) -> Result<BenchRow> {
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
        let mut s = model
            .session_with(SessionOptions {
                kv,
                ..SessionOptions::new(positions)
            })
            .with_context(|| format!("-p {prompt} -n {n} need {positions} positions"))?;
        let t = Instant::now();
        let mut next = argmax(s.logits(&ids, false)?);
        let prefill = t.elapsed().as_secs_f64();
        ttft.push(prefill * 1e3);
        pre.push(prompt as f64 / prefill);
        let t = Instant::now();
        for _ in 0..n {
            next = argmax(s.logits(&[next], false)?);
        }
        dec.push(n as f64 / t.elapsed().as_secs_f64());
        // With the model still mapped: its touched pages count.
        rss = status_kb("VmRSS");
    }
    Ok(BenchRow {
        path: spec.to_string(),
        load_ms: Stat::of(&load),
        ttft_ms: Stat::of(&ttft),
        prefill_tps: Stat::of(&pre),
        decode_tps: Stat::of(&dec),
        rss_bytes: rss,
        peak_rss_bytes: status_kb("VmHWM"),
        mapped_bytes: mapped,
    })
}

/// Print rows as a table.
pub fn print_table(rows: &[BenchRow]) {
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "{:<44} {:>11} {:>13} {:>17} {:>15} {:>9} {:>9}",
        "path", "load ms", "ttft ms", "prefill tok/s", "decode tok/s", "RSS MiB", "map MiB"
    );
    for r in rows {
        // By characters: a byte slice of a non-ASCII path would panic.
        let chars: Vec<char> = r.path.chars().collect();
        let name = if chars.len() > 44 {
            format!(
                "...{}",
                chars[chars.len() - 41..].iter().collect::<String>()
            )
        } else {
            r.path.clone()
        };
        println!(
            "{:<44} {:>6.0}±{:<4.0} {:>7.0}±{:<5.0} {:>9.1}±{:<7.1} {:>8.1}±{:<6.1} {:>9.1} {:>9.1}",
            name, r.load_ms.mean, r.load_ms.sd, r.ttft_ms.mean, r.ttft_ms.sd, r.prefill_tps.mean, r.prefill_tps.sd,
            r.decode_tps.mean, r.decode_tps.sd, mib(r.rss_bytes), mib(r.mapped_bytes)
        );
    }
}

/// Run `lorafold bench`.
pub fn run(args: &BenchArgs) -> Result<()> {
    ensure!(
        args.prompt > 0,
        "-p 0 is out of range: at least 1 prompt token"
    );
    ensure!(args.reps > 0, "-r 0 is out of range: at least 1 repetition");
    set_threads(args.threads)?;
    let dev = device(&args.device)?;
    let rows: Vec<BenchRow> = args
        .paths
        .iter()
        .map(|p| bench_path(p, &dev, args.prompt, args.n, args.reps, args.kv))
        .collect::<Result<_>>()?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print_table(&rows);
    }
    Ok(())
}

//! `lorafold bench`: load time, time to first token, prefill and decode
//! speed and memory for each path, side by side.

use anyhow::{ensure, Result};
use lorafold_runtime::bench::{bench_path, BenchRow};
use lorafold_runtime::cpu::KvType;
use lorafold_runtime::device::DeviceSpec;
use lorafold_runtime::path_spec::PathSpec;

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
    device: DeviceSpec,
    /// KV cache type on the CPU engine: f16 (as llama.cpp) or f32.
    #[arg(long, default_value = "f16")]
    kv: KvType,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
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
    let dev = device(args.device)?;
    let rows: Vec<BenchRow> = args
        .paths
        .iter()
        .map(|p| {
            let sizes = format!("-p {} -n {}", args.prompt, args.n);
            bench_path(p, &dev, args.prompt, args.n, args.reps, args.kv).map_err(|e| {
                // Most errors name their file already: name it once.
                let names_a_file = std::iter::once(&p.model)
                    .chain(p.adapters.iter().map(|a| &a.path))
                    .any(|f| e.to_string().contains(&f.display().to_string()));
                match names_a_file {
                    true => anyhow::Error::new(e).context(sizes),
                    false => anyhow::Error::new(e).context(format!("{p}: {sizes}")),
                }
            })
        })
        .collect::<Result<_>>()?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print_table(&rows);
    }
    Ok(())
}

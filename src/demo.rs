//! `lorafold demo`: the main job on the real model, in one command.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use lorafold_converter::convert::{convert, ConvertOptions};
use lorafold_converter::round::quant::QuantPolicy;
use lorafold_converter::write::output::write_file_atomic;
use lorafold_runtime::generate::complete;
use serde::Serialize;

use crate::drift::{measure, DriftRow};
use crate::run::set_threads;
use lorafold_runtime::bench::{bench_path, BenchRow};
use lorafold_runtime::measure::windows;
use lorafold_runtime::path_spec::PathSpec;

/// Arguments of `lorafold demo`.
#[derive(clap::Args)]
pub struct DemoArgs {
    /// Where the converted files, results.json and results.svg go.
    #[arg(long, default_value = "demo-out")]
    out: PathBuf,
    /// CPU threads.
    #[arg(long)]
    threads: Option<usize>,
}

const PROMPT: &str = "Q: What is the capital of Portugal? A:";

#[derive(Serialize)]
struct PathResult {
    name: String,
    path: String,
    answer: String,
    file_bytes: u64,
    drift: Option<DriftRow>,
    latency: BenchRow,
}

/// Run `lorafold demo`.
pub fn run(args: &DemoArgs) -> Result<()> {
    set_threads(args.threads)?;
    let script = Path::new("scripts/fetch-smollm2.sh");
    let adapter = PathBuf::from("examples/adapters/pirate");
    if !script.exists() || !adapter.exists() {
        bail!("run `lorafold demo` from the lorafold checkout (it uses scripts/fetch-smollm2.sh and examples/adapters/pirate)");
    }
    eprintln!("[1/5] fetching SmolLM2-135M-Instruct (cached after the first time)");
    let o = Command::new(script)
        .output()
        .context("running scripts/fetch-smollm2.sh")?;
    if !o.status.success() {
        bail!(
            "scripts/fetch-smollm2.sh failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    let base = PathBuf::from(String::from_utf8(o.stdout)?.trim());
    std::fs::create_dir_all(&args.out).with_context(|| format!("{}", args.out.display()))?;
    let out = |n: &str| args.out.join(n);

    eprintln!(
        "[2/5] converting the pirate adapter: f32 reference, merged and separate at q8_0 and q4_0"
    );
    let mut opts = ConvertOptions::new(
        &base,
        Some(adapter.clone()),
        QuantPolicy::parse("f32", &[])?,
        out("merged-f32.gguf"),
    );
    opts.adapter_output = Some(out("adapter-f16.gguf"));
    convert(&opts, &|_| {})?;
    for q in ["q8_0", "q4_0"] {
        let mut o = ConvertOptions::new(
            &base,
            Some(adapter.clone()),
            QuantPolicy::parse(q, &[])?,
            out(&format!("merged-{q}.gguf")),
        );
        o.base_output = Some(out(&format!("base-{q}.gguf")));
        convert(&o, &|_| {})?;
    }
    let adapter_gguf = out("adapter-f16.gguf");
    let paths: Vec<(String, PathSpec)> = vec![
        (
            "f32 merged (ref)".into(),
            PathSpec::model(out("merged-f32.gguf")),
        ),
        (
            "q8_0 merged".into(),
            PathSpec::model(out("merged-q8_0.gguf")),
        ),
        (
            "q8_0 + adapter".into(),
            PathSpec::model(out("base-q8_0.gguf")).with_adapter(&adapter_gguf, 1.0),
        ),
        (
            "q4_0 merged".into(),
            PathSpec::model(out("merged-q4_0.gguf")),
        ),
        (
            "q4_0 + adapter".into(),
            PathSpec::model(out("base-q4_0.gguf")).with_adapter(&adapter_gguf, 1.0),
        ),
    ];

    eprintln!("[3/5] generating on each path: {PROMPT:?}");
    let dev = Device::Cpu;
    let mut answers = Vec::new();
    for (name, p) in &paths {
        let answer = complete(&p.load(&dev)?, PROMPT, 24, &["\n".to_string()])?;
        println!("{name:<18} {PROMPT}{answer}");
        answers.push(answer);
    }

    eprintln!("[4/5] drift against the f32 merged model on the adapter's held-out lines");
    let reference = paths[0].1.load(&dev)?;
    let tok = reference.tokenizer()?;
    let text = lorafold_runtime::text::read_text(&adapter.join("eval.txt"))?;
    let w = windows(&tok, &text, true, 256)?;
    let mut cands = Vec::new();
    for (name, p) in &paths[1..] {
        cands.push((name.clone(), p.to_string(), p.load(&dev)?));
    }
    let base_model = PathSpec::model(&base).load(&dev)?;
    let drift = measure(&reference, &cands, Some(&base_model), &w)?;
    drop(cands);

    eprintln!("[5/5] latency: 64-token prompt, 32 tokens decoded, 3 runs each");
    let reference_perplexity = drift.first().and_then(|d| d.drift.perplexity_reference);
    // The reference has no drift row of its own.
    let drifts = std::iter::once(None).chain(drift.into_iter().map(Some));
    let mut results = Vec::new();
    for (((name, p), answer), drift) in paths.iter().zip(answers).zip(drifts) {
        results.push(PathResult {
            name: name.clone(),
            path: p.to_string(),
            answer,
            file_bytes: p.file_bytes(),
            drift,
            latency: bench_path(p, &dev, 64, 32, 3, Default::default())?,
        });
    }
    println!();
    println!(
        "{:<18} {:>9} {:>9} {:>7} {:>8} {:>8} {:>9} {:>11} {:>11}",
        "path", "MB", "KL mean", "top-1", "ppl", "gain", "ttft ms", "prefill t/s", "decode t/s"
    );
    for r in &results {
        let d = r.drift.as_ref().map(|d| &d.drift);
        println!(
            "{:<18} {:>9.1} {:>9} {:>7} {:>8} {:>8} {:>9.0} {:>11.1} {:>11.1}",
            r.name,
            r.file_bytes as f64 / 1e6,
            d.map_or("ref".into(), |d| format!("{:.2e}", d.kl_mean)),
            d.map_or("-".into(), |d| format!("{:.1}%", 100.0 * d.top1_agreement)),
            d.and_then(|d| d.perplexity)
                .or(reference_perplexity)
                .map_or("-".into(), |p| format!("{p:.3}")),
            d.and_then(|d| d.gain_retained)
                .map_or("100%".into(), |g| format!("{:.1}%", 100.0 * g)),
            r.latency.ttft_ms.mean,
            r.latency.prefill_tps.mean,
            r.latency.decode_tps.mean
        );
    }
    let json = serde_json::to_string_pretty(&results)?;
    write_file_atomic(&out("results.json"), json.as_bytes())?;
    write_file_atomic(&out("results.svg"), svg(&results).as_bytes())?;
    eprintln!(
        "wrote {} and {}",
        out("results.json").display(),
        out("results.svg").display()
    );
    Ok(())
}

/// Two bar charts side by side: gain retained and decode tokens/s per path.
fn svg(results: &[PathResult]) -> String {
    let row_h = 34.0;
    let h = 70.0 + row_h * results.len() as f64;
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="900" height="{h}" font-family="sans-serif" font-size="13">"#
    );
    s += r#"<rect width="100%" height="100%" fill="white"/><text x="10" y="22" font-size="16">lorafold demo: SmolLM2-135M + pirate adapter</text>"#;
    s += r#"<text x="180" y="50">adapter gain retained (%)</text><text x="560" y="50">decode tokens/s</text>"#;
    let max_tps = results
        .iter()
        .map(|r| r.latency.decode_tps.mean)
        .fold(1.0, f64::max);
    for (i, r) in results.iter().enumerate() {
        let y = 60.0 + row_h * i as f64;
        let gain = r
            .drift
            .as_ref()
            .and_then(|d| d.drift.gain_retained)
            .unwrap_or(1.0)
            .clamp(0.0, 1.2);
        let w1 = 300.0 * gain / 1.2;
        let w2 = 300.0 * r.latency.decode_tps.mean / max_tps;
        s += &format!(
            r##"<text x="10" y="{ty}">{name}</text><rect x="180" y="{y}" width="{w1:.1}" height="22" fill="#4C78A8"/><text x="{tx1:.1}" y="{ty}">{g:.1}</text><rect x="560" y="{y}" width="{w2:.1}" height="22" fill="#F58518"/><text x="{tx2:.1}" y="{ty}">{t:.1}</text>"##,
            ty = y + 16.0,
            name = r.name,
            tx1 = 185.0 + w1,
            g = 100.0 * gain,
            tx2 = 565.0 + w2,
            t = r.latency.decode_tps.mean
        );
    }
    s + "</svg>\n"
}

//! `lorafold drift`: how far each path drifts from a reference, over the same tokens.

use std::path::PathBuf;

use anyhow::{Context, Result};
use lorafold_converter::write::output::{
    check_distinct, check_file_destination, write_file_atomic,
};
use lorafold_runtime::device::DeviceSpec;
use lorafold_runtime::measure::{check_vocabulary, drift, windows, DriftReport};
use lorafold_runtime::model::Model;
use lorafold_runtime::path_spec::{PathSpec, PathSpecError};
use lorafold_runtime::text::read_text;
use serde::Serialize;

use crate::run::{device, set_threads};

/// Arguments of `lorafold drift`.
#[derive(clap::Args)]
pub struct DriftArgs {
    /// The reference path: MODEL.gguf[+ADAPTER.gguf[:SCALE]]...
    #[arg(long = "ref")]
    reference: PathSpec,
    /// A candidate: NAME=MODEL.gguf[+ADAPTER.gguf[:SCALE]]... Repeatable.
    #[arg(long = "cand", required = true)]
    candidates: Vec<Candidate>,
    /// The text to run.
    #[arg(long)]
    text: PathBuf,
    /// Score each non-empty line alone (as fine-tuning evals do) instead of windows.
    #[arg(long)]
    lines: bool,
    /// The un-adapted base, to report how much of the adapter's gain each path keeps.
    #[arg(long)]
    base: Option<PathSpec>,
    /// Window length in tokens (at least 2, at most the model's context length).
    #[arg(long, default_value_t = 128)]
    ctx: usize,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// cpu, cuda[:N] or metal.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// CPU threads.
    #[arg(long)]
    threads: Option<usize>,
}

/// `--cand NAME=MODEL.gguf[+ADAPTER.gguf[:SCALE]]...`.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// The row's name.
    pub name: String,
    /// The path it runs.
    pub spec: PathSpec,
}

impl std::str::FromStr for Candidate {
    type Err = String;

    fn from_str(s: &str) -> Result<Candidate, String> {
        let (name, spec) = s
            .split_once('=')
            .ok_or_else(|| format!("'{s}': expected NAME=MODEL.gguf[+ADAPTER.gguf[:SCALE]]"))?;
        Ok(Candidate {
            name: name.into(),
            spec: spec.parse().map_err(|e: PathSpecError| e.to_string())?,
        })
    }
}

/// One candidate's row of the report.
#[derive(Serialize)]
pub struct DriftRow {
    /// Name given with --cand.
    pub name: String,
    /// The path spec.
    pub path: String,
    /// The measures.
    #[serde(flatten)]
    pub drift: DriftReport,
}

/// Run every path over `windows`; returns one row per candidate.
pub fn measure(
    reference: &Model,
    candidates: &[(String, String, Model)],
    base: Option<&Model>,
    windows: &[Vec<u32>],
) -> Result<Vec<DriftRow>> {
    let models: Vec<&Model> = candidates.iter().map(|(_, _, m)| m).collect();
    let reports = drift(reference, &models, base, windows)?;
    Ok(candidates
        .iter()
        .zip(reports)
        .map(|((name, path, _), drift)| DriftRow {
            name: name.clone(),
            path: path.clone(),
            drift,
        })
        .collect())
}

/// Print the rows as a table.
pub fn print_table(rows: &[DriftRow]) {
    println!(
        "{:<18} {:>6} {:>10} {:>10} {:>10} {:>10} {:>7} {:>8} {:>9} {:>8} {:>7}",
        "candidate",
        "tokens",
        "KL mean",
        "KL median",
        "KL p99",
        "KL max",
        "top-1",
        "RMS dP",
        "ppl",
        "dppl",
        "gain"
    );
    for r in rows {
        let d = &r.drift;
        println!(
            "{:<18} {:>6} {:>10.2e} {:>10.2e} {:>10.2e} {:>10.2e} {:>6.1}% {:>8.4} {:>9.4} {:>+8.4} {:>7}",
            r.name,
            d.tokens,
            d.kl_mean,
            d.kl_median,
            d.kl_p99,
            d.kl_max,
            100.0 * d.top1_agreement,
            d.rms_delta_p_top,
            d.perplexity.unwrap_or(f64::NAN),
            d.perplexity.unwrap_or(f64::NAN) - d.perplexity_reference.unwrap_or(f64::NAN),
            d.gain_retained.map_or("-".into(), |g| format!("{:.1}%", 100.0 * g)),
        );
    }
}

/// Run `lorafold drift`.
pub fn run(args: &DriftArgs) -> Result<()> {
    set_threads(args.threads)?;
    if let Some(json) = &args.json {
        check_file_destination(json)?;
        let mut inputs = crate::spec_files(&args.reference, "--ref");
        for c in &args.candidates {
            inputs.extend(crate::spec_files(&c.spec, "--cand"));
        }
        if let Some(b) = &args.base {
            inputs.extend(crate::spec_files(b, "--base"));
        }
        inputs.push(("--text", &args.text));
        check_distinct(&[("--json", json)], &inputs)?;
    }
    let dev = device(args.device)?;
    let reference = args.reference.load(&dev)?;
    // Refuse a window the model cannot hold before any work (0 or past its context).
    reference
        .session(args.ctx)
        .with_context(|| format!("--ctx {}", args.ctx))?;
    let tok = reference.tokenizer()?;
    let mut candidates = Vec::new();
    for Candidate { name, spec } in &args.candidates {
        let m = spec.load(&dev)?;
        check_vocabulary(&reference, &m).with_context(|| format!("--cand {name}"))?;
        candidates.push((name.clone(), spec.to_string(), m));
    }
    let base = args.base.as_ref().map(|b| b.load(&dev)).transpose()?;
    if let Some(b) = &base {
        check_vocabulary(&reference, b).context("--base")?;
    }
    let text = read_text(&args.text)?;
    let w = windows(&tok, &text, args.lines, args.ctx)
        .with_context(|| args.text.display().to_string())?;
    let rows = measure(&reference, &candidates, base.as_ref(), &w)?;
    print_table(&rows);
    if let Some(p) = &args.json {
        write_file_atomic(p, serde_json::to_string_pretty(&rows)?.as_bytes())?;
    }
    Ok(())
}

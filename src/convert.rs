//! `lorafold convert`.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use lorafold_converter::budget::{convert_within, DriftBudget, DriftTarget};
use lorafold_converter::calib::{CalibStats, LayerStep};
use lorafold_converter::convert::input_files;
use lorafold_converter::convert::{
    convert, Compensate, ConvertError, ConvertOptions, ProgressStep, Rounding,
};
use lorafold_converter::reference::TextCalibration;
use lorafold_converter::report::BudgetRound;
use lorafold_converter::report::{ConvertReport, TensorReport};
use lorafold_converter::round::quant::QuantPolicy;
use lorafold_converter::write::output::{
    check_distinct, check_file_destination, check_set_destination, write_file_atomic, StagedSet,
};
use lorafold_runtime::gguf::GgmlType;

/// Arguments of `lorafold convert`.
#[derive(clap::Args)]
pub struct ConvertArgs {
    /// Base model: a GGUF file or a Hugging Face model folder.
    #[arg(long)]
    base: PathBuf,
    /// PEFT LoRA adapter folder to merge (without it the base is only quantized).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Type or preset: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k..q6_k, q4_k_m, q5_k_m, q4_k_s, q5_k_s.
    /// Needed for the merged and base outputs.
    #[arg(long)]
    quant: Option<String>,
    /// Per-tensor override REGEX=TYPE (first match wins), e.g. 'output\.weight=q8_0'.
    #[arg(long = "tensor-type", value_name = "REGEX=TYPE")]
    tensor_type: Vec<String>,
    /// The merged GGUF; with --emit, the folder for the outputs.
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Also write the quantized base alone here (the separate path's base).
    #[arg(long, conflicts_with = "emit")]
    base_out: Option<PathBuf>,
    /// Write the adapter as a llama.cpp LoRA GGUF here (the separate path).
    #[arg(long, conflicts_with = "emit")]
    adapter_out: Option<PathBuf>,
    /// Type of the adapter GGUF's A and B.
    #[arg(long, value_enum, default_value_t = AdapterTypeArg::F16)]
    adapter_type: AdapterTypeArg,
    /// Write several artifacts from one read of the inputs into the folder -o:
    /// merged (merged.gguf) and/or separate (base.gguf + adapter.gguf), with report.json.
    #[arg(long, value_enum, value_delimiter = ',')]
    emit: Vec<EmitArg>,
    /// Write the per-tensor report as JSON here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Fail (no output) if any tensor's relative error ||Q(W)-W||/||W|| exceeds this.
    #[arg(long, value_parser = crate::values::non_negative)]
    max_rel_error: Option<f64>,
    /// Fail (no output) if the adapter retention pooled over changed tensors
    /// is below this share (0 to 1).
    #[arg(long, value_parser = crate::values::share)]
    min_retention: Option<f64>,
    /// Merge adapters that assume a modified base (PiSSA, OLoRA, LoftQ, QA-LoRA) anyway.
    #[arg(long)]
    force: bool,
    /// Calibration statistics: from `lorafold calibrate`, or an imatrix
    /// GGUF from llama.cpp's `llama-imatrix` (its diagonal only).
    #[arg(long)]
    calib: Option<PathBuf>,
    /// Calibrate in this run on this text (the adapter's training text), one
    /// window per non-empty line, as `lorafold calibrate --lines` does: the f32 merged model is written to a
    /// temporary file beside the output, observed, and removed.
    #[arg(long, conflicts_with = "calib")]
    calib_text: Option<PathBuf>,
    /// How the merged output's block-quantized tensors are rounded (default:
    /// gptq with `lorafold calibrate` statistics, imatrix with an imatrix
    /// file, nearest without calibration).
    #[arg(long, value_enum)]
    rounding: Option<RoundingArg>,
    /// GPTQ's damping, as a fraction of XᵀX's mean diagonal (5%: calibration
    /// texts of a few thousand tokens leave XᵀX of wide inputs rank-deficient).
    #[arg(long, default_value_t = lorafold_converter::convert::DEFAULT_DAMP, value_parser = crate::values::non_negative)]
    damp: f64,
    /// GPTQ: code columns by decreasing input energy, every block's scales
    /// fixed before coding (`false`: columns in order, each block's scales
    /// fixed when it starts; better at q4_1 on SmolLM2's adapters, worse at q4_0).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    act_order: bool,
    /// Spend bytes until the merged file's mean KL from the f32 merged model,
    /// measured over the --calib-text, is at most this (nats/token): tensors
    /// move up --ladder where a byte removes the most predicted output error.
    #[arg(long, requires = "calib_text", conflicts_with = "min_gain", value_parser = crate::values::positive)]
    budget_kl: Option<f64>,
    /// As --budget-kl, for the share of the adapter's gain (loss drop below
    /// the base's) the merged file keeps on the --calib-text, e.g. 0.97.
    #[arg(long, requires = "calib_text", value_parser = crate::values::open_share)]
    min_gain: Option<f64>,
    /// Also write the rank-R approximation of each adapted module's rounding
    /// error W - Q(W) (nearest in the calibration's output norm when given)
    /// as an f16 LoRA GGUF for llama.cpp's --lora, beside the merged file.
    #[arg(long, value_name = "R")]
    compensate: Option<usize>,
    /// Where --compensate writes (default: the merged output's name with
    /// .compensation.gguf).
    #[arg(long, requires = "compensate")]
    compensate_out: Option<PathBuf>,
    /// Types a tensor may move up to under a budget.
    #[arg(long, value_delimiter = ',', value_parser = parse_ggml_type, default_values_t = lorafold_converter::budget::DEFAULT_LADDER.to_vec())]
    ladder: Vec<GgmlType>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Print only the totals, not the per-tensor table.
    #[arg(long, short)]
    quiet: bool,
}

/// Statistics of the f32 merged model over `text`, one window per line,
/// with the f32 reference written beside the output (in the temporary
/// folder without one); made a layer at a time as the conversion reaches
/// each, a line per layer said through `bar` (or stderr; not with --quiet).
fn calibrate_in_run(
    args: &ConvertArgs,
    text: &Path,
    with_base: bool,
    bar: Option<ProgressBar>,
) -> Result<TextCalibration> {
    let near = args
        .output
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("lorafold-calibration"));
    let quiet = args.quiet;
    let progress = Box::new(move |s: &LayerStep| {
        let line = format!(
            "calibration: layer {}/{} in {:.1} s{}; {} so far, about {} left",
            s.layer + 1,
            s.layers,
            s.layer_seconds,
            if s.restarted {
                " (from the embeddings again)"
            } else {
                ""
            },
            minutes(s.elapsed_seconds),
            minutes(s.eta_seconds())
        );
        // A hidden bar (before its first tensor) would swallow the line.
        match &bar {
            Some(b) if !b.is_hidden() => b.println(line),
            _ if !quiet => eprintln!("{line}"),
            _ => {}
        }
    });
    let c = TextCalibration::over_text(
        &args.base,
        args.adapter.as_deref(),
        text,
        &near,
        with_base,
        progress,
    )?;
    if !quiet {
        eprintln!(
            "calibrating on {}: {} tokens in {} lines, a layer at a time as the conversion reaches it",
            text.display(),
            c.stats.tokens,
            c.windows.len(),
        );
    }
    Ok(c)
}

/// Seconds as "1m05s" (or "42s").
fn minutes(s: f64) -> String {
    let s = s.round() as u64;
    if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

fn parse_ggml_type(s: &str) -> Result<GgmlType, String> {
    GgmlType::from_name(s)
        .filter(|t| lorafold_converter::round::quant::WRITABLE.contains(t))
        .ok_or_else(|| format!("'{s}' is not a type lorafold writes"))
}

/// `--adapter-type`: what llama.cpp reads for an adapter's A and B.
#[derive(Clone, Copy, clap::ValueEnum)]
enum AdapterTypeArg {
    /// Half precision (llama.cpp's default).
    F16,
    /// Single precision.
    F32,
    /// bfloat16.
    Bf16,
}

/// `--emit`: the artifacts written into the -o folder.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum EmitArg {
    /// merged.gguf: the adapter merged in, quantized.
    Merged,
    /// base.gguf + adapter.gguf: the quantized base and the adapter apart.
    Separate,
}

/// `--rounding`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum RoundingArg {
    /// ggml's quantizers (llama.cpp's bytes).
    Nearest,
    /// Importance-weighted block scales (the statistics' diagonal).
    Imatrix,
    /// Error feedback (GPTQ; the whole XᵀX).
    Gptq,
}

/// Where --compensate writes beside the merged output `out`.
fn compensation_path(args: &ConvertArgs, out: &Path) -> PathBuf {
    args.compensate_out
        .clone()
        .unwrap_or_else(|| out.with_extension("compensation.gguf"))
}

/// Every path this run writes is usable, distinct from the others and from
/// every input however it is spelled, checked before any work.
fn check_paths(args: &ConvertArgs) -> Result<()> {
    let emit = !args.emit.is_empty();
    let set = args.output.as_deref().filter(|_| emit);
    let default_compensation = match (args.compensate, &args.compensate_out, &args.output) {
        (Some(_), None, Some(o)) if !emit => Some(compensation_path(args, o)),
        _ => None,
    };
    let files: Vec<(&str, &Path)> = [
        ("-o", args.output.as_deref().filter(|_| !emit)),
        ("--base-out", args.base_out.as_deref()),
        ("--adapter-out", args.adapter_out.as_deref()),
        ("--report", args.report.as_deref()),
        ("--compensate-out", args.compensate_out.as_deref()),
        (
            "--compensate's file beside -o",
            default_compensation.as_deref(),
        ),
    ]
    .into_iter()
    .filter_map(|(flag, p)| p.map(|p| (flag, p)))
    .collect();
    let outputs: Vec<(&str, &Path)> = set
        .map(|s| ("-o, the --emit folder", s))
        .into_iter()
        .chain(files.iter().copied())
        .collect();
    let base_files = input_files(&args.base);
    let adapter_files = args.adapter.as_deref().map(input_files).unwrap_or_default();
    let inputs: Vec<(&str, &Path)> = base_files
        .iter()
        .map(|f| ("--base", f.as_path()))
        .chain(adapter_files.iter().map(|f| ("--adapter", f.as_path())))
        .chain(args.calib.as_deref().map(|p| ("--calib", p)))
        .chain(args.calib_text.as_deref().map(|p| ("--calib-text", p)))
        .collect();
    // Distinct first: a report inside the --emit folder is that mistake,
    // whether the folder exists yet or not.
    check_distinct(&outputs, &inputs)?;
    if let Some(s) = set {
        check_set_destination(s)?;
    }
    for (_, p) in &files {
        check_file_destination(p)?;
    }
    Ok(())
}

/// Run `lorafold convert`.
pub fn run(args: &ConvertArgs) -> Result<()> {
    crate::run::set_threads(args.threads)?;
    check_paths(args)?;
    // With --emit the set is written into a partial folder and published as
    // -o in one rename, so a reader never sees old and new files mixed.
    let staged = if args.emit.is_empty() {
        None
    } else {
        let dir = args.output.as_ref().context("--emit needs -o OUTDIR")?;
        Some(StagedSet::new(dir)?)
    };
    let (output, base_out, adapter_out, report_path) = match &staged {
        None => (
            args.output.clone(),
            args.base_out.clone(),
            args.adapter_out.clone(),
            args.report.clone(),
        ),
        Some(set) => {
            let want = |k: EmitArg| args.emit.contains(&k);
            (
                want(EmitArg::Merged).then(|| set.path("merged.gguf")),
                want(EmitArg::Separate).then(|| set.path("base.gguf")),
                want(EmitArg::Separate).then(|| set.path("adapter.gguf")),
                Some(
                    args.report
                        .clone()
                        .unwrap_or_else(|| set.path("report.json")),
                ),
            )
        }
    };
    let policy = match (&args.quant, output.is_some() || base_out.is_some()) {
        (Some(q), _) => QuantPolicy::parse(q, &args.tensor_type)?,
        (None, false) if !args.tensor_type.is_empty() => {
            bail!("--tensor-type applies to the merged and base outputs, and neither is written")
        }
        (None, false) => QuantPolicy::parse("f16", &[])?, // unused: only the adapter is written
        (None, true) => bail!("--quant is needed for the merged and base outputs"),
    };
    let target = match (args.budget_kl, args.min_gain) {
        (Some(x), _) => Some(DriftTarget::KlMean(x)),
        (None, Some(y)) => Some(DriftTarget::MinGain(y)),
        (None, None) => None,
    };
    if target.is_some() && args.calib_text.is_none() {
        bail!("--budget-kl and --min-gain measure the files over the adapter's text: give it with --calib-text");
    }
    if args
        .rounding
        .is_some_and(|r| !matches!(r, RoundingArg::Nearest))
        && args.calib.is_none()
        && args.calib_text.is_none()
    {
        bail!("--rounding imatrix and gptq need --calib (statistics from `lorafold calibrate`) or --calib-text");
    }
    let compensate = match (args.compensate, &output) {
        (Some(rank), Some(out)) => Some(Compensate {
            rank,
            output: compensation_path(args, out),
        }),
        (Some(_), None) => bail!("--compensate writes beside the merged output: give -o"),
        (None, _) => None,
    };
    let mut opts = ConvertOptions {
        output,
        base_output: base_out,
        adapter_output: adapter_out,
        adapter_type: match args.adapter_type {
            AdapterTypeArg::F16 => GgmlType::F16,
            AdapterTypeArg::F32 => GgmlType::F32,
            AdapterTypeArg::Bf16 => GgmlType::BF16,
        },
        force: args.force,
        max_rel_error: args.max_rel_error,
        min_retention: args.min_retention,
        damp: args.damp,
        act_order: args.act_order,
        compensate,
        ..ConvertOptions::new(&args.base, args.adapter.clone(), policy, PathBuf::new())
    };
    // What the inputs' headers can refuse (an override that matches no
    // tensor), before statistics are read or a text is calibrated on.
    lorafold_converter::convert::check(&opts)?;
    // A bar over tensors on a terminal (a 7B conversion takes minutes);
    // nothing when stderr is a file or a pipe, or with --quiet.
    let bar = (std::io::stderr().is_terminal() && !args.quiet).then(|| {
        // Hidden until the first tensor: nothing is drawn before the total is known.
        let b = ProgressBar::hidden();
        b.set_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} tensors, {elapsed} (eta {eta}) {msg}",
            )
            .expect("a valid template"),
        );
        b
    });
    let mut text_calibration = None;
    opts.calib = match (&args.calib, &args.calib_text) {
        (Some(p), _) => Some(std::sync::Arc::new(CalibStats::read(p)?)),
        (None, Some(text)) => {
            let c = calibrate_in_run(
                args,
                text,
                target.is_some_and(DriftTarget::needs_base),
                bar.clone(),
            )?;
            let stats = std::sync::Arc::new(c.stats);
            text_calibration = Some((c.reference, c.windows));
            Some(stats)
        }
        (None, None) => None,
    };
    opts.rounding = match args.rounding {
        Some(RoundingArg::Nearest) => Rounding::Nearest,
        Some(RoundingArg::Imatrix) => Rounding::Imatrix,
        Some(RoundingArg::Gptq) => Rounding::Gptq,
        None => Rounding::best_for(opts.calib.as_deref()),
    };
    let written = AtomicU64::new(0);
    let progress = |s: &ProgressStep| {
        let Some(b) = &bar else { return };
        if s.done == 1 {
            // A drift budget converts once per round.
            b.reset();
            written.store(0, Ordering::Relaxed);
        }
        let bytes = written.fetch_add(s.bytes, Ordering::Relaxed) + s.bytes;
        let secs = b.elapsed().as_secs_f64().max(1e-3);
        b.set_length(s.total as u64);
        b.set_position(s.done as u64);
        // The clock restarts at the first tensor, so the rate is meaningful
        // only a few tensors on.
        let rate = if s.done > 8 {
            format!("{:.0} MB/s  ", bytes as f64 / secs / 1e6)
        } else {
            String::new()
        };
        b.set_message(format!("{rate}{}", s.tensor));
        if s.done == 1 {
            b.set_draw_target(ProgressDrawTarget::stderr());
        }
        if s.done == s.total {
            b.finish_and_clear();
        }
    };
    let converted = match (target, text_calibration) {
        (Some(target), Some((reference, windows))) => convert_within(
            &opts,
            &DriftBudget {
                target,
                ladder: args.ladder.clone(),
                windows,
                reference: reference.merged.clone(),
                base_reference: reference.base.clone(),
                max_rounds: 4,
            },
            &progress,
            &|r: &BudgetRound| {
                eprintln!(
                    "budget round: {} tensors above the policy, {:.1} MB of tensors, predicted error {:.4}: KL {:.4}, top-1 {:.1}%{}{}",
                    r.upgraded,
                    r.tensor_bytes as f64 / 1e6,
                    r.predicted_error,
                    r.kl_mean,
                    100.0 * r.top1_agreement,
                    r.gain_retained
                        .map_or(String::new(), |g| format!(", gain {:.1}%", 100.0 * g)),
                    if r.within { " (within budget)" } else { "" }
                )
            },
        ),
        _ => convert(&opts, &progress),
    };
    let (mut report, broken) = match converted {
        Ok(r) => (r, None),
        Err(ConvertError::Budget(why, r)) => (*r, Some(why)),
        Err(e) => return Err(e.into()),
    };
    if let Some(set) = &staged {
        for p in [
            report.output.as_mut(),
            report.base_output.as_mut(),
            report.adapter_gguf.as_mut().map(|a| &mut a.path),
            report.compensation.as_mut().map(|c| &mut c.path),
        ]
        .into_iter()
        .flatten()
        {
            *p = set.published_path(Path::new(p)).display().to_string();
        }
    }
    // A broken budget still writes a report the user asked for by name; an
    // --emit set is published only whole.
    if let Some(path) = &report_path {
        if broken.is_none() || args.report.is_some() {
            let json = serde_json::to_string_pretty(&report)?;
            write_file_atomic(path, json.as_bytes())?;
        }
    }
    print_report(&report, args.quiet);
    if let Some(why) = broken {
        return Err(ConvertError::Budget(why, Box::new(report)).into());
    }
    if let Some(set) = staged {
        set.publish()?;
    }
    Ok(())
}

fn print_report(r: &ConvertReport, quiet: bool) {
    if !quiet && !r.tensors.is_empty() {
        println!(
            "{:<32} {:<6} {:>12} {:>10} {:>10} {:>9} {:>10} {:>10}",
            "tensor", "type", "bytes", "rel.err", "retention", "|dW|/|W|", "out.err", "nearest"
        );
        let e = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.3e}"));
        for t in &r.tensors {
            println!(
                "{:<32} {:<6} {:>12} {:>10.3e} {:>10} {:>9} {:>10} {:>10}",
                t.name,
                t.ggml_type,
                t.n_bytes,
                t.rel_error,
                t.retention.map_or("-".into(), |x| format!("{x:.4}")),
                t.delta_rel_norm.map_or("-".into(), |x| format!("{x:.2e}")),
                e(t.output_error),
                e(t.output_error_nearest),
            );
        }
    }
    for n in &r.notes {
        println!("note: {n}");
    }
    if let Some(a) = &r.adapter_gguf {
        let folded = a.modules.iter().filter(|m| m.b_factor != 1.0).count();
        println!(
            "adapter {}: {} modules, {} alpha {}, {} bytes{}",
            a.path,
            a.modules.len(),
            a.ggml_type,
            a.alpha,
            a.file_size,
            if folded > 0 {
                format!(", scale folded into B for {folded} modules")
            } else {
                String::new()
            }
        );
    }
    if let (Some(p), Some(size)) = (&r.base_output, r.base_file_size) {
        println!("base {p}: {size} bytes");
    }
    if r.tensors.is_empty() {
        return;
    }
    let t = &r.totals;
    if let Some(p) = &r.output {
        println!("merged {p}: {} bytes", t.file_size);
    }
    println!(
        "{} tensors, {} weights, {} bytes of tensor data ({:.3} bpw)",
        t.n_tensors, t.n_elements, t.tensor_bytes, t.bits_per_weight
    );
    println!(
        "relative error: mean {:.3e}, max {:.3e} ({})",
        t.mean_rel_error, t.max_rel_error, t.max_rel_error_tensor
    );
    if t.copied_tensors > 0 {
        println!(
            "{} tensors copied as stored (the type asked for is the base's; not rounded again)",
            t.copied_tensors
        );
    }
    let covered: Vec<&TensorReport> = r
        .tensors
        .iter()
        .filter(|t| t.output_error.is_some())
        .collect();
    if !covered.is_empty() {
        let mean = |f: &dyn Fn(&TensorReport) -> Option<f64>| {
            covered.iter().filter_map(|t| f(t)).sum::<f64>() / covered.len() as f64
        };
        print!(
            "output error ||(Q(W)-W)X||/||WX|| over {} calibrated tensors: mean {:.3e}",
            covered.len(),
            mean(&|t| t.output_error)
        );
        if covered.iter().all(|t| t.output_error_nearest.is_some()) {
            print!(" (nearest: {:.3e})", mean(&|t| t.output_error_nearest));
        }
        println!();
    }
    if let Some(b) = &r.budget {
        let mut kinds = std::collections::BTreeMap::new();
        for (_, _, to) in &b.upgrades {
            *kinds.entry(to.as_str()).or_insert(0) += 1;
        }
        let last = b.rounds.last();
        println!(
            "budget {}: {} over {} tokens after {} round(s); {} tensors above the policy ({})",
            b.target,
            last.map_or("-".into(), |l| match l.gain_retained {
                Some(g) => format!("KL {:.4}, gain {:.1}%", l.kl_mean, 100.0 * g),
                None => format!("KL {:.4}", l.kl_mean),
            }),
            b.tokens,
            b.rounds.len(),
            b.upgrades.len(),
            kinds
                .iter()
                .map(|(k, n)| format!("{n} {k}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if let Some(c) = &r.compensation {
        let left: Vec<f64> = r
            .tensors
            .iter()
            .filter_map(|t| t.output_error_compensated)
            .collect();
        println!(
            "compensation {}: rank {} for {} modules, {} bytes{}",
            c.path,
            c.rank,
            c.modules,
            c.file_size,
            if left.is_empty() {
                String::new()
            } else {
                format!(
                    "; output error with it: mean {:.3e}",
                    left.iter().sum::<f64>() / left.len() as f64
                )
            }
        );
    }
    if let Some(ret) = t.retention {
        println!(
            "adapter retention over {} changed tensors: pooled {:.4}, mean {:.4}, min {:.4}",
            t.changed_tensors,
            ret,
            t.mean_retention.unwrap_or(f64::NAN),
            t.min_retention.unwrap_or(f64::NAN)
        );
    }
    println!(
        "wall {:.2} s, peak RSS {}",
        t.wall_seconds,
        t.peak_rss_bytes.map_or("?".into(), |b| format!(
            "{:.0} MiB",
            b as f64 / (1 << 20) as f64
        ))
    );
}

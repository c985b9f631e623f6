//! `lorafold calibrate`: second-moment statistics of every linear layer's
//! input over a text, for drift-aware rounding (issue 11's first part).

use std::path::PathBuf;

use anyhow::{Context, Result};
use lorafold_converter::calib::CalibStats;
use lorafold_converter::write::output::{check_distinct, check_file_destination};
use lorafold_runtime::device::DeviceSpec;
use lorafold_runtime::path_spec::PathSpec;
use lorafold_runtime::text::read_text;

use crate::run::{device, set_threads};

/// Tokens per window (a longer line is split), here and in `convert --calib-text`.
use lorafold_converter::reference::DEFAULT_CTX;

/// Arguments of `lorafold calibrate`.
#[derive(clap::Args)]
pub struct CalibrateArgs {
    /// The model to observe: MODEL.gguf[+ADAPTER.gguf[:SCALE]]... (an f32 base
    /// with the adapter attached equals the f32 merged model).
    path: PathSpec,
    /// The calibration text (the adapter's training text).
    #[arg(long)]
    text: PathBuf,
    /// Run each non-empty line alone instead of windows of --ctx tokens.
    #[arg(long)]
    lines: bool,
    /// Window length in tokens.
    #[arg(long, default_value_t = DEFAULT_CTX)]
    ctx: usize,
    /// Where to write the statistics (GGUF).
    #[arg(short, long)]
    output: PathBuf,
    /// Also write the diagonal in llama.cpp's imatrix GGUF layout here (for
    /// `llama-quantize --imatrix`).
    #[arg(long)]
    imatrix: Option<PathBuf>,
    /// CPU threads.
    #[arg(long)]
    threads: Option<usize>,
}

/// Run `lorafold calibrate`.
pub fn run(args: &CalibrateArgs) -> Result<()> {
    let mut outputs = vec![("-o", args.output.as_path())];
    outputs.extend(args.imatrix.as_deref().map(|p| ("--imatrix", p)));
    for (_, p) in &outputs {
        check_file_destination(p)?;
    }
    let mut inputs = crate::spec_files(&args.path, "the model path");
    inputs.push(("--text", args.text.as_path()));
    check_distinct(&outputs, &inputs)?;
    set_threads(args.threads)?;
    let model = args.path.load(&device(DeviceSpec::Cpu)?)?;
    model
        .session(args.ctx)
        .with_context(|| format!("--ctx {}", args.ctx))?;
    let text = read_text(&args.text)?;
    let start = std::time::Instant::now();
    let (stats, w) = CalibStats::over_text(&model, &text, args.lines, args.ctx)
        .with_context(|| args.text.display().to_string())?;
    stats.write(
        &args.output,
        &[
            ("lorafold.calibration.path", args.path.to_string()),
            ("lorafold.calibration.text", args.text.display().to_string()),
        ],
    )?;
    if let Some(p) = &args.imatrix {
        let longest = w.iter().map(Vec::len).max().unwrap_or(0);
        stats.write_imatrix(
            p,
            &args.text.display().to_string(),
            w.len() as u32,
            longest as u32,
        )?;
    }
    eprintln!(
        "{}: {} inputs over {} tokens in {} windows ({:.1} s)",
        args.output.display(),
        stats.inputs.len(),
        stats.tokens,
        w.len(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

//! The conversion pipeline: one pass over the base's tensors, merged,
//! quantized and streamed to the writer in parallel batches.

use lorafold_runtime::gguf::names;
use std::path::{Path, PathBuf};
use std::time::Instant;

use lorafold_runtime::gguf::{GgmlType, MetadataValue};
use lorafold_runtime::number::compact;
use rayon::prelude::*;

use crate::merge::{self, MergeError, MergePlan, TensorEdit};
use crate::read::base::{BaseError, BaseModel, BaseTensor};
use crate::read::peft::{ModuleKind, PeftAdapter, PeftError};
use crate::read::sha256_of;
use crate::report::{
    peak_rss_bytes, CompensationReport, ConvertReport, ErrorSums, TensorReport, Totals,
};
use crate::round::compensate::StoredPair;
use crate::round::quant::{self, QuantError, QuantPolicy, TensorRole};
use crate::write::adapter_gguf::{write_adapter_gguf, AdapterError};
use crate::write::gguf_writer::{GgufStream, GgufWriter, WriteError};
use crate::write::output::{check_distinct, check_file_destination, OutputError};

mod ladder;
mod outputs;
mod process;
mod provenance;
mod stream;
mod tensors;

pub use ladder::{predict_ladder, Rung, TensorLadder};
use outputs::{start_compensation, start_model};
use process::{merged_values, output_norms2, process, relative2, round, stats_of, Processed};
use provenance::provenance;
pub use provenance::sha256_file;
use stream::{stream_tensor, Making, Sinks};
use tensors::{out_tensors, row_len, OutTensor};

/// The tool version recorded in outputs.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// An error converting; no output file is left behind.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// Reading the base failed.
    #[error(transparent)]
    Base(#[from] BaseError),
    /// Reading the adapter failed.
    #[error(transparent)]
    Peft(#[from] PeftError),
    /// The adapter does not fit the base, or the merge failed.
    #[error(transparent)]
    Merge(#[from] MergeError),
    /// Quantization failed.
    #[error(transparent)]
    Quant(#[from] QuantError),
    /// Writing failed.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// The adapter GGUF could not be made.
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    /// An output path cannot be used.
    #[error(transparent)]
    Output(#[from] OutputError),
    /// An adapter output was asked for without an adapter.
    #[error("an adapter output needs an adapter")]
    NoAdapter,
    /// Nothing to do, or an output needs an input that was not given.
    #[error("{0}")]
    Usage(String),
    /// The adapter assumes a modified base.
    #[error("{path}: {what}: this adapter assumes a modified base model (PiSSA/OLoRA/LoftQ/QA-LoRA), so merging it into the original base is wrong unless the base given is the modified one")]
    ModifiedBase {
        /// adapter_config.json
        path: PathBuf,
        /// the setting
        what: String,
    },
    /// A tensor's values cannot be written in its type into this output.
    #[error("{}: {source}", path.display())]
    Written {
        /// the output
        path: PathBuf,
        /// what the quantizer found
        #[source]
        source: QuantError,
    },
    /// A file could not be hashed.
    #[error("{path}: {source}")]
    Io {
        /// the file
        path: PathBuf,
        /// the OS error
        #[source]
        source: std::io::Error,
    },
    /// A text input (the calibration text) cannot be read.
    #[error(transparent)]
    Text(#[from] lorafold_runtime::text::TextError),
    /// Calibration statistics cannot be used with this model.
    #[error(transparent)]
    Calib(#[from] crate::calib::CalibError),
    /// Running an f32 reference or a candidate over the calibration text failed.
    #[error("{path}: {problem}")]
    Measure {
        /// the model or text
        path: PathBuf,
        /// what went wrong
        problem: String,
    },
    /// --max-rel-error or --min-retention was broken; nothing was written.
    #[error("{0}; no output written")]
    Budget(String, Box<ConvertReport>),
    /// [`ConvertOptions::cancel`] was set; nothing was written.
    #[error("conversion cancelled; no output written")]
    Cancelled,
}

/// What to convert and how.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// GGUF file or HF folder.
    pub base: PathBuf,
    /// PEFT adapter folder.
    pub adapter: Option<PathBuf>,
    /// Quantization policy.
    pub policy: QuantPolicy,
    /// The merged GGUF (W0 + s·B·A, quantized), if wanted.
    pub output: Option<PathBuf>,
    /// The quantized base alone (for the separate path), if wanted.
    pub base_output: Option<PathBuf>,
    /// The adapter as a llama.cpp LoRA GGUF, if wanted.
    pub adapter_output: Option<PathBuf>,
    /// Type of the adapter GGUF's tensors (F16, F32 or BF16).
    pub adapter_type: GgmlType,
    /// Merge adapters that assume a modified base anyway.
    pub force: bool,
    /// Fail if any tensor's relative error exceeds this.
    pub max_rel_error: Option<f64>,
    /// Fail if the pooled adapter retention is below this.
    pub min_retention: Option<f64>,
    /// Calibration statistics (`lorafold calibrate`, or llama.cpp's
    /// imatrix): what `rounding` other than nearest reads.
    pub calib: Option<std::sync::Arc<crate::calib::CalibStats>>,
    /// How the merged output's block-quantized tensors whose input the
    /// statistics cover are rounded (the base output is always nearest).
    pub rounding: Rounding,
    /// GPTQ's damping: this fraction of XᵀX's mean diagonal is added to it.
    pub damp: f64,
    /// GPTQ codes columns by decreasing input energy, block scales fixed
    /// up front ([`crate::round::gptq::inverse_cholesky`]).
    pub act_order: bool,
    /// The drift budget the type mix was chosen for, recorded in the
    /// provenance (`budget`, the module above this one).
    pub budget: Option<String>,
    /// Also write the rank-R compensation of the adapted modules' rounding
    /// error as a LoRA GGUF ([`crate::round::compensate`]).
    pub compensate: Option<Compensate>,
    /// Tensors already rounded (by [`predict_ladder`]), taken instead of
    /// rounding again.
    pub rounded: Option<RoundedTensors>,
    /// Set by another thread to stop the conversion between tensors (a
    /// host's Ctrl-C): it ends with [`ConvertError::Cancelled`] and the
    /// partial outputs are removed, as on any error.
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

/// Bytes of tensors already rounded, by (name, type): a drift budget's
/// rounds reuse what its prediction computed (GPTQ is most of a
/// conversion's time).
#[derive(Clone)]
pub struct RoundedTensors(pub std::sync::Arc<RoundedLookup>);

/// Where [`RoundedTensors`] looks a tensor up: (name, type) -> what the
/// prediction made of it.
pub type RoundedLookup = dyn Fn(&str, GgmlType) -> Option<RoundedTensor> + Send + Sync;

/// What [`predict_ladder`] hands every rounded tensor to: (name, type, bytes,
/// [‖WX‖², ‖(Q(W) − W)X‖²]).
pub type KeepRounded<'a> =
    dyn Fn(&str, GgmlType, &[u8], [f64; 2]) -> std::io::Result<()> + Sync + 'a;

/// A tensor rounded (and measured) before, by a drift budget's prediction.
#[derive(Debug, Clone)]
pub struct RoundedTensor {
    /// Its bytes in the type it was looked up by.
    pub bytes: Vec<u8>,
    /// ‖WX‖² and ‖(Q(W) − W)X‖² over the calibration inputs: a round's
    /// report reuses them instead of multiplying by XᵀX again.
    pub output_norms2: [f64; 2],
}

impl std::fmt::Debug for RoundedTensors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RoundedTensors")
    }
}

/// A compensation adapter to write beside the merged output.
#[derive(Debug, Clone)]
pub struct Compensate {
    /// Rank of each module's pair.
    pub rank: usize,
    /// The adapter GGUF (llama.cpp's LoRA layout, `adapter_type` values).
    pub output: PathBuf,
}

/// How block codes are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rounding {
    /// ggml's own quantizers (bit-identical to llama.cpp's).
    Nearest,
    /// Scales searched to minimise the error weighted by each input's
    /// mean square ([`crate::round::importance`]): needs the statistics' diagonal.
    Imatrix,
    /// Error feedback through the inverse of XᵀX ([`crate::round::gptq`]): needs
    /// the whole matrix.
    Gptq,
}

impl Rounding {
    /// The best rounding the statistics allow: GPTQ with whole matrices,
    /// importance weighting with diagonals (an imatrix), ggml's without.
    pub fn best_for(calib: Option<&crate::calib::CalibStats>) -> Rounding {
        match calib {
            None => Rounding::Nearest,
            Some(c) if c.has_matrices() => Rounding::Gptq,
            Some(_) => Rounding::Imatrix,
        }
    }

    /// The name used on the command line and in provenance.
    pub fn name(self) -> &'static str {
        match self {
            Rounding::Nearest => "nearest",
            Rounding::Imatrix => "imatrix",
            Rounding::Gptq => "gptq",
        }
    }
}

/// GPTQ's damping unless told otherwise: 5% of the mean diagonal. The
/// paper's reference code uses 1% with 128 x 2048 calibration tokens; an
/// adapter's training text is a few thousand, fewer than a wide input's
/// width (SmolLM2's ffn_down: 1536), and on SmolLM2's adapters at q4_0 5%
/// kept more of the gain on held-out text (96.9% / 99.6% against 95.8% /
/// 97.9% at 1%, act order).
pub const DEFAULT_DAMP: f64 = 0.05;

impl ConvertOptions {
    /// Options for a merged output only, with no budget and no --force.
    pub fn new(
        base: impl Into<PathBuf>,
        adapter: Option<PathBuf>,
        policy: QuantPolicy,
        output: impl Into<PathBuf>,
    ) -> ConvertOptions {
        ConvertOptions {
            base: base.into(),
            adapter,
            policy,
            output: Some(output.into()),
            base_output: None,
            adapter_output: None,
            adapter_type: GgmlType::F16,
            force: false,
            max_rel_error: None,
            min_retention: None,
            calib: None,
            rounding: Rounding::Nearest,
            damp: DEFAULT_DAMP,
            act_order: true,
            budget: None,
            compensate: None,
            rounded: None,
            cancel: None,
        }
    }

    /// Whether [`ConvertOptions::cancel`] was set.
    pub fn cancelled(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// One tensor written, for a progress display.
#[derive(Debug, Clone, Copy)]
pub struct ProgressStep<'a> {
    /// Tensors written so far.
    pub done: usize,
    /// Tensors in all.
    pub total: usize,
    /// The tensor just written.
    pub tensor: &'a str,
    /// Its bytes in the merged (or base) output.
    pub bytes: u64,
}

/// Called after each tensor is written.
pub type Progress<'a> = &'a (dyn Fn(&ProgressStep) + Sync);

/// Convert per `opts`, streaming the outputs; returns the report. The
/// outputs appear together at the end, or not at all.
pub fn convert(opts: &ConvertOptions, progress: Progress) -> Result<ConvertReport, ConvertError> {
    let start = Instant::now();
    check_request(opts)?;
    check_outputs(opts)?;
    let (base, adapter, plan) = open_inputs(opts)?;
    // Only the merged output carries the adapter's edits; a base-only pass
    // measures the base's own quantization.
    let out = out_tensors(&base, &plan, opts.output.is_some());
    check_overrides(opts, &out)?;
    let (provenance, hashes) = provenance(opts, &base, adapter.as_ref())?;
    let mut adapter_file = match (&opts.adapter_output, &adapter) {
        (Some(path), Some(a)) => Some(write_adapter_gguf(
            &base,
            a,
            &plan,
            path,
            opts.adapter_type,
            &provenance,
        )?),
        (Some(_), None) => return Err(ConvertError::NoAdapter),
        (None, _) => None,
    };
    if let Some(c) = &opts.calib {
        c.expect_readers(out.iter().map(|t| t.name.as_str()));
    }
    let choices: Vec<_> = out
        .iter()
        .map(|t| opts.policy.choose(&t.name, t.role, t.dims[0]))
        .collect();
    let mut sinks = start_sinks(opts, &base, &provenance, &out, &choices)?;
    let inputs = Inputs {
        base: &base,
        adapter: adapter.as_ref(),
        opts,
    };
    let (reports, pairs) = write_tensors(&inputs, &out, &choices, &mut sinks, progress)?;
    if opts.cancelled() {
        return Err(ConvertError::Cancelled);
    }

    let mut report = report_of(opts, &base, &plan, reports, &adapter_file);
    let broken = broken_bounds(opts, &report);
    let mut compensation = match &opts.compensate {
        Some(c) => Some(start_compensation(c, &base, opts, &provenance, &pairs)?),
        None => None,
    };
    report.totals.peak_rss_bytes = peak_rss_bytes();
    if !broken.is_empty() {
        report.totals.wall_seconds = start.elapsed().as_secs_f64();
        return Err(ConvertError::Budget(broken.join("; "), Box::new(report)));
    }
    {
        let mut streams: Vec<&mut GgufStream> = Vec::new();
        streams.extend(sinks.merged.as_mut());
        streams.extend(sinks.base.as_mut());
        streams.extend(adapter_file.as_mut().map(|(s, _)| s));
        streams.extend(compensation.as_mut());
        hashes.finish(&mut streams)?;
    }
    // Every output is complete; rename them into place.
    if let Some(s) = sinks.merged {
        report.totals.file_size = s.finish()?;
    }
    if let Some(s) = sinks.base {
        report.base_file_size = Some(s.finish()?);
    }
    if let (Some((s, _)), Some(r)) = (adapter_file, report.adapter_gguf.as_mut()) {
        r.file_size = s.finish()?;
    }
    if let (Some(s), Some(c)) = (compensation, &opts.compensate) {
        report.compensation = Some(CompensationReport {
            path: c.output.display().to_string(),
            rank: c.rank,
            modules: pairs.len(),
            file_size: s.finish()?,
        });
    }
    report.totals.wall_seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

/// Refuse options that contradict each other, before anything is opened.
fn check_request(opts: &ConvertOptions) -> Result<(), ConvertError> {
    if opts.output.is_none() && opts.base_output.is_none() && opts.adapter_output.is_none() {
        return Err(ConvertError::Usage(
            "nothing to write: give a merged output, a base output or an adapter output".into(),
        ));
    }
    if opts.rounding != Rounding::Nearest && opts.calib.is_none() {
        return Err(ConvertError::Usage(format!(
            "{} rounding needs calibration statistics",
            opts.rounding.name()
        )));
    }
    if let Some(c) = opts.calib.as_ref().filter(|c| !c.has_matrices()) {
        if opts.rounding == Rounding::Gptq {
            return Err(c
                .refusal("holds only the diagonal of XᵀX (an imatrix); GPTQ needs the whole matrix, imatrix rounding the diagonal".into())
                .into());
        }
    }
    if !(opts.damp >= 0.0 && opts.damp.is_finite()) {
        return Err(ConvertError::Usage(format!(
            "damping {} is not a finite fraction >= 0",
            compact(opts.damp)
        )));
    }
    if let Some(c) = &opts.compensate {
        if opts.output.is_none() || opts.adapter.is_none() || c.rank == 0 {
            return Err(ConvertError::Usage(
                "compensation needs a merged output, an adapter whose modules it covers, and a rank of 1 or more".into(),
            ));
        }
    }
    Ok(())
}

/// Declare the model outputs asked for and start their streams.
fn start_sinks(
    opts: &ConvertOptions,
    base: &BaseModel,
    provenance: &[(String, MetadataValue<'static>)],
    out: &[OutTensor],
    choices: &[quant::TypeChoice],
) -> Result<Sinks, ConvertError> {
    let merged = match &opts.output {
        Some(path) => Some(start_model(
            path,
            base,
            opts,
            provenance,
            out.iter().zip(choices),
        )?),
        None => None,
    };
    let base_stream = match &opts.base_output {
        // The base is shared by every adapter, so it records nothing of this
        // one, nor the rounding: the base output is rounded to nearest.
        Some(path) => {
            let base_provenance: Vec<_> = provenance
                .iter()
                .filter(|(k, _)| {
                    !k.starts_with("lorafold.adapter.")
                        && !k.starts_with("lorafold.merge.")
                        && !k.starts_with("lorafold.calibration.")
                        && k != "lorafold.rounding"
                })
                .cloned()
                .collect();
            let tensors = out.iter().zip(choices).filter(|(t, _)| t.base.is_some());
            Some(start_model(path, base, opts, &base_provenance, tensors)?)
        }
        None => None,
    };
    Ok(Sinks {
        merged,
        base: base_stream,
    })
}

/// Each compensated tensor's name and its rank-R pair, in file order.
type CompensationPairs = Vec<(String, StoredPair)>;

/// What every tensor is made from.
struct Inputs<'a> {
    base: &'a BaseModel,
    adapter: Option<&'a PeftAdapter>,
    opts: &'a ConvertOptions,
}

/// Make and write every tensor in file order; the reports and the
/// compensation pairs. Tensors the adapter leaves alone stream by rows on
/// every core; the rest run as parallel batches as wide as the thread pool,
/// which bounds memory to a few whole tensors in flight. Results are written
/// in order, so the output does not depend on scheduling.
fn write_tensors(
    inputs: &Inputs,
    out: &[OutTensor],
    choices: &[quant::TypeChoice],
    sinks: &mut Sinks,
    progress: Progress,
) -> Result<(Vec<TensorReport>, CompensationPairs), ConvertError> {
    let mut reports = Vec::with_capacity(out.len());
    let mut pairs = Vec::new();
    if sinks.merged.is_none() && sinks.base.is_none() {
        return Ok((reports, pairs));
    }
    let Inputs {
        base,
        adapter,
        opts,
    } = *inputs;
    let written_to = opts.output.as_deref().or(opts.base_output.as_deref());
    // A value the type cannot hold is refused naming the file it was to be
    // written to, as the writer names it.
    let named = |e: ConvertError| match (e, written_to) {
        (ConvertError::Quant(source @ QuantError::Overflow { .. }), Some(path)) => {
            ConvertError::Written {
                path: path.to_path_buf(),
                source,
            }
        }
        (e, _) => e,
    };
    let making: Vec<Making> = out
        .iter()
        .zip(choices)
        .map(|(t, c)| Making::of(t, c.ggml_type, base, opts))
        .collect();
    let batch = rayon::current_num_threads().max(1) * 2;
    let mut i = 0;
    while i < out.len() {
        // Between batches: a batch is a few tensors, so a cancel is seen
        // within seconds even at 7B, and the outputs are dropped unfinished.
        if opts.cancelled() {
            return Err(ConvertError::Cancelled);
        }
        let mut done = Vec::new();
        if making[i] == Making::Whole {
            let mut j = i;
            while j < out.len() && j - i < batch && making[j] == Making::Whole {
                j += 1;
            }
            let results: Vec<Result<Processed, ConvertError>> = (i..j)
                .into_par_iter()
                .map(|k| process(&out[k], &choices[k], base, adapter, opts))
                .collect();
            for (k, r) in (i..j).zip(results) {
                let p = r.map_err(named)?;
                sinks.write(&out[k], &p)?;
                if let Some(c) = p.compensation {
                    pairs.push((out[k].name.clone(), c));
                }
                done.push((k, p.report));
            }
            i = j;
        } else {
            let r = stream_tensor(&out[i], &choices[i], making[i], base, opts, sinks);
            done.push((i, r.map_err(named)?));
            i += 1;
        }
        for (k, r) in done {
            progress(&ProgressStep {
                done: reports.len() + 1,
                total: out.len(),
                tensor: &out[k].name,
                bytes: r.n_bytes,
            });
            reports.push(r);
        }
    }
    Ok((reports, pairs))
}

/// The report of a conversion whose tensors were all written.
fn report_of(
    opts: &ConvertOptions,
    base: &BaseModel,
    plan: &MergePlan,
    reports: Vec<TensorReport>,
    adapter_file: &Option<(GgufStream, crate::write::adapter_gguf::AdapterReport)>,
) -> ConvertReport {
    let mut notes = base.notes.clone();
    notes.extend(plan.notes.iter().cloned());
    notes.extend(
        reports
            .iter()
            .filter_map(|r| r.fallback.as_ref().map(|f| format!("{}: {f}", r.name))),
    );
    ConvertReport {
        output: opts.output.as_ref().map(|p| p.display().to_string()),
        base_output: opts.base_output.as_ref().map(|p| p.display().to_string()),
        base: opts.base.display().to_string(),
        adapter: opts.adapter.as_ref().map(|p| p.display().to_string()),
        quant: opts.policy.name.clone(),
        totals: Totals::of(&reports),
        tensors: reports,
        base_file_size: None,
        adapter_gguf: adapter_file.as_ref().map(|(_, r)| r.clone()),
        notes,
        budget: None,
        compensation: None,
    }
}

/// The --max-rel-error and --min-retention bounds the report breaks, in words.
fn broken_bounds(opts: &ConvertOptions, report: &ConvertReport) -> Vec<String> {
    let mut broken = Vec::new();
    if let Some(max) = opts.max_rel_error {
        if report.totals.max_rel_error > max {
            broken.push(format!(
                "relative error {:.3e} of '{}' exceeds the maximum {max:e}",
                report.totals.max_rel_error, report.totals.max_rel_error_tensor
            ));
        }
    }
    if let (Some(min), Some(got)) = (opts.min_retention, report.totals.retention) {
        if got < min {
            broken.push(format!(
                "adapter retention {got:.4} is below the minimum {}",
                compact(min)
            ));
        }
    }
    broken
}

/// Everything about `opts` that can be refused before any work: the output
/// paths, the inputs (opened, not read) and the policy's overrides against
/// the model's tensors; [`convert`] checks the same as it starts. For a
/// caller with work to do first (calibrating on a text).
pub fn check(opts: &ConvertOptions) -> Result<(), ConvertError> {
    check_outputs(opts)?;
    let (base, _, plan) = open_inputs(opts)?;
    check_overrides(opts, &out_tensors(&base, &plan, opts.output.is_some()))
}

/// Refuse a tensor type override that matches none of the tensors written.
fn check_overrides(opts: &ConvertOptions, out: &[OutTensor]) -> Result<(), ConvertError> {
    match opts
        .policy
        .unmatched_override(out.iter().map(|t| t.name.as_str()))
    {
        Some((pattern, ty)) => Err(QuantError::UnmatchedOverride {
            model: opts.base.clone(),
            pattern: pattern.into(),
            ty: ty.into(),
        }
        .into()),
        None => Ok(()),
    }
}

/// The base, the adapter (refused when it assumes a modified base, unless
/// forced) and the plan of what it changes.
fn open_inputs(
    opts: &ConvertOptions,
) -> Result<(BaseModel, Option<PeftAdapter>, MergePlan), ConvertError> {
    let base = BaseModel::open(&opts.base)?;
    if let Some(c) = &opts.calib {
        let matrices = base.tensors.iter().filter(|t| t.dims.len() == 2);
        c.check_fits(matrices.map(|t| (t.name.as_str(), t.dims[0] as usize)))?;
    }
    let adapter = opts.adapter.as_ref().map(PeftAdapter::open).transpose()?;
    if let Some(a) = &adapter {
        if let (Some(what), false) = (a.config.modified_base_init(), opts.force) {
            return Err(ConvertError::ModifiedBase {
                path: a.dir.join("adapter_config.json"),
                what,
            });
        }
    }
    let plan = match &adapter {
        Some(a) => MergePlan::new(&base, a)?,
        None => MergePlan::default(),
    };
    Ok((base, adapter, plan))
}

/// Every output path is usable (its folder exists; nothing but a regular file
/// is there), distinct from the others and from every input file, checked
/// before any input is read.
pub(crate) fn check_outputs(opts: &ConvertOptions) -> Result<(), OutputError> {
    let outputs: Vec<(&str, &Path)> = [
        ("merged output", opts.output.as_deref()),
        ("base output", opts.base_output.as_deref()),
        ("adapter output", opts.adapter_output.as_deref()),
        (
            "compensation output",
            opts.compensate.as_ref().map(|c| c.output.as_path()),
        ),
    ]
    .into_iter()
    .filter_map(|(role, p)| p.map(|p| (role, p)))
    .collect();
    let base_files = input_files(&opts.base);
    let adapter_files = opts.adapter.as_deref().map(input_files).unwrap_or_default();
    let inputs: Vec<(&str, &Path)> = base_files
        .iter()
        .map(|f| ("base", f.as_path()))
        .chain(adapter_files.iter().map(|f| ("adapter", f.as_path())))
        .collect();
    check_distinct(&outputs, &inputs)?;
    for (_, p) in &outputs {
        check_file_destination(p)?;
    }
    Ok(())
}

/// The files a conversion reads from an input: the file itself, or a
/// folder's safetensors and JSON files (an HF model or a PEFT adapter), in
/// name order.
pub fn input_files(path: &Path) -> Vec<PathBuf> {
    if !path.is_dir() {
        return vec![path.to_path_buf()];
    }
    let mut v: Vec<PathBuf> = std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "safetensors" || e == "json")
        })
        .collect();
    v.sort();
    v
}

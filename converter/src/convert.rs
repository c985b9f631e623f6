//! The conversion pipeline: one pass over the base's tensors, merged,
//! quantized and streamed to the writer in parallel batches.

use lorafold_runtime::gguf::names;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use lorafold_runtime::gguf::{GgmlType, MetadataValue};
use lorafold_runtime::number::compact;
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::adapter_gguf::{write_adapter_gguf, AdapterError};
use crate::base::{BaseError, BaseModel, BaseTensor};
use crate::compensate::StoredPair;
use crate::gguf_writer::{GgufStream, GgufWriter, WriteError};
use crate::merge::{self, MergeError, MergePlan, TensorEdit};
use crate::output::{check_distinct, check_file_destination, OutputError};
use crate::peft::{ModuleKind, PeftAdapter, PeftError};
use crate::quant::{self, QuantError, QuantPolicy, TensorRole};
use crate::report::{
    peak_rss_bytes, CompensationReport, ConvertReport, ErrorSums, TensorReport, Totals,
};

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
    /// up front ([`crate::gptq::inverse_cholesky`]).
    pub act_order: bool,
    /// The drift budget the type mix was chosen for, recorded in the
    /// provenance ([`crate::budget`]).
    pub budget: Option<String>,
    /// Also write the rank-R compensation of the adapted modules' rounding
    /// error as a LoRA GGUF ([`crate::compensate`]).
    pub compensate: Option<Compensate>,
    /// Tensors already rounded (by [`predict_ladder`]), taken instead of
    /// rounding again.
    pub rounded: Option<RoundedTensors>,
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
    /// mean square ([`crate::importance`]): needs the statistics' diagonal.
    Imatrix,
    /// Error feedback through the inverse of XᵀX ([`crate::gptq`]): needs
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
        }
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

struct OutTensor<'a> {
    name: String,
    dims: Vec<u64>,
    base: Option<&'a BaseTensor>,
    edit: Option<&'a TensorEdit>,
    role: TensorRole,
}

/// Convert per `opts`, streaming the outputs; returns the report. The
/// outputs appear together at the end, or not at all.
pub fn convert(opts: &ConvertOptions, progress: Progress) -> Result<ConvertReport, ConvertError> {
    let start = Instant::now();
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
    check_outputs(opts)?;
    let (base, adapter, plan) = open_inputs(opts)?;
    // Only the merged output carries the adapter's edits; a base-only pass
    // measures the base's own quantization.
    let merging = opts.output.is_some();
    let out = out_tensors(&base, &plan, merging);
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
    let base_tensors = out.iter().zip(&choices).filter(|(t, _)| t.base.is_some());
    let mut merged_stream = match &opts.output {
        Some(path) => Some(start_model(
            path,
            &base,
            opts,
            &provenance,
            out.iter().zip(&choices),
        )?),
        None => None,
    };
    let mut base_stream = match &opts.base_output {
        // The base is shared by every adapter, so it records nothing of this one.
        Some(path) => {
            let base_provenance: Vec<_> = provenance
                .iter()
                .filter(|(k, _)| {
                    // Nor the rounding: the base output is rounded to nearest.
                    !k.starts_with("lorafold.adapter.")
                        && !k.starts_with("lorafold.merge.")
                        && !k.starts_with("lorafold.calibration.")
                        && k != "lorafold.rounding"
                })
                .cloned()
                .collect();
            Some(start_model(
                path,
                &base,
                opts,
                &base_provenance,
                base_tensors,
            )?)
        }
        None => None,
    };

    // Batches as wide as the thread pool keep every core busy while bounding
    // memory to a few tensors in flight; results are written in order, so the
    // output does not depend on scheduling.
    let mut reports = Vec::with_capacity(out.len());
    let mut pairs = Vec::new();
    let written_to = opts.output.as_deref().or(opts.base_output.as_deref());
    if merged_stream.is_some() || base_stream.is_some() {
        let batch = rayon::current_num_threads().max(1) * 2;
        let total = out.len();
        for (chunk_i, chunk) in out.chunks(batch).enumerate() {
            let results: Vec<Result<Processed, ConvertError>> = chunk
                .par_iter()
                .enumerate()
                .map(|(j, t)| {
                    let choice = &choices[chunk_i * batch + j];
                    process(
                        t,
                        choice.ggml_type,
                        choice.fallback.clone(),
                        &base,
                        adapter.as_ref(),
                        opts,
                    )
                })
                .collect();
            for (t, r) in chunk.iter().zip(results) {
                // A value the type cannot hold is refused naming the file
                // it was to be written to, as the writer names it.
                let p = r.map_err(|e| match (e, written_to) {
                    (ConvertError::Quant(source @ QuantError::Overflow { .. }), Some(path)) => {
                        ConvertError::Written {
                            path: path.to_path_buf(),
                            source,
                        }
                    }
                    (e, _) => e,
                })?;
                if let Some(s) = merged_stream.as_mut() {
                    s.write_tensor(&t.name, &p.bytes)?;
                }
                if let (Some(s), true) = (base_stream.as_mut(), t.base.is_some()) {
                    s.write_tensor(&t.name, p.base_bytes.as_ref().unwrap_or(&p.bytes))?;
                }
                reports.push(p.report);
                if let Some(c) = p.compensation {
                    pairs.push((t.name.clone(), c));
                }
                progress(&ProgressStep {
                    done: reports.len(),
                    total,
                    tensor: &t.name,
                    bytes: p.bytes.len() as u64,
                });
            }
        }
    }

    let mut notes = base.notes.clone();
    notes.extend(plan.notes.iter().cloned());
    notes.extend(
        reports
            .iter()
            .filter_map(|r| r.fallback.as_ref().map(|f| format!("{}: {f}", r.name))),
    );
    let mut report = ConvertReport {
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
    };
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
        streams.extend(merged_stream.as_mut());
        streams.extend(base_stream.as_mut());
        streams.extend(adapter_file.as_mut().map(|(s, _)| s));
        streams.extend(compensation.as_mut());
        hashes.finish(&mut streams)?;
    }
    // Every output is complete; rename them into place.
    if let Some(s) = merged_stream {
        report.totals.file_size = s.finish()?;
    }
    if let Some(s) = base_stream {
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

/// One precision a tensor can take: its type, its size and its predicted
/// squared output error relative to the output, ‖(Q(W) − W)X‖² / ‖WX‖².
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rung {
    /// The ggml type.
    pub ggml_type: GgmlType,
    /// The tensor's bytes in this type.
    pub bytes: u64,
    /// Predicted relative squared output error.
    pub error2: f64,
}

/// The precisions one merged tensor can take, its policy's type first.
#[derive(Debug, Clone)]
pub struct TensorLadder {
    /// The tensor.
    pub tensor: String,
    /// The policy's type, then each wider one of the ladder, by size.
    pub rungs: Vec<Rung>,
}

/// For every merged tensor of a block type whose input the calibration
/// statistics cover, the output error of its policy type and of each type of
/// `ladder` that is wider and fits its rows, each rounded as `opts` says
/// (the prediction a drift budget spends bytes by); `keep` is given every
/// rounded tensor. Tensors run in parallel; each type's error is one more
/// read of its input's XᵀX.
pub fn predict_ladder(
    opts: &ConvertOptions,
    ladder: &[GgmlType],
    keep: &KeepRounded<'_>,
) -> Result<Vec<TensorLadder>, ConvertError> {
    let Some(calib) = &opts.calib else {
        return Err(ConvertError::Usage(
            "predicting output errors needs calibration statistics".into(),
        ));
    };
    let (base, adapter, plan) = open_inputs(opts)?;
    let out = out_tensors(&base, &plan, true);
    let todo: Vec<(&OutTensor, GgmlType)> = out
        .iter()
        .filter(|t| calib.for_tensor(&t.name).is_some())
        .map(|t| {
            let c = opts.policy.choose(&t.name, t.role, t.dims[0]);
            (t, c.ggml_type)
        })
        .filter(|(_, ty)| quant::BLOCK_TYPES.contains(ty))
        .collect();
    // Each input's GPTQ factor is dropped after its last tensor here too.
    calib.expect_readers(todo.iter().map(|(t, _)| t.name.as_str()));
    todo.par_iter()
        .map(|&(t, policy_type)| {
            let n: u64 = t.dims.iter().product();
            let merged = merged_values(t, &base, adapter.as_ref())?;
            let stats = stats_of(t, opts)?.expect("filtered to covered tensors");
            let size = |ty: GgmlType| ty.bytes_for(n).unwrap_or(u64::MAX);
            let mut types = vec![policy_type];
            types.extend(
                ladder.iter().copied().filter(|&ty| {
                    size(ty) > size(policy_type) && (t.dims[0] % ty.block_size()) == 0
                }),
            );
            types.sort_by_key(|&ty| size(ty));
            types.dedup();
            let w = &merged.values;
            let mut rungs = Vec::with_capacity(types.len());
            let mut norm2 = None;
            for ty in types {
                let bytes = round(t, ty, w, Some(stats), opts)?;
                let q = quant::dequantize(ty, &bytes, n as usize, &t.name)?;
                let d: Vec<f32> = q.iter().zip(w).map(|(a, b)| a - b).collect();
                // ‖WX‖² once per tensor; each rung's error streams alone.
                let norms = match norm2 {
                    None => output_norms2(stats, &t.name, &[w, &d])?,
                    Some(wn) => vec![wn, output_norms2(stats, &t.name, &[&d])?[0]],
                };
                norm2 = Some(norms[0]);
                keep(&t.name, ty, &bytes, [norms[0], norms[1]]).map_err(|source| {
                    ConvertError::Io {
                        path: PathBuf::from(&t.name),
                        source,
                    }
                })?;
                rungs.push(Rung {
                    ggml_type: ty,
                    bytes: bytes.len() as u64,
                    error2: relative2(norms[1], norms[0]),
                });
            }
            stats.reader_done();
            Ok(TensorLadder {
                tensor: t.name.clone(),
                rungs,
            })
        })
        .collect()
}

/// Declare the compensation adapter (llama.cpp's LoRA layout, scale 1 for
/// every pair: alpha = rank, B scaled where a tensor's rank is lower) and
/// start its stream.
fn start_compensation(
    c: &Compensate,
    base: &BaseModel,
    opts: &ConvertOptions,
    provenance: &[(String, MetadataValue<'static>)],
    pairs: &[(String, StoredPair)],
) -> Result<GgufStream, ConvertError> {
    let alpha = c.rank as f32;
    let mut w = crate::adapter_gguf::lora_writer(&c.output, base.arch.gguf_name(), alpha)?;
    w.add_metadata(
        "lorafold.compensation",
        &MetadataValue::string(format!(
            "rank-{} approximation of W - Q(W) of each adapted module{}; add to the merged file at scale 1",
            c.rank,
            if opts.calib.is_some() {
                format!(", nearest in the output norm of the calibration's XᵀX damped by {}", opts.damp)
            } else {
                String::new()
            }
        )),
    )?;
    for (k, v) in provenance {
        w.add_metadata(k, v)?;
    }
    let ty = opts.adapter_type;
    for (name, p) in pairs {
        let lr = &p.applied;
        let k = (lr.a.len() / lr.rank.max(1)) as u64;
        let rows = (lr.b.len() / lr.rank.max(1)) as u64;
        w.add_tensor(&names::lora_a(name), ty, &[k, lr.rank as u64])?;
        w.add_tensor(&names::lora_b(name), ty, &[lr.rank as u64, rows])?;
    }
    let mut stream = w.start()?;
    for (name, p) in pairs {
        stream.write_tensor(&names::lora_a(name), &p.a)?;
        stream.write_tensor(&names::lora_b(name), &p.b)?;
    }
    Ok(stream)
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

/// Declare a model GGUF (the base's metadata, our provenance, the tensors) and
/// start its stream.
fn start_model<'a>(
    path: &Path,
    base: &BaseModel,
    opts: &ConvertOptions,
    provenance: &[(String, MetadataValue<'static>)],
    tensors: impl Iterator<Item = (&'a OutTensor<'a>, &'a quant::TypeChoice)>,
) -> Result<GgufStream, ConvertError> {
    let mut w = GgufWriter::new(path);
    for (k, v) in base.metadata() {
        if k.starts_with("lorafold.")
            || matches!(
                k.as_str(),
                names::FILE_TYPE | names::QUANTIZATION_VERSION | names::ALIGNMENT
            )
        {
            continue;
        }
        w.add_metadata(&k, &v)?;
    }
    w.add_metadata(
        names::FILE_TYPE,
        &MetadataValue::U32(opts.policy.file_type()),
    )?;
    w.add_metadata(names::QUANTIZATION_VERSION, &MetadataValue::U32(2))?;
    for (k, v) in provenance {
        w.add_metadata(k, v)?;
    }
    for (t, c) in tensors {
        w.add_tensor(&t.name, c.ggml_type, &t.dims)?;
    }
    Ok(w.start()?)
}

/// The output's tensors in file order: the base's, then those the adapter
/// adds; with `merging`, each carries its edit, and every one its role.
fn out_tensors<'a>(base: &'a BaseModel, plan: &'a MergePlan, merging: bool) -> Vec<OutTensor<'a>> {
    let mut out: Vec<OutTensor> = base
        .tensors
        .iter()
        .map(|t| OutTensor {
            name: t.name.clone(),
            dims: t.dims.clone(),
            base: Some(t),
            edit: plan.edits.get(&t.name).filter(|_| merging),
            role: TensorRole::Other,
        })
        .collect();
    if merging {
        for (name, e) in &plan.edits {
            if let Some(dims) = &e.new_dims {
                out.push(OutTensor {
                    name: name.clone(),
                    dims: dims.clone(),
                    base: None,
                    edit: Some(e),
                    role: TensorRole::Other,
                });
            }
        }
    }
    let has_output = out.iter().any(|t| t.name == names::OUTPUT);
    let n_layers = base.shape.n_layers;
    for t in &mut out {
        t.role = role(&t.name, t.dims.len(), has_output, n_layers);
    }
    out
}

fn role(name: &str, n_dims: usize, has_output: bool, n_layers: usize) -> TensorRole {
    if n_dims < 2 {
        return TensorRole::Vector;
    }
    let layer = || {
        name.split('.')
            .nth(1)
            .and_then(|l| l.parse().ok())
            .unwrap_or(0)
    };
    match name {
        names::OUTPUT => TensorRole::Output,
        names::TOKEN_EMBD if !has_output => TensorRole::Output,
        names::TOKEN_EMBD => TensorRole::TokenEmbedding,
        n if n.ends_with(".attn_v.weight") => TensorRole::AttnV {
            layer: layer(),
            n_layers,
        },
        n if n.ends_with(".ffn_down.weight") => TensorRole::FfnDown {
            layer: layer(),
            n_layers,
        },
        _ => TensorRole::Other,
    }
}

/// ‖E X‖² for each `E` of `each` (rows of the tensor's width), from its
/// input's statistics.
fn output_norms2(
    s: &crate::calib::InputStats,
    tensor: &str,
    each: &[&[f32]],
) -> Result<Vec<f64>, ConvertError> {
    s.output_norms2(each).map_err(|e| {
        quant::QuantError::Codec {
            tensor: tensor.into(),
            problem: format!("output error: {e}"),
        }
        .into()
    })
}

/// An error relative to the output's size (both squared); the error itself
/// when the output is zero.
fn relative2(err2: f64, norm2: f64) -> f64 {
    if norm2 > 0.0 {
        err2 / norm2
    } else {
        err2
    }
}

/// Values dequantized at a time to measure a tensor's error.
const MEASURE_RUN: usize = 1 << 16;

/// One tensor, merged, quantized and measured.
struct Processed {
    /// The merged tensor's bytes.
    bytes: Vec<u8>,
    /// The base tensor's bytes, where they differ from `bytes`.
    base_bytes: Option<Vec<u8>>,
    report: TensorReport,
    /// The rank-R pair for the rounding error, when compensating.
    compensation: Option<StoredPair>,
}

/// W0 + s·B·A for one tensor (W0 alone without an edit), in f32.
fn merged_values(
    t: &OutTensor,
    base: &BaseModel,
    adapter: Option<&PeftAdapter>,
) -> Result<merge::Merged, ConvertError> {
    let n: usize = t.dims.iter().product::<u64>() as usize;
    let w0 = match t.base {
        Some(b) => base.values(b)?,
        None => vec![0f32; n],
    };
    Ok(match (t.edit, adapter) {
        (Some(e), Some(a)) => merge::apply(&t.name, e, w0, row_len(t), a)?,
        _ => merge::Merged {
            values: w0,
            base: Vec::new(),
            delta: None,
        },
    })
}

// Bases are checked at open to have no 0-dimensional or empty tensor; a
// missing dim still must not panic here.
fn row_len(t: &OutTensor) -> usize {
    t.dims.first().map_or(1, |&d| d.max(1) as usize)
}

/// The calibration statistics of a tensor's input, checked to be as wide as
/// its rows.
fn stats_of<'o>(
    t: &OutTensor,
    opts: &'o ConvertOptions,
) -> Result<Option<&'o crate::calib::InputStats>, ConvertError> {
    let stats = opts.calib.as_deref().and_then(|c| c.for_tensor(&t.name));
    match stats {
        Some(s) if s.k != row_len(t) => Err(quant::QuantError::Codec {
            tensor: t.name.clone(),
            problem: format!(
                "the calibration statistics of its input are {} wide, the tensor's rows {}: statistics of another model",
                s.k,
                row_len(t)
            ),
        }
        .into()),
        s => Ok(s),
    }
}

/// ", with the statistics of FILE" for errors the calibration statistics cause
/// (GPTQ's and compensation's factorisations).
fn calibration_source(opts: &ConvertOptions) -> String {
    match opts.calib.as_ref().and_then(|c| c.source.as_ref()) {
        Some(p) => format!(", with the statistics of {}", p.display()),
        None => String::new(),
    }
}

/// Whether a tensor of `ggml_type` whose input has statistics takes the
/// chosen rounding rather than ggml's nearest.
fn is_chosen(ggml_type: GgmlType, opts: &ConvertOptions) -> bool {
    opts.rounding != Rounding::Nearest && quant::BLOCK_TYPES.contains(&ggml_type)
}

/// `values` quantized to `ggml_type` by the chosen rounding where `stats`
/// cover the input, by ggml's quantizer elsewhere.
fn round(
    t: &OutTensor,
    ggml_type: GgmlType,
    values: &[f32],
    stats: Option<&crate::calib::InputStats>,
    opts: &ConvertOptions,
) -> Result<Vec<u8>, ConvertError> {
    let bad = |e: crate::gptq::GptqError| quant::QuantError::Codec {
        tensor: t.name.clone(),
        problem: format!("{e}{}", calibration_source(opts)),
    };
    let rows = values.len() / row_len(t);
    // Tensors whose input no statistics cover (embeddings, the output
    // head) and float or nearest tensors take ggml's quantizer.
    Ok(match stats.filter(|_| is_chosen(ggml_type, opts)) {
        None => quant::quantize(ggml_type, values, &t.name)?,
        Some(s) if opts.rounding == Rounding::Imatrix => {
            crate::importance::importance_round(ggml_type, values, rows, &s.importance(), &t.name)?
        }
        Some(s) if s.has_matrix() => {
            let f = s.gptq_factor(opts.damp, opts.act_order).map_err(bad)?;
            // Block scales searched with the diagonal's weights, as imatrix
            // rounding does (SmolLM2 + pirate at q4_0, natural order, when
            // introduced: KL 0.114 -> 0.090 against ggml's nearest scales).
            let imp = s.importance();
            crate::gptq::gptq(ggml_type, values, rows, &f, Some(&imp), &t.name).map_err(bad)?
        }
        Some(_) => {
            return Err(quant::QuantError::Codec {
                tensor: t.name.clone(),
                problem: "GPTQ needs the whole XᵀX of its input; these statistics hold only its diagonal (an imatrix): use imatrix rounding".into(),
            }
            .into())
        }
    })
}

/// Merge, quantize and measure one tensor.
fn process(
    t: &OutTensor,
    ggml_type: GgmlType,
    fallback: Option<String>,
    base: &BaseModel,
    adapter: Option<&PeftAdapter>,
    opts: &ConvertOptions,
) -> Result<Processed, ConvertError> {
    let n: usize = t.dims.iter().product::<u64>() as usize;
    let merged = merged_values(t, base, adapter)?;
    let stats = stats_of(t, opts)?;
    let chosen = stats.is_some() && is_chosen(ggml_type, opts);
    let (bytes, known_norms2) = match opts
        .rounded
        .as_ref()
        .and_then(|r| (r.0)(&t.name, ggml_type))
    {
        Some(r) => (r.bytes, Some(r.output_norms2)),
        None => (round(t, ggml_type, &merged.values, stats, opts)?, None),
    };
    if let Some(s) = stats {
        s.reader_done();
    }
    let mut base_bytes = None;
    if merged.delta.is_some()
        || (merged.base.len() == n && t.edit.is_some_and(|e| e.replace.is_some()))
    {
        // The base file keeps the base's tensor (a saved tensor may have
        // replaced it in the merge); a delta's retention is measured on it.
        base_bytes = Some(quant::quantize(ggml_type, &merged.base, &t.name)?);
    }
    let linear = t.dims.len() == 2
        && t.edit.is_some_and(|e| {
            e.lora
                .as_ref()
                .is_some_and(|l| l.module.kind == ModuleKind::Linear)
        });
    let compensating = opts.compensate.is_some() && linear;
    // Measured a run of rows at a time: a whole dequantized copy (the token
    // embedding's: 113 MB in f32 for SmolLM2) is kept only for what needs it.
    let mut whole = (stats.is_some() || compensating).then(|| Vec::with_capacity(n));
    let mut sums = ErrorSums::default();
    let k = row_len(t);
    let rows = n / k;
    let row_bytes = bytes.len() / rows.max(1);
    let run = (MEASURE_RUN / k).max(1);
    for r0 in (0..rows).step_by(run) {
        let r1 = (r0 + run).min(rows);
        let (vals, bs) = (r0 * k..r1 * k, r0 * row_bytes..r1 * row_bytes);
        let qw = quant::dequantize(ggml_type, &bytes[bs.clone()], vals.len(), &t.name)?;
        let q_w0 = match (&merged.delta, &base_bytes) {
            (Some(_), Some(b)) => Some(quant::dequantize(ggml_type, &b[bs], vals.len(), &t.name)?),
            _ => None,
        };
        let changed = merged
            .delta
            .as_ref()
            .zip(q_w0.as_ref())
            .map(|(dw, q)| (&merged.base[vals.clone()], q.as_slice(), &dw[vals.clone()]));
        sums.add(&merged.values[vals.clone()], &qw, changed);
        if let Some(w) = whole.as_mut() {
            w.extend_from_slice(&qw);
        }
    }
    let mut report = TensorReport::from_sums(
        &t.name,
        ggml_type.name().to_string(),
        fallback,
        bytes.len() as u64,
        &sums,
    );
    let qw = whole.unwrap_or_default();
    let w = &merged.values;
    let compensation = match &opts.compensate {
        Some(c) if compensating => {
            let residual: Vec<f32> = w.iter().zip(&qw).map(|(a, q)| a - q).collect();
            let failed = |e: &dyn std::fmt::Display| quant::QuantError::Codec {
                tensor: t.name.clone(),
                problem: format!("compensation: {e}{}", calibration_source(opts)),
            };
            let h = match stats.filter(|s| s.has_matrix()) {
                Some(s) => Some(s.xtx().map_err(|e| failed(&e))?),
                None => None,
            };
            let (rows, k) = (n / row_len(t), row_len(t));
            let lr =
                crate::compensate::low_rank(&residual, rows, k, c.rank, h.as_deref(), opts.damp)
                    .map_err(|e| failed(&e))?;
            // Measured below as stored: the report claims what the file gives.
            Some(
                lr.store(opts.adapter_type, c.rank as f32, &t.name)
                    .map_err(|e| failed(&e))?,
            )
        }
        _ => None,
    };
    if let Some(s) = stats {
        // Every error this tensor reports, from one read of its input's XᵀX.
        let diff = |q: &[f32]| -> Vec<f32> { q.iter().zip(w).map(|(a, b)| a - b).collect() };
        let mut deltas = vec![diff(&qw)];
        let nearest_at = if chosen {
            let near = quant::quantize(ggml_type, w, &t.name)?;
            deltas.push(diff(&quant::dequantize(ggml_type, &near, n, &t.name)?));
            Some(deltas.len())
        } else {
            None
        };
        let compensated_at = match compensation.as_ref().map(|p| &p.applied) {
            Some(lr) => {
                // Q(W) + B·A − W: what is left once the pair is added back.
                let k = row_len(t);
                let mut left = vec![0f32; n];
                for (r, row) in left.chunks_exact_mut(k).enumerate() {
                    for (c, a) in lr.a.chunks_exact(k).enumerate() {
                        let b = lr.b[r * lr.rank + c];
                        row.iter_mut().zip(a).for_each(|(x, &a)| *x += b * a);
                    }
                    let i = r * k;
                    for (j, x) in row.iter_mut().enumerate() {
                        *x = qw[i + j] + *x - w[i + j];
                    }
                }
                deltas.push(left);
                Some(deltas.len())
            }
            None => None,
        };
        // A budget round's tensors were measured by the prediction: only
        // the comparisons (nearest, compensated) are multiplied out here.
        let norms = match known_norms2 {
            Some(known) => {
                let rest: Vec<&[f32]> = deltas[1..].iter().map(Vec::as_slice).collect();
                let mut norms = known.to_vec();
                if !rest.is_empty() {
                    norms.extend(output_norms2(s, &t.name, &rest)?);
                }
                norms
            }
            None => {
                let mut each: Vec<&[f32]> = vec![w];
                each.extend(deltas.iter().map(Vec::as_slice));
                output_norms2(s, &t.name, &each)?
            }
        };
        let rel = |i: usize| relative2(norms[i], norms[0]).sqrt();
        report.output_error = Some(rel(1));
        report.output_error_nearest = nearest_at.map(rel);
        report.output_error_compensated = compensated_at.map(rel);
    }
    Ok(Processed {
        bytes,
        base_bytes,
        report,
        compensation,
    })
}

/// The sha256 of a file's bytes, in hex.
pub fn sha256_file(path: &Path) -> Result<String, ConvertError> {
    sha256_of(path).map_err(|source| ConvertError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn sha256_of(path: &Path) -> std::io::Result<String> {
    let mut f = lorafold_runtime::input::open_regular(path, "a file")?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// The inputs' sha256, computed on a thread beside the conversion (one
/// read of each input, overlapping the work instead of preceding it: 13%
/// of a SmolLM2 f32 conversion's time); the headers carry placeholders of
/// the same length until then.
struct PendingHashes {
    files: Vec<PathBuf>,
    job: std::thread::JoinHandle<Vec<std::io::Result<String>>>,
}

impl PendingHashes {
    fn start(files: Vec<PathBuf>) -> PendingHashes {
        let todo = files.clone();
        let job = std::thread::spawn(move || todo.iter().map(|f| sha256_of(f)).collect());
        PendingHashes { files, job }
    }

    /// The stand-in for the `i`th file's hash: 64 characters, like a hash.
    fn placeholder(i: usize) -> String {
        format!("{:#<64}", format!("lorafold-sha256-pending-{i}-"))
    }

    /// Wait for the hashes and write them over their placeholders.
    fn finish(self, streams: &mut [&mut GgufStream]) -> Result<(), ConvertError> {
        let hashes = self.job.join().unwrap_or_else(|_| {
            (0..self.files.len())
                .map(|_| Err(std::io::Error::other("the hashing thread panicked")))
                .collect()
        });
        for (i, (h, path)) in hashes.into_iter().zip(&self.files).enumerate() {
            let h = h.map_err(|source| ConvertError::Io {
                path: path.clone(),
                source,
            })?;
            for s in streams.iter_mut() {
                s.patch(&PendingHashes::placeholder(i), &h)?;
            }
        }
        Ok(())
    }
}

/// lorafold.* keys: where the output came from and how it was made. Only
/// inputs and options go in (no paths or times), so outputs are reproducible.
/// The inputs' sha256 are placeholders until [`PendingHashes::finish`].
fn provenance(
    opts: &ConvertOptions,
    base: &BaseModel,
    adapter: Option<&PeftAdapter>,
) -> Result<(Vec<(String, MetadataValue<'static>)>, PendingHashes), ConvertError> {
    let mut md = vec![(
        "lorafold.version".to_string(),
        MetadataValue::string(VERSION),
    )];
    let base_files = input_files(&base.path);
    let mut files = Vec::new();
    let mut hashed = |f: PathBuf, shown: &str| {
        let line = format!("{}  {shown}", PendingHashes::placeholder(files.len()));
        files.push(f);
        line
    };
    let hashes: Vec<String> = base_files
        .iter()
        .map(|f| {
            hashed(
                f.clone(),
                &f.file_name().unwrap_or_default().to_string_lossy(),
            )
        })
        .collect();
    md.push((
        "lorafold.base.sha256".into(),
        MetadataValue::string_array(hashes),
    ));
    if let Some(a) = adapter {
        let cfg = a.dir.join("adapter_config.json");
        md.push((
            "lorafold.adapter.sha256".into(),
            MetadataValue::string_array([
                hashed(cfg, "adapter_config.json"),
                hashed(a.tensors_path.clone(), "adapter_model.safetensors"),
            ]),
        ));
        let config_json = serde_json::to_string(&a.config).unwrap_or_default();
        md.push((
            "lorafold.adapter.config".into(),
            MetadataValue::string(config_json),
        ));
        md.push((
            "lorafold.adapter.scales".into(),
            MetadataValue::string_array(
                a.modules.iter().map(|m| format!("{}={}", m.path, m.scale)),
            ),
        ));
        md.push((
            "lorafold.merge.precision".into(),
            MetadataValue::string("f64 accumulation, rounded once"),
        ));
    }
    md.push((
        "lorafold.quant.policy".into(),
        MetadataValue::string(serde_json::to_string(&opts.policy).unwrap_or_default()),
    ));
    if opts.calib.is_some() {
        let how = match opts.rounding {
            Rounding::Nearest => "nearest".to_string(),
            Rounding::Imatrix => "imatrix: block scales searched for the least error weighted by each input's mean square, for block-quantized tensors whose input has calibration statistics; nearest for the rest".to_string(),
            Rounding::Gptq => format!("gptq{}: error feedback through XᵀX damped by {} of its mean diagonal, block scales searched as imatrix rounding does, for block-quantized tensors whose input has calibration statistics; nearest for the rest", if opts.act_order { " (act order, static block scales)" } else { "" }, opts.damp),
        };
        md.push(("lorafold.rounding".into(), MetadataValue::string(how)));
    }
    if let Some(b) = &opts.budget {
        md.push((
            "lorafold.budget".into(),
            MetadataValue::string(format!(
                "{b} over the calibration text, measured against the f32 merged model; the types chosen are lorafold.quant.policy's overrides"
            )),
        ));
    }
    if let Some(c) = opts
        .calib
        .as_ref()
        .filter(|_| opts.rounding != Rounding::Nearest)
    {
        md.push((
            "lorafold.calibration.tokens".into(),
            MetadataValue::U64(c.tokens),
        ));
        if let Some(h) = &c.source_sha256 {
            md.push((
                "lorafold.calibration.sha256".into(),
                MetadataValue::string(h.clone()),
            ));
        }
    }
    Ok((md, PendingHashes::start(files)))
}

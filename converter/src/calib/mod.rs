//! Calibration statistics: for the input of every linear layer, the
//! second-moment matrix XᵀX over a text and the number of tokens, what
//! error-feedback rounding (GPTQ) and importance-weighted rounding need.
//!
//! The runtime shows us the f32 rows each block's linear layers read
//! ([`Session::observe`]); q, k and v share one input and gate and up share
//! one, so a block has four. Each batch of rows is multiplied out in f32
//! (candle's matmul) and added into f64 accumulators, so a long text loses
//! nothing to the running sum. Stored as f32 in a GGUF of its own.

mod layers;

pub use layers::{LayerFeed, LayerInput, LayerProgress, LayerStep};

use lorafold_runtime::gguf::names;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use lorafold_runtime::cpu::{KvType, LinearInput};
use lorafold_runtime::gguf::{
    GgmlType, GgufFile, MetadataArray, MetadataValue, TensorInfo, ValueType,
};
use lorafold_runtime::model::{Model, SessionOptions};

use crate::round::gptq::{GptqError, GptqFactor};
use crate::write::gguf_writer::{GgufWriter, WriteError};
use lorafold_runtime::finite::check_finite;
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// What calibration can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CalibError {
    /// Running the model failed.
    #[error("{0}")]
    Run(String),
    /// Writing the statistics failed.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// The text gives nothing to run.
    #[error("{0}")]
    Text(String),
    /// The statistics of this model cannot fit in this machine's memory.
    #[error("{}: {problem}", path.display())]
    TooLarge {
        /// the model
        path: PathBuf,
        /// what they need and what there is
        problem: String,
    },
    /// A statistics file cannot be used.
    #[error("{}: {problem}", path.display())]
    File {
        /// the file
        path: PathBuf,
        /// what is wrong
        problem: String,
    },
}

/// Bytes that collecting statistics holds for linear inputs of these
/// widths: each input's XᵀX as f64 sums and, once flushed, as f32.
pub fn collection_bytes(widths: impl IntoIterator<Item = usize>) -> u64 {
    widths.into_iter().map(|k| (k as u64).pow(2) * 12).sum()
}

/// Refuse to collect statistics for `model` when their sums cannot fit in
/// this machine's memory: at 7B (28 blocks, an FFN 18944 wide) they are
/// 134 GB, and the run would be killed after writing a 30 GB f32 model.
pub fn check_collection_fits(
    model: &Path,
    widths: impl IntoIterator<Item = usize>,
) -> Result<(), CalibError> {
    check_fits_memory(
        model,
        collection_bytes(widths),
        "its calibration statistics (XᵀX of every block's 4 linear inputs) need",
        "collect them on a larger machine, let `convert --calib-text` make them a layer at a time, or round with an imatrix from llama-imatrix (diagonals only: --calib FILE --rounding imatrix)",
    )
}

/// Refuse to make `model`'s statistics a layer at a time ([`CalibStats::streamed`])
/// when two layers' sums (the widths of one layer's inputs) and the text's
/// hidden states (`hidden` bytes) cannot fit in this machine's memory: a
/// batch of tensors in flight may span two layers.
pub fn check_layer_fits(
    model: &Path,
    widths: impl IntoIterator<Item = usize>,
    hidden: u64,
) -> Result<(), CalibError> {
    check_fits_memory(
        model,
        2 * collection_bytes(widths) + hidden,
        "two layers' calibration statistics and the text's hidden states need",
        "calibrate on a shorter text or on a larger machine",
    )
}

/// Refuse work on `model` that needs `need` bytes (`what` says of what)
/// where this machine has less memory; `instead` says what to do.
fn check_fits_memory(model: &Path, need: u64, what: &str, instead: &str) -> Result<(), CalibError> {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    match lorafold_runtime::model::physical_memory() {
        Some(have) if need > have => Err(CalibError::TooLarge {
            path: model.to_path_buf(),
            problem: format!(
                "{what} {:.1} GiB and this machine has {:.1} GiB; {instead}",
                gib(need),
                gib(have)
            ),
        }),
        _ => Ok(()),
    }
}

/// The widths of a block's four linear inputs in `model`, in
/// [`LinearInput::ALL`]'s order.
fn input_widths(model: &Model) -> [usize; 4] {
    let c = &model.config;
    LinearInput::ALL.map(|i| match i {
        LinearInput::AttnIn | LinearInput::FfnIn => c.dim,
        LinearInput::AttnOut => c.n_head * c.head_dim,
        LinearInput::FfnDown => c.ffn,
    })
}

/// `general.type` of a calibration file.
pub const CALIBRATION_TYPE: &str = "lorafold-calibration";
/// `general.type` of llama.cpp's imatrix GGUF.
pub const IMATRIX_TYPE: &str = "imatrix";
/// Metadata key: tokens accumulated.
pub const KEY_TOKENS: &str = "lorafold.calibration.tokens";
/// Metadata key: the sha256 of what the statistics say (the token count and
/// every tensor's name, shape and values), so that a damaged or edited file
/// is refused rather than used: GGUF has no checksum of its own, and a
/// flipped bit in a value is otherwise a plausible value.
pub const KEY_CHECKSUM: &str = "lorafold.calibration.checksum";

/// How far XᵀX may be from symmetric, relative to √(H_ii·H_jj) (which
/// bounds |H_ij| for a sum of x·xᵀ): f32 products of a few hundred rows
/// summed in f64 stay within 1e-4 of it.
const SYMMETRY_TOLERANCE: f64 = 1e-3;

/// The tensor name of an input's XᵀX.
pub fn tensor_name(layer: usize, input: LinearInput) -> String {
    let what = match input {
        LinearInput::AttnIn => "attn_in",
        LinearInput::AttnOut => "attn_output_in",
        LinearInput::FfnIn => "ffn_in",
        LinearInput::FfnDown => "ffn_down_in",
    };
    format!("blk.{layer}.{what}.xtx")
}

/// The (layer, input) whose XᵀX the tensor `name` holds ([`tensor_name`]'s inverse).
fn parse_tensor_name(name: &str) -> Option<(usize, LinearInput)> {
    let layer = name.strip_prefix("blk.")?.split('.').next()?.parse().ok()?;
    let input = LinearInput::ALL
        .into_iter()
        .find(|&i| tensor_name(layer, i) == name)?;
    Some((layer, input))
}

/// The sha256 behind [`KEY_CHECKSUM`], fed the token count and then each
/// tensor in file order.
struct ContentHash(Sha256);

impl ContentHash {
    fn new(tokens: u64) -> ContentHash {
        let mut h = Sha256::new();
        h.update(b"lorafold-calibration-v1");
        h.update(tokens.to_le_bytes());
        ContentHash(h)
    }

    fn tensor(&mut self, name: &str, dims: &[u64], data: &[u8]) {
        let h = &mut self.0;
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update((dims.len() as u64).to_le_bytes());
        dims.iter().for_each(|d| h.update(d.to_le_bytes()));
        h.update((data.len() as u64).to_le_bytes());
        h.update(data);
    }

    fn hex(self) -> String {
        format!("{:x}", self.0.finalize())
    }
}

/// What is wrong with an input's XᵀX (`k x k`, row-major), if anything: a
/// sum of x·xᵀ is finite, has a diagonal >= 0, is symmetric and has no
/// element above √(H_ii·H_jj), each up to what float summation allows.
fn xtx_problem(h: &[f32], k: usize) -> Option<String> {
    if let Err(e) = check_finite(h) {
        return Some(format!(
            "element [{}, {}] is {}; statistics must be finite",
            e.index / k,
            e.index % k,
            e.value
        ));
    }
    let diag: Vec<f64> = (0..k).map(|i| h[i * k + i] as f64).collect();
    if let Some(i) = diag.iter().position(|&d| d < 0.0) {
        return Some(format!(
            "diagonal element [{i}, {i}] is {}; a sum of squares is never negative",
            diag[i]
        ));
    }
    // Room for products that underflow f32 where the squares did.
    let floor = 1e-6 * diag.iter().sum::<f64>() / k.max(1) as f64;
    for i in 0..k {
        for j in i + 1..k {
            let (a, b) = (h[i * k + j] as f64, h[j * k + i] as f64);
            let bound = (diag[i] * diag[j]).sqrt() + floor;
            if (a - b).abs() > SYMMETRY_TOLERANCE * bound {
                return Some(format!(
                    "elements [{i}, {j}] = {a} and [{j}, {i}] = {b} differ; XᵀX is symmetric"
                ));
            }
            if a.abs() > (1.0 + SYMMETRY_TOLERANCE) * bound {
                return Some(format!(
                    "element [{i}, {j}] = {a} exceeds √([{i}, {i}]·[{j}, {j}]) = {}, which bounds a sum of x·xᵀ",
                    bound - floor
                ));
            }
        }
    }
    None
}

/// One input's accumulated statistics.
#[derive(Debug)]
pub struct InputStats {
    /// Width of the input.
    pub k: usize,
    /// Σ x xᵀ over every token, `[k, k]` row-major, rounded to f32 as the
    /// file stores it ([`InputStats::xtx`]).
    matrix: Matrix,
    /// Σ x² per input: the diagonal, what importance weighting needs.
    pub sum2: Vec<f64>,
    /// The f64 sums while statistics are collected ([`CalibStats::flush`]
    /// rounds them into `xtx`).
    acc: Vec<f64>,
    /// Rows not yet multiplied out: short windows are gathered into one
    /// product, since adding a k x k product into f64 costs as much as
    /// computing it from a few dozen rows.
    pending: Vec<f32>,
    /// GPTQ's factor of the damped inverse, made once for all the tensors
    /// that read this input (q, k and v; gate and up), and dropped when the
    /// last of them is done (a 7B model's factors would not fit at once).
    factor: Mutex<Option<Result<Arc<GptqFactor>, GptqError>>>,
    /// Tensors still to read the factor ([`CalibStats::expect_readers`]).
    readers_left: AtomicUsize,
}

impl Clone for InputStats {
    /// The statistics, without the factor or the reader count.
    fn clone(&self) -> InputStats {
        InputStats {
            k: self.k,
            matrix: self.matrix.clone(),
            sum2: self.sum2.clone(),
            acc: self.acc.clone(),
            pending: self.pending.clone(),
            factor: Mutex::default(),
            readers_left: AtomicUsize::new(0),
        }
    }
}

/// Where an input's XᵀX is.
#[derive(Debug, Clone)]
enum Matrix {
    /// Only the diagonal is known (llama.cpp's imatrix layout).
    Missing,
    /// Collected in this run.
    Owned(Vec<f32>),
    /// In a statistics file, read when used: a model's matrices together
    /// are far larger than any one (a 7B model's: 33 GB), and reads
    /// through the page cache do not count against the process.
    InFile(Arc<GgufFile>, TensorInfo),
    /// Made a layer at a time as a conversion asks ([`LayerFeed`]): the
    /// layer and which of its inputs.
    Streamed(Arc<LayerFeed>, usize, LinearInput),
}

/// An input's XᵀX, `[k, k]` row-major, wherever it is held.
#[derive(Debug)]
pub enum Xtx<'a> {
    /// Held by the statistics.
    Borrowed(&'a [f32]),
    /// Read from a statistics file.
    Owned(Vec<f32>),
    /// Shared with a [`LayerFeed`] while its layer is in use.
    Shared(Arc<LayerInput>),
}

impl std::ops::Deref for Xtx<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            Xtx::Borrowed(v) => v,
            Xtx::Owned(v) => v,
            Xtx::Shared(s) => &s.xtx,
        }
    }
}

impl PartialEq for Xtx<'_> {
    fn eq(&self, other: &Xtx<'_>) -> bool {
        **self == **other
    }
}

/// Rows gathered before one product is added into the f64 sums.
const FLUSH_ROWS: usize = 512;

impl InputStats {
    fn new(k: usize, matrix: Matrix, sum2: Vec<f64>) -> InputStats {
        InputStats {
            k,
            matrix,
            sum2,
            acc: Vec::new(),
            pending: Vec::new(),
            factor: Mutex::default(),
            readers_left: AtomicUsize::new(0),
        }
    }

    /// [`crate::round::gptq::inverse_cholesky`] of these statistics, computed on
    /// first use (`damp` must be the same at every call).
    pub fn gptq_factor(&self, damp: f64, act_order: bool) -> Result<Arc<GptqFactor>, GptqError> {
        // A poisoned lock only means another tensor's thread panicked.
        let mut slot = self.factor.lock().unwrap_or_else(|e| e.into_inner());
        slot.get_or_insert_with(|| {
            let h = self.xtx().map_err(|e| GptqError::Io(e.to_string()))?;
            crate::round::gptq::inverse_cholesky(&h, self.k, damp, act_order).map(Arc::new)
        })
        .clone()
    }

    /// One of the tensors counted by [`CalibStats::expect_readers`] is done
    /// with this input: the last one drops the factor.
    pub fn reader_done(&self) {
        let last = self
            .readers_left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            == Ok(1);
        if last {
            *self.factor.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }

    /// Whether the whole matrix is known (GPTQ needs it; importance
    /// weighting needs only the diagonal).
    pub fn has_matrix(&self) -> bool {
        !matches!(self.matrix, Matrix::Missing)
    }

    /// Σ x xᵀ, `[k, k]` row-major (f32, as stored); empty when only the
    /// diagonal is known. Read from the statistics file at each call when
    /// the statistics came from one.
    pub fn xtx(&self) -> std::io::Result<Xtx<'_>> {
        Ok(match &self.matrix {
            Matrix::Missing => Xtx::Borrowed(&[]),
            Matrix::Owned(v) => Xtx::Borrowed(v),
            Matrix::InFile(f, t) => Xtx::Owned(le_f32s(&f.tensor_data_copy(t)?).collect()),
            Matrix::Streamed(feed, layer, input) => Xtx::Shared(
                feed.get(*layer, *input)
                    .map_err(|e| std::io::Error::other(e.to_string()))?,
            ),
        })
    }

    /// Each input's weight for importance rounding: its Σ x².
    pub fn importance(&self) -> std::io::Result<Vec<f32>> {
        let sum2 = match &self.matrix {
            Matrix::Streamed(feed, layer, input) => {
                let s = feed
                    .get(*layer, *input)
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                return Ok(s.sum2.iter().map(|&v| v as f32).collect());
            }
            _ => &self.sum2,
        };
        Ok(sum2.iter().map(|&v| v as f32).collect())
    }

    /// For each matrix in `each` (row-major, rows of `k`), Σ over its rows
    /// of r H rᵀ: the squared norm of its products with the calibration
    /// inputs, ‖R X‖². With only the diagonal known, Σ H_ii r_i². H is read
    /// once for all of them.
    pub fn output_norms2(&self, each: &[&[f32]]) -> candle_core::Result<Vec<f64>> {
        let k = self.k;
        if !self.has_matrix() {
            return Ok(each
                .iter()
                .map(|rows| {
                    rows.chunks_exact(k)
                        .flat_map(|r| {
                            r.iter()
                                .zip(&self.sum2)
                                .map(|(&v, &h)| h * v as f64 * v as f64)
                        })
                        .sum()
                })
                .collect());
        }
        let h = self.xtx()?;
        let h = Tensor::from_slice(&h, (k, k), &Device::Cpu)?;
        each.iter()
            .map(|rows| {
                let r = Tensor::from_slice(rows, (rows.len() / k, k), &Device::Cpu)?;
                let s = (r.matmul(&h)? * r)?.sum_all()?.to_scalar::<f32>()?;
                Ok(s as f64)
            })
            .collect()
    }

    /// Multiply out the pending rows and add them into the f64 sums.
    fn multiply_out(&mut self) -> candle_core::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let t = self.pending.len() / self.k;
        let x = Tensor::from_slice(&self.pending, (t, self.k), &Device::Cpu)?;
        let g = x
            .t()?
            .contiguous()?
            .matmul(&x)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        if self.acc.is_empty() {
            self.acc = vec![0.0; self.k * self.k];
        }
        for (a, &v) in self.acc.iter_mut().zip(&g) {
            *a += v as f64;
        }
        self.pending.clear();
        Ok(())
    }

    /// Multiply out the pending rows and round the sums into `xtx` and `sum2`.
    fn flush(&mut self) -> candle_core::Result<()> {
        self.multiply_out()?;
        if !self.acc.is_empty() {
            let xtx: Vec<f32> = self.acc.iter().map(|&v| v as f32).collect();
            self.sum2 = (0..self.k).map(|i| xtx[i * self.k + i] as f64).collect();
            self.matrix = Matrix::Owned(xtx);
        }
        Ok(())
    }
}

/// Every input's statistics over one text.
#[derive(Debug, Clone, Default)]
pub struct CalibStats {
    /// By (layer, input).
    pub inputs: BTreeMap<(usize, LinearInput), InputStats>,
    /// Tokens accumulated.
    pub tokens: u64,
    /// The sha256 of the file these were read from ([`CalibStats::read`]).
    pub source_sha256: Option<String>,
    /// The file (or text) these came from, for errors to name.
    pub source: Option<PathBuf>,
}

impl CalibStats {
    /// Add `rows` (tokens of width `k`) to the statistics of `input` of `layer`.
    pub fn add(
        &mut self,
        layer: usize,
        input: LinearInput,
        rows: &[f32],
        k: usize,
    ) -> candle_core::Result<()> {
        let s = self
            .inputs
            .entry((layer, input))
            .or_insert_with(|| InputStats::new(k, Matrix::Missing, vec![0.0; k]));
        s.pending.extend_from_slice(rows);
        if s.pending.len() >= FLUSH_ROWS * k {
            s.multiply_out()?;
        }
        Ok(())
    }

    /// Count, for each input, the tensors among `names` (GGUF names) that
    /// read it, so that each input's GPTQ factor is dropped after its last
    /// reader ([`InputStats::reader_done`]).
    pub fn expect_readers<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        for s in self.inputs.values() {
            s.readers_left.store(0, Ordering::Release);
        }
        for name in names {
            if let Some(s) = self.for_tensor(name) {
                s.readers_left.fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    /// Whether every input's whole XᵀX is known (not just the diagonal).
    pub fn has_matrices(&self) -> bool {
        self.inputs.values().all(InputStats::has_matrix)
    }

    /// The statistics of the input tensor `name` (GGUF name) reads, if any.
    pub fn for_tensor(&self, name: &str) -> Option<&InputStats> {
        self.inputs.get(&input_of(name)?)
    }

    /// Add every input's pending rows into its sums.
    pub fn flush(&mut self) -> candle_core::Result<()> {
        self.inputs.values_mut().try_for_each(InputStats::flush)
    }

    /// Run `model` (with its adapters) over `windows` of token ids, each
    /// from an empty cache, and accumulate every block's linear inputs.
    /// An f32 KV cache: the statistics are the weights', not the cache's.
    pub fn collect(model: &Model, windows: &[Vec<u32>]) -> Result<CalibStats, CalibError> {
        let widths = input_widths(model);
        let layers = model.config.n_layers;
        check_collection_fits(model.file().path(), (0..layers).flat_map(|_| widths))?;
        let ctx = windows.iter().map(Vec::len).max().unwrap_or(1);
        let mut session = model
            .session_with(SessionOptions {
                kv: KvType::F32,
                ..SessionOptions::new(ctx)
            })
            .map_err(|e| CalibError::Run(e.to_string()))?;
        let mut stats = CalibStats::default();
        let mut failed = None;
        for w in windows {
            session.reset();
            let mut observe = |layer: usize, input: LinearInput, rows: &[f32], k: usize| {
                if failed.is_none() {
                    if let Err(e) = stats.add(layer, input, rows, k) {
                        failed = Some(e.to_string());
                    }
                }
            };
            session
                .observe(w, &mut observe)
                .map_err(|e| CalibError::Run(e.to_string()))?;
            if let Some(e) = failed.take() {
                return Err(CalibError::Run(e));
            }
            stats.tokens += w.len() as u64;
        }
        stats.flush_checked().map_err(CalibError::Run)?;
        Ok(stats)
    }

    /// [`CalibStats::flush`], then refuse sums a statistics file would be
    /// refused for, so that they are not written in the first place
    /// (activations past f32's range give inf).
    fn flush_checked(&mut self) -> Result<(), String> {
        self.flush().map_err(|e| e.to_string())?;
        for (&(layer, input), s) in &self.inputs {
            let xtx = s.xtx().map_err(|e| e.to_string())?;
            if let Some(p) = xtx_problem(&xtx, s.k) {
                return Err(format!(
                    "the statistics of {}: {p}",
                    tensor_name(layer, input)
                ));
            }
        }
        Ok(())
    }

    /// The statistics of `model` over `windows` (each from an empty cache),
    /// made a layer at a time as a conversion asks for them ([`LayerFeed`]):
    /// one layer's must fit in memory, not the model's. Layers are kept once
    /// made where all of them fit in a quarter of memory, else dropped as
    /// the conversion passes them.
    pub fn streamed(
        model: Model,
        windows: Vec<Vec<u32>>,
        progress: LayerProgress,
    ) -> Result<CalibStats, CalibError> {
        let widths = input_widths(&model);
        let layers = model.config.n_layers;
        let tokens: u64 = windows.iter().map(|w| w.len() as u64).sum();
        if tokens == 0 {
            return Err(CalibError::Text(
                "the text gives no tokens to calibrate on".into(),
            ));
        }
        let hidden = tokens * model.config.dim as u64 * 4;
        check_layer_fits(model.file().path(), widths, hidden)?;
        let all = collection_bytes((0..layers).flat_map(|_| widths));
        let memory = lorafold_runtime::model::physical_memory().unwrap_or(16 << 30);
        Ok(CalibStats::streamed_with(
            model,
            windows,
            all <= memory / 4,
            progress,
        ))
    }

    /// [`CalibStats::streamed`], keeping every layer made or not as told
    /// (and not checking that a layer fits in memory).
    pub fn streamed_with(
        model: Model,
        windows: Vec<Vec<u32>>,
        keep_all: bool,
        progress: LayerProgress,
    ) -> CalibStats {
        let widths = input_widths(&model);
        let layers = model.config.n_layers;
        let tokens: u64 = windows.iter().map(|w| w.len() as u64).sum();
        let feed = Arc::new(LayerFeed::start(model, windows, keep_all, progress));
        let inputs = (0..layers)
            .flat_map(|l| {
                LinearInput::ALL
                    .into_iter()
                    .zip(widths)
                    .map(move |(i, k)| (l, i, k))
            })
            .map(|(l, i, k)| {
                let m = Matrix::Streamed(Arc::clone(&feed), l, i);
                ((l, i), InputStats::new(k, m, Vec::new()))
            })
            .collect();
        CalibStats {
            inputs,
            tokens,
            source_sha256: None,
            source: None,
        }
    }

    /// Statistics of `model` over `text`: a window per non-empty line with
    /// `lines`, else windows of `ctx` tokens; and the windows.
    pub fn over_text(
        model: &Model,
        text: &str,
        lines: bool,
        ctx: usize,
    ) -> Result<(CalibStats, Vec<Vec<u32>>), CalibError> {
        let tok = lorafold_runtime::tokenizer::Tokenizer::from_gguf(model.file())
            .map_err(|e| CalibError::Run(e.to_string()))?;
        let w = lorafold_runtime::measure::windows(&tok, text, lines, ctx)
            .map_err(|e| CalibError::Text(e.to_string()))?;
        Ok((CalibStats::collect(model, &w)?, w))
    }

    /// Write the statistics (f32) to `path`, through a temporary file
    /// (after [`CalibStats::flush`]; pending rows are not written).
    /// `provenance` adds string metadata (model, adapters, text hash).
    pub fn write(&self, path: &Path, provenance: &[(&str, String)]) -> Result<(), CalibError> {
        if !self.has_matrices() {
            return Err(CalibError::File {
                path: path.to_path_buf(),
                problem: "these statistics hold only diagonals (an imatrix); write them with write_imatrix".into(),
            });
        }
        let run = |e: std::io::Error| CalibError::Run(e.to_string());
        let bytes_of = |s: &InputStats| -> Result<Vec<u8>, CalibError> {
            Ok(s.xtx()
                .map_err(run)?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect())
        };
        // The header carries the checksum, so the values are seen twice.
        let mut hash = ContentHash::new(self.tokens);
        for (&(layer, input), s) in &self.inputs {
            let dims = [s.k as u64, s.k as u64];
            hash.tensor(&tensor_name(layer, input), &dims, &bytes_of(s)?);
        }
        let mut w = GgufWriter::new(path);
        w.add_metadata(names::TYPE, &MetadataValue::String(CALIBRATION_TYPE.into()))?;
        w.add_metadata(KEY_TOKENS, &MetadataValue::U64(self.tokens))?;
        w.add_metadata(KEY_CHECKSUM, &MetadataValue::String(hash.hex().into()))?;
        for (k, v) in provenance {
            w.add_metadata(k, &MetadataValue::String(v.as_str().into()))?;
        }
        for (&(layer, input), s) in &self.inputs {
            w.add_tensor(
                &tensor_name(layer, input),
                GgmlType::F32,
                &[s.k as u64, s.k as u64],
            )?;
        }
        let mut stream = w.start()?;
        for (&(layer, input), s) in &self.inputs {
            stream.write_tensor(&tensor_name(layer, input), &bytes_of(s)?)?;
        }
        stream.finish()?;
        Ok(())
    }

    /// Write the diagonal in llama.cpp's imatrix GGUF layout (what
    /// `llama-imatrix` writes and `llama-quantize --imatrix` reads):
    /// `general.type = imatrix`, `imatrix.datasets`, `imatrix.chunk_count`,
    /// `imatrix.chunk_size`, and per weight tensor `<name>.in_sum2` (Σ x²,
    /// f32 `[k]`) and `<name>.counts` (tokens, f32 `[1]`); the three
    /// tensors that share an input get the same values.
    pub fn write_imatrix(
        &self,
        path: &Path,
        dataset: &str,
        chunks: u32,
        chunk_size: u32,
    ) -> Result<(), CalibError> {
        let mut w = GgufWriter::new(path);
        w.add_metadata(names::TYPE, &MetadataValue::String(IMATRIX_TYPE.into()))?;
        w.add_metadata(
            "imatrix.datasets",
            &MetadataValue::Array(MetadataArray::Owned {
                elem: ValueType::String,
                items: vec![MetadataValue::String(dataset.into())],
            }),
        )?;
        w.add_metadata("imatrix.chunk_count", &MetadataValue::U32(chunks))?;
        w.add_metadata("imatrix.chunk_size", &MetadataValue::U32(chunk_size))?;
        let weights = |layer: usize, input: LinearInput| {
            input
                .readers()
                .iter()
                .map(move |r| format!("blk.{layer}.{r}.weight"))
        };
        for (&(layer, input), s) in &self.inputs {
            for name in weights(layer, input) {
                // Trailing dims of 1 dropped, as ggml writes them.
                w.add_tensor(&format!("{name}.in_sum2"), GgmlType::F32, &[s.k as u64])?;
                w.add_tensor(&format!("{name}.counts"), GgmlType::F32, &[1])?;
            }
        }
        let mut stream = w.start()?;
        for (&(layer, input), s) in &self.inputs {
            let sums: Vec<u8> = s
                .sum2
                .iter()
                .flat_map(|&v| (v as f32).to_le_bytes())
                .collect();
            for name in weights(layer, input) {
                stream.write_tensor(&format!("{name}.in_sum2"), &sums)?;
                stream.write_tensor(
                    &format!("{name}.counts"),
                    &(self.tokens as f32).to_le_bytes(),
                )?;
            }
        }
        stream.finish()?;
        Ok(())
    }

    /// Read statistics written by [`CalibStats::write`] (or an imatrix, see
    /// [`CalibStats::write_imatrix`]), refusing a file whose checksum does
    /// not match or whose values no text could give: zero tokens, a value
    /// that is not finite, a negative diagonal, an asymmetric matrix, a
    /// tensor that is not a linear input's statistics. Whether they fit a
    /// model is [`CalibStats::check_fits`].
    pub fn read(path: &Path) -> Result<CalibStats, CalibError> {
        let shown = path.to_path_buf();
        let bad = |problem: String| CalibError::File {
            path: shown.clone(),
            problem,
        };
        // The reader's errors name the file already.
        let file = Arc::new(GgufFile::open(path).map_err(|e| CalibError::Run(e.to_string()))?);
        let f = &*file;
        let sha = crate::read::sha256_of(path).map_err(|e| bad(e.to_string()))?;
        match f.get(names::TYPE) {
            Some(MetadataValue::String(s)) if s == CALIBRATION_TYPE => {}
            Some(MetadataValue::String(s)) if s == IMATRIX_TYPE => {
                let mut stats = read_imatrix(f).map_err(bad)?;
                stats.source_sha256 = Some(sha);
                stats.source = Some(shown.clone());
                return Ok(stats);
            }
            _ => {
                return Err(bad(format!(
                    "not calibration statistics (general.type is neither {CALIBRATION_TYPE} nor {IMATRIX_TYPE})"
                )))
            }
        }
        let tokens = match f.get(KEY_TOKENS) {
            Some(MetadataValue::U64(0)) => {
                return Err(bad(format!("{KEY_TOKENS} is 0: statistics over no text")))
            }
            Some(MetadataValue::U64(n)) => n,
            _ => return Err(bad(format!("{KEY_TOKENS} missing or not a u64"))),
        };
        let Some(MetadataValue::String(stored)) = f.get(KEY_CHECKSUM) else {
            return Err(bad(format!("{KEY_CHECKSUM} missing or not a string")));
        };
        let stored = stored.to_string();
        let mut stats = CalibStats {
            tokens,
            source_sha256: Some(sha),
            source: Some(shown.clone()),
            ..CalibStats::default()
        };
        let mut hash = ContentHash::new(tokens);
        // A damaged file says so before what the damage looks like.
        let mut first_problem = None;
        for t in f.tensors() {
            let name = &t.name;
            let Some(key) = parse_tensor_name(name) else {
                return Err(bad(format!(
                    "tensor '{name}' is not a linear input's statistics (blk.N.{{attn_in,attn_output_in,ffn_in,ffn_down_in}}.xtx)"
                )));
            };
            let k = match t.dims() {
                [a, b] if a == b && *a > 0 && t.ggml_type == GgmlType::F32 => *a as usize,
                d => {
                    return Err(bad(format!(
                        "tensor '{name}': expected f32 [k, k], got {} {d:?}",
                        t.ggml_type
                    )))
                }
            };
            let bytes = f
                .tensor_data_copy(t)
                .map_err(|e| bad(format!("tensor '{name}': {e}")))?;
            hash.tensor(name, t.dims(), &bytes);
            let values: Vec<f32> = le_f32s(&bytes).collect();
            drop(bytes);
            if first_problem.is_none() {
                first_problem = xtx_problem(&values, k).map(|p| format!("tensor '{name}': {p}"));
            }
            // The diagonal now; the matrix when it is used.
            let diag: Vec<f64> = values.iter().step_by(k + 1).map(|&v| v as f64).collect();
            let s = InputStats::new(k, Matrix::InFile(file.clone(), t.clone()), diag);
            if stats.inputs.insert(key, s).is_some() {
                return Err(bad(format!("tensor '{name}' appears twice")));
            }
        }
        if hash.hex() != stored {
            return Err(bad(format!(
                "{KEY_CHECKSUM} does not match the statistics: the file was damaged or edited after it was written"
            )));
        }
        if let Some(p) = first_problem {
            return Err(bad(p));
        }
        if stats.inputs.is_empty() {
            return Err(bad("no statistics in it".into()));
        }
        Ok(stats)
    }

    /// An error naming where these statistics came from.
    pub fn refusal(&self, problem: String) -> CalibError {
        CalibError::File {
            path: self
                .source
                .clone()
                .unwrap_or_else(|| PathBuf::from("calibration statistics")),
            problem,
        }
    }

    /// Refuse statistics that do not fit the model whose block weights are
    /// `weights` (GGUF name, row length): every weight that reads a linear
    /// input must have that input's statistics, as wide as its rows, and
    /// every statistic must have a weight of the model that reads it.
    /// Statistics that cover part of a model round the rest to nearest while
    /// the output says it was calibrated; statistics of another model are
    /// wrong everywhere.
    pub fn check_fits<'a>(
        &self,
        weights: impl IntoIterator<Item = (&'a str, usize)>,
    ) -> Result<(), CalibError> {
        let bad = |problem| self.refusal(problem);
        let widths: BTreeMap<&str, usize> = weights
            .into_iter()
            .filter(|(name, _)| input_of(name).is_some())
            .collect();
        for (&(layer, input), s) in &self.inputs {
            let readers: Vec<String> = input
                .readers()
                .iter()
                .map(|r| format!("blk.{layer}.{r}.weight"))
                .filter(|n| widths.contains_key(n.as_str()))
                .collect();
            if readers.is_empty() {
                return Err(bad(format!(
                    "tensor '{}': the model has no weight that reads this input (no blk.{layer}.{{{}}}.weight): statistics of another model",
                    tensor_name(layer, input),
                    input.readers().join(",")
                )));
            }
            if let Some(r) = readers.iter().find(|r| widths[r.as_str()] != s.k) {
                return Err(bad(format!(
                    "the statistics of the input of '{r}' are {} wide, the tensor's rows {}: statistics of another model",
                    s.k,
                    widths[r.as_str()]
                )));
            }
        }
        let missing: Vec<&str> = widths
            .keys()
            .copied()
            .filter(|n| input_of(n).is_some_and(|key| !self.inputs.contains_key(&key)))
            .collect();
        if let Some(first) = missing.first() {
            return Err(bad(format!(
                "no statistics of the input of '{first}'{}: statistics of another model, or of part of this one",
                match missing.len() - 1 {
                    0 => String::new(),
                    n => format!(" (nor of {n} more weights)"),
                }
            )));
        }
        Ok(())
    }
}

/// Recompute the checksum ([`KEY_CHECKSUM`]) of the statistics file at
/// `path` and store it in place, for a file whose values were edited on
/// purpose (a tool that rewrites them, a test of what [`CalibStats::read`]
/// refuses). Nothing else is checked.
pub fn reseal(path: &Path) -> Result<(), CalibError> {
    let bad = |problem: String| CalibError::File {
        path: path.to_path_buf(),
        problem,
    };
    let (stored, fresh) = {
        let f = GgufFile::open(path).map_err(|e| CalibError::Run(e.to_string()))?;
        let tokens = f
            .get_u64(KEY_TOKENS)
            .ok_or_else(|| bad(format!("{KEY_TOKENS} missing")))?;
        let stored = f
            .get_str(KEY_CHECKSUM)
            .ok_or_else(|| bad(format!("{KEY_CHECKSUM} missing")))?
            .into_owned();
        let mut hash = ContentHash::new(tokens);
        for t in f.tensors() {
            let data = f.tensor_data_copy(t).map_err(|e| bad(e.to_string()))?;
            hash.tensor(&t.name, t.dims(), &data);
        }
        (stored, hash.hex())
    };
    let mut bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let at = bytes
        .windows(stored.len().max(1))
        .position(|w| w == stored.as_bytes())
        .filter(|_| stored.len() == fresh.len())
        .ok_or_else(|| bad(format!("{KEY_CHECKSUM} is not a sha256")))?;
    bytes[at..at + fresh.len()].copy_from_slice(fresh.as_bytes());
    std::fs::write(path, bytes).map_err(|e| bad(e.to_string()))
}

/// The diagonal statistics of an imatrix GGUF (llama.cpp's layout, see
/// [`CalibStats::write_imatrix`]): Σ x² / count per input, from the first
/// weight tensor that reads it; tensors we do not read (experts, the output
/// head) are skipped.
fn read_imatrix(f: &GgufFile) -> Result<CalibStats, String> {
    let mut stats = CalibStats::default();
    let floats = |name: &str| -> Result<Option<Vec<f32>>, String> {
        let Some(t) = f.tensor(name) else {
            return Ok(None);
        };
        if t.ggml_type != GgmlType::F32 {
            return Err(format!("tensor '{name}' is {}, not f32", t.ggml_type));
        }
        Ok(Some(le_f32s(f.tensor_data(t)).collect()))
    };
    for t in f.tensors() {
        let Some(weight) = t.name.strip_suffix(".in_sum2") else {
            continue;
        };
        let Some((layer, input)) = input_of(weight) else {
            continue;
        };
        // Every reader's values are checked, though the first one's are used.
        let sums = floats(&t.name)?.unwrap_or_default();
        let counts = floats(&format!("{weight}.counts"))?
            .ok_or_else(|| format!("tensor '{weight}.counts' missing beside its .in_sum2"))?;
        // One matrix per expert; a dense weight has one.
        let &[count] = counts.as_slice() else {
            return Err(format!(
                "tensor '{weight}.counts': {} matrices (experts are not read)",
                counts.len()
            ));
        };
        if !count.is_finite()
            || count < 1.0
            || sums.is_empty()
            || sums.iter().any(|v| !v.is_finite() || *v < 0.0)
        {
            return Err(format!(
                "tensor '{weight}.in_sum2': empty, negative or not finite, or no count"
            ));
        }
        if let Some(first) = stats.inputs.get(&(layer, input)) {
            if first.k != sums.len() {
                return Err(format!(
                    "tensor '{weight}.in_sum2' is {} wide, another weight reading the same input {}",
                    sums.len(),
                    first.k
                ));
            }
            continue;
        }
        stats.tokens = stats.tokens.max(count as u64);
        let mean2 = sums.iter().map(|&v| v as f64 / count as f64).collect();
        stats.inputs.insert(
            (layer, input),
            InputStats::new(sums.len(), Matrix::Missing, mean2),
        );
    }
    if stats.inputs.is_empty() {
        return Err("an imatrix with no tensor of a block's linear layers".into());
    }
    Ok(stats)
}

/// (layer, input) that the weight tensor `name` (GGUF name) reads.
fn input_of(name: &str) -> Option<(usize, LinearInput)> {
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let what = rest.strip_suffix(".weight")?;
    let input = LinearInput::ALL
        .into_iter()
        .find(|i| i.readers().contains(&what))?;
    Some((layer, input))
}

/// The little-endian f32 values of a tensor's bytes.
fn le_f32s(bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// DeepSeek-R1-Distill-Qwen-7B's inputs: 28 blocks of 3584, 3584, 3584
    /// and 18944 wide.
    fn qwen2_7b() -> impl Iterator<Item = usize> {
        (0..28).flat_map(|_| [3584, 3584, 3584, 18944])
    }

    #[test]
    fn statistics_that_cannot_fit_are_refused_up_front() {
        let need = collection_bytes(qwen2_7b());
        assert_eq!(need, 28 * 12 * (3 * 3584u64.pow(2) + 18944u64.pow(2)));
        let got = check_collection_fits(Path::new("7b.gguf"), qwen2_7b());
        match lorafold_runtime::model::physical_memory() {
            Some(have) if have < need => {
                let e = got.unwrap_err().to_string();
                assert!(e.starts_with("7b.gguf: its calibration statistics"), "{e}");
                assert!(e.contains("need 124.4 GiB"), "{e}");
            }
            _ => assert!(got.is_ok()),
        }
        // SmolLM2-135M's fit anywhere.
        let small = (0..30).flat_map(|_| [576, 576, 576, 1536]);
        assert!(check_collection_fits(Path::new("s.gguf"), small).is_ok());
    }
}

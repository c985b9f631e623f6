//! Calibration statistics: for the input of every linear layer, the
//! second-moment matrix XᵀX over a text and the number of tokens, what
//! error-feedback rounding (GPTQ) and importance-weighted rounding need.
//!
//! The runtime shows us the f32 rows each block's linear layers read
//! ([`Session::observe`]); q, k and v share one input and gate and up share
//! one, so a block has four. Each batch of rows is multiplied out in f32
//! (candle's matmul) and added into f64 accumulators, so a long text loses
//! nothing to the running sum. Stored as f32 in a GGUF of its own.

use lorafold_runtime::gguf::names;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use lorafold_runtime::cpu::{KvType, LinearInput};
use lorafold_runtime::gguf::{
    GgmlType, GgufFile, MetadataArray, MetadataValue, TensorInfo, ValueType,
};
use lorafold_runtime::model::{Model, SessionOptions};
use std::borrow::Cow;

use crate::gguf_writer::{GgufWriter, WriteError};
use crate::gptq::{GptqError, GptqFactor};
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
    /// A statistics file cannot be used.
    #[error("{}: {problem}", path.display())]
    File {
        /// the file
        path: PathBuf,
        /// what is wrong
        problem: String,
    },
}

/// `general.type` of a calibration file.
pub const CALIBRATION_TYPE: &str = "lorafold-calibration";
/// `general.type` of llama.cpp's imatrix GGUF.
pub const IMATRIX_TYPE: &str = "imatrix";
/// Metadata key: tokens accumulated.
pub const KEY_TOKENS: &str = "lorafold.calibration.tokens";

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
}

/// Rows gathered before one product is added into the f64 sums.
const FLUSH_ROWS: usize = 512;

impl InputStats {
    /// [`crate::gptq::inverse_cholesky`] of these statistics, computed on
    /// first use (`damp` must be the same at every call).
    pub fn gptq_factor(&self, damp: f64, act_order: bool) -> Result<Arc<GptqFactor>, GptqError> {
        // A poisoned lock only means another tensor's thread panicked.
        let mut slot = self.factor.lock().unwrap_or_else(|e| e.into_inner());
        slot.get_or_insert_with(|| {
            let h = self.xtx().map_err(|e| GptqError::Io(e.to_string()))?;
            crate::gptq::inverse_cholesky(&h, self.k, damp, act_order).map(Arc::new)
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
    pub fn xtx(&self) -> std::io::Result<Cow<'_, [f32]>> {
        Ok(match &self.matrix {
            Matrix::Missing => Cow::Borrowed(&[]),
            Matrix::Owned(v) => Cow::Borrowed(v),
            Matrix::InFile(f, t) => Cow::Owned(le_f32s(&f.tensor_data_copy(t)?).collect()),
        })
    }

    /// Each input's weight for importance rounding: its Σ x².
    pub fn importance(&self) -> Vec<f32> {
        self.sum2.iter().map(|&v| v as f32).collect()
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
            .or_insert_with(|| InputStats {
                k,
                matrix: Matrix::Missing,
                sum2: vec![0.0; k],
                acc: Vec::new(),
                pending: Vec::new(),
                factor: Mutex::default(),
                readers_left: AtomicUsize::new(0),
            });
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
        stats.flush().map_err(|e| CalibError::Run(e.to_string()))?;
        Ok(stats)
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
        let mut w = GgufWriter::new(path);
        w.add_metadata(names::TYPE, &MetadataValue::String(CALIBRATION_TYPE.into()))?;
        w.add_metadata(KEY_TOKENS, &MetadataValue::U64(self.tokens))?;
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
            let xtx = s.xtx().map_err(|e| CalibError::Run(e.to_string()))?;
            let bytes: Vec<u8> = xtx.iter().flat_map(|v| v.to_le_bytes()).collect();
            stream.write_tensor(&tensor_name(layer, input), &bytes)?;
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

    /// Read statistics written by [`CalibStats::write`].
    pub fn read(path: &Path) -> Result<CalibStats, CalibError> {
        let shown = path.to_path_buf();
        let bad = |problem: String| CalibError::File {
            path: shown.clone(),
            problem,
        };
        // The reader's errors name the file already.
        let file = Arc::new(GgufFile::open(path).map_err(|e| CalibError::Run(e.to_string()))?);
        let f = &*file;
        let sha = crate::convert::sha256_file(path).map_err(|e| bad(e.to_string()))?;
        match f.get(names::TYPE) {
            Some(MetadataValue::String(s)) if s == CALIBRATION_TYPE => {}
            Some(MetadataValue::String(s)) if s == IMATRIX_TYPE => {
                return read_imatrix(f, sha).map_err(bad);
            }
            _ => {
                return Err(bad(format!(
                    "not calibration statistics (general.type is neither {CALIBRATION_TYPE} nor {IMATRIX_TYPE})"
                )))
            }
        }
        let tokens = match f.get(KEY_TOKENS) {
            Some(MetadataValue::U64(n)) => n,
            _ => return Err(bad(format!("{KEY_TOKENS} missing"))),
        };
        let mut stats = CalibStats {
            tokens,
            source_sha256: Some(sha),
            ..CalibStats::default()
        };
        for layer in 0.. {
            let mut found = false;
            for input in LinearInput::ALL {
                let name = tensor_name(layer, input);
                let Some(t) = f.tensor(&name) else { continue };
                found = true;
                let k = match t.dims() {
                    [a, b] if a == b && t.ggml_type == GgmlType::F32 => *a as usize,
                    d => {
                        return Err(bad(format!(
                            "tensor '{name}': expected f32 [k, k], got {} {d:?}",
                            t.ggml_type
                        )))
                    }
                };
                // The diagonal now; the matrix when it is used.
                let bytes = f
                    .tensor_data_copy(t)
                    .map_err(|e| bad(format!("tensor '{name}': {e}")))?;
                let diag: Vec<f64> = le_f32s(&bytes).step_by(k + 1).map(f64::from).collect();
                stats.inputs.insert(
                    (layer, input),
                    InputStats {
                        k,
                        sum2: diag,
                        matrix: Matrix::InFile(file.clone(), t.clone()),
                        acc: Vec::new(),
                        pending: Vec::new(),
                        factor: Mutex::default(),
                        readers_left: AtomicUsize::new(0),
                    },
                );
            }
            if !found {
                break;
            }
        }
        Ok(stats)
    }
}

/// The diagonal statistics of an imatrix GGUF (llama.cpp's layout, see
/// [`CalibStats::write_imatrix`]): Σ x² / count per input, from the first
/// weight tensor that reads it; tensors we do not read (experts, the output
/// head) are skipped.
fn read_imatrix(f: &GgufFile, sha: String) -> Result<CalibStats, String> {
    let mut stats = CalibStats {
        source_sha256: Some(sha),
        ..CalibStats::default()
    };
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
        if stats.inputs.contains_key(&(layer, input)) {
            continue;
        }
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
        if count.is_nan()
            || count <= 0.0
            || sums.is_empty()
            || sums.iter().any(|v| !v.is_finite() || *v < 0.0)
        {
            return Err(format!(
                "tensor '{weight}.in_sum2': empty, negative or not finite, or no count"
            ));
        }
        stats.tokens = stats.tokens.max(count as u64);
        stats.inputs.insert(
            (layer, input),
            InputStats {
                k: sums.len(),
                matrix: Matrix::Missing,
                sum2: sums.iter().map(|&v| v as f64 / count as f64).collect(),
                acc: Vec::new(),
                pending: Vec::new(),
                factor: Mutex::default(),
                readers_left: AtomicUsize::new(0),
            },
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

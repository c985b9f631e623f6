//! Base models: a GGUF file (any type candle can dequantize) or a Hugging Face
//! folder (config.json + safetensors), seen as GGUF-named f32 tensors.

use lorafold_runtime::gguf::names;
use std::path::{Path, PathBuf};

use lorafold_runtime::arch::{qk_permutation, Architecture};
use lorafold_runtime::gguf::{GgmlType, GgufFile, MetadataValue};
use lorafold_runtime::model::{ModelConfig, RuntimeError};
use lorafold_runtime::tokenizer::TokenizerMetadata;
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::error::check_finite;
use crate::round::quant::{self, QuantError};

mod hf;

/// An error reading a base model.
pub type BaseError = crate::error::ModelFileError;

/// Where a base tensor's values come from.
#[derive(Debug, Clone)]
enum Source {
    Gguf {
        index: usize,
    },
    Hf {
        file: usize,
        key: String,
        permute_heads: Option<usize>,
        /// Added to every value (Gemma's norms: llama.cpp stores `1 + w`).
        offset: f32,
    },
    Computed(Vec<f32>),
}

/// One tensor of the base, under its GGUF name.
#[derive(Debug, Clone)]
pub struct BaseTensor {
    /// GGUF name ("blk.0.attn_q.weight").
    pub name: String,
    /// Dimensions in ggml order (ne): [in, out] for a matrix.
    pub dims: Vec<u64>,
    /// Type in the source (GGUF type name or safetensors dtype).
    pub source_type: String,
    source: Source,
}

impl BaseTensor {
    /// Shape in torch order.
    pub fn shape_torch(&self) -> Vec<u64> {
        self.dims.iter().rev().copied().collect()
    }

    /// Number of elements.
    pub fn n_elements(&self) -> usize {
        self.dims.iter().product::<u64>() as usize
    }
}

/// Hyperparameters the merge needs.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Transformer blocks.
    pub n_layers: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads.
    pub n_head_kv: usize,
}

enum Storage {
    Gguf(GgufFile),
    Hf {
        maps: Vec<Mmap>,
        files: Vec<PathBuf>,
        metadata: Vec<(String, MetadataValue<'static>)>,
    },
}

/// A base model opened for conversion.
pub struct BaseModel {
    /// The file or folder.
    pub path: PathBuf,
    /// Its architecture.
    pub arch: Architecture,
    /// Hyperparameters the merge needs.
    pub shape: Shape,
    /// Tensors in output order.
    pub tensors: Vec<BaseTensor>,
    /// Whether the output head shares the token embedding (no output.weight).
    pub tied_embeddings: bool,
    /// Notes for the user (skipped tensors, missing tokenizer).
    pub notes: Vec<String>,
    storage: Storage,
}

impl std::fmt::Debug for BaseModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BaseModel")
            .field("path", &self.path)
            .field("arch", &self.arch)
            .finish()
    }
}

impl BaseModel {
    /// Open a GGUF file or an HF model folder.
    pub fn open(path: impl AsRef<Path>) -> Result<BaseModel, BaseError> {
        let path = path.as_ref();
        if path.is_dir() {
            hf::open_hf(path)
        } else {
            open_gguf(path)
        }
    }

    /// The base tensor named `name`.
    pub fn tensor(&self, name: &str) -> Option<&BaseTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The GGUF metadata the output starts from (hyperparameters, tokenizer).
    pub fn metadata(&self) -> Vec<(String, MetadataValue<'_>)> {
        match &self.storage {
            Storage::Gguf(f) => f.metadata().map(|(k, v)| (k.to_string(), v)).collect(),
            Storage::Hf { metadata, .. } => metadata.clone(),
        }
    }

    /// The tensor's values as f32, row-major in GGUF order (dequantized,
    /// widened, and for HF q/k permuted as llama.cpp does).
    pub fn values(&self, t: &BaseTensor) -> Result<Vec<f32>, BaseError> {
        let values = self.read(t)?;
        check_finite(&values).map_err(|found| {
            let (path, tensor) = self.origin(t);
            BaseError::NonFinite {
                path,
                tensor,
                found,
            }
        })?;
        Ok(values)
    }

    /// The tensor's bytes as stored in a GGUF base and their type; `None`
    /// for an HF base or a computed tensor. What a conversion copies when
    /// the type asked for is the type stored.
    pub fn stored(&self, t: &BaseTensor) -> Option<(GgmlType, &[u8])> {
        match (&t.source, &self.storage) {
            (Source::Gguf { index }, Storage::Gguf(f)) => {
                let info = &f.tensors()[*index];
                Some((info.ggml_type, f.tensor_data(info)))
            }
            _ => None,
        }
    }

    /// Bytes of one row of a GGUF base's tensor, when its rows are whole
    /// blocks and its data fits its shape: what [`BaseModel::row_values`]
    /// and a copy by rows need.
    pub fn row_bytes(&self, t: &BaseTensor) -> Option<usize> {
        let (ty, data) = self.stored(t)?;
        let k = *t.dims.first()? as usize;
        let (bs, ts) = (ty.block_size() as usize, ty.type_size() as usize);
        let fits = bs != 0 && k.is_multiple_of(bs) && data.len() == t.n_elements() / bs * ts;
        fits.then_some(k / bs * ts)
    }

    /// Rows `rows` of a GGUF base's tensor as stored, checked as
    /// [`BaseModel::values`] checks values (finite, the same error); `None`
    /// where rows cannot be read apart. What a copy writes.
    pub fn stored_rows(
        &self,
        t: &BaseTensor,
        rows: std::ops::Range<usize>,
    ) -> Option<Result<&[u8], BaseError>> {
        let (ty, data) = self.stored(t)?;
        let row_bytes = self.row_bytes(t)?;
        let bytes = &data[rows.start * row_bytes..rows.end * row_bytes];
        // A finite scale gives finite values in every block type, so the
        // bytes are scanned, and decoded only to name a bad value.
        if quant::first_non_finite(ty, bytes).is_none() {
            return Some(Ok(bytes));
        }
        Some(match self.row_values(t, rows)? {
            Err(e @ BaseError::NonFinite { .. }) => Err(e),
            _ => Err(BaseError::Invalid {
                path: self.path.clone(),
                problem: format!("tensor '{}': a block's scale is not finite", t.name),
            }),
        })
    }

    /// Rows `rows` of a GGUF base's tensor as f32 (rows are `dims[0]`
    /// wide), checked finite; `None` where rows cannot be read apart (an HF
    /// base, whose q/k rows are permuted, or a computed tensor). The mapped
    /// bytes read are released, so a tensor streamed by rows is never
    /// resident whole.
    pub fn row_values(
        &self,
        t: &BaseTensor,
        rows: std::ops::Range<usize>,
    ) -> Option<Result<Vec<f32>, BaseError>> {
        let (ty, data) = self.stored(t)?;
        let row_bytes = self.row_bytes(t)?;
        let k = t.dims[0] as usize;
        let bytes = &data[rows.start * row_bytes..rows.end * row_bytes];
        let values =
            quant::dequantize(ty, bytes, rows.len() * k, &t.name).map_err(|e| BaseError::Invalid {
                path: self.path.clone(),
                problem: e.to_string(),
            });
        release_mapped(bytes);
        Some(values.and_then(|v| {
            // Named by its index in the whole tensor, as a whole read names it.
            check_finite(&v).map_err(|mut found| {
                found.index += rows.start * k;
                BaseError::NonFinite {
                    path: self.path.clone(),
                    tensor: t.name.clone(),
                    found,
                }
            })?;
            Ok(v)
        }))
    }

    /// The file a tensor comes from and its name there.
    fn origin(&self, t: &BaseTensor) -> (PathBuf, String) {
        match (&t.source, &self.storage) {
            (Source::Hf { file, key, .. }, Storage::Hf { files, .. }) => {
                (files[*file].clone(), key.clone())
            }
            // Computed tensors come from config.json.
            (Source::Computed(_), _) => (self.path.join("config.json"), t.name.clone()),
            _ => (self.path.clone(), t.name.clone()),
        }
    }

    fn read(&self, t: &BaseTensor) -> Result<Vec<f32>, BaseError> {
        match (&t.source, &self.storage) {
            (Source::Computed(v), _) => Ok(v.clone()),
            (Source::Gguf { index }, Storage::Gguf(f)) => {
                let info = &f.tensors()[*index];
                let (data, ty, n) = (f.tensor_data(info), info.ggml_type, t.n_elements());
                let bad = |e: QuantError| BaseError::Invalid {
                    path: self.path.clone(),
                    problem: e.to_string(),
                };
                // A run of blocks at a time, each released once read, so
                // that the largest tensor is resident once, not twice.
                let (bs, ts) = (ty.block_size() as usize, ty.type_size() as usize);
                if bs == 0 || !n.is_multiple_of(bs) || data.len() != n / bs * ts {
                    return quant::dequantize(ty, data, n, &t.name).map_err(bad);
                }
                let run = (READ_RUN / bs).max(1);
                let mut v = Vec::with_capacity(n);
                for b0 in (0..n / bs).step_by(run) {
                    let b1 = (b0 + run).min(n / bs);
                    let bytes = &data[b0 * ts..b1 * ts];
                    v.extend(quant::dequantize(ty, bytes, (b1 - b0) * bs, &t.name).map_err(bad)?);
                    release_mapped(bytes);
                }
                Ok(v)
            }
            (
                Source::Hf {
                    file,
                    key,
                    permute_heads,
                    offset,
                },
                Storage::Hf { maps, files, .. },
            ) => {
                let bad = |problem: String| BaseError::Invalid {
                    path: files[*file].clone(),
                    problem,
                };
                let st = SafeTensors::deserialize(&maps[*file]).map_err(|e| bad(e.to_string()))?;
                let view = st.tensor(key).map_err(|e| bad(e.to_string()))?;
                let v = widen(view.dtype(), view.data());
                release_mapped(view.data());
                let mut v = v.ok_or_else(|| {
                    bad(format!(
                        "tensor '{key}': dtype {:?} is not f32, f16 or bf16",
                        view.dtype()
                    ))
                })?;
                if *offset != 0.0 {
                    // In f32, as llama.cpp's converter adds it.
                    v.iter_mut().for_each(|x| *x += *offset);
                }
                Ok(match permute_heads {
                    // A bias is one value per row.
                    Some(h) => permute_rows(
                        &v,
                        if t.dims.len() == 1 {
                            1
                        } else {
                            t.dims[0] as usize
                        },
                        *h,
                    ),
                    None => v,
                })
            }
            _ => unreachable!("sources match their storage"),
        }
    }
}

/// Values a base tensor is read by at a time.
const READ_RUN: usize = 1 << 18;

/// Each base tensor is read once, into its own buffer: its mapped pages
/// need not stay in this process's resident set (they stay in the page
/// cache). Without this a conversion's peak RSS grows by the whole base
/// (SmolLM2 f32: 540 MB) however few tensors are in flight.
pub fn release_mapped(bytes: &[u8]) {
    #[cfg(unix)]
    {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let (start, end) = (
            bytes.as_ptr() as usize,
            bytes.as_ptr() as usize + bytes.len(),
        );
        // Whole pages inside the range only: a neighbour may share the edges.
        let (a, b) = (start.div_ceil(page) * page, end / page * page);
        if b > a {
            // SAFETY: the range lies inside a read-only file mapping that
            // outlives this call and that nobody writes; MADV_DONTNEED only
            // drops our page-table entries, and a later read faults the same
            // bytes back in from the file. The advice is a hint: failure
            // changes nothing.
            unsafe {
                libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_DONTNEED);
            }
        }
    }
    #[cfg(not(unix))]
    let _ = bytes;
}

/// Rows of `v` (each `row_len` wide) reordered as llama.cpp permutes q/k.
pub fn permute_rows<T: Copy>(v: &[T], row_len: usize, n_head: usize) -> Vec<T> {
    let rows = v.len() / row_len;
    let mut out = Vec::with_capacity(v.len());
    for src in qk_permutation(rows, n_head) {
        out.extend_from_slice(&v[src * row_len..(src + 1) * row_len]);
    }
    out
}

/// Little-endian f32/f16/bf16 bytes widened to f32.
pub fn widen(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}

fn open_gguf(path: &Path) -> Result<BaseModel, BaseError> {
    let f = GgufFile::open(path)?;
    let bad = |problem: String| BaseError::Invalid {
        path: path.to_path_buf(),
        problem,
    };
    if f.get_str(names::TYPE).as_deref() == Some(names::TYPE_ADAPTER) {
        return Err(bad("this is a LoRA adapter GGUF, not a base model".into()));
    }
    let mut tensors = Vec::new();
    for (index, t) in f.tensors().iter().enumerate() {
        if t.dims().is_empty() || t.dims().contains(&0) {
            return Err(bad(format!(
                "tensor '{}': dims {:?}: a weight needs at least one dimension and none of length 0",
                t.name,
                t.dims()
            )));
        }
        if t.ggml_type.to_candle().is_none() {
            return Err(bad(format!(
                "tensor '{}': ggml type {} cannot be dequantized",
                t.name, t.ggml_type
            )));
        }
        tensors.push(BaseTensor {
            name: t.name.clone(),
            dims: t.dims().to_vec(),
            source_type: t.ggml_type.name().to_string(),
            source: Source::Gguf { index },
        });
    }
    // The output carries this file's metadata, so it gets the runtime's own
    // checks at load (hyperparameters against every tensor, and the
    // tokenizer's lists and ids) before any work: what converts, runs.
    let config = ModelConfig::read(&f).map_err(|e| match e {
        RuntimeError::Model { problem, .. } => bad(problem),
        other => bad(other.to_string()),
    })?;
    if f.get(names::TOKENIZER_MODEL).is_some() || f.get(names::TOKENIZER_TOKENS).is_some() {
        TokenizerMetadata::read(|k| f.get(k), Some(config.vocab as u64)).map_err(bad)?;
    }
    let tied_embeddings = f.tensor(names::OUTPUT).is_none();
    Ok(BaseModel {
        path: path.to_path_buf(),
        arch: config.arch,
        shape: Shape {
            n_layers: config.n_layers,
            n_head: config.n_head,
            n_head_kv: config.n_head_kv,
        },
        tensors,
        tied_embeddings,
        notes: Vec::new(),
        storage: Storage::Gguf(f),
    })
}

/// HF tensor name -> GGUF tensor name, for the llama family (other
/// architectures: [`lorafold_runtime::arch::ArchSpec::hf_to_gguf`]).
pub fn hf_to_gguf_name(hf: &str) -> Option<String> {
    Architecture::Llama.spec().hf_to_gguf(hf)
}

/// GGUF tensor name -> HF tensor name, the inverse of [`hf_to_gguf_name`].
pub fn gguf_to_hf_name(gguf: &str) -> Option<String> {
    Architecture::Llama.spec().gguf_to_hf(gguf)
}

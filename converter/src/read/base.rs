//! Base models: a GGUF file (any type candle can dequantize) or a Hugging Face
//! folder (config.json + safetensors), seen as GGUF-named f32 tensors.

use lorafold_runtime::gguf::names;
use std::path::{Path, PathBuf};

use lorafold_runtime::arch::{qk_permutation, ArchSpec, Architecture, LocalLayers};
use lorafold_runtime::gguf::{GgmlType, GgufFile, HyperKey, MetadataValue, ShapeOrder, ShapeRules};
use lorafold_runtime::input::read_regular;
use lorafold_runtime::model::{ModelConfig, RuntimeError};
use lorafold_runtime::tokenizer::TokenizerMetadata;
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::error::check_finite;
use crate::read::hf_tokenizer;
use crate::read::safetensors_dir::{map_safetensors, model_files};
use crate::round::quant::{self, QuantError};

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
            open_hf(path)
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
        let values = quant::dequantize(ty, bytes, rows.len() * k, &t.name).map_err(|e| {
            BaseError::Invalid {
                path: self.path.clone(),
                problem: e.to_string(),
            }
        });
        release_mapped(bytes);
        Some(values.and_then(|v| {
            check_finite(&v).map_err(|found| BaseError::NonFinite {
                path: self.path.clone(),
                tensor: t.name.clone(),
                found,
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

/// A count in config.json (layers, heads, widths): a positive integer that
/// fits the u32 GGUF stores it in. `default` is used only when the key is absent.
fn config_count(cfg: &Value, key: &str, default: Option<u64>) -> Result<u64, String> {
    match cfg.get(key) {
        None | Some(Value::Null) => default.ok_or_else(|| format!("'{key}' is missing")),
        Some(v) => match v.as_u64() {
            Some(0) => Err(format!("'{key}' is 0; it must be positive")),
            Some(n) if n > u32::MAX as u64 => Err(format!(
                "'{key}' is {n}, beyond {} (GGUF stores it as u32)",
                u32::MAX
            )),
            Some(n) => Ok(n),
            None => Err(format!("'{key}' is {v}, not a positive integer")),
        },
    }
}

/// A positive real in config.json (epsilon, RoPE base, scaling factor), finite
/// and non-zero also as the f32 GGUF stores. `default` is used only when absent.
fn config_positive(value: Option<&Value>, key: &str, default: f64) -> Result<f64, String> {
    match value {
        None | Some(Value::Null) => Ok(default),
        Some(v) => match v.as_f64() {
            Some(x) if x > 0.0 && (x as f32).is_finite() && (x as f32) > 0.0 => Ok(x),
            _ => Err(format!("'{key}' is {v}, not a positive finite number")),
        },
    }
}

fn open_hf(dir: &Path) -> Result<BaseModel, BaseError> {
    let config_path = dir.join("config.json");
    let bad = |problem: String| BaseError::Invalid {
        path: config_path.clone(),
        problem,
    };
    let text = read_regular(&config_path, "a JSON file").map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            BaseError::Invalid {
                path: dir.to_path_buf(),
                problem: "a folder without config.json: not a Hugging Face model folder (a GGUF base is a file)".into(),
            }
        } else {
            BaseError::Io {
                path: config_path.clone(),
                source,
            }
        }
    })?;
    let cfg: Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let model_type = cfg.get("model_type").and_then(Value::as_str).unwrap_or("");
    let arch = Architecture::from_hf_model_type(model_type).ok_or_else(|| {
        let known: Vec<&str> = Architecture::ALL
            .iter()
            .flat_map(|a| a.spec().hf_model_types.iter().copied())
            .collect();
        bad(format!(
            "unsupported model_type '{model_type}' (supported: {})",
            known.join(", ")
        ))
    })?;
    let spec = arch.spec();
    let count = |k: &str, default: Option<u64>| config_count(&cfg, k, default).map_err(bad);
    let hidden = count("hidden_size", None)?;
    let n_head = count("num_attention_heads", None)?;
    let n_head_kv = count("num_key_value_heads", Some(n_head))?;
    let n_layers = count("num_hidden_layers", None)?;
    let ffn = count("intermediate_size", None)?;
    let vocab = count("vocab_size", None)?;
    let context = count("max_position_embeddings", Some(2048))?;
    if n_head % n_head_kv != 0 {
        return Err(bad(format!(
            "'num_attention_heads' {n_head} is not a multiple of 'num_key_value_heads' {n_head_kv}"
        )));
    }
    if cfg.get("head_dim").is_none_or(Value::is_null) && hidden % n_head != 0 {
        return Err(bad(format!(
            "'hidden_size' {hidden} is not a multiple of 'num_attention_heads' {n_head}, and there is no 'head_dim'"
        )));
    }
    let head_dim = count("head_dim", Some(hidden / n_head))?;
    let rope_theta = config_positive(
        cfg.get("rope_theta")
            .or_else(|| cfg.pointer("/rope_parameters/rope_theta"))
            // transformers 5 gives Gemma 3 a base per layer type.
            .or_else(|| cfg.pointer("/rope_parameters/full_attention/rope_theta")),
        "rope_theta",
        10000.0,
    )
    .map_err(bad)?;
    let sliding_window = match spec.local_layers {
        None => None,
        Some(local) => Some(local_layer_settings(&cfg, local, head_dim).map_err(bad)?),
    };
    let rms_norm_eps =
        config_positive(cfg.get("rms_norm_eps"), "rms_norm_eps", 1e-6).map_err(bad)?;
    let rope_scaling = cfg
        .get("rope_scaling")
        .filter(|v| !v.is_null())
        .or_else(|| cfg.get("rope_parameters"))
        .map(|r| r.get("full_attention").unwrap_or(r));
    let rope_type = rope_scaling
        .and_then(|r| r.get("rope_type").or_else(|| r.get("type")))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let tied = match cfg.get("tie_word_embeddings") {
        // transformers' default: Gemma configs tie unless they say otherwise.
        None | Some(Value::Null) => arch == Architecture::Gemma3,
        Some(Value::Bool(b)) => *b,
        Some(v) => {
            return Err(bad(format!(
                "'tie_word_embeddings' is {v}, not true or false"
            )))
        }
    };

    let a = arch.gguf_name();
    let u32_md = |n: u64| MetadataValue::U32(n as u32); // every count is checked to fit
    let mut metadata: Vec<(String, MetadataValue<'static>)> = vec![
        (names::ARCHITECTURE.into(), MetadataValue::string(a)),
        (names::TYPE.into(), MetadataValue::string(names::TYPE_MODEL)),
        (
            names::NAME.into(),
            MetadataValue::string(
                dir.file_name()
                    .map_or("model".into(), |n| n.to_string_lossy().into_owned()),
            ),
        ),
        (HyperKey::BlockCount.key(a), u32_md(n_layers)),
        (HyperKey::ContextLength.key(a), u32_md(context)),
        (HyperKey::EmbeddingLength.key(a), u32_md(hidden)),
        (HyperKey::FeedForwardLength.key(a), u32_md(ffn)),
        (HyperKey::HeadCount.key(a), u32_md(n_head)),
        (HyperKey::HeadCountKv.key(a), u32_md(n_head_kv)),
        (
            HyperKey::RopeFreqBase.key(a),
            MetadataValue::F32(rope_theta as f32),
        ),
        (
            HyperKey::RmsEpsilon.key(a),
            MetadataValue::F32(rms_norm_eps as f32),
        ),
        (HyperKey::RopeDimensionCount.key(a), u32_md(head_dim)),
        (HyperKey::VocabSize.key(a), u32_md(vocab)),
    ];
    if head_dim != hidden / n_head {
        metadata.push((HyperKey::KeyLength.key(a), u32_md(head_dim)));
        metadata.push((HyperKey::ValueLength.key(a), u32_md(head_dim)));
    }
    if let Some(w) = sliding_window {
        metadata.push((HyperKey::SlidingWindow.key(a), u32_md(w)));
    }
    let mut computed = Vec::new();
    match rope_type {
        "default" => {}
        "linear" => {
            let factor = config_positive(
                rope_scaling.and_then(|r| r.get("factor")),
                "rope_scaling.factor",
                1.0,
            )
            .map_err(bad)?;
            metadata.push((
                format!("{a}.rope.scaling.type"),
                MetadataValue::string("linear"),
            ));
            metadata.push((
                format!("{a}.rope.scaling.factor"),
                MetadataValue::F32(factor as f32),
            ));
        }
        "llama3" => computed.push((
            names::ROPE_FREQS.to_string(),
            llama3_rope_factors(rope_scaling.unwrap(), rope_theta, head_dim as usize),
        )),
        other => {
            return Err(bad(format!(
                "rope scaling '{other}' is not supported (default, linear, llama3 are)"
            )))
        }
    }

    let files = model_files(dir)?;
    let mut maps = Vec::new();
    let mut found: Vec<(String, BaseTensor)> = Vec::new();
    let mut tensor_notes = Vec::new();
    for (fi, file) in files.iter().enumerate() {
        let map = map_safetensors(file)?;
        let st = SafeTensors::deserialize(&map).expect("checked by map_safetensors");
        let mut keys: Vec<&str> = st.names().into_iter().collect();
        keys.sort();
        for key in keys {
            let view = st.tensor(key).expect("listed");
            if key.ends_with("rotary_emb.inv_freq") {
                continue;
            }
            if tied && key == "lm_head.weight" {
                tensor_notes.push(format!("{key} skipped: tie_word_embeddings is set"));
                continue;
            }
            let name = spec.hf_to_gguf(key).ok_or_else(|| BaseError::Invalid {
                path: file.clone(),
                problem: format!("tensor '{key}' has no llama.cpp name for {model_type}"),
            })?;
            if !matches!(view.dtype(), Dtype::F32 | Dtype::F16 | Dtype::BF16) {
                return Err(BaseError::Invalid {
                    path: file.clone(),
                    problem: format!(
                        "tensor '{key}': dtype {:?} is not f32, f16 or bf16",
                        view.dtype()
                    ),
                });
            }
            let permute_heads = if arch.permutes_qk() {
                if name.contains(".attn_q.") {
                    Some(n_head as usize)
                } else if name.contains(".attn_k.") {
                    Some(n_head_kv as usize)
                } else {
                    None
                }
            } else {
                None
            };
            let dims: Vec<u64> = view.shape().iter().rev().map(|&d| d as u64).collect();
            if dims.is_empty() || dims.contains(&0) {
                return Err(BaseError::Invalid {
                    path: file.clone(),
                    problem: format!(
                        "tensor '{key}': shape {:?}: a weight needs at least one dimension and none of length 0",
                        view.shape()
                    ),
                });
            }
            if let Some(h) = permute_heads {
                let rows = dims.get(1).copied().unwrap_or(dims[0]);
                if rows % (2 * h as u64) != 0 {
                    return Err(BaseError::Invalid {
                        path: file.clone(),
                        problem: format!("tensor '{key}': {rows} rows cannot be split into {h} heads of rotary pairs"),
                    });
                }
            }
            let t = BaseTensor {
                name: name.clone(),
                dims,
                source_type: format!("{:?}", view.dtype()),
                source: Source::Hf {
                    file: fi,
                    key: key.to_string(),
                    permute_heads,
                    offset: if spec.is_norm(&name) {
                        spec.hf_norm_offset
                    } else {
                        0.0
                    },
                },
            };
            found.push((name, t));
        }
        maps.push(map);
    }
    for (name, v) in computed {
        found.push((
            name.clone(),
            BaseTensor {
                name,
                dims: vec![v.len() as u64],
                source_type: "F32".into(),
                source: Source::Computed(v),
            },
        ));
    }
    found.sort_by_key(|(n, _)| gguf_order(spec, n));
    let tensors: Vec<BaseTensor> = found.into_iter().map(|(_, t)| t).collect();
    let hyper = ShapeRules::new(
        arch,
        [n_layers, hidden, n_head, n_head_kv, head_dim, ffn, vocab],
        [
            "num_hidden_layers",
            "hidden_size",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "intermediate_size",
            "vocab_size",
        ]
        .map(str::to_string),
    );
    let named: Vec<(&str, &[u64])> = tensors
        .iter()
        .map(|t| (t.name.as_str(), t.dims.as_slice()))
        .collect();
    hyper
        .check(
            &named,
            |n| spec.gguf_to_hf(n).unwrap_or_else(|| n.to_string()),
            ShapeOrder::Torch,
        )
        .map_err(bad)?;

    // The tokenizer is read only now that vocab_size is known to match the
    // embedding, so its ids are bounded by real rows, not by a claim.
    let mut notes = Vec::new();
    match hf_tokenizer::gguf_metadata(dir, vocab) {
        Ok(Some(tok)) => {
            // Checked as the runtime checks it when it builds the tokenizer.
            let value = |k: &str| tok.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
            TokenizerMetadata::read(value, Some(vocab)).map_err(|problem| BaseError::Invalid {
                path: dir.join("tokenizer.json"),
                problem,
            })?;
            metadata.extend(tok)
        }
        Ok(None) => notes.push(format!(
            "{}: no tokenizer.json; the output carries no tokenizer and llama.cpp cannot run it",
            dir.display()
        )),
        Err(hf_tokenizer::TokenizerError::Unsupported(why)) => notes.push(format!(
            "{}: {why}; the output carries no tokenizer",
            dir.join("tokenizer.json").display()
        )),
        Err(hf_tokenizer::TokenizerError::Io { path, source }) => {
            return Err(BaseError::Io { path, source })
        }
        Err(e) => {
            return Err(BaseError::Invalid {
                path: dir.join("tokenizer.json"),
                problem: e.to_string(),
            })
        }
    }
    notes.extend(tensor_notes);
    let tied_embeddings = !tensors.iter().any(|t| t.name == names::OUTPUT);
    Ok(BaseModel {
        path: dir.to_path_buf(),
        arch,
        shape: Shape {
            n_layers: n_layers as usize,
            n_head: n_head as usize,
            n_head_kv: n_head_kv as usize,
        },
        tensors,
        tied_embeddings,
        notes,
        storage: Storage::Hf {
            maps,
            files,
            metadata,
        },
    })
}

/// Sort key giving llama.cpp's usual order: embeddings, rope factors, blocks in
/// order (parts as the architecture lists them), then the output norm and head.
fn gguf_order(spec: &ArchSpec, name: &str) -> (usize, usize, usize, String) {
    match name {
        names::TOKEN_EMBD => (0, 0, 0, String::new()),
        names::ROPE_FREQS => (1, 0, 0, String::new()),
        names::OUTPUT_NORM => (3, 0, 0, String::new()),
        names::OUTPUT => (4, 0, 0, String::new()),
        _ => {
            let mut it = name.split('.');
            let layer = it.nth(1).and_then(|l| l.parse().ok()).unwrap_or(usize::MAX);
            let part = it.next().unwrap_or("");
            let idx = spec
                .parts
                .iter()
                .position(|p| p.gguf == part)
                .unwrap_or(spec.parts.len());
            (2, layer, idx, name.to_string())
        }
    }
}

/// The sliding window of an architecture with local layers, after checking
/// that config.json describes the layers the architecture fixes (llama.cpp
/// stores only the window and the global RoPE base, so anything else would
/// convert into a model that runs wrong): the local RoPE base, the pattern
/// of local and global layers, the attention scale, GELU-tanh, and no
/// logit soft-capping.
fn local_layer_settings(cfg: &Value, local: LocalLayers, head_dim: u64) -> Result<u64, String> {
    let window = config_count(cfg, "sliding_window", None)?;
    let local_base = cfg
        .pointer("/rope_parameters/sliding_attention/rope_theta")
        .or_else(|| cfg.get("rope_local_base_freq"));
    if let Some(b) = local_base.filter(|v| !v.is_null()) {
        if b.as_f64() != Some(local.rope_base as f64) {
            return Err(format!(
                "the local layers' RoPE base is {b}, but llama.cpp fixes it at {}",
                local.rope_base
            ));
        }
    }
    if let Some(types) = cfg.get("layer_types").and_then(Value::as_array) {
        for (l, t) in types.iter().enumerate() {
            let want = if local.is_local(l) {
                "sliding_attention"
            } else {
                "full_attention"
            };
            if t.as_str() != Some(want) {
                return Err(format!(
                    "'layer_types'[{l}] is {t}, but llama.cpp runs layer {l} as {want} (every {}th layer is global)",
                    local.period
                ));
            }
        }
    }
    if let Some(p) = cfg.get("sliding_window_pattern").filter(|v| !v.is_null()) {
        if p.as_u64() != Some(local.period as u64) {
            return Err(format!(
                "'sliding_window_pattern' is {p}, but llama.cpp fixes it at {}",
                local.period
            ));
        }
    }
    if let Some(s) = cfg.get("query_pre_attn_scalar").filter(|v| !v.is_null()) {
        if s.as_f64() != Some(head_dim as f64) {
            return Err(format!(
                "'query_pre_attn_scalar' is {s}; only the head width ({head_dim}) is supported"
            ));
        }
    }
    for key in ["hidden_activation", "hidden_act"] {
        if let Some(a) = cfg.get(key).and_then(Value::as_str) {
            if a != "gelu_pytorch_tanh" {
                return Err(format!("'{key}' is '{a}'; gelu_pytorch_tanh is supported"));
            }
        }
    }
    for key in ["final_logit_softcapping", "attn_logit_softcapping"] {
        if cfg.get(key).is_some_and(|v| !v.is_null()) {
            return Err(format!("'{key}' is set; soft-capping is not supported"));
        }
    }
    Ok(window)
}

/// llama.cpp's rope_freqs for Llama 3.1-style "llama3" rope scaling.
fn llama3_rope_factors(scaling: &Value, theta: f64, head_dim: usize) -> Vec<f32> {
    let g = |k: &str, d: f64| scaling.get(k).and_then(Value::as_f64).unwrap_or(d);
    let factor = g("factor", 8.0);
    let low = g("low_freq_factor", 1.0);
    let high = g("high_freq_factor", 4.0);
    let old_ctx = g("original_max_position_embeddings", 8192.0);
    let (low_wavelen, high_wavelen) = (old_ctx / low, old_ctx / high);
    (0..head_dim)
        .step_by(2)
        .map(|i| {
            let freq = 1.0 / theta.powf(i as f64 / head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let f = if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (old_ctx / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            f as f32
        })
        .collect()
}

//! Base models: a GGUF file (any type candle can dequantize) or a Hugging Face
//! folder (config.json + safetensors), seen as GGUF-named f32 tensors.

use std::path::{Path, PathBuf};

use lorafold_runtime::arch::{qk_permutation, Architecture};
use lorafold_runtime::gguf::{GgufFile, MetadataValue};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::hf_tokenizer;
use crate::quant;
use crate::safetensors_dir::{map_safetensors, model_files};

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
        match (&t.source, &self.storage) {
            (Source::Computed(v), _) => Ok(v.clone()),
            (Source::Gguf { index }, Storage::Gguf(f)) => {
                let info = &f.tensors()[*index];
                quant::dequantize(info.ggml_type, f.tensor_data(info), t.n_elements(), &t.name)
                    .map_err(|e| BaseError::Invalid {
                        path: self.path.clone(),
                        problem: e.to_string(),
                    })
            }
            (
                Source::Hf {
                    file,
                    key,
                    permute_heads,
                },
                Storage::Hf { maps, files, .. },
            ) => {
                let bad = |problem: String| BaseError::Invalid {
                    path: files[*file].clone(),
                    problem,
                };
                let st = SafeTensors::deserialize(&maps[*file]).map_err(|e| bad(e.to_string()))?;
                let view = st.tensor(key).map_err(|e| bad(e.to_string()))?;
                let v = widen(view.dtype(), view.data()).ok_or_else(|| {
                    bad(format!(
                        "tensor '{key}': dtype {:?} is not f32, f16 or bf16",
                        view.dtype()
                    ))
                })?;
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
    let arch_name = f
        .get_str("general.architecture")
        .ok_or_else(|| bad("no general.architecture".into()))?
        .into_owned();
    let arch = Architecture::from_gguf_name(&arch_name).ok_or_else(|| {
        bad(format!(
            "unknown architecture '{arch_name}' (supported: llama, mistral as llama, qwen2)"
        ))
    })?;
    if f.get_str("general.type").as_deref() == Some("adapter") {
        return Err(bad("this is a LoRA adapter GGUF, not a base model".into()));
    }
    let key = |k: &str| {
        f.get_u64(&format!("{arch_name}.{k}"))
            .ok_or_else(|| bad(format!("missing {arch_name}.{k}")))
    };
    let n_head = key("attention.head_count")? as usize;
    let shape = Shape {
        n_layers: key("block_count")? as usize,
        n_head,
        n_head_kv: f
            .get_u64(&format!("{arch_name}.attention.head_count_kv"))
            .map_or(n_head, |v| v as usize),
    };
    let mut tensors = Vec::new();
    for (index, t) in f.tensors().iter().enumerate() {
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
    if shape.n_head == 0 || shape.n_head_kv == 0 {
        return Err(bad(format!(
            "{} heads and {} key/value heads cannot be right",
            shape.n_head, shape.n_head_kv
        )));
    }
    let tied_embeddings = f.tensor("output.weight").is_none();
    Ok(BaseModel {
        path: path.to_path_buf(),
        arch,
        shape,
        tensors,
        tied_embeddings,
        notes: Vec::new(),
        storage: Storage::Gguf(f),
    })
}

/// HF tensor name -> GGUF tensor name, for the llama family.
pub fn hf_to_gguf_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(n) = fixed {
        return Some(n.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let part = match module {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        _ => return None,
    };
    matches!(suffix, "weight" | "bias").then(|| format!("blk.{layer}.{part}.{suffix}"))
}

fn open_hf(dir: &Path) -> Result<BaseModel, BaseError> {
    let config_path = dir.join("config.json");
    let bad = |problem: String| BaseError::Invalid {
        path: config_path.clone(),
        problem,
    };
    let text = std::fs::read_to_string(&config_path).map_err(|source| BaseError::Io {
        path: config_path.clone(),
        source,
    })?;
    let cfg: Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let model_type = cfg.get("model_type").and_then(Value::as_str).unwrap_or("");
    let arch = match model_type {
        "llama" | "mistral" => Architecture::Llama,
        "qwen2" => Architecture::Qwen2,
        other => {
            return Err(bad(format!(
                "unsupported model_type '{other}' (supported: llama, mistral, qwen2)"
            )))
        }
    };
    let u = |k: &str| {
        cfg.get(k)
            .and_then(Value::as_u64)
            .ok_or_else(|| bad(format!("missing or invalid '{k}'")))
    };
    let hidden = u("hidden_size")?;
    let n_head = u("num_attention_heads")?;
    let n_head_kv = cfg
        .get("num_key_value_heads")
        .and_then(Value::as_u64)
        .unwrap_or(n_head);
    let n_layers = u("num_hidden_layers")?;
    if n_head == 0 || n_head_kv == 0 {
        return Err(bad(format!(
            "{n_head} attention heads and {n_head_kv} key/value heads cannot be right"
        )));
    }
    let head_dim = cfg
        .get("head_dim")
        .and_then(Value::as_u64)
        .unwrap_or(hidden / n_head);
    let rope_theta = cfg
        .get("rope_theta")
        .or_else(|| cfg.pointer("/rope_parameters/rope_theta"))
        .and_then(Value::as_f64)
        .unwrap_or(10000.0);
    let rope_scaling = cfg
        .get("rope_scaling")
        .filter(|v| !v.is_null())
        .or_else(|| cfg.get("rope_parameters"));
    let rope_type = rope_scaling
        .and_then(|r| r.get("rope_type").or_else(|| r.get("type")))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let tied = cfg
        .get("tie_word_embeddings")
        .and_then(Value::as_bool)
        .unwrap_or(false);

    let a = arch.gguf_name();
    let mut metadata: Vec<(String, MetadataValue<'static>)> = vec![
        ("general.architecture".into(), MetadataValue::string(a)),
        ("general.type".into(), MetadataValue::string("model")),
        (
            "general.name".into(),
            MetadataValue::string(
                dir.file_name()
                    .map_or("model".into(), |n| n.to_string_lossy().into_owned()),
            ),
        ),
        (
            format!("{a}.block_count"),
            MetadataValue::U32(n_layers as u32),
        ),
        (
            format!("{a}.context_length"),
            MetadataValue::U32(
                cfg.get("max_position_embeddings")
                    .and_then(Value::as_u64)
                    .unwrap_or(2048) as u32,
            ),
        ),
        (
            format!("{a}.embedding_length"),
            MetadataValue::U32(hidden as u32),
        ),
        (
            format!("{a}.feed_forward_length"),
            MetadataValue::U32(u("intermediate_size")? as u32),
        ),
        (
            format!("{a}.attention.head_count"),
            MetadataValue::U32(n_head as u32),
        ),
        (
            format!("{a}.attention.head_count_kv"),
            MetadataValue::U32(n_head_kv as u32),
        ),
        (
            format!("{a}.rope.freq_base"),
            MetadataValue::F32(rope_theta as f32),
        ),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            MetadataValue::F32(
                cfg.get("rms_norm_eps")
                    .and_then(Value::as_f64)
                    .unwrap_or(1e-6) as f32,
            ),
        ),
        (
            format!("{a}.rope.dimension_count"),
            MetadataValue::U32(head_dim as u32),
        ),
        (
            format!("{a}.vocab_size"),
            MetadataValue::U32(u("vocab_size")? as u32),
        ),
    ];
    if head_dim != hidden / n_head {
        metadata.push((
            format!("{a}.attention.key_length"),
            MetadataValue::U32(head_dim as u32),
        ));
        metadata.push((
            format!("{a}.attention.value_length"),
            MetadataValue::U32(head_dim as u32),
        ));
    }
    let mut computed = Vec::new();
    match rope_type {
        "default" => {}
        "linear" => {
            let factor = rope_scaling
                .and_then(|r| r.get("factor"))
                .and_then(Value::as_f64)
                .unwrap_or(1.0);
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
            "rope_freqs.weight".to_string(),
            llama3_rope_factors(rope_scaling.unwrap(), rope_theta, head_dim as usize),
        )),
        other => {
            return Err(bad(format!(
                "rope scaling '{other}' is not supported (default, linear, llama3 are)"
            )))
        }
    }

    let mut notes = Vec::new();
    match hf_tokenizer::gguf_metadata(dir) {
        Ok(Some(tok)) => metadata.extend(tok),
        Ok(None) => notes.push(format!(
            "{}: no tokenizer.json; the output carries no tokenizer and llama.cpp cannot run it",
            dir.display()
        )),
        Err(hf_tokenizer::TokenizerError::Unsupported(why)) => notes.push(format!(
            "{}: {why}; the output carries no tokenizer",
            dir.join("tokenizer.json").display()
        )),
        Err(e) => {
            return Err(BaseError::Invalid {
                path: dir.join("tokenizer.json"),
                problem: e.to_string(),
            })
        }
    }

    let files = model_files(dir)?;
    let mut maps = Vec::new();
    let mut found: Vec<(String, BaseTensor)> = Vec::new();
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
                notes.push(format!("{key} skipped: tie_word_embeddings is set"));
                continue;
            }
            let name = hf_to_gguf_name(key).ok_or_else(|| BaseError::Invalid {
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
    found.sort_by_key(|(n, _)| gguf_order(n));
    let tensors: Vec<BaseTensor> = found.into_iter().map(|(_, t)| t).collect();
    let tied_embeddings = !tensors.iter().any(|t| t.name == "output.weight");
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
/// order, then the output norm and head.
fn gguf_order(name: &str) -> (usize, usize, usize, String) {
    const PARTS: [&str; 9] = [
        "attn_norm",
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_output",
        "ffn_norm",
        "ffn_gate",
        "ffn_up",
        "ffn_down",
    ];
    match name {
        "token_embd.weight" => (0, 0, 0, String::new()),
        "rope_freqs.weight" => (1, 0, 0, String::new()),
        "output_norm.weight" => (3, 0, 0, String::new()),
        "output.weight" => (4, 0, 0, String::new()),
        _ => {
            let mut it = name.split('.');
            let layer = it.nth(1).and_then(|l| l.parse().ok()).unwrap_or(usize::MAX);
            let part = it.next().unwrap_or("");
            let idx = PARTS.iter().position(|p| *p == part).unwrap_or(PARTS.len());
            (2, layer, idx, name.to_string())
        }
    }
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

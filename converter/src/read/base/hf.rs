//! A Hugging Face model folder (config.json + safetensors) as a base: its
//! hyperparameters as GGUF metadata, its tensors under GGUF names.

use lorafold_runtime::gguf::names;
use std::path::{Path, PathBuf};

use lorafold_runtime::arch::{ArchSpec, Architecture, LocalLayers};
use lorafold_runtime::gguf::{HyperKey, MetadataValue, ShapeOrder, ShapeRules};
use lorafold_runtime::input::read_regular;
use lorafold_runtime::tokenizer::TokenizerMetadata;
use memmap2::Mmap;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use super::{BaseError, BaseModel, BaseTensor, Shape, Source, Storage};
use crate::read::hf_tokenizer;
use crate::read::safetensors_dir::{map_safetensors, model_files};

/// GGUF metadata as the output stores it.
type Metadata = Vec<(String, MetadataValue<'static>)>;

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

/// Open an HF model folder: config.json, then the safetensors, then the tokenizer.
pub(super) fn open_hf(dir: &Path) -> Result<BaseModel, BaseError> {
    let config_path = dir.join("config.json");
    let bad = |problem: String| BaseError::Invalid {
        path: config_path.clone(),
        problem,
    };
    let cfg = read_config(dir, &config_path)?;
    let hf = HfConfig::parse(&cfg).map_err(bad)?;
    let mut metadata = hf.hyperparameters(dir);
    let computed = hf.rope_scaling(&mut metadata).map_err(bad)?;

    let files = model_files(dir)?;
    let HfTensors {
        maps,
        mut found,
        notes: tensor_notes,
    } = hf.tensors(&files)?;
    found.extend(
        computed
            .into_iter()
            .map(|(name, v)| (name.clone(), computed_tensor(name, v))),
    );
    found.sort_by_key(|(n, _)| gguf_order(hf.spec, n));
    let tensors: Vec<BaseTensor> = found.into_iter().map(|(_, t)| t).collect();
    hf.check_shapes(&tensors).map_err(bad)?;

    // The tokenizer is read only now that vocab_size is known to match the
    // embedding, so its ids are bounded by real rows, not by a claim.
    let mut notes = add_tokenizer(dir, hf.vocab, &mut metadata)?;
    notes.extend(tensor_notes);
    let tied_embeddings = !tensors.iter().any(|t| t.name == names::OUTPUT);
    Ok(BaseModel {
        path: dir.to_path_buf(),
        arch: hf.arch,
        shape: Shape {
            n_layers: hf.n_layers as usize,
            n_head: hf.n_head as usize,
            n_head_kv: hf.n_head_kv as usize,
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

/// config.json as JSON; a folder without one is not an HF model.
fn read_config(dir: &Path, config_path: &Path) -> Result<Value, BaseError> {
    let text = read_regular(config_path, "a JSON file").map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            BaseError::Invalid {
                path: dir.to_path_buf(),
                problem: "a folder without config.json: not a Hugging Face model folder (a GGUF base is a file)".into(),
            }
        } else {
            BaseError::Io {
                path: config_path.to_path_buf(),
                source,
            }
        }
    })?;
    serde_json::from_str(&text).map_err(|e| BaseError::Invalid {
        path: config_path.to_path_buf(),
        problem: format!("not valid JSON: {e}"),
    })
}

/// config.json, checked: the architecture and the hyperparameters the conversion needs.
struct HfConfig<'a> {
    model_type: &'a str,
    arch: Architecture,
    spec: &'static ArchSpec,
    n_layers: u64,
    hidden: u64,
    n_head: u64,
    n_head_kv: u64,
    head_dim: u64,
    ffn: u64,
    vocab: u64,
    context: u64,
    rope_theta: f64,
    rms_norm_eps: f64,
    sliding_window: Option<u64>,
    /// The scaling of the full-attention layers' RoPE, if any.
    scaling: Option<&'a Value>,
    scaling_type: &'a str,
    /// lm_head is the token embedding.
    tied: bool,
}

impl<'a> HfConfig<'a> {
    /// The fields of `cfg`, checked in the order their errors have always come in.
    fn parse(cfg: &'a Value) -> Result<HfConfig<'a>, String> {
        let (model_type, arch) = architecture(cfg)?;
        let count = |k: &str, default: Option<u64>| config_count(cfg, k, default);
        let hidden = count("hidden_size", None)?;
        let n_head = count("num_attention_heads", None)?;
        let n_head_kv = count("num_key_value_heads", Some(n_head))?;
        let n_layers = count("num_hidden_layers", None)?;
        let ffn = count("intermediate_size", None)?;
        let vocab = count("vocab_size", None)?;
        let context = count("max_position_embeddings", Some(2048))?;
        let head_dim = head_dim(cfg, hidden, n_head, n_head_kv)?;
        let rope_theta = rope_theta(cfg)?;
        let sliding_window = match arch.spec().local_layers {
            None => None,
            Some(local) => Some(local_layer_settings(cfg, local, head_dim)?),
        };
        let rms_norm_eps = config_positive(cfg.get("rms_norm_eps"), "rms_norm_eps", 1e-6)?;
        let (scaling, scaling_type) = rope_scaling(cfg);
        let tied = tied_embeddings(cfg, arch)?;
        Ok(HfConfig {
            model_type,
            arch,
            spec: arch.spec(),
            n_layers,
            hidden,
            n_head,
            n_head_kv,
            head_dim,
            ffn,
            vocab,
            context,
            rope_theta,
            rms_norm_eps,
            sliding_window,
            scaling,
            scaling_type,
            tied,
        })
    }

    /// The hyperparameters as llama.cpp's metadata keys.
    fn hyperparameters(&self, dir: &Path) -> Metadata {
        let a = self.arch.gguf_name();
        let u32_md = |n: u64| MetadataValue::U32(n as u32); // every count is checked to fit
        let mut metadata: Metadata = vec![
            (names::ARCHITECTURE.into(), MetadataValue::string(a)),
            (names::TYPE.into(), MetadataValue::string(names::TYPE_MODEL)),
            (
                names::NAME.into(),
                MetadataValue::string(
                    dir.file_name()
                        .map_or("model".into(), |n| n.to_string_lossy().into_owned()),
                ),
            ),
            (HyperKey::BlockCount.key(a), u32_md(self.n_layers)),
            (HyperKey::ContextLength.key(a), u32_md(self.context)),
            (HyperKey::EmbeddingLength.key(a), u32_md(self.hidden)),
            (HyperKey::FeedForwardLength.key(a), u32_md(self.ffn)),
            (HyperKey::HeadCount.key(a), u32_md(self.n_head)),
            (HyperKey::HeadCountKv.key(a), u32_md(self.n_head_kv)),
            (
                HyperKey::RopeFreqBase.key(a),
                MetadataValue::F32(self.rope_theta as f32),
            ),
            (
                HyperKey::RmsEpsilon.key(a),
                MetadataValue::F32(self.rms_norm_eps as f32),
            ),
            (HyperKey::RopeDimensionCount.key(a), u32_md(self.head_dim)),
            (HyperKey::VocabSize.key(a), u32_md(self.vocab)),
        ];
        if self.head_dim != self.hidden / self.n_head {
            metadata.push((HyperKey::KeyLength.key(a), u32_md(self.head_dim)));
            metadata.push((HyperKey::ValueLength.key(a), u32_md(self.head_dim)));
        }
        if let Some(w) = self.sliding_window {
            metadata.push((HyperKey::SlidingWindow.key(a), u32_md(w)));
        }
        metadata
    }

    /// RoPE scaling: "linear" as metadata, "llama3" as a rope_freqs tensor (returned).
    fn rope_scaling(&self, metadata: &mut Metadata) -> Result<Vec<(String, Vec<f32>)>, String> {
        let a = self.arch.gguf_name();
        let mut computed = Vec::new();
        match self.scaling_type {
            "default" => {}
            "linear" => {
                let factor = config_positive(
                    self.scaling.and_then(|r| r.get("factor")),
                    "rope_scaling.factor",
                    1.0,
                )?;
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
                llama3_rope_factors(
                    self.scaling.unwrap(),
                    self.rope_theta,
                    self.head_dim as usize,
                ),
            )),
            other => {
                return Err(format!(
                    "rope scaling '{other}' is not supported (default, linear, llama3 are)"
                ))
            }
        }
        Ok(computed)
    }

    /// Every tensor of the safetensors `files`, in name order within each.
    fn tensors(&self, files: &[PathBuf]) -> Result<HfTensors, BaseError> {
        let mut out = HfTensors {
            maps: Vec::new(),
            found: Vec::new(),
            notes: Vec::new(),
        };
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
                if self.tied && key == "lm_head.weight" {
                    out.notes
                        .push(format!("{key} skipped: tie_word_embeddings is set"));
                    continue;
                }
                let t = self.tensor(fi, file, key, &view)?;
                out.found.push((t.name.clone(), t));
            }
            out.maps.push(map);
        }
        Ok(out)
    }

    /// Tensor `key` of file `fi` under its GGUF name, checked to widen and (q/k) permute.
    fn tensor(
        &self,
        fi: usize,
        file: &Path,
        key: &str,
        view: &TensorView<'_>,
    ) -> Result<BaseTensor, BaseError> {
        let bad = |problem: String| BaseError::Invalid {
            path: file.to_path_buf(),
            problem,
        };
        let name = self.spec.hf_to_gguf(key).ok_or_else(|| {
            bad(format!(
                "tensor '{key}' has no llama.cpp name for {}",
                self.model_type
            ))
        })?;
        if !matches!(view.dtype(), Dtype::F32 | Dtype::F16 | Dtype::BF16) {
            return Err(bad(format!(
                "tensor '{key}': dtype {:?} is not f32, f16 or bf16",
                view.dtype()
            )));
        }
        let permute_heads = self.permute_heads(&name);
        let dims: Vec<u64> = view.shape().iter().rev().map(|&d| d as u64).collect();
        if dims.is_empty() || dims.contains(&0) {
            return Err(bad(format!(
                "tensor '{key}': shape {:?}: a weight needs at least one dimension and none of length 0",
                view.shape()
            )));
        }
        if let Some(h) = permute_heads {
            let rows = dims.get(1).copied().unwrap_or(dims[0]);
            if rows % (2 * h as u64) != 0 {
                return Err(bad(format!(
                    "tensor '{key}': {rows} rows cannot be split into {h} heads of rotary pairs"
                )));
            }
        }
        let offset = if self.spec.is_norm(&name) {
            self.spec.hf_norm_offset
        } else {
            0.0
        };
        Ok(BaseTensor {
            name,
            dims,
            source_type: format!("{:?}", view.dtype()),
            source: Source::Hf {
                file: fi,
                key: key.to_string(),
                permute_heads,
                offset,
            },
        })
    }

    /// The heads llama.cpp permutes tensor `name`'s rows by, if it permutes them.
    fn permute_heads(&self, name: &str) -> Option<usize> {
        if !self.arch.permutes_qk() {
            None
        } else if name.contains(".attn_q.") {
            Some(self.n_head as usize)
        } else if name.contains(".attn_k.") {
            Some(self.n_head_kv as usize)
        } else {
            None
        }
    }

    /// Every tensor's shape against the hyperparameters, as the runtime checks a GGUF's.
    fn check_shapes(&self, tensors: &[BaseTensor]) -> Result<(), String> {
        let hyper = ShapeRules::new(
            self.arch,
            [
                self.n_layers,
                self.hidden,
                self.n_head,
                self.n_head_kv,
                self.head_dim,
                self.ffn,
                self.vocab,
            ],
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
        hyper.check(
            &named,
            |n| self.spec.gguf_to_hf(n).unwrap_or_else(|| n.to_string()),
            ShapeOrder::Torch,
        )
    }
}

/// The tensors of a folder's safetensors files.
struct HfTensors {
    /// Each file's map, in file order.
    maps: Vec<Mmap>,
    /// (GGUF name, tensor).
    found: Vec<(String, BaseTensor)>,
    /// Tensors skipped, and why.
    notes: Vec<String>,
}

/// A tensor computed from config.json rather than read.
fn computed_tensor(name: String, v: Vec<f32>) -> BaseTensor {
    BaseTensor {
        name,
        dims: vec![v.len() as u64],
        source_type: "F32".into(),
        source: Source::Computed(v),
    }
}

/// config.json's model_type and the architecture it names.
fn architecture(cfg: &Value) -> Result<(&str, Architecture), String> {
    let model_type = cfg.get("model_type").and_then(Value::as_str).unwrap_or("");
    let arch = Architecture::from_hf_model_type(model_type).ok_or_else(|| {
        let known: Vec<&str> = Architecture::ALL
            .iter()
            .flat_map(|a| a.spec().hf_model_types.iter().copied())
            .collect();
        format!(
            "unsupported model_type '{model_type}' (supported: {})",
            known.join(", ")
        )
    })?;
    Ok((model_type, arch))
}

/// The head width ('head_dim', else hidden / heads), once the heads are known to divide.
fn head_dim(cfg: &Value, hidden: u64, n_head: u64, n_head_kv: u64) -> Result<u64, String> {
    if !n_head.is_multiple_of(n_head_kv) {
        return Err(format!(
            "'num_attention_heads' {n_head} is not a multiple of 'num_key_value_heads' {n_head_kv}"
        ));
    }
    if cfg.get("head_dim").is_none_or(Value::is_null) && !hidden.is_multiple_of(n_head) {
        return Err(format!(
            "'hidden_size' {hidden} is not a multiple of 'num_attention_heads' {n_head}, and there is no 'head_dim'"
        ));
    }
    config_count(cfg, "head_dim", Some(hidden / n_head))
}

/// The (global) RoPE base, wherever the transformers version put it.
fn rope_theta(cfg: &Value) -> Result<f64, String> {
    config_positive(
        cfg.get("rope_theta")
            .or_else(|| cfg.pointer("/rope_parameters/rope_theta"))
            // transformers 5 gives Gemma 3 a base per layer type.
            .or_else(|| cfg.pointer("/rope_parameters/full_attention/rope_theta")),
        "rope_theta",
        10000.0,
    )
}

/// The full-attention RoPE scaling section and its type ("default" if none).
fn rope_scaling(cfg: &Value) -> (Option<&Value>, &str) {
    let scaling = cfg
        .get("rope_scaling")
        .filter(|v| !v.is_null())
        .or_else(|| cfg.get("rope_parameters"))
        .map(|r| r.get("full_attention").unwrap_or(r));
    let scaling_type = scaling
        .and_then(|r| r.get("rope_type").or_else(|| r.get("type")))
        .and_then(Value::as_str)
        .unwrap_or("default");
    (scaling, scaling_type)
}

/// Whether lm_head is the token embedding.
fn tied_embeddings(cfg: &Value, arch: Architecture) -> Result<bool, String> {
    match cfg.get("tie_word_embeddings") {
        // transformers' default: Gemma configs tie unless they say otherwise.
        None | Some(Value::Null) => Ok(arch == Architecture::Gemma3),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(format!("'tie_word_embeddings' is {v}, not true or false")),
    }
}

/// The folder's tokenizer added to `metadata`, checked as the runtime does; else notes why not.
fn add_tokenizer(
    dir: &Path,
    vocab: u64,
    metadata: &mut Metadata,
) -> Result<Vec<String>, BaseError> {
    let mut notes = Vec::new();
    match hf_tokenizer::gguf_metadata(dir, vocab) {
        Ok(Some(tok)) => {
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
    Ok(notes)
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

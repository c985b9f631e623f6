//! Hugging Face model folders and safetensors files: their tensors and config.

use std::path::{Component, Path, PathBuf};

use lorafold_runtime::input::{open_regular, read_regular};

use memmap2::Mmap;
use safetensors::SafeTensors;
use serde::Serialize;
use serde_json::Value;

/// An error reading a safetensors file or HF model folder.
pub type SafetensorsError = crate::error::ModelFileError;

/// One tensor of a safetensors file.
#[derive(Debug, Clone, Serialize)]
pub struct SafetensorInfo {
    /// Name.
    pub name: String,
    /// dtype ("F32", "BF16").
    pub dtype: String,
    /// Shape (torch order).
    pub shape: Vec<usize>,
    /// Bytes of data.
    pub n_bytes: u64,
    /// The file (shard) it lives in.
    pub file: String,
}

/// What `lorafold inspect` reports about a safetensors file or HF model folder.
#[derive(Debug, Clone, Serialize)]
pub struct SafetensorsSummary {
    /// The file or folder.
    pub path: String,
    /// The safetensors files read.
    pub files: Vec<String>,
    /// config.json's headline fields, where the folder has one.
    pub config: Option<ModelConfigSummary>,
    /// Every tensor, sorted by name.
    pub tensors: Vec<SafetensorInfo>,
    /// Total elements.
    pub n_elements: u64,
    /// Total bytes of tensor data.
    pub n_bytes: u64,
}

/// The headline fields of a transformers config.json.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ModelConfigSummary {
    /// model_type ("llama", "qwen2").
    pub model_type: Option<String>,
    /// architectures[0].
    pub architecture: Option<String>,
    /// hidden_size.
    pub hidden_size: Option<u64>,
    /// intermediate_size.
    pub intermediate_size: Option<u64>,
    /// num_hidden_layers.
    pub num_hidden_layers: Option<u64>,
    /// num_attention_heads.
    pub num_attention_heads: Option<u64>,
    /// num_key_value_heads.
    pub num_key_value_heads: Option<u64>,
    /// vocab_size.
    pub vocab_size: Option<u64>,
    /// rope_theta, top-level or under rope_parameters (transformers 5).
    pub rope_theta: Option<f64>,
    /// rms_norm_eps.
    pub rms_norm_eps: Option<f64>,
    /// tie_word_embeddings.
    pub tie_word_embeddings: Option<bool>,
    /// torch_dtype or dtype.
    pub dtype: Option<String>,
}

impl ModelConfigSummary {
    /// Read the headline fields from config.json text.
    pub fn parse(text: &str, path: &Path) -> Result<ModelConfigSummary, SafetensorsError> {
        let v: Value = serde_json::from_str(text).map_err(|e| SafetensorsError::Invalid {
            path: path.to_path_buf(),
            problem: format!("not valid JSON: {e}"),
        })?;
        let u = |k: &str| v.get(k).and_then(Value::as_u64);
        Ok(ModelConfigSummary {
            model_type: v
                .get("model_type")
                .and_then(Value::as_str)
                .map(str::to_string),
            architecture: v
                .pointer("/architectures/0")
                .and_then(Value::as_str)
                .map(str::to_string),
            hidden_size: u("hidden_size"),
            intermediate_size: u("intermediate_size"),
            num_hidden_layers: u("num_hidden_layers"),
            num_attention_heads: u("num_attention_heads"),
            num_key_value_heads: u("num_key_value_heads"),
            vocab_size: u("vocab_size"),
            rope_theta: v
                .get("rope_theta")
                .or_else(|| v.pointer("/rope_parameters/rope_theta"))
                .and_then(Value::as_f64),
            rms_norm_eps: v.get("rms_norm_eps").and_then(Value::as_f64),
            tie_word_embeddings: v.get("tie_word_embeddings").and_then(Value::as_bool),
            dtype: v
                .get("torch_dtype")
                .or_else(|| v.get("dtype"))
                .and_then(Value::as_str)
                .map(str::to_string),
        })
    }
}

/// The safetensors files of a model: one file, `model.safetensors`, or the
/// shards listed in `model.safetensors.index.json`, which must be file names
/// inside the folder.
pub fn model_files(path: &Path) -> Result<Vec<PathBuf>, SafetensorsError> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let single = path.join("model.safetensors");
    let index = path.join("model.safetensors.index.json");
    // Present even when not a regular file (a FIFO, a dangling link), so
    // that opening it names the problem.
    let present = |p: &Path| p.symlink_metadata().is_ok();
    if present(&single) {
        return Ok(vec![single]);
    }
    if !present(&index) {
        return Err(SafetensorsError::Invalid {
            path: path.to_path_buf(),
            problem: "no model.safetensors and no model.safetensors.index.json: not a Hugging Face model folder".into(),
        });
    }
    let text = read_regular(&index, "a JSON file").map_err(|source| SafetensorsError::Io {
        path: index.clone(),
        source,
    })?;
    let invalid = |problem: String| SafetensorsError::Invalid {
        path: index.clone(),
        problem,
    };
    let v: Value =
        serde_json::from_str(&text).map_err(|e| invalid(format!("not valid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| invalid("no weight_map object".into()))?;
    let mut shards: Vec<String> = map
        .values()
        .filter_map(Value::as_str)
        .map(str::to_string)
        .collect();
    shards.sort();
    shards.dedup();
    // A hostile index would otherwise have us read any file on the machine
    // into the output: `../x`, `/etc/...`.
    if let Some(s) = shards.iter().find(|s| {
        s.is_empty()
            || !Path::new(s)
                .components()
                .all(|c| matches!(c, Component::Normal(_)))
    }) {
        return Err(invalid(format!(
            "shard '{s}' is not a file name inside the model folder"
        )));
    }
    Ok(shards.into_iter().map(|s| path.join(s)).collect())
}

/// Map one safetensors file, checking that its header parses.
pub fn map_safetensors(path: &Path) -> Result<Mmap, SafetensorsError> {
    let io = |source| SafetensorsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = open_regular(path, "a safetensors file").map_err(io)?;
    // SAFETY: read-only map of a file we do not modify.
    let map = unsafe { Mmap::map(&file) }.map_err(io)?;
    SafeTensors::deserialize(&map).map_err(|e| SafetensorsError::Invalid {
        path: path.to_path_buf(),
        problem: format!("not a valid safetensors file: {e}"),
    })?;
    Ok(map)
}

/// Map one safetensors file and call `f` with its parsed view.
pub fn with_safetensors<T>(
    path: &Path,
    f: impl FnOnce(&SafeTensors<'_>) -> T,
) -> Result<T, SafetensorsError> {
    let map = map_safetensors(path)?;
    let st = SafeTensors::deserialize(&map).expect("checked by map_safetensors");
    Ok(f(&st))
}

impl SafetensorsSummary {
    /// Describe a safetensors file or an HF model folder.
    pub fn of(path: &Path) -> Result<SafetensorsSummary, SafetensorsError> {
        let files = model_files(path)?;
        let mut tensors = Vec::new();
        for f in &files {
            let shown = f
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            with_safetensors(f, |st| {
                for (name, v) in st.iter() {
                    tensors.push(SafetensorInfo {
                        name: name.to_string(),
                        dtype: format!("{:?}", v.dtype()),
                        shape: v.shape().to_vec(),
                        n_bytes: v.data().len() as u64,
                        file: shown.clone(),
                    });
                }
            })?;
        }
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        let config_path = if path.is_dir() {
            Some(path.join("config.json"))
        } else {
            None
        };
        let config = match config_path.filter(|p| p.is_file()) {
            Some(p) => {
                let text =
                    read_regular(&p, "a JSON file").map_err(|source| SafetensorsError::Io {
                        path: p.clone(),
                        source,
                    })?;
                Some(ModelConfigSummary::parse(&text, &p)?)
            }
            None => None,
        };
        Ok(SafetensorsSummary {
            path: path.display().to_string(),
            files: files.iter().map(|f| f.display().to_string()).collect(),
            config,
            n_elements: tensors
                .iter()
                .map(|t| t.shape.iter().product::<usize>() as u64)
                .sum(),
            n_bytes: tensors.iter().map(|t| t.n_bytes).sum(),
            tensors,
        })
    }
}

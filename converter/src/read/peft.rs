//! Hugging Face PEFT LoRA adapters: `adapter_config.json` + `adapter_model.safetensors`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::TensorView;
use safetensors::SafeTensors;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::{check_finite, NonFinite};
use lorafold_runtime::input::{self, open_regular, read_regular};

/// Where PEFT puts the wrapped model in adapter keys.
pub const KEY_PREFIX: &str = "base_model.model.";

/// An error reading a PEFT adapter folder.
#[derive(Debug, thiserror::Error)]
pub enum PeftError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// the file
        path: PathBuf,
        /// the OS error
        #[source]
        source: std::io::Error,
    },
    /// The adapter path is not a folder (a file, a FIFO...).
    #[error("{path}: {kind}, not a PEFT adapter folder (adapter_config.json and adapter_model.safetensors)")]
    NotAFolder {
        /// the path given
        path: PathBuf,
        /// what it is instead
        kind: &'static str,
    },
    /// Only a pickled adapter_model.bin is present.
    #[error("{path}: adapter_model.bin is a Python pickle, which lorafold does not load; convert it with PEFT (`model.save_pretrained(dir, safe_serialization=True)`) to adapter_model.safetensors")]
    PickleAdapter {
        /// the .bin file
        path: PathBuf,
    },
    /// adapter_config.json is malformed or says something we cannot honour.
    #[error("{path}: {problem}")]
    Config {
        /// the config file
        path: PathBuf,
        /// what is wrong
        problem: String,
    },
    /// A tensor in adapter_model.safetensors is missing, malformed or inconsistent.
    #[error("{path}: tensor '{tensor}': {problem}")]
    Tensor {
        /// the safetensors file
        path: PathBuf,
        /// the tensor
        tensor: String,
        /// what is wrong
        problem: String,
    },
    /// A tensor of the adapter holds a NaN or infinite value.
    #[error("{path}: tensor '{tensor}': {found}; adapter tensors must be finite")]
    NonFinite {
        /// the safetensors file
        path: PathBuf,
        /// the tensor
        tensor: String,
        /// the first bad value
        found: NonFinite,
    },
    /// A setting of adapter_config.json contradicts the tensors saved with it.
    #[error("{config}: '{setting}' contradicts {tensors}: tensor '{tensor}': {problem}")]
    Contradiction {
        /// adapter_config.json
        config: PathBuf,
        /// the setting
        setting: &'static str,
        /// adapter_model.safetensors
        tensors: PathBuf,
        /// the tensor
        tensor: String,
        /// how they disagree
        problem: String,
    },
    /// The adapter has neither LoRA tensors nor full tensors to save.
    #[error("{path}: no LoRA tensors (lora_A/lora_B, lora_embedding_A/B) and no modules_to_save tensors; this adapter would change nothing")]
    Empty {
        /// adapter_model.safetensors
        path: PathBuf,
    },
    /// adapter_model.safetensors is not a valid safetensors file.
    #[error("{path}: not a valid safetensors file: {problem}")]
    Safetensors {
        /// the file
        path: PathBuf,
        /// what is wrong
        problem: String,
    },
}

/// The fields of `adapter_config.json` that change the math.
#[derive(Debug, Clone, Serialize)]
pub struct PeftConfig {
    /// `peft_type` ("LORA").
    pub peft_type: String,
    /// Default rank.
    pub r: u64,
    /// Default alpha.
    pub lora_alpha: f64,
    /// Scale alpha/sqrt(r) instead of alpha/r.
    pub use_rslora: bool,
    /// Weight-decomposed LoRA.
    pub use_dora: bool,
    /// The delta is stored transposed (GPT-2 Conv1D layers).
    pub fan_in_fan_out: bool,
    /// Per-module rank overrides: (regex, r), in file order; first match wins.
    pub rank_pattern: Vec<(String, u64)>,
    /// Per-module alpha overrides: (regex, alpha), in file order; first match wins.
    pub alpha_pattern: Vec<(String, f64)>,
    /// The modules LoRA was applied to (absent: not checked).
    pub target_modules: Option<TargetModules>,
    /// `layers_to_transform`: the only layers LoRA was applied to (absent: all).
    pub layers_to_transform: Option<Vec<u64>>,
    /// `layers_pattern`: regexes naming the layer list in module paths ("layers").
    pub layers_pattern: Vec<String>,
    /// Modules saved as full tensors that replace the base's.
    pub modules_to_save: Vec<String>,
    /// `lora_bias`: lora_B has a bias.
    pub lora_bias: bool,
    /// `init_lora_weights` as written ("true", "pissa", "olora", "loftq", ...).
    pub init_lora_weights: String,
    /// `use_qalora`.
    pub use_qalora: bool,
    /// `base_model_name_or_path`, informational.
    pub base_model: Option<String>,
}

impl PeftConfig {
    /// Parse the text of an `adapter_config.json`; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<PeftConfig, PeftError> {
        let bad = |problem: String| PeftError::Config {
            path: path.to_path_buf(),
            problem,
        };
        let v: Value =
            serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| bad("expected a JSON object".into()))?;
        PeftConfig::from_fields(obj).map_err(bad)
    }

    /// The config from its JSON object; the first problem found is the error.
    fn from_fields(obj: &Map<String, Value>) -> Result<PeftConfig, String> {
        let peft_type = obj
            .get("peft_type")
            .and_then(Value::as_str)
            .unwrap_or("LORA")
            .to_string();
        if peft_type != "LORA" {
            return Err(format!(
                "peft_type is {peft_type}; only LORA adapters are supported"
            ));
        }
        let r = obj
            .get("r")
            .and_then(Value::as_u64)
            .filter(|&r| r > 0)
            .ok_or_else(|| "missing or invalid 'r'".to_string())?;
        let lora_alpha = match obj.get("lora_alpha") {
            None | Some(Value::Null) => 8.0, // PEFT's default
            Some(a) => alpha_value(a).map_err(|why| format!("'lora_alpha' {why}"))?,
        };
        let (rank_pattern, alpha_pattern) = rank_and_alpha_patterns(obj)?;
        let target_modules = target_modules(obj)?;
        let layers_to_transform = layers_to_transform(obj)?;
        if layers_to_transform.is_some() && matches!(target_modules, Some(TargetModules::Regex(_)))
        {
            // PEFT's LoraConfig refuses this combination too.
            return Err(
                "'layers_to_transform' cannot be used when 'target_modules' is a regex".into(),
            );
        }
        let layers_pattern = strings(obj, "layers_pattern");
        for p in &layers_pattern {
            layer_regex(Some(p)).map_err(|e| {
                format!(
                    "'layers_pattern' '{p}' is not a regex we can use: {}",
                    one_line(&e)
                )
            })?;
        }
        let init_lora_weights = match obj.get("init_lora_weights") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Bool(b)) => b.to_string(),
            _ => "true".to_string(),
        };
        let flag = |k: &str| obj.get(k).and_then(Value::as_bool).unwrap_or(false);
        Ok(PeftConfig {
            peft_type,
            r,
            lora_alpha,
            use_rslora: flag("use_rslora"),
            use_dora: flag("use_dora"),
            fan_in_fan_out: flag("fan_in_fan_out"),
            rank_pattern,
            alpha_pattern,
            target_modules,
            layers_to_transform,
            layers_pattern,
            modules_to_save: strings(obj, "modules_to_save"),
            lora_bias: flag("lora_bias"),
            init_lora_weights,
            use_qalora: flag("use_qalora"),
            base_model: obj
                .get("base_model_name_or_path")
                .and_then(Value::as_str)
                .map(str::to_string),
        })
    }

    /// The alpha for `module` (a path such as "model.layers.1.self_attn.v_proj").
    pub fn alpha_for(&self, module: &str) -> f64 {
        first_match(&self.alpha_pattern, module).unwrap_or(self.lora_alpha)
    }

    /// The scale s for `module` at its actual rank `r`: alpha/r, or alpha/sqrt(r) with rsLoRA.
    pub fn scale_for(&self, module: &str, r: u64) -> f64 {
        let alpha = self.alpha_for(module);
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }

    /// The configured rank for `module` (rank_pattern, else r).
    pub fn rank_for(&self, module: &str) -> u64 {
        first_match(&self.rank_pattern, module).unwrap_or(self.r)
    }

    /// Initialisations that assume a modified base (PiSSA, OLoRA, LoftQ, QA-LoRA), if any.
    pub fn modified_base_init(&self) -> Option<String> {
        let init = self.init_lora_weights.to_ascii_lowercase();
        if ["pissa", "olora", "loftq", "corda", "eva"]
            .iter()
            .any(|p| init.starts_with(p))
        {
            Some(format!("init_lora_weights = {}", self.init_lora_weights))
        } else if self.use_qalora {
            Some("use_qalora = true".into())
        } else {
            None
        }
    }
}

/// Field `k` as a list of strings: one string, or the strings of a list.
fn strings(obj: &Map<String, Value>, k: &str) -> Vec<String> {
    match obj.get(k) {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    }
}

/// The (regex, value) entries of pattern field `k`, in file order.
fn pattern<'a>(obj: &'a Map<String, Value>, k: &str) -> Result<Vec<(String, &'a Value)>, String> {
    match obj.get(k) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Object(m)) => Ok(m.iter().map(|(p, v)| (p.clone(), v)).collect()),
        Some(other) => Err(format!("'{k}' should be an object, got {other}")),
    }
}

/// (regex, value) pairs, in file order.
type Patterns<T> = Vec<(String, T)>;

/// `rank_pattern` and `alpha_pattern`, their values and regexes checked.
fn rank_and_alpha_patterns(
    obj: &Map<String, Value>,
) -> Result<(Patterns<u64>, Patterns<f64>), String> {
    let rank_pattern: Vec<(String, u64)> = pattern(obj, "rank_pattern")?
        .into_iter()
        .map(|(p, r)| match r.as_u64() {
            Some(r) if r >= 1 => Ok((p, r)),
            _ => Err(format!(
                "rank_pattern entry '{p}' is {r}, not a positive integer"
            )),
        })
        .collect::<Result<_, _>>()?;
    let alpha_pattern: Vec<(String, f64)> = pattern(obj, "alpha_pattern")?
        .into_iter()
        .map(|(p, a)| {
            alpha_value(a)
                .map(|a| (p.clone(), a))
                .map_err(|why| format!("alpha_pattern entry '{p}' {why}"))
        })
        .collect::<Result<_, _>>()?;
    for p in rank_pattern
        .iter()
        .map(|(p, _)| p)
        .chain(alpha_pattern.iter().map(|(p, _)| p))
    {
        module_regex(p)
            .map_err(|e| format!("pattern '{p}' is not a regex we can use: {}", one_line(&e)))?;
    }
    Ok((rank_pattern, alpha_pattern))
}

/// `target_modules`: a list of names, or a regex checked to compile.
fn target_modules(obj: &Map<String, Value>) -> Result<Option<TargetModules>, String> {
    Ok(match obj.get("target_modules") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => {
            regex::Regex::new(&format!("^(?:{s})$")).map_err(|e| {
                format!(
                    "'target_modules' '{s}' is not a regex we can use: {}",
                    one_line(&e)
                )
            })?;
            Some(TargetModules::Regex(s.clone()))
        }
        Some(Value::Array(a)) => Some(TargetModules::Names(
            a.iter()
                .map(|x| {
                    x.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| format!("'target_modules' entry {x} is not a string"))
                })
                .collect::<Result<_, _>>()?,
        )),
        Some(other) => {
            return Err(format!(
                "'target_modules' should be a list of names or a regex, got {other}"
            ))
        }
    })
}

/// `layers_to_transform`: one layer index or a list (an empty list is all).
fn layers_to_transform(obj: &Map<String, Value>) -> Result<Option<Vec<u64>>, String> {
    Ok(match obj.get("layers_to_transform") {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) if a.is_empty() => None,
        Some(Value::Array(a)) => Some(
            a.iter()
                .map(|x| {
                    x.as_u64().ok_or_else(|| {
                        format!("'layers_to_transform' entry {x} is not a layer index")
                    })
                })
                .collect::<Result<_, _>>()?,
        ),
        Some(x) => Some(vec![x.as_u64().ok_or_else(|| {
            format!("'layers_to_transform' is {x}, not a layer index or a list of them")
        })?]),
    })
}

/// The largest |alpha| accepted: real adapters use 1..512, and the adapter
/// GGUF stores alpha as f32, so a value near f32's range would become inf.
pub const MAX_ALPHA: f64 = 1e6;

/// A `lora_alpha` or `alpha_pattern` value, checked to be a finite number of
/// sane size; the error completes "'lora_alpha' ...".
fn alpha_value(v: &Value) -> Result<f64, String> {
    match v.as_f64() {
        Some(a) if a.is_finite() && a.abs() <= MAX_ALPHA => Ok(a),
        Some(_) => Err(format!(
            "is {v}; alpha must be finite and at most {MAX_ALPHA:e} in size"
        )),
        None => Err(format!("is not a number: {v}")),
    }
}

/// A regex error on one line (the regex crate draws a caret under the pattern).
fn one_line(e: &regex::Error) -> String {
    let text = e.to_string();
    text.lines()
        .last()
        .unwrap_or_default()
        .trim_start_matches("error: ")
        .to_string()
}

/// Which modules `target_modules` names, as PEFT's `check_target_module_exists` reads it.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Module names: a module matches if its path is the name or ends with ".name".
    Names(Vec<String>),
    /// A regex the whole module path must match ("all-linear": every Linear but lm_head).
    Regex(String),
}

impl TargetModules {
    /// Whether PEFT would wrap `module` (a path like "model.layers.0.self_attn.q_proj"),
    /// and if so whether the layer filter applies (suffix matches only, as in PEFT).
    fn matches(&self, module: &str, kind: ModuleKind) -> Option<bool> {
        match self {
            TargetModules::Regex(r) if r == "all-linear" => {
                (kind == ModuleKind::Linear && module != "lm_head").then_some(false)
            }
            TargetModules::Regex(r) => regex::Regex::new(&format!("^(?:{r})$"))
                .is_ok_and(|re| re.is_match(module))
                .then_some(false),
            TargetModules::Names(names) => {
                if names.iter().any(|n| n == module) {
                    Some(false)
                } else {
                    names
                        .iter()
                        .any(|n| module.ends_with(&format!(".{n}")))
                        .then_some(true)
                }
            }
        }
    }
}

// PEFT's layer index: re.match(r".*\.[^.]*\.(\d+)\.", key), or with a
// layers_pattern p, re.match(rf".*\.{p}\.(\d+)\.", key).
fn layer_regex(pattern: Option<&str>) -> Result<regex::Regex, regex::Error> {
    regex::Regex::new(&format!(
        r"^.*\.(?:{})\.(\d+)\.",
        pattern.unwrap_or("[^.]*")
    ))
}

impl PeftConfig {
    /// The layer index PEFT reads from `module` for `layers_to_transform`.
    fn layer_of(&self, module: &str) -> Option<u64> {
        let patterns: Vec<Option<&str>> = if self.layers_pattern.is_empty() {
            vec![None]
        } else {
            self.layers_pattern
                .iter()
                .map(|p| Some(p.as_str()))
                .collect()
        };
        patterns.into_iter().find_map(|p| {
            layer_regex(p)
                .ok()?
                .captures(module)?
                .get(1)?
                .as_str()
                .parse()
                .ok()
        })
    }
}

// PEFT's get_pattern_key: re.match(rf"(.*\.)?({k})$", name).
fn module_regex(pattern: &str) -> Result<regex::Regex, regex::Error> {
    regex::Regex::new(&format!(r"^(?:.*\.)?(?:{pattern})$"))
}

fn first_match<T: Copy>(patterns: &[(String, T)], module: &str) -> Option<T> {
    patterns
        .iter()
        .find(|(p, _)| module_regex(p).is_ok_and(|re| re.is_match(module)))
        .map(|(_, v)| *v)
}

/// Whether a LoRA module wraps a Linear or an Embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModuleKind {
    /// lora_A.weight [r, in], lora_B.weight [out, r]
    Linear,
    /// lora_embedding_A [r, vocab], lora_embedding_B [dim, r]
    Embedding,
}

/// One adapted module with its resolved rank and scale.
#[derive(Debug, Clone, Serialize)]
pub struct LoraModule {
    /// Module path without the PEFT prefix ("model.layers.0.self_attn.q_proj").
    pub path: String,
    /// Linear or Embedding.
    pub kind: ModuleKind,
    /// Actual rank (rows of A).
    pub rank: u64,
    /// Alpha after alpha_pattern.
    pub alpha: f64,
    /// The scale s applied to B A.
    pub scale: f64,
    /// Input features (columns of A; vocabulary for embeddings).
    pub in_features: u64,
    /// Output features (rows of B; width for embeddings).
    pub out_features: u64,
    /// Has a DoRA magnitude vector.
    pub dora: bool,
    /// Has lora_B.bias.
    pub bias: bool,
    /// safetensors dtype of A ("F32", "BF16", "F16").
    pub dtype: String,
    /// Safetensors key of A.
    pub key_a: String,
    /// Safetensors key of B.
    pub key_b: String,
}

/// A full tensor that the adapter saves to replace the base's (modules_to_save).
#[derive(Debug, Clone, Serialize)]
pub struct SavedTensor {
    /// Key without the PEFT prefix ("lm_head.weight").
    pub name: String,
    /// Safetensors key.
    pub key: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// dtype.
    pub dtype: String,
}

/// A PEFT LoRA adapter folder, its tensors mapped.
pub struct PeftAdapter {
    /// The folder.
    pub dir: PathBuf,
    /// The safetensors file.
    pub tensors_path: PathBuf,
    /// The parsed config.
    pub config: PeftConfig,
    /// Adapted modules, sorted by path.
    pub modules: Vec<LoraModule>,
    /// Full tensors that replace the base's.
    pub saved: Vec<SavedTensor>,
    map: Mmap,
}

impl std::fmt::Debug for PeftAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeftAdapter")
            .field("dir", &self.dir)
            .field("modules", &self.modules.len())
            .finish()
    }
}

const SUFFIXES: &[(&str, ModuleKind, &str)] = &[
    (".lora_A.weight", ModuleKind::Linear, "A"),
    (".lora_B.weight", ModuleKind::Linear, "B"),
    (".lora_B.bias", ModuleKind::Linear, "bias"),
    (".lora_embedding_A", ModuleKind::Embedding, "A"),
    (".lora_embedding_B", ModuleKind::Embedding, "B"),
    (".lora_magnitude_vector", ModuleKind::Linear, "m"),
    (".lora_magnitude_vector.weight", ModuleKind::Linear, "m"),
];

impl PeftAdapter {
    /// Read the config and map the tensors of the adapter in `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<PeftAdapter, PeftError> {
        let dir = dir.as_ref().to_path_buf();
        if let Some(kind) = std::fs::metadata(&dir)
            .ok()
            .filter(|m| !m.is_dir())
            .map(|m| input::kind(&m.file_type()))
        {
            return Err(PeftError::NotAFolder { path: dir, kind });
        }
        let config_path = dir.join("adapter_config.json");
        let tensors_path = dir.join("adapter_model.safetensors");
        if !tensors_path.exists() && dir.join("adapter_model.bin").exists() {
            return Err(PeftError::PickleAdapter {
                path: dir.join("adapter_model.bin"),
            });
        }
        let text = read_regular(&config_path, "a JSON file").map_err(|source| PeftError::Io {
            path: config_path.clone(),
            source,
        })?;
        let config = PeftConfig::parse(&text, &config_path)?;
        let io = |source| PeftError::Io {
            path: tensors_path.clone(),
            source,
        };
        let file = open_regular(&tensors_path, "a safetensors file").map_err(io)?;
        // SAFETY: read-only map; the adapter file is not modified while we hold it.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let (modules, saved) = {
            let st = SafeTensors::deserialize(&map).map_err(|e| PeftError::Safetensors {
                path: tensors_path.clone(),
                problem: e.to_string(),
            })?;
            collect_modules(&st, &config, &tensors_path)?
        };
        check_config_against_tensors(&config, &config_path, &modules, &saved, &tensors_path)?;
        Ok(PeftAdapter {
            dir,
            tensors_path,
            config,
            modules,
            saved,
            map,
        })
    }

    /// The adapter's tensors, zero-copy over the map.
    pub fn tensors(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.map).expect("validated at open")
    }

    /// The values of tensor `key`, widened to f32, with its shape.
    pub fn values(&self, key: &str) -> Result<(Vec<f32>, Vec<usize>), PeftError> {
        let bad = |problem: String| PeftError::Tensor {
            path: self.tensors_path.clone(),
            tensor: key.into(),
            problem,
        };
        let st = self.tensors();
        let v = st.tensor(key).map_err(|e| bad(e.to_string()))?;
        let values = crate::read::base::widen(v.dtype(), v.data())
            .ok_or_else(|| bad(format!("dtype {:?} is not f32, f16 or bf16", v.dtype())))?;
        check_finite(&values).map_err(|found| PeftError::NonFinite {
            path: self.tensors_path.clone(),
            tensor: key.into(),
            found,
        })?;
        Ok((values, v.shape().to_vec()))
    }

    /// Total adapter parameters (A, B, bias, magnitude; not saved full tensors).
    pub fn lora_parameters(&self) -> u64 {
        let st = self.tensors();
        st.iter()
            .filter(|(k, _)| SUFFIXES.iter().any(|(s, _, _)| k.ends_with(s)))
            .map(|(_, v)| v.shape().iter().product::<usize>() as u64)
            .sum()
    }
}

/// The adapter's LoRA modules, each checked, and the full tensors it saves.
fn collect_modules(
    st: &SafeTensors<'_>,
    config: &PeftConfig,
    path: &Path,
) -> Result<(Vec<LoraModule>, Vec<SavedTensor>), PeftError> {
    let (module_paths, saved) = sort_keys(st, path)?;
    let modules = module_paths
        .into_iter()
        .map(|m| lora_module(st, config, path, m))
        .collect::<Result<_, _>>()?;
    Ok((modules, saved))
}

/// A problem with tensor `tensor` of the adapter file `path`.
fn tensor_error(path: &Path, tensor: &str, problem: String) -> PeftError {
    PeftError::Tensor {
        path: path.to_path_buf(),
        tensor: tensor.into(),
        problem,
    }
}

/// The adapter's keys split into LoRA module paths and full tensors to save.
fn sort_keys(
    st: &SafeTensors<'_>,
    path: &Path,
) -> Result<(BTreeSet<String>, Vec<SavedTensor>), PeftError> {
    let mut module_paths = BTreeSet::new();
    let mut saved = Vec::new();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    for key in &names {
        let Some(rest) = key.strip_prefix(KEY_PREFIX) else {
            return Err(tensor_error(
                path,
                key,
                format!("key does not start with '{KEY_PREFIX}', so this is not a PEFT adapter"),
            ));
        };
        match SUFFIXES.iter().find(|(s, _, _)| rest.ends_with(s)) {
            Some((s, _, _)) => {
                module_paths.insert(rest[..rest.len() - s.len()].to_string());
            }
            None => {
                let v = st.tensor(key).expect("listed name");
                saved.push(SavedTensor {
                    name: rest.to_string(),
                    key: key.clone(),
                    shape: v.shape().to_vec(),
                    dtype: format!("{:?}", v.dtype()),
                });
            }
        }
    }
    Ok((module_paths, saved))
}

/// Module `m`, checked: A and B of one rank, the configured one, a magnitude as wide as B.
fn lora_module(
    st: &SafeTensors<'_>,
    config: &PeftConfig,
    path: &Path,
    m: String,
) -> Result<LoraModule, PeftError> {
    let bad = |tensor: &str, problem: String| tensor_error(path, tensor, problem);
    let get = |suffix: &str| st.tensor(&format!("{KEY_PREFIX}{m}{suffix}")).ok();
    let LoraPair {
        kind,
        a,
        b,
        key_a,
        key_b,
    } = lora_pair(st, path, &m)?;
    let (rank, in_features) = (a.shape()[0] as u64, a.shape()[1] as u64);
    let (out_features, b_rank) = (b.shape()[0] as u64, b.shape()[1] as u64);
    if b_rank != rank {
        return Err(bad(
            &key_b,
            format!(
                "has rank {b_rank} but lora_A {:?} has rank {rank}",
                a.shape()
            ),
        ));
    }
    let configured = config.rank_for(&m);
    if configured != rank {
        return Err(bad(
            &key_a,
            format!("has rank {rank} but adapter_config.json gives this module r = {configured}"),
        ));
    }
    let dora = get(".lora_magnitude_vector").or_else(|| get(".lora_magnitude_vector.weight"));
    if let Some(mv) = &dora {
        if mv.shape().iter().product::<usize>() as u64 != out_features {
            return Err(bad(
                &format!("{KEY_PREFIX}{m}.lora_magnitude_vector"),
                format!(
                    "magnitude has shape {:?}, expected [{out_features}]",
                    mv.shape()
                ),
            ));
        }
    }
    Ok(LoraModule {
        kind,
        rank,
        alpha: config.alpha_for(&m),
        scale: config.scale_for(&m, rank),
        in_features,
        out_features,
        dora: dora.is_some(),
        bias: get(".lora_B.bias").is_some(),
        dtype: format!("{:?}", a.dtype()),
        key_a,
        key_b,
        path: m,
    })
}

/// A module's A and B tensors with their keys.
struct LoraPair<'data> {
    kind: ModuleKind,
    a: TensorView<'data>,
    b: TensorView<'data>,
    key_a: String,
    key_b: String,
}

/// Module `m`'s A and B (Linear, else Embedding), each a matrix of a dtype we widen.
fn lora_pair<'data>(
    st: &SafeTensors<'data>,
    path: &Path,
    m: &str,
) -> Result<LoraPair<'data>, PeftError> {
    let bad = |tensor: &str, problem: String| tensor_error(path, tensor, problem);
    let get = |suffix: &str| st.tensor(&format!("{KEY_PREFIX}{m}{suffix}")).ok();
    let (kind, a, b, key_a, key_b) =
        if let (Some(a), Some(b)) = (get(".lora_A.weight"), get(".lora_B.weight")) {
            (ModuleKind::Linear, a, b, ".lora_A.weight", ".lora_B.weight")
        } else if let (Some(a), Some(b)) = (get(".lora_embedding_A"), get(".lora_embedding_B")) {
            (
                ModuleKind::Embedding,
                a,
                b,
                ".lora_embedding_A",
                ".lora_embedding_B",
            )
        } else {
            let which = if get(".lora_A.weight").is_some() || get(".lora_embedding_A").is_some() {
                "B"
            } else {
                "A"
            };
            return Err(bad(
                &format!("{KEY_PREFIX}{m}"),
                format!("module has no lora_{which} tensor"),
            ));
        };
    let key_a = format!("{KEY_PREFIX}{m}{key_a}");
    let key_b = format!("{KEY_PREFIX}{m}{key_b}");
    for (k, v) in [(&key_a, &a), (&key_b, &b)] {
        if v.shape().len() != 2 {
            return Err(bad(
                k,
                format!("expected 2 dimensions, got shape {:?}", v.shape()),
            ));
        }
        if !matches!(
            v.dtype(),
            safetensors::Dtype::F32 | safetensors::Dtype::F16 | safetensors::Dtype::BF16
        ) {
            return Err(bad(
                k,
                format!(
                    "dtype {:?} is not supported (f32, f16, bf16 are)",
                    v.dtype()
                ),
            ));
        }
    }
    Ok(LoraPair {
        kind,
        a,
        b,
        key_a,
        key_b,
    })
}

/// adapter_config.json and the tensors agree: PEFT would have created every
/// module present from this config (target_modules, layers_to_transform), and
/// DoRA and lora_bias are on exactly where their tensors are.
fn check_config_against_tensors(
    config: &PeftConfig,
    config_path: &Path,
    modules: &[LoraModule],
    saved: &[SavedTensor],
    tensors_path: &Path,
) -> Result<(), PeftError> {
    if modules.is_empty() && saved.is_empty() {
        return Err(PeftError::Empty {
            path: tensors_path.to_path_buf(),
        });
    }
    let contradiction =
        |setting: &'static str, m: &LoraModule, problem: String| PeftError::Contradiction {
            config: config_path.to_path_buf(),
            setting,
            tensors: tensors_path.to_path_buf(),
            tensor: m.key_a.clone(),
            problem,
        };
    for m in modules {
        if let Some(targets) = &config.target_modules {
            let layer_filtered = targets.matches(&m.path, m.kind).ok_or_else(|| {
                contradiction(
                    "target_modules",
                    m,
                    format!(
                        "module '{}' is not among the target modules, so PEFT would not have created it",
                        m.path
                    ),
                )
            })?;
            if let (true, Some(layers)) = (layer_filtered, &config.layers_to_transform) {
                match config.layer_of(&m.path) {
                    Some(l) if layers.contains(&l) => {}
                    found => {
                        return Err(contradiction(
                            "layers_to_transform",
                            m,
                            format!(
                                "module '{}' is in {}, but layers_to_transform is {layers:?}, so PEFT would not have created it",
                                m.path,
                                found.map_or("no numbered layer".to_string(), |l| format!("layer {l}"))
                            ),
                        ));
                    }
                }
            }
        }
        if m.dora != config.use_dora {
            return Err(contradiction(
                "use_dora",
                m,
                if m.dora {
                    format!(
                        "module '{}' has a lora_magnitude_vector (DoRA), but use_dora is false",
                        m.path
                    )
                } else {
                    format!(
                        "use_dora is true, but module '{}' has no lora_magnitude_vector",
                        m.path
                    )
                },
            ));
        }
        // PEFT gives lora_B a bias only on Linear layers.
        let bias_expected = config.lora_bias && m.kind == ModuleKind::Linear;
        if m.bias != bias_expected {
            return Err(contradiction(
                "lora_bias",
                m,
                if m.bias {
                    format!(
                        "module '{}' has a lora_B.bias, but lora_bias is {}",
                        m.path, config.lora_bias
                    )
                } else {
                    format!(
                        "lora_bias is true, but module '{}' has no lora_B.bias",
                        m.path
                    )
                },
            ));
        }
    }
    Ok(())
}

/// What `lorafold inspect` reports about a PEFT adapter folder.
#[derive(Debug, Clone, Serialize)]
pub struct PeftSummary {
    /// The folder.
    pub path: String,
    /// The parsed config.
    pub config: PeftConfig,
    /// Base model named in the config.
    pub base_model: Option<String>,
    /// Distinct target module names ("q_proj", "v_proj").
    pub targets: Vec<String>,
    /// dtypes of the adapter tensors.
    pub dtypes: Vec<String>,
    /// Adapter parameters.
    pub parameters: u64,
    /// Every adapted module.
    pub modules: Vec<LoraModule>,
    /// Full tensors saved to replace the base's.
    pub saved: Vec<SavedTensor>,
}

impl PeftSummary {
    /// Describe `adapter`.
    pub fn of(adapter: &PeftAdapter) -> PeftSummary {
        let targets: BTreeSet<String> = adapter
            .modules
            .iter()
            .map(|m| m.path.rsplit('.').next().unwrap_or(&m.path).to_string())
            .collect();
        let dtypes: BTreeSet<String> = adapter.modules.iter().map(|m| m.dtype.clone()).collect();
        PeftSummary {
            path: adapter.dir.display().to_string(),
            base_model: adapter.config.base_model.clone(),
            config: adapter.config.clone(),
            targets: targets.into_iter().collect(),
            dtypes: dtypes.into_iter().collect(),
            parameters: adapter.lora_parameters(),
            modules: adapter.modules.clone(),
            saved: adapter.saved.clone(),
        }
    }
}

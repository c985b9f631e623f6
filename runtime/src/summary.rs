//! What `lorafold inspect` reports about a GGUF model or adapter.

use crate::gguf::names;
use serde::Serialize;

use crate::gguf::{GgufFile, Hyperparameters, MetadataValue};

/// A GGUF file described for people and pipelines.
#[derive(Debug, Clone, Serialize)]
pub struct GgufSummary {
    /// The file.
    pub path: String,
    /// GGUF version.
    pub version: u32,
    /// File size in bytes.
    pub file_size: u64,
    /// `general.type`: "model" (the default) or "adapter".
    pub kind: String,
    /// `general.architecture`.
    pub architecture: Option<String>,
    /// `general.name`.
    pub name: Option<String>,
    /// The architecture's hyperparameters; the vocabulary falls back to the tokenizer's.
    pub hyperparameters: Hyperparameters,
    /// The tokenizer, if the file carries one.
    pub tokenizer: Option<TokenizerSummary>,
    /// LoRA adapter facts, for `general.type = adapter`.
    pub adapter: Option<AdapterSummary>,
    /// Every tensor in file order.
    pub tensors: Vec<TensorSummary>,
    /// Totals over all tensors.
    pub totals: TensorTotals,
    /// Tensor count and bytes per ggml type, in order of first appearance.
    pub by_type: Vec<TypeTotals>,
    /// Every metadata key with a short rendering of its value (arrays as type and length).
    pub metadata: Vec<(String, String)>,
}

/// The tokenizer carried as `tokenizer.ggml.*` metadata.
#[derive(Debug, Clone, Serialize)]
pub struct TokenizerSummary {
    /// `tokenizer.ggml.model` ("gpt2", "llama").
    pub model: Option<String>,
    /// `tokenizer.ggml.pre`, the pre-tokenizer ("smollm", "llama-bpe").
    pub pre: Option<String>,
    /// Number of tokens.
    pub vocab_size: usize,
    /// Number of BPE merges.
    pub merges: usize,
    /// Special token ids: ("bos", 1), ("eos", 2), ...
    pub special_ids: Vec<(String, u64)>,
    /// Whether a chat template is present.
    pub chat_template: bool,
}

/// Facts about a GGUF LoRA adapter.
#[derive(Debug, Clone, Serialize)]
pub struct AdapterSummary {
    /// `adapter.type` ("lora").
    pub adapter_type: Option<String>,
    /// `adapter.lora.alpha`.
    pub alpha: Option<f64>,
    /// Smallest and largest rank over the adapted tensors.
    pub rank: Option<(u64, u64)>,
    /// Base tensor names that the adapter changes.
    pub targets: Vec<String>,
    /// The base it belongs to: `general.base_model.0.name` (llama.cpp's
    /// converter) or the base file's sha256 that lorafold recorded.
    pub base: Option<String>,
}

/// One tensor.
#[derive(Debug, Clone, Serialize)]
pub struct TensorSummary {
    /// Name.
    pub name: String,
    /// ggml type name.
    pub ggml_type: String,
    /// Dimensions in ggml order (ne).
    pub dims: Vec<u64>,
    /// Elements.
    pub n_elements: u64,
    /// Bytes of data.
    pub n_bytes: u64,
}

/// Totals over a set of tensors.
#[derive(Debug, Clone, Serialize)]
pub struct TensorTotals {
    /// Tensors.
    pub n_tensors: usize,
    /// Elements (parameters).
    pub n_elements: u64,
    /// Bytes of tensor data.
    pub n_bytes: u64,
    /// 8 * bytes / elements.
    pub bits_per_weight: f64,
}

/// Totals for one ggml type.
#[derive(Debug, Clone, Serialize)]
pub struct TypeTotals {
    /// ggml type name.
    pub ggml_type: String,
    /// Tensors of this type.
    pub n_tensors: usize,
    /// Elements of this type.
    pub n_elements: u64,
    /// Bytes of this type.
    pub n_bytes: u64,
}

const SPECIAL_IDS: &[&str] = &[
    "bos",
    "eos",
    "unknown",
    "padding",
    "separator",
    "eot",
    "eom",
    "mask",
];

impl GgufSummary {
    /// Describe `file`.
    pub fn of(file: &GgufFile) -> GgufSummary {
        let arch = file.get_str(names::ARCHITECTURE).map(|s| s.into_owned());
        let tokenizer = file
            .get(names::TOKENIZER_TOKENS)
            .map(|tokens| TokenizerSummary {
                model: file.get_str(names::TOKENIZER_MODEL).map(|s| s.into_owned()),
                pre: file.get_str(names::TOKENIZER_PRE).map(|s| s.into_owned()),
                vocab_size: tokens.as_array().map_or(0, |t| t.len()),
                merges: file
                    .get(names::TOKENIZER_MERGES)
                    .and_then(|m| m.as_array().map(|m| m.len()))
                    .unwrap_or(0),
                special_ids: SPECIAL_IDS
                    .iter()
                    .filter_map(|s| {
                        file.get_u64(&names::special_token_id(s))
                            .map(|id| (s.to_string(), id))
                    })
                    .collect(),
                chat_template: file.get(names::CHAT_TEMPLATE).is_some(),
            });
        let mut hyperparameters = Hyperparameters::read(file, arch.as_deref().unwrap_or("_"));
        hyperparameters.vocab_size = hyperparameters
            .vocab_size
            .or(tokenizer.as_ref().map(|t| t.vocab_size as u64));
        let kind = file
            .get_str(names::TYPE)
            .map_or("model".to_string(), |s| s.into_owned());
        let adapter = (kind == names::TYPE_ADAPTER).then(|| {
            let lora_a: Vec<_> = file
                .tensors()
                .iter()
                .filter_map(|t| match names::lora_target(&t.name) {
                    Some((target, true)) => Some((t, target)),
                    _ => None,
                })
                .collect();
            let ranks = lora_a.iter().filter_map(|(t, _)| t.dims().get(1).copied());
            AdapterSummary {
                adapter_type: file.get_str(names::ADAPTER_TYPE).map(|s| s.into_owned()),
                alpha: file.get_f64(names::ADAPTER_LORA_ALPHA),
                rank: ranks.clone().min().zip(ranks.max()),
                targets: lora_a
                    .iter()
                    .map(|(_, target)| target.to_string())
                    .collect(),
                base: file
                    .get_str("general.base_model.0.name")
                    .map(|s| s.into_owned())
                    .or_else(|| {
                        file.get_strings("lorafold.base.sha256")
                            .and_then(|v| v.first().map(|s| format!("sha256 {s}")))
                    }),
            }
        });
        let tensors: Vec<TensorSummary> = file
            .tensors()
            .iter()
            .map(|t| TensorSummary {
                name: t.name.clone(),
                ggml_type: t.ggml_type.name().to_string(),
                dims: t.dims().to_vec(),
                n_elements: t.n_elements(),
                n_bytes: t.n_bytes,
            })
            .collect();
        let mut by_type: Vec<TypeTotals> = Vec::new();
        for t in &tensors {
            let i = match by_type.iter().position(|b| b.ggml_type == t.ggml_type) {
                Some(i) => i,
                None => {
                    by_type.push(TypeTotals {
                        ggml_type: t.ggml_type.clone(),
                        n_tensors: 0,
                        n_elements: 0,
                        n_bytes: 0,
                    });
                    by_type.len() - 1
                }
            };
            by_type[i].n_tensors += 1;
            by_type[i].n_elements += t.n_elements;
            by_type[i].n_bytes += t.n_bytes;
        }
        let n_elements = tensors.iter().map(|t| t.n_elements).sum();
        let n_bytes = tensors.iter().map(|t| t.n_bytes).sum();
        GgufSummary {
            path: file.path().display().to_string(),
            version: file.version(),
            file_size: file.file_size(),
            kind,
            architecture: arch.clone(),
            name: file.get_str(names::NAME).map(|s| s.into_owned()),
            hyperparameters,
            tokenizer,
            adapter,
            totals: TensorTotals {
                n_tensors: tensors.len(),
                n_elements,
                n_bytes,
                bits_per_weight: bits_per_weight(n_bytes, n_elements),
            },
            tensors,
            by_type,
            metadata: file
                .metadata()
                .map(|(k, v)| (k.to_string(), short(&v)))
                .collect(),
        }
    }
}

/// 8 * bytes / elements, or 0 for no elements.
pub fn bits_per_weight(n_bytes: u64, n_elements: u64) -> f64 {
    if n_elements == 0 {
        0.0
    } else {
        8.0 * n_bytes as f64 / n_elements as f64
    }
}

fn short(v: &MetadataValue<'_>) -> String {
    match v {
        MetadataValue::String(s) if s.chars().count() > 60 => {
            format!(
                "{:?}... ({} bytes)",
                s.chars().take(60).collect::<String>(),
                s.len()
            )
        }
        other => other.to_string(),
    }
}

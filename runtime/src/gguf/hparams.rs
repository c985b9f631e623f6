//! llama.cpp's `<arch>.*` hyperparameters: their keys, the one reader the
//! model loader, the converter and inspect share, and the tensor shapes that
//! follow from them, checked the same way for a GGUF model and an HF folder.

use std::collections::HashSet;

use serde::Serialize;

use super::{names, GgufFile};
use crate::arch::{ArchSpec, Architecture, Width};

/// A hyperparameter; its GGUF key is `<arch>.` followed by [`HyperKey::suffix`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HyperKey {
    /// Transformer blocks.
    BlockCount,
    /// Training context length.
    ContextLength,
    /// Model width.
    EmbeddingLength,
    /// Feed-forward width.
    FeedForwardLength,
    /// Query heads.
    HeadCount,
    /// Key/value heads (grouped-query attention).
    HeadCountKv,
    /// Per-head key width, when it is not width / heads.
    KeyLength,
    /// Per-head value width, when it is not width / heads.
    ValueLength,
    /// Rotated dimensions per head.
    RopeDimensionCount,
    /// RoPE base frequency.
    RopeFreqBase,
    /// RMSNorm epsilon.
    RmsEpsilon,
    /// Positions a local (sliding-window) layer attends to.
    SlidingWindow,
    /// Vocabulary size.
    VocabSize,
}

impl HyperKey {
    /// The key after `<arch>.`.
    pub fn suffix(self) -> &'static str {
        match self {
            HyperKey::BlockCount => "block_count",
            HyperKey::ContextLength => "context_length",
            HyperKey::EmbeddingLength => "embedding_length",
            HyperKey::FeedForwardLength => "feed_forward_length",
            HyperKey::HeadCount => "attention.head_count",
            HyperKey::HeadCountKv => "attention.head_count_kv",
            HyperKey::KeyLength => "attention.key_length",
            HyperKey::ValueLength => "attention.value_length",
            HyperKey::RopeDimensionCount => "rope.dimension_count",
            HyperKey::RopeFreqBase => "rope.freq_base",
            HyperKey::RmsEpsilon => "attention.layer_norm_rms_epsilon",
            HyperKey::SlidingWindow => "attention.sliding_window",
            HyperKey::VocabSize => "vocab_size",
        }
    }

    /// The full key for architecture `arch`.
    pub fn key(self, arch: &str) -> String {
        format!("{arch}.{}", self.suffix())
    }
}

/// The hyperparameters a GGUF file states; `None` where its key is absent.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Hyperparameters {
    /// `<arch>.block_count`
    pub block_count: Option<u64>,
    /// `<arch>.context_length`
    pub context_length: Option<u64>,
    /// `<arch>.embedding_length`
    pub embedding_length: Option<u64>,
    /// `<arch>.feed_forward_length`
    pub feed_forward_length: Option<u64>,
    /// `<arch>.attention.head_count`
    pub head_count: Option<u64>,
    /// `<arch>.attention.head_count_kv`
    pub head_count_kv: Option<u64>,
    /// `<arch>.attention.key_length`
    pub key_length: Option<u64>,
    /// `<arch>.rope.dimension_count`
    pub rope_dimension_count: Option<u64>,
    /// `<arch>.rope.freq_base`
    pub rope_freq_base: Option<f64>,
    /// `<arch>.attention.layer_norm_rms_epsilon`
    pub rms_norm_eps: Option<f64>,
    /// `<arch>.vocab_size`
    pub vocab_size: Option<u64>,
    /// `<arch>.attention.sliding_window`
    pub sliding_window: Option<u64>,
}

impl Hyperparameters {
    /// Read `<arch>.*` from `file`.
    pub fn read(file: &GgufFile, arch: &str) -> Hyperparameters {
        let int = |k: HyperKey| file.get_u64(&k.key(arch));
        let real = |k: HyperKey| file.get_f64(&k.key(arch));
        Hyperparameters {
            block_count: int(HyperKey::BlockCount),
            context_length: int(HyperKey::ContextLength),
            embedding_length: int(HyperKey::EmbeddingLength),
            feed_forward_length: int(HyperKey::FeedForwardLength),
            head_count: int(HyperKey::HeadCount),
            head_count_kv: int(HyperKey::HeadCountKv),
            key_length: int(HyperKey::KeyLength),
            rope_dimension_count: int(HyperKey::RopeDimensionCount),
            rope_freq_base: real(HyperKey::RopeFreqBase),
            rms_norm_eps: real(HyperKey::RmsEpsilon),
            vocab_size: int(HyperKey::VocabSize),
            sliding_window: int(HyperKey::SlidingWindow),
        }
    }

    /// Key/value heads: `head_count_kv`, or as many as query heads.
    pub fn kv_heads(&self) -> Option<u64> {
        self.head_count_kv.or(self.head_count)
    }

    /// Per-head width: `key_length`, or width / heads.
    pub fn head_dim(&self) -> Option<u64> {
        self.key_length.or_else(|| {
            let heads = self.head_count?.max(1);
            Some(self.embedding_length? / heads)
        })
    }
}

/// A hyperparameter that tensor shapes follow from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShapeSetting {
    /// Blocks.
    Layers,
    /// Width.
    Hidden,
    /// Query heads.
    Heads,
    /// Key/value heads.
    KvHeads,
    /// Per-head width.
    HeadDim,
    /// Feed-forward width.
    Ffn,
    /// Vocabulary.
    Vocab,
}

/// How shapes are shown in errors: torch order for HF files, ggml's ne for GGUF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShapeOrder {
    /// Outermost dimension first, as PyTorch and safetensors write them.
    Torch,
    /// ggml's `ne`, innermost first.
    Ggml,
}

/// The hyperparameters of a model that fix its tensors' shapes, each with
/// the name its file gives it (for errors), and the architecture whose
/// block parts they shape.
#[derive(Debug, Clone)]
pub struct ShapeRules {
    spec: &'static ArchSpec,
    values: [u64; 7],
    names: [String; 7],
}

impl ShapeRules {
    /// Values and names in [`ShapeSetting`] order: layers, hidden, heads,
    /// key/value heads, head width, feed-forward width, vocabulary.
    pub fn new(arch: Architecture, values: [u64; 7], names: [String; 7]) -> ShapeRules {
        ShapeRules {
            spec: arch.spec(),
            values,
            names,
        }
    }

    /// Rules named by GGUF keys (`llama.block_count`, ...), for a GGUF model.
    pub fn gguf(arch: Architecture, values: [u64; 7]) -> ShapeRules {
        let name = arch.gguf_name();
        let keys = [
            HyperKey::BlockCount,
            HyperKey::EmbeddingLength,
            HyperKey::HeadCount,
            HyperKey::HeadCountKv,
            HyperKey::KeyLength,
            HyperKey::FeedForwardLength,
            HyperKey::VocabSize,
        ];
        ShapeRules::new(arch, values, keys.map(|k| k.key(name)))
    }

    fn get(&self, s: ShapeSetting) -> u64 {
        self.values[s as usize]
    }

    /// "'hidden_size' 8 and 'head_dim' 4", for errors.
    fn describe(&self, settings: &[ShapeSetting]) -> String {
        settings
            .iter()
            .map(|&s| format!("'{}' {}", self.names[s as usize], self.get(s)))
            .collect::<Vec<_>>()
            .join(" and ")
    }

    /// A width's value and the settings that make it.
    fn width(&self, w: Width) -> (u64, Vec<ShapeSetting>) {
        use ShapeSetting::*;
        let hd = self.get(HeadDim);
        match w {
            Width::Hidden => (self.get(Hidden), vec![Hidden]),
            Width::Queries => (self.get(Heads).saturating_mul(hd), vec![Heads, HeadDim]),
            Width::KeyValues => (self.get(KvHeads).saturating_mul(hd), vec![KvHeads, HeadDim]),
            Width::HeadDim => (hd, vec![HeadDim]),
            Width::Ffn => (self.get(Ffn), vec![Ffn]),
        }
    }

    /// The ggml dims (ne) of GGUF tensor `name` and the settings that give
    /// them, for the tensors whose shape the hyperparameters fix.
    fn expected(&self, name: &str) -> Option<(Vec<u64>, Vec<ShapeSetting>)> {
        use ShapeSetting::*;
        let h = self.get(Hidden);
        let (dims, settings) = match name {
            names::TOKEN_EMBD | names::OUTPUT => (vec![h, self.get(Vocab)], vec![Hidden, Vocab]),
            names::OUTPUT_NORM => (vec![h], vec![Hidden]),
            names::ROPE_FREQS => (vec![self.get(HeadDim) / 2], vec![HeadDim]),
            _ => {
                let mut it = name.strip_prefix("blk.")?.splitn(3, '.');
                let (_, part, suffix) = (it.next()?, it.next()?, it.next()?);
                let role = self.spec.part(part)?.role;
                let mut dims = Vec::new();
                let mut settings = Vec::new();
                for &w in role.dims() {
                    let (v, s) = self.width(w);
                    dims.push(v);
                    for s in s {
                        if !settings.contains(&s) {
                            settings.push(s);
                        }
                    }
                }
                match suffix {
                    "weight" => (dims, settings),
                    // A bias has one value per output row.
                    "bias" if !role.is_norm() => (dims[dims.len() - 1..].to_vec(), settings),
                    _ => return None,
                }
            }
        };
        Some((dims, settings))
    }

    /// Every tensor (GGUF name, ggml dims) has the shape these
    /// hyperparameters give it, every block 0..layers has all its tensors,
    /// and no tensor lies beyond the last block. `shown` turns a GGUF name
    /// into the file's own name for errors.
    pub fn check(
        &self,
        tensors: &[(&str, &[u64])],
        shown: impl Fn(&str) -> String,
        order: ShapeOrder,
    ) -> Result<(), String> {
        let layers = self.get(ShapeSetting::Layers);
        let show_dims = |d: &[u64]| -> Vec<u64> {
            match order {
                ShapeOrder::Torch => d.iter().rev().copied().collect(),
                ShapeOrder::Ggml => d.to_vec(),
            }
        };
        for &(name, dims) in tensors {
            let layer = name
                .strip_prefix("blk.")
                .and_then(|r| r.split('.').next())
                .and_then(|l| l.parse::<u64>().ok());
            if let Some(l) = layer.filter(|&l| l >= layers) {
                // Spelled out: "layers 0..3" read as inclusive when it was not.
                let allowed = match layers {
                    0 => "no layers".to_string(),
                    1 => "layer 0 only".to_string(),
                    n => format!("layers 0 to {} only", n - 1),
                };
                return Err(format!(
                    "tensor '{}' is in layer {l}, but {} allows {allowed}",
                    shown(name),
                    self.describe(&[ShapeSetting::Layers])
                ));
            }
            if let Some((want, settings)) = self.expected(name) {
                if dims != want {
                    return Err(format!(
                        "tensor '{}' has shape {:?}, but {} give it {:?}",
                        shown(name),
                        show_dims(dims),
                        self.describe(&settings),
                        show_dims(&want)
                    ));
                }
            }
        }
        let present: HashSet<&str> = tensors.iter().map(|&(n, _)| n).collect();
        let required = [names::TOKEN_EMBD, names::OUTPUT_NORM]
            .into_iter()
            .map(str::to_string);
        // Stops at the first gap, so a huge layer count costs no more than the
        // tensors present.
        let per_layer = (0..layers).flat_map(|l| {
            self.spec
                .parts
                .iter()
                .map(move |p| format!("blk.{l}.{}.weight", p.gguf))
        });
        for name in required.chain(per_layer) {
            if !present.contains(name.as_str()) {
                return Err(format!(
                    "tensor '{}' is missing ({} needs it)",
                    shown(&name),
                    self.describe(&[ShapeSetting::Layers])
                ));
            }
        }
        Ok(())
    }
}

//! Model architectures, each described once as data ([`ArchSpec`]): its
//! block tensors with their GGUF and Hugging Face names, its norms,
//! activation, attention variant and RoPE. The shape rules, both forward
//! passes, and the converter's HF reader and merge all read these specs, so a
//! new architecture starts as one new file here.

use std::fmt;

mod gemma3;
mod llama;
mod qwen2;

/// An architecture lorafold can convert and run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Architecture {
    /// Llama 2/3, TinyLlama, SmolLM, and Mistral (llama.cpp converts Mistral to "llama").
    Llama,
    /// Qwen2: attention biases, no q/k row permutation.
    Qwen2,
    /// Gemma 3 (text): sandwich norms, q/k norms, GELU, local and global layers.
    Gemma3,
}

/// How a head's dimensions pair up for RoPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs (2i, 2i+1): llama, whose GGUF q/k rows were permuted for it.
    Adjacent,
    /// Halves (i, i + d/2): GPT-NeoX style, HF's rotate-half (qwen2, gemma3).
    Halves,
}

/// The feed-forward's gate activation: `down(act(gate(x)) * up(x))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// x / (1 + e^-x) (SwiGLU).
    Silu,
    /// GELU, tanh approximation (GeGLU).
    GeluTanh,
}

/// What a block tensor does in the forward pass; its shape follows from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// RMSNorm before attention.
    AttnNorm,
    /// Query projection.
    Q,
    /// Key projection.
    K,
    /// Value projection.
    V,
    /// Attention output projection.
    O,
    /// RMSNorm over each query head (before RoPE).
    QNorm,
    /// RMSNorm over each key head (before RoPE).
    KNorm,
    /// RMSNorm on the attention output, before the residual add.
    PostAttnNorm,
    /// RMSNorm before the feed-forward.
    FfnNorm,
    /// Feed-forward gate projection.
    Gate,
    /// Feed-forward up projection.
    Up,
    /// Feed-forward down projection.
    Down,
    /// RMSNorm on the feed-forward output, before the residual add.
    PostFfnNorm,
}

/// A width a tensor dimension is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Width {
    /// The model width.
    Hidden,
    /// Query heads times head width.
    Queries,
    /// Key/value heads times head width.
    KeyValues,
    /// One head.
    HeadDim,
    /// The feed-forward width.
    Ffn,
}

impl Role {
    /// ggml dims (ne): `[input, output]` for a projection, `[len]` for a norm.
    pub fn dims(self) -> &'static [Width] {
        use Width::*;
        match self {
            Role::AttnNorm | Role::PostAttnNorm | Role::FfnNorm | Role::PostFfnNorm => &[Hidden],
            Role::QNorm | Role::KNorm => &[HeadDim],
            Role::Q => &[Hidden, Queries],
            Role::K | Role::V => &[Hidden, KeyValues],
            Role::O => &[Queries, Hidden],
            Role::Gate | Role::Up => &[Hidden, Ffn],
            Role::Down => &[Ffn, Hidden],
        }
    }

    /// Whether it is a norm's weight (a vector), not a projection.
    pub fn is_norm(self) -> bool {
        self.dims().len() == 1
    }
}

/// One tensor of every block, `blk.N.<gguf>.weight`, from HF module
/// `model.layers.N.<hf>`.
#[derive(Debug, Clone, Copy)]
pub struct Part {
    /// Its job.
    pub role: Role,
    /// llama.cpp's part name.
    pub gguf: &'static str,
    /// The Hugging Face module path inside a layer.
    pub hf: &'static str,
}

/// Local (sliding-window) layers interleaved with global ones.
#[derive(Debug, Clone, Copy)]
pub struct LocalLayers {
    /// Every `period`-th layer (the last of each run) is global.
    pub period: usize,
    /// The local layers' RoPE base, fixed by the architecture (the GGUF
    /// stores only the global base).
    pub rope_base: f32,
}

impl LocalLayers {
    /// Whether `layer` attends within the sliding window.
    pub fn is_local(&self, layer: usize) -> bool {
        !(layer + 1).is_multiple_of(self.period)
    }
}

/// Everything about an architecture that the code branches on.
#[derive(Debug)]
pub struct ArchSpec {
    /// `general.architecture` and the prefix of its hyperparameter keys.
    pub gguf_name: &'static str,
    /// Hugging Face `model_type` values read as this architecture.
    pub hf_model_types: &'static [&'static str],
    /// Block tensors in llama.cpp's order; every one is required.
    pub parts: &'static [Part],
    /// RoPE pairing.
    pub rope: RopeStyle,
    /// Whether llama.cpp's HF converter permutes the rows of q and k (to
    /// suit adjacent-pair RoPE), so deltas must be permuted to match.
    pub permutes_qk: bool,
    /// What llama.cpp's converter adds to every HF norm weight (Gemma
    /// multiplies by `1 + w` and stores `w`; the GGUF stores `1 + w`).
    pub hf_norm_offset: f32,
    /// The feed-forward's gate activation.
    pub activation: Activation,
    /// Whether the input embedding is multiplied by √width (the tied head
    /// reads the unscaled embedding).
    pub scales_embedding: bool,
    /// Sliding-window layers, when the architecture has them.
    pub local_layers: Option<LocalLayers>,
}

impl ArchSpec {
    /// The part named `gguf` (`attn_q`).
    pub fn part(&self, gguf: &str) -> Option<&Part> {
        self.parts.iter().find(|p| p.gguf == gguf)
    }

    /// The part playing `role`, when the architecture has one.
    pub fn part_for(&self, role: Role) -> Option<&Part> {
        self.parts.iter().find(|p| p.role == role)
    }

    /// HF tensor name -> GGUF tensor name.
    pub fn hf_to_gguf(&self, hf: &str) -> Option<String> {
        let fixed = match hf {
            "model.embed_tokens.weight" => Some(crate::gguf::names::TOKEN_EMBD),
            "model.norm.weight" => Some(crate::gguf::names::OUTPUT_NORM),
            "lm_head.weight" => Some(crate::gguf::names::OUTPUT),
            _ => None,
        };
        if let Some(n) = fixed {
            return Some(n.to_string());
        }
        let rest = hf.strip_prefix("model.layers.")?;
        let (layer, rest) = rest.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        let (module, suffix) = rest.rsplit_once('.')?;
        let part = self.parts.iter().find(|p| p.hf == module)?;
        matches!(suffix, "weight" | "bias").then(|| format!("blk.{layer}.{}.{suffix}", part.gguf))
    }

    /// GGUF tensor name -> HF tensor name, the inverse of [`ArchSpec::hf_to_gguf`].
    pub fn gguf_to_hf(&self, gguf: &str) -> Option<String> {
        let fixed = match gguf {
            crate::gguf::names::TOKEN_EMBD => Some("model.embed_tokens.weight"),
            crate::gguf::names::OUTPUT_NORM => Some("model.norm.weight"),
            crate::gguf::names::OUTPUT => Some("lm_head.weight"),
            _ => None,
        };
        if let Some(n) = fixed {
            return Some(n.to_string());
        }
        let mut it = gguf.strip_prefix("blk.")?.splitn(3, '.');
        let (layer, part, suffix) = (it.next()?, it.next()?, it.next()?);
        let part = self.part(part)?;
        Some(format!("model.layers.{layer}.{}.{suffix}", part.hf))
    }

    /// Whether GGUF tensor `name` is a norm weight (its HF value is offset
    /// by [`ArchSpec::hf_norm_offset`]).
    pub fn is_norm(&self, gguf: &str) -> bool {
        if gguf == crate::gguf::names::OUTPUT_NORM {
            return true;
        }
        let mut it = gguf.split('.');
        let (Some("blk"), Some(_), Some(part), Some("weight"), None) =
            (it.next(), it.next(), it.next(), it.next(), it.next())
        else {
            return false;
        };
        self.part(part).is_some_and(|p| p.role.is_norm())
    }
}

impl Architecture {
    /// Every architecture, in the order errors list them.
    pub const ALL: [Architecture; 3] = [
        Architecture::Llama,
        Architecture::Qwen2,
        Architecture::Gemma3,
    ];

    /// Its description.
    pub fn spec(self) -> &'static ArchSpec {
        match self {
            Architecture::Llama => &llama::SPEC,
            Architecture::Qwen2 => &qwen2::SPEC,
            Architecture::Gemma3 => &gemma3::SPEC,
        }
    }

    /// Parse `general.architecture`.
    pub fn from_gguf_name(name: &str) -> Option<Architecture> {
        Architecture::ALL
            .into_iter()
            .find(|a| a.spec().gguf_name == name)
    }

    /// Parse an HF `config.json` `model_type`.
    pub fn from_hf_model_type(model_type: &str) -> Option<Architecture> {
        Architecture::ALL
            .into_iter()
            .find(|a| a.spec().hf_model_types.contains(&model_type))
    }

    /// The `general.architecture` value.
    pub fn gguf_name(self) -> &'static str {
        self.spec().gguf_name
    }

    /// Whether llama.cpp's HF converter permutes the rows of q and k for this
    /// architecture (to suit its RoPE), so deltas must be permuted to match.
    pub fn permutes_qk(self) -> bool {
        self.spec().permutes_qk
    }
}

/// The one wording for an architecture lorafold does not run, from every
/// command: "architecture 'phi3' is not supported (llama, qwen2, gemma3 are)".
pub fn unsupported(name: &str) -> String {
    let known: Vec<&str> = Architecture::ALL.iter().map(|a| a.gguf_name()).collect();
    format!(
        "architecture '{name}' is not supported ({} are)",
        known.join(", ")
    )
}

impl fmt::Display for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.gguf_name())
    }
}

/// For each destination row of a q or k projection with `rows` rows and
/// `n_head` heads, the source row in HF order: llama.cpp's
/// `reshape(n_head, 2, rows/n_head/2, in).swapaxes(1, 2)`.
pub fn qk_permutation(rows: usize, n_head: usize) -> Vec<usize> {
    let head_dim = rows / n_head;
    let half = head_dim / 2;
    let mut src = Vec::with_capacity(rows);
    for h in 0..n_head {
        for j in 0..half {
            for t in 0..2 {
                src.push(h * head_dim + t * half + j);
            }
        }
    }
    src
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_interleaves_halves_per_head() {
        // One head of 8 rows: HF [0..4 | 4..8] halves become pairs (0,4),(1,5),...
        assert_eq!(qk_permutation(8, 1), [0, 4, 1, 5, 2, 6, 3, 7]);
        assert_eq!(qk_permutation(8, 2), [0, 2, 1, 3, 4, 6, 5, 7]);
    }

    #[test]
    fn names_map_per_architecture() {
        // HF's post_attention_layernorm is llama's pre-FFN norm but Gemma 3's
        // norm on the attention output.
        let hf = "model.layers.3.post_attention_layernorm.weight";
        let llama = Architecture::Llama.spec();
        let gemma = Architecture::Gemma3.spec();
        assert_eq!(llama.hf_to_gguf(hf).unwrap(), "blk.3.ffn_norm.weight");
        assert_eq!(
            gemma.hf_to_gguf(hf).unwrap(),
            "blk.3.post_attention_norm.weight"
        );
        assert_eq!(
            gemma
                .hf_to_gguf("model.layers.0.pre_feedforward_layernorm.weight")
                .unwrap(),
            "blk.0.ffn_norm.weight"
        );
        for spec in Architecture::ALL.map(Architecture::spec) {
            for p in spec.parts {
                let g = format!("blk.7.{}.weight", p.gguf);
                let h = spec.gguf_to_hf(&g).unwrap();
                assert_eq!(spec.hf_to_gguf(&h).unwrap(), g);
                assert_eq!(spec.is_norm(&g), p.role.is_norm());
            }
        }
        assert!(gemma.is_norm("output_norm.weight"));
        assert!(!gemma.is_norm("blk.0.attn_q.bias"));
    }

    #[test]
    fn gemma3_layers_five_local_then_one_global() {
        let local = Architecture::Gemma3.spec().local_layers.unwrap();
        let global: Vec<usize> = (0..18).filter(|&l| !local.is_local(l)).collect();
        assert_eq!(global, [5, 11, 17]);
        assert_eq!(
            unsupported("phi3"),
            "architecture 'phi3' is not supported (llama, qwen2, gemma3 are)"
        );
    }
}

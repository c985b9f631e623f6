//! Qwen2: the llama block with q/k/v biases (read wherever a `.bias` tensor
//! is present), and NeoX-style RoPE, so no q/k permutation.

use super::{Activation, ArchSpec, RopeStyle};

pub(super) const SPEC: ArchSpec = ArchSpec {
    gguf_name: "qwen2",
    hf_model_types: &["qwen2"],
    parts: &super::llama::PARTS,
    rope: RopeStyle::Halves,
    permutes_qk: false,
    hf_norm_offset: 0.0,
    activation: Activation::Silu,
    scales_embedding: false,
    local_layers: None,
};

//! Llama (and Mistral, and SmolLM): pre-norm blocks, SwiGLU, one RoPE base,
//! q/k rows permuted by llama.cpp's converter for adjacent-pair RoPE.

use super::{Activation, ArchSpec, Part, Role, RopeStyle};

/// The llama block: llama.cpp's parts and the HF modules they come from.
#[rustfmt::skip]
pub(super) const PARTS: [Part; 9] = [
    Part { role: Role::AttnNorm, gguf: "attn_norm", hf: "input_layernorm" },
    Part { role: Role::Q, gguf: "attn_q", hf: "self_attn.q_proj" },
    Part { role: Role::K, gguf: "attn_k", hf: "self_attn.k_proj" },
    Part { role: Role::V, gguf: "attn_v", hf: "self_attn.v_proj" },
    Part { role: Role::O, gguf: "attn_output", hf: "self_attn.o_proj" },
    Part { role: Role::FfnNorm, gguf: "ffn_norm", hf: "post_attention_layernorm" },
    Part { role: Role::Gate, gguf: "ffn_gate", hf: "mlp.gate_proj" },
    Part { role: Role::Up, gguf: "ffn_up", hf: "mlp.up_proj" },
    Part { role: Role::Down, gguf: "ffn_down", hf: "mlp.down_proj" },
];

pub(super) const SPEC: ArchSpec = ArchSpec {
    gguf_name: "llama",
    hf_model_types: &["llama", "mistral"],
    parts: &PARTS,
    rope: RopeStyle::Adjacent,
    permutes_qk: true,
    hf_norm_offset: 0.0,
    activation: Activation::Silu,
    scales_embedding: false,
    local_layers: None,
};

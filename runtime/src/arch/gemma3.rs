//! Gemma 3 (text): sandwich norms (before and after attention and the
//! feed-forward), per-head q/k RMSNorm, GELU-tanh gating, the input
//! embedding scaled by √width, norms stored by llama.cpp as `1 + w`, and
//! five sliding-window layers (RoPE base 10000) to every global one.

use super::{Activation, ArchSpec, LocalLayers, Part, Role, RopeStyle};

/// HF's `post_attention_layernorm` is the norm on the attention output here
/// (llama's is the pre-FFN norm), and `pre_feedforward_layernorm` is GGUF's
/// `ffn_norm`.
#[rustfmt::skip]
const PARTS: [Part; 13] = [
    Part { role: Role::AttnNorm, gguf: "attn_norm", hf: "input_layernorm" },
    Part { role: Role::Q, gguf: "attn_q", hf: "self_attn.q_proj" },
    Part { role: Role::QNorm, gguf: "attn_q_norm", hf: "self_attn.q_norm" },
    Part { role: Role::K, gguf: "attn_k", hf: "self_attn.k_proj" },
    Part { role: Role::KNorm, gguf: "attn_k_norm", hf: "self_attn.k_norm" },
    Part { role: Role::V, gguf: "attn_v", hf: "self_attn.v_proj" },
    Part { role: Role::O, gguf: "attn_output", hf: "self_attn.o_proj" },
    Part { role: Role::PostAttnNorm, gguf: "post_attention_norm", hf: "post_attention_layernorm" },
    Part { role: Role::FfnNorm, gguf: "ffn_norm", hf: "pre_feedforward_layernorm" },
    Part { role: Role::Gate, gguf: "ffn_gate", hf: "mlp.gate_proj" },
    Part { role: Role::Up, gguf: "ffn_up", hf: "mlp.up_proj" },
    Part { role: Role::Down, gguf: "ffn_down", hf: "mlp.down_proj" },
    Part { role: Role::PostFfnNorm, gguf: "post_ffw_norm", hf: "post_feedforward_layernorm" },
];

pub(super) const SPEC: ArchSpec = ArchSpec {
    gguf_name: "gemma3",
    // "gemma3" alone is the multimodal checkpoint, whose text layers live
    // under another prefix (model.language_model.*).
    hf_model_types: &["gemma3_text"],
    parts: &PARTS,
    rope: RopeStyle::Halves,
    permutes_qk: false,
    hf_norm_offset: 1.0,
    activation: Activation::GeluTanh,
    scales_embedding: true,
    local_layers: Some(LocalLayers {
        period: 6,
        rope_base: 10000.0,
    }),
};

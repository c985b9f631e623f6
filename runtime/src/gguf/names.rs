//! The GGUF vocabulary lorafold reads and writes, spelled once: the tensor
//! names every model has (block parts are each architecture's: `crate::arch`), the metadata keys the loader, the
//! converter and inspect share, and llama.cpp's LoRA adapter layout.

/// The token embedding, `[dim, vocab]`.
pub const TOKEN_EMBD: &str = "token_embd.weight";
/// The output head; absent when it is tied to the token embedding.
pub const OUTPUT: &str = "output.weight";
/// The final RMSNorm.
pub const OUTPUT_NORM: &str = "output_norm.weight";
/// Per-dimension RoPE frequency factors (llama 3 scaling), `[head_dim / 2]`.
pub const ROPE_FREQS: &str = "rope_freqs.weight";

/// The architecture (`llama`, `qwen2`, ...); the prefix of hyperparameters.
pub const ARCHITECTURE: &str = "general.architecture";
/// What a file is: `model`, `adapter`, llama.cpp's `imatrix`, or ours.
pub const TYPE: &str = "general.type";
/// Tensor data alignment.
pub const ALIGNMENT: &str = "general.alignment";
/// llama.cpp's file type code (the `--quant` preset).
pub const FILE_TYPE: &str = "general.file_type";
/// The quantization format version (2 since ggml's block layouts settled).
pub const QUANTIZATION_VERSION: &str = "general.quantization_version";

/// The model's name.
pub const NAME: &str = "general.name";

/// The tokenizer kind: `gpt2` (byte-level BPE) or `llama` (SentencePiece).
pub const TOKENIZER_MODEL: &str = "tokenizer.ggml.model";
/// The BPE pre-tokenizer (`smollm`, `llama-bpe`, ...).
pub const TOKENIZER_PRE: &str = "tokenizer.ggml.pre";
/// Every token's text, by id.
pub const TOKENIZER_TOKENS: &str = "tokenizer.ggml.tokens";
/// Every token's kind (normal, control, ...), by id.
pub const TOKENIZER_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
/// SentencePiece scores, by id.
pub const TOKENIZER_SCORES: &str = "tokenizer.ggml.scores";
/// BPE merges, `"a b"` each.
pub const TOKENIZER_MERGES: &str = "tokenizer.ggml.merges";
/// Whether encoding starts with BOS.
pub const TOKENIZER_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
/// Whether SentencePiece prefixes a space.
pub const TOKENIZER_ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";
/// The Jinja chat template.
pub const CHAT_TEMPLATE: &str = "tokenizer.chat_template";

/// The key of a special token's id (`bos`, `eos`, `eot`, ...).
pub fn special_token_id(kind: &str) -> String {
    format!("tokenizer.ggml.{kind}_token_id")
}

/// `general.type` of a model.
pub const TYPE_MODEL: &str = "model";
/// `general.type` of a LoRA adapter.
pub const TYPE_ADAPTER: &str = "adapter";
/// The adapter kind; llama.cpp reads `lora`.
pub const ADAPTER_TYPE: &str = "adapter.type";
/// `adapter.type` of a LoRA adapter.
pub const ADAPTER_TYPE_LORA: &str = "lora";
/// alpha: llama.cpp scales each pair by alpha / its rank (1 when 0).
pub const ADAPTER_LORA_ALPHA: &str = "adapter.lora.alpha";

/// A LoRA pair's A tensor for `target` (`ne [in, rank]`).
pub fn lora_a(target: &str) -> String {
    format!("{target}.lora_a")
}

/// A LoRA pair's B tensor for `target` (`ne [rank, out]`).
pub fn lora_b(target: &str) -> String {
    format!("{target}.lora_b")
}

/// The target of a LoRA tensor name and whether it is A (true) or B.
pub fn lora_target(name: &str) -> Option<(&str, bool)> {
    name.strip_suffix(".lora_a")
        .map(|t| (t, true))
        .or_else(|| name.strip_suffix(".lora_b").map(|t| (t, false)))
}

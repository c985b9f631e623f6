//! Writing outputs: GGUF streams that appear whole or not at all
//! (`gguf_writer`, `output`), and the adapter in llama.cpp's LoRA layout
//! (`adapter_gguf`).

pub mod adapter_gguf;
pub mod gguf_writer;
pub mod output;

//! The converter's tests, linked into one binary: the merge against PEFT's
//! merged weights, quantized bytes against ggml's reference quantizers, and
//! the streaming GGUF writer. Tests that run the `lorafold` CLI or the
//! runtime over converted files are in the root package's tests/all.

#[path = "../../../tests/common/mod.rs"]
mod common;

mod cancel;
mod gguf_writer;
mod merge_tiny_llama;
mod quant_reference;

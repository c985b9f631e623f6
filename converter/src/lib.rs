//! lorafold's release side: read bases and PEFT adapters, merge, quantize, and
//! stream GGUF files out.
#![warn(missing_docs)]

pub mod adapter_gguf;
pub mod base;
pub mod budget;
pub mod calib;
pub mod compensate;
pub mod convert;
pub mod error;
pub mod gguf_writer;
pub mod gptq;
pub mod hf_tokenizer;
pub mod importance;
pub mod merge;
pub mod output;
pub mod peft;
pub mod quant;
mod quant_avx2;
pub mod reference;
pub mod report;
pub mod safetensors_dir;
mod simd;
#[cfg(test)]
mod test_rng;

pub use gguf_writer::{GgufStream, GgufWriter, WriteError};

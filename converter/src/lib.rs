//! lorafold's release side: read bases and PEFT adapters, merge, quantize, and
//! stream GGUF files out.

pub mod gguf_writer;
pub mod peft;
pub mod safetensors_dir;

pub use gguf_writer::{GgufStream, GgufWriter, WriteError};

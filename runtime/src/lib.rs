//! lorafold's device side: memory-mapped GGUF models, attachable LoRA adapters,
//! generation and measurement.

pub mod arch;
pub mod gguf;
pub mod summary;

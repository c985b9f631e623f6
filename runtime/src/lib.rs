//! lorafold's device side: memory-mapped GGUF models, attachable LoRA adapters,
//! generation and measurement.

pub mod arch;
pub mod gguf;
pub mod summary;
pub mod mapped;
pub mod tokenizer;
pub mod lora;
pub mod model;
pub mod generate;

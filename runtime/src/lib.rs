//! lorafold's device side: memory-mapped GGUF models, attachable LoRA adapters,
//! generation and measurement.
#![warn(missing_docs)]

pub mod arch;
pub mod bench;
mod candle_path;
pub mod cpu;
pub mod device;
pub mod finite;
pub mod generate;
pub mod gguf;
pub mod input;
pub mod lora;
pub mod mapped;
pub mod measure;
pub mod model;
pub mod number;
pub mod path_spec;
pub mod spm;
pub mod summary;
pub mod text;
pub mod tokenizer;

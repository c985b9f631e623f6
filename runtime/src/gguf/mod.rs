//! GGUF: llama.cpp's model file format, read over a memory map.

pub mod dtype;
pub mod hparams;
pub mod names;
pub mod reader;
pub mod value;

pub use dtype::GgmlType;
pub use hparams::{HyperKey, Hyperparameters, ShapeOrder, ShapeRules};
pub use reader::{FormatError, GgufError, GgufFile, TensorInfo, DEFAULT_ALIGNMENT, GGUF_MAGIC};
pub use value::{MetadataArray, MetadataValue, ValueType};

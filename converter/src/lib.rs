//! lorafold's release side: read bases and PEFT adapters, merge, quantize, and
//! stream GGUF files out.
//!
//! The modules are layered by stage and import only downwards:
//! `round` (codecs, GPTQ) ← `read` (bases, adapters) ← `merge` ← `write`
//! (GGUF streams, adapter GGUFs) ← `calib` ← `report` ← `convert` ←
//! `budget`, `reference`. `error`, `simd` are leaves every stage may use.
#![warn(missing_docs)]

pub mod budget;
pub mod calib;
pub mod convert;
pub mod error;
pub mod merge;
pub mod read;
pub mod reference;
pub mod report;
pub mod round;
mod simd;
#[cfg(test)]
mod test_rng;
pub mod write;

pub use write::gguf_writer::{GgufStream, GgufWriter, WriteError};

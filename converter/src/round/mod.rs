//! Rounding f32 values into ggml's types: the codecs and the type policy
//! (`quant`), and the roundings that use calibration statistics
//! (`importance`, `gptq`) or repair what rounding lost (`compensate`).

pub mod compensate;
mod fast_codec;
pub mod gptq;
pub mod importance;
pub mod quant;
mod quant_avx2;

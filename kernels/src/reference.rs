//! The slow, obviously right versions: dequantize a row to f32 exactly as
//! ggml's `dequantize_row_*`, and the f64 dot product of dequantized weights
//! and rounded activations that every kernel is tested against.

use crate::{ActBuf, WType};

/// Dequantize one row's bytes (whole blocks of `wtype`) into `out`.
pub fn dequantize(wtype: WType, bytes: &[u8], out: &mut [f32]) {
    match wtype {
        WType::F32 | WType::F16 | WType::BF16 => crate::float::dequantize(wtype, bytes, out),
        WType::Q4_0 | WType::Q4_1 | WType::Q5_0 | WType::Q5_1 | WType::Q8_0 => {
            crate::legacy::dequantize(wtype, bytes, out)
        }
        WType::Q2K | WType::Q3K | WType::Q4K | WType::Q5K | WType::Q6K => {
            crate::kquants::dequantize(wtype, bytes, out)
        }
    }
}

/// The f64 dot product of weight row `w_row` (dequantized) with activation
/// row `i` of `acts` (as rounded).
pub fn dot_f64(wtype: WType, w_row: &[u8], acts: &ActBuf, i: usize) -> f64 {
    let a = acts.dequantize_row(i);
    let mut w = vec![0f32; a.len()];
    dequantize(wtype, w_row, &mut w);
    w.iter().zip(&a).map(|(&x, &y)| x as f64 * y as f64).sum()
}

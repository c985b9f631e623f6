//! Q8_0's quantizer and Q4_0's and Q8_0's dequantizers as loops LLVM
//! vectorises (compiled for AVX2 where present). candle's are scalar: at 7B
//! (a Q4_K stand-in to q4_0) its Q4_0 dequantizer, which measures every
//! rounded run, was 9% of the conversion, and on SmolLM2 to q8_0 its Q8_0
//! quantizer (with `roundf`) was 45%. Each value takes the same IEEE
//! operations as candle's (ggml's reference), so the bytes and values are
//! identical (tested below against candle's).

use half::f16;

/// Bytes of a Q4_0 block: an f16 scale and 16 bytes of nibbles.
const Q4_0_BYTES: usize = 18;
/// Bytes of a Q8_0 block: an f16 scale and 32 signed bytes.
const Q8_0_BYTES: usize = 34;

/// round(x) half away from zero, as C's `roundf`, in operations that
/// vectorise: x + copysign(0.49999997, x), truncated. Exact for |x| < 2^23:
/// adding the largest float below 0.5 carries into the next integer only
/// from x.5 up.
#[inline(always)]
fn round_half_away(x: f32) -> f32 {
    (x + 0.499_999_97f32.copysign(x)).trunc()
}

/// `xs` (a whole number of 32-value blocks) quantized to Q8_0 into `out`:
/// AVX2 where present, else the portable loop.
pub(crate) fn quantize_q8_0(xs: &[f32], out: &mut [u8]) {
    if !crate::round::quant_avx2::quantize_q8_0(xs, out) {
        quantize_q8_0_portable(xs, out);
    }
}

crate::simd::avx2_or_portable! {
    /// The portable Q8_0 quantizer (scalar roundings that LLVM does not vectorise).
    fn quantize_q8_0_portable(xs: &[f32], out: &mut [u8]) {
        for (x, y) in xs.chunks_exact(32).zip(out.chunks_exact_mut(Q8_0_BYTES)) {
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            y[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
            for (q, &v) in y[2..].iter_mut().zip(x) {
                *q = round_half_away(v * id) as i8 as u8;
            }
        }
    }
}

crate::simd::avx2_or_portable! {
    /// Q8_0 blocks `bytes` as f32 values into `out`.
    pub(crate) fn dequantize_q8_0(bytes: &[u8], out: &mut [f32]) {
        for (b, y) in bytes.chunks_exact(Q8_0_BYTES).zip(out.chunks_exact_mut(32)) {
            let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
            for (o, &q) in y.iter_mut().zip(&b[2..]) {
                *o = q as i8 as f32 * d;
            }
        }
    }
}

crate::simd::avx2_or_portable! {
    /// Q4_0 blocks `bytes` as f32 values into `out`.
    pub(crate) fn dequantize_q4_0(bytes: &[u8], out: &mut [f32]) {
        for (b, y) in bytes.chunks_exact(Q4_0_BYTES).zip(out.chunks_exact_mut(32)) {
            let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
            let (lo, hi) = y.split_at_mut(16);
            for ((l, h), &q) in lo.iter_mut().zip(hi).zip(&b[2..]) {
                *l = ((q & 0x0f) as i16 - 8) as f32 * d;
                *h = ((q >> 4) as i16 - 8) as f32 * d;
            }
        }
    }
}

crate::simd::avx2_or_portable! {
    /// The largest |x| of `xs` (0 for none), NaN ignored as f32::max does.
    pub(crate) fn max_abs(xs: &[f32]) -> f32 {
        // Eight lanes so the fold vectorises; max is exact in any order.
        let mut m = [0f32; 8];
        let (chunks, tail) = xs.as_chunks::<8>();
        for c in chunks {
            for i in 0..8 {
                let a = c[i].abs();
                // Not f32::max, whose NaN rule does not vectorise to one
                // instruction; this one also skips NaN.
                m[i] = if a > m[i] { a } else { m[i] };
            }
        }
        let lanes = m.iter().fold(0f32, |a, &b| a.max(b));
        tail.iter().fold(lanes, |a, v| a.max(v.abs()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::round::quant::{dequantize, quantize_candle};
    use crate::test_rng::Rng;
    use lorafold_runtime::gguf::GgmlType;

    /// Random blocks with the cases rounding can get wrong: ties at x.5
    /// (x·id lands on them when a block holds multiples of amax/254), zero
    /// and signed-zero blocks, and one huge value per block.
    fn hard_values(blocks: usize) -> Vec<f32> {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut v = Vec::with_capacity(blocks * 32);
        for b in 0..blocks {
            for j in 0..32 {
                v.push(match b % 6 {
                    0 => rng.f() * 0.05,
                    1 => (j as f32 - 16.0) * 0.5 * (127.0 / 16.0) / 127.0,
                    2 => 0.0,
                    3 => -0.0,
                    // amax 127 makes Q8_0's scale 1: every other value a tie.
                    4 if j == 0 => 127.0,
                    4 => (j as f32 - 16.0) + 0.5,
                    _ => (j as f32 + 0.5) * if j % 2 == 0 { 1.0 } else { -1e3 },
                });
            }
        }
        v
    }

    #[test]
    fn q8_0_quantizes_as_candle_does() {
        let xs = hard_values(400);
        let mut ours = vec![0u8; xs.len() / 32 * Q8_0_BYTES];
        quantize_q8_0(&xs, &mut ours);
        assert_eq!(ours, quantize_candle(GgmlType::Q8_0, &xs));
        let mut portable = vec![0u8; ours.len()];
        quantize_q8_0_portable(&xs, &mut portable);
        assert_eq!(portable, ours);
    }

    #[test]
    fn rounding_matches_roundf_at_ties_and_edges() {
        for x in [
            0.5f32,
            1.5,
            2.5,
            -2.5,
            0.499_999_97,
            1.499_999_9,
            126.5,
            -126.5,
            3.5,
        ] {
            assert_eq!(round_half_away(x), x.round(), "{x}");
        }
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        for _ in 0..100_000 {
            let x = rng.f() * 127.0;
            assert_eq!(round_half_away(x), x.round(), "{x}");
        }
    }

    #[test]
    fn dequantizers_match_candle() {
        let xs = hard_values(200);
        for (t, size) in [(GgmlType::Q4_0, Q4_0_BYTES), (GgmlType::Q8_0, Q8_0_BYTES)] {
            let bytes = quantize_candle(t, &xs);
            assert_eq!(bytes.len(), xs.len() / 32 * size);
            let mut ours = vec![0f32; xs.len()];
            match t {
                GgmlType::Q4_0 => dequantize_q4_0(&bytes, &mut ours),
                _ => dequantize_q8_0(&bytes, &mut ours),
            }
            let theirs = dequantize(t, &bytes, xs.len(), "t").unwrap();
            let same = ours
                .iter()
                .zip(&theirs)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{t}");
        }
    }

    #[test]
    fn max_abs_is_the_largest_magnitude() {
        let mut xs = hard_values(3);
        xs.push(-7e3);
        assert_eq!(max_abs(&xs), 7e3);
        assert_eq!(max_abs(&[]), 0.0);
        assert_eq!(max_abs(&[-0.0, f32::NAN, -2.0]), 2.0);
    }
}

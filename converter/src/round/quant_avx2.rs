//! ggml's Q4_0 quantizer (`quantize_row_q4_0_ref`) with AVX2: candle's is
//! scalar and was 18% of a SmolLM2 f32 + chef -> q4_0 conversion, run twice
//! per changed tensor (the merged weights and, for the retention measure,
//! the base's). Every element takes the same IEEE operations in the same
//! order as the reference, so the bytes are identical (tested against
//! candle's on random, tied, zero and signed-zero blocks).

#[cfg(target_arch = "x86_64")]
use half::f16;

/// Bytes of one Q4_0 block: an f16 scale and 16 bytes of nibbles.
#[cfg(target_arch = "x86_64")]
const BLOCK_BYTES: usize = 18;

/// Quantize `xs` (a whole number of 32-value blocks) into `out` as Q4_0, if
/// the kernels' detected tier has AVX2 (so `LORAFOLD_ISA` caps it too);
/// false (and `out` untouched) if not.
pub(crate) fn quantize_q4_0(xs: &[f32], out: &mut [u8]) -> bool {
    #[cfg(target_arch = "x86_64")]
    return with_avx2(xs, out, BLOCK_BYTES, quantize_q4_0_avx2);
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (xs, out);
        false
    }
}

/// Run an AVX2 quantizer of 32-value blocks into `block_bytes`-byte blocks
/// when the detected tier has AVX2, the lengths checked first.
#[cfg(target_arch = "x86_64")]
fn with_avx2(
    xs: &[f32],
    out: &mut [u8],
    block_bytes: usize,
    kernel: unsafe fn(&[f32], &mut [u8]),
) -> bool {
    if !lorafold_kernels::Isa::detect().avx2() {
        return false;
    }
    assert!(xs.len().is_multiple_of(32) && out.len() == xs.len() / 32 * block_bytes);
    // SAFETY: AVX2 is present, all the kernels need; the lengths are checked above.
    unsafe { kernel(xs, out) };
    true
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_q4_0_avx2(xs: &[f32], out: &mut [u8]) {
    use std::arch::x86_64::*;
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    for (x, y) in xs.chunks_exact(32).zip(out.chunks_exact_mut(BLOCK_BYTES)) {
        let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(x[8 * i..].as_ptr()));
        let a: [__m256; 4] = std::array::from_fn(|i| _mm256_and_ps(v[i], abs_mask));
        let m = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
        let m = _mm256_max_ps(m, _mm256_permute2f128_ps(m, m, 1));
        let m = _mm256_max_ps(m, _mm256_shuffle_ps(m, m, 0b01_00_11_10));
        let m = _mm256_max_ps(m, _mm256_shuffle_ps(m, m, 0b10_11_00_01));
        let amax = _mm256_cvtss_f32(m);
        // The reference keeps the first value whose |x| is the largest
        // (strictly larger than all before it), and 0.0 when every |x| is
        // 0: a -0.0 there would flip the scale's sign bit.
        let max = if amax == 0.0 {
            0.0
        } else {
            let mut bits = 0u32;
            for (i, ai) in a.iter().enumerate() {
                let eq = _mm256_cmp_ps(*ai, _mm256_set1_ps(amax), _CMP_EQ_OQ);
                bits |= (_mm256_movemask_ps(eq) as u32) << (8 * i);
            }
            x[bits.trailing_zeros() as usize]
        };
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        y[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        let (idv, half) = (_mm256_set1_ps(id), _mm256_set1_ps(8.5));
        let (zero, fifteen) = (_mm256_setzero_si256(), _mm256_set1_epi32(15));
        let mut q = [0i32; 32];
        for i in 0..4 {
            let t = _mm256_add_ps(_mm256_mul_ps(v[i], idv), half);
            // Rust's `as u8` truncates and saturates at 0; cvtt truncates
            // (NaN and overflow give i32::MIN, clamped to 0 as well).
            let t = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvttps_epi32(t), zero), fifteen);
            _mm256_storeu_si256(q[8 * i..].as_mut_ptr().cast(), t);
        }
        for j in 0..16 {
            y[2 + j] = (q[j] | (q[16 + j] << 4)) as u8;
        }
    }
}

/// Bytes of one Q8_0 block: an f16 scale and 32 signed bytes.
#[cfg(target_arch = "x86_64")]
const Q8_0_BYTES: usize = 34;

/// Quantize `xs` (a whole number of 32-value blocks, finite) into `out` as
/// Q8_0, if the detected tier has AVX2; false (and `out` untouched) if not.
/// LLVM left the portable loop's rounding and narrowing scalar: it was 42%
/// of a 7B stand-in's conversion to q8_0.
pub(crate) fn quantize_q8_0(xs: &[f32], out: &mut [u8]) -> bool {
    #[cfg(target_arch = "x86_64")]
    return with_avx2(xs, out, Q8_0_BYTES, quantize_q8_0_avx2);
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (xs, out);
        false
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_q8_0_avx2(xs: &[f32], out: &mut [u8]) {
    use std::arch::x86_64::*;
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let sign_mask = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MIN));
    // roundf as trunc(x + copysign(0.49999997, x)): see fast_codec.
    let below_half = _mm256_set1_ps(0.499_999_97);
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (x, y) in xs.chunks_exact(32).zip(out.chunks_exact_mut(Q8_0_BYTES)) {
        let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(x[8 * i..].as_ptr()));
        let a: [__m256; 4] = std::array::from_fn(|i| _mm256_and_ps(v[i], abs_mask));
        let m = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
        let m = _mm256_max_ps(m, _mm256_permute2f128_ps(m, m, 1));
        let m = _mm256_max_ps(m, _mm256_shuffle_ps(m, m, 0b01_00_11_10));
        let m = _mm256_max_ps(m, _mm256_shuffle_ps(m, m, 0b10_11_00_01));
        let d = _mm256_cvtss_f32(m) / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        y[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        let idv = _mm256_set1_ps(id);
        let q: [__m256i; 4] = std::array::from_fn(|i| {
            let p = _mm256_mul_ps(v[i], idv);
            let half = _mm256_or_ps(_mm256_and_ps(p, sign_mask), below_half);
            _mm256_cvttps_epi32(_mm256_add_ps(p, half))
        });
        // |q| <= 127, so the saturating packs are exact; they interleave
        // 128-bit lanes, which the permute puts back in order.
        let w = _mm256_packs_epi16(
            _mm256_packs_epi32(q[0], q[1]),
            _mm256_packs_epi32(q[2], q[3]),
        );
        let w = _mm256_permutevar8x32_epi32(w, order);
        _mm256_storeu_si256(y[2..].as_mut_ptr() as *mut __m256i, w);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::Rng;

    #[test]
    fn bytes_equal_candles_scalar_quantizer() {
        let mut rng = Rng(3);
        let mut xs: Vec<f32> = (0..32 * 64).map(|_| rng.f() * 3.0).collect();
        // Blocks with ties for the largest |x| (of both signs), all zeros,
        // signed zeros, and one huge value.
        xs[32..64]
            .iter_mut()
            .enumerate()
            .for_each(|(i, x)| *x = if i % 7 == 0 { -2.0 } else { 1.0 });
        xs[40] = 2.0;
        xs[64..96].iter_mut().for_each(|x| *x = 0.0);
        xs[96..128].iter_mut().for_each(|x| *x = -0.0);
        xs[130] = 1e30;
        xs[160..192]
            .iter_mut()
            .enumerate()
            .for_each(|(i, x)| *x = i as f32 * 1e-40);
        let want =
            crate::round::quant::quantize_candle(lorafold_runtime::gguf::GgmlType::Q4_0, &xs);
        let mut got = vec![0u8; want.len()];
        let ran = quantize_q4_0(&xs, &mut got);
        #[cfg(target_arch = "x86_64")]
        assert_eq!(ran, lorafold_kernels::Isa::detect().avx2());
        if ran {
            assert_eq!(got, want);
        }
    }
}

//! Activations rounded the way ggml rounds them before a quantized dot
//! product (`quantize_row_q8_0/q8_1/q8_K`), kept in a reusable buffer so a
//! decode step allocates nothing.
//!
//! Our blocks hold the scales as f32 where ggml stores f16: the value is the
//! same (rounded through f16 exactly as ggml does), and the kernels skip a
//! conversion per block.

use half::f16;

use crate::blocks::QK_K;
use crate::Isa;

/// The format activations are rounded to for a weight type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActType {
    /// Plain f32 (float weights).
    F32,
    /// Blocks of 32 int8 with a scale (for Q4_0, Q5_0, Q8_0).
    Q8_0,
    /// Blocks of 32 int8 with a scale and the scaled sum (for Q4_1, Q5_1).
    Q8_1,
    /// Blocks of 256 int8 with an f32 scale and 16 group sums (for K-quants).
    Q8K,
}

/// One Q8_0 activation block: `x ≈ d * qs`.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct ActQ8_0 {
    /// The scale, rounded through f16 as ggml stores it.
    pub d: f32,
    /// The codes.
    pub qs: [i8; 32],
}
const _: () = assert!(std::mem::size_of::<ActQ8_0>() == 36);

/// One Q8_1 activation block: `x ≈ d * qs`, `s = d * sum(qs)`.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct ActQ8_1 {
    /// The scale, rounded through f16.
    pub d: f32,
    /// d times the sum of the codes, rounded through f16.
    pub s: f32,
    /// The codes.
    pub qs: [i8; 32],
}
const _: () = assert!(std::mem::size_of::<ActQ8_1>() == 40);

/// One Q8_K activation block (ggml's `block_q8_K`).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct ActQ8K {
    /// The scale (f32 in ggml too).
    pub d: f32,
    /// The codes.
    pub qs: [i8; QK_K],
    /// Sums of each group of 16 codes.
    pub bsums: [i16; QK_K / 16],
}
const _: () = assert!(std::mem::size_of::<ActQ8K>() == 292);

/// Bytes per activation block that weights of the type with code `t` take,
/// and where its codes start: the SIMD kernels walk activation rows by bytes.
pub(crate) const fn act_block(t: u8) -> (usize, usize) {
    use std::mem::{offset_of, size_of};
    match crate::WType::from_code(t).act_type() {
        ActType::Q8_1 => (size_of::<ActQ8_1>(), offset_of!(ActQ8_1, qs)),
        ActType::Q8K => (size_of::<ActQ8K>(), offset_of!(ActQ8K, qs)),
        _ => (size_of::<ActQ8_0>(), offset_of!(ActQ8_0, qs)),
    }
}

impl ActType {
    /// Values per block.
    pub fn block_len(self) -> usize {
        match self {
            ActType::F32 => 1,
            ActType::Q8_0 | ActType::Q8_1 => 32,
            ActType::Q8K => QK_K,
        }
    }

    /// Bytes per block (a multiple of 4, so every row stays f32-aligned).
    pub fn block_bytes(self) -> usize {
        match self {
            ActType::F32 => 4,
            ActType::Q8_0 => std::mem::size_of::<ActQ8_0>(),
            ActType::Q8_1 => std::mem::size_of::<ActQ8_1>(),
            ActType::Q8K => std::mem::size_of::<ActQ8K>(),
        }
    }

    /// 32-bit words per row of `k` values.
    fn row_words(self, k: usize) -> usize {
        k / self.block_len() * self.block_bytes() / 4
    }
}

/// Rows of activations rounded for one weight type; reused across calls.
#[derive(Debug, Clone)]
pub struct ActBuf {
    act: ActType,
    k: usize,
    rows: usize,
    // u32 words keep every block 4-byte aligned.
    words: Vec<u32>,
    // Q8_0 only: the sum of each block's codes, which the prefill panels
    // need to take the weights' code offset back out (Q8_1 and Q8_K carry
    // their sums in the block, as ggml's do).
    sums: Vec<i32>,
}

impl ActBuf {
    /// A buffer for up to `max_rows` rows of `k` values; `k` must be whole blocks.
    pub fn new(act: ActType, k: usize, max_rows: usize) -> ActBuf {
        assert!(
            k.is_multiple_of(act.block_len()),
            "{act:?} activations need whole blocks of {}, got {k}",
            act.block_len()
        );
        ActBuf {
            act,
            k,
            rows: 0,
            words: vec![0; act.row_words(k) * max_rows],
            sums: vec![0; Self::row_sums(act, k) * max_rows],
        }
    }

    /// Block sums kept per row (Q8_0 only).
    fn row_sums(act: ActType, k: usize) -> usize {
        if act == ActType::Q8_0 {
            k / 32
        } else {
            0
        }
    }

    /// The format.
    pub fn act_type(&self) -> ActType {
        self.act
    }

    /// Values per row.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Rows held.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Rows that fit without reallocating.
    pub fn capacity(&self) -> usize {
        self.words.len() / self.act.row_words(self.k).max(1)
    }

    /// Round `x` (rows of `k`) into the buffer, replacing what it held. Grows
    /// only if `x` has more rows than the buffer was made for.
    pub fn quantize(&mut self, x: &[f32]) {
        let k = self.k;
        assert!(x.len().is_multiple_of(k), "activation rows of {k}");
        let rows = x.len() / k;
        let rw = self.act.row_words(k);
        if self.words.len() < rows * rw {
            self.words.resize(rows * rw, 0);
        }
        let rs = Self::row_sums(self.act, k);
        if self.sums.len() < rows * rs {
            self.sums.resize(rows * rs, 0);
        }
        self.rows = rows;
        for (i, xr) in x.chunks_exact(k).enumerate() {
            let dst = &mut self.words[i * rw..(i + 1) * rw];
            match self.act {
                ActType::F32 => {
                    for (d, &v) in dst.iter_mut().zip(xr) {
                        *d = v.to_bits();
                    }
                }
                ActType::Q8_0 => {
                    // SAFETY: `dst` holds exactly k/32 ActQ8_0 (36 bytes, align 4).
                    let blocks = unsafe { cast_mut::<ActQ8_0>(dst) };
                    let sums = &mut self.sums[i * rs..(i + 1) * rs];
                    for ((b, xs), s) in blocks.iter_mut().zip(xr.chunks_exact(32)).zip(sums) {
                        quantize_q8_0(xs, b);
                        *s = b.qs.iter().map(|&q| q as i32).sum();
                    }
                }
                ActType::Q8_1 => {
                    // SAFETY: as above, for ActQ8_1.
                    let blocks = unsafe { cast_mut::<ActQ8_1>(dst) };
                    for (b, xs) in blocks.iter_mut().zip(xr.chunks_exact(32)) {
                        quantize_q8_1(xs, b);
                    }
                }
                ActType::Q8K => {
                    // SAFETY: as above, for ActQ8K.
                    let blocks = unsafe { cast_mut::<ActQ8K>(dst) };
                    for (b, xs) in blocks.iter_mut().zip(xr.chunks_exact(QK_K)) {
                        quantize_q8k(xs, b);
                    }
                }
            }
        }
    }

    fn row_words(&self, i: usize) -> &[u32] {
        assert!(i < self.rows, "activation row {i} of {}", self.rows);
        let rw = self.act.row_words(self.k);
        &self.words[i * rw..(i + 1) * rw]
    }

    /// Row `i` as f32 (for [`ActType::F32`]).
    pub fn f32_row(&self, i: usize) -> &[f32] {
        assert_eq!(self.act, ActType::F32);
        // SAFETY: f32 and u32 have the same size and alignment.
        unsafe { cast::<f32>(self.row_words(i)) }
    }

    /// Row `i` as Q8_0 blocks.
    pub fn q8_0_row(&self, i: usize) -> &[ActQ8_0] {
        assert_eq!(self.act, ActType::Q8_0);
        // SAFETY: the row holds whole ActQ8_0 blocks, 4-byte aligned.
        unsafe { cast::<ActQ8_0>(self.row_words(i)) }
    }

    /// The code sums of row `i`'s Q8_0 blocks.
    pub fn q8_0_sums(&self, i: usize) -> &[i32] {
        assert_eq!(self.act, ActType::Q8_0);
        assert!(i < self.rows, "activation row {i} of {}", self.rows);
        let rs = self.k / 32;
        &self.sums[i * rs..(i + 1) * rs]
    }

    /// Row `i` as Q8_1 blocks.
    pub fn q8_1_row(&self, i: usize) -> &[ActQ8_1] {
        assert_eq!(self.act, ActType::Q8_1);
        // SAFETY: as above.
        unsafe { cast::<ActQ8_1>(self.row_words(i)) }
    }

    /// Row `i` as Q8_K blocks.
    pub fn q8k_row(&self, i: usize) -> &[ActQ8K] {
        assert_eq!(self.act, ActType::Q8K);
        // SAFETY: as above.
        unsafe { cast::<ActQ8K>(self.row_words(i)) }
    }

    /// Row `i` widened back to f32 (the values the kernels multiply), for tests.
    pub fn dequantize_row(&self, i: usize) -> Vec<f32> {
        match self.act {
            ActType::F32 => self.f32_row(i).to_vec(),
            ActType::Q8_0 => self
                .q8_0_row(i)
                .iter()
                .flat_map(|b| b.qs.map(|q| b.d * q as f32))
                .collect(),
            ActType::Q8_1 => self
                .q8_1_row(i)
                .iter()
                .flat_map(|b| b.qs.map(|q| b.d * q as f32))
                .collect(),
            ActType::Q8K => self
                .q8k_row(i)
                .iter()
                .flat_map(|b| b.qs.map(|q| b.d * q as f32))
                .collect(),
        }
    }
}

/// # Safety
/// `T` must be plain old data, at most 4-aligned, and `words` must hold a whole number of `T`.
unsafe fn cast<T>(words: &[u32]) -> &[T] {
    let bytes = std::mem::size_of_val(words);
    std::slice::from_raw_parts(words.as_ptr() as *const T, bytes / std::mem::size_of::<T>())
}

/// # Safety
/// As [`cast`].
unsafe fn cast_mut<T>(words: &mut [u32]) -> &mut [T] {
    let bytes = std::mem::size_of_val(words);
    std::slice::from_raw_parts_mut(
        words.as_mut_ptr() as *mut T,
        bytes / std::mem::size_of::<T>(),
    )
}

fn f16_round(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// ggml's `quantize_row_q8_0_ref`: d = amax / 127, q = round(x / d) (half away from zero).
fn q8_codes(xs: &[f32], qs: &mut [i8; 32]) -> f32 {
    // SAFETY: the tier was detected on this CPU; `xs` holds 32 values (its
    // callers chunk by 32).
    unsafe { (Isa::detect().kernels().q8_codes)(xs, qs) }
}

/// The portable [`q8_codes`].
pub(crate) fn q8_codes_scalar(xs: &[f32], qs: &mut [i8; 32]) -> f32 {
    let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (q, &v) in qs.iter_mut().zip(xs) {
        *q = round_half_away(v * id) as i8;
    }
    d
}

/// [`q8_codes`] in eight lanes (the same integers: the same d and 1/d, and
/// [`round_half_away`] lane by lane); the scalar loop was 8% of a prefill.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn q8_codes_avx2(xs: &[f32], qs: &mut [i8; 32]) -> f32 {
    use std::arch::x86_64::*;
    assert!(xs.len() >= 32);
    let p = xs.as_ptr();
    let v = [0, 8, 16, 24].map(|i| _mm256_loadu_ps(p.add(i)));
    let abs = _mm256_set1_ps(f32::from_bits(0x7fff_ffff));
    let m = v.iter().fold(_mm256_setzero_ps(), |m, &x| {
        _mm256_max_ps(m, _mm256_and_ps(x, abs))
    });
    let mut l = [0f32; 8];
    _mm256_storeu_ps(l.as_mut_ptr(), m);
    let amax = l.iter().fold(0f32, |a, &b| a.max(b));
    let d = amax / 127.0;
    let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
    let (half, nhalf) = (_mm256_set1_ps(0.5), _mm256_set1_ps(-0.5));
    let r = v.map(|x| {
        let y = _mm256_mul_ps(x, id);
        let i = _mm256_cvttps_epi32(y);
        let f = _mm256_sub_ps(y, _mm256_cvtepi32_ps(i));
        let up = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GE_OQ>(f, half));
        let down = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LE_OQ>(f, nhalf));
        // Masks are -1 where true.
        _mm256_add_epi32(_mm256_sub_epi32(i, up), down)
    });
    // i32 -> i16 -> i8 packs work within 128-bit lanes; the permute puts
    // the four 8-byte pieces back in order.
    let w = _mm256_packs_epi16(
        _mm256_packs_epi32(r[0], r[1]),
        _mm256_packs_epi32(r[2], r[3]),
    );
    let w = _mm256_permutevar8x32_epi32(w, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(qs.as_mut_ptr() as *mut __m256i, w);
    d
}

// `f32::round` and `round_ties_even` are library calls on baseline x86-64
// (no SSE4.1), one per activation: 11% of a SmolLM2 prefill. These give the
// same integers for |y| < 2^31 with a truncating conversion, and vectorise.

/// `y.round()` (half away from zero) as an integer.
#[inline(always)]
fn round_half_away(y: f32) -> i32 {
    let i = y as i32;
    let f = y - i as f32;
    i + (f >= 0.5) as i32 - (f <= -0.5) as i32
}

/// `y.round_ties_even()` as an integer.
#[inline(always)]
fn round_half_even(y: f32) -> i32 {
    let i = y as i32;
    let f = y - i as f32;
    let odd = i & 1 != 0;
    i + ((f > 0.5) | (f == 0.5 && odd)) as i32 - ((f < -0.5) | (f == -0.5 && odd)) as i32
}

fn quantize_q8_0(xs: &[f32], b: &mut ActQ8_0) {
    let d = q8_codes(xs, &mut b.qs);
    b.d = f16_round(d);
}

fn quantize_q8_1(xs: &[f32], b: &mut ActQ8_1) {
    let d = q8_codes(xs, &mut b.qs);
    let sum: i32 = b.qs.iter().map(|&q| q as i32).sum();
    b.d = f16_round(d);
    // ggml rounds the unrounded d times the sum through f16.
    b.s = f16_round(sum as f32 * d);
}

/// ggml's `quantize_row_q8_K_ref`: the scale comes from the signed value of
/// largest magnitude, codes round half to even (its `nearest_int`), clamped at 127.
fn quantize_q8k(xs: &[f32], b: &mut ActQ8K) {
    // SAFETY: the tier was detected on this CPU; `xs` holds QK_K values.
    unsafe { (Isa::detect().kernels().quantize_q8k)(xs, b) }
}

/// The SIMD tiers' step from `amax`, the largest |x| of the super-block, to
/// the scalar path's scale: `-127 / x` for the first `x` with |x| = amax (the
/// one the scalar loop keeps); None, with `b` zeroed, when amax is 0.
#[inline]
pub(crate) fn q8k_iscale(xs: &[f32], amax: f32, b: &mut ActQ8K) -> Option<f32> {
    if amax == 0.0 {
        b.d = 0.0;
        b.qs = [0; QK_K];
        b.bsums = [0; QK_K / 16];
        return None;
    }
    let max = xs[..QK_K]
        .iter()
        .copied()
        .find(|x| x.abs() == amax)
        .unwrap_or(amax);
    Some(-127.0 / max)
}

/// The portable [`quantize_q8k`].
pub(crate) fn quantize_q8k_scalar(xs: &[f32], b: &mut ActQ8K) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &x in xs {
        if x.abs() > amax {
            amax = x.abs();
            max = x;
        }
    }
    if amax == 0.0 {
        b.d = 0.0;
        b.qs = [0; QK_K];
        b.bsums = [0; QK_K / 16];
        return;
    }
    let iscale = -127.0 / max;
    for (q, &x) in b.qs.iter_mut().zip(xs) {
        *q = round_half_even(iscale * x).min(127) as i8;
    }
    for (s, g) in b.bsums.iter_mut().zip(b.qs.chunks_exact(16)) {
        *s = g.iter().map(|&q| q as i16).sum();
    }
    b.d = 1.0 / iscale;
}

/// [`quantize_q8k`] in eight lanes: the same largest magnitude (the first
/// value that has it gives the sign), the same scale, and `vroundps` rounds
/// half to even as `nearest_int` does. The scalar loop was 8% of a K-quant
/// prefill.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn quantize_q8k_avx2(xs: &[f32], b: &mut ActQ8K) {
    use std::arch::x86_64::*;
    assert!(xs.len() >= QK_K);
    let p = xs.as_ptr();
    let abs = _mm256_set1_ps(f32::from_bits(0x7fff_ffff));
    let mut m = _mm256_setzero_ps();
    for c in 0..QK_K / 8 {
        // max(|x|, m) keeps m where |x| is NaN, as the scalar `>` does.
        m = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(p.add(8 * c)), abs), m);
    }
    let mut l = [0f32; 8];
    _mm256_storeu_ps(l.as_mut_ptr(), m);
    let amax = l.iter().fold(0f32, |a, &v| a.max(v));
    let Some(iscale) = q8k_iscale(xs, amax, b) else {
        return;
    };
    let is = _mm256_set1_ps(iscale);
    let top = _mm256_set1_epi32(127);
    for c in 0..QK_K / 32 {
        let r: [__m256i; 4] = std::array::from_fn(|j| {
            let y = _mm256_mul_ps(is, _mm256_loadu_ps(p.add(32 * c + 8 * j)));
            let y = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(y);
            // NaN becomes 0, as `as i32` makes it.
            let y = _mm256_and_ps(y, _mm256_cmp_ps::<_CMP_ORD_Q>(y, y));
            _mm256_min_epi32(_mm256_cvtps_epi32(y), top)
        });
        let w = _mm256_packs_epi16(
            _mm256_packs_epi32(r[0], r[1]),
            _mm256_packs_epi32(r[2], r[3]),
        );
        let w = _mm256_permutevar8x32_epi32(w, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(b.qs.as_mut_ptr().add(32 * c) as *mut __m256i, w);
    }
    for (s, g) in b.bsums.iter_mut().zip(b.qs.chunks_exact(16)) {
        *s = g.iter().map(|&q| q as i16).sum();
    }
    b.d = 1.0 / iscale;
}

/// [`q8_codes`] with NEON (every aarch64 CPU), the same integers: the same
/// amax (a block with a NaN goes to the scalar path), d and 1/d, and `fcvtas`
/// rounds half away from zero as [`round_half_away`] does (NaN to 0); the
/// narrowing `xtn` wraps as `as i8` does.
///
/// # Safety
/// None beyond NEON; `xs` must hold 32 values (checked).
#[cfg(target_arch = "aarch64")]
pub(crate) unsafe fn q8_codes_neon(xs: &[f32], qs: &mut [i8; 32]) -> f32 {
    use std::arch::aarch64::*;
    assert!(xs.len() >= 32);
    let p = xs.as_ptr();
    let v: [float32x4_t; 8] = std::array::from_fn(|i| vld1q_f32(p.add(4 * i)));
    let m = v
        .iter()
        .fold(vdupq_n_f32(0.0), |m, &x| vmaxq_f32(m, vabsq_f32(x)));
    let amax = vmaxvq_f32(m);
    if amax.is_nan() {
        // `fmax` keeps NaNs where `f32::max` skips them: rare, so the
        // portable path decides.
        return q8_codes_scalar(xs, qs);
    }
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let r = v.map(|x| vcvtaq_s32_f32(vmulq_n_f32(x, id)));
    let h: [int16x8_t; 4] =
        std::array::from_fn(|j| vmovn_high_s32(vmovn_s32(r[2 * j]), r[2 * j + 1]));
    let b0 = vmovn_high_s16(vmovn_s16(h[0]), h[1]);
    let b1 = vmovn_high_s16(vmovn_s16(h[2]), h[3]);
    vst1q_s8(qs.as_mut_ptr(), b0);
    vst1q_s8(qs.as_mut_ptr().add(16), b1);
    d
}

/// [`quantize_q8k`] with NEON: the same largest magnitude (a block with a
/// NaN goes to the scalar path; the first value that has it gives the
/// sign), the same scale, `fcvtns` rounds half to even as `nearest_int`
/// does (NaN to 0), and `saddlv` sums each group of sixteen codes.
///
/// # Safety
/// None beyond NEON; `xs` must hold QK_K values (checked).
#[cfg(target_arch = "aarch64")]
pub(crate) unsafe fn quantize_q8k_neon(xs: &[f32], b: &mut ActQ8K) {
    use std::arch::aarch64::*;
    assert!(xs.len() >= QK_K);
    let p = xs.as_ptr();
    let mut m = [vdupq_n_f32(0.0); 4];
    for c in 0..QK_K / 16 {
        for (j, m) in m.iter_mut().enumerate() {
            *m = vmaxq_f32(*m, vabsq_f32(vld1q_f32(p.add(16 * c + 4 * j))));
        }
    }
    let amax = vmaxvq_f32(vmaxq_f32(vmaxq_f32(m[0], m[1]), vmaxq_f32(m[2], m[3])));
    if amax.is_nan() {
        // `fmax` keeps NaNs where the scalar `>` skips them: rare, so the
        // portable path decides.
        return quantize_q8k_scalar(xs, b);
    }
    let Some(iscale) = q8k_iscale(xs, amax, b) else {
        return;
    };
    let top = vdupq_n_s32(127);
    for c in 0..QK_K / 16 {
        let r: [int32x4_t; 4] = std::array::from_fn(|j| {
            let y = vmulq_n_f32(vld1q_f32(p.add(16 * c + 4 * j)), iscale);
            vminq_s32(vcvtnq_s32_f32(y), top)
        });
        let lo = vmovn_high_s32(vmovn_s32(r[0]), r[1]);
        let hi = vmovn_high_s32(vmovn_s32(r[2]), r[3]);
        let q = vmovn_high_s16(vmovn_s16(lo), hi);
        vst1q_s8(b.qs.as_mut_ptr().add(16 * c), q);
        b.bsums[c] = vaddlvq_s8(q);
    }
    b.d = 1.0 / iscale;
}

/// The NEON paths on what the shared tests do not feed them.
#[cfg(all(test, target_arch = "aarch64"))]
mod neon_tests {
    use super::*;

    /// NaN, infinities and codes near ±127.5, bit for bit with scalar.
    #[test]
    fn odd_values_match_scalar() {
        let mut x: Vec<f32> = (0..QK_K).map(|i| (i as f32 - 128.0) * 0.999).collect();
        let cases: [(usize, f32); 4] = [
            (7, f32::NAN),
            (40, f32::INFINITY),
            (70, f32::NEG_INFINITY),
            (100, -1.0e-45),
        ];
        for (i, v) in cases {
            for n in [0, 1] {
                let mut y = x.clone();
                if n == 1 {
                    y[i] = v;
                }
                for xs in y.chunks_exact(32) {
                    let (mut a, mut b) = ([0i8; 32], [0i8; 32]);
                    let d = q8_codes_scalar(xs, &mut a);
                    // SAFETY: NEON is baseline on aarch64; 32 values.
                    let e = unsafe { q8_codes_neon(xs, &mut b) };
                    assert_eq!((d.to_bits(), a), (e.to_bits(), b), "{v} at {i}");
                }
                let z = ActQ8K {
                    d: 0.0,
                    qs: [0; QK_K],
                    bsums: [0; QK_K / 16],
                };
                let (mut a, mut b) = (z, z);
                quantize_q8k_scalar(&y, &mut a);
                // SAFETY: as above; QK_K values.
                unsafe { quantize_q8k_neon(&y, &mut b) };
                assert_eq!(
                    (a.d.to_bits(), a.qs, a.bsums),
                    (b.d.to_bits(), b.qs, b.bsums),
                    "{v} at {i}"
                );
            }
        }
        x.iter_mut().for_each(|v| *v = -*v);
        let (mut a, mut b) = ([0i8; 32], [0i8; 32]);
        // SAFETY: as above.
        let e = unsafe { q8_codes_neon(&x[..32], &mut b) };
        assert_eq!(q8_codes_scalar(&x[..32], &mut a).to_bits(), e.to_bits());
        assert_eq!(a, b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8k_simd_equals_scalar() {
        let mut x: Vec<f32> = (0..QK_K * 6)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 0.0031)
            .collect();
        // A negative extreme, exact ties, a zero block, a NaN.
        x[..QK_K]
            .iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = i as f32 * 0.5 - 127.0);
        x[QK_K..2 * QK_K].iter_mut().for_each(|v| *v = 0.0);
        x[2 * QK_K + 5] = f32::NAN;
        for xs in x.chunks_exact(QK_K) {
            let mut a = ActQ8K {
                d: 0.0,
                qs: [0; QK_K],
                bsums: [0; QK_K / 16],
            };
            let mut b = a;
            // Every tier this CPU runs, each bit-identical to the reference.
            let tiers: Vec<(Isa, ActQ8K)> = Isa::detect()
                .tiers()
                .into_iter()
                .map(|isa| {
                    let mut t = a;
                    // SAFETY: the tier was detected here; xs holds QK_K values.
                    unsafe { (isa.kernels().quantize_q8k)(xs, &mut t) };
                    (isa, t)
                })
                .collect();
            quantize_q8k(xs, &mut a);
            // The scalar reference, inline.
            let (mut amax, mut max) = (0f32, 0f32);
            for &v in xs {
                if v.abs() > amax {
                    amax = v.abs();
                    max = v;
                }
            }
            if amax != 0.0 {
                let iscale = -127.0 / max;
                for (q, &v) in b.qs.iter_mut().zip(xs) {
                    *q = ((iscale * v).round_ties_even() as i32).min(127) as i8;
                }
                for (s, g) in b.bsums.iter_mut().zip(b.qs.chunks_exact(16)) {
                    *s = g.iter().map(|&q| q as i16).sum();
                }
                b.d = 1.0 / iscale;
            }
            assert_eq!(
                (a.d.to_bits(), a.qs, a.bsums),
                (b.d.to_bits(), b.qs, b.bsums)
            );
            for (isa, t) in tiers {
                assert_eq!(
                    (t.d.to_bits(), t.qs, t.bsums),
                    (b.d.to_bits(), b.qs, b.bsums),
                    "{isa}"
                );
            }
        }
    }

    #[test]
    fn q8_codes_simd_equals_scalar() {
        let mut x: Vec<f32> = (0..32 * 64)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 0.0031)
            .collect();
        // Ties at the scale: amax 127 makes d = 1 and x.5 values exact ties.
        x[..32]
            .iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = i as f32 * 4.5 - 70.0);
        x[0] = 127.0;
        x[32..64].iter_mut().for_each(|v| *v = 0.0);
        for xs in x.chunks_exact(32) {
            let (mut a, mut b) = ([0i8; 32], [0i8; 32]);
            let d = q8_codes(xs, &mut a);
            assert_eq!(d, xs.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0);
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            for (q, &v) in b.iter_mut().zip(xs) {
                *q = (v * id).round() as i8;
            }
            assert_eq!(a, b);
            // Every tier this CPU runs, each bit-identical to the reference.
            for isa in Isa::detect().tiers() {
                let mut t = [0i8; 32];
                // SAFETY: the tier was detected here; xs holds 32 values.
                let dt = unsafe { (isa.kernels().q8_codes)(xs, &mut t) };
                assert_eq!((dt.to_bits(), t), (d.to_bits(), b), "{isa}");
            }
        }
    }

    #[test]
    fn integer_rounding_equals_the_library() {
        let mut v: Vec<f32> = (-2000..=2000).map(|i| i as f32 * 0.25).collect();
        v.extend([0.49999997, -0.49999997, 126.5, -127.5, 1e-30, -0.0, 127.0]);
        for y in v {
            assert_eq!(round_half_away(y), y.round() as i32, "{y}");
            assert_eq!(round_half_even(y), y.round_ties_even() as i32, "{y}");
        }
    }

    #[test]
    fn rounding_matches_ggml_reference() {
        let x: Vec<f32> = (0..256)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
            .collect();
        let mut q0 = ActBuf::new(ActType::Q8_0, 256, 1);
        q0.quantize(&x);
        let b = &q0.q8_0_row(0)[0];
        // amax of the first block is 50 * 0.013 = 0.65 (i = 79 gives 0? check by hand below).
        let amax = x[..32].iter().fold(0f32, |m, v| m.max(v.abs()));
        assert_eq!(b.d, f16::from_f32(amax / 127.0).to_f32());
        let mut qk = ActBuf::new(ActType::Q8K, 256, 1);
        qk.quantize(&x);
        let k = &qk.q8k_row(0)[0];
        assert_eq!(
            k.bsums[0],
            k.qs[..16].iter().map(|&q| q as i16).sum::<i16>()
        );
        let back = qk.dequantize_row(0);
        for (a, b) in back.iter().zip(&x) {
            assert!((a - b).abs() <= k.d.abs() * 0.5 + 1e-6);
        }
        let zero = vec![0f32; 256];
        qk.quantize(&zero);
        assert_eq!(qk.q8k_row(0)[0].d, 0.0);
    }
}

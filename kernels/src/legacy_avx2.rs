//! AVX2+FMA kernels for the 32-weight block types, chosen at run time, for
//! decode and batches of fewer rows than the prefill panels take
//! (`panel_avx2`).
//!
//! One micro-kernel, generic over the type and the tile (MR activation rows
//! by NR weight rows), does all the work: each weight block is unpacked once
//! per tile and multiplied with every activation row of the tile, each
//! activation block is loaded once and serves every weight row. Every output
//! element has its own accumulator and sees the same operations in the same
//! order whatever the tile, so a product is bit-identical computed in a tile
//! or alone.
//!
//! Per block the integer dot product is exact in 16-bit pairs (maddubs), then
//! summed to eight i32 lanes (madd), converted and scaled into an f32
//! accumulator, as ggml's AVX2 `ggml_vec_dot_*` do.

use std::arch::x86_64::*;
use std::ops::Range;

use crate::rows8_avx2::{decode_rows, reduce8, Ctx};
use crate::{ActBuf, Out, WType, Weights};

use crate::act::act_block;
use crate::code::{has_min, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0};
use crate::legacy::offset;

/// See [`crate::gemm`]; the caller has checked AVX2, FMA and F16C.
///
/// # Safety
/// As [`crate::gemm`], on a CPU with AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn gemm(w: &Weights, rows: Range<usize>, acts: &ActBuf, out: Out) {
    match w.wtype {
        WType::Q4_0 => gemm_t::<Q4_0>(w, rows, acts, out),
        WType::Q4_1 => gemm_t::<Q4_1>(w, rows, acts, out),
        WType::Q5_0 => gemm_t::<Q5_0>(w, rows, acts, out),
        WType::Q5_1 => gemm_t::<Q5_1>(w, rows, acts, out),
        WType::Q8_0 => gemm_t::<Q8_0>(w, rows, acts, out),
        t => unreachable!("{t:?} is not a legacy block type"),
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemm_t<const T: u8>(w: &Weights, rows: Range<usize>, acts: &ActBuf, out: Out) {
    let ctx = Ctx::new(w, out);
    let m = acts.rows();
    if m == 0 || rows.is_empty() {
        return;
    }
    let arow = |i: usize| -> *const u8 {
        if has_min(T) {
            acts.q8_1_row(i).as_ptr() as *const u8
        } else {
            acts.q8_0_row(i).as_ptr() as *const u8
        }
    };
    if m == 1 {
        let sums = if has_min(T) {
            std::ptr::null()
        } else {
            acts.q8_0_sums(0).as_ptr()
        };
        let a = arow(0);
        decode_rows(
            rows,
            w.n,
            out.ptr,
            |g0, dst| rows8::<T>(ctx, g0, a, sums, dst),
            |rest| sweep::<T, 1>(ctx, rest, 0, [a]),
        );
        return;
    }
    // Short batches; from panel_avx2::MIN_ROWS rows on, the prefill panels
    // take over.
    let mut i0 = 0;
    while i0 < m {
        let a = |j: usize| arow(i0 + j);
        match m - i0 {
            1 => sweep::<T, 1>(ctx, rows.clone(), i0, [a(0)]),
            2 => sweep::<T, 2>(ctx, rows.clone(), i0, [a(0), a(1)]),
            _ => sweep::<T, 3>(ctx, rows.clone(), i0, [a(0), a(1), a(2)]),
        }
        i0 += (m - i0).min(3);
    }
}

/// Eight weight rows from `r0` times one activation row, into `dst[0..8]`.
/// Per block, each row's exact integer dot product (unsigned codes; the
/// offset comes back out with the activation's code sum) is reduced across
/// its lanes so that lane j holds row j's: then the scales of all eight rows
/// (one gather) meet it in one multiply-add, where a row at a time spends a
/// conversion and a multiply-add per row and block (SmolLM2 q4_0 decode,
/// one thread: see the README). Summed as ggml does: `d_w d_x sumi` per block.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows8<const T: u8>(ctx: Ctx, r0: usize, a: *const u8, sums: *const i32, dst: *mut f32) {
    let (ab, aq) = act_block(T);
    let ones = _mm256_set1_epi16(1);
    let (base, rs, bs) = ctx.rows.group(r0);
    // The low 16 bits of each gathered word (d), then the high (m), packed.
    let low16 = _mm256_setr_epi8(
        0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1, 0, 1, 4, 5, 8, 9, 12, 13, -1, -1,
        -1, -1, -1, -1, -1, -1,
    );
    let high16 = _mm256_setr_epi8(
        2, 3, 6, 7, 10, 11, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1, 2, 3, 6, 7, 10, 11, 14, 15, -1,
        -1, -1, -1, -1, -1, -1, -1,
    );
    let halves = |v: __m256i, pick: __m256i| -> __m256 {
        let p = _mm256_permute4x64_epi64::<0b1000>(_mm256_shuffle_epi8(v, pick));
        _mm256_cvtph_ps(_mm256_castsi256_si128(p))
    };
    let mut acc = _mm256_setzero_ps();
    let mut accm = _mm256_setzero_ps();
    for b in 0..ctx.nb {
        let pa = a.add(b * ab);
        let qx = _mm256_loadu_si256(pa.add(aq) as *const __m256i);
        let wb = base.add(b * bs);
        let mut s = [_mm256_setzero_si256(); 8];
        for (j, sj) in s.iter_mut().enumerate() {
            let q = codes::<T>(wb.add(j * rs));
            let p16 = if T == Q8_0 {
                _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(qx, q))
            } else {
                // Unsigned codes below 32 times activations: no saturation.
                _mm256_maddubs_epi16(q, qx)
            };
            *sj = _mm256_madd_epi16(p16, ones);
        }
        let mut v = reduce8(s);
        if offset(T) != 0 {
            v = _mm256_sub_epi32(v, _mm256_set1_epi32(offset(T) * *sums.add(b)));
        }
        let wd = |j: usize| (wb.add(j * rs) as *const i32).read_unaligned();
        let words = _mm256_setr_epi32(wd(0), wd(1), wd(2), wd(3), wd(4), wd(5), wd(6), wd(7));
        let dw = halves(words, low16);
        let dx = _mm256_broadcast_ss(&*(pa as *const f32));
        acc = _mm256_fmadd_ps(_mm256_mul_ps(dw, dx), _mm256_cvtepi32_ps(v), acc);
        if has_min(T) {
            let mw = halves(words, high16);
            accm = _mm256_fmadd_ps(mw, _mm256_broadcast_ss(&*(pa.add(4) as *const f32)), accm);
        }
    }
    _mm256_storeu_ps(dst, _mm256_add_ps(acc, accm));
}

/// Activation rows `a` (output rows `i0..i0 + MR`) against weight rows `rows`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn sweep<const T: u8, const MR: usize>(
    ctx: Ctx,
    rows: Range<usize>,
    i0: usize,
    a: [*const u8; MR],
) {
    // One weight row per pass. Several rows sharing each activation block
    // win while the weights are in cache, but decode streams the whole model
    // from memory, and there one row at a time streams fastest (one thread,
    // 120 matrices of 576x1536: Q8_0 18-23 GB/s against 5 with four rows;
    // SmolLM2 q4_0 decode 86 -> 124 t/s on one thread).
    for r in rows {
        let (w, bs) = ctx.rows.row(r);
        tile::<T, MR>(ctx, w, bs, a, i0, r);
    }
}

/// 16 packed bytes to 32 codes: low nibbles (elements 0..16), then high.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibbles(p: *const u8) -> __m256i {
    let both = _mm256_broadcastsi128_si256(_mm_loadu_si128(p as *const __m128i));
    // A 64-bit shift leaks the next byte's low nibble into the high one,
    // which the mask drops: one shift for the upper half instead of two ops.
    let shifted = _mm256_srlv_epi64(both, _mm256_set_epi64x(4, 4, 0, 0));
    _mm256_and_si256(shifted, _mm256_set1_epi8(0x0F))
}

/// Bit j of the little-endian u32 at `p` as 0x10 in byte j.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fifth_bits(p: *const u8) -> __m256i {
    let x = _mm256_set1_epi32((p as *const i32).read_unaligned());
    let spread = _mm256_shuffle_epi8(
        x,
        _mm256_set_epi64x(
            0x0303030303030303,
            0x0202020202020202,
            0x0101010101010101,
            0x0000000000000000,
        ),
    );
    // Each byte keeps all bits but its own; it is all ones iff its bit was set.
    let set = _mm256_cmpeq_epi8(
        _mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe)),
        _mm256_set1_epi64x(-1),
    );
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}

/// A weight block's scale, broadcast, and its minimum (0 without one).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scales<const T: u8>(p: *const u8) -> (__m256, f32) {
    let d = _mm256_cvtph_ps(_mm_set1_epi16((p as *const i16).read_unaligned()));
    let m = if has_min(T) {
        let bits = (p.add(2) as *const u16).read_unaligned();
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    } else {
        0.0
    };
    (d, m)
}

/// A weight block's codes: unsigned (before the offset) for the 4- and
/// 5-bit types, signed for Q8_0.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn codes<const T: u8>(p: *const u8) -> __m256i {
    match T {
        Q4_0 => nibbles(p.add(2)),
        Q4_1 => nibbles(p.add(4)),
        Q5_0 => _mm256_or_si256(nibbles(p.add(6)), fifth_bits(p.add(2))),
        Q5_1 => _mm256_or_si256(nibbles(p.add(8)), fifth_bits(p.add(4))),
        _ => _mm256_loadu_si256(p.add(2) as *const __m256i),
    }
}

/// Sum of the eight lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum(acc: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// The products of activation rows `a` with the weight row whose blocks
/// start at `w`, `bs` bytes apart, written to output rows `i0..` of column `r`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile<const T: u8, const MR: usize>(
    ctx: Ctx,
    w: *const u8,
    bs: usize,
    a: [*const u8; MR],
    i0: usize,
    r: usize,
) {
    let (ab, aq) = act_block(T);
    let ones = _mm256_set1_epi16(1);
    let off = _mm256_set1_epi8(offset(T) as i8);
    let mut acc = [_mm256_setzero_ps(); MR];
    let mut summ = [0f32; MR];
    for b in 0..ctx.nb {
        let p = w.add(b * bs);
        let (dw, mw) = scales::<T>(p);
        let qw = codes::<T>(p);
        // Signed codes for the sign trick (maddubs takes u8 x i8).
        let sw = if offset(T) != 0 {
            _mm256_sub_epi8(qw, off)
        } else {
            qw
        };
        let aw = _mm256_sign_epi8(sw, sw);
        for i in 0..MR {
            let pa = a[i].add(b * ab);
            let qx = _mm256_loadu_si256(pa.add(aq) as *const __m256i);
            let p16 = if has_min(T) {
                _mm256_maddubs_epi16(qw, qx)
            } else {
                _mm256_maddubs_epi16(aw, _mm256_sign_epi8(qx, sw))
            };
            let dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
            let da = _mm256_broadcast_ss(&*(pa as *const f32));
            acc[i] = _mm256_fmadd_ps(_mm256_mul_ps(dw, da), dot, acc[i]);
            if has_min(T) {
                let s = (pa.add(4) as *const f32).read();
                summ[i] = mw.mul_add(s, summ[i]);
            }
        }
    }
    for i in 0..MR {
        *ctx.out.ptr.add((i0 + i) * ctx.out.ld + r) = hsum(acc[i]) + summ[i];
    }
}

//! AVX2+FMA kernels for the K-quant types, chosen at run time, for decode
//! and batches of fewer rows than the prefill panels take (`panel_avx2`,
//! which also unpacks its super-blocks with [`unpack`]).
//!
//! Every type unpacks a super-block to one shape (see [`Unpacked`]): eight
//! vectors of 32 unsigned codes, eight vectors of 16-bit group scales (one
//! group of 16 per 128-bit half), and 16-bit coefficients that meet the
//! activations' group sums `bsums` (the code offsets of Q3_K and Q6_K, the
//! minimums of Q2_K, Q4_K and Q5_K). The products are then the same for all:
//! maddubs (exact 16-bit pair sums), madd with the scales into eight i32
//! lanes per super-block, converted and scaled into an f32 accumulator, as
//! ggml's AVX2 `ggml_vec_dot_q*_K_q8_K` do.
//!
//! A tile is MR activation rows by one weight row: each super-block is
//! unpacked once per tile and multiplied with every activation row of it.
//! Every output element has its own accumulator and sees the same
//! operations in the same order whatever the tile, so a product is
//! bit-identical computed in a tile or alone.

use std::arch::x86_64::*;
use std::ops::Range;

use crate::act::ActQ8K;
use crate::kquants::q3k_scales;
use crate::rows8_avx2::{decode_rows, reduce8, Ctx};
use crate::{ActBuf, Out, WType, Weights};

use crate::code::{has_min, Q2K, Q3K, Q4K, Q5K, Q6K};

/// See [`crate::gemm`]; the caller has checked AVX2, FMA and F16C.
///
/// # Safety
/// As [`crate::gemm`], on a CPU with AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn gemm(w: &Weights, rows: Range<usize>, acts: &ActBuf, out: Out) {
    match w.wtype {
        WType::Q2K => gemm_t::<Q2K>(w, rows, acts, out),
        WType::Q3K => gemm_t::<Q3K>(w, rows, acts, out),
        WType::Q4K => gemm_t::<Q4K>(w, rows, acts, out),
        WType::Q5K => gemm_t::<Q5K>(w, rows, acts, out),
        WType::Q6K => gemm_t::<Q6K>(w, rows, acts, out),
        t => unreachable!("{t:?} is not a K-quant type"),
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemm_t<const T: u8>(w: &Weights, rows: Range<usize>, acts: &ActBuf, out: Out) {
    let ctx = Ctx::new(w, out);
    let m = acts.rows();
    if m == 0 || rows.is_empty() {
        return;
    }
    let arow = |i: usize| -> *const ActQ8K { acts.q8k_row(i).as_ptr() };
    if m == 1 {
        let a = arow(0);
        decode_rows(
            rows,
            w.n,
            out.ptr,
            |g0, dst| rows8::<T>(ctx, g0, a, dst),
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

/// Activation rows `a` (output rows `i0..i0 + MR`) against weight rows `rows`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn sweep<const T: u8, const MR: usize>(
    ctx: Ctx,
    rows: Range<usize>,
    i0: usize,
    a: [*const ActQ8K; MR],
) {
    for r in rows {
        let (w, bs) = ctx.rows.row(r);
        tile::<T, MR>(ctx, w, bs, a, i0, r);
    }
}

/// Eight weight rows from `r0` times one activation row, into `dst[0..8]`:
/// per super-block, each row's integer sums (codes times activations with
/// the group scales, and the offsets or minimums times the group sums) are
/// reduced so that lane j holds row j's, then scaled for all eight rows at
/// once, as ggml does per row: `d da sumi - dmin da summ`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows8<const T: u8>(ctx: Ctx, r0: usize, a: *const ActQ8K, dst: *mut f32) {
    let (base, rs, bs) = ctx.rows.group(r0);
    let mut acc = _mm256_setzero_ps();
    for b in 0..ctx.nb {
        let ab = a.add(b);
        let qa = (*ab).qs.as_ptr() as *const u8;
        let bsums = _mm256_loadu_si256((*ab).bsums.as_ptr() as *const __m256i);
        let mut s = [_mm256_setzero_si256(); 8];
        let mut m = [_mm256_setzero_si256(); 8];
        let mut d = [0f32; 8];
        let mut dmin = [0f32; 8];
        for j in 0..8 {
            let u = unpack::<T>(base.add(b * bs + j * rs));
            let mut sumi = _mm256_setzero_si256();
            for c in 0..8 {
                // As in `tile`: maddubs does not saturate.
                let p16 = _mm256_maddubs_epi16(u.q[c], ld(qa.add(32 * c)));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p16, u.sc[c]));
            }
            s[j] = sumi;
            m[j] = _mm256_madd_epi16(u.bc, bsums);
            d[j] = u.d;
            dmin[j] = u.dmin;
        }
        let (sv, mv) = (reduce8(s), reduce8(m));
        let da = _mm256_set1_ps((*ab).d);
        let dv = _mm256_mul_ps(_mm256_loadu_ps(d.as_ptr()), da);
        if has_min(T) {
            acc = _mm256_fmadd_ps(dv, _mm256_cvtepi32_ps(sv), acc);
            let dm = _mm256_mul_ps(_mm256_loadu_ps(dmin.as_ptr()), da);
            acc = _mm256_fnmadd_ps(dm, _mm256_cvtepi32_ps(mv), acc);
        } else {
            acc = _mm256_fmadd_ps(dv, _mm256_cvtepi32_ps(_mm256_sub_epi32(sv, mv)), acc);
        }
    }
    _mm256_storeu_ps(dst, acc);
}

/// One super-block ready to multiply: for element e of group g = e / 16,
/// w = d sc[g] (q[e] - off) - dmin mn[g].
pub(crate) struct Unpacked {
    /// Codes before the offset (0..=63), 32 elements per vector.
    pub(crate) q: [__m256i; 8],
    /// Vector c: the scale of group 2c in the low eight 16-bit lanes, of
    /// group 2c + 1 in the high eight (the halves maddubs pairs fall in).
    sc: [__m256i; 8],
    /// Per group of 16, what `bsums` is multiplied by: off sc (subtracted
    /// from the integer sum) without minimums, mn with them.
    bc: __m256i,
    /// Super-block scale.
    pub(crate) d: f32,
    /// Super-block scale of the minimums (zero without).
    pub(crate) dmin: f32,
}

/// The f16 at `p`, widened with F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_at(p: *const u8) -> f32 {
    let bits = (p as *const u16).read_unaligned();
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// The little-endian u32 at `p`.
#[inline(always)]
unsafe fn u32_at(p: *const u8) -> u32 {
    (p as *const u32).read_unaligned()
}

/// Scale vectors from 16 signed 8-bit group scales, given as the even
/// groups (low eight bytes) then the odd ones: vector c holds group 2c in
/// its low half and 2c + 1 in its high half. One in-lane shuffle per vector
/// (the shuffle port is what unpacking runs short of in a mat-vec).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group_scales(even_odd: __m128i) -> [__m256i; 8] {
    let words = _mm256_cvtepi8_epi16(even_odd);
    let mut sc = [_mm256_setzero_si256(); 8];
    for (c, v) in sc.iter_mut().enumerate() {
        let pick = _mm256_set1_epi16((((2 * c + 1) << 8) | (2 * c)) as i16);
        *v = _mm256_shuffle_epi8(words, pick);
    }
    sc
}

/// 16 group scales in group order, rearranged for [`group_scales`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn even_odd(s8: __m128i) -> __m128i {
    _mm_shuffle_epi8(
        s8,
        _mm_set_epi8(15, 13, 11, 9, 7, 5, 3, 1, 14, 12, 10, 8, 6, 4, 2, 0),
    )
}

/// Bits `2j..2j + 2` of each byte of `v`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn crumb(v: __m256i, j: usize) -> __m256i {
    let m3 = _mm256_set1_epi8(3);
    match j {
        0 => _mm256_and_si256(v, m3),
        1 => _mm256_and_si256(_mm256_srli_epi16::<2>(v), m3),
        2 => _mm256_and_si256(_mm256_srli_epi16::<4>(v), m3),
        _ => _mm256_and_si256(_mm256_srli_epi16::<6>(v), m3),
    }
}

/// Bit `c` of each byte of `v`, moved to bit `to` (2 or 4) of the byte.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bit_to<const TO: i32>(v: __m256i, c: usize) -> __m256i {
    // A 16-bit shift moves bits across the byte boundary only outside the
    // bit kept, so the mask leaves each byte's own bit.
    let s = c as i32 - TO;
    let moved = match s {
        -4 => _mm256_slli_epi16::<4>(v),
        -3 => _mm256_slli_epi16::<3>(v),
        -2 => _mm256_slli_epi16::<2>(v),
        -1 => _mm256_slli_epi16::<1>(v),
        0 => v,
        1 => _mm256_srli_epi16::<1>(v),
        2 => _mm256_srli_epi16::<2>(v),
        3 => _mm256_srli_epi16::<3>(v),
        4 => _mm256_srli_epi16::<4>(v),
        _ => _mm256_srli_epi16::<5>(v),
    };
    _mm256_and_si256(moved, _mm256_set1_epi8(1 << TO))
}

/// Q4_K's and Q5_K's 6-bit scales (low eight bytes) and minimums (high
/// eight) from their 12 packed bytes, with ggml's kmask words.
#[inline(always)]
unsafe fn scales_mins_k4(p: *const u8) -> (u64, u64) {
    const KMASK1: u32 = 0x3f3f_3f3f;
    const KMASK2: u32 = 0x0f0f_0f0f;
    const KMASK3: u32 = 0x0303_0303;
    let (u0, u1, u2) = (u32_at(p), u32_at(p.add(4)), u32_at(p.add(8)));
    let s0 = u0 & KMASK1;
    let s1 = (u2 & KMASK2) | (((u0 >> 6) & KMASK3) << 4);
    let m0 = u1 & KMASK1;
    let m1 = ((u2 >> 4) & KMASK2) | (((u1 >> 6) & KMASK3) << 4);
    (s0 as u64 | (s1 as u64) << 32, m0 as u64 | (m1 as u64) << 32)
}

/// The 32 bytes at `p`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn ld(p: *const u8) -> __m256i {
    _mm256_loadu_si256(p as *const __m256i)
}

/// Unpack the super-block at `p`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn unpack<const T: u8>(p: *const u8) -> Unpacked {
    let m4 = _mm256_set1_epi8(0x0F);
    match T {
        Q2K => {
            let s = _mm_loadu_si128(p as *const __m128i);
            let sc = group_scales(even_odd(_mm_and_si128(s, _mm_set1_epi8(0x0F))));
            let mn = _mm_and_si128(_mm_srli_epi16::<4>(s), _mm_set1_epi8(0x0F));
            let (q0, q1) = (ld(p.add(16)), ld(p.add(48)));
            let mut q = [_mm256_setzero_si256(); 8];
            for (c, v) in q.iter_mut().enumerate() {
                *v = crumb(if c < 4 { q0 } else { q1 }, c % 4);
            }
            Unpacked {
                q,
                sc,
                bc: _mm256_cvtepu8_epi16(mn),
                d: f16_at(p.add(80)),
                dmin: f16_at(p.add(82)),
            }
        }
        Q3K => {
            let s = q3k_scales(std::slice::from_raw_parts(p.add(96), 12));
            let s8 = _mm_sub_epi8(
                _mm_loadu_si128(s.as_ptr() as *const __m128i),
                _mm_set1_epi8(32),
            );
            let hm = ld(p.add(0));
            let (q0, q1) = (ld(p.add(32)), ld(p.add(64)));
            let mut q = [_mm256_setzero_si256(); 8];
            for (c, v) in q.iter_mut().enumerate() {
                let low = crumb(if c < 4 { q0 } else { q1 }, c % 4);
                *v = _mm256_or_si256(low, bit_to::<2>(hm, c));
            }
            Unpacked {
                q,
                sc: group_scales(even_odd(s8)),
                // Codes are stored plus 4.
                bc: _mm256_slli_epi16::<2>(_mm256_cvtepi8_epi16(s8)),
                d: f16_at(p.add(108)),
                dmin: 0.0,
            }
        }
        Q4K | Q5K => {
            let (s, m) = scales_mins_k4(p.add(4));
            // Each scale and minimum covers two groups of 16.
            let s8 = _mm_cvtsi64_si128(s as i64);
            let m8 = _mm_cvtsi64_si128(m as i64);
            let qs = if T == Q5K { 48 } else { 16 };
            let hb = ld(p.add(16));
            let mut q = [_mm256_setzero_si256(); 8];
            for (c, v) in q.iter_mut().enumerate() {
                let b = ld(p.add(qs + 32 * (c / 2)));
                let nib = if c % 2 == 0 {
                    _mm256_and_si256(b, m4)
                } else {
                    _mm256_and_si256(_mm256_srli_epi16::<4>(b), m4)
                };
                *v = if T == Q5K {
                    _mm256_or_si256(nib, bit_to::<4>(hb, c))
                } else {
                    nib
                };
            }
            Unpacked {
                q,
                // Groups 2c and 2c + 1 both take scale c.
                sc: group_scales(_mm_unpacklo_epi64(s8, s8)),
                bc: _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(m8, m8)),
                d: f16_at(p),
                dmin: f16_at(p.add(2)),
            }
        }
        _ => {
            let s8 = _mm_loadu_si128(p.add(192) as *const __m128i);
            let mut q = [_mm256_setzero_si256(); 8];
            for n in 0..2 {
                let h = ld(p.add(128 + 32 * n));
                let (l0, l1) = (ld(p.add(64 * n)), ld(p.add(64 * n + 32)));
                let m2 = _mm256_set1_epi8(0x03);
                q[4 * n] = _mm256_or_si256(
                    _mm256_and_si256(l0, m4),
                    _mm256_slli_epi16::<4>(_mm256_and_si256(h, m2)),
                );
                q[4 * n + 1] = _mm256_or_si256(
                    _mm256_and_si256(l1, m4),
                    _mm256_slli_epi16::<2>(_mm256_and_si256(h, _mm256_set1_epi8(0x0C))),
                );
                q[4 * n + 2] = _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(l0), m4),
                    _mm256_and_si256(h, _mm256_set1_epi8(0x30)),
                );
                q[4 * n + 3] = _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(l1), m4),
                    _mm256_srli_epi16::<2>(_mm256_and_si256(h, _mm256_set1_epi8(0xC0u8 as i8))),
                );
            }
            Unpacked {
                q,
                sc: group_scales(even_odd(s8)),
                // Codes are stored plus 32.
                bc: _mm256_slli_epi16::<5>(_mm256_cvtepi8_epi16(s8)),
                d: f16_at(p.add(208)),
                dmin: 0.0,
            }
        }
    }
}

/// Add to `acc` the product of super-block `u` and activation block `a`,
/// whose code products summed with the group scales are `sumi`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn finish<const T: u8>(
    u: &Unpacked,
    a: *const ActQ8K,
    sumi: __m256i,
    acc: __m256,
) -> __m256 {
    let bs = _mm256_loadu_si256((*a).bsums.as_ptr() as *const __m256i);
    let bprod = _mm256_madd_epi16(u.bc, bs);
    let da = (*a).d;
    if has_min(T) {
        let acc = _mm256_fmadd_ps(_mm256_set1_ps(u.d * da), _mm256_cvtepi32_ps(sumi), acc);
        _mm256_fnmadd_ps(_mm256_set1_ps(u.dmin * da), _mm256_cvtepi32_ps(bprod), acc)
    } else {
        let sumi = _mm256_sub_epi32(sumi, bprod);
        _mm256_fmadd_ps(_mm256_set1_ps(u.d * da), _mm256_cvtepi32_ps(sumi), acc)
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

/// The products of activation rows `a` with the weight row at `w`, written
/// to output rows `i0..` of column `r`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile<const T: u8, const MR: usize>(
    ctx: Ctx,
    w: *const u8,
    bs: usize,
    a: [*const ActQ8K; MR],
    i0: usize,
    r: usize,
) {
    let mut acc = [_mm256_setzero_ps(); MR];
    for b in 0..ctx.nb {
        let u = unpack::<T>(w.add(b * bs));
        // Row-major: one activation row's eight chunks at a time, the
        // unpacked vectors reloaded from L1 (cheaper than holding MR sums).
        for i in 0..MR {
            let ab = a[i].add(b);
            let qa = (*ab).qs.as_ptr() as *const u8;
            let mut sumi = _mm256_setzero_si256();
            for c in 0..8 {
                let x = ld(qa.add(32 * c));
                // Codes are at most 63 and activations at least -127: the
                // pair sums fit in 16 bits, maddubs does not saturate.
                let p16 = _mm256_maddubs_epi16(u.q[c], x);
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p16, u.sc[c]));
            }
            acc[i] = finish::<T>(&u, ab, sumi, acc[i]);
        }
    }
    for (i, &v) in acc.iter().enumerate() {
        *ctx.out.ptr.add((i0 + i) * ctx.out.ld + r) = hsum(v);
    }
}

//! AVX2+FMA kernels for float weights (F32, F16, BF16) with f32
//! activations, chosen at run time.
//!
//! One micro-kernel, generic over the type and the tile (MR activation rows
//! by NR weight rows), does the work: each weight vector of eight is widened
//! once per tile (F16C for f16, a 16-bit shift for bf16) and multiplied with
//! every activation row of the tile. Each output element has one accumulator
//! and follows the summation order of `float.rs` (eight lanes, the same lane
//! reduction, the same scalar tail), so a product is bit-identical computed
//! in a tile or alone; independent accumulators come from the tile itself
//! (twelve elements). Decode (one activation row) is [`dot_decode`]: one
//! weight row at a time with four accumulators, which streams fastest.

use std::arch::x86_64::*;
use std::ops::Range;

use crate::float::{f16_to_f32, prefill, tag, wbytes, BF16, F16, F32, LANES};
use crate::{ActBuf, Out, Weights};

/// Activation rows per prefill tile.
const MR_PREFILL: usize = 4;
/// Weight rows per prefill tile: 4 x 3 accumulators, three widened weight
/// vectors and one activation vector fill the sixteen ymm registers.
const NR_PREFILL: usize = 3;
/// Bytes of weights swept by every activation tile before moving on: the
/// panel stays in L2 while the tiles pass over it, each tile's activation
/// rows (4 x k f32) staying in L1 across the panel.
const PANEL_BYTES: usize = 384 << 10;

/// See [`crate::gemm`]; the caller has checked AVX2, FMA and F16C.
///
/// # Safety
/// As [`crate::gemm`], on a CPU with AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn gemm(w: &Weights, rows: Range<usize>, acts: &ActBuf, out: Out) {
    match tag(w.wtype) {
        F32 => gemm_t::<F32>(w, rows, acts, out),
        F16 => gemm_t::<F16>(w, rows, acts, out),
        _ => gemm_t::<BF16>(w, rows, acts, out),
    }
}

/// Where one tile reads and writes.
#[derive(Clone, Copy)]
struct Ctx {
    /// Row 0 of the weights.
    w: *const u8,
    /// Bytes per weight row.
    wrow: usize,
    /// Weights per row.
    k: usize,
    out: Out,
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemm_t<const T: u8>(w: &Weights, rows: Range<usize>, acts: &ActBuf, out: Out) {
    let m = acts.rows();
    if m == 0 || rows.is_empty() {
        return;
    }
    let ctx = Ctx {
        w: w.bytes.as_ptr(),
        wrow: w.k * wbytes(T),
        k: w.k,
        out,
    };
    let arow = |i: usize| acts.f32_row(i).as_ptr();
    if m == 1 {
        let a = arow(0);
        for r in rows {
            *ctx.out.ptr.add(r) = dot_decode::<T>(ctx, ctx.w.add(r * ctx.wrow), a);
        }
        return;
    }
    let wrow = ctx.wrow;
    prefill!(
        sweep::<T>,
        ctx,
        rows,
        m,
        arow,
        wrow,
        PANEL_BYTES,
        MR_PREFILL,
        NR_PREFILL
    );
}

/// Activation rows `a` (output rows `i0..i0 + MR`) against weight rows
/// `rows`, NR at a time, the rest four, two or one at a time.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn sweep<const T: u8, const MR: usize, const NR: usize>(
    ctx: Ctx,
    rows: Range<usize>,
    i0: usize,
    a: [*const f32; MR],
) {
    let wp = |r: usize| ctx.w.add(r * ctx.wrow);
    let mut r = rows.start;
    while r + NR <= rows.end {
        tile::<T, MR, NR>(ctx, std::array::from_fn(|j| wp(r + j)), a, i0, r);
        r += NR;
    }
    while r < rows.end {
        let left = rows.end - r;
        if NR > 4 && left >= 4 {
            tile::<T, MR, 4>(ctx, std::array::from_fn(|j| wp(r + j)), a, i0, r);
            r += 4;
        } else if NR > 2 && left >= 2 {
            tile::<T, MR, 2>(ctx, [wp(r), wp(r + 1)], a, i0, r);
            r += 2;
        } else {
            tile::<T, MR, 1>(ctx, [wp(r)], a, i0, r);
            r += 1;
        }
    }
}

/// Eight weights of type `T` at `p`, widened to f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load8<const T: u8>(p: *const u8) -> __m256 {
    match T {
        F32 => _mm256_loadu_ps(p as *const f32),
        F16 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
        _ => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
            _mm_loadu_si128(p as *const __m128i),
        ))),
    }
}

/// Weight `j` of the row at `p`, as `float::weight` reads it.
#[inline(always)]
unsafe fn load1<const T: u8>(p: *const u8, j: usize) -> f32 {
    match T {
        F32 => f32::from_bits(u32::from_le((p.add(4 * j) as *const u32).read_unaligned())),
        F16 => f16_to_f32(u16::from_le((p.add(2 * j) as *const u16).read_unaligned())),
        _ => f32::from_bits(
            (u16::from_le((p.add(2 * j) as *const u16).read_unaligned()) as u32) << 16,
        ),
    }
}

/// `float::reduce_lanes` of the eight lanes of `v`, in the same order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum(v: __m256) -> f32 {
    // [l0+l4, l1+l5, l2+l6, l3+l7]
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    // [(l0+l4)+(l2+l6), (l1+l5)+(l3+l7), ..]
    let t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)))
}

/// One weight row times one activation row, with four accumulators: a
/// single chain of FMAs waits out each one's latency, which held f16 decode
/// to 17 GB/s of the 23 one core streams (SmolLM2 f16, one thread, 68 -> 80
/// t/s). Sums in another order than [`tile`]: decode and prefill differ by
/// rounding, as in ggml.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_decode<const T: u8>(ctx: Ctx, w: *const u8, a: *const f32) -> f32 {
    let k = ctx.k;
    let k32 = k - k % (4 * LANES);
    let k8 = k - k % LANES;
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut c = 0;
    while c < k32 {
        for (j, v) in acc.iter_mut().enumerate() {
            let e = c + j * LANES;
            *v = _mm256_fmadd_ps(
                load8::<T>(w.add(e * wbytes(T))),
                _mm256_loadu_ps(a.add(e)),
                *v,
            );
        }
        c += 4 * LANES;
    }
    while c < k8 {
        acc[0] = _mm256_fmadd_ps(
            load8::<T>(w.add(c * wbytes(T))),
            _mm256_loadu_ps(a.add(c)),
            acc[0],
        );
        c += LANES;
    }
    let mut s = hsum(_mm256_add_ps(
        _mm256_add_ps(acc[0], acc[1]),
        _mm256_add_ps(acc[2], acc[3]),
    ));
    for e in k8..k {
        s += load1::<T>(w, e) * *a.add(e);
    }
    s
}

/// MR activation rows `a` times NR weight rows `w`, written to output
/// elements `(i0 + i, r0 + j)`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile<const T: u8, const MR: usize, const NR: usize>(
    ctx: Ctx,
    w: [*const u8; NR],
    a: [*const f32; MR],
    i0: usize,
    r0: usize,
) {
    let k = ctx.k;
    let k8 = k - k % LANES;
    let mut acc = [[_mm256_setzero_ps(); NR]; MR];
    let mut c = 0;
    while c < k8 {
        let wv: [__m256; NR] = std::array::from_fn(|j| load8::<T>(w[j].add(c * wbytes(T))));
        for i in 0..MR {
            let av = _mm256_loadu_ps(a[i].add(c));
            for j in 0..NR {
                acc[i][j] = _mm256_fmadd_ps(wv[j], av, acc[i][j]);
            }
        }
        c += LANES;
    }
    for i in 0..MR {
        for j in 0..NR {
            let mut s = hsum(acc[i][j]);
            for e in k8..k {
                s += load1::<T>(w[j], e) * *a[i].add(e);
            }
            *ctx.out.ptr.add((i0 + i) * ctx.out.ld + r0 + j) = s;
        }
    }
}

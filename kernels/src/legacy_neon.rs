//! aarch64 kernels for the 32-weight block types (Q4_0, Q4_1, Q5_0, Q5_1,
//! Q8_0), for decode and for the batches no prefill panel takes: ARMv8.0
//! NEON (`smull`/`smlal` into 16-bit lanes, as ggml's path without the dot
//! product) and `sdot` (FEAT_DotProd, through `asm!`: not a stable intrinsic).
//!
//! One micro-kernel, generic over the type, the instruction set and the tile
//! (MR activation rows by 4 or 8 weight rows), does all the work: each weight
//! block is unpacked once per tile and multiplied with every activation row
//! of the tile. Per block and pair of rows the integer dot product is exact
//! in i32, whatever the order it is summed in, so the only rounding is per
//! output element and always the same: `acc = fma(d_w d_a, sumi, acc)` per
//! block in block order (and `acc_m = fma(m_w, s_a, acc_m)`, `acc + acc_m`
//! for the types with a minimum). Four weight rows share one f32x4 of
//! accumulators, a row per lane, so a product is bit-identical computed in
//! any tile, alone, in either layout, or on either tier.
//!
//! The 4- and 5-bit codes stay unsigned (0..31) and the offset (8 or 16)
//! comes back out with the activation block's code sum, once per four rows,
//! where subtracting it from the codes costs two instructions per row.

use std::arch::aarch64::*;
use std::arch::asm;
use std::ops::Range;

use crate::code::{Q4_0, Q4_1, Q5_0, Q5_1, Q8_0};
use crate::{ActBuf, Out, WType, Weights};

/// Whether `T` has a minimum and takes Q8_1 activations.
const fn has_min(t: u8) -> bool {
    matches!(t, Q4_1 | Q5_1)
}

/// The offset subtracted from unsigned codes (Q4_0 and Q5_0).
const fn offset(t: u8) -> i32 {
    match t {
        Q4_0 => 8,
        Q5_0 => 16,
        _ => 0,
    }
}

/// Activation block bytes and the offset of its codes.
const fn abytes(t: u8) -> (usize, usize) {
    if has_min(t) {
        (40, 8)
    } else {
        (36, 4)
    }
}

/// Where a weight block's fifth bits and its packed codes start.
const fn fields(t: u8) -> (usize, usize) {
    match t {
        Q4_0 => (0, 2),
        Q4_1 => (0, 4),
        Q5_0 => (2, 6),
        Q5_1 => (4, 8),
        _ => (0, 2),
    }
}

/// ARMv8.0 NEON (the aarch64 baseline: no feature to check).
///
/// # Safety
/// As [`crate::gemm`].
pub(crate) unsafe fn gemm_neon(w: &Weights, rows: Range<usize>, acts: &ActBuf, out: Out) {
    match w.wtype {
        WType::Q4_0 => neon_t::<Q4_0>(w, rows, acts, out),
        WType::Q4_1 => neon_t::<Q4_1>(w, rows, acts, out),
        WType::Q5_0 => neon_t::<Q5_0>(w, rows, acts, out),
        WType::Q5_1 => neon_t::<Q5_1>(w, rows, acts, out),
        WType::Q8_0 => neon_t::<Q8_0>(w, rows, acts, out),
        t => unreachable!("{t:?} is not a legacy block type"),
    }
}

/// NEON with `sdot`.
///
/// # Safety
/// As [`crate::gemm`], on a CPU with FEAT_DotProd.
#[target_feature(enable = "dotprod")]
pub(crate) unsafe fn gemm_dotprod(w: &Weights, rows: Range<usize>, acts: &ActBuf, out: Out) {
    match w.wtype {
        WType::Q4_0 => dotprod_t::<Q4_0>(w, rows, acts, out),
        WType::Q4_1 => dotprod_t::<Q4_1>(w, rows, acts, out),
        WType::Q5_0 => dotprod_t::<Q5_0>(w, rows, acts, out),
        WType::Q5_1 => dotprod_t::<Q5_1>(w, rows, acts, out),
        WType::Q8_0 => dotprod_t::<Q8_0>(w, rows, acts, out),
        t => unreachable!("{t:?} is not a legacy block type"),
    }
}

unsafe fn neon_t<const T: u8>(w: &Weights, rows: Range<usize>, acts: &ActBuf, out: Out) {
    gemm_t::<T, false>(w, rows, acts, out)
}

#[target_feature(enable = "dotprod")]
unsafe fn dotprod_t<const T: u8>(w: &Weights, rows: Range<usize>, acts: &ActBuf, out: Out) {
    gemm_t::<T, true>(w, rows, acts, out)
}

/// One activation row: its blocks, and (Q4_0, Q5_0) their code sums.
#[derive(Clone, Copy)]
struct Act {
    blocks: *const u8,
    sums: *const i32,
}

/// Products of weight rows `rows` with every activation row; `DP`: `sdot`.
#[inline(always)]
unsafe fn gemm_t<const T: u8, const DP: bool>(
    w: &Weights,
    rows: Range<usize>,
    acts: &ActBuf,
    out: Out,
) {
    let m = acts.rows();
    if m == 0 || rows.is_empty() {
        return;
    }
    let nb = w.k / 32;
    let act = |i: usize| -> Act {
        if has_min(T) {
            Act {
                blocks: acts.q8_1_row(i).as_ptr() as *const u8,
                sums: std::ptr::null(),
            }
        } else {
            Act {
                blocks: acts.q8_0_row(i).as_ptr() as *const u8,
                sums: acts.q8_0_sums(i).as_ptr(),
            }
        }
    };
    // Decode takes eight weight rows at a time (in Rows8 one group: its
    // blocks are read as one stream); batches four, against up to four
    // activation rows.
    let nr = if m == 1 { 8 } else { 4 };
    let mut r = rows.start;
    while r < rows.end {
        // Units never straddle a group of eight nor the row-major tail
        // (which starts at a multiple of eight): one block stride for all.
        let end = rows.end.min((r / nr + 1) * nr);
        let (_, bs) = w.locate(r);
        let mut ptrs = [w.bytes.as_ptr(); 8];
        for (j, p) in ptrs.iter_mut().enumerate() {
            // Rows past the unit repeat its last row: computed, not stored.
            let (start, stride) = w.locate((r + j).min(end - 1));
            debug_assert_eq!(stride, bs);
            *p = w.bytes.as_ptr().add(start);
        }
        let cnt = end - r;
        let o = |i: usize| out.ptr.wrapping_add(i * out.ld + r);
        if m == 1 {
            let q = [
                [ptrs[0], ptrs[1], ptrs[2], ptrs[3]],
                [ptrs[4], ptrs[5], ptrs[6], ptrs[7]],
            ];
            tile::<T, DP, 1, 2>(q, bs, nb, [act(0)], [o(0)], cnt);
        } else {
            let q = [[ptrs[0], ptrs[1], ptrs[2], ptrs[3]]];
            let mut i = 0;
            while i < m {
                let left = m - i;
                if left >= 4 {
                    let a = [act(i), act(i + 1), act(i + 2), act(i + 3)];
                    tile::<T, DP, 4, 1>(q, bs, nb, a, [o(i), o(i + 1), o(i + 2), o(i + 3)], cnt);
                    i += 4;
                } else if left >= 2 {
                    tile::<T, DP, 2, 1>(q, bs, nb, [act(i), act(i + 1)], [o(i), o(i + 1)], cnt);
                    i += 2;
                } else {
                    tile::<T, DP, 1, 1>(q, bs, nb, [act(i)], [o(i)], cnt);
                    i += 1;
                }
            }
        }
        r = end;
    }
}

/// `NQ` quads of weight rows (blocks `bs` bytes apart from `w[q][j]`) times
/// `MR` activation rows, `nb` blocks each, into `out[i][0..cnt]`.
#[inline(always)]
unsafe fn tile<const T: u8, const DP: bool, const MR: usize, const NQ: usize>(
    w: [[*const u8; 4]; NQ],
    bs: usize,
    nb: usize,
    a: [Act; MR],
    out: [*mut f32; MR],
    cnt: usize,
) {
    let (ab, aq) = abytes(T);
    let mut acc = [[vdupq_n_f32(0.0); NQ]; MR];
    let mut accm = [[vdupq_n_f32(0.0); NQ]; MR];
    for b in 0..nb {
        let off = b * bs;
        let mut x = [[vdupq_n_s8(0); 2]; MR];
        for (xi, ai) in x.iter_mut().zip(&a) {
            let pa = ai.blocks.add(b * ab + aq) as *const i8;
            *xi = [vld1q_s8(pa), vld1q_s8(pa.add(16))];
        }
        for q in 0..NQ {
            let sumi = quad_dots::<T, DP, MR>(w[q], off, &x);
            let (dw, mw) = scales::<T>(w[q], off);
            for i in 0..MR {
                let pa = a[i].blocks.add(b * ab);
                let mut s = sumi[i];
                if offset(T) != 0 {
                    s = vsubq_s32(s, vdupq_n_s32(offset(T) * *a[i].sums.add(b)));
                }
                let da = (pa as *const f32).read();
                acc[i][q] = vfmaq_f32(acc[i][q], vmulq_n_f32(dw, da), vcvtq_f32_s32(s));
                if has_min(T) {
                    let sa = (pa.add(4) as *const f32).read();
                    accm[i][q] = vfmaq_n_f32(accm[i][q], mw, sa);
                }
            }
        }
    }
    for i in 0..MR {
        for q in 0..NQ {
            let v = if has_min(T) {
                vaddq_f32(acc[i][q], accm[i][q])
            } else {
                acc[i][q]
            };
            let dst = out[i].add(4 * q);
            if cnt >= 4 * (q + 1) {
                vst1q_f32(dst, v);
            } else if cnt > 4 * q {
                let mut l = [0f32; 4];
                vst1q_f32(l.as_mut_ptr(), v);
                for (j, &x) in l.iter().enumerate().take(cnt - 4 * q) {
                    *dst.add(j) = x;
                }
            }
        }
    }
}

/// Lane j of element i: the exact integer dot product of weight row j's
/// block at `w[j] + off` (unsigned codes for the 4- and 5-bit types) with
/// activation row i's block `x[i]`.
#[inline(always)]
unsafe fn quad_dots<const T: u8, const DP: bool, const MR: usize>(
    w: [*const u8; 4],
    off: usize,
    x: &[[int8x16_t; 2]; MR],
) -> [int32x4_t; MR] {
    let mut out = [vdupq_n_s32(0); MR];
    if DP {
        let mut d = [[vdupq_n_s32(0); 4]; MR];
        for j in 0..4 {
            let (lo, hi) = codes::<T>(w[j].add(off));
            for i in 0..MR {
                d[i][j] = sdot(sdot(vdupq_n_s32(0), lo, x[i][0]), hi, x[i][1]);
            }
        }
        for i in 0..MR {
            out[i] = vpaddq_s32(vpaddq_s32(d[i][0], d[i][1]), vpaddq_s32(d[i][2], d[i][3]));
        }
    } else if T == Q8_0 {
        // Two products of |q| <= 128 and |a| <= 127 per 16-bit lane at most.
        let mut d = [[vdupq_n_s32(0); 4]; MR];
        for j in 0..4 {
            let (lo, hi) = codes::<T>(w[j].add(off));
            for i in 0..MR {
                let e = vmlal_high_s8(vmull_s8(vget_low_s8(lo), vget_low_s8(x[i][0])), lo, x[i][0]);
                let f = vmlal_high_s8(vmull_s8(vget_low_s8(hi), vget_low_s8(x[i][1])), hi, x[i][1]);
                d[i][j] = vpadalq_s16(vpaddlq_s16(e), f);
            }
        }
        for i in 0..MR {
            out[i] = vpaddq_s32(vpaddq_s32(d[i][0], d[i][1]), vpaddq_s32(d[i][2], d[i][3]));
        }
    } else {
        // Codes below 32 and |a| <= 127: four products per 16-bit lane fit,
        // and so do their sums over two more levels of pairs for 4-bit codes
        // (at most 30480) or one for 5-bit codes (31496).
        let mut p = [[vdupq_n_s16(0); 4]; MR];
        for j in 0..4 {
            let (lo, hi) = codes::<T>(w[j].add(off));
            for i in 0..MR {
                let e = vmull_s8(vget_low_s8(lo), vget_low_s8(x[i][0]));
                let e = vmlal_high_s8(e, lo, x[i][0]);
                let e = vmlal_s8(e, vget_low_s8(hi), vget_low_s8(x[i][1]));
                p[i][j] = vmlal_high_s8(e, hi, x[i][1]);
            }
        }
        for i in 0..MR {
            let h01 = vpaddq_s16(p[i][0], p[i][1]);
            let h23 = vpaddq_s16(p[i][2], p[i][3]);
            out[i] = if matches!(T, Q4_0 | Q4_1) {
                vpaddlq_s16(vpaddq_s16(h01, h23))
            } else {
                vpaddq_s32(vpaddlq_s16(h01), vpaddlq_s16(h23))
            };
        }
    }
    out
}

/// The scales of four weight blocks as f32x4, and their minimums (or zeros).
#[inline(always)]
unsafe fn scales<const T: u8>(w: [*const u8; 4], off: usize) -> (float32x4_t, float32x4_t) {
    if has_min(T) {
        // d and m are adjacent f16: one word per block holds both.
        let wd = |j: usize| (w[j].add(off) as *const u32).read_unaligned();
        let words = [wd(0), wd(1), wd(2), wd(3)];
        let v = vld1q_u32(words.as_ptr());
        (f16x4(vmovn_u32(v)), f16x4(vshrn_n_u32::<16>(v)))
    } else {
        let hd = |j: usize| (w[j].add(off) as *const u16).read_unaligned();
        let halves = [hd(0), hd(1), hd(2), hd(3)];
        (f16x4(vld1_u16(halves.as_ptr())), vdupq_n_f32(0.0))
    }
}

/// A weight block's codes as two vectors of 16: elements 0..16 and 16..32
/// (unsigned for the 4- and 5-bit types, signed for Q8_0).
#[inline(always)]
unsafe fn codes<const T: u8>(p: *const u8) -> (int8x16_t, int8x16_t) {
    let (qh, qs) = fields(T);
    match T {
        Q8_0 => (
            vld1q_s8(p.add(2) as *const i8),
            vld1q_s8(p.add(18) as *const i8),
        ),
        _ => {
            let q = vld1q_u8(p.add(qs));
            let mut lo = vandq_u8(q, vdupq_n_u8(0x0F));
            let mut hi = vshrq_n_u8::<4>(q);
            if matches!(T, Q5_0 | Q5_1) {
                // Byte j of the spread holds byte j / 8 of qh; bit j % 8 of
                // it is element j's fifth bit (16 + j's for the upper half).
                const SPREAD: [u8; 32] = [
                    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3,
                    3, 3, 3, 3, 3, 3,
                ];
                const BITS: [u8; 16] = [1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128];
                let h =
                    vreinterpretq_u8_u32(vdupq_n_u32((p.add(qh) as *const u32).read_unaligned()));
                let bits = vld1q_u8(BITS.as_ptr());
                let fifth = vdupq_n_u8(0x10);
                let set_lo = vtstq_u8(vqtbl1q_u8(h, vld1q_u8(SPREAD.as_ptr())), bits);
                let set_hi = vtstq_u8(vqtbl1q_u8(h, vld1q_u8(SPREAD.as_ptr().add(16))), bits);
                lo = vbslq_u8(fifth, set_lo, lo);
                hi = vbslq_u8(fifth, set_hi, hi);
            }
            (vreinterpretq_s8_u8(lo), vreinterpretq_s8_u8(hi))
        }
    }
}

/// `acc + a · b` per group of four bytes (`sdot`, FEAT_DotProd).
#[inline]
#[target_feature(enable = "dotprod")]
unsafe fn sdot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    // SAFETY: register-only arithmetic; the caller's tier has FEAT_DotProd.
    asm!(
        "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
        acc = inout(vreg) acc,
        a = in(vreg) a,
        b = in(vreg) b,
        options(pure, nomem, nostack, preserves_flags)
    );
    acc
}

/// Four f16 (as bits) to f32 (`fcvtl`: ARMv8.0, but the f16 vector types
/// its intrinsic takes are not stable Rust).
#[inline(always)]
unsafe fn f16x4(h: uint16x4_t) -> float32x4_t {
    let out: float32x4_t;
    // SAFETY: register-only conversion, part of the aarch64 baseline.
    asm!(
        "fcvtl {o:v}.4s, {h:v}.4h",
        o = lateout(vreg) out,
        h = in(vreg) h,
        options(pure, nomem, nostack, preserves_flags)
    );
    out
}

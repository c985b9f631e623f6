//! aarch64 kernels for the 32-weight block types (Q4_0, Q4_1, Q5_0, Q5_1,
//! Q8_0), for decode and for the batches no prefill panel takes: ARMv8.0
//! NEON (`smull`/`smlal` into 16-bit lanes, as ggml's path without the dot
//! product) and `sdot` (FEAT_DotProd, through `asm!`: not a stable intrinsic).
//!
//! One micro-kernel, generic over the type, the instruction set and the tile
//! (eight weight rows by one or two activation rows), does all the work:
//! each weight block is unpacked once per tile and multiplied with every
//! activation row of the tile. Per block and pair of rows the integer dot
//! product is exact in i32, whatever the order it is summed in, so the only
//! rounding is per output element and always the same: `acc = fma(d_w d_a,
//! sumi, acc)` per block in block order (and `acc_m = fma(m_w, s_a, acc_m)`,
//! `acc + acc_m` for the types with a minimum). Four weight rows share one
//! f32x4 of accumulators, a row per lane, so a product is bit-identical
//! computed in any tile, alone, in either layout, or on either tier.
//!
//! In [`Layout::Rows8`] a tile is one group: per block index it reads the
//! group's eight blocks as one run of bytes, and their scales with one
//! post-indexed load each.
//!
//! The 4- and 5-bit codes stay unsigned (0..31) and the offset (8 or 16)
//! comes back out with the activation block's code sum: `sdot` starts each
//! row from a quarter of it per lane instead of from zero, the NEON path
//! subtracts it once per four rows, where subtracting it from the codes
//! costs two instructions per row.

use std::arch::aarch64::*;
use std::arch::asm;
use std::ops::Range;

use crate::act::act_block;
use crate::code::{has_min, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0};
use crate::legacy::offset;
use crate::neon::{fcvtl, fcvtl2, sdot};
use crate::{ActBuf, Layout, Out, WType, Weights};

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

/// Bytes per weight block.
const fn bb(t: u8) -> usize {
    WType::from_code(t).block_bytes()
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
    let grouped = match w.layout {
        Layout::Rows8 => w.n - w.n % 8,
        Layout::RowMajor => 0,
    };
    // Eight weight rows at a time (in Rows8 one group, whose blocks are
    // read as one stream), against one or two activation rows. Units start
    // at multiples of eight, so that one lies wholly in a group or wholly
    // row-major.
    let base = w.bytes.as_ptr();
    let mut r = rows.start;
    while r < rows.end {
        let r0 = r - r % 8;
        let end = rows.end.min(r0 + 8);
        let lanes = r - r0..end - r0;
        let mut ptrs = [base; 8];
        let g = r0 + 8 <= grouped;
        if g {
            // Row r0 + j at ptrs[0] + j BB: all rows of the group exist,
            // those outside `lanes` are computed and not stored.
            let (start, stride) = w.locate(r0);
            debug_assert_eq!(stride, 8 * bb(T));
            ptrs[0] = base.add(start);
        } else {
            for (j, p) in ptrs.iter_mut().enumerate() {
                // Rows outside `lanes` (perhaps past the matrix) repeat one in it.
                let (start, stride) = w.locate((r0 + j).clamp(r, end - 1));
                debug_assert_eq!(stride, bb(T));
                *p = base.add(start);
            }
        }
        let o = |i: usize| out.ptr.wrapping_add(i * out.ld + r0);
        let mut i = 0;
        while i < m {
            let l = lanes.clone();
            if m - i >= 2 {
                let (a, o) = ([act(i), act(i + 1)], [o(i), o(i + 1)]);
                if g {
                    tile::<T, DP, true, 2>(ptrs, nb, a, o, l);
                } else {
                    tile::<T, DP, false, 2>(ptrs, nb, a, o, l);
                }
                i += 2;
            } else {
                if g {
                    tile::<T, DP, true, 1>(ptrs, nb, [act(i)], [o(i)], l);
                } else {
                    tile::<T, DP, false, 1>(ptrs, nb, [act(i)], [o(i)], l);
                }
                i += 1;
            }
        }
        r = end;
    }
}

/// Eight weight rows times `MR` activation rows, `nb` blocks each, into
/// `out[i][j]` for `j` in `lanes`. With `G` row j's block b is at
/// `w[0] + (8 b + j) BB` (a Rows8 group), else at `w[j] + b BB`.
#[inline(always)]
unsafe fn tile<const T: u8, const DP: bool, const G: bool, const MR: usize>(
    w: [*const u8; 8],
    nb: usize,
    a: [Act; MR],
    out: [*mut f32; MR],
    lanes: Range<usize>,
) {
    let (ab, aq) = act_block(T);
    let zero = [vdupq_n_f32(0.0); MR];
    // Per quad of rows: the accumulators and those of the minimum's terms.
    let (mut acc0, mut acc1, mut accm0, mut accm1) = (zero, zero, zero, zero);
    // In a group the scales lie BB apart, eight blocks of a group after
    // another: one pointer walks them all.
    let mut sp = w[0];
    for b in 0..nb {
        let mut x = [[vdupq_n_s8(0); 2]; MR];
        // The offset's share per lane (off/4 times the code sum, exact),
        // where sdot starts from it instead of zero.
        let mut init = [vdupq_n_s32(0); MR];
        for i in 0..MR {
            let pa = a[i].blocks.add(b * ab + aq) as *const i8;
            x[i] = [vld1q_s8(pa), vld1q_s8(pa.add(16))];
            if DP && offset(T) != 0 {
                init[i] = vdupq_n_s32(-(offset(T) / 4) * *a[i].sums.add(b));
            }
        }
        let rows = |q: usize| -> [*const u8; 4] {
            std::array::from_fn(|j| {
                if G {
                    w[0].add((8 * b + 4 * q + j) * bb(T))
                } else {
                    w[4 * q + j].add(b * bb(T))
                }
            })
        };
        let (s0, s1) = if G {
            scales8::<T>(&mut sp)
        } else {
            (scales::<T>(rows(0)), scales::<T>(rows(1)))
        };
        // Two calls, not a loop: LLVM left a loop of two in place for Q5.
        quad::<T, DP, MR>(rows(0), s0, b, &a, &x, &init, &mut acc0, &mut accm0);
        quad::<T, DP, MR>(rows(1), s1, b, &a, &x, &init, &mut acc1, &mut accm1);
    }
    for i in 0..MR {
        for (q, (acc, accm)) in [(acc0, accm0), (acc1, accm1)].into_iter().enumerate() {
            let v = if has_min(T) {
                vaddq_f32(acc[i], accm[i])
            } else {
                acc[i]
            };
            let dst = out[i].wrapping_add(4 * q);
            if lanes.start <= 4 * q && 4 * q + 4 <= lanes.end {
                vst1q_f32(dst, v);
            } else {
                let mut l = [0f32; 4];
                vst1q_f32(l.as_mut_ptr(), v);
                for (j, &x) in l.iter().enumerate() {
                    if lanes.contains(&(4 * q + j)) {
                        *dst.add(j) = x;
                    }
                }
            }
        }
    }
}

/// Block `b` of four weight rows (at `w`, with scales and minimums `sc`)
/// times the activation blocks `x` of rows `a`, into their accumulators:
/// `fma(d_w d_a, sumi, acc)` per lane.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn quad<const T: u8, const DP: bool, const MR: usize>(
    w: [*const u8; 4],
    sc: (float32x4_t, float32x4_t),
    b: usize,
    a: &[Act; MR],
    x: &[[int8x16_t; 2]; MR],
    init: &[int32x4_t; MR],
    acc: &mut [float32x4_t; MR],
    accm: &mut [float32x4_t; MR],
) {
    let (ab, _) = act_block(T);
    let sumi = quad_dots::<T, DP, MR>(w, x, init);
    let (dw, mw) = sc;
    for i in 0..MR {
        let pa = a[i].blocks.add(b * ab);
        let mut s = sumi[i];
        if !DP && offset(T) != 0 {
            s = vsubq_s32(s, vdupq_n_s32(offset(T) * *a[i].sums.add(b)));
        }
        let da = (pa as *const f32).read();
        acc[i] = vfmaq_f32(acc[i], vmulq_n_f32(dw, da), vcvtq_f32_s32(s));
        if has_min(T) {
            let sa = (pa.add(4) as *const f32).read();
            accm[i] = vfmaq_n_f32(accm[i], mw, sa);
        }
    }
}

/// Lane j of element i: the exact integer dot product of weight block `w[j]`
/// (unsigned codes for the 4- and 5-bit types) with activation row i's
/// block `x[i]`, plus (sdot) the sum of `init[i]`'s lanes.
#[inline(always)]
unsafe fn quad_dots<const T: u8, const DP: bool, const MR: usize>(
    w: [*const u8; 4],
    x: &[[int8x16_t; 2]; MR],
    init: &[int32x4_t; MR],
) -> [int32x4_t; MR] {
    let mut out = [vdupq_n_s32(0); MR];
    if DP {
        let mut d = [[vdupq_n_s32(0); 4]; MR];
        for j in 0..4 {
            let (lo, hi) = codes::<T>(w[j]);
            for i in 0..MR {
                d[i][j] = sdot(sdot(init[i], lo, x[i][0]), hi, x[i][1]);
            }
        }
        for i in 0..MR {
            out[i] = vpaddq_s32(vpaddq_s32(d[i][0], d[i][1]), vpaddq_s32(d[i][2], d[i][3]));
        }
    } else if T == Q8_0 {
        // Two products of |q| <= 128 and |a| <= 127 per 16-bit lane at most.
        let mut d = [[vdupq_n_s32(0); 4]; MR];
        for j in 0..4 {
            let (lo, hi) = codes::<T>(w[j]);
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
            let (lo, hi) = codes::<T>(w[j]);
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
unsafe fn scales<const T: u8>(w: [*const u8; 4]) -> (float32x4_t, float32x4_t) {
    if has_min(T) {
        // d and m are adjacent f16: one word per block holds both.
        let wd = |j: usize| (w[j] as *const u32).read_unaligned();
        let v = vld1q_u32([wd(0), wd(1), wd(2), wd(3)].as_ptr());
        (fcvtl(vmovn_u32(v)), fcvtl(vshrn_n_u32::<16>(v)))
    } else {
        let hd = |j: usize| (w[j] as *const u16).read_unaligned();
        (
            fcvtl(vld1_u16([hd(0), hd(1), hd(2), hd(3)].as_ptr())),
            vdupq_n_f32(0.0),
        )
    }
}

/// [`scales`] of the eight blocks from `*p`, `BB` apart (one block index of
/// a Rows8 group), leaving `*p` at the next index's: one load per block.
#[inline(always)]
unsafe fn scales8<const T: u8>(
    p: &mut *const u8,
) -> ((float32x4_t, float32x4_t), (float32x4_t, float32x4_t)) {
    let step = bb(T);
    if has_min(T) {
        let mut four = || {
            let mut v = ld1r_s(p, step);
            v = ld1_s::<1>(v, p, step);
            v = ld1_s::<2>(v, p, step);
            v = ld1_s::<3>(v, p, step);
            (fcvtl(vmovn_u32(v)), fcvtl(vshrn_n_u32::<16>(v)))
        };
        (four(), four())
    } else {
        let mut v = ld1r_h(p, step);
        v = ld1_h::<1>(v, p, step);
        v = ld1_h::<2>(v, p, step);
        v = ld1_h::<3>(v, p, step);
        v = ld1_h::<4>(v, p, step);
        v = ld1_h::<5>(v, p, step);
        v = ld1_h::<6>(v, p, step);
        v = ld1_h::<7>(v, p, step);
        let z = vdupq_n_f32(0.0);
        ((fcvtl(vget_low_u16(v)), z), (fcvtl2(v), z))
    }
}

/// Lane `K` of `v` from the (unaligned) u16 at `*p`, then `*p += step`:
/// `ld1` with a post-index, one instruction where LLVM spends an address
/// add per lane.
#[inline(always)]
unsafe fn ld1_h<const K: u32>(v: uint16x8_t, p: &mut *const u8, step: usize) -> uint16x8_t {
    let mut v = v;
    // SAFETY: the caller's `*p` points at two readable bytes.
    asm!(
        "ld1 {{ {v:v}.h }}[{k}], [{p}], {s}",
        v = inout(vreg) v,
        p = inout(reg) *p,
        s = in(reg) step,
        k = const K,
        options(readonly, nostack, preserves_flags)
    );
    v
}

/// The (unaligned) u16 at `*p` in every lane, then `*p += step` (`ld1r`
/// with a post-index: LLVM spends a load and a `dup`).
#[inline(always)]
unsafe fn ld1r_h(p: &mut *const u8, step: usize) -> uint16x8_t {
    let v: uint16x8_t;
    // SAFETY: the caller's `*p` points at two readable bytes.
    asm!(
        "ld1r {{ {v:v}.8h }}, [{p}], {s}",
        v = lateout(vreg) v,
        p = inout(reg) *p,
        s = in(reg) step,
        options(readonly, nostack, preserves_flags)
    );
    v
}

/// [`ld1r_h`] for u32 lanes.
#[inline(always)]
unsafe fn ld1r_s(p: &mut *const u8, step: usize) -> uint32x4_t {
    let v: uint32x4_t;
    // SAFETY: the caller's `*p` points at four readable bytes.
    asm!(
        "ld1r {{ {v:v}.4s }}, [{p}], {s}",
        v = lateout(vreg) v,
        p = inout(reg) *p,
        s = in(reg) step,
        options(readonly, nostack, preserves_flags)
    );
    v
}

/// [`ld1_h`] for a u32 lane.
#[inline(always)]
unsafe fn ld1_s<const K: u32>(v: uint32x4_t, p: &mut *const u8, step: usize) -> uint32x4_t {
    let mut v = v;
    // SAFETY: the caller's `*p` points at four readable bytes.
    asm!(
        "ld1 {{ {v:v}.s }}[{k}], [{p}], {s}",
        v = inout(vreg) v,
        p = inout(reg) *p,
        s = in(reg) step,
        k = const K,
        options(readonly, nostack, preserves_flags)
    );
    v
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
                let set_lo = vtstq_u8(vqtbl1q_u8(h, vld1q_u8(SPREAD.as_ptr())), bits);
                let set_hi = vtstq_u8(vqtbl1q_u8(h, vld1q_u8(SPREAD.as_ptr().add(16))), bits);
                lo = insert_fifth(lo, set_lo);
                hi = insert_fifth(hi, set_hi);
            }
            (vreinterpretq_s8_u8(lo), vreinterpretq_s8_u8(hi))
        }
    }
}

/// Bit 4 of `set` into `codes` (`bit`, one instruction: written as
/// intrinsics, LLVM splits the select into four).
#[inline(always)]
unsafe fn insert_fifth(codes: uint8x16_t, set: uint8x16_t) -> uint8x16_t {
    let mut c = codes;
    // SAFETY: register-only bitwise select, part of the aarch64 baseline.
    asm!(
        "bit {c:v}.16b, {s:v}.16b, {m:v}.16b",
        c = inout(vreg) c,
        s = in(vreg) set,
        m = in(vreg) vdupq_n_u8(0x10),
        options(pure, nomem, nostack, preserves_flags)
    );
    c
}

#[cfg(test)]
mod tests {
    use half::f16;

    use crate::testing::{run, Rng};
    use crate::{gemm, ActBuf, Isa, Out, WType, Weights};

    /// `n` rows of `k` random codes with sane scales (and minimums).
    fn weights(t: WType, k: usize, n: usize, rng: &mut Rng) -> Vec<u8> {
        let bb = t.block_bytes();
        let mut v: Vec<u8> = (0..n * k / 32 * bb).map(|_| rng.next() as u8).collect();
        for blk in v.chunks_exact_mut(bb) {
            let d = f16::from_f32(0.001 + 0.02 * rng.f()).to_le_bytes();
            blk[..2].copy_from_slice(&d);
            if t.has_min() {
                blk[2..4].copy_from_slice(&f16::from_f32(0.1 * rng.f()).to_le_bytes());
            }
        }
        v
    }

    /// Any range of rows, cutting groups of eight anywhere, in either layout,
    /// writes exactly its elements, with the bits of the whole product:
    /// the shared checks multiply Rows8 matrices only whole.
    #[test]
    fn row_ranges_in_either_layout_give_the_same_bits() {
        let types = [
            WType::Q4_0,
            WType::Q4_1,
            WType::Q5_0,
            WType::Q5_1,
            WType::Q8_0,
        ];
        let mut rng = Rng(0xA11C_E5EE_D5EE_D5EE);
        for isa in Isa::detect().tiers() {
            for t in types {
                for (k, n) in [(64, 21), (96, 16), (32, 9)] {
                    let wb = weights(t, k, n, &mut rng);
                    let w = Weights::new(t, &wb, k, n).unwrap();
                    let packed = w.repack_rows8().unwrap();
                    let p = w.with_rows8(&packed);
                    for m in [1, 2, 3] {
                        let x: Vec<f32> = (0..m * k).map(|_| rng.f()).collect();
                        let mut a = ActBuf::new(t.act_type(), k, m);
                        a.quantize(&x);
                        let whole = run(&w, &a, isa);
                        let ranges = [(0, n), (3, 5), (5, 13), (7, 8), (8, n), (1, n - 1)];
                        for (lo, hi) in ranges.into_iter().filter(|&(_, hi)| hi <= n) {
                            for mat in [&w, &p] {
                                let mut got = vec![f32::NAN; m * n];
                                let o = Out {
                                    ptr: got.as_mut_ptr(),
                                    ld: n,
                                };
                                // SAFETY: `got` holds every (i, r) of the product.
                                unsafe { gemm(mat, lo..hi, &a, o, isa) };
                                for i in 0..m {
                                    for r in 0..n {
                                        let (g, e) = (got[i * n + r], whole[i * n + r]);
                                        if (lo..hi).contains(&r) {
                                            assert_eq!(
                                                g.to_bits(),
                                                e.to_bits(),
                                                "{isa} {t:?} {:?} k={k} n={n} m={m} rows {lo}..{hi} ({i},{r})",
                                                mat.layout
                                            );
                                        } else {
                                            assert!(g.is_nan(), "{isa} {t:?} wrote ({i},{r})");
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

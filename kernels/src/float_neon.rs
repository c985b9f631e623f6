//! NEON kernels for float weights (F32, F16, BF16) with f32 activations:
//! the ARMv8.0 baseline, so every aarch64 tier runs them.
//!
//! As `float_avx2.rs`: one micro-kernel, generic over the type and the tile
//! (MR activation rows by NR weight rows), widens each group of eight
//! weights once per tile (`fcvtl`/`fcvtl2` for f16, a 16-bit shift for
//! bf16) and multiplies it with every activation row of the tile. The eight
//! lanes of `float.rs` are two q registers per output element, summed in
//! `float.rs`'s order (lane `l` over elements `8c + l`, the same lane
//! reduction, the same scalar tail), so an element is bit-identical in any
//! tile, alone, in decode and in prefill. Independent accumulators come from
//! the tile (decode: four weight rows, eight chains of `fmla`), not from
//! splitting a row's sum, which would change its order.

use std::arch::aarch64::*;
use std::ops::Range;

use crate::float::{f16_to_f32, prefill, tag, wbytes, BF16, F16, F32, LANES};
use crate::neon::{fcvtl, fcvtl2};
use crate::{ActBuf, Out, Weights};

/// Weight rows per decode tile: eight independent `fmla` chains hide the
/// four-cycle latency on two FMA pipes (Cortex-A76, Neoverse N1).
const NR_DECODE: usize = 4;
/// Activation rows per prefill tile.
const MR_PREFILL: usize = 4;
/// Weight rows per prefill tile: 4 x 2 x 2 accumulators, four widened
/// weight vectors, two activation vectors and the raw loads fit the 32 q
/// registers (4 x 3 needs all 32 and LLVM spilled and shuffled in the
/// loop: 68 instructions per step instead of about 41).
const NR_PREFILL: usize = 2;
/// Bytes of weights swept by every activation tile before moving on, so
/// that the panel stays in L2 (256 KiB on a Cortex-A76, 128-512 on A55s).
const PANEL_BYTES: usize = 192 << 10;

/// See [`crate::gemm`]; NEON is part of every aarch64 CPU.
///
/// # Safety
/// As [`crate::gemm`].
pub(crate) unsafe fn gemm(w: &Weights, rows: Range<usize>, acts: &ActBuf, out: Out) {
    match tag(w.wtype) {
        F32 => gemm_t::<F32>(w, rows, acts, out),
        F16 => gemm_t::<F16>(w, rows, acts, out),
        _ => gemm_t::<BF16>(w, rows, acts, out),
    }
}

/// Where one tile reads and writes.
#[derive(Clone, Copy)]
struct Ctx<'a> {
    w: &'a Weights<'a>,
    /// Weights per row.
    k: usize,
    out: Out,
}

impl Ctx<'_> {
    /// The first weight of row `r` (float rows are never interleaved, but
    /// `locate` is where the layout is decided).
    #[inline(always)]
    unsafe fn row(&self, r: usize) -> *const u8 {
        let (start, stride) = self.w.locate(r);
        debug_assert_eq!(stride, self.w.wtype.block_bytes());
        self.w.bytes.as_ptr().add(start)
    }
}

unsafe fn gemm_t<const T: u8>(w: &Weights, rows: Range<usize>, acts: &ActBuf, out: Out) {
    let m = acts.rows();
    if m == 0 || rows.is_empty() {
        return;
    }
    let ctx = Ctx { w, k: w.k, out };
    let arow = |i: usize| acts.f32_row(i).as_ptr();
    if m == 1 {
        sweep::<T, 1, NR_DECODE>(ctx, rows, 0, [arow(0)]);
        return;
    }
    let wrow = w.k * wbytes(T);
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
/// `rows`, NR at a time, the rest two or one at a time.
#[inline(always)]
unsafe fn sweep<const T: u8, const MR: usize, const NR: usize>(
    ctx: Ctx,
    rows: Range<usize>,
    i0: usize,
    a: [*const f32; MR],
) {
    let mut r = rows.start;
    while r + NR <= rows.end {
        tile::<T, MR, NR>(ctx, std::array::from_fn(|j| ctx.row(r + j)), a, i0, r);
        r += NR;
    }
    while r < rows.end {
        if NR > 2 && rows.end - r >= 2 {
            tile::<T, MR, 2>(ctx, [ctx.row(r), ctx.row(r + 1)], a, i0, r);
            r += 2;
        } else {
            tile::<T, MR, 1>(ctx, [ctx.row(r)], a, i0, r);
            r += 1;
        }
    }
}

/// Eight weights of type `T` at `p`, widened to f32 (lanes 0-3, 4-7).
#[inline(always)]
unsafe fn load8<const T: u8>(p: *const u8) -> [float32x4_t; 2] {
    match T {
        F32 => [
            vld1q_f32(p as *const f32),
            vld1q_f32((p as *const f32).add(4)),
        ],
        F16 => {
            let h = vld1q_u16(p as *const u16);
            [fcvtl(vget_low_u16(h)), fcvtl2(h)]
        }
        _ => {
            // bf16 is the top half of an f32: `shll`/`shll2` by 16.
            let h = vld1q_u16(p as *const u16);
            [
                vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(h))),
                vreinterpretq_f32_u32(vshll_high_n_u16::<16>(h)),
            ]
        }
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

/// `float::reduce_lanes` of lanes 0-3 in `lo` and 4-7 in `hi`, in the same order.
///
/// # Safety
/// None beyond NEON, which every aarch64 CPU has.
#[inline(always)]
pub(crate) unsafe fn hsum(lo: float32x4_t, hi: float32x4_t) -> f32 {
    // [l0+l4, l1+l5, l2+l6, l3+l7]
    let s = vaddq_f32(lo, hi);
    // [(l0+l4)+(l2+l6), (l1+l5)+(l3+l7)]
    let t = vadd_f32(vget_low_f32(s), vget_high_f32(s));
    vpadds_f32(t)
}

/// MR activation rows `a` times NR weight rows `w`, written to output
/// elements `(i0 + i, r0 + j)`.
#[inline(always)]
unsafe fn tile<const T: u8, const MR: usize, const NR: usize>(
    ctx: Ctx,
    w: [*const u8; NR],
    a: [*const f32; MR],
    i0: usize,
    r0: usize,
) {
    let k = ctx.k;
    let k8 = k - k % LANES;
    let z = vdupq_n_f32(0.0);
    let mut acc = [[[z; 2]; NR]; MR];
    let mut c = 0;
    while c < k8 {
        let wv: [[float32x4_t; 2]; NR] =
            std::array::from_fn(|j| load8::<T>(w[j].add(c * wbytes(T))));
        for i in 0..MR {
            let ap = a[i].add(c);
            let av = [vld1q_f32(ap), vld1q_f32(ap.add(4))];
            for j in 0..NR {
                for h in 0..2 {
                    acc[i][j][h] = vfmaq_f32(acc[i][j][h], wv[j][h], av[h]);
                }
            }
        }
        c += LANES;
    }
    for i in 0..MR {
        for j in 0..NR {
            let mut s = hsum(acc[i][j][0], acc[i][j][1]);
            for e in k8..k {
                s += load1::<T>(w[j], e) * *a[i].add(e);
            }
            *ctx.out.ptr.add((i0 + i) * ctx.out.ld + r0 + j) = s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    /// `fcvtl`/`fcvtl2` widen every half as `half` does (NaNs as NaNs).
    #[test]
    fn fcvtl_widens_every_half_exactly() {
        for base in (0..=u16::MAX).step_by(8) {
            let hs: [u16; 8] = std::array::from_fn(|i| base + i as u16);
            // SAFETY: NEON is baseline on aarch64; `hs` holds eight halves.
            let (lo, hi) = unsafe {
                let h = vld1q_u16(hs.as_ptr());
                (fcvtl(vget_low_u16(h)), fcvtl2(h))
            };
            let mut got = [0f32; 8];
            // SAFETY: `got` holds eight f32.
            unsafe {
                vst1q_f32(got.as_mut_ptr(), lo);
                vst1q_f32(got.as_mut_ptr().add(4), hi);
            }
            for (g, &h) in got.iter().zip(&hs) {
                let want = f16::from_bits(h).to_f32();
                assert!(
                    g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                    "{h:#06x}: {g} vs {want}"
                );
            }
        }
    }
}

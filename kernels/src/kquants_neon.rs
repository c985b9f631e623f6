//! aarch64 kernels for the K-quant types against Q8_K activations, for
//! decode and batches shorter than the prefill panels: `neon` (ARMv8.0:
//! `smull`/`smlal` into 16-bit pair sums, then `smlal` by the group scale)
//! and `neon-dotprod` (`sdot`); `neon-i8mm` runs the dotprod ones.
//!
//! Every type unpacks a super-block to one shape ([`Sb`]): sixteen vectors
//! of sixteen unsigned codes (offsets of Q3_K and Q6_K left in, taken off
//! through the activations' group sums `bsums`), the group scales in the
//! form each tier multiplies by, and the coefficients that meet `bsums`.
//! A super-block's integer sums are exact, so only the f32 steps after
//! them decide the bits: per super-block and per output element,
//! `acc = fma(d da, sumi, acc)`, then `acc = fma(dmin da, -summ, acc)`
//! for the types with minimums, in super-block order, the same in every
//! tile. A product is thus bit-identical computed in any tile, alone, or
//! in either [`crate::Layout`].
//!
//! With sdot, the group scales are applied without a fresh accumulator per
//! group: one running dot product `P` over the super-block, multiplied after
//! group g by `sc[g] - sc[g + 1]` (`sc[last]` after the last), which sums
//! to `sum sc[g] dot[g]` (wrapping i32 arithmetic; the exact total fits).

use std::arch::aarch64::*;
use std::arch::asm;
use std::ops::Range;

use crate::act::ActQ8K;
use crate::blocks::QK_K;
use crate::code::{has_min, Q2K, Q3K, Q4K, Q5K, Q6K};
use crate::kquants::group_len;
use crate::neon::{fcvtl, sdot};
use crate::{ActBuf, Out, WType, Weights};

/// `body` once per listed value of `$i` (a `usize` const in each copy): the
/// loops over a super-block's vectors must unroll for their lanes and
/// register indices to be constants, which LLVM does not always do alone.
macro_rules! unroll {
    ($i:ident in [$($n:literal)*] $body:block) => {
        $( { const $i: usize = $n; $body } )*
    };
}

/// See [`crate::gemm`]; ARMv8.0 NEON only.
///
/// # Safety
/// As [`crate::gemm`].
pub(crate) unsafe fn gemm_neon(w: &Weights, rows: Range<usize>, acts: &ActBuf, out: Out) {
    match w.wtype {
        WType::Q2K => gemm_t::<Q2K, false>(w, rows, acts, out),
        WType::Q3K => gemm_t::<Q3K, false>(w, rows, acts, out),
        WType::Q4K => gemm_t::<Q4K, false>(w, rows, acts, out),
        WType::Q5K => gemm_t::<Q5K, false>(w, rows, acts, out),
        WType::Q6K => gemm_t::<Q6K, false>(w, rows, acts, out),
        t => unreachable!("{t:?} is not a K-quant type"),
    }
}

/// See [`crate::gemm`]; NEON with `sdot`.
///
/// # Safety
/// As [`crate::gemm`], on a CPU with FEAT_DotProd.
#[target_feature(enable = "dotprod")]
pub(crate) unsafe fn gemm_dotprod(w: &Weights, rows: Range<usize>, acts: &ActBuf, out: Out) {
    match w.wtype {
        WType::Q2K => gemm_dot::<Q2K>(w, rows, acts, out),
        WType::Q3K => gemm_dot::<Q3K>(w, rows, acts, out),
        WType::Q4K => gemm_dot::<Q4K>(w, rows, acts, out),
        WType::Q5K => gemm_dot::<Q5K>(w, rows, acts, out),
        WType::Q6K => gemm_dot::<Q6K>(w, rows, acts, out),
        t => unreachable!("{t:?} is not a K-quant type"),
    }
}

/// [`gemm_t`] with sdot.
#[target_feature(enable = "dotprod")]
unsafe fn gemm_dot<const T: u8>(w: &Weights, rows: Range<usize>, acts: &ActBuf, out: Out) {
    gemm_t::<T, true>(w, rows, acts, out)
}

/// Weight rows in runs of up to eight (whole groups of [`crate::Layout::Rows8`],
/// so a run reads one stream), each run against tiles of up to four
/// activation rows: every super-block is unpacked once per tile.
#[inline(always)]
unsafe fn gemm_t<const T: u8, const DOT: bool>(
    w: &Weights,
    rows: Range<usize>,
    acts: &ActBuf,
    out: Out,
) {
    let m = acts.rows();
    if m == 0 || rows.is_empty() {
        return;
    }
    let nb = w.k / QK_K;
    let base = w.bytes.as_ptr();
    let arow = |i: usize| -> *const ActQ8K { acts.q8k_row(i).as_ptr() };
    let mut r = rows.start;
    while r < rows.end {
        let end = ((r / 8 + 1) * 8).min(rows.end);
        let mut starts = [0usize; 8];
        let (_, stride) = w.locate(r);
        for (j, s) in starts.iter_mut().zip(r..end) {
            let (start, st) = w.locate(s);
            debug_assert_eq!(st, stride, "rows of one run share a stride");
            *j = start;
        }
        let run = Run {
            base,
            starts,
            nr: end - r,
            stride,
            nb,
            out,
            r0: r,
        };
        let mut i0 = 0;
        while i0 < m {
            let a = |j: usize| arow(i0 + j);
            match m - i0 {
                1 => tile_of::<T, DOT, 1>(&run, [a(0)], i0),
                2 => tile_of::<T, DOT, 2>(&run, [a(0), a(1)], i0),
                3 => tile_of::<T, DOT, 3>(&run, [a(0), a(1), a(2)], i0),
                _ => tile_of::<T, DOT, 4>(&run, [a(0), a(1), a(2), a(3)], i0),
            }
            i0 += (m - i0).min(4);
        }
        r = end;
    }
}

/// Up to eight weight rows that share a block stride.
struct Run {
    /// Byte 0 of the weights.
    base: *const u8,
    /// Each row's first block, from `base`.
    starts: [usize; 8],
    /// Rows in the run.
    nr: usize,
    /// Bytes between a row's consecutive blocks.
    stride: usize,
    /// Super-blocks per row.
    nb: usize,
    /// The output.
    out: Out,
    /// The run's first row.
    r0: usize,
}

/// [`tile`] at the tier `DOT` says, out of line per type and tile so the
/// inner loops can be found in the disassembly (`tile_neon` keeps its own
/// symbol; LLVM still inlines `tile_dot` into `gemm_dotprod`).
#[inline(always)]
unsafe fn tile_of<const T: u8, const DOT: bool, const MR: usize>(
    run: &Run,
    a: [*const ActQ8K; MR],
    i0: usize,
) {
    if DOT {
        tile_dot::<T, MR>(run, a, i0)
    } else {
        tile_neon::<T, MR>(run, a, i0)
    }
}

/// [`tile`] without sdot.
#[inline(never)]
unsafe fn tile_neon<const T: u8, const MR: usize>(run: &Run, a: [*const ActQ8K; MR], i0: usize) {
    tile::<T, false, MR>(run, a, i0)
}

/// [`tile`] with sdot.
#[inline(never)]
#[target_feature(enable = "dotprod")]
unsafe fn tile_dot<const T: u8, const MR: usize>(run: &Run, a: [*const ActQ8K; MR], i0: usize) {
    tile::<T, true, MR>(run, a, i0)
}

/// The run's rows times activation rows `a` (output rows `i0..i0 + MR`).
#[inline(always)]
unsafe fn tile<const T: u8, const DOT: bool, const MR: usize>(
    run: &Run,
    a: [*const ActQ8K; MR],
    i0: usize,
) {
    let mut acc = [[0f32; MR]; 8];
    for b in 0..run.nb {
        for (j, accj) in acc.iter_mut().enumerate().take(run.nr) {
            let u = unpack::<T, DOT>(run.base.add(run.starts[j] + b * run.stride));
            for (i, acci) in accj.iter_mut().enumerate() {
                let ab = a[i].add(b);
                let (si, sm) = sums::<T, DOT>(&u, ab);
                let da = (*ab).d;
                let mut s = (u.d * da).mul_add(si as f32, *acci);
                if has_min(T) {
                    s = (u.dmin * da).mul_add(-(sm as f32), s);
                }
                *acci = s;
            }
        }
    }
    for (j, accj) in acc.iter().enumerate().take(run.nr) {
        for (i, &v) in accj.iter().enumerate() {
            *run.out.ptr.add((i0 + i) * run.out.ld + run.r0 + j) = v;
        }
    }
}

/// One super-block ready to multiply: for element e of group g = e / 16,
/// w = d sc[g] (q[e] - off) - dmin mn[g].
struct Sb {
    /// Codes before the offset, elements 16c..16c + 16 in vector c.
    q: [int8x16_t; 16],
    /// sdot: lane g of the flattened vectors is `sc[g] - sc[g + 1]` (and
    /// `sc[last]`), per group of 32 (lanes 0..8) or 16 (lanes 0..16).
    coef: [int32x4_t; 4],
    /// No sdot: lane g is `sc[g]`, per group of 32 (`sc16[0]`) or 16.
    sc16: [int16x8_t; 2],
    /// What `bsums` is multiplied by: the minimums per group of 32
    /// (`bc[0]`, against pairwise sums), or per group of 16: the minimums,
    /// or `-off sc` (added to the integer sum).
    bc: [int16x8_t; 2],
    /// Super-block scale.
    d: f32,
    /// Super-block scale of the minimums (zero without).
    dmin: f32,
}

/// The f16 at `p` (widened as a vector: [`crate::neon::f16_at`]'s scalar
/// `fcvt` changes the instruction count of the super-block loops).
#[inline(always)]
unsafe fn f16_at(p: *const u8) -> f32 {
    vgetq_lane_f32::<0>(fcvtl(
        vcreate_u16((p as *const u16).read_unaligned() as u64),
    ))
}

/// The f16 pair at `p` (d then dmin).
#[inline(always)]
unsafe fn f16_pair(p: *const u8) -> (f32, f32) {
    let f = fcvtl(vcreate_u16((p as *const u32).read_unaligned() as u64));
    (vgetq_lane_f32::<0>(f), vgetq_lane_f32::<1>(f))
}

/// The 16 bytes at `p`.
#[inline(always)]
unsafe fn ld(p: *const u8) -> uint8x16_t {
    vld1q_u8(p)
}

/// `acc + p c[lane]`.
#[inline(always)]
unsafe fn mla_lane(acc: int32x4_t, p: int32x4_t, c: int32x4_t, lane: usize) -> int32x4_t {
    match lane {
        0 => vmlaq_laneq_s32::<0>(acc, p, c),
        1 => vmlaq_laneq_s32::<1>(acc, p, c),
        2 => vmlaq_laneq_s32::<2>(acc, p, c),
        _ => vmlaq_laneq_s32::<3>(acc, p, c),
    }
}

/// `acc` plus both halves of `t` (widened) times `s[lane]`: `smlal` and
/// `smlal2` by element, in asm because LLVM otherwise adds the halves
/// first and multiplies by a broadcast scale (five instructions, not two).
#[inline(always)]
unsafe fn smlal_lane(acc: int32x4_t, t: int16x8_t, s: int16x8_t, lane: usize) -> int32x4_t {
    macro_rules! arm {
        ($l:literal) => {{
            let mut acc = acc;
            // SAFETY: plain NEON arithmetic on registers (the by-element
            // 16-bit form takes its element register from v0-v15).
            asm!(
                concat!("smlal {acc:v}.4s, {t:v}.4h, {s:v}.h[", $l, "]"),
                acc = inout(vreg) acc,
                t = in(vreg) t,
                s = in(vreg_low16) s,
                options(pure, nomem, nostack, preserves_flags)
            );
            // SAFETY: as above.
            asm!(
                concat!("smlal2 {acc:v}.4s, {t:v}.8h, {s:v}.h[", $l, "]"),
                acc = inout(vreg) acc,
                t = in(vreg) t,
                s = in(vreg_low16) s,
                options(pure, nomem, nostack, preserves_flags)
            );
            acc
        }};
    }
    match lane {
        0 => arm!(0),
        1 => arm!(1),
        2 => arm!(2),
        3 => arm!(3),
        4 => arm!(4),
        5 => arm!(5),
        6 => arm!(6),
        _ => arm!(7),
    }
}

/// `v` unchanged, but opaque to LLVM: the sdot coefficients are widened
/// once per super-block, and without this LLVM widens each lane again at
/// every `mla` by element (a `dup` and an `sshll` per group).
#[inline(always)]
unsafe fn opaque(v: int32x4_t) -> int32x4_t {
    let mut v = v;
    // SAFETY: an empty asm statement; it only pins the value in a register.
    asm!("/* {v:v} */", v = inout(vreg) v, options(pure, nomem, nostack, preserves_flags));
    v
}

/// The sdot coefficients of eight group scales (0..=63): `sc[g] - sc[g + 1]`.
#[inline(always)]
unsafe fn coef8(sc: uint8x8_t) -> [int32x4_t; 4] {
    let next = vext_u8::<1>(sc, vdup_n_u8(0));
    let d16 = vmovl_s8(vreinterpret_s8_u8(vsub_u8(sc, next)));
    let z = vdupq_n_s32(0);
    [
        opaque(vmovl_s16(vget_low_s16(d16))),
        opaque(vmovl_high_s16(d16)),
        z,
        z,
    ]
}

/// [`opaque`] for 16-bit lanes: without it LLVM splits the offsets' `-off
/// sc` into halves and negates each at every use (`ext` and `neg`).
#[inline(always)]
unsafe fn opaque16(v: int16x8_t) -> int16x8_t {
    let mut v = v;
    // SAFETY: an empty asm statement; it only pins the value in a register.
    asm!("/* {v:v} */", v = inout(vreg) v, options(pure, nomem, nostack, preserves_flags));
    v
}

/// Sixteen signed group scales widened to 16 bits.
#[inline(always)]
unsafe fn widen16(s: int8x16_t) -> [int16x8_t; 2] {
    [vmovl_s8(vget_low_s8(s)), vmovl_high_s8(s)]
}

/// The sdot coefficients of sixteen group scales: `sc[g] - sc[g + 1]`.
#[inline(always)]
unsafe fn coef16(s: [int16x8_t; 2]) -> [int32x4_t; 4] {
    let nlo = vextq_s16::<1>(s[0], s[1]);
    let nhi = vextq_s16::<1>(s[1], vdupq_n_s16(0));
    let (dlo, dhi) = (vsubq_s16(s[0], nlo), vsubq_s16(s[1], nhi));
    [
        opaque(vmovl_s16(vget_low_s16(dlo))),
        opaque(vmovl_high_s16(dlo)),
        opaque(vmovl_s16(vget_low_s16(dhi))),
        opaque(vmovl_high_s16(dhi)),
    ]
}

/// Bytes of a constant table as a vector.
#[inline(always)]
unsafe fn table(t: &[u8; 16]) -> uint8x16_t {
    vld1q_u8(t.as_ptr())
}

/// Q4_K's and Q5_K's 6-bit scales (lanes 0..8) and minimums (lanes 8..16)
/// from the 12 packed bytes at `p` (ggml's `get_scale_min_k4`), with two
/// table lookups instead of ggml's scalar kmask words. Reads 16 bytes.
#[inline(always)]
unsafe fn scales_mins_k4(p: *const u8) -> uint8x16_t {
    // Lanes 0..4: sc = s[l] & 63; 4..8: sc = s[l + 4] & 15 | (s[l - 4] >> 6) << 4;
    // 8..12: mn = s[l - 4] & 63; 12..16: mn = s[l - 4] >> 4 | (s[l - 8] >> 6) << 4.
    const LOW: [u8; 16] = [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11];
    const SHIFT: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xFC, 0xFC, 0xFC, 0xFC];
    const MASK: [u8; 16] = [
        63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63, 15, 15, 15, 15,
    ];
    const HIGH: [u8; 16] = [
        255, 255, 255, 255, 0, 1, 2, 3, 255, 255, 255, 255, 4, 5, 6, 7,
    ];
    let v = ld(p);
    let low = vqtbl1q_u8(v, table(&LOW));
    let low = vandq_u8(
        vshlq_u8(low, vreinterpretq_s8_u8(table(&SHIFT))),
        table(&MASK),
    );
    let high = vandq_u8(
        vshrq_n_u8::<2>(vqtbl1q_u8(v, table(&HIGH))),
        vdupq_n_u8(0x30),
    );
    vorrq_u8(low, high)
}

/// Q3_K's sixteen 6-bit scales (before the -32) from the 12 bytes at
/// `p + 2`, as `kquants::q3k_scales` does with kmask words; reads the 16
/// bytes at `p` (so as not to read past the block).
#[inline(always)]
unsafe fn q3k_scales(p: *const u8) -> uint8x16_t {
    // Scale i: low nibble of s[i % 8] (high nibble from i = 8), high two
    // bits = bits 2 (i / 4).. of s[8 + i % 4]; s[j] is lane j + 2.
    const LOW: [u8; 16] = [2, 3, 4, 5, 6, 7, 8, 9, 2, 3, 4, 5, 6, 7, 8, 9];
    const SHL: [u8; 16] = [
        0, 0, 0, 0, 0, 0, 0, 0, 0xFC, 0xFC, 0xFC, 0xFC, 0xFC, 0xFC, 0xFC, 0xFC,
    ];
    const HIGH: [u8; 16] = [
        10, 11, 12, 13, 10, 11, 12, 13, 10, 11, 12, 13, 10, 11, 12, 13,
    ];
    const SHH: [u8; 16] = [
        0, 0, 0, 0, 0xFE, 0xFE, 0xFE, 0xFE, 0xFC, 0xFC, 0xFC, 0xFC, 0xFA, 0xFA, 0xFA, 0xFA,
    ];
    let v = ld(p);
    let low = vshlq_u8(vqtbl1q_u8(v, table(&LOW)), vreinterpretq_s8_u8(table(&SHL)));
    let high = vandq_u8(
        vshlq_u8(
            vqtbl1q_u8(v, table(&HIGH)),
            vreinterpretq_s8_u8(table(&SHH)),
        ),
        vdupq_n_u8(3),
    );
    // high << 4 over the low nibble of `low`.
    vsliq_n_u8::<4>(low, high)
}

/// Each byte of `v` shifted right by `2j`, so bits `2j..2j + 2` are the
/// low two (the bits above are the caller's to mask or shift out).
#[inline(always)]
unsafe fn crumb_src(v: uint8x16_t, j: usize) -> uint8x16_t {
    match j {
        0 => v,
        1 => vshrq_n_u8::<2>(v),
        2 => vshrq_n_u8::<4>(v),
        _ => vshrq_n_u8::<6>(v),
    }
}

/// Bit `k` of each byte of `v` moved to bit `to` (other bits zero).
#[inline(always)]
unsafe fn bit_to(v: uint8x16_t, k: usize, to: usize) -> uint8x16_t {
    let moved = match k as i32 - to as i32 {
        -4 => vshlq_n_u8::<4>(v),
        -3 => vshlq_n_u8::<3>(v),
        -2 => vshlq_n_u8::<2>(v),
        -1 => vshlq_n_u8::<1>(v),
        0 => v,
        1 => vshrq_n_u8::<1>(v),
        2 => vshrq_n_u8::<2>(v),
        3 => vshrq_n_u8::<3>(v),
        4 => vshrq_n_u8::<4>(v),
        5 => vshrq_n_u8::<5>(v),
        6 => vshrq_n_u8::<6>(v),
        _ => vshrq_n_u8::<7>(v),
    };
    vandq_u8(moved, vdupq_n_u8(1 << to))
}

/// Unpack the super-block at `p`.
#[inline(always)]
unsafe fn unpack<const T: u8, const DOT: bool>(p: *const u8) -> Sb {
    let z16 = vdupq_n_s16(0);
    let mut q = [vdupq_n_s8(0); 16];
    let s = |v: uint8x16_t| vreinterpretq_s8_u8(v);
    match T {
        Q4K | Q5K => {
            let sm = scales_mins_k4(p.add(4));
            let sc8 = vget_low_u8(sm);
            let (qs, hb) = if T == Q5K {
                (p.add(48), [ld(p.add(16)), ld(p.add(32))])
            } else {
                (p.add(16), [vdupq_n_u8(0); 2])
            };
            let m4 = vdupq_n_u8(0x0F);
            // Vector c: group of 32 gc = c / 2, half c % 2; its bytes are
            // qs[32 (gc / 2) + 16 half..], low nibbles for even gc.
            unroll!(C in [0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15] {
                let (gc, half) = (C / 2, C % 2);
                let b = ld(qs.add(32 * (gc / 2) + 16 * half));
                q[C] = s(if T == Q5K {
                    let h = bit_to(hb[half], gc, 4);
                    if gc % 2 == 0 {
                        vbslq_u8(m4, b, h)
                    } else {
                        vsriq_n_u8::<4>(h, b)
                    }
                } else if gc % 2 == 0 {
                    vandq_u8(b, m4)
                } else {
                    vshrq_n_u8::<4>(b)
                });
            });
            let (d, dmin) = f16_pair(p);
            Sb {
                q,
                coef: if DOT { coef8(sc8) } else { [vdupq_n_s32(0); 4] },
                sc16: [vreinterpretq_s16_u16(vmovl_u8(sc8)), z16],
                bc: [vreinterpretq_s16_u16(vmovl_high_u8(sm)), z16],
                d,
                dmin,
            }
        }
        Q6K => {
            let sc = widen16(vld1q_s8(p.add(192) as *const i8));
            // Element 128 n + 32 t + l: ql[64 n + 32 (t & 1) + l], low
            // nibble for t < 2; top bits 2t.. of qh[32 n + l].
            unroll!(NH in [0 1 2 3] {
                let (n, half) = (NH / 2, NH % 2);
                {
                    let h = ld(p.add(128 + 32 * n + 16 * half));
                    let l0 = ld(p.add(64 * n + 16 * half));
                    let l1 = ld(p.add(64 * n + 32 + 16 * half));
                    let h2 = vshrq_n_u8::<2>(h);
                    let m3 = vdupq_n_u8(0x03);
                    let m30 = vdupq_n_u8(0x30);
                    let c = 8 * n + half;
                    q[c + 4] = s(vsriq_n_u8::<4>(vandq_u8(h, m30), l0));
                    q[c + 6] = s(vsriq_n_u8::<4>(vandq_u8(h2, m30), l1));
                    q[c] = s(vsliq_n_u8::<4>(l0, vandq_u8(h, m3)));
                    q[c + 2] = s(vsliq_n_u8::<4>(l1, vandq_u8(h2, m3)));
                }
            });
            Sb {
                q,
                coef: if DOT { coef16(sc) } else { [vdupq_n_s32(0); 4] },
                sc16: sc,
                // Codes are stored plus 32.
                bc: [
                    opaque16(vmulq_n_s16(sc[0], -32)),
                    opaque16(vmulq_n_s16(sc[1], -32)),
                ],
                d: f16_at(p.add(208)),
                dmin: 0.0,
            }
        }
        Q3K => {
            let s8 = vsubq_s8(vreinterpretq_s8_u8(q3k_scales(p.add(94))), vdupq_n_s8(32));
            let sc = widen16(s8);
            // Element 128 n + 32 j + l: bits 2j.. of qs[32 n + l], plus 4
            // where bit 4 n + j of hmask[l] is set.
            let hm = [ld(p), ld(p.add(16))];
            unroll!(C in [0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15] {
                let (n, j, half) = (C / 8, C % 8 / 2, C % 2);
                let b = ld(p.add(32 + 32 * n + 16 * half));
                let hb = bit_to(hm[half], 4 * n + j, 0);
                q[C] = s(vsliq_n_u8::<2>(crumb_src(b, j), hb));
            });
            Sb {
                q,
                coef: if DOT { coef16(sc) } else { [vdupq_n_s32(0); 4] },
                sc16: sc,
                // Codes are stored plus 4.
                bc: [
                    opaque16(vmulq_n_s16(sc[0], -4)),
                    opaque16(vmulq_n_s16(sc[1], -4)),
                ],
                d: f16_at(p.add(108)),
                dmin: 0.0,
            }
        }
        _ => {
            // Q2_K: scales[16] (scale low nibble, minimum high), qs[64].
            let sm = ld(p);
            let sc = widen16(vreinterpretq_s8_u8(vandq_u8(sm, vdupq_n_u8(0x0F))));
            let mn = vshrq_n_u8::<4>(sm);
            let m3 = vdupq_n_u8(0x03);
            unroll!(C in [0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15] {
                let (n, j, half) = (C / 8, C % 8 / 2, C % 2);
                let v = crumb_src(ld(p.add(16 + 32 * n + 16 * half)), j);
                q[C] = s(if j == 3 { v } else { vandq_u8(v, m3) });
            });
            let (d, dmin) = f16_pair(p.add(80));
            Sb {
                q,
                coef: if DOT { coef16(sc) } else { [vdupq_n_s32(0); 4] },
                sc16: sc,
                bc: [
                    vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(mn))),
                    vreinterpretq_s16_u16(vmovl_high_u8(mn)),
                ],
                d,
                dmin,
            }
        }
    }
}

/// The integer sums of super-block `u` with activation block `a`: `sumi`
/// (codes times activations times group scales, less the offsets' share
/// for Q3_K and Q6_K) and `summ` (minimums times group sums; 0 without).
#[inline(always)]
unsafe fn sums<const T: u8, const DOT: bool>(u: &Sb, a: *const ActQ8K) -> (i32, i32) {
    let qa = (*a).qs.as_ptr();
    let x = |c: usize| vld1q_s8(qa.add(16 * c));
    let bs = (*a).bsums.as_ptr();
    let (bs0, bs1) = (vld1q_s16(bs), vld1q_s16(bs.add(8)));
    let mut acc = vdupq_n_s32(0);
    if DOT {
        let mut p = vdupq_n_s32(0);
        if group_len(T) == 32 {
            unroll!(G in [0 1 2 3 4 5 6 7] {
                p = sdot(p, u.q[2 * G], x(2 * G));
                p = sdot(p, u.q[2 * G + 1], x(2 * G + 1));
                acc = if G == 0 {
                    vmulq_laneq_s32::<0>(p, u.coef[0])
                } else {
                    mla_lane(acc, p, u.coef[G / 4], G % 4)
                };
            });
        } else {
            unroll!(G in [0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15] {
                p = sdot(p, u.q[G], x(G));
                acc = if G == 0 {
                    vmulq_laneq_s32::<0>(p, u.coef[0])
                } else {
                    mla_lane(acc, p, u.coef[G / 4], G % 4)
                };
            });
        }
    } else if group_len(T) == 32 {
        // Four products per 16-bit lane: at most 31 * 128 * 4 < 2^15.
        unroll!(G in [0 1 2 3 4 5 6 7] {
            let (q0, q1) = (u.q[2 * G], u.q[2 * G + 1]);
            let (x0, x1) = (x(2 * G), x(2 * G + 1));
            let t = vmull_s8(vget_low_s8(q0), vget_low_s8(x0));
            let t = vmlal_high_s8(t, q0, x0);
            let t = vmlal_s8(t, vget_low_s8(q1), vget_low_s8(x1));
            let t = vmlal_high_s8(t, q1, x1);
            acc = smlal_lane(acc, t, u.sc16[0], G);
        });
    } else {
        // Two products per 16-bit lane: at most 63 * 128 * 2 < 2^15.
        unroll!(G in [0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15] {
            let (q0, x0) = (u.q[G], x(G));
            let t = vmull_s8(vget_low_s8(q0), vget_low_s8(x0));
            let t = vmlal_high_s8(t, q0, x0);
            acc = smlal_lane(acc, t, u.sc16[G / 8], G % 8);
        });
    }
    if group_len(T) == 32 {
        let pairs = vpaddq_s16(bs0, bs1);
        let m = vmull_s16(vget_low_s16(pairs), vget_low_s16(u.bc[0]));
        let m = vmlal_high_s16(m, pairs, u.bc[0]);
        (vaddvq_s32(acc), vaddvq_s32(m))
    } else if has_min(T) {
        let m = vmull_s16(vget_low_s16(bs0), vget_low_s16(u.bc[0]));
        let m = vmlal_high_s16(m, bs0, u.bc[0]);
        let m = vmlal_s16(m, vget_low_s16(bs1), vget_low_s16(u.bc[1]));
        let m = vmlal_high_s16(m, bs1, u.bc[1]);
        (vaddvq_s32(acc), vaddvq_s32(m))
    } else {
        let acc = vmlal_s16(acc, vget_low_s16(bs0), vget_low_s16(u.bc[0]));
        let acc = vmlal_high_s16(acc, bs0, u.bc[0]);
        let acc = vmlal_s16(acc, vget_low_s16(bs1), vget_low_s16(u.bc[1]));
        let acc = vmlal_high_s16(acc, bs1, u.bc[1]);
        (vaddvq_s32(acc), 0)
    }
}

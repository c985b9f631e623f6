//! Prefill (several activation rows) for every quantized type on aarch64,
//! with the dot product instructions (`sdot`) or the int8 matrix multiply
//! (`smmla`).
//!
//! As on x86 (`panel_avx2.rs`), eight weight rows are unpacked once into a
//! panel of 8-bit codes over at most [`KC`] columns (it stays in L1) and
//! every activation row passes over it; longer rows are done in chunks that
//! continue the same f32 accumulators through `out`. `sdot` and `smmla` are
//! signed times signed, so the codes are stored with their offsets already
//! subtracted (Q4_0 -8..7, Q5_0 -16..15, K-quants as `kquants::decode`
//! gives them): no code sums are needed to take an offset back out.
//!
//! Two layouts of the codes, one per instruction:
//! - `sdot` (by element): four columns at a time, one 16-byte vector holds
//!   four codes of each of four rows (two vectors for the eight rows), and
//!   `sdot v.4s, w.16b, a.4b[lane]` against four activation codes advances
//!   four dot products at once, one per lane: no horizontal sums.
//! - `smmla`: eight columns at a time, one vector holds eight codes of two
//!   weight rows (a pair); two activation rows' eight codes, zipped into one
//!   vector, times it give the 2x2 tile `[i0 r0, i0 r1, i1 r0, i1 r1]`, twice
//!   the multiply-adds of an `sdot` per instruction. An odd last activation
//!   row is paired with itself and the copy's results dropped; lanes never
//!   mix, so its products are those it gets beside any other row.
//!
//! The integer dot product of a block (32-weight types) or a group
//! (K-quants) is exact. Blocks meet their f32 scales per block as ggml's
//! vec_dot does; K-quants multiply group sums by the integer sub-block
//! scales and sum over the super-block before the one f32 scale (likewise
//! the minimums with the activation's group sums, themselves done as 8-bit
//! dot products: each sum of 16 codes is split into `16 hi + lo` with both
//! parts in a byte). Each output element has its own lane and sees the same
//! operations in the same order wherever it falls, so the result does not
//! depend on how the runtime splits rows between threads.

use std::arch::aarch64::*;
use std::mem::MaybeUninit;
use std::ops::Range;

use crate::act::act_block;
use crate::blocks::QK_K;
use crate::code::{block_len, has_min, Q2K, Q3K, Q4K, Q4_0, Q4_1, Q5K, Q5_0, Q5_1, Q6K, Q8_0};
use crate::kquants::group_len;
use crate::neon::{f16_at, sdot_lane, smmla};
use crate::{ActBuf, Out, WType, Weights};

/// Weight rows per panel.
const NR: usize = 8;
/// Columns per panel: 8 rows x 2048 codes (16 KiB) plus their scales fit L1
/// beside a tile of activation rows.
pub(crate) const KC: usize = 2048;
/// Activation rows from which the panel path pays for its unpacking.
pub(crate) const MIN_ROWS: usize = 4;

/// Byte offset of (row `r`, column `c`) in a run of codes laid out for
/// `smmla` (`MM`) or for `sdot`.
#[inline(always)]
const fn at<const MM: bool>(r: usize, c: usize) -> usize {
    if MM {
        (c / 8) * 8 * NR + (r / 2) * 16 + (r % 2) * 8 + c % 8
    } else {
        (c / 4) * 4 * NR + r * 4 + c % 4
    }
}

/// Eight weight rows of up to [`KC`] columns, unpacked.
#[repr(C, align(64))]
struct Panel {
    /// Signed codes, laid out as [`at`] says.
    codes: [i8; NR * KC],
    /// 32-weight types: block b's scale at 8b + r.
    ws: [f32; NR * KC / 32],
    /// 32-weight types: block b's minimum at 8b + r.
    wm: [f32; NR * KC / 32],
    /// K-quants: scale group s's integer scale at 8s + r.
    isc: [i32; NR * KC / 16],
    /// K-quants: super-block s's 16 group minimums from byte 128s, laid out
    /// as codes are (one column per group).
    mn: [i8; NR * KC / 16],
    /// K-quants: super-block s's scale at 8s + r.
    d: [f32; NR * KC / QK_K],
    /// K-quants: super-block s's scale of the minimums at 8s + r.
    dm: [f32; NR * KC / QK_K],
}

/// See [`crate::gemm`], for `acts.rows() >= MIN_ROWS` and a quantized type.
///
/// # Safety
/// As [`crate::gemm`], on a CPU with the dot product instructions.
pub(crate) unsafe fn gemm_dotprod_panel(w: &Weights, rows: Range<usize>, acts: &ActBuf, out: Out) {
    by_type::<false>(w, rows, acts, out)
}

/// [`gemm_dotprod_panel`] with `smmla`.
///
/// # Safety
/// As [`crate::gemm`], on a CPU with the dot product and int8 matrix
/// multiply instructions.
pub(crate) unsafe fn gemm_i8mm_panel(w: &Weights, rows: Range<usize>, acts: &ActBuf, out: Out) {
    by_type::<true>(w, rows, acts, out)
}

unsafe fn by_type<const MM: bool>(w: &Weights, rows: Range<usize>, acts: &ActBuf, out: Out) {
    macro_rules! go {
        ($t:ident) => {
            if MM {
                gemm_mm::<$t>(w, rows, acts, out)
            } else {
                gemm_dot::<$t>(w, rows, acts, out)
            }
        };
    }
    match w.wtype {
        WType::Q4_0 => go!(Q4_0),
        WType::Q4_1 => go!(Q4_1),
        WType::Q5_0 => go!(Q5_0),
        WType::Q5_1 => go!(Q5_1),
        WType::Q8_0 => go!(Q8_0),
        WType::Q2K => go!(Q2K),
        WType::Q3K => go!(Q3K),
        WType::Q4K => go!(Q4K),
        WType::Q5K => go!(Q5K),
        WType::Q6K => go!(Q6K),
        t => unreachable!("{t:?} has no panel kernel"),
    }
}

#[target_feature(enable = "dotprod")]
unsafe fn gemm_dot<const T: u8>(w: &Weights, rows: Range<usize>, acts: &ActBuf, out: Out) {
    gemm_t::<T, false>(w, rows, acts, out)
}

#[target_feature(enable = "dotprod,i8mm")]
unsafe fn gemm_mm<const T: u8>(w: &Weights, rows: Range<usize>, acts: &ActBuf, out: Out) {
    gemm_t::<T, true>(w, rows, acts, out)
}

/// The low halves of `a` and `b` (as 64-bit lanes), one after the other.
#[inline(always)]
unsafe fn lo2<V: Copy>(a: V, b: V) -> V {
    let (a, b): (int64x2_t, int64x2_t) =
        (std::mem::transmute_copy(&a), std::mem::transmute_copy(&b));
    std::mem::transmute_copy(&vzip1q_s64(a, b))
}

/// The high halves of `a` and `b` (as 64-bit lanes), one after the other.
#[inline(always)]
unsafe fn hi2<V: Copy>(a: V, b: V) -> V {
    let (a, b): (int64x2_t, int64x2_t) =
        (std::mem::transmute_copy(&a), std::mem::transmute_copy(&b));
    std::mem::transmute_copy(&vzip2q_s64(a, b))
}

/// The two 32-bit values at `p`, twice: a weight pair's lanes of a 2x2 tile.
#[inline(always)]
unsafe fn pair<V: Copy>(p: *const u8) -> V {
    std::mem::transmute_copy(&vld1q_dup_s64(p as *const i64))
}

/// `[x, x, y, y]`: an activation pair's lanes of a 2x2 tile.
#[inline(always)]
unsafe fn dup2(x: f32, y: f32) -> float32x4_t {
    vcombine_f32(vdup_n_f32(x), vdup_n_f32(y))
}

/// Store 16 codes of row `r`, columns `c..c + 16` (`c` a multiple of 16),
/// into the run of codes at `base`.
#[inline(always)]
unsafe fn put16<const MM: bool>(base: *mut i8, r: usize, c: usize, v: int8x16_t) {
    if MM {
        let v = vreinterpretq_s64_s8(v);
        vst1q_lane_s64::<0>(base.add(at::<MM>(r, c)) as *mut i64, v);
        vst1q_lane_s64::<1>(base.add(at::<MM>(r, c + 8)) as *mut i64, v);
    } else {
        let v = vreinterpretq_s32_s8(v);
        vst1q_lane_s32::<0>(base.add(at::<MM>(r, c)) as *mut i32, v);
        vst1q_lane_s32::<1>(base.add(at::<MM>(r, c + 4)) as *mut i32, v);
        vst1q_lane_s32::<2>(base.add(at::<MM>(r, c + 8)) as *mut i32, v);
        vst1q_lane_s32::<3>(base.add(at::<MM>(r, c + 12)) as *mut i32, v);
    }
}

/// 0x10 in each of 16 bytes whose bit is set in `h` (byte j: bit j).
#[inline(always)]
unsafe fn fifth_bits(h: u32) -> uint8x16_t {
    const BITS: [u8; 16] = [1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128];
    let v = vcombine_u8(vdup_n_u8(h as u8), vdup_n_u8((h >> 8) as u8));
    vandq_u8(vtstq_u8(v, vld1q_u8(BITS.as_ptr())), vdupq_n_u8(0x10))
}

/// One 32-weight block's signed codes, columns 0..16 and 16..32.
#[inline(always)]
unsafe fn block_codes<const T: u8>(blk: *const u8) -> (int8x16_t, int8x16_t) {
    match T {
        Q8_0 => (
            vld1q_s8(blk.add(2) as *const i8),
            vld1q_s8(blk.add(18) as *const i8),
        ),
        _ => {
            // Byte j holds column j (low nibble) and j + 16 (high).
            let (qs, qh) = match T {
                Q4_0 => (2, None),
                Q4_1 => (4, None),
                Q5_0 => (6, Some(2)),
                _ => (8, Some(4)),
            };
            let q = vld1q_u8(blk.add(qs));
            let (mut lo, mut hi) = (vandq_u8(q, vdupq_n_u8(0xF)), vshrq_n_u8::<4>(q));
            if let Some(h) = qh {
                let h = (blk.add(h) as *const u32).read_unaligned();
                lo = vorrq_u8(lo, fifth_bits(h));
                hi = vorrq_u8(hi, fifth_bits(h >> 16));
            }
            let off = vdupq_n_s8(match T {
                Q4_0 => 8,
                Q5_0 => 16,
                _ => 0,
            });
            (
                vsubq_s8(vreinterpretq_s8_u8(lo), off),
                vsubq_s8(vreinterpretq_s8_u8(hi), off),
            )
        }
    }
}

/// Unpack `kc` columns of one weight row (blocks `stride` apart from `src`)
/// into row `r` of the panel.
#[inline(always)]
unsafe fn pack<const T: u8, const MM: bool>(
    src: *const u8,
    stride: usize,
    kc: usize,
    p: *mut Panel,
    r: usize,
) {
    let codes = (*p).codes.as_mut_ptr();
    if block_len(T) == 32 {
        for b in 0..kc / 32 {
            let blk = src.add(b * stride);
            let (lo, hi) = block_codes::<T>(blk);
            put16::<MM>(codes, r, 32 * b, lo);
            put16::<MM>(codes, r, 32 * b + 16, hi);
            (*p).ws[b * NR + r] = f16_at(blk);
            if has_min(T) {
                (*p).wm[b * NR + r] = f16_at(blk.add(2));
            }
        }
        return;
    }
    let sg = group_len(T);
    for b in 0..kc / QK_K {
        let blk = src.add(b * stride);
        super_block_codes::<T>(blk, |c, v| put16::<MM>(codes, r, QK_K * b + c, v));
        // Integer scales and minimums, and the f32 super-block scales, at
        // the offsets of ggml's `block_q*_K` (see `kquants::decode`).
        let bytes = std::slice::from_raw_parts(blk, WType::from_code(T).block_bytes());
        let mut sc = [0i32; 16];
        let mut mn = [0i8; 16];
        let (d, dmin) = match T {
            Q2K => {
                for g in 0..16 {
                    sc[g] = (bytes[g] & 0xF) as i32;
                    mn[g] = (bytes[g] >> 4) as i8;
                }
                (f16_at(blk.add(80)), f16_at(blk.add(82)))
            }
            Q3K => {
                let s = crate::kquants::q3k_scales(&bytes[96..108]);
                for g in 0..16 {
                    sc[g] = s[g] as i32 - 32;
                }
                (f16_at(blk.add(108)), 0.0)
            }
            Q4K | Q5K => {
                for j in 0..8 {
                    let (s, m) = crate::kquants::scale_min_k4(j, &bytes[4..16]);
                    sc[j] = s as i32;
                    // At most 63 (6 bits), for both groups of 16.
                    mn[2 * j] = m as i8;
                    mn[2 * j + 1] = m as i8;
                }
                (f16_at(blk), f16_at(blk.add(2)))
            }
            _ => {
                for g in 0..16 {
                    sc[g] = bytes[192 + g] as i8 as i32;
                }
                (f16_at(blk.add(208)), 0.0)
            }
        };
        for s in 0..QK_K / sg {
            (*p).isc[(b * (QK_K / sg) + s) * NR + r] = sc[s];
        }
        if has_min(T) {
            put16::<MM>(
                (*p).mn.as_mut_ptr().add(16 * NR * b),
                r,
                0,
                vld1q_s8(mn.as_ptr()),
            );
        }
        (*p).d[b * NR + r] = d;
        (*p).dm[b * NR + r] = dmin;
    }
}

/// `v` shifted right by `n` bits (a shift count known only at run time).
#[inline(always)]
unsafe fn shr(v: uint8x16_t, n: usize) -> uint8x16_t {
    vshlq_u8(v, vdupq_n_s8(-(n as i8)))
}

/// One K-quant super-block's 256 signed codes (offsets subtracted, as
/// `kquants::decode` gives them), 16 columns at a time: `put(c, codes of
/// columns c..c + 16)`.
#[inline(always)]
unsafe fn super_block_codes<const T: u8>(blk: *const u8, mut put: impl FnMut(usize, int8x16_t)) {
    let s8 = vreinterpretq_s8_u8;
    let (m3, m4) = (vdupq_n_u8(3), vdupq_n_u8(0xF));
    match T {
        // Column 128 n + 32 j + l: bits 2j..2j+2 of qs[32 n + l]; Q3_K
        // subtracts 4 where bit 4n + j of hmask[l] is clear.
        Q2K | Q3K => {
            let qs = blk.add(if T == Q2K { 16 } else { 32 });
            for n in 0..2 {
                for h in 0..2 {
                    let q = vld1q_u8(qs.add(32 * n + 16 * h));
                    for j in 0..4 {
                        let low = vandq_u8(shr(q, 2 * j), m3);
                        let v = if T == Q2K {
                            s8(low)
                        } else {
                            let hm = vld1q_u8(blk.add(16 * h));
                            let bit = vdupq_n_u8(1 << (4 * n + j));
                            let high = vandq_u8(vtstq_u8(hm, bit), vdupq_n_u8(4));
                            vsubq_s8(s8(vorrq_u8(low, high)), vdupq_n_s8(4))
                        };
                        put(128 * n + 32 * j + 16 * h, v);
                    }
                }
            }
        }
        // Column 64 j + l: low nibble of qs[32 j + l], 64 j + 32 + l its high
        // nibble; Q5_K's fifth bits are bits 2j and 2j + 1 of qh[l].
        Q4K | Q5K => {
            let qs = blk.add(if T == Q4K { 16 } else { 48 });
            for j in 0..4 {
                for h in 0..2 {
                    let q = vld1q_u8(qs.add(32 * j + 16 * h));
                    let (mut lo, mut hi) = (vandq_u8(q, m4), vshrq_n_u8::<4>(q));
                    if T == Q5K {
                        let qh = vld1q_u8(blk.add(16 + 16 * h));
                        let f = vdupq_n_u8(0x10);
                        let b0 = vtstq_u8(qh, vdupq_n_u8(1 << (2 * j)));
                        let b1 = vtstq_u8(qh, vdupq_n_u8(2 << (2 * j)));
                        lo = vorrq_u8(lo, vandq_u8(b0, f));
                        hi = vorrq_u8(hi, vandq_u8(b1, f));
                    }
                    put(64 * j + 16 * h, s8(lo));
                    put(64 * j + 32 + 16 * h, s8(hi));
                }
            }
        }
        // Column 128 n + 32 t + l: the low nibble of ql[64 n + l] (t = 0), of
        // ql[64 n + 32 + l] (t = 1), their high nibbles (t = 2, 3), under
        // bits 2t..2t+2 of qh[32 n + l]; minus 32.
        _ => {
            let (ql, qh) = (blk, blk.add(128));
            for n in 0..2 {
                for h in 0..2 {
                    let hv = vld1q_u8(qh.add(32 * n + 16 * h));
                    for t in 0..4 {
                        let lv = vld1q_u8(ql.add(64 * n + 32 * (t & 1) + 16 * h));
                        let low = if t < 2 {
                            vandq_u8(lv, m4)
                        } else {
                            vshrq_n_u8::<4>(lv)
                        };
                        let high = vshlq_n_u8::<4>(vandq_u8(shr(hv, 2 * t), m3));
                        let v = vsubq_s8(s8(vorrq_u8(low, high)), vdupq_n_s8(32));
                        put(128 * n + 32 * t + 16 * h, v);
                    }
                }
            }
        }
    }
}

/// Zero row `r` of the panel (past the end of the range).
#[inline(always)]
unsafe fn clear<const T: u8, const MM: bool>(kc: usize, p: *mut Panel, r: usize) {
    let codes = (*p).codes.as_mut_ptr();
    let z = vdupq_n_s8(0);
    for c in 0..kc / 16 {
        put16::<MM>(codes, r, 16 * c, z);
    }
    for b in 0..kc / 32 {
        (*p).ws[b * NR + r] = 0.0;
        (*p).wm[b * NR + r] = 0.0;
    }
    for s in 0..kc / 16 {
        (*p).isc[s * NR + r] = 0;
    }
    for b in 0..kc / QK_K {
        put16::<MM>((*p).mn.as_mut_ptr().add(16 * NR * b), r, 0, z);
        (*p).d[b * NR + r] = 0.0;
        (*p).dm[b * NR + r] = 0.0;
    }
}

// The body is inlined into the two entry points above, so each is compiled
// with its own target features (the asm helpers inline into their callers).
#[inline(always)]
unsafe fn gemm_t<const T: u8, const MM: bool>(
    w: &Weights,
    rows: Range<usize>,
    acts: &ActBuf,
    out: Out,
) {
    let m = acts.rows();
    let row = |i: usize| -> *const u8 {
        match T {
            Q4_0 | Q5_0 | Q8_0 => acts.q8_0_row(i).as_ptr() as *const u8,
            Q4_1 | Q5_1 => acts.q8_1_row(i).as_ptr() as *const u8,
            _ => acts.q8k_row(i).as_ptr() as *const u8,
        }
    };
    let mut panel = MaybeUninit::<Panel>::uninit();
    let panel = panel.as_mut_ptr();
    let mut r0 = rows.start;
    while r0 < rows.end {
        let nr = (rows.end - r0).min(NR);
        let mut c0 = 0;
        while c0 < w.k {
            let kc = (w.k - c0).min(KC);
            for r in 0..NR {
                if r < nr {
                    let (start, stride) = w.locate(r0 + r);
                    let src = w.bytes.as_ptr().add(start + c0 / block_len(T) * stride);
                    pack::<T, MM>(src, stride, kc, panel, r);
                } else {
                    clear::<T, MM>(kc, panel, r);
                }
            }
            let first = c0 == 0;
            let p = &*panel;
            let dst = |i: usize| out.ptr.add(i * out.ld + r0);
            let mut i0 = 0;
            while i0 < m {
                let mr = (m - i0).min(4);
                if MM {
                    // Pairs of activation rows; an odd last row pairs with
                    // itself and the copy is not stored.
                    let pr = |j: usize| {
                        let (a, b) = (i0 + 2 * j, (i0 + 2 * j + 1).min(i0 + mr - 1));
                        let d1 = if b > a { dst(b) } else { std::ptr::null_mut() };
                        ([row(a), row(b)], [dst(a), d1])
                    };
                    if mr > 2 {
                        let (a0, d0) = pr(0);
                        let (a1, d1) = pr(1);
                        tile_mm::<T, 2>(p, c0, kc, [a0, a1], [d0, d1], nr, first);
                    } else {
                        let (a0, d0) = pr(0);
                        tile_mm::<T, 1>(p, c0, kc, [a0], [d0], nr, first);
                    }
                } else {
                    macro_rules! tile_of {
                        ($n:literal) => {
                            tile_dot::<T, $n>(
                                p,
                                c0,
                                kc,
                                std::array::from_fn(|j| row(i0 + j)),
                                std::array::from_fn(|j| dst(i0 + j)),
                                nr,
                                first,
                            )
                        };
                    }
                    match mr {
                        4 => tile_of!(4),
                        3 => tile_of!(3),
                        2 => tile_of!(2),
                        _ => tile_of!(1),
                    }
                }
                i0 += mr;
            }
            c0 += kc;
        }
        r0 += nr;
    }
}

/// An activation block's sums of 16 codes split as `16 hi + lo`, each in a
/// byte (|sum| <= 16 x 127, so hi fits; 0 <= lo < 16): the minimums' dot
/// product then runs on 8-bit codes like the weights'.
#[inline(always)]
unsafe fn bsums_split(blk: *const u8) -> (int8x16_t, int8x16_t) {
    let b = blk.add(4 + QK_K) as *const i16;
    let (b0, b1) = (vld1q_s16(b), vld1q_s16(b.add(8)));
    let narrow =
        |x: int16x8_t, y: int16x8_t| vuzp1q_s8(vreinterpretq_s8_s16(x), vreinterpretq_s8_s16(y));
    let f = vdupq_n_s16(15);
    (
        narrow(vshrq_n_s16::<4>(b0), vshrq_n_s16::<4>(b1)),
        narrow(vandq_s16(b0, f), vandq_s16(b1, f)),
    )
}

/// The first `nr` floats at `p`, the rest zero.
#[inline(always)]
unsafe fn load8(p: *const f32, nr: usize) -> [float32x4_t; 2] {
    let mut t = [0f32; NR];
    if !p.is_null() {
        std::ptr::copy_nonoverlapping(p, t.as_mut_ptr(), nr);
    }
    [vld1q_f32(t.as_ptr()), vld1q_f32(t.as_ptr().add(4))]
}

/// Store the first `nr` lanes of `v` at `p` (nothing if null).
#[inline(always)]
unsafe fn store8(p: *mut f32, nr: usize, v: [float32x4_t; 2]) {
    if p.is_null() {
        return;
    }
    if nr == NR {
        vst1q_f32(p, v[0]);
        vst1q_f32(p.add(4), v[1]);
        return;
    }
    let mut t = [0f32; NR];
    vst1q_f32(t.as_mut_ptr(), v[0]);
    vst1q_f32(t.as_mut_ptr().add(4), v[1]);
    std::ptr::copy_nonoverlapping(t.as_ptr(), p, nr);
}

/// `acc[i][h] += (the four codes of quad L of `x[i][q / 4]`) times the
/// panel's quad at `w`, rows 4h..4h+4.
macro_rules! dot_quad {
    ($acc:ident, $w:expr, $x:ident, $h:expr, $l:literal, $m:ident) => {{
        let w0 = vld1q_s8($w);
        let w1 = vld1q_s8($w.add(16));
        for i in 0..$m {
            $acc[i][0] = sdot_lane::<$l>($acc[i][0], w0, $x[i][$h]);
            $acc[i][1] = sdot_lane::<$l>($acc[i][1], w1, $x[i][$h]);
        }
    }};
}

/// 16 columns (from the panel's codes at `cw`, laid out for `sdot`) times
/// the activation codes `x[i][h]`, added to `acc`.
macro_rules! dot16 {
    ($acc:ident, $cw:expr, $x:ident, $h:expr, $m:ident) => {{
        let cw = $cw;
        dot_quad!($acc, cw, $x, $h, 0, $m);
        dot_quad!($acc, cw.add(32), $x, $h, 1, $m);
        dot_quad!($acc, cw.add(64), $x, $h, 2, $m);
        dot_quad!($acc, cw.add(96), $x, $h, 3, $m);
    }};
}

/// Activation rows `a` (`sdot` layout) against the panel's eight rows,
/// columns `c0..c0 + kc`: `dst[i][0..nr]` gets the products (added to what
/// they hold unless `first`).
#[inline(always)]
unsafe fn tile_dot<const T: u8, const M: usize>(
    p: &Panel,
    c0: usize,
    kc: usize,
    a: [*const u8; M],
    dst: [*mut f32; M],
    nr: usize,
    first: bool,
) {
    let (ab, co) = act_block(T);
    let z = vdupq_n_s32(0);
    let mut acc = [[vdupq_n_f32(0.0); 2]; M];
    if !first {
        for i in 0..M {
            acc[i] = load8(dst[i], nr);
        }
    }
    let cw = p.codes.as_ptr();
    if block_len(T) == 32 {
        let b0 = c0 / 32;
        for g in 0..kc / 32 {
            let blk: [*const u8; M] = std::array::from_fn(|i| a[i].add(ab * (b0 + g)));
            let x: [[int8x16_t; 2]; M] = std::array::from_fn(|i| {
                let q = blk[i].add(co) as *const i8;
                [vld1q_s8(q), vld1q_s8(q.add(16))]
            });
            let mut ia = [[z; 2]; M];
            let c = cw.add(32 * NR * g);
            dot16!(ia, c, x, 0, M);
            dot16!(ia, c.add(16 * NR), x, 1, M);
            let ws = [
                vld1q_f32(p.ws.as_ptr().add(g * NR)),
                vld1q_f32(p.ws.as_ptr().add(g * NR + 4)),
            ];
            // Minimums are unpacked only for the types that have them.
            let wm = if has_min(T) {
                [
                    vld1q_f32(p.wm.as_ptr().add(g * NR)),
                    vld1q_f32(p.wm.as_ptr().add(g * NR + 4)),
                ]
            } else {
                [vdupq_n_f32(0.0); 2]
            };
            for i in 0..M {
                let da = *(blk[i] as *const f32);
                for h in 0..2 {
                    let v = vcvtq_f32_s32(ia[i][h]);
                    acc[i][h] = vfmaq_f32(acc[i][h], v, vmulq_n_f32(ws[h], da));
                    if has_min(T) {
                        let s = *(blk[i].add(4) as *const f32);
                        acc[i][h] = vfmaq_n_f32(acc[i][h], wm[h], s);
                    }
                }
            }
        }
    } else {
        let sg = group_len(T);
        let nsg = QK_K / sg;
        let s0 = c0 / QK_K;
        for sb in 0..kc / QK_K {
            let blk: [*const u8; M] = std::array::from_fn(|i| a[i].add(ab * (s0 + sb)));
            let mut ia = [[z; 2]; M];
            for s in 0..nsg {
                let mut ga = [[z; 2]; M];
                for h in 0..sg / 16 {
                    let col = QK_K * sb + sg * s + 16 * h;
                    let x: [[int8x16_t; 1]; M] = std::array::from_fn(|i| {
                        [vld1q_s8(blk[i].add(co + col - QK_K * sb) as *const i8)]
                    });
                    dot16!(ga, cw.add(col * NR), x, 0, M);
                }
                let isc = p.isc.as_ptr().add((sb * nsg + s) * NR);
                let sc = [vld1q_s32(isc), vld1q_s32(isc.add(4))];
                for i in 0..M {
                    for h in 0..2 {
                        ia[i][h] = vmlaq_s32(ia[i][h], ga[i][h], sc[h]);
                    }
                }
            }
            let mut ma = [[z; 2]; M];
            if has_min(T) {
                let split: [(int8x16_t, int8x16_t); M] =
                    std::array::from_fn(|i| bsums_split(blk[i]));
                let hi: [[int8x16_t; 1]; M] = std::array::from_fn(|i| [split[i].0]);
                let lo: [[int8x16_t; 1]; M] = std::array::from_fn(|i| [split[i].1]);
                let mw = p.mn.as_ptr().add(16 * NR * sb);
                dot16!(ma, mw, hi, 0, M);
                for i in 0..M {
                    for h in 0..2 {
                        ma[i][h] = vshlq_n_s32::<4>(ma[i][h]);
                    }
                }
                dot16!(ma, mw, lo, 0, M);
            }
            let d = [
                vld1q_f32(p.d.as_ptr().add(sb * NR)),
                vld1q_f32(p.d.as_ptr().add(sb * NR + 4)),
            ];
            let dm = [
                vld1q_f32(p.dm.as_ptr().add(sb * NR)),
                vld1q_f32(p.dm.as_ptr().add(sb * NR + 4)),
            ];
            for i in 0..M {
                let da = *(blk[i] as *const f32);
                for h in 0..2 {
                    acc[i][h] =
                        vfmaq_f32(acc[i][h], vcvtq_f32_s32(ia[i][h]), vmulq_n_f32(d[h], da));
                    if has_min(T) {
                        let m = vcvtq_f32_s32(ma[i][h]);
                        acc[i][h] = vfmsq_f32(acc[i][h], m, vmulq_n_f32(dm[h], da));
                    }
                }
            }
        }
    }
    for i in 0..M {
        store8(dst[i], nr, acc[i]);
    }
}

/// Pairs of activation rows `a` (`smmla` layout) against the panel's eight
/// rows, columns `c0..c0 + kc`: `dst[j][k][0..nr]` gets the products of row
/// `a[j][k]` (added to what they hold unless `first`; a null `dst` is the
/// copy of an odd row, not stored).
#[inline(always)]
unsafe fn tile_mm<const T: u8, const P: usize>(
    p: &Panel,
    c0: usize,
    kc: usize,
    a: [[*const u8; 2]; P],
    dst: [[*mut f32; 2]; P],
    nr: usize,
    first: bool,
) {
    let (ab, co) = act_block(T);
    let z = vdupq_n_s32(0);
    // acc[j][q]: weight rows 2q, 2q + 1 of activation rows a[j], as 2x2 tiles.
    let mut acc = [[vdupq_n_f32(0.0); 4]; P];
    if !first {
        for j in 0..P {
            let (x, y) = (load8(dst[j][0], nr), load8(dst[j][1], nr));
            acc[j] = [
                lo2(x[0], y[0]),
                hi2(x[0], y[0]),
                lo2(x[1], y[1]),
                hi2(x[1], y[1]),
            ];
        }
    }
    let cw = p.codes.as_ptr();
    // Weight pair q's 8 codes of the octet at `c` times the zipped activation codes.
    macro_rules! octet {
        ($acc:ident, $c:expr, $x:expr) => {{
            let c = $c;
            let w: [int8x16_t; 4] = std::array::from_fn(|q| vld1q_s8(c.add(16 * q)));
            for j in 0..P {
                for q in 0..4 {
                    $acc[j][q] = smmla($acc[j][q], $x[j], w[q]);
                }
            }
        }};
    }
    // The two rows' codes at byte `off` of their blocks, 16 columns as two
    // zipped octets.
    let zip16 = |blk: &[[*const u8; 2]; P], off: usize| -> [[int8x16_t; 2]; P] {
        std::array::from_fn(|j| {
            let x0 = vld1q_s8(blk[j][0].add(off) as *const i8);
            let x1 = vld1q_s8(blk[j][1].add(off) as *const i8);
            [lo2(x0, x1), hi2(x0, x1)]
        })
    };
    if block_len(T) == 32 {
        let b0 = c0 / 32;
        for g in 0..kc / 32 {
            let blk: [[*const u8; 2]; P] =
                std::array::from_fn(|j| [a[j][0].add(ab * (b0 + g)), a[j][1].add(ab * (b0 + g))]);
            let xl = zip16(&blk, co);
            let xh = zip16(&blk, co + 16);
            let mut ia = [[z; 4]; P];
            let c = cw.add(32 * NR * g);
            let col = |o: usize| -> [int8x16_t; P] {
                std::array::from_fn(|j| if o < 2 { xl[j][o] } else { xh[j][o - 2] })
            };
            octet!(ia, c, col(0));
            octet!(ia, c.add(8 * NR), col(1));
            octet!(ia, c.add(16 * NR), col(2));
            octet!(ia, c.add(24 * NR), col(3));
            let ws: [float32x4_t; 4] =
                std::array::from_fn(|q| pair(p.ws.as_ptr().add(g * NR + 2 * q) as *const u8));
            let wm: [float32x4_t; 4] = std::array::from_fn(|q| {
                if has_min(T) {
                    pair(p.wm.as_ptr().add(g * NR + 2 * q) as *const u8)
                } else {
                    vdupq_n_f32(0.0)
                }
            });
            for j in 0..P {
                let f = |k: usize, o: usize| *(blk[j][k].add(o) as *const f32);
                let da = dup2(f(0, 0), f(1, 0));
                let s = if has_min(T) {
                    dup2(f(0, 4), f(1, 4))
                } else {
                    vdupq_n_f32(0.0)
                };
                for q in 0..4 {
                    let v = vcvtq_f32_s32(ia[j][q]);
                    acc[j][q] = vfmaq_f32(acc[j][q], v, vmulq_f32(ws[q], da));
                    if has_min(T) {
                        acc[j][q] = vfmaq_f32(acc[j][q], wm[q], s);
                    }
                }
            }
        }
    } else {
        let sg = group_len(T);
        let nsg = QK_K / sg;
        let s0 = c0 / QK_K;
        for sb in 0..kc / QK_K {
            let blk: [[*const u8; 2]; P] =
                std::array::from_fn(|j| [a[j][0].add(ab * (s0 + sb)), a[j][1].add(ab * (s0 + sb))]);
            let mut ia = [[z; 4]; P];
            for s in 0..nsg {
                let mut ga = [[z; 4]; P];
                for h in 0..sg / 16 {
                    let col = sg * s + 16 * h;
                    let x = zip16(&blk, co + col);
                    let c = cw.add((QK_K * sb + col) * NR);
                    octet!(ga, c, std::array::from_fn::<_, P, _>(|j| x[j][0]));
                    octet!(
                        ga,
                        c.add(8 * NR),
                        std::array::from_fn::<_, P, _>(|j| x[j][1])
                    );
                }
                let isc = p.isc.as_ptr().add((sb * nsg + s) * NR);
                for q in 0..4 {
                    let sc: int32x4_t = pair(isc.add(2 * q) as *const u8);
                    for j in 0..P {
                        ia[j][q] = vmlaq_s32(ia[j][q], ga[j][q], sc);
                    }
                }
            }
            let mut ma = [[z; 4]; P];
            if has_min(T) {
                let split: [[(int8x16_t, int8x16_t); 2]; P] =
                    std::array::from_fn(|j| [bsums_split(blk[j][0]), bsums_split(blk[j][1])]);
                let hi: [[int8x16_t; 2]; P] = std::array::from_fn(|j| {
                    let (x, y) = (split[j][0].0, split[j][1].0);
                    [lo2(x, y), hi2(x, y)]
                });
                let lo: [[int8x16_t; 2]; P] = std::array::from_fn(|j| {
                    let (x, y) = (split[j][0].1, split[j][1].1);
                    [lo2(x, y), hi2(x, y)]
                });
                let mw = p.mn.as_ptr().add(16 * NR * sb);
                octet!(ma, mw, std::array::from_fn::<_, P, _>(|j| hi[j][0]));
                octet!(
                    ma,
                    mw.add(8 * NR),
                    std::array::from_fn::<_, P, _>(|j| hi[j][1])
                );
                for j in 0..P {
                    for q in 0..4 {
                        ma[j][q] = vshlq_n_s32::<4>(ma[j][q]);
                    }
                }
                octet!(ma, mw, std::array::from_fn::<_, P, _>(|j| lo[j][0]));
                octet!(
                    ma,
                    mw.add(8 * NR),
                    std::array::from_fn::<_, P, _>(|j| lo[j][1])
                );
            }
            let d: [float32x4_t; 4] =
                std::array::from_fn(|q| pair(p.d.as_ptr().add(sb * NR + 2 * q) as *const u8));
            let dm: [float32x4_t; 4] =
                std::array::from_fn(|q| pair(p.dm.as_ptr().add(sb * NR + 2 * q) as *const u8));
            for j in 0..P {
                let da = dup2(*(blk[j][0] as *const f32), *(blk[j][1] as *const f32));
                for q in 0..4 {
                    acc[j][q] = vfmaq_f32(acc[j][q], vcvtq_f32_s32(ia[j][q]), vmulq_f32(d[q], da));
                    if has_min(T) {
                        let m = vcvtq_f32_s32(ma[j][q]);
                        acc[j][q] = vfmsq_f32(acc[j][q], m, vmulq_f32(dm[q], da));
                    }
                }
            }
        }
    }
    for j in 0..P {
        let r0 = [lo2(acc[j][0], acc[j][1]), lo2(acc[j][2], acc[j][3])];
        let r1 = [hi2(acc[j][0], acc[j][1]), hi2(acc[j][2], acc[j][3])];
        store8(dst[j][0], nr, r0);
        store8(dst[j][1], nr, r1);
    }
}

#[cfg(test)]
mod tests {
    use crate::testing::{run, Rng};
    use crate::{ActBuf, Family, Isa, WType, Weights};

    /// Random blocks of `wtype` with finite f16 scales.
    fn weights(wtype: WType, k: usize, n: usize, rng: &mut Rng) -> Vec<u8> {
        let bb = wtype.block_bytes();
        let mut v: Vec<u8> = (0..n * k / wtype.block_len() * bb)
            .map(|_| rng.next() as u8)
            .collect();
        let f16s: &[usize] = match wtype {
            WType::Q4_0 | WType::Q5_0 | WType::Q8_0 => &[0],
            WType::Q4_1 | WType::Q5_1 | WType::Q4K | WType::Q5K => &[0, 2],
            WType::Q2K => &[80, 82],
            WType::Q3K => &[108],
            _ => &[208],
        };
        for blk in v.chunks_exact_mut(bb) {
            for &o in f16s {
                let s = half::f16::from_f32(0.001 + 0.01 * rng.f().abs());
                blk[o..o + 2].copy_from_slice(&s.to_le_bytes());
            }
        }
        v
    }

    /// Every batch size's remainder tiles (1, 2 and 3 rows past the tiles of
    /// four; for `smmla` a lone row paired with itself, a pair, a pair and a
    /// lone row) give each row the bits it gets in a batch of four.
    #[test]
    fn remainder_tiles_give_the_same_bits() {
        let mut rng = Rng(0xA5A5_0F0F_1234_4321);
        let types = WType::ALL
            .into_iter()
            .filter(|t| t.family() != Family::Float);
        let tiers: Vec<Isa> = Isa::detect()
            .tiers()
            .into_iter()
            .filter(|t| t.panel_rows() > 1)
            .collect();
        eprintln!(
            "panel tiers checked: [{}]",
            tiers
                .iter()
                .map(|t| t.name())
                .collect::<Vec<_>>()
                .join(", ")
        );
        for wtype in types {
            let (k, n) = (512, 11);
            let wb = weights(wtype, k, n, &mut rng);
            let w = Weights::new(wtype, &wb, k, n).unwrap();
            for &isa in &tiers {
                let four = isa.panel_rows();
                assert_eq!(four, 4);
                for m in 4..=7 {
                    let x: Vec<f32> = (0..m * k).map(|_| rng.f()).collect();
                    let mut a = ActBuf::new(wtype.act_type(), k, m);
                    a.quantize(&x);
                    let all = run(&w, &a, isa);
                    for i in 0..m {
                        let mut rows = x[i * k..(i + 1) * k].to_vec();
                        for j in (0..m).filter(|&j| j != i).take(3) {
                            rows.extend_from_slice(&x[j * k..(j + 1) * k]);
                        }
                        let mut b = ActBuf::new(wtype.act_type(), k, four);
                        b.quantize(&rows);
                        let one = run(&w, &b, isa);
                        for r in 0..n {
                            assert_eq!(
                                all[i * n + r].to_bits(),
                                one[r].to_bits(),
                                "{isa} {wtype:?} m={m} ({i},{r})"
                            );
                            assert!(all[i * n + r].is_finite());
                        }
                    }
                }
            }
        }
    }
}

//! The K-quant types (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K): dequantization as
//! ggml's `dequantize_row_q*_K`, and the scalar dot products with Q8_K
//! activations as ggml's `ggml_vec_dot_q*_K_q8_K` (the portable path and the
//! reference for the AVX2 kernels in `kquants_avx2.rs`).
//!
//! Every type is decoded to one shape: 256 signed codes, an integer scale
//! and minimum per group of 16 (Q4_K and Q5_K repeat theirs over both
//! halves of a group of 32), and the super-block's f32 scales, so that
//! w = (d sc) q - dmin mn. A dot product sums sc q a per super-block in i32,
//! and mn times the activations' group sums (`bsums`) apart, then scales both
//! in f32, as ggml does.
//!
//! Blocks are read by byte offset, so weights need no alignment at all.

use std::ops::Range;

use half::f16;

use crate::act::ActQ8K;
use crate::blocks::QK_K;
use crate::code::{Q2K, Q3K, Q6K};
use crate::{ActBuf, Out, WType, Weights};

/// Groups of 16 per super-block.
pub(crate) const NG: usize = QK_K / 16;

/// The f16 at byte `i` of `b`.
#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Columns per scale group of the type with code `t` (one scale, and one
/// minimum where it has them): 16 for Q2_K, Q3_K and Q6_K, 32 for Q4_K and
/// Q5_K (and for the 32-weight types, whose block is their group).
pub(crate) const fn group_len(t: u8) -> usize {
    match t {
        Q2K | Q3K | Q6K => 16,
        _ => 32,
    }
}

/// ggml's `get_scale_min_k4`: scale and minimum of group `j` of 32 from the
/// 12 packed bytes of Q4_K and Q5_K.
#[inline(always)]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Q3_K's sixteen 6-bit scales (before ggml subtracts 32), unpacked from 12
/// bytes as `dequantize_row_q3_K` does with its kmask words.
#[inline(always)]
pub(crate) fn q3k_scales(s: &[u8]) -> [u8; 16] {
    const KMASK1: u32 = 0x0303_0303;
    const KMASK2: u32 = 0x0f0f_0f0f;
    let w = |i: usize| u32::from_le_bytes([s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]]);
    let (a0, a1, tmp) = (w(0), w(1), w(2));
    let aux = [
        (a0 & KMASK2) | ((tmp & KMASK1) << 4),
        (a1 & KMASK2) | (((tmp >> 2) & KMASK1) << 4),
        ((a0 >> 4) & KMASK2) | (((tmp >> 4) & KMASK1) << 4),
        ((a1 >> 4) & KMASK2) | (((tmp >> 6) & KMASK1) << 4),
    ];
    let mut out = [0u8; 16];
    for (o, a) in out.chunks_exact_mut(4).zip(aux) {
        o.copy_from_slice(&a.to_le_bytes());
    }
    out
}

/// One super-block in the common shape: w = (d sc[g]) q - dmin mn[g] for
/// element e of group g = e / 16.
pub(crate) struct Decoded {
    /// Signed codes in element order, offsets already subtracted.
    pub(crate) q: [i8; QK_K],
    /// Integer scale per group of 16.
    pub(crate) sc: [i32; NG],
    /// Integer minimum per group of 16 (zero for Q3_K and Q6_K).
    pub(crate) mn: [i32; NG],
    /// Super-block scale.
    pub(crate) d: f32,
    /// Super-block scale of the minimums (zero for Q3_K and Q6_K).
    pub(crate) dmin: f32,
}

/// Decode one super-block of `wtype` (the layouts of ggml's `dequantize_row_q*_K`).
pub(crate) fn decode(wtype: WType, blk: &[u8]) -> Decoded {
    let mut o = Decoded {
        q: [0; QK_K],
        sc: [0; NG],
        mn: [0; NG],
        d: 0.0,
        dmin: 0.0,
    };
    match wtype {
        WType::Q2K => {
            // scales[16] qs[64] d dmin
            let (scales, qs) = (&blk[0..16], &blk[16..80]);
            o.d = f16_at(blk, 80);
            o.dmin = f16_at(blk, 82);
            for (g, &s) in scales.iter().enumerate() {
                o.sc[g] = (s & 0xF) as i32;
                o.mn[g] = (s >> 4) as i32;
            }
            // Element 128 n + 32 j + l is bits 2j..2j+2 of qs[32 n + l].
            for n in 0..2 {
                for j in 0..4 {
                    for l in 0..32 {
                        o.q[128 * n + 32 * j + l] = ((qs[32 * n + l] >> (2 * j)) & 3) as i8;
                    }
                }
            }
        }
        WType::Q3K => {
            // hmask[32] qs[64] scales[12] d
            let (hm, qs) = (&blk[0..32], &blk[32..96]);
            o.d = f16_at(blk, 108);
            let s = q3k_scales(&blk[96..108]);
            for (sc, &s) in o.sc.iter_mut().zip(&s) {
                *sc = s as i32 - 32;
            }
            // As Q2_K, minus 4 where bit 4n + j of hmask[l] is clear.
            for n in 0..2 {
                for j in 0..4 {
                    let bit = 1u8 << (4 * n + j);
                    for l in 0..32 {
                        let low = ((qs[32 * n + l] >> (2 * j)) & 3) as i8;
                        o.q[128 * n + 32 * j + l] = low - if hm[l] & bit != 0 { 0 } else { 4 };
                    }
                }
            }
        }
        WType::Q4K | WType::Q5K => {
            // d dmin scales[12] (qh[32]) qs[128]
            o.d = f16_at(blk, 0);
            o.dmin = f16_at(blk, 2);
            let scales = &blk[4..16];
            for j in 0..8 {
                let (sc, mn) = scale_min_k4(j, scales);
                o.sc[2 * j] = sc as i32;
                o.sc[2 * j + 1] = sc as i32;
                o.mn[2 * j] = mn as i32;
                o.mn[2 * j + 1] = mn as i32;
            }
            let (qh, qs) = if wtype == WType::Q5K {
                (Some(&blk[16..48]), &blk[48..176])
            } else {
                (None, &blk[16..144])
            };
            // Element 64 j + l is the low nibble of qs[32 j + l], element
            // 64 j + 32 + l its high nibble; Q5_K's fifth bit of group c of
            // 32 is bit c of qh[l].
            for j in 0..4 {
                for l in 0..32 {
                    let b = qs[32 * j + l];
                    let (mut lo, mut hi) = (b & 0xF, b >> 4);
                    if let Some(qh) = qh {
                        lo |= ((qh[l] >> (2 * j)) & 1) << 4;
                        hi |= ((qh[l] >> (2 * j + 1)) & 1) << 4;
                    }
                    o.q[64 * j + l] = lo as i8;
                    o.q[64 * j + 32 + l] = hi as i8;
                }
            }
        }
        WType::Q6K => {
            // ql[128] qh[64] scales[16] d
            let (ql, qh) = (&blk[0..128], &blk[128..192]);
            o.d = f16_at(blk, 208);
            for g in 0..NG {
                o.sc[g] = blk[192 + g] as i8 as i32;
            }
            // Element 128 n + 32 t + l: low nibble of ql[64 n + l] (t = 0),
            // of ql[64 n + 32 + l] (t = 1), their high nibbles (t = 2, 3);
            // the top two bits are bits 2t..2t+2 of qh[32 n + l].
            for n in 0..2 {
                for t in 0..4 {
                    for l in 0..32 {
                        let b = ql[64 * n + 32 * (t & 1) + l];
                        let low = if t < 2 { b & 0xF } else { b >> 4 };
                        let high = (qh[32 * n + l] >> (2 * t)) & 3;
                        o.q[128 * n + 32 * t + l] = (low | high << 4) as i8 - 32;
                    }
                }
            }
        }
        _ => unreachable!("{wtype:?} is not a K-quant type"),
    }
    o
}

/// ggml's `ggml_vec_dot_q*_K_q8_K`: per super-block, the integer sums
/// `sumi = sum sc q a` and `summ = sum mn bsum`, scaled in f32.
fn dot(w: &Weights, r: usize, a: &[ActQ8K]) -> f32 {
    let mut sumf = 0f32;
    for (b, ab) in a.iter().enumerate() {
        let x = decode(w.wtype, w.block(r, b));
        let mut sumi = 0i32;
        for g in 0..NG {
            let s: i32 = (0..16)
                .map(|l| x.q[16 * g + l] as i32 * ab.qs[16 * g + l] as i32)
                .sum();
            sumi += x.sc[g] * s;
        }
        let summ: i32 = (0..NG).map(|g| x.mn[g] * ab.bsums[g] as i32).sum();
        sumf += (x.d * ab.d) * sumi as f32 - (x.dmin * ab.d) * summ as f32;
    }
    sumf
}

/// The portable path.
///
/// # Safety
/// As [`crate::gemm`].
pub(crate) unsafe fn gemm_scalar(w: &Weights, rows: Range<usize>, acts: &ActBuf, out: Out) {
    for i in 0..acts.rows() {
        let a = acts.q8k_row(i);
        for r in rows.clone() {
            *out.ptr.add(i * out.ld + r) = dot(w, r, a);
        }
    }
}

/// Dequantize whole blocks of `wtype` into `out` (see [`crate::reference::dequantize`]).
pub(crate) fn dequantize(wtype: WType, bytes: &[u8], out: &mut [f32]) {
    let bb = wtype.block_bytes();
    assert!(
        bytes.len().is_multiple_of(bb),
        "{wtype:?}: {} bytes are not whole blocks",
        bytes.len()
    );
    for (blk, o) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(QK_K)) {
        let x = decode(wtype, blk);
        for (g, og) in o.chunks_exact_mut(16).enumerate() {
            // ggml's order of operations: dl = d sc, ml = dmin mn, y = dl q - ml.
            let dl = x.d * x.sc[g] as f32;
            let ml = x.dmin * x.mn[g] as f32;
            for (y, &q) in og.iter_mut().zip(&x.q[16 * g..16 * g + 16]) {
                *y = dl * q as f32 - ml;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{self, Family, Rng};

    const TYPES: [WType; 5] = [WType::Q4K, WType::Q6K, WType::Q5K, WType::Q3K, WType::Q2K];

    /// Byte offsets of the f16 super-block scales in one block of `t`.
    fn f16_fields(t: WType) -> &'static [usize] {
        match t {
            WType::Q2K => &[80, 82],
            WType::Q3K => &[108],
            WType::Q4K | WType::Q5K => &[0, 2],
            WType::Q6K => &[208],
            _ => unreachable!(),
        }
    }

    /// `n` rows of `k` weights: random codes and group scales, f16 scales in
    /// ±[0.0001, 0.002] (the group scales multiply them by up to 63 or 128).
    fn weights(t: WType, k: usize, n: usize, rng: &mut Rng) -> Vec<u8> {
        let bb = t.block_bytes();
        let mut v: Vec<u8> = (0..n * k / QK_K * bb).map(|_| rng.next() as u8).collect();
        for blk in v.chunks_exact_mut(bb) {
            for &o in f16_fields(t) {
                let d = rng.f().signum() * (0.0001 + 0.0019 * rng.f().abs());
                blk[o..o + 2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
            }
        }
        v
    }

    /// `m` rows of activations of varied magnitude, rounded to Q8_K.
    fn acts(k: usize, m: usize, rng: &mut Rng) -> (Vec<f32>, ActBuf) {
        let x: Vec<f32> = (0..m * k)
            .map(|i| rng.f() * (1.0 + (i / k) as f32))
            .collect();
        let mut a = ActBuf::new(crate::ActType::Q8K, k, m);
        a.quantize(&x);
        (x, a)
    }

    /// The bound on |kernel - reference::dot_f64| for weight row `w` and
    /// activation row `i`: the reference's rounding of each weight (dl q - ml)
    /// and activation (d q) to f32, the kernel's rounding of d * d_a and of
    /// its product with the exact integer sum per super-block, and of the
    /// running sum over `nb` super-blocks (plus a horizontal sum of eight
    /// lanes in AVX2), each at most one ulp of the sum of magnitudes of the
    /// terms (the scale's and the minimum's taken apart, as the kernel sums
    /// them apart).
    fn bound(wtype: WType, w: &[u8], a: &ActBuf, i: usize) -> f64 {
        let bb = wtype.block_bytes();
        let nb = w.len() / bb;
        let ad = a.dequantize_row(i);
        let mut mag = 0f64;
        for (b, blk) in w.chunks_exact(bb).enumerate() {
            let x = decode(wtype, blk);
            for e in 0..QK_K {
                let g = e / 16;
                let ww = (x.d as f64 * x.sc[g] as f64 * x.q[e] as f64).abs()
                    + (x.dmin as f64 * x.mn[g] as f64).abs();
                mag += ww * (ad[b * QK_K + e] as f64).abs();
            }
        }
        (nb as f64 + 6.0) * f32::EPSILON as f64 * mag
    }

    const SHAPES: [(usize, usize); 10] = [
        // Longer than a prefill panel's 2048 columns: two chunks.
        (2304, 9),
        (256, 1),
        (256, 5),
        (256, 17),
        (768, 1),
        (768, 5),
        (768, 17),
        (1536, 1),
        (1536, 5),
        (1536, 17),
    ];

    struct Fam;

    impl Family for Fam {
        const TYPES: &'static [WType] = &TYPES;
        const SHAPES: &'static [(usize, usize)] = &SHAPES;
        const TILE_SHAPES: &'static [(usize, usize)] = &[(768, 17), (256, 70), (2304, 9)];
        const TILE_ROWS: &'static [usize] = &[1, 3, 8, 13];
        fn weights(wtype: WType, k: usize, n: usize, rng: &mut Rng) -> Vec<u8> {
            weights(wtype, k, n, rng)
        }
        fn acts(wtype: WType, k: usize, m: usize, rng: &mut Rng) -> (Vec<f32>, ActBuf) {
            let _ = wtype;
            acts(k, m, rng)
        }
        fn bound(wtype: WType, w: &[u8], a: &ActBuf, i: usize) -> f64 {
            bound(wtype, w, a, i)
        }
    }

    #[test]
    fn scalar_matches_reference_within_bound() {
        testing::scalar_matches_reference::<Fam>();
    }

    #[test]
    fn simd_matches_scalar_and_reference() {
        testing::simd_matches_scalar_and_reference::<Fam>();
    }

    /// Every element of a tiled product equals the same element computed
    /// alone (one activation row, one weight row), bit for bit.
    #[test]
    fn tiles_are_bit_identical_to_single_products() {
        testing::tiles_are_bit_identical::<Fam>();
    }

    #[test]
    fn rows8_layout_gives_the_same_products() {
        testing::rows8_layout_gives_the_same_products::<Fam>();
    }

    fn h(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    #[test]
    fn dequantize_follows_ggml_layout() {
        let mut out = [0f32; QK_K];

        // Q2_K: group 0 scale 3 min 1, group 1 scale 5 min 2; byte qs[0] =
        // 0b11_10_01_00 feeds elements 0, 32, 64, 96; qs[16] feeds element 16.
        let mut b = vec![0u8; 84];
        b[0] = 0x13;
        b[1] = 0x25;
        b[16] = 0b1110_0100;
        b[16 + 16] = 0b0000_0011;
        b[80..82].copy_from_slice(&h(0.5));
        b[82..84].copy_from_slice(&h(0.25));
        dequantize(WType::Q2K, &b, &mut out);
        // 0.5*3*q - 0.25*1 for elements 0, 1 (q = 0, 0); 0.5*5*3 - 0.5 for 16.
        assert_eq!((out[0], out[1], out[16]), (-0.25, -0.25, 7.0));
        // Element 32 is group 2 (scale 0, min 0), q = 1: 0.
        assert_eq!(out[32], 0.0);

        // Q3_K: scale of group 0 = low nibble of byte 0 | bits 0-1 of byte 8
        // << 4; group 8 = high nibble of byte 0 | bits 4-5 of byte 8 << 4.
        let mut b = vec![0u8; 110];
        b[96] = 0x21; // group 0: 1, group 8: 2 (low four bits)
        b[96 + 8] = 0b0011_0010; // group 0 high bits 2 -> 33; group 8 -> 3<<4|2 = 50
        b[0] = 0b0000_0001; // hmask bit 0 of element 0: no -4
        b[32] = 0b0000_0011; // element 0: q = 3
        b[108..110].copy_from_slice(&h(0.5));
        dequantize(WType::Q3K, &b, &mut out);
        // Element 0: d (33 - 32) (3) = 1.5; element 1: (0 - 4) * 0.5 = -2.
        assert_eq!((out[0], out[1]), (1.5, -2.0));
        // Element 128 is group 8 (scale 50 - 32 = 18), q = 0 - 4.
        assert_eq!(out[128], 0.5 * 18.0 * -4.0);

        // Q4_K: group 0 scale 2 min 3 (bytes 0 and 4); group 4 (elements
        // 128..160) scale (byte 8 low nibble | byte 0 top bits << 4).
        let mut b = vec![0u8; 144];
        b[0..2].copy_from_slice(&h(0.5));
        b[2..4].copy_from_slice(&h(0.25));
        b[4] = 0b0100_0010; // scale 0 = 2, scale 4 gets high bits 1
        b[4 + 4] = 3; // min 0
        b[4 + 8] = 0x15; // scale 4 low = 5 -> 21; min 4 low = 1
        b[16] = 0x7A; // element 0 = 10, element 32 = 7
        b[16 + 64] = 0x03; // element 128 = 3
        dequantize(WType::Q4K, &b, &mut out);
        assert_eq!(out[0], 0.5 * 2.0 * 10.0 - 0.25 * 3.0);
        assert_eq!(out[32], 0.0); // group 1: scale 0, min 0
        assert_eq!(out[128], 0.5 * 21.0 * 3.0 - 0.25 * 1.0);

        // Q5_K: as Q4_K, fifth bit of group c of 32 in bit c of qh[l].
        let mut b = vec![0u8; 176];
        b[0..2].copy_from_slice(&h(1.0));
        b[4] = 1;
        b[5] = 1;
        b[16] = 0b0000_0011; // elements 0 and 32 get +16
        b[16 + 1] = 0b0000_0100; // element 64 + 1 gets +16
        b[48] = 0x21; // element 0 = 1 (+16), element 32 = 2 (+16)
        dequantize(WType::Q5K, &b, &mut out);
        assert_eq!((out[0], out[32], out[1]), (17.0, 18.0, 0.0));
        // Element 65: group 2 has scale 0 (bytes 2 is 0).
        assert_eq!(out[65], 0.0);

        // Q6_K: element 0 = low nibble of ql[0] | (qh[0] & 3) << 4, minus
        // 32; element 64 = high nibble of ql[0] | bits 4-5 of qh[0] << 4.
        let mut b = vec![0u8; 210];
        b[0] = 0x5F;
        b[128] = 0b0010_0001;
        b[192] = 2; // group 0
        b[192 + 4] = (-3i8) as u8; // group 4 (elements 64..80)
        b[208..210].copy_from_slice(&h(0.5));
        dequantize(WType::Q6K, &b, &mut out);
        assert_eq!(out[0], 0.5 * 2.0 * ((0xF | 1 << 4) - 32) as f32);
        assert_eq!(out[64], 0.5 * -3.0 * ((0x5 | 2 << 4) - 32) as f32);
        assert_eq!(out[1], 0.5 * 2.0 * -32.0);
    }
}

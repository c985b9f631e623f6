//! The 32-weight block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0): dequantization
//! as ggml's `dequantize_row_*`, and the scalar dot products as ggml's
//! `ggml_vec_dot_*_q8_0/q8_1` (the portable path and the reference for the
//! AVX2 kernels in `legacy_avx2.rs`).
//!
//! Blocks are read by byte offset, so weights need no alignment at all.

use std::ops::Range;

use half::f16;

use crate::act::{ActQ8_0, ActQ8_1};
use crate::code::{Q4_0, Q5_0};
use crate::{ActBuf, Out, WType, Weights};

/// Weights per block.
pub(crate) const QK: usize = 32;

/// The f16 at byte `i` of `b`.
#[inline(always)]
pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// The fifth bits of a Q5 block.
#[inline(always)]
fn qh_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// The 32 integer codes of one block, in element order, as the dot product
/// multiplies them (offsets already subtracted for the symmetric types).
#[inline(always)]
pub(crate) fn codes(wtype: WType, blk: &[u8]) -> [i32; QK] {
    let mut q = [0i32; QK];
    match wtype {
        WType::Q4_0 | WType::Q4_1 => {
            let (qs, off) = if wtype == WType::Q4_0 {
                (&blk[2..18], 8)
            } else {
                (&blk[4..20], 0)
            };
            for j in 0..QK / 2 {
                q[j] = (qs[j] & 0x0F) as i32 - off;
                q[j + QK / 2] = (qs[j] >> 4) as i32 - off;
            }
        }
        WType::Q5_0 | WType::Q5_1 => {
            let (h, qs, off) = if wtype == WType::Q5_0 {
                (qh_at(blk, 2), &blk[6..22], 16)
            } else {
                (qh_at(blk, 4), &blk[8..24], 0)
            };
            for j in 0..QK / 2 {
                let h0 = ((h >> j) & 1) << 4;
                let h1 = ((h >> (j + 16)) & 1) << 4;
                q[j] = ((qs[j] & 0x0F) as u32 | h0) as i32 - off;
                q[j + QK / 2] = ((qs[j] >> 4) as u32 | h1) as i32 - off;
            }
        }
        WType::Q8_0 => {
            for (d, &s) in q.iter_mut().zip(&blk[2..34]) {
                *d = s as i8 as i32;
            }
        }
        _ => unreachable!("{wtype:?} is not a legacy block type"),
    }
    q
}

/// The offset subtracted from the unsigned codes of the type with code `t`
/// (Q4_0 and Q5_0; 0 for the others).
pub(crate) const fn offset(t: u8) -> i32 {
    match t {
        Q4_0 => 8,
        Q5_0 => 16,
        _ => 0,
    }
}

/// Whether blocks of `wtype` carry a minimum `m` (w = d q + m).
pub(crate) fn has_min(wtype: WType) -> bool {
    wtype.has_min()
}

/// ggml's `ggml_vec_dot_{q4_0,q5_0,q8_0}_q8_0`.
fn dot_q8_0(w: &Weights, r: usize, a: &[ActQ8_0]) -> f32 {
    let mut sumf = 0f32;
    for (b, ab) in a.iter().enumerate() {
        let blk = w.block(r, b);
        let q = codes(w.wtype, blk);
        let sumi: i32 = q.iter().zip(&ab.qs).map(|(&x, &y)| x * y as i32).sum();
        sumf += sumi as f32 * (f16_at(blk, 0) * ab.d);
    }
    sumf
}

/// ggml's `ggml_vec_dot_{q4_1,q5_1}_q8_1`: the minimum meets the activation
/// block's stored scaled sum `s`.
fn dot_q8_1(w: &Weights, r: usize, a: &[ActQ8_1]) -> f32 {
    let mut sumf = 0f32;
    for (b, ab) in a.iter().enumerate() {
        let blk = w.block(r, b);
        let q = codes(w.wtype, blk);
        let sumi: i32 = q.iter().zip(&ab.qs).map(|(&x, &y)| x * y as i32).sum();
        sumf += (f16_at(blk, 0) * ab.d) * sumi as f32 + f16_at(blk, 2) * ab.s;
    }
    sumf
}

/// The portable path.
///
/// # Safety
/// As [`crate::gemm`].
pub(crate) unsafe fn gemm_scalar(w: &Weights, rows: Range<usize>, acts: &ActBuf, out: Out) {
    for i in 0..acts.rows() {
        for r in rows.clone() {
            let v = if has_min(w.wtype) {
                dot_q8_1(w, r, acts.q8_1_row(i))
            } else {
                dot_q8_0(w, r, acts.q8_0_row(i))
            };
            *out.ptr.add(i * out.ld + r) = v;
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
    for (blk, o) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(QK)) {
        let d = f16_at(blk, 0);
        let q = codes(wtype, blk);
        if has_min(wtype) {
            let m = f16_at(blk, 2);
            for (y, &x) in o.iter_mut().zip(&q) {
                *y = x as f32 * d + m;
            }
        } else {
            for (y, &x) in o.iter_mut().zip(&q) {
                *y = x as f32 * d;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{self, Family, Rng};
    use crate::ActType;

    const TYPES: [WType; 5] = [
        WType::Q4_0,
        WType::Q4_1,
        WType::Q5_0,
        WType::Q5_1,
        WType::Q8_0,
    ];

    /// `n` rows of `k` weights: random codes, scales in ±[0.001, 0.02], mins in ±0.1.
    fn weights(wtype: WType, k: usize, n: usize, rng: &mut Rng) -> Vec<u8> {
        let mut v = Vec::new();
        for _ in 0..n * k / QK {
            let d = rng.f().signum() * (0.001 + 0.019 * rng.f().abs());
            v.extend_from_slice(&f16::from_f32(d).to_le_bytes());
            if has_min(wtype) {
                v.extend_from_slice(&f16::from_f32(0.1 * rng.f()).to_le_bytes());
            }
            let rest = wtype.block_bytes() - if has_min(wtype) { 4 } else { 2 };
            v.extend((0..rest).map(|_| rng.next() as u8));
        }
        v
    }

    /// `m` rows of activations of varied magnitude, rounded for `wtype`.
    fn acts(wtype: WType, k: usize, m: usize, rng: &mut Rng) -> (Vec<f32>, ActBuf) {
        let x: Vec<f32> = (0..m * k)
            .map(|i| rng.f() * (1.0 + (i / k) as f32))
            .collect();
        let mut a = ActBuf::new(wtype.act_type(), k, m);
        a.quantize(&x);
        (x, a)
    }

    /// The bound on |kernel - reference::dot_f64| for weight row `w` and
    /// activation row `i`: f32 rounding of one product per block and of the
    /// running sum over `nb` blocks, each at most one ulp of the sum of
    /// magnitudes (the terms d q a and m a, taken apart since the kernel sums
    /// them apart), plus what ggml's f16 rounding of the Q8_1 sum `s` moves
    /// the minimum's term: |m| |s - d sum(q)| per block.
    fn bound(wtype: WType, w: &[u8], a: &ActBuf, i: usize) -> f64 {
        let bb = wtype.block_bytes();
        let nb = w.len() / bb;
        let ad = a.dequantize_row(i);
        let mut mag = 0f64;
        let mut slack = 0f64;
        for (b, blk) in w.chunks_exact(bb).enumerate() {
            let d = f16_at(blk, 0) as f64;
            let m = if has_min(wtype) {
                f16_at(blk, 2) as f64
            } else {
                0.0
            };
            let q = codes(wtype, blk);
            let xs = &ad[b * QK..(b + 1) * QK];
            mag += q
                .iter()
                .zip(xs)
                .map(|(&q, &x)| (d * q as f64).abs() * x.abs() as f64)
                .sum::<f64>();
            mag += m.abs() * xs.iter().map(|x| x.abs() as f64).sum::<f64>();
            if has_min(wtype) {
                let ab = &a.q8_1_row(i)[b];
                let sq: i32 = ab.qs.iter().map(|&q| q as i32).sum();
                slack += m.abs() * (ab.s as f64 - ab.d as f64 * sq as f64).abs();
            }
        }
        (nb as f64 + 3.0) * f32::EPSILON as f64 * mag + slack
    }

    const SHAPES: [(usize, usize); 10] = [
        // Longer than a prefill panel's 2048 columns: two chunks.
        (2080, 9),
        (32, 1),
        (32, 5),
        (32, 17),
        (224, 1),
        (224, 5),
        (224, 17),
        (1536, 1),
        (1536, 5),
        (1536, 17),
    ];

    struct Fam;

    impl Family for Fam {
        const TYPES: &'static [WType] = &TYPES;
        const SHAPES: &'static [(usize, usize)] = &SHAPES;
        const TILE_SHAPES: &'static [(usize, usize)] = &[(224, 17), (96, 70), (2080, 9)];
        const TILE_ROWS: &'static [usize] = &[1, 3, 8, 13];
        fn weights(wtype: WType, k: usize, n: usize, rng: &mut Rng) -> Vec<u8> {
            weights(wtype, k, n, rng)
        }
        fn acts(wtype: WType, k: usize, m: usize, rng: &mut Rng) -> (Vec<f32>, ActBuf) {
            let _ = wtype;
            acts(wtype, k, m, rng)
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

    #[test]
    fn dequantize_follows_ggml_layout() {
        let d = f16::from_f32(0.5).to_le_bytes();
        let m = f16::from_f32(-1.0).to_le_bytes();
        let qs: Vec<u8> = (0..16u8).map(|j| j | (15 - j) << 4).collect();
        let mut out = [0f32; QK];
        // Q4_0: byte j holds element j (low nibble) and j + 16 (high).
        dequantize(WType::Q4_0, &[&d[..], &qs].concat(), &mut out);
        assert_eq!((out[0], out[1], out[16], out[31]), (-4.0, -3.5, 3.5, -4.0));
        dequantize(WType::Q4_1, &[&d[..], &m, &qs].concat(), &mut out);
        assert_eq!((out[0], out[16]), (-1.0, 6.5));
        // Q5: bit j of qh is element j's fifth bit; set for elements 1 and 17.
        let qh = (1u32 << 1 | 1 << 17).to_le_bytes();
        dequantize(WType::Q5_0, &[&d[..], &qh, &qs].concat(), &mut out);
        assert_eq!(
            (out[0], out[1], out[2], out[16], out[17]),
            (-8.0, 0.5, -7.0, -0.5, 7.0)
        );
        dequantize(WType::Q5_1, &[&d[..], &m, &qh, &qs].concat(), &mut out);
        assert_eq!((out[0], out[1], out[17]), (-1.0, 7.5, 14.0));
        let q8: Vec<u8> = (0..32).map(|j| (j as i8 - 16) as u8).collect();
        dequantize(WType::Q8_0, &[&d[..], &q8].concat(), &mut out);
        assert_eq!((out[0], out[31]), (-8.0, 7.5));
        assert_eq!(WType::Q8_0.act_type(), ActType::Q8_0);
    }
}

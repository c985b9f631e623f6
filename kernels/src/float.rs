//! Float weights (F32, F16, BF16) times f32 activations: dequantization as
//! ggml's `ggml_fp16_to_fp32_row`/`ggml_bf16_to_fp32_row`, and the scalar dot
//! product (the portable path and the reference for `float_avx2.rs`).
//!
//! ggml rounds the activations to f16 (bf16) before an f16 (bf16) dot
//! product; we keep them in f32: more precise, and as fast once the weights
//! are widened in registers.
//!
//! Summation order, shared by every path so that the test can bound it: eight
//! lanes, lane `l` summing the products of elements `8c + l` in order of `c`;
//! the lanes reduced as `((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))`;
//! then the last `k % 8` products added one at a time.

use std::ops::Range;

use crate::{ActBuf, Out, WType, Weights};

/// Elements per lane group (one AVX2 register of f32).
pub(crate) const LANES: usize = 8;

/// Weight `j` of a row of type `T` (see [`tag`]) as f32.
#[inline(always)]
fn weight<const T: u8>(b: &[u8], j: usize) -> f32 {
    match T {
        F32 => f32::from_le_bytes([b[4 * j], b[4 * j + 1], b[4 * j + 2], b[4 * j + 3]]),
        F16 => f16_to_f32(u16::from_le_bytes([b[2 * j], b[2 * j + 1]])),
        // bf16 is the top half of an f32 (ggml's GGML_BF16_TO_FP32, NaNs kept as they are).
        _ => f32::from_bits((u16::from_le_bytes([b[2 * j], b[2 * j + 1]]) as u32) << 16),
    }
}

/// The f32 of an IEEE half, exactly (as `half::f16::to_f32`), with masks
/// instead of branches so that a loop of them vectorizes: half's own
/// conversion checks for F16C at run time per element.
#[inline(always)]
pub(crate) fn f16_to_f32(h: u16) -> f32 {
    const EXP: u32 = 0x7C00 << 13;
    let mut o = ((h & 0x7FFF) as u32) << 13;
    let exp = o & EXP;
    // Rebias the exponent from 15 to 127.
    o += (127 - 15) << 23;
    // Inf and NaN keep an all-ones exponent.
    let inf_nan = o + ((128 - 16) << 23);
    // Zero and subnormals: renormalize by subtracting 2^-14 in f32.
    let sub = (f32::from_bits(o + (1 << 23)) - f32::from_bits(113 << 23)).to_bits();
    // Masks, not `if`: LLVM sinks the subnormal arithmetic into a branch
    // otherwise, and the branches stop the loop from vectorizing.
    let m_inf = ((exp == EXP) as u32).wrapping_neg();
    let m_sub = ((exp == 0) as u32).wrapping_neg();
    let o = (inf_nan & m_inf) | (sub & m_sub) | (o & !(m_inf | m_sub));
    f32::from_bits(o | ((h & 0x8000) as u32) << 16)
}

pub(crate) use crate::code::{BF16, F16, F32};

/// The tag of a float weight type.
pub(crate) fn tag(wtype: WType) -> u8 {
    debug_assert_eq!(wtype.family(), crate::Family::Float);
    wtype.code()
}

/// The prefill walk both SIMD float kernels take (from `gemm_t`, for
/// `$m >= 2` activation rows): weight rows in panels of about `$panel_bytes`
/// (whole tiles of `$nr` rows, so a panel stays in L2), each swept by every
/// tile of `$mr` activation rows, then by the one to three rows left. A
/// macro, not a function, so that each copy is compiled inside its kernel's
/// target features with `$sweep`'s tile sizes as constants.
macro_rules! prefill {
    ($sweep:ident::<$t:ident>, $ctx:expr, $rows:expr, $m:expr, $arow:expr, $wrow:expr,
     $panel_bytes:expr, $mr:expr, $nr:expr) => {{
        let (ctx, rows, m, arow) = ($ctx, $rows, $m, $arow);
        let panel_rows = ($panel_bytes / $wrow.max(1) / $nr).max(1) * $nr;
        let mut p0 = rows.start;
        while p0 < rows.end {
            let panel = p0..(p0 + panel_rows).min(rows.end);
            let mut i0 = 0;
            while i0 + $mr <= m {
                let a = std::array::from_fn(|j| arow(i0 + j));
                $sweep::<$t, { $mr }, { $nr }>(ctx, panel.clone(), i0, a);
                i0 += $mr;
            }
            let p = panel.clone();
            match m - i0 {
                0 => {}
                1 => $sweep::<$t, 1, { $nr }>(ctx, p, i0, [arow(i0)]),
                2 => $sweep::<$t, 2, { $nr }>(ctx, p, i0, std::array::from_fn(|j| arow(i0 + j))),
                _ => $sweep::<$t, 3, { $nr }>(ctx, p, i0, std::array::from_fn(|j| arow(i0 + j))),
            }
            p0 = panel.end;
        }
    }};
}
pub(crate) use prefill;

/// The lane reduction every path uses (see the module comment).
#[inline(always)]
pub(crate) fn reduce_lanes(l: [f32; LANES]) -> f32 {
    ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]))
}

/// Bytes per weight of type `T`.
pub(crate) const fn wbytes(t: u8) -> usize {
    if t == F32 {
        4
    } else {
        2
    }
}

/// The first eight weights of `b`, widened.
#[inline(always)]
fn widen8<const T: u8>(b: &[u8]) -> [f32; LANES] {
    // One unaligned load of the whole group: element-wise byte reads stay
    // byte loads after vectorization and cost more than the arithmetic.
    if T == F32 {
        let b: &[u8; 4 * LANES] = b[..4 * LANES].try_into().unwrap();
        // SAFETY: 32 readable bytes; any bits are a valid [u32; 8].
        let x = unsafe { (b.as_ptr() as *const [u32; LANES]).read_unaligned() };
        return x.map(|v| f32::from_bits(u32::from_le(v)));
    }
    let b: &[u8; 2 * LANES] = b[..2 * LANES].try_into().unwrap();
    // SAFETY: 16 readable bytes; any bits are a valid [u16; 8].
    let h = unsafe { (b.as_ptr() as *const [u16; LANES]).read_unaligned() }.map(u16::from_le);
    if T == F16 {
        h.map(f16_to_f32)
    } else {
        h.map(|x| f32::from_bits((x as u32) << 16))
    }
}

/// The dot product of one weight row with one activation row.
fn dot<const T: u8>(w: &[u8], a: &[f32]) -> f32 {
    let k = a.len();
    let k8 = k - k % LANES;
    let mut lanes = [0f32; LANES];
    // Fixed-size chunks let the compiler drop the bounds checks and keep
    // the lanes in vector registers.
    for (wc, ac) in w.chunks_exact(LANES * wbytes(T)).zip(a.chunks_exact(LANES)) {
        let wv = widen8::<T>(wc);
        for l in 0..LANES {
            lanes[l] += wv[l] * ac[l];
        }
    }
    let mut s = reduce_lanes(lanes);
    for (j, &x) in a.iter().enumerate().skip(k8) {
        s += weight::<T>(w, j) * x;
    }
    s
}

/// The portable path.
///
/// # Safety
/// As [`crate::gemm`].
pub(crate) unsafe fn gemm_scalar(w: &Weights, rows: Range<usize>, acts: &ActBuf, out: Out) {
    for i in 0..acts.rows() {
        let a = acts.f32_row(i);
        for r in rows.clone() {
            let wr = w.row(r);
            *out.ptr.add(i * out.ld + r) = match tag(w.wtype) {
                F32 => dot::<F32>(wr, a),
                F16 => dot::<F16>(wr, a),
                _ => dot::<BF16>(wr, a),
            };
        }
    }
}

/// Dequantize whole elements of `wtype` into `out` (see [`crate::reference::dequantize`]).
pub(crate) fn dequantize(wtype: WType, bytes: &[u8], out: &mut [f32]) {
    let bb = wtype.block_bytes();
    assert!(
        bytes.len().is_multiple_of(bb),
        "{wtype:?}: {} bytes are not whole elements",
        bytes.len()
    );
    let out = out.iter_mut().take(bytes.len() / bb).enumerate();
    match tag(wtype) {
        F32 => out.for_each(|(j, o)| *o = weight::<F32>(bytes, j)),
        F16 => out.for_each(|(j, o)| *o = weight::<F16>(bytes, j)),
        _ => out.for_each(|(j, o)| *o = weight::<BF16>(bytes, j)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{self, run, Family, Rng};
    use crate::{gemm, ActType, Isa};
    use half::{bf16, f16};

    const TYPES: [WType; 3] = [WType::F32, WType::F16, WType::BF16];

    /// The bytes of `x` as `wtype` (round to nearest even, as ggml's converters).
    fn encode(wtype: WType, x: &[f32]) -> Vec<u8> {
        match wtype {
            WType::F32 => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
            WType::F16 => x
                .iter()
                .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                .collect(),
            WType::BF16 => x
                .iter()
                .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                .collect(),
            _ => unreachable!(),
        }
    }

    /// `n` rows of `k` weights of magnitude up to 0.05.
    fn weights(wtype: WType, k: usize, n: usize, rng: &mut Rng) -> Vec<u8> {
        let x: Vec<f32> = (0..n * k).map(|_| 0.05 * rng.f()).collect();
        encode(wtype, &x)
    }

    /// `m` rows of activations of varied magnitude.
    fn acts(k: usize, m: usize, rng: &mut Rng) -> (Vec<f32>, ActBuf) {
        let x: Vec<f32> = (0..m * k)
            .map(|i| rng.f() * (1.0 + (i / k) as f32))
            .collect();
        let mut a = ActBuf::new(ActType::F32, k, m);
        a.quantize(&x);
        (x, a)
    }

    /// The bound on |kernel - reference::dot_f64| for weight row `w` and
    /// activation row `i`. A lane sums `k / 8` products, each rounded once
    /// (or fused with its add), the reduction adds three roundings and the
    /// tail at most seven; with u = 2^-24 the error is at most
    /// γ(k/8 + 10) · Σ|w||a| ≈ (k/8 + 10) u Σ|w||a|; we allow f32::EPSILON
    /// (2u) per step, twice that. The f64 reference's own error is below
    /// k 2^-53 Σ|w||a|, negligible beside it.
    fn bound(wtype: WType, w: &[u8], a: &ActBuf, i: usize) -> f64 {
        let ad = a.dequantize_row(i);
        let mut wd = vec![0f32; ad.len()];
        dequantize(wtype, w, &mut wd);
        let mag: f64 = wd
            .iter()
            .zip(&ad)
            .map(|(&x, &y)| (x as f64 * y as f64).abs())
            .sum();
        (ad.len() / LANES + 10) as f64 * f32::EPSILON as f64 * mag
    }

    const SHAPES: [(usize, usize); 12] = [
        (1, 1),
        (5, 5),
        (8, 17),
        (29, 3),
        (224, 1),
        (224, 5),
        (224, 17),
        (231, 9),
        (1536, 1),
        (1536, 5),
        (1536, 17),
        (1541, 19),
    ];

    struct Fam;

    impl Family for Fam {
        const TYPES: &'static [WType] = &TYPES;
        const SHAPES: &'static [(usize, usize)] = &SHAPES;
        const TILE_SHAPES: &'static [(usize, usize)] = &[(224, 17), (99, 70), (7, 11)];
        const TILE_ROWS: &'static [usize] = &[1, 7, 8, 13, 30];
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

    /// A sub-range of rows writes those rows and nothing else.
    #[test]
    fn row_ranges_write_only_their_rows() {
        let isa = Isa::detect();
        let mut rng = Rng(99);
        for wtype in TYPES {
            let (k, n, m) = (40, 23, 9);
            let wb = weights(wtype, k, n, &mut rng);
            let w = Weights::new(wtype, &wb, k, n).unwrap();
            let (_, a) = acts(k, m, &mut rng);
            let all = run(&w, &a, isa);
            let mut part = vec![f32::NAN; m * n];
            let o = Out {
                ptr: part.as_mut_ptr(),
                ld: n,
            };
            // SAFETY: `part` holds m rows of n.
            unsafe { gemm(&w, 3..18, &a, o, isa) };
            for i in 0..m {
                for r in 0..n {
                    let v = part[i * n + r];
                    if (3..18).contains(&r) {
                        assert_eq!(v.to_bits(), all[i * n + r].to_bits());
                    } else {
                        assert!(v.is_nan(), "{wtype:?} ({i},{r}) written");
                    }
                }
            }
        }
    }

    #[test]
    fn f16_conversion_is_exact() {
        for h in 0..=u16::MAX {
            let want = f16::from_bits(h).to_f32();
            let got = f16_to_f32(h);
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{h:#06x}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn dequantize_reads_little_endian_values() {
        let x = [1.5f32, -0.25, 65504.0, 3.0e-5, -0.0, 1.0e-40];
        let mut out = [0f32; 6];
        dequantize(WType::F32, &encode(WType::F32, &x), &mut out);
        assert_eq!(out.map(f32::to_bits), x.map(f32::to_bits));
        dequantize(WType::F16, &[0x00, 0x3C, 0x00, 0xC0, 0x01, 0x00], &mut out);
        assert_eq!(&out[..3], &[1.0, -2.0, 2f32.powi(-24)]);
        // bf16 is the top half of an f32.
        dequantize(WType::BF16, &[0x80, 0x3F, 0x49, 0x40], &mut out);
        assert_eq!(&out[..2], &[1.0, f32::from_bits(0x4049_0000)]);
        assert_eq!(WType::BF16.act_type(), ActType::F32);
    }
}

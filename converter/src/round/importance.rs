//! Importance-weighted rounding (what llama.cpp's imatrix does): each
//! block's scales are chosen to minimise Σ_e imp_e (Q(w)_e − w_e)², where
//! imp_e is the mean square of input e over a calibration text (the
//! diagonal of XᵀX), so the weights that meet large inputs are kept
//! closest. The output-space error ‖(Q(W) − W)X‖² is this sum when inputs
//! are uncorrelated; GPTQ (the `gptq` module) uses the whole matrix.
//!
//! The search: candidate grids come from ggml's own quantizer run on the
//! block with each sub-block (the scale's unit: the block for 32-weight
//! types, 16 or 32 weights in a K-quant) stretched or shrunk about its
//! centre by a factor; every weight takes the nearest code of a grid
//! ([`lorafold_kernels::grid`]), so for a given grid the weighted error is
//! at its minimum. Each sub-block keeps the factor with its least weighted
//! error, the block is quantized once more with those factors, and the
//! result is kept only if it beats the unstretched grid (factor 1, ggml's
//! nearest scales), which it therefore never loses to.

use lorafold_kernels::grid::{self, Grid};
use lorafold_kernels::WType;
use lorafold_runtime::gguf::GgmlType;
use rayon::prelude::*;

use crate::round::quant::{self, QuantError};

/// Stretch factors tried per sub-block (1.0 is ggml's own choice).
const FACTORS: [f32; 16] = [
    0.750, 0.775, 0.800, 0.825, 0.850, 0.875, 0.900, 0.925, 0.950, 0.975, 1.000, 1.025, 1.050,
    1.075, 1.100, 1.125,
];

/// Weights per scale of `t` (the unit a factor applies to).
fn sub_block(t: WType) -> usize {
    match t {
        WType::Q2K | WType::Q3K | WType::Q6K => 16,
        _ => 32,
    }
}

/// `w` (`n` rows of `imp.len()`) rounded to `wtype`'s blocks, weighting
/// each input's error by `imp`; `tensor` names the tensor in errors.
pub fn importance_round(
    wtype: GgmlType,
    w: &[f32],
    n: usize,
    imp: &[f32],
    tensor: &str,
) -> Result<Vec<u8>, QuantError> {
    let k = imp.len();
    let codec = |problem: String| QuantError::Codec {
        tensor: tensor.into(),
        problem,
    };
    let kt = WType::from_ggml_id(wtype.id())
        .filter(|t| grid::code_range(*t).is_some())
        .ok_or_else(|| codec(format!("importance rounding does not write {wtype}")))?;
    let (bl, bb) = (kt.block_len(), kt.block_bytes());
    if w.len() != n * k || !k.is_multiple_of(bl) {
        return Err(codec(format!(
            "{} weights for {n} rows of {k} ({wtype} blocks of {bl})",
            w.len()
        )));
    }
    let mut out = vec![0u8; w.len() / bl * bb];
    // Blocks are independent: the bytes do not depend on the thread count.
    out.par_chunks_mut(bb)
        .zip(w.par_chunks(bl))
        .enumerate()
        .try_for_each(|(b, (dst, x))| {
            let c = b * bl % k;
            round_block(wtype, kt, x, &imp[c..c + bl], dst, tensor)
        })?;
    Ok(out)
}

/// One block: the best grid of the search, its codes nearest.
pub(crate) fn round_block(
    wtype: GgmlType,
    kt: WType,
    x: &[f32],
    imp: &[f32],
    dst: &mut [u8],
    tensor: &str,
) -> Result<(), QuantError> {
    let (bl, sb) = (x.len(), sub_block(kt));
    let nsub = bl / sb;
    let has_min = matches!(
        kt,
        WType::Q4_1 | WType::Q5_1 | WType::Q2K | WType::Q4K | WType::Q5K
    );
    // The centre each sub-block is stretched about: 0 for symmetric grids,
    // the middle of the range where the grid has a minimum.
    let centre: Vec<f32> = x
        .chunks(sb)
        .map(|s| {
            if has_min {
                let (lo, hi) = s
                    .iter()
                    .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
                0.5 * (lo + hi)
            } else {
                0.0
            }
        })
        .collect();
    let stretch = |y: &mut Vec<f32>, f: &dyn Fn(usize) -> f32| {
        y.clear();
        y.extend(x.iter().enumerate().map(|(e, &v)| {
            let c = centre[e / sb];
            c + (v - c) * f(e / sb)
        }));
    };
    let mut codes = [0i32; lorafold_kernels::blocks::QK_K];
    let mut errs = [0f64; lorafold_kernels::grid::GROUPS];
    // The block's bytes for a grid picked from `y`, codes nearest `x`; the
    // weighted error per sub-block left in `errs`.
    let mut try_grid = |y: &[f32], errs: &mut [f64]| -> Result<Vec<u8>, QuantError> {
        let mut blk = quant::quantize(wtype, y, tensor)?;
        let g = Grid::read(kt, &blk);
        errs[..nsub].fill(0.0);
        for e in 0..bl {
            let q = g.nearest(e, x[e]);
            codes[e] = q;
            let d = (g.value(e, q) - x[e]) as f64;
            errs[e / sb] += imp[e] as f64 * d * d;
        }
        grid::write_codes(kt, &mut blk, &codes[..bl]);
        Ok(blk)
    };
    let plain = try_grid(x, &mut errs)?;
    let plain_errs = errs;
    let mut best = [(f64::INFINITY, 1f32); lorafold_kernels::grid::GROUPS];
    let mut y = Vec::with_capacity(bl);
    for f in FACTORS {
        if f == 1.0 {
            errs = plain_errs;
        } else {
            stretch(&mut y, &|_| f);
            try_grid(&y, &mut errs)?;
        }
        for (b, &e) in best.iter_mut().zip(&errs[..nsub]) {
            if e < b.0 {
                *b = (e, f);
            }
        }
    }
    let total = |e: &[f64]| e[..nsub].iter().sum::<f64>();
    stretch(&mut y, &|s| best[s].1);
    let mixed = try_grid(&y, &mut errs)?;
    let (mut blk, mut err) = if total(&errs) < total(&plain_errs) {
        (mixed, total(&errs))
    } else {
        (plain, total(&plain_errs))
    };
    if bl == 32 {
        // A 32-weight block's scale (and minimum) refitted by weighted
        // least squares to its codes, as ggml's make_qx_quants does, while
        // that lowers the error.
        for _ in 0..2 {
            match refit(kt, &blk, x, imp) {
                Some((b, e)) if e < err => (blk, err) = (b, e),
                _ => break,
            }
        }
    }
    dst.copy_from_slice(&blk);
    Ok(())
}

/// `blk` with d (and m) set to the weighted least-squares fit of `x` on its
/// codes, then every code the nearest of the new grid; and its weighted
/// error. None where the fit is degenerate.
fn refit(kt: WType, blk: &[u8], x: &[f32], imp: &[f32]) -> Option<(Vec<u8>, f64)> {
    let mut q = [0i32; 32];
    grid::read_codes(kt, blk, &mut q);
    let has_min = matches!(kt, WType::Q4_1 | WType::Q5_1);
    let (mut sw, mut swq, mut swqq, mut swx, mut swxq) = (0f64, 0f64, 0f64, 0f64, 0f64);
    for e in 0..32 {
        let (w, qe, xe) = (imp[e] as f64, q[e] as f64, x[e] as f64);
        sw += w;
        swq += w * qe;
        swqq += w * qe * qe;
        swx += w * xe;
        swxq += w * xe * qe;
    }
    let (d, m) = if has_min {
        let det = swqq * sw - swq * swq;
        if det.is_nan() || det.abs() <= 1e-30 {
            return None;
        }
        (
            (swxq * sw - swq * swx) / det,
            (swqq * swx - swq * swxq) / det,
        )
    } else {
        if swqq.is_nan() || swqq <= 0.0 {
            return None;
        }
        (swxq / swqq, 0.0)
    };
    let mut out = blk.to_vec();
    out[0..2].copy_from_slice(&half::f16::from_f64(d).to_le_bytes());
    if has_min {
        out[2..4].copy_from_slice(&half::f16::from_f64(m).to_le_bytes());
    }
    let g = Grid::read(kt, &out);
    let mut err = 0f64;
    for e in 0..32 {
        q[e] = g.nearest(e, x[e]);
        let r = (g.value(e, q[e]) - x[e]) as f64;
        err += imp[e] as f64 * r * r;
    }
    grid::write_codes(kt, &mut out, &q);
    Some((out, err))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::round::quant::{dequantize, quantize};

    use crate::test_rng::Rng;

    fn weighted(q: &[f32], w: &[f32], imp: &[f32]) -> f64 {
        let k = imp.len();
        q.iter()
            .zip(w)
            .enumerate()
            .map(|(i, (a, b))| imp[i % k] as f64 * ((a - b) as f64).powi(2))
            .sum()
    }

    /// With importances spread over three orders of magnitude, the
    /// weighted error is below nearest rounding's for every type; with
    /// equal importances, never worse than nearest.
    #[test]
    fn importance_rounding_beats_nearest_for_every_type() {
        let mut rng = Rng(11);
        let (n, k) = (6, 512);
        let w: Vec<f32> = (0..n * k).map(|_| rng.f() * 0.1).collect();
        let imp: Vec<f32> = (0..k).map(|_| 10f32.powf(3.0 * rng.f().abs())).collect();
        let flat = vec![1f32; k];
        for t in crate::round::quant::BLOCK_TYPES {
            let near = dequantize(t, &quantize(t, &w, "w").unwrap(), n * k, "w").unwrap();
            let ours = importance_round(t, &w, n, &imp, "w").unwrap();
            let ours = dequantize(t, &ours, n * k, "w").unwrap();
            let (eo, en) = (weighted(&ours, &w, &imp), weighted(&near, &w, &imp));
            eprintln!("{t}: weighted error imatrix {eo:.4e}, nearest {en:.4e}");
            assert!(eo < 0.95 * en, "{t}: {eo} vs {en}");
            let plain = importance_round(t, &w, n, &flat, "w").unwrap();
            let plain = dequantize(t, &plain, n * k, "w").unwrap();
            assert!(weighted(&plain, &w, &flat) <= weighted(&near, &w, &flat) * (1.0 + 1e-6));
        }
    }

    #[test]
    fn bad_shapes_and_types_are_errors() {
        assert!(importance_round(GgmlType::Q4_0, &[0.0; 31], 1, &[1.0; 31], "w").is_err());
        assert!(importance_round(GgmlType::F16, &[0.0; 32], 1, &[1.0; 32], "w").is_err());
    }
}

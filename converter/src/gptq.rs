//! Error-feedback rounding (GPTQ, Frantar et al. 2022) into ggml's own
//! Q4_0 blocks: columns are coded in order, and each column's rounding
//! error is pushed into the columns not yet coded, weighted by the inverse
//! Hessian of the layer's inputs (H = XᵀX from `lorafold calibrate`), so
//! the layer's output error ‖(Q(W) − W) X‖ shrinks where nearest rounding
//! minimises the weight error alone. The file stays a plain Q4_0 GGUF.
//!
//! Steps, as in the paper's reference code: dead inputs (H_ii = 0) get
//! H_ii = 1 and zero weights; H is damped by a fraction of its mean
//! diagonal; U is the upper Cholesky factor of H⁻¹. A block's scale is
//! fixed from the error-updated weights when the block starts (ggml's
//! Q4_0 rule: the value of largest magnitude over -8), then its 32 columns
//! are coded one by one. Updates to later columns are applied lazily, a
//! band of columns at a time.

/// What can go wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GptqError {
    /// The damped Hessian is not positive definite (NaN or a broken text).
    #[error(
        "the input statistics are not positive definite at column {column} even after damping"
    )]
    NotPositiveDefinite {
        /// Where the factorisation failed.
        column: usize,
    },
    /// Shapes disagree.
    #[error("{0}")]
    Shape(String),
}

/// Columns per lazily applied band of updates.
const BAND: usize = 128;

/// Upper Cholesky factor U of the inverse of `h` (`[k, k]`, damped by
/// `damp` times its mean diagonal; dead inputs first set to 1), row-major:
/// H⁻¹ = UᵀU. Also returns which inputs were dead.
pub fn inverse_cholesky(
    h: &[f64],
    k: usize,
    damp: f64,
) -> Result<(Vec<f64>, Vec<bool>), GptqError> {
    if h.len() != k * k {
        return Err(GptqError::Shape(format!(
            "{} values are not a {k} x {k} matrix",
            h.len()
        )));
    }
    let mut a = h.to_vec();
    let dead: Vec<bool> = (0..k).map(|i| a[i * k + i] <= 0.0).collect();
    for (i, &d) in dead.iter().enumerate() {
        if d {
            a[i * k + i] = 1.0;
        }
    }
    let mean = (0..k).map(|i| a[i * k + i]).sum::<f64>() / k as f64;
    for i in 0..k {
        a[i * k + i] += damp * mean;
    }
    // H = L Lᵀ (lower, in place).
    cholesky_lower(&mut a, k)?;
    // H⁻¹ = L⁻ᵀ L⁻¹. Column j of L⁻¹ solves L x = e_j; it is kept as row j
    // of `lt` (L⁻¹ transposed), so every inner loop runs along memory.
    let mut lt = vec![0f64; k * k];
    for j in 0..k {
        let x = &mut lt[j * k..(j + 1) * k];
        x[j] = 1.0 / a[j * k + j];
        for i in j + 1..k {
            let row = &a[i * k + j..i * k + i];
            let s: f64 = row.iter().zip(&x[j..i]).map(|(l, v)| l * v).sum();
            x[i] = -s / a[i * k + i];
        }
    }
    let mut inv = vec![0f64; k * k];
    for i in 0..k {
        for j in 0..=i {
            // (L⁻ᵀ L⁻¹)_ij = Σ_m L⁻¹_mi L⁻¹_mj, nonzero for m >= i.
            let s: f64 = lt[i * k + i..(i + 1) * k]
                .iter()
                .zip(&lt[j * k + i..(j + 1) * k])
                .map(|(p, q)| p * q)
                .sum();
            inv[i * k + j] = s;
            inv[j * k + i] = s;
        }
    }
    // H⁻¹ = UᵀU with U upper: U = (lower Cholesky of H⁻¹)ᵀ.
    cholesky_lower(&mut inv, k)?;
    let mut u = vec![0f64; k * k];
    for i in 0..k {
        for j in i..k {
            u[i * k + j] = inv[j * k + i];
        }
    }
    Ok((u, dead))
}

/// In place: the lower-triangular L with a = L Lᵀ (the upper part is left as is).
fn cholesky_lower(a: &mut [f64], k: usize) -> Result<(), GptqError> {
    for j in 0..k {
        let mut d = a[j * k + j];
        for m in 0..j {
            d -= a[j * k + m] * a[j * k + m];
        }
        if d.is_nan() || d <= 0.0 {
            return Err(GptqError::NotPositiveDefinite { column: j });
        }
        let d = d.sqrt();
        a[j * k + j] = d;
        for i in j + 1..k {
            let mut s = a[i * k + j];
            for m in 0..j {
                s -= a[i * k + m] * a[j * k + m];
            }
            a[i * k + j] = s / d;
        }
    }
    Ok(())
}

/// The f16 scale ggml's `quantize_row_q4_0_ref` picks for `xs`, and its inverse.
fn q4_0_scale(xs: impl Iterator<Item = f32>) -> (f32, f32) {
    let (mut amax, mut max) = (0f32, 0f32);
    for v in xs {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    (d, id)
}

/// `w` (`n` rows of `k`, row-major) rounded to Q4_0 blocks by GPTQ with the
/// factor `u` from [`inverse_cholesky`]; `dead` inputs get zero weights.
pub fn gptq_q4_0(
    w: &[f32],
    n: usize,
    k: usize,
    u: &[f64],
    dead: &[bool],
) -> Result<Vec<u8>, GptqError> {
    if w.len() != n * k || u.len() != k * k || dead.len() != k || !k.is_multiple_of(32) {
        return Err(GptqError::Shape(format!(
            "weights {} for {n} x {k}, factor {}, {} dead flags (k a multiple of 32)",
            w.len(),
            u.len(),
            dead.len()
        )));
    }
    let nb = k / 32;
    let mut out = vec![0u8; n * nb * 18];
    // Rows are independent: each is coded against the same U.
    let mut row = vec![0f32; k];
    for r in 0..n {
        row.copy_from_slice(&w[r * k..(r + 1) * k]);
        for (x, &d) in row.iter_mut().zip(dead) {
            if d {
                *x = 0.0;
            }
        }
        let dst = &mut out[r * nb * 18..(r + 1) * nb * 18];
        code_row(&mut row, u, k, dst);
    }
    Ok(out)
}

/// GPTQ over one row (updated in place as errors are pushed forward).
fn code_row(row: &mut [f32], u: &[f64], k: usize, dst: &mut [u8]) {
    let mut d16 = half::f16::ZERO;
    let mut id = 0f32;
    let mut err = vec![0f64; BAND];
    for b0 in (0..k).step_by(BAND) {
        let b1 = (b0 + BAND).min(k);
        for j in b0..b1 {
            if j % 32 == 0 {
                let (d, i) = q4_0_scale(row[j..j + 32].iter().copied());
                d16 = half::f16::from_f32(d);
                id = i;
                let blk = &mut dst[j / 32 * 18..j / 32 * 18 + 18];
                blk[..2].copy_from_slice(&d16.to_le_bytes());
                blk[2..].fill(0);
            }
            let x = row[j];
            // ggml's rule: q = min(15, (int8)(x / d + 8.5)).
            let q = ((x * id + 8.5) as i8).clamp(0, 15) as u8;
            let deq = (q as f32 - 8.0) * d16.to_f32();
            let blk = &mut dst[j / 32 * 18 + 2..j / 32 * 18 + 18];
            let e = j % 32;
            if e < 16 {
                blk[e] |= q;
            } else {
                blk[e - 16] |= q << 4;
            }
            let ujj = u[j * k + j];
            let ej = (x - deq) as f64 / ujj;
            err[j - b0] = ej;
            // Inside the band: update the columns still to come at once.
            for (c, v) in row.iter_mut().enumerate().take(b1).skip(j + 1) {
                *v -= (ej * u[j * k + c]) as f32;
            }
        }
        // The band's errors, applied to every later column: row by row of
        // U, so the inner loop runs along memory and vectorises.
        if b1 < k {
            for j in b0..b1 {
                let e = err[j - b0];
                let uj = &u[j * k + b1..(j + 1) * k];
                for (v, &x) in row[b1..].iter_mut().zip(uj) {
                    *v -= (e * x) as f32;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{dequantize, quantize};
    use lorafold_runtime::gguf::GgmlType;

    struct Rng(u64);
    impl Rng {
        fn f(&mut self) -> f32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        }
    }

    /// ‖(Q − W) Xᵀ‖² over the calibration rows.
    fn output_error(q: &[f32], w: &[f32], x: &[f32], n: usize, k: usize) -> f64 {
        let m = x.len() / k;
        let mut s = 0f64;
        for r in 0..n {
            for i in 0..m {
                let d: f64 = (0..k)
                    .map(|c| (q[r * k + c] - w[r * k + c]) as f64 * x[i * k + c] as f64)
                    .sum();
                s += d * d;
            }
        }
        s
    }

    /// On random linears fed correlated inputs (a few strong directions,
    /// one dead input), GPTQ's output error is below nearest rounding's,
    /// and its blocks decode (through candle's Q4_0 reader) to codes in range.
    #[test]
    fn gptq_beats_nearest_on_correlated_inputs() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for (n, k) in [(16, 64), (24, 160), (8, 288)] {
            let m = 4 * k;
            // Inputs: 6 shared directions plus a little noise; input 5 dead.
            let dirs: Vec<f32> = (0..6 * k).map(|_| rng.f()).collect();
            let mut x = vec![0f32; m * k];
            for i in 0..m {
                let c: Vec<f32> = (0..6).map(|_| rng.f() * 2.0).collect();
                for j in 0..k {
                    x[i * k + j] =
                        (0..6).map(|t| c[t] * dirs[t * k + j]).sum::<f32>() + 0.05 * rng.f();
                }
                x[i * k + 5] = 0.0;
            }
            let w: Vec<f32> = (0..n * k).map(|_| 0.05 * rng.f()).collect();
            let mut h = vec![0f64; k * k];
            for i in 0..m {
                for a in 0..k {
                    for b in 0..k {
                        h[a * k + b] += x[i * k + a] as f64 * x[i * k + b] as f64;
                    }
                }
            }
            let (u, dead) = inverse_cholesky(&h, k, 0.01).unwrap();
            assert!(dead[5] && dead.iter().filter(|&&d| d).count() == 1);
            let g = gptq_q4_0(&w, n, k, &u, &dead).unwrap();
            let gq = dequantize(GgmlType::Q4_0, &g, n * k, "w").unwrap();
            let nq = dequantize(
                GgmlType::Q4_0,
                &quantize(GgmlType::Q4_0, &w, "w").unwrap(),
                n * k,
                "w",
            )
            .unwrap();
            let (eg, en) = (
                output_error(&gq, &w, &x, n, k),
                output_error(&nq, &w, &x, n, k),
            );
            eprintln!("{n}x{k}: output error gptq {eg:.4e}, nearest {en:.4e}");
            assert!(eg < 0.5 * en, "{n}x{k}: gptq {eg} vs nearest {en}");
        }
    }

    /// Without calibration signal (H = I), GPTQ's per-column rule is
    /// nearest rounding in ggml's own form: the same bytes.
    #[test]
    fn identity_statistics_give_ggml_nearest_bytes() {
        let mut rng = Rng(42);
        let (n, k) = (8, 96);
        let w: Vec<f32> = (0..n * k).map(|_| rng.f()).collect();
        let mut h = vec![0f64; k * k];
        for i in 0..k {
            h[i * k + i] = 1.0;
        }
        let (u, dead) = inverse_cholesky(&h, k, 0.0).unwrap();
        let g = gptq_q4_0(&w, n, k, &u, &dead).unwrap();
        assert_eq!(g, quantize(GgmlType::Q4_0, &w, "w").unwrap());
    }

    #[test]
    fn bad_statistics_are_errors() {
        assert!(matches!(
            inverse_cholesky(&[1.0, 2.0, 2.0, 1.0], 2, 0.0),
            Err(GptqError::NotPositiveDefinite { .. })
        ));
        assert!(matches!(
            inverse_cholesky(&[f64::NAN], 1, 0.0),
            Err(GptqError::NotPositiveDefinite { .. })
        ));
        assert!(matches!(
            gptq_q4_0(&[0.0; 31], 1, 31, &[1.0; 961], &[false; 31]),
            Err(GptqError::Shape(_))
        ));
    }
}

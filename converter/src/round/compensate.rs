//! Low-rank error compensation: the rank-R part of a tensor's rounding error
//! W − Q(W) that matters most to its outputs, as a LoRA pair B·A a runtime
//! adds back (llama.cpp's `--lora`), for when a file must stay small and a
//! drift budget still fails.
//!
//! With calibration statistics H = XᵀX (damped, H = L·Lᵀ), the output error
//! ‖(E − B·A)X‖² = ‖(E − B·A)L‖², so B·A = [E·L]_R·L⁻¹, where [·]_R is the
//! best rank-R approximation; without them L = I and it is E's own. [E·L]_R
//! comes from a randomized range finder with power iterations (Halko,
//! Martinsson and Tropp 2011) and an eigendecomposition of the small
//! projected matrix: every product is with a thin matrix, so E·L (out × in²
//! flops) is never formed. All in f64, from a fixed seed: the bytes do not
//! depend on threads or runs.

/// A rank-R pair: `b · a` approximates the residual.
#[derive(Debug, Clone)]
pub struct LowRank {
    /// The rank (at most the one asked for: rows and columns bound it).
    pub rank: usize,
    /// A, `[rank, k]` row-major (llama.cpp's lora_a, ne [k, rank]).
    pub a: Vec<f32>,
    /// B, `[rows, rank]` row-major (llama.cpp's lora_b, ne [rank, rows]).
    pub b: Vec<f32>,
}

/// A pair as the adapter file holds it (llama.cpp's LoRA layout, `alpha`
/// shared by every tensor, so B is folded by rank / alpha), and what the
/// runtime adds back from those bytes, which is what a report may measure.
#[derive(Debug, Clone)]
pub struct StoredPair {
    /// A's bytes, ne `[k, rank]`.
    pub a: Vec<u8>,
    /// B's bytes (folded), ne `[rank, rows]`.
    pub b: Vec<u8>,
    /// The pair the runtime applies: A and B read back, B at the runtime's
    /// scale alpha / rank.
    pub applied: LowRank,
}

impl LowRank {
    /// The pair stored as `ty` in an adapter of `alpha`; refused when a value
    /// does not fit `ty` (f16 holds 65504 at most) rather than written as inf.
    pub fn store(
        &self,
        ty: lorafold_runtime::gguf::GgmlType,
        alpha: f32,
        tensor: &str,
    ) -> Result<StoredPair, CompensateError> {
        use crate::round::quant::{dequantize, quantize};
        let codec = |e: crate::round::quant::QuantError| CompensateError::Shape(e.to_string());
        let fold = self.rank as f32 / alpha;
        let folded: Vec<f32> = self.b.iter().map(|&x| x * fold).collect();
        let a = quantize(ty, &self.a, tensor).map_err(codec)?;
        let b = quantize(ty, &folded, tensor).map_err(codec)?;
        let a_back = dequantize(ty, &a, self.a.len(), tensor).map_err(codec)?;
        let b_back = dequantize(ty, &b, self.b.len(), tensor).map_err(codec)?;
        for (factor, back, before) in [("A", &a_back, &self.a), ("B", &b_back, &folded)] {
            if let Err(e) = crate::error::check_finite(back) {
                return Err(CompensateError::OutOfRange {
                    ty,
                    factor,
                    index: e.index,
                    value: before[e.index],
                });
            }
        }
        Ok(StoredPair {
            a,
            b,
            applied: LowRank {
                rank: self.rank,
                a: a_back,
                b: b_back.iter().map(|&x| x / fold).collect(),
            },
        })
    }
}

/// Why no pair could be made.
#[derive(Debug, thiserror::Error)]
pub enum CompensateError {
    /// The damped XᵀX has no Cholesky factor.
    #[error(
        "XᵀX damped by {} of its mean diagonal is not positive definite (column {column})",
        lorafold_runtime::number::compact(*damp)
    )]
    NotPositiveDefinite {
        /// the damping fraction
        damp: f64,
        /// where the factorisation failed
        column: usize,
    },
    /// The shapes do not agree.
    #[error("{0}")]
    Shape(String),
    /// A value of the pair does not fit the adapter's type.
    #[error("element {index} of {factor} is {value}, beyond what {} holds", ty.name())]
    OutOfRange {
        /// the adapter's type
        ty: lorafold_runtime::gguf::GgmlType,
        /// "A" or "B"
        factor: &'static str,
        /// where
        index: usize,
        /// the value before rounding to `ty`
        value: f32,
    },
}

/// Power iterations: enough for the spectrum of rounding error, which decays
/// slowly (each costs two thin products).
const POWER_ITERATIONS: usize = 3;
/// Extra directions sampled beyond the rank.
const OVERSAMPLE: usize = 8;

/// The rank-`rank` pair nearest to `residual` (`rows × k`, row-major) in the
/// output norm of `h` (XᵀX, `k × k`, damped by `damp` of its mean diagonal),
/// or in the Frobenius norm without `h`.
pub fn low_rank(
    residual: &[f32],
    rows: usize,
    k: usize,
    rank: usize,
    h: Option<&[f32]>,
    damp: f64,
) -> Result<LowRank, CompensateError> {
    if residual.len() != rows * k {
        return Err(CompensateError::Shape(format!(
            "residual has {} values, not {rows} x {k}",
            residual.len()
        )));
    }
    if let Some(h) = h.filter(|h| h.len() != k * k) {
        return Err(CompensateError::Shape(format!(
            "XᵀX has {} values, not {k} x {k}",
            h.len()
        )));
    }
    let rank = rank.min(rows).min(k);
    let p = (rank + OVERSAMPLE).min(rows).min(k);
    let e: Vec<f64> = residual.iter().map(|&x| x as f64).collect();
    let l = h.map(|h| cholesky_damped(h, k, damp)).transpose()?;
    let m = Operator {
        e: &e,
        rows,
        k,
        l: l.as_deref(),
    };
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let omega: Vec<Vec<f64>> = (0..p)
        .map(|_| (0..k).map(|_| uniform(&mut rng)).collect())
        .collect();
    let mut q = orthonormal(omega.iter().map(|x| m.apply(x)).collect());
    for _ in 0..POWER_ITERATIONS {
        let z = orthonormal(q.iter().map(|y| m.apply_t(y)).collect());
        q = orthonormal(z.iter().map(|x| m.apply(x)).collect());
    }
    // Bs = Qᵀ·M, one row per column of Q; its Gram matrix's eigenvectors
    // rotate Q onto M's leading left singular vectors.
    let bs: Vec<Vec<f64>> = q.iter().map(|y| m.apply_t(y)).collect();
    let p = q.len();
    let mut gram = vec![0f64; p * p];
    for i in 0..p {
        for j in 0..=i {
            let d = dot(&bs[i], &bs[j]);
            gram[i * p + j] = d;
            gram[j * p + i] = d;
        }
    }
    let (values, vectors) = symmetric_eigen(&mut gram, p);
    let mut order: Vec<usize> = (0..p).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
    let rank = rank.min(p);
    let mut a = vec![0f32; rank * k];
    let mut b = vec![0f32; rows * rank];
    for (c, &i) in order.iter().take(rank).enumerate() {
        if values[i] <= 0.0 {
            continue; // nothing left to approximate: a zero pair
        }
        let w: Vec<f64> = (0..p).map(|j| vectors[j * p + i]).collect();
        let mut row_a = vec![0f64; k];
        for (wj, bj) in w.iter().zip(&bs) {
            axpy(&mut row_a, *wj, bj);
        }
        if let Some(l) = &l {
            solve_upper_from_right(&mut row_a, l, k);
        }
        let col_b: Vec<f64> = (0..rows)
            .map(|r| w.iter().zip(&q).map(|(wj, qj)| wj * qj[r]).sum())
            .collect();
        // Split the component between A and B so that their largest entries
        // are equal: the product's scale then reaches neither factor alone,
        // so XᵀX scaled by any factor gives the same pair and f16 holds it
        // as long as it holds √(largest entry of the product).
        let largest = |v: &[f64]| v.iter().fold(0f64, |m, x| m.max(x.abs()));
        let (na, nb) = (largest(&row_a), largest(&col_b));
        if !(na > 0.0 && nb > 0.0) {
            continue;
        }
        let t = (na / nb).sqrt();
        for (dst, v) in a[c * k..(c + 1) * k].iter_mut().zip(&row_a) {
            *dst = (v / t) as f32;
        }
        for (r, v) in col_b.iter().enumerate() {
            b[r * rank + c] = (v * t) as f32;
        }
    }
    Ok(LowRank { rank, a, b })
}

/// x ↦ M·x and y ↦ Mᵀ·y for M = E·L, without forming M.
struct Operator<'a> {
    e: &'a [f64],
    rows: usize,
    k: usize,
    l: Option<&'a [f64]>,
}

impl Operator<'_> {
    fn apply(&self, x: &[f64]) -> Vec<f64> {
        let t: Vec<f64> = match self.l {
            Some(l) => (0..self.k)
                .map(|i| dot(&l[i * self.k..i * self.k + i + 1], &x[..i + 1]))
                .collect(),
            None => x.to_vec(),
        };
        (0..self.rows)
            .map(|r| dot(&self.e[r * self.k..(r + 1) * self.k], &t))
            .collect()
    }

    fn apply_t(&self, y: &[f64]) -> Vec<f64> {
        let mut u = vec![0f64; self.k];
        for (r, &yr) in y.iter().enumerate() {
            axpy(&mut u, yr, &self.e[r * self.k..(r + 1) * self.k]);
        }
        match self.l {
            Some(l) => {
                let mut v = vec![0f64; self.k];
                for (i, &ui) in u.iter().enumerate() {
                    axpy(&mut v[..i + 1], ui, &l[i * self.k..i * self.k + i + 1]);
                }
                v
            }
            None => u,
        }
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn axpy(y: &mut [f64], a: f64, x: &[f64]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

fn uniform(state: &mut u64) -> f64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    (*state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
}

/// Modified Gram-Schmidt, twice (once loses orthogonality on the nearly
/// dependent columns power iterations make); columns that vanish are dropped.
fn orthonormal(mut cols: Vec<Vec<f64>>) -> Vec<Vec<f64>> {
    let scale = cols
        .iter()
        .map(|c| dot(c, c).sqrt())
        .fold(0f64, f64::max)
        .max(f64::MIN_POSITIVE);
    let mut out: Vec<Vec<f64>> = Vec::with_capacity(cols.len());
    for mut c in cols.drain(..) {
        for _ in 0..2 {
            for q in &out {
                let d = dot(q, &c);
                axpy(&mut c, -d, q);
            }
        }
        let n = dot(&c, &c).sqrt();
        if n > 1e-12 * scale {
            c.iter_mut().for_each(|x| *x /= n);
            out.push(c);
        }
    }
    out
}

/// Lower Cholesky factor of `h + damp · mean(diag h) · I`, row-major.
fn cholesky_damped(h: &[f32], k: usize, damp: f64) -> Result<Vec<f64>, CompensateError> {
    let mean = (0..k).map(|i| h[i * k + i] as f64).sum::<f64>() / k.max(1) as f64;
    // An input that never fired leaves H = 0: weigh every column alike.
    let add = if mean > 0.0 { damp * mean } else { 1.0 };
    let mut l = vec![0f64; k * k];
    for i in 0..k {
        for j in 0..=i {
            let mut s = h[i * k + j] as f64 + if i == j { add } else { 0.0 };
            s -= dot(&l[i * k..i * k + j], &l[j * k..j * k + j]);
            if i == j {
                // NaN fails too.
                if s.is_nan() || s <= 0.0 {
                    return Err(CompensateError::NotPositiveDefinite { damp, column: i });
                }
                l[i * k + i] = s.sqrt();
            } else {
                l[i * k + j] = s / l[j * k + j];
            }
        }
    }
    Ok(l)
}

/// x ← x·L⁻¹ for lower-triangular L (row-major): solves x' L = x.
fn solve_upper_from_right(x: &mut [f64], l: &[f64], k: usize) {
    for i in (0..k).rev() {
        let xi = x[i] / l[i * k + i];
        x[i] = xi;
        let (head, _) = x.split_at_mut(i);
        axpy(head, -xi, &l[i * k..i * k + i]);
    }
}

/// Eigenvalues and eigenvectors (columns of the row-major result) of a
/// small symmetric matrix, by cyclic Jacobi rotations; `a` is destroyed.
fn symmetric_eigen(a: &mut [f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut v = vec![0f64; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    let norm: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    for _ in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * n + j] * a[i * n + j])
            .sum::<f64>()
            .sqrt();
        if off <= 1e-15 * norm || norm == 0.0 {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq.abs() <= 1e-300 {
                    continue;
                }
                let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for r in 0..n {
                    let (arp, arq) = (a[r * n + p], a[r * n + q]);
                    a[r * n + p] = c * arp - s * arq;
                    a[r * n + q] = s * arp + c * arq;
                }
                for r in 0..n {
                    let (apr, aqr) = (a[p * n + r], a[q * n + r]);
                    a[p * n + r] = c * apr - s * aqr;
                    a[q * n + r] = s * apr + c * aqr;
                }
                for r in 0..n {
                    let (vrp, vrq) = (v[r * n + p], v[r * n + q]);
                    v[r * n + p] = c * vrp - s * vrq;
                    v[r * n + q] = s * vrp + c * vrq;
                }
            }
        }
    }
    ((0..n).map(|i| a[i * n + i]).collect(), v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::Rng;
    use lorafold_runtime::gguf::GgmlType;

    fn product(lr: &LowRank, rows: usize, k: usize) -> Vec<f64> {
        let mut out = vec![0f64; rows * k];
        for r in 0..rows {
            for c in 0..lr.rank {
                let bv = lr.b[r * lr.rank + c] as f64;
                for j in 0..k {
                    out[r * k + j] += bv * lr.a[c * k + j] as f64;
                }
            }
        }
        out
    }

    /// tr(D H Dᵀ), or ‖D‖² without H.
    fn out_err2(d: &[f64], rows: usize, k: usize, h: Option<&[f32]>) -> f64 {
        (0..rows)
            .map(|r| {
                let row = &d[r * k..(r + 1) * k];
                match h {
                    None => dot(row, row),
                    Some(h) => (0..k)
                        .map(|i| {
                            row[i]
                                * dot(
                                    &h[i * k..(i + 1) * k]
                                        .iter()
                                        .map(|&x| x as f64)
                                        .collect::<Vec<_>>(),
                                    row,
                                )
                        })
                        .sum(),
                }
            })
            .sum()
    }

    /// Correlated inputs: X = G·mix, H = XᵀX.
    fn inputs(k: usize, tokens: usize, rng: &mut Rng) -> Vec<f32> {
        let mix: Vec<f32> = (0..k * k).map(|_| rng.f()).collect();
        let x: Vec<f32> = (0..tokens * k).map(|_| rng.f()).collect();
        let xm: Vec<f64> = (0..tokens * k)
            .map(|i| {
                let (t, j) = (i / k, i % k);
                (0..k)
                    .map(|m| x[t * k + m] as f64 * mix[m * k + j] as f64)
                    .sum::<f64>()
                    + 3.0 * x[t * k + j] as f64 * (j % 5) as f64
            })
            .collect();
        let mut h = vec![0f32; k * k];
        for i in 0..k {
            for j in 0..k {
                h[i * k + j] = (0..tokens)
                    .map(|t| xm[t * k + i] * xm[t * k + j])
                    .sum::<f64>() as f32;
            }
        }
        h
    }

    #[test]
    fn an_error_of_low_rank_is_recovered() {
        let (rows, k, r) = (40, 64, 3);
        let mut rng = Rng(7);
        let u: Vec<f32> = (0..rows * r).map(|_| rng.f()).collect();
        let v: Vec<f32> = (0..r * k).map(|_| rng.f()).collect();
        let e: Vec<f32> = (0..rows * k)
            .map(|i| (0..r).map(|c| u[(i / k) * r + c] * v[c * k + i % k]).sum())
            .collect();
        let h = inputs(k, 200, &mut rng);
        for h in [None, Some(h.as_slice())] {
            let lr = low_rank(&e, rows, k, r, h, 0.01).unwrap();
            let p = product(&lr, rows, k);
            let worst = e
                .iter()
                .zip(&p)
                .map(|(&a, b)| (a as f64 - b).abs())
                .fold(0f64, f64::max);
            assert!(worst < 1e-5, "max |E - BA| {worst}");
        }
    }

    #[test]
    fn weighting_by_the_inputs_lowers_the_output_error() {
        let (rows, k) = (48, 96);
        let mut rng = Rng(11);
        let e: Vec<f32> = (0..rows * k).map(|_| rng.f()).collect();
        let h = inputs(k, 400, &mut rng);
        let e64: Vec<f64> = e.iter().map(|&x| x as f64).collect();
        let before = out_err2(&e64, rows, k, Some(&h));
        let mut ete: Vec<f64> = (0..k * k)
            .map(|i| {
                (0..rows)
                    .map(|r| e64[r * k + i / k] * e64[r * k + i % k])
                    .sum()
            })
            .collect();
        let (mut tail, _) = symmetric_eigen(&mut ete, k);
        tail.sort_by(|a, b| b.total_cmp(a));
        let mut last = before;
        for r in [2, 8, 24] {
            let residual = |lr: &LowRank| -> Vec<f64> {
                let p = product(lr, rows, k);
                e64.iter().zip(&p).map(|(a, b)| a - b).collect()
            };
            let weighted = out_err2(
                &residual(&low_rank(&e, rows, k, r, Some(&h), 0.0).unwrap()),
                rows,
                k,
                Some(&h),
            );
            let plain_lr = low_rank(&e, rows, k, r, None, 0.0).unwrap();
            let plain = out_err2(&residual(&plain_lr), rows, k, Some(&h));
            // Each rank removes more; the weighted pair beats the plain SVD
            // in the norm that matters, and the plain one its own norm.
            assert!(weighted < last, "rank {r}: {weighted} vs {last}");
            assert!(
                weighted < plain,
                "rank {r}: weighted {weighted}, plain {plain}"
            );
            // Unweighted, it is within 2% of the best rank-r error: the tail
            // of EᵀE's eigenvalues (random E: a flat spectrum, the range
            // finder's worst case).
            let plain_f = out_err2(&residual(&plain_lr), rows, k, None);
            assert!(
                plain_f <= 1.02 * tail[r..].iter().sum::<f64>(),
                "rank {r}: {plain_f} vs {}",
                tail[r..].iter().sum::<f64>()
            );
            last = weighted;
        }
        assert!(last < 0.8 * before, "{last} vs {before}");
    }

    #[test]
    fn scaling_the_inputs_does_not_change_the_pair() {
        // The output norm of c·H orders directions as H does; the split
        // between A and B must not carry √c into either factor.
        let (rows, k) = (24, 32);
        let mut rng = Rng(5);
        let e: Vec<f32> = (0..rows * k).map(|_| 1e-3 * rng.f()).collect();
        let h = inputs(k, 100, &mut rng);
        let huge: Vec<f32> = h.iter().map(|&x| x * 1e30).collect();
        let plain = low_rank(&e, rows, k, 4, Some(&h), 0.01).unwrap();
        let scaled = low_rank(&e, rows, k, 4, Some(&huge), 0.01).unwrap();
        let largest = |v: &[f32]| v.iter().fold(0f32, |m, x| m.max(x.abs()));
        for (p, s) in [(&plain.a, &scaled.a), (&plain.b, &scaled.b)] {
            let worst = p
                .iter()
                .zip(s)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(worst <= 1e-3 * largest(p), "{worst} vs {}", largest(p));
        }
        assert!(scaled.store(GgmlType::F16, 4.0, "t").is_ok());
    }

    #[test]
    fn a_pair_beyond_the_adapter_type_is_refused_and_a_stored_one_read_back() {
        let lr = LowRank {
            rank: 2,
            a: vec![1.0, 2.0, 3.0, 1e6],
            b: vec![0.5, 0.25, 1.0, 2.0],
        };
        let err = lr.store(GgmlType::F16, 4.0, "t").unwrap_err().to_string();
        assert_eq!(err, "element 3 of A is 1000000, beyond what F16 holds");
        let stored = lr.store(GgmlType::F32, 4.0, "t").unwrap();
        // Folded by rank / alpha in the file, unfolded in what is applied.
        assert_eq!(
            crate::round::quant::dequantize(GgmlType::F32, &stored.b, 4, "t").unwrap(),
            [0.25, 0.125, 0.5, 1.0]
        );
        assert_eq!(stored.applied.b, lr.b);
        assert_eq!(stored.applied.a, lr.a);
    }

    #[test]
    fn a_dead_input_and_zero_error_are_handled() {
        let (rows, k) = (8, 16);
        let mut h = vec![0f32; k * k];
        for i in 1..k {
            h[i * k + i] = 1.0 + i as f32;
        }
        let zero = vec![0f32; rows * k];
        let lr = low_rank(&zero, rows, k, 4, Some(&h), 0.05).unwrap();
        assert!(lr.a.iter().chain(&lr.b).all(|&x| x == 0.0));
        assert!(matches!(
            low_rank(&zero, rows, k, 4, Some(&h), 0.0),
            Err(CompensateError::NotPositiveDefinite { column: 0, .. })
        ));
        assert!(low_rank(&zero[1..], rows, k, 4, None, 0.0).is_err());
    }
}

//! Error-feedback rounding (GPTQ, Frantar et al. 2022) into ggml's own
//! blocks: columns are coded one at a time, and each column's rounding
//! error is pushed into the columns not yet coded, weighted by the inverse
//! Hessian of the layer's inputs (H = XᵀX from `lorafold calibrate`), so
//! the layer's output error ‖(Q(W) − W) X‖ shrinks where nearest rounding
//! minimises the weight error alone. The file stays a plain GGUF of the
//! same types.
//!
//! Steps, as in the paper's reference code: dead inputs (H_ii = 0) get
//! H_ii = 1 and zero weights; H is damped by a fraction of its mean
//! diagonal; U is the upper Cholesky factor of H⁻¹. Block scales (and
//! minimum, and a K-quant's sub-block scales) come from ggml's own
//! quantizer or, given each input's importance (H's diagonal), from the
//! search of [`crate::round::importance`]: in natural column order, when each
//! block starts, from the error-updated weights; in act order (columns by
//! decreasing H_ii), for every block before coding starts. Each weight
//! then takes the nearest value of its block's grid
//! ([`lorafold_kernels::grid`]). Updates to later columns are applied
//! lazily, a band of columns at a time, as a small matrix product.
//!
//! Rows are independent, so they are coded in parallel in fixed groups:
//! the bytes are the same for any number of threads.

use lorafold_kernels::grid::{self, Grid};
use lorafold_kernels::WType;
use lorafold_runtime::gguf::GgmlType;
use rayon::prelude::*;

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
    /// The type has no blocks to code.
    #[error("GPTQ does not write {0}")]
    Type(String),
    /// ggml's quantizer refused a block (its message).
    #[error("{0}")]
    Quantizer(String),
    /// The statistics could not be read from their file.
    #[error("reading the statistics: {0}")]
    Io(String),
}

/// Columns per lazily applied band of updates (a multiple of every block length).
const BAND: usize = 256;
/// Rows coded together, sharing each read of U in the lazy updates.
const ROWS: usize = 8;

/// What GPTQ needs of one input's statistics: H⁻¹ = UᵀU with U upper.
#[derive(Debug, Clone)]
pub struct GptqFactor {
    /// Width of the input.
    pub k: usize,
    /// U, `[k, k]` row-major (f32, as the reference code keeps it).
    pub u: Vec<f32>,
    /// Inputs that never fired (H_ii = 0): their weights are zeroed.
    pub dead: Vec<bool>,
    /// The order columns are coded in, when not their own (U is then the
    /// factor of H with rows and columns in this order).
    pub order: Option<Vec<usize>>,
}

/// The factor U of the inverse of `h` (`[k, k]`, damped by `damp` times
/// its mean diagonal, dead inputs first set to 1), with H⁻¹ = UᵀU.
///
/// One Cholesky and one triangular inverse, in reversed order: if
/// P H P = RᵀR (P reverses the order, R upper), then H = V Vᵀ with
/// V = P Rᵀ P upper, and U = V⁻¹ = P R⁻ᵀ P. Accumulated in f64 with
/// every inner loop along memory.
///
/// With `act_order`, columns are coded by decreasing H_ii (dead inputs
/// last), the reference code's `act_order`: the factor is then of H with
/// rows and columns in that order, and [`gptq`] fixes every block's scales
/// before coding (static grids).
pub fn inverse_cholesky(
    h: &[f32],
    k: usize,
    damp: f64,
    act_order: bool,
) -> Result<GptqFactor, GptqError> {
    if act_order && h.len() == k * k {
        let mut order: Vec<usize> = (0..k).collect();
        order.sort_by(|&a, &b| h[b * k + b].total_cmp(&h[a * k + a]));
        let mut hp = vec![0f32; k * k];
        for (i, &a) in order.iter().enumerate() {
            for (j, &b) in order.iter().enumerate() {
                hp[i * k + j] = h[a * k + b];
            }
        }
        let mut f = inverse_cholesky_any(&hp, k, damp)?;
        f.dead = (0..k).map(|i| h[i * k + i] == 0.0).collect();
        f.order = Some(order);
        return Ok(f);
    }
    inverse_cholesky_any(h, k, damp)
}

crate::simd::avx2_or_portable! {
    fn inverse_cholesky_any(h: &[f32], k: usize, damp: f64) -> Result<GptqFactor, GptqError> {
        if h.len() != k * k {
            return Err(GptqError::Shape(format!(
                "{} values are not a {k} x {k} matrix",
                h.len()
            )));
        }
        // Exactly zero: a NaN or negative diagonal is a broken file, and fails below.
        let dead: Vec<bool> = (0..k).map(|i| h[i * k + i] == 0.0).collect();
        let mut a = reversed_damped(h, k, &dead, damp);
        cholesky_upper(&mut a, k)?;
        let t = invert_upper(&a, k);
        // U_ij = T_{rev j, rev i}.
        let rev = |i: usize| k - 1 - i;
        let mut u = vec![0f32; k * k];
        for i in 0..k {
            for j in i..k {
                u[i * k + j] = t[rev(j) * k + rev(i)] as f32;
            }
        }
        Ok(GptqFactor {
            k,
            u,
            dead,
            order: None,
        })
    }
}

// The steps below are inlined into `inverse_cholesky_any`, so that they are
// compiled inside its AVX2 copy too; a call would run them portable.

/// Rows finished (Cholesky) or inverted (triangular inverse) a panel at a time.
const NB: usize = 32;

/// a = P H P in f64 (upper triangle), damped by `damp` times the mean diagonal (dead: 1).
#[inline(always)]
fn reversed_damped(h: &[f32], k: usize, dead: &[bool], damp: f64) -> Vec<f64> {
    let diag = |i: usize| if dead[i] { 1.0 } else { h[i * k + i] as f64 };
    let mean = (0..k).map(diag).sum::<f64>() / k as f64;
    let rev = |i: usize| k - 1 - i;
    let mut a = vec![0f64; k * k];
    for i in 0..k {
        for j in i..k {
            a[i * k + j] = h[rev(i) * k + rev(j)] as f64;
        }
        a[i * k + i] = diag(rev(i)) + damp * mean;
    }
    a
}

/// `a` = RᵀR with R over the upper triangle; a bad pivot names its column of H.
#[inline(always)]
fn cholesky_upper(a: &mut [f64], k: usize) -> Result<(), GptqError> {
    // Row j is finished at step j and subtracted from the rows below; rows
    // are finished in panels of NB, and each panel is subtracted from a
    // trailing row while that row sits in cache (every element still takes
    // its updates in order of j).
    for j0 in (0..k).step_by(NB) {
        let j1 = (j0 + NB).min(k);
        for j in j0..j1 {
            let d = a[j * k + j];
            if d.is_nan() || d <= 0.0 {
                return Err(GptqError::NotPositiveDefinite { column: k - 1 - j });
            }
            let r = d.sqrt();
            a[j * k + j] = r;
            for v in &mut a[j * k + j + 1..(j + 1) * k] {
                *v /= r;
            }
            let (done, rest) = a.split_at_mut((j + 1) * k);
            for i in j + 1..j1 {
                let f = done[j * k + i];
                let row = &mut rest[(i - j - 1) * k + i..(i - j) * k];
                for (x, &y) in row.iter_mut().zip(&done[j * k + i..(j + 1) * k]) {
                    *x -= f * y;
                }
            }
        }
        // Trailing rows are independent: in parallel, each still taking
        // its updates in order of j, so the factor is the same to the bit
        // (k = 18944, a 7B FFN input: 2.3 TFLOP, the larger part of GPTQ).
        let (done, rest) = a.split_at_mut(j1 * k);
        let done = &*done;
        rest.par_chunks_mut(k * ROW_BLOCK)
            .enumerate()
            .for_each(|(b, rows)| subtract_panel(rows, done, k, j1 + b * ROW_BLOCK, j0..j1));
    }
    Ok(())
}

// The parallel steps' bodies run in threads of rayon's, outside the AVX2
// copy of `inverse_cholesky_any`: each has an AVX2 copy of its own.
/// Columns per tile of the parallel steps: a panel's 32 rows of a tile
/// (128 KB) stay in cache while every row below takes their updates, where
/// whole rows (a 7B FFN input's: 32 x 148 KB) streamed from memory for each
/// row and left the Cholesky bound by bandwidth.
const TILE: usize = 512;

/// Trailing rows per parallel task of the Cholesky.
const ROW_BLOCK: usize = 64;

crate::simd::avx2_or_portable! {
    /// Rows `first..` of the trailing matrix (`rows`, whole rows of `k`)
    /// less the finished rows `panel` of `done`, a tile of columns at a
    /// time; each element takes its updates in order of j, as unblocked.
    fn subtract_panel(rows: &mut [f64], done: &[f64], k: usize, first: usize, panel: std::ops::Range<usize>) {
        let n = rows.len() / k;
        let mut c0 = first;
        while c0 < k {
            let c1 = (c0 + TILE).min(k);
            // Row i starts at its diagonal.
            for r in 0..n.min(c1 - first) {
                let i = first + r;
                let lo = c0.max(i);
                let row = &mut rows[r * k + lo..r * k + c1];
                for j in panel.clone() {
                    let f = done[j * k + i];
                    for (x, &y) in row.iter_mut().zip(&done[j * k + lo..j * k + c1]) {
                        *x -= f * y;
                    }
                }
            }
            c0 = c1;
        }
    }
}

crate::simd::avx2_or_portable! {
    /// Add into rows `first..` of T (`rows`) the rows of T from `i1` on
    /// (`below`): T_i += −R_im / R_ii · T_m, a tile of columns at a time,
    /// each element in order of m.
    fn add_rows_below(rows: &mut [f64], below: &[f64], a: &[f64], k: usize, first: usize, i1: usize) {
        let n = rows.len() / k;
        let w = k - i1;
        let mut fs = vec![0f64; n * w];
        for r in 0..n {
            let i = first + r;
            for m in i1..k {
                fs[r * w + m - i1] = -a[i * k + m] / a[i * k + i];
            }
        }
        let mut c0 = i1;
        while c0 < k {
            let c1 = (c0 + TILE).min(k);
            for m in i1..c1 {
                let lo = c0.max(m);
                let tm = &below[(m - i1) * k + lo..(m - i1) * k + c1];
                for r in 0..n {
                    let f = fs[r * w + m - i1];
                    for (x, &y) in rows[r * k + lo..r * k + c1].iter_mut().zip(tm) {
                        *x += f * y;
                    }
                }
            }
            c0 = c1;
        }
    }
}

/// T = R⁻¹ (upper) for the upper triangle R of `a`.
#[inline(always)]
fn invert_upper(a: &[f64], k: usize) -> Vec<f64> {
    // From the bottom: R T = I gives T_i = (e_i − Σ_{m>i} R_im T_m) / R_ii.
    // In panels of NB rows: the rows below a panel are added into all of its
    // rows while each is in cache, then the panel's own rows, bottom up.
    let mut t = vec![0f64; k * k];
    let mut i1 = k;
    while i1 > 0 {
        let i0 = i1.saturating_sub(NB);
        let (head, below) = t.split_at_mut(i1 * k);
        for i in i0..i1 {
            head[i * k + i] = 1.0 / a[i * k + i];
        }
        // Each row below is read once per share of the panel's rows; the
        // shares run in parallel, each row still summed in order of m.
        let below = &*below;
        let share = NB.div_ceil(rayon::current_num_threads().max(1)) * k;
        head[i0 * k..]
            .par_chunks_mut(share)
            .enumerate()
            .for_each(|(c, rows)| add_rows_below(rows, below, a, k, i0 + c * share / k, i1));
        for i in (i0..i1).rev() {
            let rii = a[i * k + i];
            let (upper, lower) = head.split_at_mut((i + 1) * k);
            let ti = &mut upper[i * k..];
            for m in i + 1..i1 {
                let f = -a[i * k + m] / rii;
                let tm = &lower[(m - i - 1) * k + m..(m - i) * k];
                for (x, &y) in ti[m..].iter_mut().zip(tm) {
                    *x += f * y;
                }
            }
        }
        i1 = i0;
    }
    t
}

/// `w` (`n` rows of `k`, row-major) rounded to `wtype`'s blocks by GPTQ
/// with `f`'s factor; `dead` inputs get zero weights. With `imp` (one
/// weight per input) block scales are searched for the least weighted
/// error, else they are ggml's nearest. `tensor` names the tensor in errors.
pub fn gptq(
    wtype: GgmlType,
    w: &[f32],
    n: usize,
    f: &GptqFactor,
    imp: Option<&[f32]>,
    tensor: &str,
) -> Result<Vec<u8>, GptqError> {
    let k = f.k;
    let kt = WType::from_ggml_id(wtype.id())
        .filter(|t| grid::code_range(*t).is_some())
        .ok_or_else(|| GptqError::Type(wtype.name().into()))?;
    let (bl, bb) = (kt.block_len(), kt.block_bytes());
    if w.len() != n * k
        || f.u.len() != k * k
        || f.dead.len() != k
        || !k.is_multiple_of(bl)
        || imp.is_some_and(|i| i.len() != k)
    {
        return Err(GptqError::Shape(format!(
            "{} weights for {n} x {k} ({wtype} blocks of {bl}), factor {}, {} dead flags",
            w.len(),
            f.u.len(),
            f.dead.len()
        )));
    }
    let row_bytes = k / bl * bb;
    let mut out = vec![0u8; n * row_bytes];
    out.par_chunks_mut(ROWS * row_bytes)
        .zip(w.par_chunks(ROWS * k))
        .try_for_each(|(dst, src)| {
            Coder {
                wtype,
                kt,
                f,
                imp,
                tensor,
            }
            .code_rows(src, dst)
        })?;
    Ok(out)
}

/// What every group of rows of one tensor is coded with.
struct Coder<'a> {
    wtype: GgmlType,
    kt: WType,
    f: &'a GptqFactor,
    imp: Option<&'a [f32]>,
    tensor: &'a str,
}

impl Coder<'_> {
    /// The rows of `src` with the dead inputs' weights zeroed.
    fn live_weights(&self, src: &[f32]) -> Vec<f32> {
        let mut w = src.to_vec();
        for row in w.chunks_exact_mut(self.f.k) {
            for (x, &d) in row.iter_mut().zip(&self.f.dead) {
                if d {
                    *x = 0.0;
                }
            }
        }
        w
    }

    /// Fix the scales of the block `x` (starting at column `c0`) into
    /// `dst`, by the importance search or ggml's quantizer; its grid.
    fn set_block(&self, x: &[f32], c0: usize, dst: &mut [u8]) -> Result<Grid, GptqError> {
        match self.imp {
            Some(imp) => crate::round::importance::round_block(
                self.wtype,
                self.kt,
                x,
                &imp[c0..c0 + x.len()],
                dst,
                self.tensor,
            ),
            None => crate::round::quant::quantize(self.wtype, x, self.tensor)
                .map(|b| dst.copy_from_slice(&b)),
        }
        .map_err(|e| GptqError::Quantizer(e.to_string()))?;
        Ok(Grid::read(self.kt, dst))
    }

    /// GPTQ over a group of at most [`ROWS`] rows.
    fn code_rows(&self, src: &[f32], dst: &mut [u8]) -> Result<(), GptqError> {
        if let Some(order) = &self.f.order {
            return self.code_rows_in_order(src, dst, order);
        }
        let (kt, f) = (self.kt, self.f);
        let k = f.k;
        let (bl, bb) = (kt.block_len(), kt.block_bytes());
        let rows = src.len() / k;
        let row_bytes = k / bl * bb;
        let mut w = self.live_weights(src);
        let u = &f.u;
        let mut grids: Vec<Grid> = Vec::with_capacity(rows);
        let mut codes = vec![0i32; rows * bl];
        let mut err = vec![0f32; rows * BAND];
        for b0 in (0..k).step_by(BAND) {
            let b1 = (b0 + BAND).min(k);
            for j in b0..b1 {
                let e = j % bl;
                if e == 0 {
                    // The block's scales, from the weights as updated so far.
                    grids.clear();
                    for r in 0..rows {
                        let at = r * row_bytes + j / bl * bb;
                        let x = &w[r * k + j..r * k + j + bl];
                        grids.push(self.set_block(x, j, &mut dst[at..at + bb])?);
                    }
                }
                let ujj = u[j * k + j];
                let uj = &u[j * k + j + 1..j * k + b1];
                for r in 0..rows {
                    let row = &mut w[r * k..(r + 1) * k];
                    let x = row[j];
                    let q = grids[r].nearest(e, x);
                    codes[r * bl + e] = q;
                    let ej = (x - grids[r].value(e, q)) / ujj;
                    err[r * BAND + j - b0] = ej;
                    for (v, &y) in row[j + 1..b1].iter_mut().zip(uj) {
                        *v -= ej * y;
                    }
                }
                if e == bl - 1 {
                    for r in 0..rows {
                        let at = r * row_bytes + j / bl * bb;
                        grid::write_codes(kt, &mut dst[at..at + bb], &codes[r * bl..(r + 1) * bl]);
                    }
                }
            }
            if b1 < k {
                lazy_update(&mut w, rows, k, &err, u, b0, b1);
            }
        }
        Ok(())
    }

    /// GPTQ in `order` with static grids: every block's scales fixed from
    /// the weights before any error is pushed.
    fn code_rows_in_order(
        &self,
        src: &[f32],
        dst: &mut [u8],
        order: &[usize],
    ) -> Result<(), GptqError> {
        let (kt, f) = (self.kt, self.f);
        let k = f.k;
        let (bl, bb) = (kt.block_len(), kt.block_bytes());
        let (rows, nb) = (src.len() / k, k / bl);
        let row_bytes = nb * bb;
        let w = self.live_weights(src);
        let mut grids: Vec<Grid> = Vec::with_capacity(rows * nb);
        for r in 0..rows {
            for b in 0..nb {
                let at = r * row_bytes + b * bb;
                let x = &w[r * k + b * bl..r * k + (b + 1) * bl];
                grids.push(self.set_block(x, b * bl, &mut dst[at..at + bb])?);
            }
        }
        // Work in coding order.
        let mut wp = vec![0f32; rows * k];
        for r in 0..rows {
            for (p, &c) in order.iter().enumerate() {
                wp[r * k + p] = w[r * k + c];
            }
        }
        let u = &f.u;
        let mut codes = vec![0i32; rows * k];
        let mut err = vec![0f32; rows * BAND];
        for b0 in (0..k).step_by(BAND) {
            let b1 = (b0 + BAND).min(k);
            for p in b0..b1 {
                let c = order[p];
                let (b, e) = (c / bl, c % bl);
                let upp = u[p * k + p];
                let up = &u[p * k + p + 1..p * k + b1];
                for r in 0..rows {
                    let row = &mut wp[r * k..(r + 1) * k];
                    let x = row[p];
                    let g = &grids[r * nb + b];
                    let q = g.nearest(e, x);
                    codes[r * k + c] = q;
                    let ep = (x - g.value(e, q)) / upp;
                    err[r * BAND + p - b0] = ep;
                    for (v, &y) in row[p + 1..b1].iter_mut().zip(up) {
                        *v -= ep * y;
                    }
                }
            }
            if b1 < k {
                lazy_update(&mut wp, rows, k, &err, u, b0, b1);
            }
        }
        for r in 0..rows {
            for b in 0..nb {
                let at = r * row_bytes + b * bb;
                grid::write_codes(
                    kt,
                    &mut dst[at..at + bb],
                    &codes[r * k + b * bl..r * k + (b + 1) * bl],
                );
            }
        }
        Ok(())
    }
}

crate::simd::avx2_or_portable! {
    /// w[r, b1..] −= Σ_j err[r, j] U[j, b1..] over the band's columns j in
    /// b0..b1: a small matrix product, eight columns of every row held while
    /// the band's rows of U stream past.
    fn lazy_update(
        w: &mut [f32],
        rows: usize,
        k: usize,
        err: &[f32],
        u: &[f32],
        b0: usize,
        b1: usize,
    ) {
        const C: usize = 8;
        let mut c0 = b1;
        // Whole groups of C columns with fixed-size loads: a copy of a
        // variable length was a call to memmove per row of U and group,
        // two thirds of a 7B FFN tensor's GPTQ time.
        while c0 + C <= k {
            let mut acc = [[0f32; C]; ROWS];
            for (r, a) in acc.iter_mut().enumerate().take(rows) {
                *a = w[r * k + c0..r * k + c0 + C].try_into().expect("C values");
            }
            for j in b0..b1 {
                let uj: [f32; C] = u[j * k + c0..j * k + c0 + C].try_into().expect("C values");
                for (r, a) in acc.iter_mut().enumerate().take(rows) {
                    let e = err[r * BAND + j - b0];
                    for c in 0..C {
                        a[c] -= e * uj[c];
                    }
                }
            }
            for (r, a) in acc.iter().enumerate().take(rows) {
                w[r * k + c0..r * k + c0 + C].copy_from_slice(a);
            }
            c0 += C;
        }
        while c0 < k {
            let cw = C.min(k - c0);
            let mut acc = [[0f32; C]; ROWS];
            for (r, a) in acc.iter_mut().enumerate().take(rows) {
                a[..cw].copy_from_slice(&w[r * k + c0..r * k + c0 + cw]);
            }
            for j in b0..b1 {
                let mut uj = [0f32; C];
                uj[..cw].copy_from_slice(&u[j * k + c0..j * k + c0 + cw]);
                for (r, a) in acc.iter_mut().enumerate().take(rows) {
                    let e = err[r * BAND + j - b0];
                    for c in 0..C {
                        a[c] -= e * uj[c];
                    }
                }
            }
            for (r, a) in acc.iter().enumerate().take(rows) {
                w[r * k + c0..r * k + c0 + cw].copy_from_slice(&a[..cw]);
            }
            c0 += cw;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::round::quant::{dequantize, quantize};
    use candle_core::{Device, Tensor};

    use crate::test_rng::Rng;

    use crate::round::quant::BLOCK_TYPES as TYPES;

    /// ‖(Q − W) Xᵀ‖² over the calibration rows.
    fn output_error(q: &[f32], w: &[f32], x: &Tensor, n: usize, k: usize) -> f64 {
        let d: Vec<f32> = q.iter().zip(w).map(|(a, b)| a - b).collect();
        let d = Tensor::from_vec(d, (n, k), &Device::Cpu).unwrap();
        let y = x.matmul(&d.t().unwrap()).unwrap();
        y.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
    }

    /// `m` inputs of width `k` with a few strong shared directions plus a
    /// little noise, input 5 dead; and H = XᵀX in f64.
    fn correlated_inputs(m: usize, k: usize, rng: &mut Rng) -> (Tensor, Vec<f32>) {
        let dirs: Vec<f32> = (0..6 * k).map(|_| rng.f()).collect();
        let mut x = vec![0f32; m * k];
        for i in 0..m {
            let c: Vec<f32> = (0..6).map(|_| rng.f() * 2.0).collect();
            for j in 0..k {
                x[i * k + j] = (0..6).map(|t| c[t] * dirs[t * k + j]).sum::<f32>() + 0.05 * rng.f();
            }
            x[i * k + 5] = 0.0;
        }
        let x = Tensor::from_vec(x, (m, k), &Device::Cpu).unwrap();
        let h: Vec<f32> = x
            .t()
            .unwrap()
            .matmul(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        (x, h)
    }

    /// On random linears fed correlated inputs (a few strong directions,
    /// one dead input), GPTQ's output error is below nearest rounding's for
    /// every type, with whole bands and a remainder band, in natural and in
    /// act order; its blocks decode through candle's readers.
    #[test]
    fn gptq_beats_nearest_on_correlated_inputs_for_every_type() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for (n, k) in [(16, 256), (9, 512 + 256)] {
            let (x, h) = correlated_inputs(2 * k, k, &mut rng);
            let f = inverse_cholesky(&h, k, 0.01, false).unwrap();
            assert!(f.dead[5] && f.dead.iter().filter(|&&d| d).count() == 1);
            let fa = inverse_cholesky(&h, k, 0.01, true).unwrap();
            assert_eq!(
                fa.order.as_ref().map(|o| o[k - 1]),
                Some(5),
                "dead input last"
            );
            let w: Vec<f32> = (0..n * k).map(|_| 0.05 * rng.f()).collect();
            let imp: Vec<f32> = (0..k).map(|i| h[i * k + i]).collect();
            for t in TYPES {
                let nq = dequantize(t, &quantize(t, &w, "w").unwrap(), n * k, "w").unwrap();
                let en = output_error(&nq, &w, &x, n, k);
                for (how, f, imp) in [
                    ("ggml scales", &f, None),
                    ("searched scales", &f, Some(&imp[..])),
                    ("act order", &fa, Some(&imp[..])),
                ] {
                    let g = gptq(t, &w, n, f, imp, "w").unwrap();
                    let gq = dequantize(t, &g, n * k, "w").unwrap();
                    let eg = output_error(&gq, &w, &x, n, k);
                    eprintln!("{t} {n}x{k} {how}: output error gptq {eg:.4e}, nearest {en:.4e}");
                    assert!(
                        eg < 0.5 * en,
                        "{t} {n}x{k} {how}: gptq {eg} vs nearest {en}"
                    );
                }
            }
        }
    }

    /// The bytes do not depend on the number of threads (rows are coded in
    /// fixed groups), in either order, nor do importance rounding's.
    // The Cholesky and triangular inverse as they were before their rows
    // ran in parallel a tile at a time, one thread, whole rows.
    fn serial_cholesky_upper(a: &mut [f64], k: usize) -> Result<(), GptqError> {
        // Row j is finished at step j and subtracted from the rows below; rows
        // are finished in panels of NB, and each panel is subtracted from a
        // trailing row while that row sits in cache (every element still takes
        // its updates in order of j).
        for j0 in (0..k).step_by(NB) {
            let j1 = (j0 + NB).min(k);
            for j in j0..j1 {
                let d = a[j * k + j];
                if d.is_nan() || d <= 0.0 {
                    return Err(GptqError::NotPositiveDefinite { column: k - 1 - j });
                }
                let r = d.sqrt();
                a[j * k + j] = r;
                for v in &mut a[j * k + j + 1..(j + 1) * k] {
                    *v /= r;
                }
                let (done, rest) = a.split_at_mut((j + 1) * k);
                for i in j + 1..j1 {
                    let f = done[j * k + i];
                    let row = &mut rest[(i - j - 1) * k + i..(i - j) * k];
                    for (x, &y) in row.iter_mut().zip(&done[j * k + i..(j + 1) * k]) {
                        *x -= f * y;
                    }
                }
            }
            let (done, rest) = a.split_at_mut(j1 * k);
            for i in j1..k {
                let row = &mut rest[(i - j1) * k + i..(i - j1 + 1) * k];
                for j in j0..j1 {
                    let f = done[j * k + i];
                    for (x, &y) in row.iter_mut().zip(&done[j * k + i..(j + 1) * k]) {
                        *x -= f * y;
                    }
                }
            }
        }
        Ok(())
    }
    fn serial_invert_upper(a: &[f64], k: usize) -> Vec<f64> {
        // From the bottom: R T = I gives T_i = (e_i − Σ_{m>i} R_im T_m) / R_ii.
        // In panels of NB rows: the rows below a panel are added into all of its
        // rows while each is in cache, then the panel's own rows, bottom up.
        let mut t = vec![0f64; k * k];
        let mut i1 = k;
        while i1 > 0 {
            let i0 = i1.saturating_sub(NB);
            let (head, below) = t.split_at_mut(i1 * k);
            for i in i0..i1 {
                head[i * k + i] = 1.0 / a[i * k + i];
            }
            // Each row below is read once for the whole panel.
            for m in i1..k {
                let tm = &below[(m - i1) * k + m..(m - i1 + 1) * k];
                for i in i0..i1 {
                    let f = -a[i * k + m] / a[i * k + i];
                    for (x, &y) in head[i * k + m..(i + 1) * k].iter_mut().zip(tm) {
                        *x += f * y;
                    }
                }
            }
            for i in (i0..i1).rev() {
                let rii = a[i * k + i];
                let (upper, lower) = head.split_at_mut((i + 1) * k);
                let ti = &mut upper[i * k..];
                for m in i + 1..i1 {
                    let f = -a[i * k + m] / rii;
                    let tm = &lower[(m - i - 1) * k + m..(m - i) * k];
                    for (x, &y) in ti[m..].iter_mut().zip(tm) {
                        *x += f * y;
                    }
                }
            }
            i1 = i0;
        }
        t
    }

    /// The tiled, parallel Cholesky and inverse give the serial code's
    /// factor to the bit, at sizes across panels and tiles.
    #[test]
    fn the_parallel_factor_equals_the_serial_one_to_the_bit() {
        let mut rng = Rng(5);
        for k in [7, 31, 97, 700] {
            let (_, h) = correlated_inputs(k + 8, k, &mut rng);
            let dead: Vec<bool> = (0..k).map(|i| h[i * k + i] == 0.0).collect();
            let a0 = reversed_damped(&h, k, &dead, 0.01);
            let (mut a, mut b) = (a0.clone(), a0);
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(3)
                .build()
                .unwrap();
            pool.install(|| cholesky_upper(&mut a, k)).unwrap();
            serial_cholesky_upper(&mut b, k).unwrap();
            assert!(a == b, "Cholesky, k = {k}");
            let t = pool.install(|| invert_upper(&a, k));
            assert!(t == serial_invert_upper(&b, k), "inverse, k = {k}");
        }
    }

    #[test]
    fn bytes_are_the_same_for_any_thread_count() {
        let mut rng = Rng(77);
        let (n, k) = (37, 512);
        let (_, h) = correlated_inputs(k, k, &mut rng);
        let w: Vec<f32> = (0..n * k).map(|_| 0.05 * rng.f()).collect();
        let imp: Vec<f32> = (0..k).map(|i| h[i * k + i]).collect();
        let run = |threads: usize, act: bool, t: GgmlType| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let f = inverse_cholesky(&h, k, 0.05, act).unwrap();
                let g = gptq(t, &w, n, &f, Some(&imp), "w").unwrap();
                let i = crate::round::importance::importance_round(t, &w, n, &imp, "w").unwrap();
                (g, i)
            })
        };
        for t in [GgmlType::Q4_0, GgmlType::Q4_K] {
            for act in [false, true] {
                assert!(run(1, act, t) == run(3, act, t), "{t} act order {act}");
            }
        }
    }

    /// Without calibration signal (H = I), GPTQ is nearest rounding on the
    /// grid ggml's quantizer picks: the same scales, and no weight further
    /// from its value than ggml's own code puts it.
    #[test]
    fn identity_statistics_give_ggml_grids_and_nearest_codes() {
        let mut rng = Rng(42);
        let (n, k) = (3, 512);
        let w: Vec<f32> = (0..n * k).map(|_| rng.f()).collect();
        let mut h = vec![0f32; k * k];
        for i in 0..k {
            h[i * k + i] = 1.0;
        }
        let f = inverse_cholesky(&h, k, 0.0, false).unwrap();
        for t in TYPES {
            let kt = WType::from_ggml_id(t.id()).unwrap();
            let g = gptq(t, &w, n, &f, None, "w").unwrap();
            let want = quantize(t, &w, "w").unwrap();
            let (same, blocks) = g
                .chunks(kt.block_bytes())
                .zip(want.chunks(kt.block_bytes()))
                .fold((0, 0), |(s, b), (x, y)| (s + (x == y) as usize, b + 1));
            for (x, y) in g
                .chunks(kt.block_bytes())
                .zip(want.chunks(kt.block_bytes()))
            {
                let (gx, gy) = (Grid::read(kt, x), Grid::read(kt, y));
                assert_eq!((gx.d, gx.m), (gy.d, gy.m), "{t}: scales differ");
            }
            let (ours, theirs) = (
                dequantize(t, &g, n * k, "w").unwrap(),
                dequantize(t, &want, n * k, "w").unwrap(),
            );
            for ((a, b), v) in ours.iter().zip(&theirs).zip(&w) {
                assert!(
                    (a - v).abs() <= (b - v).abs() * (1.0 + 1e-6),
                    "{t}: {a} vs {b} for {v}"
                );
            }
            // ggml picks codes with the f32 scale, the file holds its f16
            // rounding: where the two disagree our code is the nearer one.
            eprintln!("{t}: {same} of {blocks} blocks byte-identical to ggml's");
        }
    }

    /// H_d UᵀU = I: U is the upper factor of the damped inverse.
    #[test]
    fn factor_inverts_the_damped_statistics() {
        let mut rng = Rng(5);
        let k = 40;
        let (_, mut h) = correlated_inputs(3 * k, k, &mut rng);
        // A second dead input besides input 5: its row and column are zero,
        // as in any XᵀX.
        for i in 0..k {
            h[7 * k + i] = 0.0;
            h[i * k + 7] = 0.0;
        }
        let f = inverse_cholesky(&h, k, 0.01, false).unwrap();
        assert!(f.dead[5] && f.dead[7]);
        let mut hd: Vec<f64> = h.iter().map(|&v| v as f64).collect();
        hd[5 * k + 5] = 1.0;
        hd[7 * k + 7] = 1.0;
        let mean = (0..k).map(|i| hd[i * k + i]).sum::<f64>() / k as f64;
        for i in 0..k {
            hd[i * k + i] += 0.01 * mean;
        }
        for i in 0..k {
            for j in 0..i {
                assert_eq!(f.u[i * k + j], 0.0, "U is upper");
            }
        }
        // (UᵀU)_ij = Σ_m U_mi U_mj; then times H_d.
        let inv: Vec<f64> = (0..k * k)
            .map(|ij| {
                let (i, j) = (ij / k, ij % k);
                (0..k)
                    .map(|m| f.u[m * k + i] as f64 * f.u[m * k + j] as f64)
                    .sum()
            })
            .collect();
        for i in 0..k {
            for j in 0..k {
                let p: f64 = (0..k).map(|m| hd[i * k + m] * inv[m * k + j]).sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((p - want).abs() < 1e-3, "({i},{j}): {p}");
            }
        }
    }

    #[test]
    fn bad_statistics_are_errors() {
        assert!(matches!(
            inverse_cholesky(&[1.0, 2.0, 2.0, 1.0], 2, 0.0, false),
            Err(GptqError::NotPositiveDefinite { .. })
        ));
        assert!(matches!(
            inverse_cholesky(&[f32::NAN], 1, 0.0, false),
            Err(GptqError::NotPositiveDefinite { .. })
        ));
        let f = inverse_cholesky(&[1.0; 1], 1, 0.0, false).unwrap();
        assert!(matches!(
            gptq(GgmlType::Q4_0, &[0.0; 1], 1, &f, None, "w"),
            Err(GptqError::Shape(_))
        ));
        assert!(matches!(
            gptq(GgmlType::F16, &[0.0; 1], 1, &f, None, "w"),
            Err(GptqError::Type(_))
        ));
    }
}

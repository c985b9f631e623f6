//! The two inner loops of attention over a KV cache row: q·k and acc += p·v,
//! with the row stored as f32 or f16, AVX2+FMA+F16C chosen at run time.
//! Scalar and SIMD sum in the same eight-lane order, so they agree closely
//! (FMA rounds once where scalar rounds twice).

use half::f16;

use crate::Isa;

/// A cache row: f32 or f16 values.
#[derive(Debug, Clone, Copy)]
pub enum Row<'a> {
    /// Full precision.
    F32(&'a [f32]),
    /// Half precision.
    F16(&'a [f16]),
}

/// q · row.
pub fn dot(q: &[f32], row: Row, isa: Isa) -> f32 {
    // SAFETY: `isa` was detected on this CPU (see `Isa`).
    unsafe { (isa.kernels().dot)(q, row) }
}

/// The portable [`dot`]: eight lanes summed as every tier sums them.
pub(crate) fn dot_scalar(q: &[f32], row: Row) -> f32 {
    let mut acc = [0f32; 8];
    let n = q.len();
    let at = |i: usize| match row {
        Row::F32(r) => r[i],
        Row::F16(r) => r[i].to_f32(),
    };
    for c in 0..n / 8 {
        for (l, a) in acc.iter_mut().enumerate() {
            *a += q[c * 8 + l] * at(c * 8 + l);
        }
    }
    let tail = n / 8 * 8;
    let mut s = lanes(acc);
    for (i, &qi) in q.iter().enumerate().skip(tail) {
        s += qi * at(i);
    }
    s
}

/// acc += p * row.
pub fn axpy(acc: &mut [f32], p: f32, row: Row, isa: Isa) {
    // SAFETY: as in `dot`.
    unsafe { (isa.kernels().axpy)(acc, p, row) }
}

/// The portable [`axpy`].
pub(crate) fn axpy_scalar(acc: &mut [f32], p: f32, row: Row) {
    match row {
        Row::F32(r) => acc.iter_mut().zip(r).for_each(|(a, &v)| *a += p * v),
        Row::F16(r) => acc
            .iter_mut()
            .zip(r)
            .for_each(|(a, &v)| *a += p * v.to_f32()),
    }
}

/// `out[h] = q_h · row` for the `out.len()` query vectors laid end to end
/// in `q` (a group of heads sharing one KV head): the row is loaded (and
/// widened from f16) once for all of them, and their sums run side by side
/// instead of one latency-bound chain each.
pub fn dots(q: &[f32], row: Row, out: &mut [f32], isa: Isa) {
    let hd = q.len() / out.len().max(1);
    // SAFETY: as in `dot`.
    unsafe { (isa.kernels().dots)(q, row, out, hd) }
}

/// The portable [`dots`]: one [`dot_scalar`] per head.
pub(crate) fn dots_scalar(q: &[f32], row: Row, out: &mut [f32], hd: usize) {
    for (o, qh) in out.iter_mut().zip(q.chunks_exact(hd)) {
        *o = dot_scalar(qh, row);
    }
}

/// `acc_h += p[h] * row` for the `p.len()` accumulators laid end to end in `acc`.
pub fn axpys(acc: &mut [f32], p: &[f32], row: Row, isa: Isa) {
    let hd = acc.len() / p.len().max(1);
    // SAFETY: as in `dot`.
    unsafe { (isa.kernels().axpys)(acc, p, row, hd) }
}

/// The portable [`axpys`]: one [`axpy_scalar`] per head.
pub(crate) fn axpys_scalar(acc: &mut [f32], p: &[f32], row: Row, hd: usize) {
    for (a, &ph) in acc.chunks_exact_mut(hd).zip(p) {
        axpy_scalar(a, ph, row);
    }
}

/// Softmax of `x` in place, as ggml computes it: the largest value
/// subtracted, e^x summed in f64, then scaled. The SIMD paths' e^x is a
/// degree-6 polynomial after range reduction (Cephes' expf, within 2 ulp):
/// prefill computes one e^x per (query, key) pair, as many as its products'
/// multiply-adds divided by the head width, and libm's scalar expf made
/// softmax cost as much as both products together at long prompts.
pub fn softmax(x: &mut [f32], isa: Isa) {
    if x.is_empty() {
        return;
    }
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    // SAFETY: as in `dot`.
    let sum = unsafe { (isa.kernels().exp_shifted)(x, max) };
    let inv = (1.0 / sum) as f32;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// `x = e^(x - max)` in place; returns the sum in f64.
pub(crate) fn exp_shifted_scalar(x: &mut [f32], max: f32) -> f64 {
    let mut sum = 0f64;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v as f64;
    }
    sum
}

fn lanes(a: [f32; 8]) -> f32 {
    ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    use super::{lanes, Row};

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load(row: Row, i: usize) -> __m256 {
        match row {
            Row::F32(r) => _mm256_loadu_ps(r.as_ptr().add(i)),
            Row::F16(r) => _mm256_cvtph_ps(_mm_loadu_si128(r.as_ptr().add(i) as *const __m128i)),
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn dot(q: &[f32], row: Row) -> f32 {
        let n = q.len();
        let len = match row {
            Row::F32(r) => r.len(),
            Row::F16(r) => r.len(),
        };
        assert!(len >= n, "cache row shorter than q");
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(q.as_ptr().add(i)), load(row, i), acc);
            i += 8;
        }
        let mut a = [0f32; 8];
        _mm256_storeu_ps(a.as_mut_ptr(), acc);
        let mut s = lanes(a);
        for j in i..n {
            s += q[j]
                * match row {
                    Row::F32(r) => r[j],
                    Row::F16(r) => r[j].to_f32(),
                };
        }
        s
    }

    /// Queries at most this many at once (more go in turns).
    const NQ: usize = 4;

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn dots(q: &[f32], row: Row, out: &mut [f32], hd: usize) {
        if !hd.is_multiple_of(16) {
            for (o, qh) in out.iter_mut().zip(q.chunks_exact(hd)) {
                *o = dot(qh, row);
            }
            return;
        }
        let len = match row {
            Row::F32(r) => r.len(),
            Row::F16(r) => r.len(),
        };
        assert!(
            len >= hd && q.len() >= out.len() * hd,
            "cache row shorter than q"
        );
        let mut h0 = 0;
        while h0 < out.len() {
            let nq = (out.len() - h0).min(NQ);
            // Two accumulators per query (even and odd chunks) halve the chain.
            let mut acc = [[_mm256_setzero_ps(); 2]; NQ];
            let mut i = 0;
            while i < hd {
                let r0 = load(row, i);
                let r1 = load(row, i + 8);
                for (h, a) in acc.iter_mut().enumerate().take(nq) {
                    let qp = q.as_ptr().add((h0 + h) * hd + i);
                    a[0] = _mm256_fmadd_ps(_mm256_loadu_ps(qp), r0, a[0]);
                    a[1] = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(8)), r1, a[1]);
                }
                i += 16;
            }
            for (h, a) in acc.iter().enumerate().take(nq) {
                let mut l = [0f32; 8];
                _mm256_storeu_ps(l.as_mut_ptr(), _mm256_add_ps(a[0], a[1]));
                out[h0 + h] = lanes(l);
            }
            h0 += nq;
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn axpys(acc: &mut [f32], p: &[f32], row: Row, hd: usize) {
        if !hd.is_multiple_of(8) {
            for (a, &ph) in acc.chunks_exact_mut(hd).zip(p) {
                axpy(a, ph, row);
            }
            return;
        }
        let len = match row {
            Row::F32(r) => r.len(),
            Row::F16(r) => r.len(),
        };
        assert!(
            len >= hd && acc.len() >= p.len() * hd,
            "cache row shorter than the accumulator"
        );
        let mut i = 0;
        while i < hd {
            let v = load(row, i);
            for (h, &ph) in p.iter().enumerate() {
                let ap = acc.as_mut_ptr().add(h * hd + i);
                _mm256_storeu_ps(
                    ap,
                    _mm256_fmadd_ps(_mm256_set1_ps(ph), v, _mm256_loadu_ps(ap)),
                );
            }
            i += 8;
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn axpy(acc: &mut [f32], p: f32, row: Row) {
        let n = acc.len();
        let len = match row {
            Row::F32(r) => r.len(),
            Row::F16(r) => r.len(),
        };
        assert!(len >= n, "cache row shorter than the accumulator");
        let pv = _mm256_set1_ps(p);
        let mut i = 0;
        while i + 8 <= n {
            let a = _mm256_loadu_ps(acc.as_ptr().add(i));
            _mm256_storeu_ps(
                acc.as_mut_ptr().add(i),
                _mm256_fmadd_ps(pv, load(row, i), a),
            );
            i += 8;
        }
        for j in i..n {
            acc[j] += p * match row {
                Row::F32(r) => r[j],
                Row::F16(r) => r[j].to_f32(),
            };
        }
    }
    /// `x = e^(x - max)` in place, eight at a time; returns the sum in f64.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn exp_shifted(x: &mut [f32], max: f32) -> f64 {
        let n = x.len();
        let m = _mm256_set1_ps(max);
        let (mut lo, mut hi) = (_mm256_setzero_pd(), _mm256_setzero_pd());
        let mut i = 0;
        while i + 8 <= n {
            let p = x.as_mut_ptr().add(i);
            let e = exp(_mm256_sub_ps(_mm256_loadu_ps(p), m));
            _mm256_storeu_ps(p, e);
            lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
            hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
            i += 8;
        }
        let mut l = [0f64; 4];
        _mm256_storeu_pd(l.as_mut_ptr(), _mm256_add_pd(lo, hi));
        let mut sum = (l[0] + l[2]) + (l[1] + l[3]);
        for v in &mut x[i..] {
            *v = (*v - max).exp();
            sum += *v as f64;
        }
        sum
    }

    /// e^x for eight lanes: x = n·ln 2 + r with |r| <= ln 2 / 2, e^r by
    /// Cephes' polynomial, 2^n built in the exponent bits. Inputs below
    /// -87.3 give 0 (softmax's masked and negligible terms), not denormals.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn exp(x: __m256) -> __m256 {
        let tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3), _CMP_LT_OQ);
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-87.3)),
            _mm256_set1_ps(88.3),
        );
        let n = _mm256_floor_ps(_mm256_fmadd_ps(
            x,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
            _mm256_set1_ps(0.5),
        ));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut y = _mm256_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            5.000_000_1e-1,
        ] {
            y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
        }
        let y = _mm256_fmadd_ps(
            y,
            _mm256_mul_ps(r, r),
            _mm256_add_ps(r, _mm256_set1_ps(1.0)),
        );
        let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
            23,
        ));
        _mm256_andnot_ps(tiny, _mm256_mul_ps(y, pow2))
    }
}

/// The same products with NEON (every aarch64 CPU), f16 rows widened with
/// `fcvtl`; the sums run in the SIMD order the AVX2 paths use, and e^x is
/// the same polynomial.
#[cfg(target_arch = "aarch64")]
pub(crate) mod neon {
    use std::arch::aarch64::*;

    use super::Row;
    use crate::float_neon::hsum;
    use crate::neon::{fcvtl, fcvtl2};

    /// Elements `i..i + 8` of the row, widened (lanes 0-3, 4-7).
    #[inline(always)]
    unsafe fn load(row: Row, i: usize) -> [float32x4_t; 2] {
        match row {
            Row::F32(r) => {
                let p = r.as_ptr().add(i);
                [vld1q_f32(p), vld1q_f32(p.add(4))]
            }
            Row::F16(r) => {
                let h = vld1q_u16(r.as_ptr().add(i) as *const u16);
                [fcvtl(vget_low_u16(h)), fcvtl2(h)]
            }
        }
    }

    /// Element `j` of the row as f32.
    #[inline(always)]
    fn at(row: Row, j: usize) -> f32 {
        match row {
            Row::F32(r) => r[j],
            Row::F16(r) => r[j].to_f32(),
        }
    }

    fn len(row: Row) -> usize {
        match row {
            Row::F32(r) => r.len(),
            Row::F16(r) => r.len(),
        }
    }

    /// q · row, in `dot_scalar`'s eight lanes (two q registers).
    ///
    /// # Safety
    /// None beyond NEON, which every aarch64 CPU has.
    pub(crate) unsafe fn dot(q: &[f32], row: Row) -> f32 {
        let n = q.len();
        assert!(len(row) >= n, "cache row shorter than q");
        let mut acc = [vdupq_n_f32(0.0); 2];
        let mut i = 0;
        while i + 8 <= n {
            let r = load(row, i);
            let qp = q.as_ptr().add(i);
            acc[0] = vfmaq_f32(acc[0], vld1q_f32(qp), r[0]);
            acc[1] = vfmaq_f32(acc[1], vld1q_f32(qp.add(4)), r[1]);
            i += 8;
        }
        let mut s = hsum(acc[0], acc[1]);
        for j in i..n {
            s += q[j] * at(row, j);
        }
        s
    }

    /// `out[h] = q_h · row` for heads of width `hd`: the row widened once
    /// for all of them, two interleaved sets of eight lanes per query to
    /// halve its chain (as the AVX2 `dots`), up to four queries at a time
    /// (16 accumulators, four row vectors and the query loads fit the 32 q
    /// registers).
    ///
    /// # Safety
    /// None beyond NEON.
    pub(crate) unsafe fn dots(q: &[f32], row: Row, out: &mut [f32], hd: usize) {
        if !hd.is_multiple_of(16) {
            for (o, qh) in out.iter_mut().zip(q.chunks_exact(hd)) {
                *o = dot(qh, row);
            }
            return;
        }
        assert!(
            len(row) >= hd && q.len() >= out.len() * hd,
            "cache row shorter than q"
        );
        // One loop per row type and query count, so that neither is
        // decided inside it.
        let f32s = |r: &[f32]| {
            let p = r.as_ptr();
            move |i: usize| [vld1q_f32(p.add(i)), vld1q_f32(p.add(i + 4))]
        };
        let f16s = |r: &[half::f16]| {
            let p = r.as_ptr() as *const u16;
            move |i: usize| {
                let h = vld1q_u16(p.add(i));
                [fcvtl(vget_low_u16(h)), fcvtl2(h)]
            }
        };
        for (o, qs) in out.chunks_mut(4).zip(q.chunks(4 * hd)) {
            let qp = qs.as_ptr();
            match (row, o.len()) {
                (Row::F32(r), 1) => dots_n::<1>(qp, hd, f32s(r), o),
                (Row::F32(r), 2) => dots_n::<2>(qp, hd, f32s(r), o),
                (Row::F32(r), 3) => dots_n::<3>(qp, hd, f32s(r), o),
                (Row::F32(r), _) => dots_n::<4>(qp, hd, f32s(r), o),
                (Row::F16(r), 1) => dots_n::<1>(qp, hd, f16s(r), o),
                (Row::F16(r), 2) => dots_n::<2>(qp, hd, f16s(r), o),
                (Row::F16(r), 3) => dots_n::<3>(qp, hd, f16s(r), o),
                (Row::F16(r), _) => dots_n::<4>(qp, hd, f16s(r), o),
            }
        }
    }

    /// `out[h] = q_h · row` for N queries of width `hd` (a multiple of 16)
    /// at `q`, the row's elements `i..i + 8` given by `load(i)`.
    #[inline(always)]
    unsafe fn dots_n<const N: usize>(
        q: *const f32,
        hd: usize,
        load: impl Fn(usize) -> [float32x4_t; 2],
        out: &mut [f32],
    ) {
        let mut acc = [[vdupq_n_f32(0.0); 4]; N];
        let mut i = 0;
        while i < hd {
            let r0 = load(i);
            let r1 = load(i + 8);
            let r = [r0[0], r0[1], r1[0], r1[1]];
            for (h, a) in acc.iter_mut().enumerate() {
                let qp = q.add(h * hd + i);
                for (l, a) in a.iter_mut().enumerate() {
                    *a = vfmaq_f32(*a, vld1q_f32(qp.add(4 * l)), r[l]);
                }
            }
            i += 16;
        }
        for (o, a) in out.iter_mut().zip(&acc) {
            *o = hsum(vaddq_f32(a[0], a[2]), vaddq_f32(a[1], a[3]));
        }
    }

    /// acc += p row.
    ///
    /// # Safety
    /// None beyond NEON.
    pub(crate) unsafe fn axpy(acc: &mut [f32], p: f32, row: Row) {
        let n = acc.len();
        assert!(len(row) >= n, "cache row shorter than the accumulator");
        let pv = vdupq_n_f32(p);
        let mut i = 0;
        while i + 8 <= n {
            let v = load(row, i);
            let ap = acc.as_mut_ptr().add(i);
            vst1q_f32(ap, vfmaq_f32(vld1q_f32(ap), pv, v[0]));
            vst1q_f32(ap.add(4), vfmaq_f32(vld1q_f32(ap.add(4)), pv, v[1]));
            i += 8;
        }
        for j in i..n {
            acc[j] += p * at(row, j);
        }
    }

    /// `acc_h += p[h] row` for accumulators of width `hd`: the row widened
    /// once for all of them.
    ///
    /// # Safety
    /// None beyond NEON.
    pub(crate) unsafe fn axpys(acc: &mut [f32], p: &[f32], row: Row, hd: usize) {
        if !hd.is_multiple_of(8) {
            for (a, &ph) in acc.chunks_exact_mut(hd).zip(p) {
                axpy(a, ph, row);
            }
            return;
        }
        assert!(
            len(row) >= hd && acc.len() >= p.len() * hd,
            "cache row shorter than the accumulator"
        );
        let mut i = 0;
        while i < hd {
            let v = load(row, i);
            for (h, &ph) in p.iter().enumerate() {
                let ap = acc.as_mut_ptr().add(h * hd + i);
                let pv = vdupq_n_f32(ph);
                vst1q_f32(ap, vfmaq_f32(vld1q_f32(ap), pv, v[0]));
                vst1q_f32(ap.add(4), vfmaq_f32(vld1q_f32(ap.add(4)), pv, v[1]));
            }
            i += 8;
        }
    }

    /// `x = e^(x - max)` in place, eight at a time; returns the sum in f64
    /// (summed as the AVX2 path sums it).
    ///
    /// # Safety
    /// None beyond NEON.
    pub(crate) unsafe fn exp_shifted(x: &mut [f32], max: f32) -> f64 {
        let n = x.len();
        let m = vdupq_n_f32(max);
        // f64 pairs of lanes 0-1, 2-3, 4-5, 6-7.
        let mut s = [vdupq_n_f64(0.0); 4];
        let mut i = 0;
        while i + 8 <= n {
            let p = x.as_mut_ptr().add(i);
            for h in 0..2 {
                let e = exp(vsubq_f32(vld1q_f32(p.add(4 * h)), m));
                vst1q_f32(p.add(4 * h), e);
                s[2 * h] = vaddq_f64(s[2 * h], vcvt_f64_f32(vget_low_f32(e)));
                s[2 * h + 1] = vaddq_f64(s[2 * h + 1], vcvt_high_f64_f32(e));
            }
            i += 8;
        }
        // l = lanes 0-3 + lanes 4-7, then (l0 + l2) + (l1 + l3).
        let l01 = vaddq_f64(s[0], s[2]);
        let l23 = vaddq_f64(s[1], s[3]);
        let t = vaddq_f64(l01, l23);
        let mut sum = vgetq_lane_f64::<0>(t) + vgetq_lane_f64::<1>(t);
        for v in &mut x[i..] {
            *v = (*v - max).exp();
            sum += *v as f64;
        }
        sum
    }

    /// e^x for four lanes, as the AVX2 `exp`: x = n·ln 2 + r with
    /// |r| <= ln 2 / 2, e^r by Cephes' polynomial, 2^n built in the
    /// exponent bits; inputs below -87.3 give 0, not denormals.
    #[inline(always)]
    pub(crate) unsafe fn exp(x: float32x4_t) -> float32x4_t {
        let tiny = vcltq_f32(x, vdupq_n_f32(-87.3));
        let x = vminq_f32(vmaxq_f32(x, vdupq_n_f32(-87.3)), vdupq_n_f32(88.3));
        let n = vrndmq_f32(vfmaq_f32(
            vdupq_n_f32(0.5),
            x,
            vdupq_n_f32(std::f32::consts::LOG2_E),
        ));
        let r = vfmsq_f32(x, n, vdupq_n_f32(0.693_359_4));
        let r = vfmsq_f32(r, n, vdupq_n_f32(-2.121_944_4e-4));
        let mut y = vdupq_n_f32(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            5.000_000_1e-1,
        ] {
            y = vfmaq_f32(vdupq_n_f32(c), y, r);
        }
        let y = vfmaq_f32(vaddq_f32(r, vdupq_n_f32(1.0)), y, vmulq_f32(r, r));
        let pow2 = vreinterpretq_f32_s32(vshlq_n_s32::<23>(vaddq_s32(
            vcvtq_s32_f32(n),
            vdupq_n_s32(127),
        )));
        vreinterpretq_f32_u32(vbicq_u32(vreinterpretq_u32_f32(vmulq_f32(y, pow2)), tiny))
    }

    #[cfg(test)]
    mod tests {
        use super::super::{axpys_scalar, dot_scalar, exp_shifted_scalar};
        use super::*;
        use half::f16;

        /// Every head count (the groups of four and the rest) and head
        /// width (whole groups of 16 and the fallback), both row types.
        #[test]
        fn every_head_count_matches_scalar() {
            for hd in [8, 16, 40, 64, 128] {
                let r32: Vec<f32> = (0..hd).map(|i| (i as f32 * 0.11).cos()).collect();
                let r16: Vec<f16> = r32.iter().map(|&v| f16::from_f32(v)).collect();
                for row in [Row::F32(&r32), Row::F16(&r16)] {
                    for nh in 1..=9 {
                        let q: Vec<f32> = (0..nh * hd).map(|i| (i as f32 * 0.37).sin()).collect();
                        let mut out = vec![f32::NAN; nh];
                        // SAFETY: NEON is baseline on aarch64.
                        unsafe { dots(&q, row, &mut out, hd) };
                        for (h, &o) in out.iter().enumerate() {
                            let want = dot_scalar(&q[h * hd..(h + 1) * hd], row);
                            assert!((o - want).abs() < 1e-5, "hd {hd} nh {nh} head {h}");
                        }
                        let p: Vec<f32> = (0..nh).map(|h| h as f32 * 0.3 - 1.0).collect();
                        let (mut a, mut b) = (q.clone(), q.clone());
                        axpys_scalar(&mut a, &p, row, hd);
                        // SAFETY: as above.
                        unsafe { axpys(&mut b, &p, row, hd) };
                        for (x, y) in a.iter().zip(&b) {
                            assert!((x - y).abs() < 1e-6, "hd {hd} nh {nh}");
                        }
                    }
                }
            }
        }

        /// Masked (-inf), negligible and ordinary scores.
        #[test]
        fn exp_shifted_matches_scalar() {
            let mut x: Vec<f32> = (0..37).map(|i| (i as f32 * 0.91).sin() * 50.0).collect();
            x[3] = f32::NEG_INFINITY;
            x[9] = -1.0e30;
            let mut y = x.clone();
            let s = exp_shifted_scalar(&mut x, 50.0);
            // SAFETY: as above.
            let v = unsafe { exp_shifted(&mut y, 50.0) };
            assert!((s - v).abs() <= 1e-6 * s);
            for (a, b) in x.iter().zip(&y) {
                assert!((a - b).abs() <= 2e-7 * a + 1e-37, "{a} vs {b}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_simd_and_scalar_agree() {
        for n in [1, 7, 8, 64, 301] {
            // Spread over e^-100..e^0 after the shift, as long prompts' scores are.
            let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.91).sin() * 50.0).collect();
            let (mut s, mut v) = (x.clone(), x.clone());
            softmax(&mut s, Isa::scalar());
            softmax(&mut v, Isa::detect());
            let max = x.iter().fold(f32::NEG_INFINITY, |m, &a| m.max(a));
            let z: f64 = x.iter().map(|&a| ((a - max) as f64).exp()).sum();
            for ((&a, &b), &xi) in s.iter().zip(&v).zip(&x) {
                // Both exponentiate the same f32 difference, so they are
                // compared with its exact e^, not with e^ of the unrounded one.
                let exact = ((xi - max) as f64).exp() / z;
                assert!(
                    (a as f64 - exact).abs() <= 1e-6 * exact + 1e-37,
                    "{a} vs {exact}"
                );
                assert!(
                    (b as f64 - exact).abs() <= 1e-6 * exact + 1e-37,
                    "{b} vs {exact}"
                );
            }
        }
    }

    #[test]
    fn simd_and_scalar_agree_for_both_row_types() {
        for n in [8, 64, 67] {
            let q: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let r32: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let r16: Vec<f16> = r32.iter().map(|&v| f16::from_f32(v)).collect();
            for row in [Row::F32(&r32), Row::F16(&r16)] {
                let exact: f64 = (0..n)
                    .map(|i| {
                        q[i] as f64
                            * match row {
                                Row::F32(r) => r[i] as f64,
                                Row::F16(r) => r[i].to_f64(),
                            }
                    })
                    .sum();
                let s = dot(&q, row, Isa::scalar());
                let v = dot(&q, row, Isa::detect());
                assert!((s as f64 - exact).abs() < 1e-5 && (v as f64 - exact).abs() < 1e-5);
                // Three heads sharing the row.
                let q3: Vec<f32> = (0..3 * n).map(|i| (i as f32 * 0.21).cos()).collect();
                let (mut s3, mut v3) = ([0f32; 3], [0f32; 3]);
                dots(&q3, row, &mut s3, Isa::scalar());
                dots(&q3, row, &mut v3, Isa::detect());
                for h in 0..3 {
                    let one = dot(&q3[h * n..(h + 1) * n], row, Isa::scalar());
                    assert!((s3[h] - one).abs() < 1e-6 && (v3[h] - one).abs() < 1e-5);
                }
                let (mut a3, mut b3) = (vec![1f32; 3 * n], vec![1f32; 3 * n]);
                axpys(&mut a3, &[0.5, -1.0, 2.0], row, Isa::scalar());
                axpys(&mut b3, &[0.5, -1.0, 2.0], row, Isa::detect());
                for (x, y) in a3.iter().zip(&b3) {
                    assert!((x - y).abs() < 1e-6);
                }
                let (mut a, mut b) = (vec![1f32; n], vec![1f32; n]);
                axpy(&mut a, 0.5, row, Isa::scalar());
                axpy(&mut b, 0.5, row, Isa::detect());
                for (x, y) in a.iter().zip(&b) {
                    assert!((x - y).abs() < 1e-6);
                }
            }
        }
    }
}

//! The feed-forward gates, `gate = silu(gate) * up` (`silu(x) = x / (1 + e^-x)`)
//! and `gate = gelu_tanh(gate) * up` (Gemma's GeGLU), with the vector e^x the
//! attention softmax uses. GELU's tanh form is written as a sigmoid,
//! `0.5 x (1 + tanh(u)) = x / (1 + e^(-2u))`, so both gates are one e^x and
//! one division per value (libm's tanhf was 17% of Gemma 3's prefill). The scalar form called
//! libm's `expf` once per element: SmolLM2-135M's 30 layers of 1536 make
//! 46k calls per decoded token, and a prompt's worth per prefill row.

use crate::Isa;

/// `gate = silu(gate) * up`, in place, over `min(gate.len(), up.len())` values.
pub fn swiglu(gate: &mut [f32], up: &[f32], isa: Isa) {
    let n = gate.len().min(up.len());
    // SAFETY: `isa` was detected on this CPU (see `Isa`).
    unsafe { (isa.kernels().swiglu)(&mut gate[..n], &up[..n]) }
}

/// The portable [`swiglu`] (libm's e^x); `gate` and `up` are as long.
pub(crate) fn swiglu_scalar(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = silu_mul(*g, u);
    }
}

fn silu_mul(g: f32, u: f32) -> f32 {
    g / (1.0 + (-g).exp()) * u
}

/// `2 sqrt(2 / pi)` (1.5957691...): GELU's tanh argument, doubled for the
/// sigmoid form. One f32 step below the nearest value (1.5957692): the tests'
/// f32 comparisons were measured with this one, and either is far inside
/// the 1e-6 the kernel is held to.
const GELU_2C: f32 = 1.595_769;
/// The cubic term's weight in GELU's tanh approximation.
const GELU_A: f32 = 0.044_715;

/// `gate = gelu_tanh(gate) * up`, in place, over `min(gate.len(), up.len())` values.
pub fn geglu(gate: &mut [f32], up: &[f32], isa: Isa) {
    let n = gate.len().min(up.len());
    // SAFETY: `isa` was detected on this CPU (see `Isa`).
    unsafe { (isa.kernels().geglu)(&mut gate[..n], &up[..n]) }
}

/// The portable [`geglu`] (libm's tanh, as PyTorch's `approximate='tanh'`).
pub(crate) fn geglu_scalar(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = gelu_mul(*g, u);
    }
}

fn gelu_mul(x: f32, u: f32) -> f32 {
    let t = (0.5 * GELU_2C * x * (1.0 + GELU_A * x * x)).tanh();
    0.5 * x * (1.0 + t) * u
}

/// Eight lanes with AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    /// See [`super::swiglu`]; `gate` and `up` are as long.
    ///
    /// # Safety
    /// On a CPU with AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn swiglu(gate: &mut [f32], up: &[f32]) {
        let n = gate.len();
        let one = _mm256_set1_ps(1.0);
        let mut i = 0;
        while i + 8 <= n {
            let p = gate.as_mut_ptr().add(i);
            let g = _mm256_loadu_ps(p);
            let e = crate::attention::avx2::exp(_mm256_sub_ps(_mm256_setzero_ps(), g));
            let s = _mm256_div_ps(g, _mm256_add_ps(one, e));
            _mm256_storeu_ps(p, _mm256_mul_ps(s, _mm256_loadu_ps(up.as_ptr().add(i))));
            i += 8;
        }
        super::swiglu_scalar(&mut gate[i..], &up[i..n]);
    }

    /// See [`super::geglu`]; `gate` and `up` are as long.
    ///
    /// # Safety
    /// On a CPU with AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn geglu(gate: &mut [f32], up: &[f32]) {
        let n = gate.len();
        let one = _mm256_set1_ps(1.0);
        let (c, a) = (
            _mm256_set1_ps(-super::GELU_2C),
            _mm256_set1_ps(super::GELU_A),
        );
        let mut i = 0;
        while i + 8 <= n {
            let p = gate.as_mut_ptr().add(i);
            let x = _mm256_loadu_ps(p);
            // -2u = -2c (x + a x^3) = x (-2c) (1 + a x^2)
            let v = _mm256_mul_ps(
                _mm256_mul_ps(x, c),
                _mm256_fmadd_ps(a, _mm256_mul_ps(x, x), one),
            );
            let e = crate::attention::avx2::exp(v);
            let s = _mm256_div_ps(x, _mm256_add_ps(one, e));
            _mm256_storeu_ps(p, _mm256_mul_ps(s, _mm256_loadu_ps(up.as_ptr().add(i))));
            i += 8;
        }
        super::geglu_scalar(&mut gate[i..], &up[i..n]);
    }
}

/// Four lanes with NEON (every aarch64 CPU).
#[cfg(target_arch = "aarch64")]
pub(crate) mod neon {
    use std::arch::aarch64::*;

    /// See [`super::swiglu`]; `gate` and `up` are as long.
    ///
    /// # Safety
    /// None beyond NEON.
    pub(crate) unsafe fn swiglu(gate: &mut [f32], up: &[f32]) {
        let n = gate.len();
        let one = vdupq_n_f32(1.0);
        let mut i = 0;
        while i + 4 <= n {
            let p = gate.as_mut_ptr().add(i);
            let g = vld1q_f32(p);
            let e = crate::attention::neon::exp(vnegq_f32(g));
            let s = vdivq_f32(g, vaddq_f32(one, e));
            vst1q_f32(p, vmulq_f32(s, vld1q_f32(up.as_ptr().add(i))));
            i += 4;
        }
        super::swiglu_scalar(&mut gate[i..], &up[i..n]);
    }

    /// See [`super::geglu`]; `gate` and `up` are as long.
    ///
    /// # Safety
    /// None beyond NEON.
    pub(crate) unsafe fn geglu(gate: &mut [f32], up: &[f32]) {
        let n = gate.len();
        let one = vdupq_n_f32(1.0);
        let (c, a) = (vdupq_n_f32(-super::GELU_2C), vdupq_n_f32(super::GELU_A));
        let mut i = 0;
        while i + 4 <= n {
            let p = gate.as_mut_ptr().add(i);
            let x = vld1q_f32(p);
            let v = vmulq_f32(vmulq_f32(x, c), vfmaq_f32(one, a, vmulq_f32(x, x)));
            let e = crate::attention::neon::exp(v);
            let s = vdivq_f32(x, vaddq_f32(one, e));
            vst1q_f32(p, vmulq_f32(s, vld1q_f32(up.as_ptr().add(i))));
            i += 4;
        }
        super::geglu_scalar(&mut gate[i..], &up[i..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Rng;

    /// Every tier against libm's e^x: within 4 ulp-sized relative steps
    /// (the polynomial's e^x is within 2 ulp; the division and product
    /// round once each), and exactly where e^-x leaves the f32 range: a
    /// large gate passes through times `up`, a very negative one gives
    /// (nearly) zero, NaN stays NaN. Lengths cover the vector tails.
    #[test]
    fn every_tier_matches_libm() {
        let mut rng = Rng(0x5111_0001);
        for isa in Isa::detect().tiers() {
            for n in [0, 1, 3, 7, 8, 9, 31, 1536] {
                let g0: Vec<f32> = (0..n).map(|_| 12.0 * rng.f()).collect();
                let up: Vec<f32> = (0..n).map(|_| rng.f()).collect();
                let mut g = g0.clone();
                swiglu(&mut g, &up, isa);
                for i in 0..n {
                    let want = silu_mul(g0[i], up[i]);
                    assert!(
                        (g[i] - want).abs() <= 5e-7 * want.abs() + 1e-37,
                        "{isa} n={n} [{i}] silu({})*{}: {} vs {want}",
                        g0[i],
                        up[i],
                        g[i]
                    );
                }
            }
            let g0 = [100.0, 90.0, -90.0, -200.0, f32::NAN, 0.0, -0.0, 1.0];
            let up = [0.5; 8];
            let mut g = g0;
            swiglu(&mut g, &up, isa);
            assert_eq!(&g[..2], &[50.0, 45.0], "{isa}");
            assert!(g[2].abs() < 1e-30 && g[3].abs() < 1e-30, "{isa} {g:?}");
            assert!(g[4].is_nan(), "{isa}");
            assert_eq!(g[5], 0.0, "{isa}");
            assert!((g[7] - silu_mul(1.0, 0.5)).abs() <= 1e-7, "{isa}");
        }
    }

    /// GeGLU at every tier against PyTorch's tanh form: gelu_tanh(1) =
    /// 0.8411920, gelu_tanh(-2) = -0.0454023 (torch, approximate='tanh'),
    /// and random values within 1e-6 relative (plus 1e-7 absolute where the
    /// two forms cancel near x = -3), the same limits at the range's ends.
    #[test]
    fn geglu_matches_the_tanh_form() {
        let mut rng = Rng(0x6e61_0001);
        for isa in Isa::detect().tiers() {
            for n in [0, 1, 3, 7, 8, 9, 31, 2048] {
                let g0: Vec<f32> = (0..n).map(|_| 12.0 * rng.f()).collect();
                let up: Vec<f32> = (0..n).map(|_| rng.f()).collect();
                let mut g = g0.clone();
                geglu(&mut g, &up, isa);
                for i in 0..n {
                    let want = gelu_mul(g0[i], up[i]);
                    assert!(
                        (g[i] - want).abs() <= 1e-6 * want.abs() + 1e-7,
                        "{isa} n={n} [{i}] gelu({})*{}: {} vs {want}",
                        g0[i],
                        up[i],
                        g[i]
                    );
                }
            }
            let mut g = [1.0, -2.0, 100.0, -100.0, f32::NAN, 0.0, 3.0, -3.0];
            geglu(&mut g, &[1.0; 8], isa);
            assert!((g[0] - 0.841_192).abs() < 1e-6, "{isa} {g:?}");
            assert!((g[1] + 0.045_402_3).abs() < 1e-6, "{isa} {g:?}");
            assert_eq!(g[2], 100.0, "{isa}");
            assert!(g[3].abs() < 1e-30, "{isa} {g:?}");
            assert!(g[4].is_nan(), "{isa}");
            assert_eq!(g[5], 0.0, "{isa}");
        }
    }
}

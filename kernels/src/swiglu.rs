//! The feed-forward gate, `gate = silu(gate) * up` (`silu(x) = x / (1 + e^-x)`),
//! with the vector e^x the attention softmax uses. The scalar form called
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
}

//! The instruction-set tiers a kernel may use, detected once, and the one
//! place that says which kernel each tier runs for each job (ggml's
//! `type_traits_cpu`, per tier instead of per type: every type of a family
//! shares its family's entry, and the entry picks the type's code).
//!
//! An [`Isa`] is made only by detection, so holding one proves the CPU runs
//! its instructions: the tables below may then call `#[target_feature]`
//! functions without checking again.

use std::ops::Range;
use std::sync::OnceLock;

use crate::act::ActQ8K;
use crate::attention::Row;
use crate::{ActBuf, Layout, Out, WType, Weights};

/// A tier, from the portable path up, in two families (x86-64 and aarch64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    /// The portable path only (the reference in tests).
    Scalar,
    /// x86-64 with AVX2, FMA and F16C.
    Avx2,
    /// AVX2 plus AVX-512 F, BW, VL and VNNI (256-bit vectors), for prefill.
    Avx512Vnni,
    /// aarch64 Advanced SIMD, ARMv8.0 (Cortex-A53/A55, Raspberry Pi 3/4).
    Neon,
    /// NEON plus the dot product instructions `sdot`/`udot` (FEAT_DotProd:
    /// Cortex-A76+, Pi 5, Apple M1+, Graviton 2).
    NeonDotprod,
    /// NEON, dot product and the int8 matrix multiply `smmla` (FEAT_I8MM:
    /// Apple M2+, Graviton 3, recent phones).
    NeonI8mm,
}

impl Tier {
    /// Every tier, lowest first within each family.
    pub const ALL: [Tier; 6] = [
        Tier::Scalar,
        Tier::Avx2,
        Tier::Avx512Vnni,
        Tier::Neon,
        Tier::NeonDotprod,
        Tier::NeonI8mm,
    ];

    /// The name `LORAFOLD_ISA` takes and tests and benches print.
    pub fn name(self) -> &'static str {
        match self {
            Tier::Scalar => "scalar",
            Tier::Avx2 => "avx2",
            Tier::Avx512Vnni => "avx512-vnni",
            Tier::Neon => "neon",
            Tier::NeonDotprod => "neon-dotprod",
            Tier::NeonI8mm => "neon-i8mm",
        }
    }

    /// The tier with this name (also the short `dotprod` and `i8mm`).
    pub fn from_name(name: &str) -> Option<Tier> {
        match name {
            "dotprod" => Some(Tier::NeonDotprod),
            "i8mm" => Some(Tier::NeonI8mm),
            "vnni" => Some(Tier::Avx512Vnni),
            _ => Tier::ALL.into_iter().find(|t| t.name() == name),
        }
    }

    /// Whether `self` runs wherever `other` does: same family, not above it.
    fn within(self, other: Tier) -> bool {
        self == Tier::Scalar || (self.is_x86() == other.is_x86() && self <= other)
    }

    fn is_x86(self) -> bool {
        matches!(self, Tier::Avx2 | Tier::Avx512Vnni)
    }
}

/// A tier this CPU runs: made only by [`Isa::detect`], [`Isa::host`] and
/// [`Isa::scalar`], so no safe code can ask a CPU for instructions it lacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Isa(Tier);

impl Isa {
    /// Everything this CPU has, detected once per process.
    pub fn host() -> Isa {
        static HOST: OnceLock<Isa> = OnceLock::new();
        *HOST.get_or_init(|| Isa(host_tier()))
    }

    /// What this CPU has, capped by `LORAFOLD_ISA` (read once per process):
    /// a tier's name (`scalar`, `avx2`, `neon`, `dotprod`, ...) stops
    /// detection there, to measure what a CPU without the higher tiers gets.
    /// A name of the other family, or an unknown one, caps nothing.
    pub fn detect() -> Isa {
        static CAPPED: OnceLock<Isa> = OnceLock::new();
        *CAPPED.get_or_init(|| {
            let cap = std::env::var("LORAFOLD_ISA").unwrap_or_default();
            Isa::host().capped(&cap)
        })
    }

    /// This tier, or the named one where that is lower in the same family.
    pub fn capped(self, name: &str) -> Isa {
        match Tier::from_name(name.trim()) {
            Some(t) if t.within(self.0) => Isa(t),
            _ => self,
        }
    }

    /// The portable path only (the reference in tests).
    pub fn scalar() -> Isa {
        Isa(Tier::Scalar)
    }

    /// The tier.
    pub fn tier(self) -> Tier {
        self.0
    }

    /// The tier's name (see [`Tier::name`]).
    pub fn name(self) -> &'static str {
        self.0.name()
    }

    /// This tier and every lower one of its family, the portable path
    /// first: what tests compare against each other.
    pub fn tiers(self) -> Vec<Isa> {
        Tier::ALL
            .into_iter()
            .filter(|t| t.within(self.0))
            .map(Isa)
            .collect()
    }

    /// AVX2, FMA and F16C (either x86 tier).
    pub fn avx2(self) -> bool {
        matches!(self.0, Tier::Avx2 | Tier::Avx512Vnni)
    }

    /// AVX-512 VNNI for the prefill panels.
    pub fn vnni(self) -> bool {
        self.0 == Tier::Avx512Vnni
    }

    /// Any aarch64 tier.
    pub fn neon(self) -> bool {
        matches!(self.0, Tier::Neon | Tier::NeonDotprod | Tier::NeonI8mm)
    }

    /// `sdot`/`udot`.
    pub fn dotprod(self) -> bool {
        matches!(self.0, Tier::NeonDotprod | Tier::NeonI8mm)
    }

    /// `smmla`.
    pub fn i8mm(self) -> bool {
        self.0 == Tier::NeonI8mm
    }

    /// The layout this tier's kernels read `wtype`'s weights fastest in, for
    /// a matrix the runtime multiplies (the runtime repacks to it at load).
    pub fn layout(self, wtype: WType) -> Layout {
        if self.kernels().rows8 && wtype.block_len() > 1 {
            Layout::Rows8
        } else {
            Layout::RowMajor
        }
    }

    /// Activation rows from which the prefill panels take over (1 where the
    /// tier has none: every batch takes the same path).
    pub fn panel_rows(self) -> usize {
        self.kernels().panel.map_or(1, |p| p.min_rows)
    }

    /// The tier's kernels.
    pub(crate) fn kernels(self) -> &'static Kernels {
        match self.0 {
            #[cfg(target_arch = "x86_64")]
            Tier::Avx2 => &x86::AVX2,
            #[cfg(target_arch = "x86_64")]
            Tier::Avx512Vnni => &x86::VNNI,
            #[cfg(target_arch = "aarch64")]
            Tier::Neon => &arm::NEON,
            #[cfg(target_arch = "aarch64")]
            Tier::NeonDotprod => &arm::DOTPROD,
            #[cfg(target_arch = "aarch64")]
            Tier::NeonI8mm => &arm::I8MM,
            _ => &SCALAR,
        }
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The highest tier the hardware has.
fn host_tier() -> Tier {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if !(has!("avx2") && has!("fma") && has!("f16c")) {
            return Tier::Scalar;
        }
        if has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512vnni") {
            return Tier::Avx512Vnni;
        }
        Tier::Avx2
    }
    #[cfg(target_arch = "aarch64")]
    {
        use std::arch::is_aarch64_feature_detected as has;
        // NEON is part of the aarch64 baseline.
        if !has!("dotprod") {
            return Tier::Neon;
        }
        if has!("i8mm") {
            return Tier::NeonI8mm;
        }
        Tier::NeonDotprod
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    Tier::Scalar
}

/// Products of weight rows with activation rows (see [`crate::gemm`]);
/// unsafe to call only for the target features its tier implies.
pub(crate) type GemmFn = unsafe fn(&Weights, Range<usize>, &ActBuf, Out);

/// Prefill over tiles of activation rows.
#[derive(Clone, Copy)]
pub(crate) struct Panel {
    /// Activation rows from which it pays (and takes over, for block types).
    pub(crate) min_rows: usize,
    /// The products.
    pub(crate) gemm: GemmFn,
}

/// Every kernel one tier provides. Each entry is `unsafe` only for its
/// tier's target features, which holding an [`Isa`] of the tier proves.
pub(crate) struct Kernels {
    /// F32, F16, BF16 weights.
    pub(crate) float: GemmFn,
    /// Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (decode and short batches).
    pub(crate) legacy: GemmFn,
    /// Q2_K..Q6_K (decode and short batches).
    pub(crate) kquants: GemmFn,
    /// Prefill over the block types, where the tier has tiles for it.
    pub(crate) panel: Option<Panel>,
    /// Whether decode reads block types in [`Layout::Rows8`] best.
    pub(crate) rows8: bool,
    /// Q8_0 codes of 32 values, returning the unrounded scale
    /// (ggml's `quantize_row_q8_0_ref`, bit for bit).
    pub(crate) q8_codes: unsafe fn(&[f32], &mut [i8; 32]) -> f32,
    /// One Q8_K block (ggml's `quantize_row_q8_K_ref`, bit for bit).
    pub(crate) quantize_q8k: unsafe fn(&[f32], &mut ActQ8K),
    /// q · row.
    pub(crate) dot: unsafe fn(&[f32], Row) -> f32,
    /// `out[h] = q_h · row` for heads of width `hd` laid end to end.
    pub(crate) dots: unsafe fn(&[f32], Row, &mut [f32], usize),
    /// acc += p row.
    pub(crate) axpy: unsafe fn(&mut [f32], f32, Row),
    /// `acc_h += p[h] row` for accumulators of width `hd` laid end to end.
    pub(crate) axpys: unsafe fn(&mut [f32], &[f32], Row, usize),
    /// `x = e^(x - max)` in place, returning the sum in f64.
    pub(crate) exp_shifted: unsafe fn(&mut [f32], f32) -> f64,
    /// `gate = silu(gate) * up`, slices as long.
    pub(crate) swiglu: unsafe fn(&mut [f32], &[f32]),
    /// `gate = gelu_tanh(gate) * up`.
    pub(crate) geglu: unsafe fn(&mut [f32], &[f32]),
}

/// The portable path: every other tier's reference, and where a tier has
/// no kernel of its own for a job. (Consts, not statics, so that tiers can
/// start from another's entries; `&CONST` is promoted to a static.)
const SCALAR: Kernels = Kernels {
    float: crate::float::gemm_scalar,
    legacy: crate::legacy::gemm_scalar,
    kquants: crate::kquants::gemm_scalar,
    panel: None,
    rows8: false,
    q8_codes: crate::act::q8_codes_scalar,
    quantize_q8k: crate::act::quantize_q8k_scalar,
    dot: crate::attention::dot_scalar,
    dots: crate::attention::dots_scalar,
    axpy: crate::attention::axpy_scalar,
    axpys: crate::attention::axpys_scalar,
    exp_shifted: crate::attention::exp_shifted_scalar,
    swiglu: crate::swiglu::swiglu_scalar,
    geglu: crate::swiglu::geglu_scalar,
};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Kernels, Panel};
    use crate::{act, attention, float_avx2, kquants_avx2, legacy_avx2, panel_avx2, swiglu};

    /// AVX2, FMA and F16C.
    pub(super) const AVX2: Kernels = Kernels {
        float: float_avx2::gemm,
        legacy: legacy_avx2::gemm,
        kquants: kquants_avx2::gemm,
        panel: Some(Panel {
            min_rows: panel_avx2::MIN_ROWS,
            gemm: panel_avx2::gemm_avx2_panel,
        }),
        rows8: true,
        q8_codes: act::q8_codes_avx2,
        quantize_q8k: act::quantize_q8k_avx2,
        dot: attention::avx2::dot,
        dots: attention::avx2::dots,
        axpy: attention::avx2::axpy,
        axpys: attention::avx2::axpys,
        exp_shifted: attention::avx2::exp_shifted,
        swiglu: swiglu::avx2::swiglu,
        geglu: swiglu::avx2::geglu,
    };

    /// AVX2 with AVX-512 VNNI in the prefill panels.
    pub(super) const VNNI: Kernels = Kernels {
        panel: Some(Panel {
            min_rows: panel_avx2::MIN_ROWS,
            gemm: panel_avx2::gemm_vnni_panel,
        }),
        ..AVX2
    };
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use super::{Kernels, Panel, SCALAR};
    use crate::{act, attention, float_neon, kquants_neon, legacy_neon, panel_neon, swiglu};

    /// ARMv8.0 NEON.
    pub(super) const NEON: Kernels = Kernels {
        float: float_neon::gemm,
        legacy: legacy_neon::gemm_neon,
        kquants: kquants_neon::gemm_neon,
        rows8: true,
        q8_codes: act::q8_codes_neon,
        quantize_q8k: act::quantize_q8k_neon,
        dot: attention::neon::dot,
        dots: attention::neon::dots,
        axpy: attention::neon::axpy,
        axpys: attention::neon::axpys,
        exp_shifted: attention::neon::exp_shifted,
        swiglu: swiglu::neon::swiglu,
        geglu: swiglu::neon::geglu,
        ..SCALAR
    };

    /// NEON with `sdot`/`udot`.
    pub(super) const DOTPROD: Kernels = Kernels {
        legacy: legacy_neon::gemm_dotprod,
        kquants: kquants_neon::gemm_dotprod,
        panel: Some(Panel {
            min_rows: panel_neon::MIN_ROWS,
            gemm: panel_neon::gemm_dotprod_panel,
        }),
        ..NEON
    };

    /// NEON with `sdot` and `smmla`.
    pub(super) const I8MM: Kernels = Kernels {
        panel: Some(Panel {
            min_rows: panel_neon::MIN_ROWS,
            gemm: panel_neon::gemm_i8mm_panel,
        }),
        ..DOTPROD
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tier this process runs, printed so a log shows which path every
    /// other test ran; where `LORAFOLD_EXPECT_ISA` names a tier (CI sets it
    /// per emulated CPU), detection must have found exactly that one.
    #[test]
    fn detected_tier_is_the_expected_one() {
        let isa = Isa::detect();
        eprintln!(
            "isa: {} (host {}, tiers tested: {})",
            isa,
            Isa::host(),
            isa.tiers()
                .iter()
                .map(|t| t.name())
                .collect::<Vec<_>>()
                .join(", ")
        );
        if let Ok(want) = std::env::var("LORAFOLD_EXPECT_ISA") {
            assert_eq!(isa.name(), want, "detected tier");
        }
    }

    #[test]
    fn caps_stay_within_the_family() {
        let host = Isa::host();
        assert_eq!(host.capped("scalar"), Isa::scalar());
        assert_eq!(host.capped("no-such-tier"), host);
        for t in host.tiers() {
            assert_eq!(host.capped(t.name()), t);
            assert!(t.tier() <= host.tier() || t.tier() == Tier::Scalar);
        }
        // A tier of the other family caps nothing.
        let other = if host.neon() { "avx2" } else { "neon" };
        assert_eq!(host.capped(other), host);
        for t in Tier::ALL {
            assert_eq!(Tier::from_name(t.name()), Some(t));
        }
    }
}

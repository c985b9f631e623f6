//! One-instruction `asm!` wrappers shared by the aarch64 kernels: the dot
//! product and matrix multiply instructions are not stable intrinsics, and
//! the f16 conversion intrinsics take f16 vector types that are not stable
//! Rust. Each block holds one instruction, so LLVM still schedules it and
//! allocates its registers.
//!
//! The wrappers that need a feature beyond the ARMv8.0 baseline carry it
//! with `#[target_feature]`, which rules out `#[inline(always)]`; they are
//! `#[inline]` and LLVM inlines them into every caller compiled with that
//! feature (the tiers' entry points are).

use std::arch::aarch64::*;
use std::arch::asm;

/// `acc + a · b` per group of four bytes: lane l gains the products of bytes 4l..4l + 4 (`sdot`).
#[inline]
#[target_feature(enable = "dotprod")]
pub(crate) unsafe fn sdot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    // SAFETY: register-only arithmetic; the caller's tier has FEAT_DotProd.
    asm!(
        "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
        acc = inout(vreg) acc,
        a = in(vreg) a,
        b = in(vreg) b,
        options(pure, nomem, nostack, preserves_flags)
    );
    acc
}

/// `acc + w · a[L]`: each lane, four bytes of `w` times the four bytes in 32-bit lane `L` of `a` (`sdot` by element).
#[inline]
#[target_feature(enable = "dotprod")]
pub(crate) unsafe fn sdot_lane<const L: i32>(
    acc: int32x4_t,
    w: int8x16_t,
    a: int8x16_t,
) -> int32x4_t {
    let mut acc = acc;
    // SAFETY: register-only arithmetic; the caller's tier has FEAT_DotProd.
    asm!(
        "sdot {acc:v}.4s, {w:v}.16b, {a:v}.4b[{l}]",
        acc = inout(vreg) acc,
        w = in(vreg) w,
        a = in(vreg) a,
        l = const L,
        options(pure, nomem, nostack)
    );
    acc
}

/// `acc + a w^T` for `a` and `w` 2x8 matrices of bytes, row-major (`smmla`).
#[inline]
#[target_feature(enable = "i8mm")]
pub(crate) unsafe fn smmla(acc: int32x4_t, a: int8x16_t, w: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    // SAFETY: register-only arithmetic; the caller's tier has FEAT_I8MM.
    asm!(
        "smmla {acc:v}.4s, {a:v}.16b, {w:v}.16b",
        acc = inout(vreg) acc,
        a = in(vreg) a,
        w = in(vreg) w,
        options(pure, nomem, nostack)
    );
    acc
}

/// Four IEEE halves (as bits) widened exactly to f32 (`fcvtl`).
#[inline(always)]
pub(crate) fn fcvtl(h: uint16x4_t) -> float32x4_t {
    let o: float32x4_t;
    // SAFETY: FCVTL is base Advanced SIMD (every aarch64 CPU); it reads and
    // writes registers only.
    unsafe {
        asm!(
            "fcvtl {o:v}.4s, {h:v}.4h",
            o = lateout(vreg) o,
            h = in(vreg) h,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    o
}

/// Lanes 4-7 of eight IEEE halves (as bits) widened exactly to f32 (`fcvtl2`).
#[inline(always)]
pub(crate) fn fcvtl2(h: uint16x8_t) -> float32x4_t {
    let o: float32x4_t;
    // SAFETY: as in `fcvtl`.
    unsafe {
        asm!(
            "fcvtl2 {o:v}.4s, {h:v}.8h",
            o = lateout(vreg) o,
            h = in(vreg) h,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    o
}

/// The (unaligned) IEEE half at `p` as f32 (scalar `fcvt`).
///
/// # Safety
/// `p` points at two readable bytes.
#[inline(always)]
pub(crate) unsafe fn f16_at(p: *const u8) -> f32 {
    let h = (p as *const u16).read_unaligned() as u32;
    let x: f32;
    // SAFETY: half to single precision `fcvt` is in the aarch64 baseline
    // (FP); registers only.
    asm!(
        "fcvt {x:s}, {h:h}",
        x = lateout(vreg) x,
        h = in(vreg) h,
        options(pure, nomem, nostack)
    );
    x
}

//! Portable loops compiled a second time for AVX2 and chosen at run time.
//!
//! The converter's hot loops (the f64 merge, GPTQ's factor and updates, the
//! error sums) are plain Rust that LLVM vectorises; built for the baseline
//! x86-64 target they get SSE2's 2 f64 lanes. Compiled with AVX2 enabled
//! they get 4, with the same operations in the same order, so the same bits
//! (measured 2.3x on GPTQ's factors). This is the one place that says how;
//! whether is the kernel crate's ISA detection (`lorafold_kernels::Isa`).

/// `fn name(args) -> ret { body }` defines `name`, whose body runs compiled
/// for AVX2 when the CPU has it and as built otherwise.
macro_rules! avx2_or_portable {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn portable($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            if lorafold_kernels::Isa::detect().avx2() {
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    portable($($arg),*)
                }
                // SAFETY: AVX2 is present (the kernel crate's detection, which
                // `LORAFOLD_ISA` may only lower), checked just above; the body is
                // the portable code, which needs nothing else.
                return unsafe { avx2($($arg),*) };
            }
            portable($($arg),*)
        }
    };
}

pub(crate) use avx2_or_portable;

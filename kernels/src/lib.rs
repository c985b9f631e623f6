//! Matrix products of ggml block-quantized weights with f32 activations,
//! computed over the weights' bytes where they lie (a memory map), the way
//! ggml computes them: activations are first rounded to the block type's
//! partner (Q8_0, Q8_1 or Q8_K; f32 for float weights) and the products of
//! integer codes are summed per block.
//!
//! Why our own and not candle's: candle 0.11 has SIMD dot products on x86
//! only for Q4_0, Q8_0 and the K-quants, runs Q4_1/Q5_0/Q5_1 scalar, copies
//! Q8_0 and K-quant weights into a repacked cache, and computes one
//! activation row at a time. Here every type has a scalar path (also the
//! reference in tests) and an AVX2+FMA path chosen at run time, and prefill
//! shares each unpacked weight block across a tile of activation rows.
//!
//! The crate does no threading: [`gemm`] computes a range of output rows, and
//! the caller (the runtime's worker pool) splits the rows between threads.
#![warn(missing_docs)]

pub mod act;
pub mod attention;
pub mod blocks;
mod float;
#[cfg(target_arch = "x86_64")]
mod float_avx2;
#[cfg(target_arch = "aarch64")]
mod float_neon;
pub mod grid;
mod isa;
mod kquants;
#[cfg(target_arch = "x86_64")]
mod kquants_avx2;
#[cfg(target_arch = "aarch64")]
mod kquants_neon;
mod legacy;
#[cfg(target_arch = "x86_64")]
mod legacy_avx2;
#[cfg(target_arch = "aarch64")]
mod legacy_neon;
#[cfg(target_arch = "aarch64")]
mod neon;
#[cfg(target_arch = "x86_64")]
mod panel_avx2;
#[cfg(target_arch = "aarch64")]
mod panel_neon;
pub mod reference;
#[cfg(target_arch = "x86_64")]
mod rows8_avx2;
mod swiglu;
#[cfg(test)]
mod testing;

use std::ops::Range;

pub use act::{ActBuf, ActType};
pub use isa::{Isa, Tier};
pub use swiglu::{geglu, swiglu};

/// A weight type: the ggml types the converter writes. The discriminant is
/// the type's row in [`TypeTraits`]' table and the `u8` code const-generic
/// kernels are specialised by (see [`code`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
#[repr(u8)]
pub enum WType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// 32 weights: f16 d, 4-bit codes q, w = d (q - 8).
    Q4_0,
    /// 32 weights: f16 d and m, 4-bit codes, w = d q + m.
    Q4_1,
    /// 32 weights: f16 d, 5-bit codes, w = d (q - 16).
    Q5_0,
    /// 32 weights: f16 d and m, 5-bit codes, w = d q + m.
    Q5_1,
    /// 32 weights: f16 d, 8-bit codes, w = d q.
    Q8_0,
    /// 256 weights in 16 groups of 16, 2-bit codes.
    Q2K,
    /// 256 weights in 16 groups of 16, 3-bit codes.
    Q3K,
    /// 256 weights in 8 groups of 32, 4-bit codes.
    Q4K,
    /// 256 weights in 8 groups of 32, 5-bit codes.
    Q5K,
    /// 256 weights in 16 groups of 16, 6-bit codes.
    Q6K,
}

impl WType {
    /// Every type, for tests and benches.
    pub const ALL: [WType; 13] = [
        WType::F32,
        WType::F16,
        WType::BF16,
        WType::Q4_0,
        WType::Q4_1,
        WType::Q5_0,
        WType::Q5_1,
        WType::Q8_0,
        WType::Q2K,
        WType::Q3K,
        WType::Q4K,
        WType::Q5K,
        WType::Q6K,
    ];

    /// The type for a ggml type id, if we have kernels for it.
    pub fn from_ggml_id(id: u32) -> Option<WType> {
        WType::ALL.into_iter().find(|t| t.traits().ggml_id == id)
    }

    /// The type with this name as ggml prints it ("Q4_K", "f16"; any case).
    pub fn from_name(name: &str) -> Option<WType> {
        WType::ALL
            .into_iter()
            .find(|t| t.traits().name.eq_ignore_ascii_case(name))
    }

    /// The type whose [`WType::code`] is `c` (const-generic kernels' `T`).
    pub const fn from_code(c: u8) -> WType {
        WType::ALL[c as usize]
    }

    /// The `u8` a const-generic kernel is specialised by.
    pub const fn code(self) -> u8 {
        self as u8
    }

    /// This type's row of the table.
    pub const fn traits(self) -> &'static TypeTraits {
        &TRAITS[self as usize]
    }

    /// Weights per block.
    pub const fn block_len(self) -> usize {
        self.traits().block_len
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        self.traits().block_bytes
    }

    /// Bytes of one row of `k` weights; None when `k` is not a whole number of blocks.
    pub fn row_bytes(self, k: usize) -> Option<usize> {
        k.is_multiple_of(self.block_len())
            .then(|| k / self.block_len() * self.block_bytes())
    }

    /// The activation format this type's dot product takes (as ggml's vec_dot_type).
    pub const fn act_type(self) -> ActType {
        self.traits().act
    }

    /// The kernel family.
    pub const fn family(self) -> Family {
        self.traits().family
    }

    /// Whether blocks carry minimums (w = d q + m, or K-quant group minimums).
    pub const fn has_min(self) -> bool {
        self.traits().has_min
    }
}

/// Which kernels a type's products go through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// F32, F16, BF16: f32 activations.
    Float,
    /// The 32-weight block types.
    Legacy,
    /// The 256-weight K-quants.
    KQuant,
}

/// One type's row of the table every kernel, the runtime and the tests read
/// (ggml's `type_traits`): adding a type starts here.
#[derive(Debug, Clone, Copy)]
pub struct TypeTraits {
    /// ggml's name ("Q4_K").
    pub name: &'static str,
    /// The GGUF type id.
    pub ggml_id: u32,
    /// Weights per block.
    pub block_len: usize,
    /// Bytes per block.
    pub block_bytes: usize,
    /// The activation rounding its dot product takes.
    pub act: ActType,
    /// The kernel family.
    pub family: Family,
    /// Whether blocks carry minimums.
    pub has_min: bool,
}

const fn row(
    name: &'static str,
    ggml_id: u32,
    block_len: usize,
    block_bytes: usize,
    act: ActType,
    family: Family,
    has_min: bool,
) -> TypeTraits {
    TypeTraits {
        name,
        ggml_id,
        block_len,
        block_bytes,
        act,
        family,
        has_min,
    }
}

/// The table, in [`WType`] order (its discriminants index it).
const TRAITS: [TypeTraits; 13] = {
    use blocks::*;
    use std::mem::size_of;
    use ActType::{Q8K, Q8_0, Q8_1};
    use Family::{Float, KQuant, Legacy};
    [
        row("F32", 0, 1, 4, ActType::F32, Float, false),
        row("F16", 1, 1, 2, ActType::F32, Float, false),
        row("BF16", 30, 1, 2, ActType::F32, Float, false),
        row("Q4_0", 2, 32, size_of::<BlockQ4_0>(), Q8_0, Legacy, false),
        row("Q4_1", 3, 32, size_of::<BlockQ4_1>(), Q8_1, Legacy, true),
        row("Q5_0", 6, 32, size_of::<BlockQ5_0>(), Q8_0, Legacy, false),
        row("Q5_1", 7, 32, size_of::<BlockQ5_1>(), Q8_1, Legacy, true),
        row("Q8_0", 8, 32, size_of::<BlockQ8_0>(), Q8_0, Legacy, false),
        row("Q2_K", 10, QK_K, size_of::<BlockQ2K>(), Q8K, KQuant, true),
        row("Q3_K", 11, QK_K, size_of::<BlockQ3K>(), Q8K, KQuant, false),
        row("Q4_K", 12, QK_K, size_of::<BlockQ4K>(), Q8K, KQuant, true),
        row("Q5_K", 13, QK_K, size_of::<BlockQ5K>(), Q8K, KQuant, true),
        row("Q6_K", 14, QK_K, size_of::<BlockQ6K>(), Q8K, KQuant, false),
    ]
};

/// Each type's [`WType::code`] by name, for const-generic kernels
/// (`gemm_t::<{ code::Q4_0 }>`): one source for every kernel file.
pub mod code {
    #![allow(missing_docs)]
    use crate::WType;
    pub const F32: u8 = WType::F32.code();
    pub const F16: u8 = WType::F16.code();
    pub const BF16: u8 = WType::BF16.code();
    pub const Q4_0: u8 = WType::Q4_0.code();
    pub const Q4_1: u8 = WType::Q4_1.code();
    pub const Q5_0: u8 = WType::Q5_0.code();
    pub const Q5_1: u8 = WType::Q5_1.code();
    pub const Q8_0: u8 = WType::Q8_0.code();
    pub const Q2K: u8 = WType::Q2K.code();
    pub const Q3K: u8 = WType::Q3K.code();
    pub const Q4K: u8 = WType::Q4K.code();
    pub const Q5K: u8 = WType::Q5K.code();
    pub const Q6K: u8 = WType::Q6K.code();

    /// [`WType::has_min`] of the type with code `t`, for const-generic kernels.
    pub(crate) const fn has_min(t: u8) -> bool {
        WType::from_code(t).has_min()
    }

    /// [`WType::block_len`] of the type with code `t`, for const-generic kernels.
    pub(crate) const fn block_len(t: u8) -> usize {
        WType::from_code(t).block_len()
    }
}

/// Where [`gemm`] writes: the product of activation row `i` and weight row
/// `r` goes to `ptr[i * ld + r]` (an `[m, n]` row-major output has `ld = n`).
#[derive(Debug, Clone, Copy)]
pub struct Out {
    /// Element (0, 0).
    pub ptr: *mut f32,
    /// Elements between consecutive activation rows.
    pub ld: usize,
}

// SAFETY: `Out` is a plain address; `gemm`'s contract makes every caller
// write disjoint elements.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// How a matrix's blocks lie in its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Row after row, as in a GGUF file.
    RowMajor,
    /// Rows in groups of eight taking a block of each in turn: block `b` of
    /// row `8g + j` at `((g * blocks_per_row + b) * 8 + j) * block_bytes`;
    /// the last `n % 8` rows row-major after the groups. A decode step then
    /// reads eight rows as one stream (see [`Weights::repack_rows8`]).
    Rows8,
}

/// A weight matrix: `n` rows of `k` weights of type `wtype`, laid out in
/// `bytes` as `layout` says.
#[derive(Debug, Clone, Copy)]
pub struct Weights<'a> {
    /// The type.
    pub wtype: WType,
    /// The blocks, `n * row_bytes(k)` bytes.
    pub bytes: &'a [u8],
    /// Weights per row (the input width).
    pub k: usize,
    /// Rows (the output width).
    pub n: usize,
    /// Where each row's blocks are.
    pub layout: Layout,
}

/// An error in a kernel's arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeError(pub String);

impl std::fmt::Display for ShapeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ShapeError {}

impl<'a> Weights<'a> {
    /// Check that `bytes` holds `n` rows of `k` weights of `wtype`.
    pub fn new(
        wtype: WType,
        bytes: &'a [u8],
        k: usize,
        n: usize,
    ) -> Result<Weights<'a>, ShapeError> {
        let row = wtype.row_bytes(k).ok_or_else(|| {
            ShapeError(format!(
                "{wtype:?}: rows of {k} are not whole blocks of {}",
                wtype.block_len()
            ))
        })?;
        if row.checked_mul(n) != Some(bytes.len()) {
            return Err(ShapeError(format!(
                "{wtype:?}: {} bytes do not hold {n} rows of {k} ({row} bytes each)",
                bytes.len()
            )));
        }
        Ok(Weights {
            wtype,
            bytes,
            k,
            n,
            layout: Layout::RowMajor,
        })
    }

    /// The bytes of row `r`, for a row-major matrix.
    ///
    /// # Panics
    /// If the row is interleaved with others ([`Layout::Rows8`]): use [`Weights::block`].
    pub fn row(&self, r: usize) -> &'a [u8] {
        let (start, stride) = self.locate(r);
        let bb = self.wtype.block_bytes();
        assert!(stride == bb, "row {r} is interleaved (Rows8 layout)");
        &self.bytes[start..start + self.wtype.row_bytes(self.k).unwrap_or(0)]
    }

    /// Where row `r`'s first block starts and how far apart its blocks are.
    pub fn locate(&self, r: usize) -> (usize, usize) {
        let bb = self.wtype.block_bytes();
        let wrow = self.k / self.wtype.block_len() * bb;
        match self.layout {
            Layout::Rows8 if r < self.n - self.n % 8 => (r / 8 * 8 * wrow + r % 8 * bb, 8 * bb),
            _ => (r * wrow, bb),
        }
    }

    /// Block `b` of row `r`.
    pub fn block(&self, r: usize, b: usize) -> &'a [u8] {
        let (start, stride) = self.locate(r);
        let bb = self.wtype.block_bytes();
        &self.bytes[start + b * stride..start + b * stride + bb]
    }

    /// Whether [`Weights::repack_rows8`] applies: a row-major matrix of a
    /// block type (not a float type) with eight rows or more.
    pub fn packs_rows8(&self) -> bool {
        self.layout == Layout::RowMajor && self.wtype.block_len() > 1 && self.n >= 8
    }

    /// These rows in [`Layout::Rows8`] order, or None where that does not
    /// apply ([`Weights::packs_rows8`]).
    pub fn repack_rows8(&self) -> Option<Vec<u8>> {
        let mut out = vec![0u8; self.bytes.len()];
        self.repack_rows8_into(&mut out).then_some(out)
    }

    /// [`Weights::repack_rows8`] into `out` (as long as the matrix); false
    /// where that does not apply.
    pub fn repack_rows8_into(&self, out: &mut [u8]) -> bool {
        if !self.packs_rows8() {
            return false;
        }
        assert_eq!(out.len(), self.bytes.len(), "repack buffer");
        let bb = self.wtype.block_bytes();
        let nb = self.k / self.wtype.block_len();
        let grouped = self.n - self.n % 8;
        for r in 0..grouped {
            let src = self.row(r);
            for b in 0..nb {
                let dst = ((r / 8 * nb + b) * 8 + r % 8) * bb;
                out[dst..dst + bb].copy_from_slice(&src[b * bb..(b + 1) * bb]);
            }
        }
        let tail = grouped * nb * bb;
        out[tail..].copy_from_slice(&self.bytes[tail..]);
        true
    }

    /// The same matrix over `bytes` that [`Weights::repack_rows8`] made.
    pub fn with_rows8(self, bytes: &'a [u8]) -> Weights<'a> {
        assert_eq!(bytes.len(), self.bytes.len(), "repacked bytes");
        Weights {
            bytes,
            layout: Layout::Rows8,
            ..self
        }
    }
}

/// Products of every activation row in `acts` with weight rows `rows`:
/// `out[i * ld + r] = dot(W[r], acts[i])`.
///
/// # Safety
/// `out` must be valid for writes at every `i * out.ld + r` with
/// `i < acts.rows()` and `r` in `rows`, and no one else may access those
/// elements during the call. `acts` must have been quantized for
/// `w.wtype.act_type()` with width `w.k`, and `rows.end <= w.n`.
pub unsafe fn gemm(w: &Weights, rows: Range<usize>, acts: &ActBuf, out: Out, isa: Isa) {
    debug_assert_eq!(acts.act_type(), w.wtype.act_type());
    debug_assert_eq!(acts.k(), w.k);
    debug_assert!(rows.end <= w.n);
    let k = isa.kernels();
    let f = match (w.wtype.family(), k.panel) {
        (Family::Float, _) => k.float,
        (_, Some(p)) if acts.rows() >= p.min_rows => p.gemm,
        (Family::Legacy, _) => k.legacy,
        (Family::KQuant, _) => k.kquants,
    };
    // SAFETY: `isa` was detected on this CPU, which therefore has its
    // tier's target features; the rest is the caller's contract.
    f(w, rows, acts, out)
}

/// [`gemm`] over every row, into an `[m, n]` row-major slice, on this thread.
pub fn gemm_all(w: &Weights, acts: &ActBuf, out: &mut [f32], isa: Isa) {
    assert_eq!(
        acts.act_type(),
        w.wtype.act_type(),
        "activations quantized for another type"
    );
    assert_eq!(acts.k(), w.k, "activation width");
    assert!(out.len() >= acts.rows() * w.n, "output too small");
    let o = Out {
        ptr: out.as_mut_ptr(),
        ld: w.n,
    };
    // SAFETY: checked above; `out` is borrowed mutably for the call.
    unsafe { gemm(w, 0..w.n, acts, o, isa) }
}

/// Row `r` of `w` as f32 values (an embedding lookup).
pub fn dequantize_row(w: &Weights, r: usize, out: &mut [f32]) {
    let bl = w.wtype.block_len();
    for (b, o) in out[..w.k].chunks_exact_mut(bl).enumerate() {
        reference::dequantize(w.wtype, w.block(r, b), o);
    }
}

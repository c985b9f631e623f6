//! What the decode kernels of both block families share for
//! [`Layout::Rows8`](crate::Layout::Rows8): where a row's blocks are, how
//! a range of rows is cut into whole groups of eight, the reduction that
//! leaves one row's sum in each lane, and the context a tile works in.

use std::arch::x86_64::*;
use std::ops::Range;

use crate::{Layout, Out, Weights};

/// Where one tile of either family reads and writes.
#[derive(Clone, Copy)]
pub(crate) struct Ctx {
    /// Where the weight rows lie.
    pub(crate) rows: RowMap,
    /// Blocks per row.
    pub(crate) nb: usize,
    /// The output.
    pub(crate) out: Out,
}

impl Ctx {
    /// The context of products of `w` into `out`.
    pub(crate) fn new(w: &Weights, out: Out) -> Ctx {
        Ctx {
            rows: RowMap::new(w),
            nb: w.k / w.wtype.block_len(),
            out,
        }
    }
}

/// Where the rows of a matrix lie.
#[derive(Clone, Copy)]
pub(crate) struct RowMap {
    /// Row 0 of the weights.
    pub(crate) w: *const u8,
    /// Bytes per weight row.
    pub(crate) wrow: usize,
    /// Bytes per block.
    pub(crate) bb: usize,
    /// Rows interleaved in groups of eight; 0 when row-major.
    pub(crate) grouped: usize,
}

impl RowMap {
    /// The map of `w`.
    pub(crate) fn new(w: &Weights) -> RowMap {
        let bb = w.wtype.block_bytes();
        RowMap {
            w: w.bytes.as_ptr(),
            wrow: w.k / w.wtype.block_len() * bb,
            bb,
            grouped: match w.layout {
                Layout::Rows8 => w.n - w.n % 8,
                Layout::RowMajor => 0,
            },
        }
    }

    /// Row `r`'s first block and the distance between its blocks.
    #[inline(always)]
    pub(crate) unsafe fn row(&self, r: usize) -> (*const u8, usize) {
        if r < self.grouped {
            (
                self.w.add(r / 8 * 8 * self.wrow + r % 8 * self.bb),
                8 * self.bb,
            )
        } else {
            (self.w.add(r * self.wrow), self.bb)
        }
    }

    /// The group of rows from `r0` (a multiple of 8): where it starts, the
    /// distance between its rows' blocks of one index, and between a row's
    /// consecutive blocks.
    #[inline(always)]
    pub(crate) unsafe fn group(&self, r0: usize) -> (*const u8, usize, usize) {
        let base = self.w.add(r0 * self.wrow);
        if self.grouped > 0 {
            (base, self.bb, 8 * self.bb)
        } else {
            (base, self.wrow, self.bb)
        }
    }
}

/// Decode over weight rows `rows` of `n` into `out[r]`: rows in whole groups
/// of eight, counted from row 0, through `eight(g0, dst)` (a row split from
/// its group is computed with the group and the rest dropped, so the result
/// never depends on how the rows were shared out between threads); the last
/// `n % 8` through `alone(range)`.
#[inline(always)]
pub(crate) unsafe fn decode_rows(
    rows: Range<usize>,
    n: usize,
    out: *mut f32,
    mut eight: impl FnMut(usize, *mut f32),
    alone: impl FnOnce(Range<usize>),
) {
    let grouped = n - n % 8;
    let mut r = rows.start;
    while r < rows.end.min(grouped) {
        let g0 = r - r % 8;
        let end = (g0 + 8).min(rows.end);
        if r == g0 && end == g0 + 8 {
            eight(g0, out.add(g0));
        } else {
            let mut t = [0f32; 8];
            eight(g0, t.as_mut_ptr());
            for j in r..end {
                *out.add(j) = t[j - g0];
            }
        }
        r = end;
    }
    if r < rows.end {
        alone(r..rows.end);
    }
}

/// Lane j of the result is the sum of the eight lanes of `s[j]`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn reduce8(s: [__m256i; 8]) -> __m256i {
    let t0 = _mm256_hadd_epi32(s[0], s[1]);
    let t1 = _mm256_hadd_epi32(s[2], s[3]);
    let t2 = _mm256_hadd_epi32(s[4], s[5]);
    let t3 = _mm256_hadd_epi32(s[6], s[7]);
    let u0 = _mm256_hadd_epi32(t0, t1);
    let u1 = _mm256_hadd_epi32(t2, t3);
    _mm256_add_epi32(
        _mm256_permute2x128_si256::<0x20>(u0, u1),
        _mm256_permute2x128_si256::<0x31>(u0, u1),
    )
}

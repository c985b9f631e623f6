//! A block's grid: for each weight, the affine map from its integer code to
//! its value (w = d_e q + m_e, q in the type's code range), read from the
//! block's bytes; and the writer of codes back into a block whose scales are
//! set. Rounding methods that choose the codes themselves (error feedback,
//! importance weighting) fix a block's scales with ggml's own quantizer, read
//! the grid, and write ggml's own blocks.

use crate::blocks::QK_K;
use crate::{kquants, legacy, WType};

/// The values a block's codes can take, group of weights by group.
#[derive(Debug, Clone, Copy)]
pub struct Grid {
    /// Per group: value of code q is `d[g] * q + m[g]`.
    pub d: [f32; GROUPS],
    /// Per group: the offset (a block minimum; zero for symmetric types).
    pub m: [f32; GROUPS],
    /// Weights per group, as a shift: group of weight e is `e >> shift`.
    pub shift: u32,
    /// Weights in the block.
    pub len: usize,
    /// Smallest code (signed, offsets subtracted, as the products use it).
    pub lo: i32,
    /// Largest code.
    pub hi: i32,
}

/// Most groups a block has (K-quants: 16 of 16 weights).
pub const GROUPS: usize = QK_K / 16;

/// The signed code range of a block type; None for float types.
///
/// Q8_0 stops at -127 as ggml's quantizer does: the format could hold -128,
/// but the AVX2 sign trick of the products does not expect it.
pub fn code_range(wtype: WType) -> Option<(i32, i32)> {
    Some(match wtype {
        WType::F32 | WType::F16 | WType::BF16 => return None,
        WType::Q4_0 => (-8, 7),
        WType::Q4_1 | WType::Q4K => (0, 15),
        WType::Q5_0 => (-16, 15),
        WType::Q5_1 | WType::Q5K => (0, 31),
        WType::Q8_0 => (-127, 127),
        WType::Q2K => (0, 3),
        WType::Q3K => (-4, 3),
        WType::Q6K => (-32, 31),
    })
}

impl Grid {
    /// The grid of one block of `wtype` (`blk` is one block's bytes).
    ///
    /// # Panics
    /// On a float type or a short block (callers pass whole blocks).
    pub fn read(wtype: WType, blk: &[u8]) -> Grid {
        let (lo, hi) = code_range(wtype).expect("a block-quantized type");
        let mut g = Grid {
            d: [0.0; GROUPS],
            m: [0.0; GROUPS],
            shift: 4,
            len: wtype.block_len(),
            lo,
            hi,
        };
        if g.len == legacy::QK {
            g.shift = 5;
            g.d[0] = legacy::f16_at(blk, 0);
            if legacy::has_min(wtype) {
                g.m[0] = legacy::f16_at(blk, 2);
            }
        } else {
            let x = kquants::decode(wtype, blk);
            for k in 0..GROUPS {
                g.d[k] = x.d * x.sc[k] as f32;
                g.m[k] = -(x.dmin * x.mn[k] as f32);
            }
        }
        g
    }

    /// The value of code `q` at weight `e`, as ggml dequantizes it.
    #[inline(always)]
    pub fn value(&self, e: usize, q: i32) -> f32 {
        let k = e >> self.shift;
        self.d[k] * q as f32 + self.m[k]
    }

    /// The code whose value is nearest `x` at weight `e` (ties away from zero).
    #[inline(always)]
    pub fn nearest(&self, e: usize, x: f32) -> i32 {
        let k = e >> self.shift;
        let d = self.d[k];
        if d == 0.0 {
            return 0.clamp(self.lo, self.hi);
        }
        // Clamp in f32 first (a huge ratio must not wrap in the cast), then
        // round half away from zero by truncation: `f32::round` is a libm
        // call on baseline x86-64, 6% of a calibrated conversion.
        let v = ((x - self.m[k]) / d).clamp(self.lo as f32, self.hi as f32);
        (v + 0.5f32.copysign(v)) as i32
    }
}

/// The codes of one block, signed as [`Grid`] reads them.
pub fn read_codes(wtype: WType, blk: &[u8], q: &mut [i32]) {
    if wtype.block_len() == legacy::QK {
        q[..legacy::QK].copy_from_slice(&legacy::codes(wtype, blk));
    } else {
        let x = kquants::decode(wtype, blk);
        for (o, &v) in q.iter_mut().zip(&x.q) {
            *o = v as i32;
        }
    }
}

/// Write `q` (signed codes, one per weight, within [`code_range`]) into
/// `blk`'s code fields, replacing what they held; scales stay as they are.
pub fn write_codes(wtype: WType, blk: &mut [u8], q: &[i32]) {
    let (lo, _) = code_range(wtype).expect("a block-quantized type");
    // Stored codes are unsigned: the signed code minus the range's start.
    let u = |e: usize| (q[e] - lo) as u8;
    match wtype {
        WType::Q4_0 | WType::Q4_1 => {
            let at = if wtype == WType::Q4_0 { 2 } else { 4 };
            for j in 0..16 {
                blk[at + j] = u(j) | u(j + 16) << 4;
            }
        }
        WType::Q5_0 | WType::Q5_1 => {
            let (h, at) = if wtype == WType::Q5_0 { (2, 6) } else { (4, 8) };
            let mut qh = 0u32;
            for j in 0..16 {
                let (a, b) = (u(j), u(j + 16));
                blk[at + j] = (a & 0xF) | (b & 0xF) << 4;
                qh |= ((a >> 4) as u32) << j | ((b >> 4) as u32) << (j + 16);
            }
            blk[h..h + 4].copy_from_slice(&qh.to_le_bytes());
        }
        WType::Q8_0 => {
            for j in 0..32 {
                blk[2 + j] = q[j] as i8 as u8;
            }
        }
        WType::Q2K | WType::Q3K => {
            // Q2_K: qs at 16; Q3_K: hmask[32] then qs at 32.
            let at = if wtype == WType::Q2K { 16 } else { 32 };
            if wtype == WType::Q3K {
                blk[..32].fill(0);
            }
            blk[at..at + 64].fill(0);
            for n in 0..2 {
                for j in 0..4 {
                    for l in 0..32 {
                        let v = u(128 * n + 32 * j + l);
                        blk[at + 32 * n + l] |= (v & 3) << (2 * j);
                        if wtype == WType::Q3K {
                            blk[l] |= (v >> 2) << (4 * n + j);
                        }
                    }
                }
            }
        }
        WType::Q4K | WType::Q5K => {
            let (qh, at) = if wtype == WType::Q5K {
                (Some(16), 48)
            } else {
                (None, 16)
            };
            if let Some(h) = qh {
                blk[h..h + 32].fill(0);
            }
            for j in 0..4 {
                for l in 0..32 {
                    let (a, b) = (u(64 * j + l), u(64 * j + 32 + l));
                    blk[at + 32 * j + l] = (a & 0xF) | (b & 0xF) << 4;
                    if let Some(h) = qh {
                        blk[h + l] |= (a >> 4) << (2 * j) | (b >> 4) << (2 * j + 1);
                    }
                }
            }
        }
        WType::Q6K => {
            blk[..192].fill(0);
            for n in 0..2 {
                for t in 0..4 {
                    for l in 0..32 {
                        let v = u(128 * n + 32 * t + l);
                        let low = v & 0xF;
                        blk[64 * n + 32 * (t & 1) + l] |= if t < 2 { low } else { low << 4 };
                        blk[128 + 32 * n + l] |= (v >> 4) << (2 * t);
                    }
                }
            }
        }
        WType::F32 | WType::F16 | WType::BF16 => unreachable!("checked by code_range"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference;
    use crate::testing::Rng;

    /// A random block whose f16 fields are small finite numbers.
    fn block(wtype: WType, rng: &mut Rng) -> Vec<u8> {
        let mut b: Vec<u8> = (0..wtype.block_bytes()).map(|_| rng.next() as u8).collect();
        let halves: &[usize] = match wtype {
            WType::Q4_0 | WType::Q5_0 | WType::Q8_0 => &[0],
            WType::Q4_1 | WType::Q5_1 | WType::Q4K | WType::Q5K => &[0, 2],
            WType::Q2K => &[80, 82],
            WType::Q3K => &[108],
            WType::Q6K => &[208],
            _ => unreachable!(),
        };
        for &i in halves {
            b[i..i + 2].copy_from_slice(&half::f16::from_f32(rng.f()).to_le_bytes());
        }
        if wtype == WType::Q8_0 {
            // -128 is outside the range we write.
            for v in &mut b[2..] {
                if *v == 0x80 {
                    *v = 0x81;
                }
            }
        }
        b
    }

    /// The grid at each block's own codes is ggml's dequantization, and
    /// writing the codes back into a block with its code bytes scrambled
    /// gives the block back byte for byte.
    #[test]
    fn grid_and_codes_round_trip_every_block_type() {
        let mut rng = Rng(7);
        let blocks = WType::ALL.into_iter().filter(|t| code_range(*t).is_some());
        assert_eq!(blocks.clone().count(), 10);
        for wtype in blocks {
            for _ in 0..20 {
                let b = block(wtype, &mut rng);
                let g = Grid::read(wtype, &b);
                let mut q = vec![0i32; g.len];
                read_codes(wtype, &b, &mut q);
                let mut want = vec![0f32; g.len];
                reference::dequantize(wtype, &b, &mut want);
                for e in 0..g.len {
                    assert!((g.lo..=g.hi).contains(&q[e]), "{wtype:?} code {}", q[e]);
                    assert_eq!(g.value(e, q[e]), want[e], "{wtype:?} weight {e}");
                    // Nearest of an exact grid value is a code with that value.
                    assert_eq!(g.value(e, g.nearest(e, want[e])), want[e], "{wtype:?}");
                }
                let mut c = b.clone();
                let other = block(wtype, &mut rng);
                let mut scrambled = vec![0i32; g.len];
                read_codes(wtype, &other, &mut scrambled);
                write_codes(wtype, &mut c, &scrambled);
                write_codes(wtype, &mut c, &q);
                assert_eq!(c, b, "{wtype:?}");
            }
        }
    }

    #[test]
    fn nearest_clamps_to_the_range() {
        let b = block(WType::Q4_0, &mut Rng(3));
        let g = Grid::read(WType::Q4_0, &b);
        let d = g.d[0];
        assert_eq!(g.nearest(0, 1e30 * d.signum()), 7);
        assert_eq!(g.nearest(0, -1e30 * d.signum()), -8);
        assert_eq!(g.nearest(0, 2.4 * d), 2);
    }
}

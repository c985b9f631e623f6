//! ggml tensor types as they appear in GGUF tensor infos.

use std::fmt;

/// A ggml tensor type: its GGUF id, name, and block geometry.
// One byte (an index into TYPES) so that tensor tables stay small.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct GgmlType(u8);

// (id, name, elements per block, bytes per block), from ggml.h / ggml.c's type
// traits. Ids 4, 5, 31-33 and 36-38 were removed from ggml and never appear in
// files it accepts, so we refuse them as unknown too.
const TYPES: &[(u32, &str, u32, u32)] = &[
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 36),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
];

impl GgmlType {
    /// 32-bit float.
    pub const F32: GgmlType = GgmlType::known(0);
    /// IEEE half.
    pub const F16: GgmlType = GgmlType::known(1);
    /// bfloat16.
    pub const BF16: GgmlType = GgmlType::known(30);
    /// 4-bit, 32-wide blocks, one f16 scale.
    pub const Q4_0: GgmlType = GgmlType::known(2);
    /// 4-bit, 32-wide blocks, f16 scale and min.
    pub const Q4_1: GgmlType = GgmlType::known(3);
    /// 5-bit, 32-wide blocks, one f16 scale.
    pub const Q5_0: GgmlType = GgmlType::known(6);
    /// 5-bit, 32-wide blocks, f16 scale and min.
    pub const Q5_1: GgmlType = GgmlType::known(7);
    /// 8-bit, 32-wide blocks, one f16 scale.
    pub const Q8_0: GgmlType = GgmlType::known(8);
    /// 2-bit K-quant, 256-wide super-blocks.
    pub const Q2_K: GgmlType = GgmlType::known(10);
    /// 3-bit K-quant.
    pub const Q3_K: GgmlType = GgmlType::known(11);
    /// 4-bit K-quant.
    pub const Q4_K: GgmlType = GgmlType::known(12);
    /// 5-bit K-quant.
    pub const Q5_K: GgmlType = GgmlType::known(13);
    /// 6-bit K-quant.
    pub const Q6_K: GgmlType = GgmlType::known(14);

    const fn known(id: u32) -> GgmlType {
        let mut i = 0;
        while i < TYPES.len() {
            if TYPES[i].0 == id {
                return GgmlType(i as u8);
            }
            i += 1;
        }
        panic!("not a ggml type id")
    }

    fn row(self) -> (u32, &'static str, u32, u32) {
        TYPES[self.0 as usize]
    }

    /// The type with this GGUF id, if ggml defines it.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        TYPES
            .iter()
            .position(|t| t.0 == id)
            .map(|i| GgmlType(i as u8))
    }

    /// The type with this name (case-insensitive, as llama.cpp prints it: "Q4_K", "f16").
    pub fn from_name(name: &str) -> Option<GgmlType> {
        TYPES
            .iter()
            .position(|t| t.1.eq_ignore_ascii_case(name))
            .map(|i| GgmlType(i as u8))
    }

    /// Every type ggml defines, in id order.
    pub fn all() -> impl Iterator<Item = GgmlType> {
        (0..TYPES.len()).map(|i| GgmlType(i as u8))
    }

    /// The GGUF id.
    pub fn id(self) -> u32 {
        self.row().0
    }

    /// The name llama.cpp uses ("Q4_1").
    pub fn name(self) -> &'static str {
        self.row().1
    }

    /// Elements per block (1 for plain types).
    pub fn block_size(self) -> u64 {
        self.row().2 as u64
    }

    /// Bytes per block.
    pub fn type_size(self) -> u64 {
        self.row().3 as u64
    }

    /// Bits per weight (8 * bytes per block / elements per block).
    pub fn bits_per_weight(self) -> f64 {
        8.0 * self.type_size() as f64 / self.block_size() as f64
    }

    /// Bytes taken by `n_elements` of this type, or None if that is not a
    /// whole number of blocks or overflows.
    pub fn bytes_for(self, n_elements: u64) -> Option<u64> {
        if !n_elements.is_multiple_of(self.block_size()) {
            return None;
        }
        (n_elements / self.block_size()).checked_mul(self.type_size())
    }

    /// candle's dtype for this type, where candle can dequantize or run it.
    pub fn to_candle(self) -> Option<candle_core::quantized::GgmlDType> {
        use candle_core::quantized::GgmlDType as C;
        Some(match self.id() {
            0 => C::F32,
            1 => C::F16,
            30 => C::BF16,
            2 => C::Q4_0,
            3 => C::Q4_1,
            6 => C::Q5_0,
            7 => C::Q5_1,
            8 => C::Q8_0,
            9 => C::Q8_1,
            10 => C::Q2K,
            11 => C::Q3K,
            12 => C::Q4K,
            13 => C::Q5K,
            14 => C::Q6K,
            15 => C::Q8K,
            _ => return None,
        })
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl fmt::Debug for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_matches_candle_for_shared_types() {
        for t in GgmlType::all() {
            if let Some(c) = t.to_candle() {
                assert_eq!(c.block_size() as u64, t.block_size(), "{t}");
                assert_eq!(c.type_size() as u64, t.type_size(), "{t}");
            }
        }
        assert_eq!(GgmlType::from_name("q4_k"), Some(GgmlType::Q4_K));
        assert_eq!(GgmlType::from_id(4), None);
        assert_eq!(GgmlType::Q8_0.bytes_for(64), Some(68));
        assert_eq!(GgmlType::Q8_0.bytes_for(33), None);
        assert_eq!(GgmlType::Q4_0.bits_per_weight(), 4.5);
        assert_eq!((GgmlType::Q6_K.id(), GgmlType::Q6_K.name()), (14, "Q6_K"));
        assert_eq!(std::mem::size_of::<GgmlType>(), 1);
    }
}

//! ggml tensor types as they appear in GGUF tensor infos.

use std::fmt;

/// A ggml tensor type: its GGUF id, name, and block geometry. Variants are
/// in [`TYPES`] order, so a type is one byte and matches are exhaustive.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// 4-bit, 32-wide blocks, one f16 scale.
    Q4_0,
    /// 4-bit, 32-wide blocks, f16 scale and min.
    Q4_1,
    /// 5-bit, 32-wide blocks, one f16 scale.
    Q5_0,
    /// 5-bit, 32-wide blocks, f16 scale and min.
    Q5_1,
    /// 8-bit, 32-wide blocks, one f16 scale.
    Q8_0,
    /// 8-bit, 32-wide blocks, scale and sum (activations).
    Q8_1,
    /// 2-bit K-quant, 256-wide super-blocks.
    Q2_K,
    /// 3-bit K-quant.
    Q3_K,
    /// 4-bit K-quant.
    Q4_K,
    /// 5-bit K-quant.
    Q5_K,
    /// 6-bit K-quant.
    Q6_K,
    /// 8-bit K-quant (activations).
    Q8_K,
    /// IQ2_XXS: an i-quant or ternary type (read, not run).
    IQ2_XXS,
    /// IQ2_XS: an i-quant or ternary type (read, not run).
    IQ2_XS,
    /// IQ3_XXS: an i-quant or ternary type (read, not run).
    IQ3_XXS,
    /// IQ1_S: an i-quant or ternary type (read, not run).
    IQ1_S,
    /// IQ4_NL: an i-quant or ternary type (read, not run).
    IQ4_NL,
    /// IQ3_S: an i-quant or ternary type (read, not run).
    IQ3_S,
    /// IQ2_S: an i-quant or ternary type (read, not run).
    IQ2_S,
    /// IQ4_XS: an i-quant or ternary type (read, not run).
    IQ4_XS,
    /// 8-bit integer.
    I8,
    /// 16-bit integer.
    I16,
    /// 32-bit integer.
    I32,
    /// 64-bit integer.
    I64,
    /// 64-bit float.
    F64,
    /// IQ1_M: an i-quant or ternary type (read, not run).
    IQ1_M,
    /// bfloat16.
    BF16,
    /// TQ1_0: an i-quant or ternary type (read, not run).
    TQ1_0,
    /// TQ2_0: an i-quant or ternary type (read, not run).
    TQ2_0,
    /// 4-bit microscaling float (OCP MX).
    MXFP4,
}

// (id, name, elements per block, bytes per block), from ggml.h / ggml.c's type
// traits, in the enum's order. Ids 4, 5, 31-33 and 36-38 were removed from
// ggml and never appear in files it accepts, so we refuse them as unknown too.
const TYPES: [(u32, &str, u32, u32); 32] = [
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

/// Every type, in [`TYPES`] order.
const ALL: [GgmlType; 32] = {
    use GgmlType::*;
    [
        F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K, IQ2_XXS,
        IQ2_XS, IQ3_XXS, IQ1_S, IQ4_NL, IQ3_S, IQ2_S, IQ4_XS, I8, I16, I32, I64, F64, IQ1_M, BF16,
        TQ1_0, TQ2_0, MXFP4,
    ]
};

impl GgmlType {
    fn row(self) -> (u32, &'static str, u32, u32) {
        TYPES[self as usize]
    }

    /// The type with this GGUF id, if ggml defines it.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        TYPES.iter().position(|t| t.0 == id).map(|i| ALL[i])
    }

    /// The type with this name (case-insensitive, as llama.cpp prints it: "Q4_K", "f16").
    pub fn from_name(name: &str) -> Option<GgmlType> {
        TYPES
            .iter()
            .position(|t| t.1.eq_ignore_ascii_case(name))
            .map(|i| ALL[i])
    }

    /// Every type ggml defines, in id order.
    pub fn all() -> impl Iterator<Item = GgmlType> {
        ALL.into_iter()
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
        use GgmlType::*;
        Some(match self {
            F32 => C::F32,
            F16 => C::F16,
            BF16 => C::BF16,
            Q4_0 => C::Q4_0,
            Q4_1 => C::Q4_1,
            Q5_0 => C::Q5_0,
            Q5_1 => C::Q5_1,
            Q8_0 => C::Q8_0,
            Q8_1 => C::Q8_1,
            Q2_K => C::Q2K,
            Q3_K => C::Q3K,
            Q4_K => C::Q4K,
            Q5_K => C::Q5K,
            Q6_K => C::Q6K,
            Q8_K => C::Q8K,
            IQ2_XXS | IQ2_XS | IQ3_XXS | IQ1_S | IQ4_NL | IQ3_S | IQ2_S | IQ4_XS | I8 | I16
            | I32 | I64 | F64 | IQ1_M | TQ1_0 | TQ2_0 | MXFP4 => return None,
        })
    }
}

impl fmt::Display for GgmlType {
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
        for (t, row) in GgmlType::all().zip(TYPES) {
            assert_eq!(format!("{t:?}"), row.1, "variant order follows TYPES");
        }
    }
}

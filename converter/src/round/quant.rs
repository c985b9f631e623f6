//! The quantization policy (which ggml type each tensor gets) and the codec
//! (candle's ggml block quantizers) that applies it.

use std::borrow::Cow;

use candle_core::quantized::GgmlDType;
use candle_core::CpuStorage;
use lorafold_runtime::gguf::GgmlType;
use serde::Serialize;

/// An error choosing or applying a quantization type.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    /// The --quant value names no type or preset we know.
    #[error("unknown quantization '{0}'; known: {known}", known = known_names())]
    Unknown(String),
    /// An override is not `REGEX=TYPE`.
    #[error("bad tensor type override '{0}': expected REGEX=TYPE, e.g. 'output\\.weight=q8_0'")]
    BadOverride(String),
    /// An override's type part names no type we write.
    #[error("tensor type override '{given}': unknown type '{ty}'; known: {known}", known = type_names())]
    UnknownOverrideType {
        /// the override as given
        given: String,
        /// its type part
        ty: String,
    },
    /// An override's pattern matches no tensor of the model.
    #[error("{}: no tensor matches the tensor type override '{pattern}={ty}'", model.display())]
    UnmatchedOverride {
        /// the model converted
        model: std::path::PathBuf,
        /// the override's pattern
        pattern: String,
        /// its type
        ty: String,
    },
    /// Values past what the type's blocks hold: ggml's quantizer would
    /// write a block whose f16 scale overflows.
    #[error("tensor '{tensor}': {problem}")]
    Overflow {
        /// the tensor
        tensor: String,
        /// which block, and its values
        problem: String,
    },
    /// candle refused to (de)quantize.
    #[error("tensor '{tensor}': {problem}")]
    Codec {
        /// the tensor
        tensor: String,
        /// what went wrong
        problem: String,
    },
}

/// Types we can write (candle can quantize them).
pub const WRITABLE: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// Mixes in the spirit of llama.cpp's, beyond the plain types.
pub const PRESETS: &[&str] = &["q4_k_m", "q5_k_m", "q4_k_s", "q5_k_s"];

fn type_names() -> String {
    WRITABLE
        .iter()
        .map(|t| t.name().to_ascii_lowercase())
        .collect::<Vec<_>>()
        .join(", ")
}

fn known_names() -> String {
    format!("{}, {}", type_names(), PRESETS.join(", "))
}

/// What a tensor is, as far as the policy cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorRole {
    /// 1-D: norms, biases, rope factors.
    Vector,
    /// The output head, or the token embedding when it is tied to the output.
    Output,
    /// The token embedding (untied).
    TokenEmbedding,
    /// blk.N.attn_v.weight
    AttnV {
        /// N
        layer: usize,
        /// blocks in the model
        n_layers: usize,
    },
    /// blk.N.ffn_down.weight
    FfnDown {
        /// N
        layer: usize,
        /// blocks in the model
        n_layers: usize,
    },
    /// Any other 2-D weight.
    Other,
}

/// The per-tensor type choice: a base type or preset, plus regex overrides.
#[derive(Debug, Clone, Serialize)]
pub struct QuantPolicy {
    /// The name given (--quant).
    pub name: String,
    /// The default type for 2-D weights.
    pub base: String,
    /// llama.cpp's Q4_K_M-style bumps for attn_v / ffn_down.
    pub mix: Option<String>,
    /// (regex, type) overrides, first match wins.
    pub overrides: Vec<(String, String)>,
    #[serde(skip)]
    base_type: GgmlType,
    #[serde(skip)]
    compiled: Vec<(regex::Regex, GgmlType)>,
}

/// The type chosen for one tensor, and why it is not the policy's first choice.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TypeChoice {
    /// The type written.
    #[serde(serialize_with = "ser_type")]
    pub ggml_type: GgmlType,
    /// Set when the policy's choice did not fit the row length.
    pub fallback: Option<String>,
}

fn ser_type<S: serde::Serializer>(t: &GgmlType, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(t.name())
}

fn parse_type(name: &str) -> Option<GgmlType> {
    WRITABLE
        .iter()
        .copied()
        .find(|t| t.name().eq_ignore_ascii_case(name))
}

impl QuantPolicy {
    /// Parse `--quant` (a type or preset) and `--tensor-type REGEX=TYPE` overrides.
    pub fn parse(name: &str, overrides: &[String]) -> Result<QuantPolicy, QuantError> {
        let lower = name.to_ascii_lowercase();
        let (base_type, mix) = match lower.as_str() {
            "q4_k_m" => (GgmlType::Q4_K, Some("m")),
            "q5_k_m" => (GgmlType::Q5_K, Some("m")),
            "q4_k_s" => (GgmlType::Q4_K, Some("s")),
            "q5_k_s" => (GgmlType::Q5_K, Some("s")),
            other => (
                parse_type(other).ok_or_else(|| QuantError::Unknown(name.to_string()))?,
                None,
            ),
        };
        let mut compiled = Vec::new();
        let mut pairs = Vec::new();
        for o in overrides {
            let (re, ty) = o
                .rsplit_once('=')
                .ok_or_else(|| QuantError::BadOverride(o.clone()))?;
            let t = parse_type(ty).ok_or_else(|| QuantError::UnknownOverrideType {
                given: o.clone(),
                ty: ty.to_string(),
            })?;
            let r = regex::Regex::new(re).map_err(|_| QuantError::BadOverride(o.clone()))?;
            compiled.push((r, t));
            pairs.push((re.to_string(), t.name().to_string()));
        }
        Ok(QuantPolicy {
            name: lower,
            base: base_type.name().to_string(),
            mix: mix.map(str::to_string),
            overrides: pairs,
            base_type,
            compiled,
        })
    }

    /// The first override whose pattern matches none of `names` (the
    /// tensors of the model it is applied to), as (pattern, type).
    pub fn unmatched_override<'a>(
        &self,
        names: impl Iterator<Item = &'a str> + Clone,
    ) -> Option<(&str, &str)> {
        self.compiled
            .iter()
            .zip(&self.overrides)
            .find(|((re, _), _)| !names.clone().any(|n| re.is_match(n)))
            .map(|(_, (pattern, ty))| (pattern.as_str(), ty.as_str()))
    }

    /// This policy with `types` for the tensors named, before every other
    /// rule (how a drift budget's choices are written down).
    pub fn with_tensor_types(&self, types: &[(String, GgmlType)]) -> QuantPolicy {
        let mut p = self.clone();
        let exact: Vec<_> = types
            .iter()
            .map(|(name, t)| {
                let re = format!("^{}$", regex::escape(name));
                let compiled = regex::Regex::new(&re).expect("an escaped name is a regex");
                ((re, t.name().to_string()), (compiled, *t))
            })
            .collect();
        let (pairs, compiled): (Vec<_>, Vec<_>) = exact.into_iter().unzip();
        p.overrides.splice(0..0, pairs);
        p.compiled.splice(0..0, compiled);
        p
    }

    /// llama.cpp's `general.file_type` for this policy.
    pub fn file_type(&self) -> u32 {
        match (self.base_type, self.mix.as_deref()) {
            (GgmlType::Q4_K, Some("m")) => 15,
            (GgmlType::Q4_K, Some("s")) => 14,
            (GgmlType::Q5_K, Some("m")) => 17,
            (GgmlType::Q5_K, Some("s")) => 16,
            (t, _) => {
                use GgmlType::*;
                match t {
                    F32 => 0,
                    F16 => 1,
                    Q4_0 => 2,
                    Q4_1 => 3,
                    Q8_0 => 7,
                    Q5_0 => 8,
                    Q5_1 => 9,
                    Q2_K => 10,
                    Q3_K => 12,
                    Q4_K => 15,
                    Q5_K => 17,
                    Q6_K => 18,
                    BF16 => 32,
                    // Types no file is made of as a whole: llama.cpp's "guessed".
                    Q8_1 | Q8_K | IQ2_XXS | IQ2_XS | IQ3_XXS | IQ1_S | IQ4_NL | IQ3_S | IQ2_S
                    | IQ4_XS | I8 | I16 | I32 | I64 | F64 | IQ1_M | TQ1_0 | TQ2_0 | MXFP4 => 1024,
                }
            }
        }
    }

    /// The type for tensor `name` with role `role` and row length `row_len`.
    pub fn choose(&self, name: &str, role: TensorRole, row_len: u64) -> TypeChoice {
        if let Some((_, t)) = self.compiled.iter().find(|(r, _)| r.is_match(name)) {
            return fit(*t, row_len);
        }
        let base = self.base_type;
        let wanted = match role {
            TensorRole::Vector => {
                return TypeChoice {
                    ggml_type: GgmlType::F32,
                    fallback: None,
                }
            }
            // llama.cpp: the output head gets Q6_K unless the base type is
            // already 8-bit or wider, or the row doesn't fit the base's blocks.
            TensorRole::Output => {
                if base.block_size() == 1 || base == GgmlType::Q8_0 {
                    base
                } else if !row_len.is_multiple_of(base.block_size()) {
                    GgmlType::Q8_0
                } else {
                    GgmlType::Q6_K
                }
            }
            TensorRole::AttnV { layer, n_layers } | TensorRole::FfnDown { layer, n_layers }
                if self.mix.as_deref() == Some("m") && use_more_bits(layer, n_layers) =>
            {
                GgmlType::Q6_K
            }
            TensorRole::AttnV { .. }
                if self.mix.as_deref() == Some("s") && base == GgmlType::Q4_K =>
            {
                GgmlType::Q5_K
            }
            _ => base,
        };
        fit(wanted, row_len)
    }
}

// llama.cpp's use_more_bits: the first and last eighth of the layers, and
// every third one between.
fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i as isize - (n / 8) as isize) % 3 == 2
}

/// `wanted` if rows of `row_len` are whole blocks of it, else llama.cpp's
/// nearest fallback.
fn fit(wanted: GgmlType, row_len: u64) -> TypeChoice {
    let mut t = wanted;
    let mut steps = Vec::new();
    while !row_len.is_multiple_of(t.block_size()) {
        let next = match t {
            GgmlType::Q4_K => GgmlType::Q5_0,
            GgmlType::Q5_K => GgmlType::Q5_1,
            GgmlType::Q6_K => GgmlType::Q8_0,
            GgmlType::Q2_K | GgmlType::Q3_K => GgmlType::Q4_0,
            _ => GgmlType::F16,
        };
        steps.push(format!(
            "{t} needs rows in multiples of {} but this row has {row_len}",
            t.block_size()
        ));
        t = next;
    }
    TypeChoice {
        ggml_type: t,
        fallback: (!steps.is_empty()).then(|| format!("{} -> {t}: {}", wanted, steps.join("; "))),
    }
}

/// The block types whose codes can be chosen by a rounding method other
/// than nearest (GPTQ, importance weighting): every block type we write.
pub const BLOCK_TYPES: [GgmlType; 10] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

fn candle_type(t: GgmlType) -> GgmlDType {
    t.to_candle().expect("WRITABLE types are candle types")
}

/// Quantize `xs` (row-major, rows of a whole number of blocks) to `t`'s bytes.
pub fn quantize(t: GgmlType, xs: &[f32], tensor: &str) -> Result<Vec<u8>, QuantError> {
    if !(xs.len() as u64).is_multiple_of(t.block_size()) {
        return Err(QuantError::Codec {
            tensor: tensor.into(),
            problem: format!("{} values are not a whole number of {t} blocks", xs.len()),
        });
    }
    let bytes = match t {
        GgmlType::Q4_0 => {
            let mut out = vec![0u8; xs.len() / 32 * 18];
            if crate::round::quant_avx2::quantize_q4_0(xs, &mut out) {
                out
            } else {
                quantize_candle(t, xs)
            }
        }
        GgmlType::Q8_0 => {
            let mut out = vec![0u8; xs.len() / 32 * 34];
            crate::round::fast_codec::quantize_q8_0(xs, &mut out);
            out
        }
        _ => quantize_candle(t, xs),
    };
    if let Some(problem) = lost_block(t, xs, &bytes) {
        return Err(QuantError::Overflow {
            tensor: tensor.into(),
            problem,
        });
    }
    Ok(bytes)
}

/// Where a block of `bytes` (`xs` quantized to block type `t`) cannot hold
/// its values: they reach past f16's range and its grid falls short of half
/// their size. The Q3_K and Q6_K quantizers (candle's port of ggml's) write
/// a zero scale for such a block (every value 0, finite); the others an
/// infinite one, which the writer refuses ([`first_non_finite`]). Values
/// within f16's range always fit, so most tensors are not looked at block
/// by block.
fn lost_block(t: GgmlType, xs: &[f32], bytes: &[u8]) -> Option<String> {
    const F16_MAX: f32 = 65504.0;
    let wt = lorafold_kernels::WType::from_ggml_id(t.id())?;
    let (n, size) = (t.block_size() as usize, t.type_size() as usize);
    if n == 1 || crate::round::fast_codec::max_abs(xs) <= F16_MAX {
        return None;
    }
    xs.chunks_exact(n)
        .zip(bytes.chunks_exact(size))
        .enumerate()
        .find_map(|(b, (x, blk))| {
            let amax = x.iter().fold(0f32, |m, x| m.max(x.abs()));
            let g = lorafold_kernels::grid::Grid::read(wt, blk);
            let reach = (0..n)
                .map(|e| g.value(e, g.lo).abs().max(g.value(e, g.hi).abs()))
                .fold(0f32, f32::max);
            (amax > F16_MAX && reach.is_finite() && reach < amax / 2.0).then(|| {
                format!(
                    "block {b} (elements {}..{}): its values reach {}, which {t}'s block cannot hold (its f16 scale overflows)",
                    b * n,
                    (b + 1) * n,
                    lorafold_runtime::number::compact(amax)
                )
            })
        })
}

/// candle's (scalar) quantizer for `t`, which must be writable; `xs` a
/// whole number of blocks.
pub(crate) fn quantize_candle(t: GgmlType, xs: &[f32]) -> Vec<u8> {
    let mut q = candle_type(t).cpu_zeros(xs.len());
    q.from_float(xs);
    // SAFETY: as_ptr/storage_size_in_bytes describe the block vector candle
    // just filled; we copy it out before `q` is dropped.
    let bytes = unsafe { std::slice::from_raw_parts(q.as_ptr(), q.storage_size_in_bytes()) };
    bytes.to_vec()
}

/// Dequantize `n` values of type `t` from `bytes`.
pub fn dequantize(
    t: GgmlType,
    bytes: &[u8],
    n: usize,
    tensor: &str,
) -> Result<Vec<f32>, QuantError> {
    let codec = |problem: String| QuantError::Codec {
        tensor: tensor.into(),
        problem,
    };
    let dt = t
        .to_candle()
        .ok_or_else(|| codec(format!("ggml type {t} cannot be dequantized by candle")))?;
    if Some(bytes.len() as u64) != t.bytes_for(n as u64) {
        return Err(codec(format!(
            "{} bytes do not hold {n} {t} values",
            bytes.len()
        )));
    }
    let fast = match t {
        GgmlType::Q4_0 => Some(crate::round::fast_codec::dequantize_q4_0 as fn(&[u8], &mut [f32])),
        GgmlType::Q8_0 => Some(crate::round::fast_codec::dequantize_q8_0 as fn(&[u8], &mut [f32])),
        _ => None,
    };
    if let Some(f) = fast {
        let mut out = vec![0f32; n];
        f(bytes, &mut out);
        return Ok(out);
    }
    // candle reinterprets the bytes as blocks, which needs their alignment;
    // a GGUF map gives it, an arbitrary slice may not.
    let data: Cow<[u8]> = if (bytes.as_ptr() as usize).is_multiple_of(4) {
        Cow::Borrowed(bytes)
    } else {
        Cow::Owned(bytes.to_vec())
    };
    match dt
        .from_data(data)
        .dequantize(n)
        .map_err(|e| codec(e.to_string()))?
    {
        CpuStorage::F32(v) => Ok(v),
        _ => Err(codec("candle dequantized to a type other than f32".into())),
    }
}

/// The f16 fields of a block (its scale and, where it has one, its minimum),
/// as (name, byte offset in the block); none for float types.
fn f16_fields(t: GgmlType) -> &'static [(&'static str, usize)] {
    use lorafold_kernels::blocks::*;
    use std::mem::offset_of;
    match t {
        GgmlType::Q4_0 => &[("scale d", offset_of!(BlockQ4_0, d))],
        GgmlType::Q4_1 => &[
            ("scale d", offset_of!(BlockQ4_1, d)),
            ("minimum m", offset_of!(BlockQ4_1, m)),
        ],
        GgmlType::Q5_0 => &[("scale d", offset_of!(BlockQ5_0, d))],
        GgmlType::Q5_1 => &[
            ("scale d", offset_of!(BlockQ5_1, d)),
            ("minimum m", offset_of!(BlockQ5_1, m)),
        ],
        GgmlType::Q8_0 => &[("scale d", offset_of!(BlockQ8_0, d))],
        GgmlType::Q2_K => &[
            ("scale d", offset_of!(BlockQ2K, d)),
            ("minimum scale dmin", offset_of!(BlockQ2K, dmin)),
        ],
        GgmlType::Q3_K => &[("scale d", offset_of!(BlockQ3K, d))],
        GgmlType::Q4_K => &[
            ("scale d", offset_of!(BlockQ4K, d)),
            ("minimum scale dmin", offset_of!(BlockQ4K, dmin)),
        ],
        GgmlType::Q5_K => &[
            ("scale d", offset_of!(BlockQ5K, d)),
            ("minimum scale dmin", offset_of!(BlockQ5K, dmin)),
        ],
        GgmlType::Q6_K => &[("scale d", offset_of!(BlockQ6K, d))],
        _ => &[],
    }
}

/// Where `bytes`, a tensor of type `t`, holds a value that is not finite: a
/// float element, or a block's f16 scale or minimum (a finite value too
/// large for the type: f16 ends at 65504, a Q8_0 block's values at about
/// 65504 · 127). None when every value is finite, or for a type not written.
pub fn first_non_finite(t: GgmlType, bytes: &[u8]) -> Option<String> {
    let f16_at = |at: usize| half::f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32();
    match t {
        GgmlType::F32 => {
            // SAFETY: every bit pattern is an f32; align_to only splits off
            // what is not aligned.
            let (head, values, tail) = unsafe { bytes.align_to::<f32>() };
            if head.is_empty() && tail.is_empty() && cfg!(target_endian = "little") {
                return lorafold_runtime::finite::check_finite(values)
                    .err()
                    .map(|f| f.to_string());
            }
            bytes.chunks_exact(4).enumerate().find_map(|(i, b)| {
                let v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                (!v.is_finite()).then(|| format!("element {i} is {v}"))
            })
        }
        GgmlType::F16 => first_all_ones(bytes, 0x7c00)
            .map(|i| format!("element {i} is {} in f16", f16_at(2 * i))),
        GgmlType::BF16 => first_all_ones(bytes, 0x7f80).map(|i| {
            let v = half::bf16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]);
            format!("element {i} is {v} in bf16")
        }),
        _ => {
            let (fields, size) = (f16_fields(t), t.type_size() as usize);
            if fields.is_empty() || size == 0 {
                return None;
            }
            let bad = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]) & 0x7c00 == 0x7c00;
            (0..bytes.len() / size).find_map(|b| {
                let (name, at) = fields.iter().find(|(_, at)| bad(b * size + at))?;
                let n = t.block_size();
                Some(format!(
                    "block {b} (elements {}..{}): its f16 {name} is {}",
                    b as u64 * n,
                    (b as u64 + 1) * n,
                    f16_at(b * size + at)
                ))
            })
        }
    }
}

/// The index of the first little-endian u16 of `bytes` whose `mask` bits
/// (a 16-bit float's exponent) are all set: a run at a time without an
/// early exit, which vectorises, then the bad run element by element.
fn first_all_ones(bytes: &[u8], mask: u16) -> Option<usize> {
    let bad = |b: &[u8]| u16::from_le_bytes([b[0], b[1]]) & mask == mask;
    let run = bytes
        .chunks(512)
        .position(|r| r.chunks_exact(2).fold(false, |any, b| any | bad(b)))?;
    let start = run * 256;
    bytes[2 * start..]
        .chunks_exact(2)
        .position(bad)
        .map(|i| start + i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_past_the_type_are_found_where_they_are_written() {
        let fine: Vec<f32> = (0..512).map(|i| (i as f32 - 256.0) / 100.0).collect();
        // Finite in f32, but every block's f16 scale overflows.
        let huge: Vec<f32> = fine.iter().map(|x| x * 1e35).collect();
        for t in BLOCK_TYPES {
            let ok = quantize(t, &fine, "w").unwrap();
            assert_eq!(first_non_finite(t, &ok), None, "{t}");
            let n = t.block_size();
            // An infinite scale is refused where it is written; a zero one
            // (Q3_K's and Q6_K's quantizers) where it is made.
            let e = match quantize(t, &huge, "w") {
                Ok(bytes) => first_non_finite(t, &bytes).unwrap_or_else(|| panic!("{t}: finite")),
                Err(e) => e.to_string(),
            };
            assert!(
                e.contains(&format!("block 0 (elements 0..{n}): its ")),
                "{t}: {e}"
            );
        }
        let mut big = fine.clone();
        big[7] = 7e4;
        let e = first_non_finite(GgmlType::F16, &quantize(GgmlType::F16, &big, "w").unwrap());
        assert_eq!(e.as_deref(), Some("element 7 is inf in f16"));
        big[300] = f32::MAX;
        let bf16 = quantize(GgmlType::BF16, &big, "w").unwrap();
        assert_eq!(
            first_non_finite(GgmlType::BF16, &bf16).as_deref(),
            Some("element 300 is inf in bf16")
        );
        let f32s = quantize(GgmlType::F32, &big, "w").unwrap();
        assert_eq!(first_non_finite(GgmlType::F32, &f32s), None);
        // Unaligned bytes are read too.
        let mut shifted = vec![0u8];
        shifted.extend(f32::NAN.to_le_bytes());
        assert_eq!(
            first_non_finite(GgmlType::F32, &shifted[1..]).as_deref(),
            Some("element 0 is NaN")
        );
    }
}

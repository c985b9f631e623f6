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

fn known_names() -> String {
    let mut v: Vec<String> = WRITABLE
        .iter()
        .map(|t| t.name().to_ascii_lowercase())
        .collect();
    v.extend(PRESETS.iter().map(|s| s.to_string()));
    v.join(", ")
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
            let t = parse_type(ty).ok_or_else(|| QuantError::Unknown(ty.to_string()))?;
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
    if t == GgmlType::Q4_0 {
        let mut out = vec![0u8; xs.len() / 32 * 18];
        if crate::quant_avx2::quantize_q4_0(xs, &mut out) {
            return Ok(out);
        }
    }
    Ok(quantize_candle(t, xs))
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

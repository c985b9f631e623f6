//! GGUF LoRA adapters (ours or llama.cpp's), widened to f32 once at load and
//! attached to a model without touching its weights.

use crate::gguf::names;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};

use crate::finite::check_finite;
use crate::gguf::{GgmlType, GgufFile};
use crate::mapped;
use crate::model::{Model, RuntimeError};

/// One target's pair, ready to multiply: A^T [in, r] and B^T [r, out].
#[derive(Debug, Clone)]
pub struct LoadedPair {
    /// A^T ([in, r]; for the token embedding, rows per token: [vocab, r]).
    pub a_t: Tensor,
    /// B^T, [r, out].
    pub b_t: Tensor,
    /// alpha / r.
    pub file_scale: f64,
    /// lora_a dims (ne) as stored.
    pub a_dims: Vec<u64>,
    /// lora_b dims (ne) as stored.
    pub b_dims: Vec<u64>,
    /// Both factors were stored as f16.
    pub f16: bool,
}

impl LoadedPair {
    /// The pair as the CPU engine holds it: A `[rank, in]` and Bᵀ `[rank, out]`
    /// row-major (for the token embedding: A a row per token, Bᵀ
    /// `[rank, dim]`), in f16 when the file stored f16 (exactly: the values
    /// were widened from f16) and f32 otherwise.
    pub fn to_factors(
        &self,
        slot: usize,
        embedding: bool,
    ) -> Result<crate::cpu::LoraFactors, candle_core::Error> {
        let rank = self.b_t.dim(0)?;
        let b = self.b_t.clone();
        let a = if embedding {
            self.a_t.clone()
        } else {
            self.a_t.t()?.contiguous()?
        };
        let factor = |t: Tensor| -> Result<crate::cpu::Factor, candle_core::Error> {
            let v = t.flatten_all()?.to_vec1::<f32>()?;
            Ok(if self.f16 {
                crate::cpu::Factor::F16(v.iter().map(|&x| half::f16::from_f32(x)).collect())
            } else {
                crate::cpu::Factor::F32(v)
            })
        };
        Ok(crate::cpu::LoraFactors {
            slot,
            rank,
            a: factor(a)?,
            b: factor(b)?,
            file_scale: self.file_scale as f32,
        })
    }
}

/// A LoRA adapter GGUF in memory.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// The file.
    pub path: std::path::PathBuf,
    /// `general.architecture`.
    pub arch: String,
    /// `adapter.lora.alpha` (0 means "scale 1", as llama.cpp reads it).
    pub alpha: f64,
    /// Pairs by base tensor name.
    pub pairs: BTreeMap<String, LoadedPair>,
}

impl LoraAdapter {
    /// Read an adapter GGUF.
    pub fn load(path: impl AsRef<Path>) -> Result<LoraAdapter, RuntimeError> {
        let file = Arc::new(GgufFile::open(path)?);
        let f = file.as_ref();
        let shown = f.path().to_path_buf();
        let bad = |tensor: &str, problem: String| RuntimeError::Adapter {
            path: shown.clone(),
            tensor: tensor.into(),
            problem,
        };
        if f.get_str(names::TYPE).as_deref() != Some(names::TYPE_ADAPTER)
            || f.get_str(names::ADAPTER_TYPE).as_deref() != Some(names::ADAPTER_TYPE_LORA)
        {
            return Err(RuntimeError::Model {
                path: shown.clone(),
                problem: "not a LoRA adapter (general.type = adapter, adapter.type = lora)".into(),
            });
        }
        let arch = f
            .get_str(names::ARCHITECTURE)
            .map(|s| s.into_owned())
            .unwrap_or_default();
        let alpha = f.get_f64(names::ADAPTER_LORA_ALPHA).unwrap_or(0.0);
        if !alpha.is_finite() {
            return Err(RuntimeError::Model {
                path: shown.clone(),
                problem: format!("adapter.lora.alpha is {alpha}: not finite"),
            });
        }
        let cpu = Device::Cpu;
        let mut pairs = BTreeMap::new();
        let a_tensors = f
            .tensors()
            .iter()
            .filter_map(|t| match names::lora_target(&t.name) {
                Some((target, true)) => Some((t, target.to_string())),
                _ => None,
            });
        for (ta, target) in a_tensors {
            let tb = f
                .tensor(&names::lora_b(&target))
                .ok_or_else(|| bad(&ta.name, "has no matching .lora_b".into()))?;
            if ta.dims().len() != 2 || tb.dims().len() != 2 {
                return Err(bad(&ta.name, "lora_a and lora_b must be 2-D".into()));
            }
            if tb.dims()[0] == 0 {
                return Err(bad(&tb.name, "rank 0: an adapter needs rank >= 1".into()));
            }
            let a = mapped::qtensor(&file, ta, &cpu)?.dequantize(&cpu)?;
            let b = mapped::qtensor(&file, tb, &cpu)?.dequantize(&cpu)?;
            // A NaN here turns every logit NaN, which sampling reads as token 0.
            for (t, info) in [(&a, ta), (&b, tb)] {
                check_finite(&t.flatten_all()?.to_vec1::<f32>()?)
                    .map_err(|p| bad(&info.name, format!("{p}: not finite")))?;
            }
            let embedding = target == names::TOKEN_EMBD;
            // ne [in, r] is torch [r, in]; the embedding's A is stored as
            // rows per token already (ne [r, vocab]).
            let a_t = if embedding { a } else { a.t()?.contiguous()? };
            let b_t = b.t()?.contiguous()?;
            let rank = tb.dims()[0] as f64;
            let file_scale = if alpha != 0.0 { alpha / rank } else { 1.0 };
            pairs.insert(
                target,
                LoadedPair {
                    a_t,
                    b_t,
                    file_scale,
                    a_dims: ta.dims().to_vec(),
                    b_dims: tb.dims().to_vec(),
                    f16: ta.ggml_type == GgmlType::F16 && tb.ggml_type == GgmlType::F16,
                },
            );
        }
        if let Some(t) = f.tensors().iter().find(|t| {
            matches!(names::lora_target(&t.name), Some((target, false)) if !pairs.contains_key(target))
        }) {
            return Err(bad(&t.name, "has no matching .lora_a".into()));
        }
        Ok(LoraAdapter {
            path: shown,
            arch,
            alpha,
            pairs,
        })
    }

    /// Check that every pair fits a projection of `model`.
    pub fn check_fits(&self, model: &Model) -> Result<(), RuntimeError> {
        self.check_fits_shapes(&model.config, |t| model.projection_shape(t))
    }

    /// [`LoraAdapter::check_fits`] against a model not loaded yet.
    pub fn check_fits_opened(&self, model: &crate::model::OpenedModel) -> Result<(), RuntimeError> {
        self.check_fits_shapes(&model.config, |t| model.projection_shape(t))
    }

    fn check_fits_shapes(
        &self,
        config: &crate::model::ModelConfig,
        projection_shape: impl Fn(&str) -> Option<(usize, usize)>,
    ) -> Result<(), RuntimeError> {
        let bad = |tensor: &str, problem: String| RuntimeError::Adapter {
            path: self.path.clone(),
            tensor: tensor.into(),
            problem,
        };
        let model_arch = config.arch.gguf_name();
        if self.arch != model_arch {
            return Err(bad(
                names::ARCHITECTURE,
                format!(
                    "adapter is for '{}', the model is '{model_arch}'",
                    self.arch
                ),
            ));
        }
        for (target, p) in &self.pairs {
            let name = names::lora_a(target);
            let (n_in, n_out) = projection_shape(target).ok_or_else(|| {
                bad(
                    &name,
                    format!(
                        "the model has no projection '{target}' (an adapter for another model?)"
                    ),
                )
            })?;
            let fits = if target == names::TOKEN_EMBD {
                // ne: a [r, vocab], b [r, dim]; n_in is dim, n_out vocab here.
                p.a_dims[1] as usize == n_out
                    && p.b_dims[1] as usize == n_in
                    && p.a_dims[0] == p.b_dims[0]
            } else {
                p.a_dims[0] as usize == n_in
                    && p.b_dims[1] as usize == n_out
                    && p.a_dims[1] == p.b_dims[0]
            };
            if !fits {
                return Err(bad(
                    &name,
                    format!("lora_a {:?} / lora_b {:?} do not fit '{target}' ({n_in} -> {n_out}; an adapter for another model?)", p.a_dims, p.b_dims),
                ));
            }
        }
        Ok(())
    }
}

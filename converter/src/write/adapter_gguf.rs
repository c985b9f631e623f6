//! A PEFT adapter as a GGUF LoRA adapter in llama.cpp's layout, for the
//! separate path (a quantized base plus adapters loaded with `--lora`).

use lorafold_runtime::gguf::names;
use std::path::Path;

use lorafold_runtime::gguf::{GgmlType, MetadataValue};
use serde::Serialize;

use crate::error::check_finite;
use crate::merge::{MergePlan, TensorEdit};
use crate::read::base::{permute_rows, BaseModel};
use crate::read::peft::{ModuleKind, PeftAdapter, PeftError};
use crate::round::quant::{self, QuantError};
use crate::write::gguf_writer::{GgufStream, GgufWriter, WriteError};

/// An error writing an adapter GGUF; nothing is left behind.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// llama.cpp's runtime cannot express this adapter as PEFT defines it.
    #[error("{adapter}: {what} cannot be expressed as a llama.cpp LoRA adapter; use the merged path (the adapter merged into the base)")]
    Inexpressible {
        /// the adapter folder
        adapter: String,
        /// what cannot be expressed
        what: String,
    },
    /// The type is not one llama.cpp reads for adapters here.
    #[error("adapter tensors are written as f16, f32 or bf16, not {0}")]
    BadType(String),
    /// An adapter tensor could not be read.
    #[error(transparent)]
    Peft(#[from] PeftError),
    /// Conversion of the values failed.
    #[error(transparent)]
    Quant(#[from] QuantError),
    /// Writing failed.
    #[error(transparent)]
    Write(#[from] WriteError),
}

/// What was written, per module.
#[derive(Debug, Clone, Serialize)]
pub struct AdapterModuleReport {
    /// Base tensor the pair applies to.
    pub tensor: String,
    /// Rank.
    pub rank: u64,
    /// PEFT's scale for the module.
    pub scale: f64,
    /// Factor folded into B so that llama.cpp's alpha / rank gives `scale`.
    pub b_factor: f64,
}

/// The adapter GGUF.
#[derive(Debug, Clone, Serialize)]
pub struct AdapterReport {
    /// The file.
    pub path: String,
    /// Type of A and B.
    pub ggml_type: String,
    /// adapter.lora.alpha.
    pub alpha: f64,
    /// File size (0 until the file is finished).
    pub file_size: u64,
    /// Modules in file order.
    pub modules: Vec<AdapterModuleReport>,
}

/// The (lora_a, lora_b) values and GGUF dims for one module, in llama.cpp's
/// layout: A [r, in] (ne [in, r]); B [out, r] (ne [r, out]) with q/k rows
/// permuted and `b_factor` folded in. For the token embedding llama.cpp
/// gathers rows of A, so A is stored transposed: ne [r, vocab].
pub struct LoraPair {
    /// lora_a values, row-major.
    pub a: Vec<f32>,
    /// lora_a dims (ne).
    pub a_dims: [u64; 2],
    /// lora_b values, row-major.
    pub b: Vec<f32>,
    /// lora_b dims (ne).
    pub b_dims: [u64; 2],
}

/// Build the pair for `edit` scaled so that `alpha / rank * b_factor` is the
/// module's PEFT scale.
pub fn lora_pair(
    edit: &TensorEdit,
    adapter: &PeftAdapter,
    b_factor: f64,
) -> Result<LoraPair, PeftError> {
    let e = edit.lora.as_ref().expect("pairs are built for LoRA edits");
    let m = &e.module;
    let r = m.rank as usize;
    let (a, _) = adapter.values(&m.key_a)?;
    let (b, _) = adapter.values(&m.key_b)?;
    let b = match e.permute_heads {
        Some(h) => permute_rows(&b, r, h),
        None => b,
    };
    let b: Vec<f32> = if b_factor == 1.0 {
        b
    } else {
        let folded: Vec<f32> = b.iter().map(|&x| (x as f64 * b_factor) as f32).collect();
        check_finite(&folded).map_err(|found| PeftError::Tensor {
            path: adapter.tensors_path.clone(),
            tensor: m.key_b.clone(),
            problem: format!(
                "folding the scale factor {} into lora_B overflows f32: {found}",
                lorafold_runtime::number::compact(b_factor)
            ),
        })?;
        folded
    };
    Ok(match m.kind {
        ModuleKind::Linear => LoraPair {
            a,
            a_dims: [m.in_features, m.rank],
            b,
            b_dims: [m.rank, m.out_features],
        },
        ModuleKind::Embedding => {
            let vocab = m.in_features as usize;
            let mut at = vec![0f32; a.len()];
            for k in 0..r {
                for v in 0..vocab {
                    at[v * r + k] = a[k * vocab + v];
                }
            }
            LoraPair {
                a: at,
                a_dims: [m.rank, m.in_features],
                b,
                b_dims: [m.rank, m.out_features],
            }
        }
    })
}

/// A GGUF writer with llama.cpp's LoRA adapter keys: llama.cpp scales each
/// pair by `alpha` / its rank.
pub fn lora_writer(path: &Path, arch: &str, alpha: f32) -> Result<GgufWriter, WriteError> {
    let mut w = GgufWriter::new(path);
    w.add_metadata(names::ARCHITECTURE, &MetadataValue::string(arch))?;
    w.add_metadata(names::TYPE, &MetadataValue::string(names::TYPE_ADAPTER))?;
    w.add_metadata(
        names::ADAPTER_TYPE,
        &MetadataValue::string(names::ADAPTER_TYPE_LORA),
    )?;
    w.add_metadata(names::ADAPTER_LORA_ALPHA, &MetadataValue::F32(alpha))?;
    Ok(w)
}

/// Prepare `adapter` as a llama.cpp LoRA GGUF for `base` at `path`: the
/// returned stream holds the complete file and appears at `path` when
/// finished, so a caller writing several files can commit them together.
/// `provenance` is appended as metadata.
pub fn write_adapter_gguf(
    base: &BaseModel,
    adapter: &PeftAdapter,
    plan: &MergePlan,
    path: &Path,
    ggml_type: GgmlType,
    provenance: &[(String, MetadataValue<'static>)],
) -> Result<(GgufStream, AdapterReport), AdapterError> {
    if ![GgmlType::F16, GgmlType::F32, GgmlType::BF16].contains(&ggml_type) {
        return Err(AdapterError::BadType(ggml_type.name().to_string()));
    }
    let inexpressible = |what: String| AdapterError::Inexpressible {
        adapter: adapter.dir.display().to_string(),
        what,
    };
    if let Some(m) = adapter.modules.iter().find(|m| m.dora) {
        return Err(inexpressible(format!("DoRA (module {})", m.path)));
    }
    if let Some(m) = adapter.modules.iter().find(|m| m.bias) {
        return Err(inexpressible(format!("lora_B.bias (module {})", m.path)));
    }
    // PEFT saves a copy of the base embedding when embed_tokens is a target;
    // it is the base's own weight, not a change, so it needs no counterpart.
    if let Some(s) = adapter
        .saved
        .iter()
        .find(|s| !s.name.ends_with(".base_layer.weight"))
    {
        return Err(inexpressible(format!(
            "modules_to_save (full tensor {})",
            s.name
        )));
    }
    let alpha = adapter.config.lora_alpha;
    let mut w = lora_writer(path, base.arch.gguf_name(), alpha as f32)?;
    // Adapters are small (SmolLM2's chef: 4.9M parameters), so all pairs are
    // built before the header, which needs their shapes.
    let mut modules = Vec::new();
    let mut pairs = Vec::new();
    for (name, e) in plan.edits.iter().filter(|(_, e)| e.lora.is_some()) {
        let m = &e.lora.as_ref().unwrap().module;
        // llama.cpp scales by alpha / rank (by 1 when alpha is 0); fold rsLoRA
        // and alpha_pattern into B.
        let file_scale = if alpha != 0.0 {
            alpha / m.rank as f64
        } else {
            1.0
        };
        let b_factor = m.scale / file_scale;
        let b_factor = if (b_factor - 1.0).abs() < 1e-12 {
            1.0
        } else {
            b_factor
        };
        modules.push(AdapterModuleReport {
            tensor: name.clone(),
            rank: m.rank,
            scale: m.scale,
            b_factor,
        });
        let pair = lora_pair(e, adapter, b_factor)?;
        w.add_tensor(&names::lora_a(name), ggml_type, &pair.a_dims)?;
        w.add_tensor(&names::lora_b(name), ggml_type, &pair.b_dims)?;
        pairs.push((name, pair));
    }
    let folded: Vec<String> = modules
        .iter()
        .filter(|m| m.b_factor != 1.0)
        .map(|m| format!("{}={}", m.tensor, m.b_factor))
        .collect();
    w.add_metadata(
        "lorafold.adapter.b_factor",
        &MetadataValue::string_array(folded),
    )?;
    for (k, v) in provenance {
        w.add_metadata(k, v)?;
    }
    let mut stream = w.start()?;
    for (name, pair) in &pairs {
        stream.write_tensor(
            &names::lora_a(name),
            &quant::quantize(ggml_type, &pair.a, name)?,
        )?;
        stream.write_tensor(
            &names::lora_b(name),
            &quant::quantize(ggml_type, &pair.b, name)?,
        )?;
    }
    let report = AdapterReport {
        path: path.display().to_string(),
        ggml_type: ggml_type.name().to_string(),
        alpha,
        file_size: 0,
        modules,
    };
    Ok((stream, report))
}

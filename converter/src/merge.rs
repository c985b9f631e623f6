//! The merge: which adapter tensors change which base tensors, and
//! W = W0 + s·B·A accumulated in f64 and rounded once.

use lorafold_runtime::gguf::names;
use std::collections::BTreeMap;

use crate::error::{check_finite, NonFinite};
use crate::read::base::BaseModel;
use crate::read::peft::{LoraModule, ModuleKind, PeftAdapter, PeftError, SavedTensor};

/// An error planning or computing the merge.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// The adapter does not fit the base.
    #[error("{adapter}: tensor '{tensor}': {problem}")]
    Mismatch {
        /// the adapter file
        adapter: String,
        /// the adapter tensor
        tensor: String,
        /// what does not fit
        problem: String,
    },
    /// An adapter tensor could not be read.
    #[error(transparent)]
    Peft(#[from] PeftError),
    /// A merged value is NaN or infinite although every input was finite.
    #[error("{adapter}: merging into tensor '{tensor}' overflows f32: {found}")]
    NonFinite {
        /// the adapter file
        adapter: String,
        /// the GGUF tensor
        tensor: String,
        /// the first bad value
        found: NonFinite,
    },
}

/// A LoRA delta on one base tensor.
#[derive(Debug, Clone)]
pub struct LoraEdit {
    /// The adapter module.
    pub module: LoraModule,
    /// Rows are permuted as llama.cpp permutes q/k, with this many heads.
    pub permute_heads: Option<usize>,
}

/// Everything the adapter does to one output tensor.
#[derive(Debug, Clone, Default)]
pub struct TensorEdit {
    /// A full tensor that replaces the base's (modules_to_save), by adapter key.
    pub replace: Option<String>,
    /// A low-rank delta (or DoRA) on top.
    pub lora: Option<LoraEdit>,
    /// lora_B.bias (scaled) added to this bias tensor.
    pub bias: Option<LoraEdit>,
    /// The tensor is new: the base lacks it (a bias, or an untied output head).
    pub new_dims: Option<Vec<u64>>,
}

/// Which output tensors the adapter changes, checked against the base.
#[derive(Debug, Clone, Default)]
pub struct MergePlan {
    /// Edits by GGUF tensor name.
    pub edits: BTreeMap<String, TensorEdit>,
    /// Things the user should know (fan_in_fan_out ignored, tie broken).
    pub notes: Vec<String>,
}

impl MergePlan {
    /// Match every adapter module and saved tensor to a base tensor.
    pub fn new(base: &BaseModel, adapter: &PeftAdapter) -> Result<MergePlan, MergeError> {
        let file = adapter.tensors_path.display().to_string();
        let mut plan = MergePlan::default();
        if adapter.config.fan_in_fan_out {
            plan.notes.push("fan_in_fan_out is set, but llama-family projections are nn.Linear, for which PEFT ignores it; so do we".into());
        }
        for m in &adapter.modules {
            plan.add_module(base, m, &file)?;
        }
        for s in &adapter.saved {
            plan.add_saved(base, s, &file)?;
        }
        Ok(plan)
    }

    /// Module `m`'s delta on the base tensor it wraps (and its bias), checked to fit it.
    fn add_module(
        &mut self,
        base: &BaseModel,
        m: &LoraModule,
        file: &str,
    ) -> Result<(), MergeError> {
        let mismatch = mismatch(file, &m.key_a);
        let name = match (m.kind, m.path.as_str()) {
            (ModuleKind::Embedding, "model.embed_tokens") => Some(names::TOKEN_EMBD.to_string()),
            (ModuleKind::Linear, p) => base.arch.spec().hf_to_gguf(&format!("{p}.weight")),
            _ => None,
        }
        .ok_or_else(|| {
            mismatch(format!(
                "module '{}' has no counterpart in a {} model",
                m.path, base.arch
            ))
        })?;
        if name == names::OUTPUT && base.tied_embeddings {
            return Err(mismatch("LoRA on lm_head, but the base ties its output head to the token embedding; merging would change both".into()));
        }
        let t = base.tensor(&name).ok_or_else(|| {
            mismatch(format!(
                "the base has no tensor '{name}' (an adapter for another base? it has {} layers)",
                base.shape.n_layers
            ))
        })?;
        // GGUF dims are [in, out] for Linear and [dim, vocab] for the embedding.
        let (want_in, want_out) = match m.kind {
            ModuleKind::Linear => (t.dims[0], t.dims.get(1).copied().unwrap_or(1)),
            ModuleKind::Embedding => (t.dims.get(1).copied().unwrap_or(1), t.dims[0]),
        };
        if (m.in_features, m.out_features) != (want_in, want_out) {
            return Err(mismatch(format!(
                "adapter maps {} -> {} features but base tensor '{name}' has {want_in} -> {want_out} (an adapter for another base?)",
                m.in_features, m.out_features
            )));
        }
        let permute_heads = match (
            base.arch.permutes_qk(),
            name.contains(".attn_q."),
            name.contains(".attn_k."),
        ) {
            (true, true, _) => Some(base.shape.n_head),
            (true, _, true) => Some(base.shape.n_head_kv),
            _ => None,
        };
        let edit = LoraEdit {
            module: m.clone(),
            permute_heads,
        };
        if m.bias {
            let bias_name = name.replace(".weight", ".bias");
            let e = self.edits.entry(bias_name.clone()).or_default();
            e.bias = Some(edit.clone());
            if base.tensor(&bias_name).is_none() {
                e.new_dims = Some(vec![m.out_features]);
            }
        }
        self.edits.entry(name).or_default().lora = Some(edit);
        Ok(())
    }

    /// Saved tensor `s` in place of the base's (or as an untied output head), checked to fit.
    fn add_saved(
        &mut self,
        base: &BaseModel,
        s: &SavedTensor,
        file: &str,
    ) -> Result<(), MergeError> {
        let mismatch = mismatch(file, &s.key);
        let hf = s.name.replace(".base_layer.", ".");
        let name = base.arch.spec().hf_to_gguf(&hf).ok_or_else(|| {
            mismatch(format!(
                "saved module '{}' has no counterpart in a {} model",
                s.name, base.arch
            ))
        })?;
        let dims: Vec<u64> = s.shape.iter().rev().map(|&d| d as u64).collect();
        let e = self.edits.entry(name.clone()).or_default();
        match base.tensor(&name) {
            Some(t) if t.dims != dims => {
                return Err(mismatch(format!(
                    "shape {:?} does not match base tensor '{name}' {:?}",
                    s.shape,
                    t.shape_torch()
                )))
            }
            Some(_) => {}
            None if name == names::OUTPUT && base.tied_embeddings => {
                self.notes.push("the adapter saves its own lm_head, so the output head is untied from the token embedding".into());
                e.new_dims = Some(dims);
            }
            None => return Err(mismatch(format!("the base has no tensor '{name}'"))),
        }
        e.replace = Some(s.key.clone());
        Ok(())
    }
}

/// The error for an adapter tensor of `file` that does not fit the base.
fn mismatch<'a>(file: &'a str, tensor: &'a str) -> impl Fn(String) -> MergeError + 'a {
    move |problem| MergeError::Mismatch {
        adapter: file.to_string(),
        tensor: tensor.to_string(),
        problem,
    }
}

/// The merged values of one tensor and the delta that was applied (W - W0).
pub struct Merged {
    /// W, rounded once to f32.
    pub values: Vec<f32>,
    /// W0 (the base values, or the saved replacement).
    pub base: Vec<f32>,
    /// W - W0 as applied, when there was a LoRA or bias edit.
    pub delta: Option<Vec<f32>>,
}

crate::simd::avx2_or_portable! {
    /// acc[o, i] += s * sum_k B[src(o), k] * A[k, i], in f64.
    fn add_low_rank(
        acc: &mut [f64],
        row_src: &[usize],
        row_len: usize,
        a: &[f32],
        b: &[f32],
        r: usize,
        s: f64,
    ) {
        for (o, &src) in row_src.iter().enumerate() {
            let row = &mut acc[o * row_len..(o + 1) * row_len];
            for k in 0..r {
                let bk = s * b[src * r + k] as f64;
                let ak = &a[k * row_len..(k + 1) * row_len];
                for (x, &av) in row.iter_mut().zip(ak) {
                    *x += bk * av as f64;
                }
            }
        }
    }
}

/// Apply `edit` to `w0` (row-major, rows of `row_len`), accumulating in f64.
pub fn apply(
    name: &str,
    edit: &TensorEdit,
    w0: Vec<f32>,
    row_len: usize,
    adapter: &PeftAdapter,
) -> Result<Merged, MergeError> {
    let w0 = match &edit.replace {
        Some(key) => adapter.values(key)?.0,
        None => w0,
    };
    let Some(e) = edit.lora.as_ref().or(edit.bias.as_ref()) else {
        return Ok(Merged {
            values: w0.clone(),
            base: w0,
            delta: None,
        });
    };
    let mut acc: Vec<f64> = w0.iter().map(|&x| x as f64).collect();
    let m = &e.module;
    let s = m.scale;
    // A bias has one value per output row; a matrix has rows of `row_len`.
    let rows = if edit.lora.is_some() {
        w0.len() / row_len
    } else {
        w0.len()
    };
    // Source row (HF order) of each destination row.
    let row_src: Vec<usize> = match e.permute_heads {
        Some(h) => lorafold_runtime::arch::qk_permutation(rows, h),
        None => (0..rows).collect(),
    };
    if edit.lora.is_some() {
        let (a, _) = adapter.values(&m.key_a)?;
        let (b, _) = adapter.values(&m.key_b)?;
        let r = m.rank as usize;
        match m.kind {
            ModuleKind::Linear => add_low_rank(&mut acc, &row_src, row_len, &a, &b, r, s),
            ModuleKind::Embedding => {
                // delta = s * (B A)^T: acc[v, d] += s * sum_k B[d, k] * A[k, v]
                let vocab = rows;
                for v in 0..vocab {
                    let row = &mut acc[v * row_len..(v + 1) * row_len];
                    for k in 0..r {
                        let av = s * a[k * vocab + v] as f64;
                        for (d, x) in row.iter_mut().enumerate() {
                            *x += av * b[d * r + k] as f64;
                        }
                    }
                }
            }
        }
        if m.dora {
            let key = m.key_a.replace(".lora_A.weight", ".lora_magnitude_vector");
            // PEFT has saved the magnitude under both names over its versions.
            let key = if adapter.tensors().tensor(&key).is_ok() {
                key
            } else {
                format!("{key}.weight")
            };
            let (mag, _) = adapter.values(&key)?;
            for (o, &src) in row_src.iter().enumerate() {
                let row = &mut acc[o * row_len..(o + 1) * row_len];
                let norm = row.iter().map(|x| x * x).sum::<f64>().sqrt();
                let f = mag[src] as f64 / norm;
                row.iter_mut().for_each(|x| *x *= f);
            }
        }
    } else {
        // A bias edit: acc[o] += s * bias[src(o)]
        let key = m.key_b.replace(".lora_B.weight", ".lora_B.bias");
        let (bias, _) = adapter.values(&key)?;
        for (o, &src) in row_src.iter().enumerate() {
            acc[o] += s * bias[src] as f64;
        }
    }
    let values: Vec<f32> = acc.iter().map(|&x| x as f32).collect();
    check_finite(&values).map_err(|found| MergeError::NonFinite {
        adapter: adapter.tensors_path.display().to_string(),
        tensor: name.into(),
        found,
    })?;
    let delta = values.iter().zip(&w0).map(|(w, b)| w - b).collect();
    Ok(Merged {
        values,
        base: w0,
        delta: Some(delta),
    })
}

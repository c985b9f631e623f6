//! The tensors an output holds, in file order, each with its edit and role.

use super::*;

/// One tensor of an output: the base's (if any) and the adapter's edit (if merging).
pub(super) struct OutTensor<'a> {
    pub(super) name: String,
    pub(super) dims: Vec<u64>,
    pub(super) base: Option<&'a BaseTensor>,
    pub(super) edit: Option<&'a TensorEdit>,
    pub(super) role: TensorRole,
}

/// The output's tensors in file order: the base's, then those the adapter
/// adds; with `merging`, each carries its edit, and every one its role.
pub(super) fn out_tensors<'a>(
    base: &'a BaseModel,
    plan: &'a MergePlan,
    merging: bool,
) -> Vec<OutTensor<'a>> {
    let mut out: Vec<OutTensor> = base
        .tensors
        .iter()
        .map(|t| OutTensor {
            name: t.name.clone(),
            dims: t.dims.clone(),
            base: Some(t),
            edit: plan.edits.get(&t.name).filter(|_| merging),
            role: TensorRole::Other,
        })
        .collect();
    if merging {
        for (name, e) in &plan.edits {
            if let Some(dims) = &e.new_dims {
                out.push(OutTensor {
                    name: name.clone(),
                    dims: dims.clone(),
                    base: None,
                    edit: Some(e),
                    role: TensorRole::Other,
                });
            }
        }
    }
    let has_output = out.iter().any(|t| t.name == names::OUTPUT);
    let n_layers = base.shape.n_layers;
    for t in &mut out {
        t.role = role(&t.name, t.dims.len(), has_output, n_layers);
    }
    out
}

pub(super) fn role(name: &str, n_dims: usize, has_output: bool, n_layers: usize) -> TensorRole {
    if n_dims < 2 {
        return TensorRole::Vector;
    }
    let layer = || {
        name.split('.')
            .nth(1)
            .and_then(|l| l.parse().ok())
            .unwrap_or(0)
    };
    match name {
        names::OUTPUT => TensorRole::Output,
        names::TOKEN_EMBD if !has_output => TensorRole::Output,
        names::TOKEN_EMBD => TensorRole::TokenEmbedding,
        n if n.ends_with(".attn_v.weight") => TensorRole::AttnV {
            layer: layer(),
            n_layers,
        },
        n if n.ends_with(".ffn_down.weight") => TensorRole::FfnDown {
            layer: layer(),
            n_layers,
        },
        _ => TensorRole::Other,
    }
}

// Bases are checked at open to have no 0-dimensional or empty tensor; a
// missing dim still must not panic here.
pub(super) fn row_len(t: &OutTensor) -> usize {
    t.dims.first().map_or(1, |&d| d.max(1) as usize)
}

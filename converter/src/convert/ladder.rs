//! What a drift budget spends bytes by: each tensor's output error at
//! each precision it can take.

use super::*;

/// One precision a tensor can take: its type, its size and its predicted
/// squared output error relative to the output, ‖(Q(W) − W)X‖² / ‖WX‖².
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rung {
    /// The ggml type.
    pub ggml_type: GgmlType,
    /// The tensor's bytes in this type.
    pub bytes: u64,
    /// Predicted relative squared output error.
    pub error2: f64,
}

/// The precisions one merged tensor can take, its policy's type first.
#[derive(Debug, Clone)]
pub struct TensorLadder {
    /// The tensor.
    pub tensor: String,
    /// The policy's type, then each wider one of the ladder, by size.
    pub rungs: Vec<Rung>,
}

/// For every merged tensor of a block type whose input the calibration
/// statistics cover, the output error of its policy type and of each type of
/// `ladder` that is wider and fits its rows, each rounded as `opts` says
/// (the prediction a drift budget spends bytes by); `keep` is given every
/// rounded tensor. Tensors run in parallel; each type's error is one more
/// read of its input's XᵀX.
pub fn predict_ladder(
    opts: &ConvertOptions,
    ladder: &[GgmlType],
    keep: &KeepRounded<'_>,
) -> Result<Vec<TensorLadder>, ConvertError> {
    let Some(calib) = &opts.calib else {
        return Err(ConvertError::Usage(
            "predicting output errors needs calibration statistics".into(),
        ));
    };
    let (base, adapter, plan) = open_inputs(opts)?;
    let out = out_tensors(&base, &plan, true);
    let todo: Vec<(&OutTensor, GgmlType)> = out
        .iter()
        .filter(|t| calib.for_tensor(&t.name).is_some())
        .map(|t| {
            let c = opts.policy.choose(&t.name, t.role, t.dims[0]);
            (t, c.ggml_type)
        })
        .filter(|(_, ty)| quant::BLOCK_TYPES.contains(ty))
        .collect();
    // Each input's GPTQ factor is dropped after its last tensor here too.
    calib.expect_readers(todo.iter().map(|(t, _)| t.name.as_str()));
    // In file order, a few at a time as a conversion goes: statistics made
    // a layer at a time ([`crate::calib::LayerFeed`]) hold one or two
    // layers, and a tensor far ahead would make them start again.
    let batch = rayon::current_num_threads().max(1) * 2;
    let mut ladders = Vec::with_capacity(todo.len());
    for chunk in todo.chunks(batch) {
        ladders.extend(
            chunk
                .par_iter()
                .map(|&(t, policy_type)| {
                    let n: u64 = t.dims.iter().product();
                    let merged = merged_values(t, &base, adapter.as_ref())?;
                    let stats = stats_of(t, opts)?.expect("filtered to covered tensors");
                    let size = |ty: GgmlType| ty.bytes_for(n).unwrap_or(u64::MAX);
                    let mut types = vec![policy_type];
                    types.extend(ladder.iter().copied().filter(|&ty| {
                        size(ty) > size(policy_type) && (t.dims[0] % ty.block_size()) == 0
                    }));
                    types.sort_by_key(|&ty| size(ty));
                    types.dedup();
                    let w = &merged.values;
                    let mut rungs = Vec::with_capacity(types.len());
                    let mut norm2 = None;
                    for ty in types {
                        let bytes = round(t, ty, w, Some(stats), opts)?;
                        let q = quant::dequantize(ty, &bytes, n as usize, &t.name)?;
                        let d: Vec<f32> = q.iter().zip(w).map(|(a, b)| a - b).collect();
                        // ‖WX‖² once per tensor; each rung's error streams alone.
                        let norms = match norm2 {
                            None => output_norms2(stats, &t.name, &[w, &d])?,
                            Some(wn) => vec![wn, output_norms2(stats, &t.name, &[&d])?[0]],
                        };
                        norm2 = Some(norms[0]);
                        keep(&t.name, ty, &bytes, [norms[0], norms[1]]).map_err(|source| {
                            ConvertError::Io {
                                path: PathBuf::from(&t.name),
                                source,
                            }
                        })?;
                        rungs.push(Rung {
                            ggml_type: ty,
                            bytes: bytes.len() as u64,
                            error2: relative2(norms[1], norms[0]),
                        });
                    }
                    stats.reader_done();
                    Ok(TensorLadder {
                        tensor: t.name.clone(),
                        rungs,
                    })
                })
                .collect::<Result<Vec<_>, ConvertError>>()?,
        );
    }
    Ok(ladders)
}

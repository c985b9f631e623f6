//! One tensor merged, rounded and measured.

use super::*;

/// ‖E X‖² for each `E` of `each` (rows of the tensor's width), from its
/// input's statistics.
pub(super) fn output_norms2(
    s: &crate::calib::InputStats,
    tensor: &str,
    each: &[&[f32]],
) -> Result<Vec<f64>, ConvertError> {
    s.output_norms2(each).map_err(|e| {
        quant::QuantError::Codec {
            tensor: tensor.into(),
            problem: format!("output error: {e}"),
        }
        .into()
    })
}

/// An error relative to the output's size (both squared); the error itself
/// when the output is zero.
pub(super) fn relative2(err2: f64, norm2: f64) -> f64 {
    if norm2 > 0.0 {
        err2 / norm2
    } else {
        err2
    }
}

/// Values dequantized at a time to measure a tensor's error.
const MEASURE_RUN: usize = 1 << 16;

/// One tensor, merged, quantized and measured.
pub(super) struct Processed {
    /// The merged tensor's bytes.
    pub(super) bytes: Vec<u8>,
    /// The base tensor's bytes, where they differ from `bytes`.
    pub(super) base_bytes: Option<Vec<u8>>,
    pub(super) report: TensorReport,
    /// The rank-R pair for the rounding error, when compensating.
    pub(super) compensation: Option<StoredPair>,
}

/// W0 + s·B·A for one tensor (W0 alone without an edit), in f32.
pub(super) fn merged_values(
    t: &OutTensor,
    base: &BaseModel,
    adapter: Option<&PeftAdapter>,
) -> Result<merge::Merged, ConvertError> {
    let n: usize = t.dims.iter().product::<u64>() as usize;
    let w0 = match t.base {
        Some(b) => base.values(b)?,
        None => vec![0f32; n],
    };
    Ok(match (t.edit, adapter) {
        (Some(e), Some(a)) => merge::apply(&t.name, e, w0, row_len(t), a)?,
        _ => merge::Merged {
            values: w0,
            base: Vec::new(),
            delta: None,
        },
    })
}

/// The calibration statistics of a tensor's input, checked to be as wide as
/// its rows.
pub(super) fn stats_of<'o>(
    t: &OutTensor,
    opts: &'o ConvertOptions,
) -> Result<Option<&'o crate::calib::InputStats>, ConvertError> {
    let stats = opts.calib.as_deref().and_then(|c| c.for_tensor(&t.name));
    match stats {
        Some(s) if s.k != row_len(t) => Err(quant::QuantError::Codec {
            tensor: t.name.clone(),
            problem: format!(
                "the calibration statistics of its input are {} wide, the tensor's rows {}: statistics of another model",
                s.k,
                row_len(t)
            ),
        }
        .into()),
        s => Ok(s),
    }
}

/// ", with the statistics of FILE" for errors the calibration statistics cause
/// (GPTQ's and compensation's factorisations).
pub(super) fn calibration_source(opts: &ConvertOptions) -> String {
    match opts.calib.as_ref().and_then(|c| c.source.as_ref()) {
        Some(p) => format!(", with the statistics of {}", p.display()),
        None => String::new(),
    }
}

/// Whether a tensor of `ggml_type` whose input has statistics takes the
/// chosen rounding rather than ggml's nearest.
pub(super) fn is_chosen(ggml_type: GgmlType, opts: &ConvertOptions) -> bool {
    opts.rounding != Rounding::Nearest && quant::BLOCK_TYPES.contains(&ggml_type)
}

/// `values` quantized to `ggml_type` by the chosen rounding where `stats`
/// cover the input, by ggml's quantizer elsewhere.
pub(super) fn round(
    t: &OutTensor,
    ggml_type: GgmlType,
    values: &[f32],
    stats: Option<&crate::calib::InputStats>,
    opts: &ConvertOptions,
) -> Result<Vec<u8>, ConvertError> {
    let bad = |e: crate::round::gptq::GptqError| quant::QuantError::Codec {
        tensor: t.name.clone(),
        problem: format!("{e}{}", calibration_source(opts)),
    };
    let rows = values.len() / row_len(t);
    let importance = |s: &crate::calib::InputStats| {
        s.importance().map_err(|e| quant::QuantError::Codec {
            tensor: t.name.clone(),
            problem: format!("{e}{}", calibration_source(opts)),
        })
    };
    // Tensors whose input no statistics cover (embeddings, the output
    // head) and float or nearest tensors take ggml's quantizer.
    Ok(match stats.filter(|_| is_chosen(ggml_type, opts)) {
        None => quant::quantize(ggml_type, values, &t.name)?,
        Some(s) if opts.rounding == Rounding::Imatrix => {
            crate::round::importance::importance_round(ggml_type, values, rows, &importance(s)?, &t.name)?
        }
        Some(s) if s.has_matrix() => {
            let f = s.gptq_factor(opts.damp, opts.act_order).map_err(bad)?;
            // Block scales searched with the diagonal's weights, as imatrix
            // rounding does (SmolLM2 + pirate at q4_0, natural order, when
            // introduced: KL 0.114 -> 0.090 against ggml's nearest scales).
            let imp = importance(s)?;
            crate::round::gptq::gptq(ggml_type, values, rows, &f, Some(&imp), &t.name).map_err(bad)?
        }
        Some(_) => {
            return Err(quant::QuantError::Codec {
                tensor: t.name.clone(),
                problem: "GPTQ needs the whole XᵀX of its input; these statistics hold only its diagonal (an imatrix): use imatrix rounding".into(),
            }
            .into())
        }
    })
}

/// Merge, quantize and measure one tensor.
pub(super) fn process(
    t: &OutTensor,
    choice: &quant::TypeChoice,
    base: &BaseModel,
    adapter: Option<&PeftAdapter>,
    opts: &ConvertOptions,
) -> Result<Processed, ConvertError> {
    let ggml_type = choice.ggml_type;
    let n: usize = t.dims.iter().product::<u64>() as usize;
    let merged = merged_values(t, base, adapter)?;
    let stats = stats_of(t, opts)?;
    let (bytes, known_norms2) = match opts
        .rounded
        .as_ref()
        .and_then(|r| (r.0)(&t.name, ggml_type))
    {
        Some(r) => (r.bytes, Some(r.output_norms2)),
        None => (round(t, ggml_type, &merged.values, stats, opts)?, None),
    };
    if let Some(s) = stats {
        s.reader_done();
    }
    let mut base_bytes = None;
    if merged.delta.is_some()
        || (merged.base.len() == n && t.edit.is_some_and(|e| e.replace.is_some()))
    {
        // The base file keeps the base's tensor (a saved tensor may have
        // replaced it in the merge); a delta's retention is measured on it.
        base_bytes = Some(quant::quantize(ggml_type, &merged.base, &t.name)?);
    }
    let linear = t.dims.len() == 2
        && t.edit.is_some_and(|e| {
            e.lora
                .as_ref()
                .is_some_and(|l| l.module.kind == ModuleKind::Linear)
        });
    let compensating = opts.compensate.is_some() && linear;
    let keep_whole = stats.is_some() || compensating;
    let (sums, qw) = measure(
        t,
        ggml_type,
        &merged,
        &bytes,
        base_bytes.as_deref(),
        keep_whole,
    )?;
    let mut report = TensorReport::from_sums(
        &t.name,
        ggml_type.name().to_string(),
        choice.fallback.clone(),
        bytes.len() as u64,
        &sums,
    );
    let compensation = match &opts.compensate {
        Some(c) if compensating => Some(compensate(t, c, &merged.values, &qw, stats, opts)?),
        _ => None,
    };
    if let Some(s) = stats {
        let rounded = Rounded {
            w: &merged.values,
            qw: &qw,
            known_norms2,
            chosen: is_chosen(ggml_type, opts),
        };
        output_errors(
            t,
            ggml_type,
            s,
            &rounded,
            compensation.as_ref(),
            &mut report,
        )?;
    }
    Ok(Processed {
        bytes,
        base_bytes,
        report,
        compensation,
    })
}

/// The error sums of `bytes` against the merge, a run of rows at a time,
/// and (with `keep_whole`) the whole dequantized tensor: a whole copy (the
/// token embedding's: 113 MB in f32 for SmolLM2) is kept only for what
/// needs it.
fn measure(
    t: &OutTensor,
    ggml_type: GgmlType,
    merged: &merge::Merged,
    bytes: &[u8],
    base_bytes: Option<&[u8]>,
    keep_whole: bool,
) -> Result<(ErrorSums, Vec<f32>), ConvertError> {
    let n = merged.values.len();
    let mut whole = Vec::with_capacity(if keep_whole { n } else { 0 });
    let mut sums = ErrorSums::default();
    let k = row_len(t);
    let rows = n / k;
    let row_bytes = bytes.len() / rows.max(1);
    let run = (MEASURE_RUN / k).max(1);
    for r0 in (0..rows).step_by(run) {
        let r1 = (r0 + run).min(rows);
        let (vals, bs) = (r0 * k..r1 * k, r0 * row_bytes..r1 * row_bytes);
        let qw = quant::dequantize(ggml_type, &bytes[bs.clone()], vals.len(), &t.name)?;
        let q_w0 = match (&merged.delta, base_bytes) {
            (Some(_), Some(b)) => Some(quant::dequantize(ggml_type, &b[bs], vals.len(), &t.name)?),
            _ => None,
        };
        let changed = merged
            .delta
            .as_ref()
            .zip(q_w0.as_ref())
            .map(|(dw, q)| (&merged.base[vals.clone()], q.as_slice(), &dw[vals.clone()]));
        sums.add(&merged.values[vals.clone()], &qw, changed);
        if keep_whole {
            whole.extend_from_slice(&qw);
        }
    }
    Ok((sums, whole))
}

/// The rank-R pair approximating `w - qw`, as stored in the compensation
/// adapter (measured as stored: the report claims what the file gives).
fn compensate(
    t: &OutTensor,
    c: &Compensate,
    w: &[f32],
    qw: &[f32],
    stats: Option<&crate::calib::InputStats>,
    opts: &ConvertOptions,
) -> Result<StoredPair, ConvertError> {
    let residual: Vec<f32> = w.iter().zip(qw).map(|(a, q)| a - q).collect();
    let failed = |e: &dyn std::fmt::Display| quant::QuantError::Codec {
        tensor: t.name.clone(),
        problem: format!("compensation: {e}{}", calibration_source(opts)),
    };
    let h = match stats.filter(|s| s.has_matrix()) {
        Some(s) => Some(s.xtx().map_err(|e| failed(&e))?),
        None => None,
    };
    let k = row_len(t);
    let lr = crate::round::compensate::low_rank(
        &residual,
        w.len() / k,
        k,
        c.rank,
        h.as_deref(),
        opts.damp,
    )
    .map_err(|e| failed(&e))?;
    Ok(lr
        .store(opts.adapter_type, c.rank as f32, &t.name)
        .map_err(|e| failed(&e))?)
}

/// A tensor and its rounding, for its output errors.
struct Rounded<'a> {
    /// The merged values.
    w: &'a [f32],
    /// Their rounding, dequantized.
    qw: &'a [f32],
    /// ‖WX‖² and ‖(Q(W) − W)X‖², when a budget's prediction measured them.
    known_norms2: Option<[f64; 2]>,
    /// Whether a rounding other than ggml's nearest made `qw`.
    chosen: bool,
}

/// Fill in the report's output errors (as rounded, nearest, compensated),
/// every one from one read of the input's XᵀX.
fn output_errors(
    t: &OutTensor,
    ggml_type: GgmlType,
    s: &crate::calib::InputStats,
    r: &Rounded,
    compensation: Option<&StoredPair>,
    report: &mut TensorReport,
) -> Result<(), ConvertError> {
    let (w, n) = (r.w, r.w.len());
    let diff = |q: &[f32]| -> Vec<f32> { q.iter().zip(w).map(|(a, b)| a - b).collect() };
    let mut deltas = vec![diff(r.qw)];
    let nearest_at = if r.chosen {
        let near = quant::quantize(ggml_type, w, &t.name)?;
        deltas.push(diff(&quant::dequantize(ggml_type, &near, n, &t.name)?));
        Some(deltas.len())
    } else {
        None
    };
    let compensated_at = compensation.map(|p| {
        deltas.push(compensated_error(row_len(t), &p.applied, r.qw, w));
        deltas.len()
    });
    // A budget round's tensors were measured by the prediction: only
    // the comparisons (nearest, compensated) are multiplied out here.
    let norms = match r.known_norms2 {
        Some(known) => {
            let rest: Vec<&[f32]> = deltas[1..].iter().map(Vec::as_slice).collect();
            let mut norms = known.to_vec();
            if !rest.is_empty() {
                norms.extend(output_norms2(s, &t.name, &rest)?);
            }
            norms
        }
        None => {
            let mut each: Vec<&[f32]> = vec![w];
            each.extend(deltas.iter().map(Vec::as_slice));
            output_norms2(s, &t.name, &each)?
        }
    };
    let rel = |i: usize| relative2(norms[i], norms[0]).sqrt();
    report.output_error = Some(rel(1));
    report.output_error_nearest = nearest_at.map(rel);
    report.output_error_compensated = compensated_at.map(rel);
    Ok(())
}

/// Q(W) + B·A − W: what is left once the compensation pair is added back.
fn compensated_error(
    k: usize,
    lr: &crate::round::compensate::LowRank,
    qw: &[f32],
    w: &[f32],
) -> Vec<f32> {
    let mut left = vec![0f32; w.len()];
    for (r, row) in left.chunks_exact_mut(k).enumerate() {
        for (c, a) in lr.a.chunks_exact(k).enumerate() {
            let b = lr.b[r * lr.rank + c];
            row.iter_mut().zip(a).for_each(|(x, &a)| *x += b * a);
        }
        let i = r * k;
        for (j, x) in row.iter_mut().enumerate() {
            *x = qw[i + j] + *x - w[i + j];
        }
    }
    left
}

//! Tensors the adapter leaves alone, made without a whole f32 copy: copied
//! as stored when the type asked for is the type stored, otherwise rounded
//! a run of rows at a time on every core. At 7B the token embedding alone
//! is 2.2 GB in f32, and a batch of whole tensors held several such copies.

use super::*;

/// Values rounded per run of rows (whole rows, at least one): a few
/// milliseconds of work, so a window of runs keeps every core busy.
const ROW_RUN_VALUES: usize = 1 << 18;

/// Bytes written per part when a tensor is copied.
const COPY_PART: usize = 16 << 20;

/// Runs in flight per thread: bounds memory to a few MB per core.
const RUNS_PER_THREAD: usize = 4;

/// How an output tensor is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Making {
    /// Its stored bytes, copied.
    Copy,
    /// Rounded a run of rows at a time.
    Rows,
    /// Merged, rounded and measured whole: adapted tensors, tensors whose
    /// input has calibration statistics, HF bases.
    Whole,
}

impl Making {
    /// How `t`, to be written as `ty`, is made.
    pub(super) fn of(
        t: &OutTensor,
        ty: GgmlType,
        base: &BaseModel,
        opts: &ConvertOptions,
    ) -> Making {
        let Some(b) = t.base.filter(|_| t.edit.is_none()) else {
            return Making::Whole;
        };
        match (base.stored(b), base.row_bytes(b)) {
            // Rounding again what is already in the type asked for can only
            // lose: the stored codes are the nearest to themselves.
            (Some((stored, _)), Some(_)) if stored == ty => Making::Copy,
            (Some(_), Some(_)) if stats_of(t, opts).ok().flatten().is_none() => Making::Rows,
            _ => Making::Whole,
        }
    }
}

/// The outputs tensors are written to: the merged model, the base alone.
pub(super) struct Sinks {
    /// The merged output.
    pub(super) merged: Option<GgufStream>,
    /// The quantized base (the separate path).
    pub(super) base: Option<GgufStream>,
}

impl Sinks {
    /// Write the next part of `t` to every output that holds it.
    fn write_part(&mut self, t: &OutTensor, bytes: &[u8]) -> Result<(), WriteError> {
        if let Some(s) = self.merged.as_mut() {
            s.write_part(&t.name, bytes)?;
        }
        if let (Some(s), true) = (self.base.as_mut(), t.base.is_some()) {
            s.write_part(&t.name, bytes)?;
        }
        Ok(())
    }

    /// Write a tensor made whole: the merged bytes, and the base's where
    /// they differ.
    pub(super) fn write(&mut self, t: &OutTensor, p: &Processed) -> Result<(), WriteError> {
        if let Some(s) = self.merged.as_mut() {
            s.write_tensor(&t.name, &p.bytes)?;
        }
        if let (Some(s), true) = (self.base.as_mut(), t.base.is_some()) {
            s.write_tensor(&t.name, p.base_bytes.as_ref().unwrap_or(&p.bytes))?;
        }
        Ok(())
    }
}

/// Write `t` (made as [`Making::Copy`] or [`Making::Rows`]) as `ty` to
/// `sinks`; its report.
pub(super) fn stream_tensor(
    t: &OutTensor,
    choice: &quant::TypeChoice,
    making: Making,
    base: &BaseModel,
    opts: &ConvertOptions,
    sinks: &mut Sinks,
) -> Result<TensorReport, ConvertError> {
    let b = t.base.expect("streamed tensors are the base's");
    let n = b.n_elements();
    let sums = match making {
        Making::Copy => copy_rows(t, base, sinks)?,
        _ => round_rows(t, choice.ggml_type, base, sinks)?,
    };
    let bytes = choice
        .ggml_type
        .bytes_for(n as u64)
        .expect("declared in the output");
    let mut report = TensorReport::from_sums(
        &t.name,
        choice.ggml_type.name().to_string(),
        choice.fallback.clone(),
        bytes,
        &sums,
    );
    report.copied = making == Making::Copy;
    if let Some(s) = stats_of(t, opts)? {
        // Only copies reach here with statistics: their output is exact.
        report.output_error = Some(0.0);
        s.reader_done();
    }
    Ok(report)
}

/// Copy `t`'s stored bytes in parts of whole rows, releasing each from the
/// mapping once written.
fn copy_rows(
    t: &OutTensor,
    base: &BaseModel,
    sinks: &mut Sinks,
) -> Result<ErrorSums, ConvertError> {
    let b = t.base.expect("streamed tensors are the base's");
    let row = base.row_bytes(b).expect("rows checked").max(1);
    let rows = b.n_elements() / row_len(t);
    let per = (COPY_PART / row).max(1);
    for r0 in (0..rows).step_by(per) {
        let part = base
            .stored_rows(b, r0..(r0 + per).min(rows))
            .expect("rows checked")?;
        sinks.write_part(t, part)?;
        crate::read::base::release_mapped(part);
    }
    Ok(ErrorSums::exact(b.n_elements() as u64))
}

/// Round `t` to `ty` a run of rows at a time, runs in parallel and written
/// in order; the error sums of all runs.
fn round_rows(
    t: &OutTensor,
    ty: GgmlType,
    base: &BaseModel,
    sinks: &mut Sinks,
) -> Result<ErrorSums, ConvertError> {
    let b = t.base.expect("streamed tensors are the base's");
    let k = row_len(t);
    let rows = b.n_elements() / k;
    let run = (ROW_RUN_VALUES / k).max(1);
    let starts: Vec<usize> = (0..rows).step_by(run).collect();
    let window = rayon::current_num_threads().max(1) * RUNS_PER_THREAD;
    let mut sums = ErrorSums::default();
    for starts in starts.chunks(window) {
        let runs: Vec<Result<(Vec<u8>, ErrorSums), ConvertError>> = starts
            .par_iter()
            .map(|&r0| {
                let values = base
                    .row_values(b, r0..(r0 + run).min(rows))
                    .expect("rows checked")?;
                let bytes = quant::quantize(ty, &values, &t.name)?;
                let q = quant::dequantize(ty, &bytes, values.len(), &t.name)?;
                let mut s = ErrorSums::default();
                s.add(&values, &q, None);
                Ok((bytes, s))
            })
            .collect();
        for r in runs {
            let (bytes, s) = r?;
            sinks.write_part(t, &bytes)?;
            sums.merge(&s);
        }
    }
    Ok(sums)
}

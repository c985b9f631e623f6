//! Declaring the output GGUFs: the model files and the compensation adapter.

use super::*;

/// Declare a model GGUF (the base's metadata, our provenance, the tensors) and
/// start its stream.
pub(super) fn start_model<'a>(
    path: &Path,
    base: &BaseModel,
    opts: &ConvertOptions,
    provenance: &[(String, MetadataValue<'static>)],
    tensors: impl Iterator<Item = (&'a OutTensor<'a>, &'a quant::TypeChoice)>,
) -> Result<GgufStream, ConvertError> {
    let mut w = GgufWriter::new(path);
    for (k, v) in base.metadata() {
        if k.starts_with("lorafold.")
            || matches!(
                k.as_str(),
                names::FILE_TYPE | names::QUANTIZATION_VERSION | names::ALIGNMENT
            )
        {
            continue;
        }
        w.add_metadata(&k, &v)?;
    }
    w.add_metadata(
        names::FILE_TYPE,
        &MetadataValue::U32(opts.policy.file_type()),
    )?;
    w.add_metadata(names::QUANTIZATION_VERSION, &MetadataValue::U32(2))?;
    for (k, v) in provenance {
        w.add_metadata(k, v)?;
    }
    for (t, c) in tensors {
        w.add_tensor(&t.name, c.ggml_type, &t.dims)?;
    }
    Ok(w.start()?)
}

/// Declare the compensation adapter (llama.cpp's LoRA layout, scale 1 for
/// every pair: alpha = rank, B scaled where a tensor's rank is lower) and
/// start its stream.
pub(super) fn start_compensation(
    c: &Compensate,
    base: &BaseModel,
    opts: &ConvertOptions,
    provenance: &[(String, MetadataValue<'static>)],
    pairs: &[(String, StoredPair)],
) -> Result<GgufStream, ConvertError> {
    let alpha = c.rank as f32;
    let mut w = crate::write::adapter_gguf::lora_writer(&c.output, base.arch.gguf_name(), alpha)?;
    w.add_metadata(
        "lorafold.compensation",
        &MetadataValue::string(format!(
            "rank-{} approximation of W - Q(W) of each adapted module{}; add to the merged file at scale 1",
            c.rank,
            if opts.calib.is_some() {
                format!(", nearest in the output norm of the calibration's XᵀX damped by {}", opts.damp)
            } else {
                String::new()
            }
        )),
    )?;
    for (k, v) in provenance {
        w.add_metadata(k, v)?;
    }
    let ty = opts.adapter_type;
    for (name, p) in pairs {
        let lr = &p.applied;
        let k = (lr.a.len() / lr.rank.max(1)) as u64;
        let rows = (lr.b.len() / lr.rank.max(1)) as u64;
        w.add_tensor(&names::lora_a(name), ty, &[k, lr.rank as u64])?;
        w.add_tensor(&names::lora_b(name), ty, &[lr.rank as u64, rows])?;
    }
    let mut stream = w.start()?;
    for (name, p) in pairs {
        stream.write_tensor(&names::lora_a(name), &p.a)?;
        stream.write_tensor(&names::lora_b(name), &p.b)?;
    }
    Ok(stream)
}

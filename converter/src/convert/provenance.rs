//! What an output records of its inputs and options, and the inputs'
//! hashes computed beside the conversion.

use super::*;

/// The sha256 of a file's bytes, in hex.
pub fn sha256_file(path: &Path) -> Result<String, ConvertError> {
    sha256_of(path).map_err(|source| ConvertError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The inputs' sha256, computed on a thread beside the conversion (one
/// read of each input, overlapping the work instead of preceding it: 13%
/// of a SmolLM2 f32 conversion's time); the headers carry placeholders of
/// the same length until then.
pub(super) struct PendingHashes {
    files: Vec<PathBuf>,
    job: std::thread::JoinHandle<Vec<std::io::Result<String>>>,
}

impl PendingHashes {
    fn start(files: Vec<PathBuf>) -> PendingHashes {
        let todo = files.clone();
        let job = std::thread::spawn(move || todo.iter().map(|f| sha256_of(f)).collect());
        PendingHashes { files, job }
    }

    /// The stand-in for the `i`th file's hash: 64 characters, like a hash.
    fn placeholder(i: usize) -> String {
        format!("{:#<64}", format!("lorafold-sha256-pending-{i}-"))
    }

    /// Wait for the hashes and write them over their placeholders.
    pub(super) fn finish(self, streams: &mut [&mut GgufStream]) -> Result<(), ConvertError> {
        let hashes = self.job.join().unwrap_or_else(|_| {
            (0..self.files.len())
                .map(|_| Err(std::io::Error::other("the hashing thread panicked")))
                .collect()
        });
        for (i, (h, path)) in hashes.into_iter().zip(&self.files).enumerate() {
            let h = h.map_err(|source| ConvertError::Io {
                path: path.clone(),
                source,
            })?;
            for s in streams.iter_mut() {
                s.patch(&PendingHashes::placeholder(i), &h)?;
            }
        }
        Ok(())
    }
}

/// lorafold.* keys: where the output came from and how it was made. Only
/// inputs and options go in (no paths or times), so outputs are reproducible.
/// The inputs' sha256 are placeholders until [`PendingHashes::finish`].
pub(super) fn provenance(
    opts: &ConvertOptions,
    base: &BaseModel,
    adapter: Option<&PeftAdapter>,
) -> Result<(Vec<(String, MetadataValue<'static>)>, PendingHashes), ConvertError> {
    let mut md = vec![(
        "lorafold.version".to_string(),
        MetadataValue::string(VERSION),
    )];
    let base_files = input_files(&base.path);
    let mut files = Vec::new();
    let mut hashed = |f: PathBuf, shown: &str| {
        let line = format!("{}  {shown}", PendingHashes::placeholder(files.len()));
        files.push(f);
        line
    };
    let hashes: Vec<String> = base_files
        .iter()
        .map(|f| {
            hashed(
                f.clone(),
                &f.file_name().unwrap_or_default().to_string_lossy(),
            )
        })
        .collect();
    md.push((
        "lorafold.base.sha256".into(),
        MetadataValue::string_array(hashes),
    ));
    if let Some(a) = adapter {
        let cfg = a.dir.join("adapter_config.json");
        md.push((
            "lorafold.adapter.sha256".into(),
            MetadataValue::string_array([
                hashed(cfg, "adapter_config.json"),
                hashed(a.tensors_path.clone(), "adapter_model.safetensors"),
            ]),
        ));
        let config_json = serde_json::to_string(&a.config).unwrap_or_default();
        md.push((
            "lorafold.adapter.config".into(),
            MetadataValue::string(config_json),
        ));
        md.push((
            "lorafold.adapter.scales".into(),
            MetadataValue::string_array(
                a.modules.iter().map(|m| format!("{}={}", m.path, m.scale)),
            ),
        ));
        md.push((
            "lorafold.merge.precision".into(),
            MetadataValue::string("f64 accumulation, rounded once"),
        ));
    }
    md.push((
        "lorafold.quant.policy".into(),
        MetadataValue::string(serde_json::to_string(&opts.policy).unwrap_or_default()),
    ));
    if opts.calib.is_some() {
        let how = match opts.rounding {
            Rounding::Nearest => "nearest".to_string(),
            Rounding::Imatrix => "imatrix: block scales searched for the least error weighted by each input's mean square, for block-quantized tensors whose input has calibration statistics; nearest for the rest".to_string(),
            Rounding::Gptq => format!("gptq{}: error feedback through XᵀX damped by {} of its mean diagonal, block scales searched as imatrix rounding does, for block-quantized tensors whose input has calibration statistics; nearest for the rest", if opts.act_order { " (act order, static block scales)" } else { "" }, opts.damp),
        };
        md.push(("lorafold.rounding".into(), MetadataValue::string(how)));
    }
    if let Some(b) = &opts.budget {
        md.push((
            "lorafold.budget".into(),
            MetadataValue::string(format!(
                "{b} over the calibration text, measured against the f32 merged model; the types chosen are lorafold.quant.policy's overrides"
            )),
        ));
    }
    if let Some(c) = opts
        .calib
        .as_ref()
        .filter(|_| opts.rounding != Rounding::Nearest)
    {
        md.push((
            "lorafold.calibration.tokens".into(),
            MetadataValue::U64(c.tokens),
        ));
        if let Some(h) = &c.source_sha256 {
            md.push((
                "lorafold.calibration.sha256".into(),
                MetadataValue::string(h.clone()),
            ));
        }
    }
    Ok((md, PendingHashes::start(files)))
}

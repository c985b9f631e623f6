//! The f32 models a text is run through when the converter calibrates or
//! checks a drift budget itself: W0 + s·B·A written once, unrounded, to a
//! temporary folder beside the output (removed on drop).

use std::path::{Path, PathBuf};

use crate::convert::{convert, ConvertError, ConvertOptions};
use crate::quant::QuantPolicy;

/// The f32 merged model (and, when asked, the f32 base alone).
#[derive(Debug)]
pub struct F32Reference {
    // Held for its drop, which removes the folder.
    _dir: tempfile::TempDir,
    /// W0 + s·B·A in f32.
    pub merged: PathBuf,
    /// W0 in f32, when written.
    pub base: Option<PathBuf>,
}

impl F32Reference {
    /// Write the f32 merged model of `base` + `adapter` (and the f32 base
    /// with `with_base`) into a temporary folder in `beside`.
    pub fn write(
        base: &Path,
        adapter: Option<&Path>,
        beside: &Path,
        with_base: bool,
    ) -> Result<F32Reference, ConvertError> {
        let dir = tempfile::Builder::new()
            .prefix(".lorafold-f32")
            .tempdir_in(beside)
            .map_err(|source| ConvertError::Io {
                path: beside.to_path_buf(),
                source,
            })?;
        let f32 = || QuantPolicy::parse("f32", &[]).expect("f32 is a type");
        let merged = dir.path().join("merged-f32.gguf");
        let quiet = |_: &crate::convert::ProgressStep| {};
        convert(
            &ConvertOptions::new(base, adapter.map(Path::to_path_buf), f32(), &merged),
            &quiet,
        )?;
        let base_path = if with_base {
            let p = dir.path().join("base-f32.gguf");
            convert(&ConvertOptions::new(base, None, f32(), &p), &quiet)?;
            Some(p)
        } else {
            None
        };
        Ok(F32Reference {
            _dir: dir,
            merged,
            base: base_path,
        })
    }
}

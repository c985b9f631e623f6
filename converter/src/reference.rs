//! The f32 models a text is run through when the converter calibrates or
//! checks a drift budget itself: W0 + s·B·A written once, unrounded, to a
//! work folder beside the output ([`WorkFolder`]: removed on drop, on a
//! signal, or by a later run once this one is gone).

use std::path::{Path, PathBuf};

use candle_core::Device;
use lorafold_runtime::model::Model;

use crate::calib::{CalibStats, LayerProgress};
use crate::convert::{convert, sha256_file, ConvertError, ConvertOptions};
use crate::round::quant::QuantPolicy;
use crate::write::output::WorkFolder;

/// Tokens per window when a text is not split by lines (`lorafold calibrate`'s default).
pub const DEFAULT_CTX: usize = 128;

/// The f32 merged model (and, when asked, the f32 base alone).
#[derive(Debug)]
pub struct F32Reference {
    // Held for its drop, which removes the folder.
    _dir: WorkFolder,
    /// W0 + s·B·A in f32.
    pub merged: PathBuf,
    /// W0 in f32, when written.
    pub base: Option<PathBuf>,
}

impl F32Reference {
    /// Write the f32 merged model of `base` + `adapter` (and the f32 base
    /// with `with_base`) into a work folder beside `output` (the file the
    /// command makes, whose partial the folder is).
    pub fn write(
        base: &Path,
        adapter: Option<&Path>,
        output: &Path,
        with_base: bool,
    ) -> Result<F32Reference, ConvertError> {
        let dir = WorkFolder::new(output)?;
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

/// What calibrating on a text inside a conversion makes: the statistics, the
/// f32 models they were taken from (kept for a drift budget) and the text's
/// windows (one per line).
#[derive(Debug)]
pub struct TextCalibration {
    /// XᵀX of the f32 merged model over the text, with the text's sha256.
    pub stats: CalibStats,
    /// The f32 merged (and base) model.
    pub reference: F32Reference,
    /// The text's token windows, one per non-empty line.
    pub windows: Vec<Vec<u32>>,
}

impl TextCalibration {
    /// Write the f32 reference of `base` + `adapter` beside `output` (with
    /// the f32 base when `with_base`) and start its statistics over the text
    /// in `text`, a window per line: made a layer at a time as the conversion
    /// reaches each layer ([`CalibStats::streamed`]), `progress` told as each
    /// is ready.
    pub fn over_text(
        base: &Path,
        adapter: Option<&Path>,
        text: &Path,
        output: &Path,
        with_base: bool,
        progress: LayerProgress,
    ) -> Result<TextCalibration, ConvertError> {
        let words = lorafold_runtime::text::read_text(text)?;
        // Refused before the f32 model is written: at 7B that is 30 GB.
        let opened = crate::read::base::BaseModel::open(base)?;
        let inputs = opened.tensors.iter().filter(|t| {
            [
                "blk.0.attn_q.weight",
                "blk.0.attn_output.weight",
                "blk.0.ffn_up.weight",
                "blk.0.ffn_down.weight",
            ]
            .contains(&t.name.as_str())
        });
        crate::calib::check_layer_fits(base, inputs.map(|t| t.dims[0] as usize), 0)?;
        drop(opened);
        let reference = F32Reference::write(base, adapter, output, with_base)?;
        let measure = |path: &Path, problem: String| ConvertError::Measure {
            path: path.to_path_buf(),
            problem,
        };
        let model = Model::load(&reference.merged, &Device::Cpu)
            .map_err(|e| measure(&reference.merged, e.to_string()))?;
        let tok = model
            .tokenizer()
            .map_err(|e| measure(&reference.merged, e.to_string()))?;
        let windows = lorafold_runtime::measure::windows(&tok, &words, true, DEFAULT_CTX)
            .map_err(|e| measure(text, e.to_string()))?;
        let mut stats = CalibStats::streamed(model, windows.clone(), progress)
            .map_err(|e| measure(text, e.to_string()))?;
        stats.source_sha256 = Some(sha256_file(text)?);
        stats.source = Some(text.to_path_buf());
        Ok(TextCalibration {
            stats,
            reference,
            windows,
        })
    }
}

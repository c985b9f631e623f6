//! A drift budget: tensors moved up a ladder of wider types, most predicted
//! output error removed per added byte first, until the drift of the
//! written file, measured over the calibration text, is within the budget.
//!
//! The prediction is each tensor's ‖(Q(W) − W)X‖² / ‖WX‖² from the
//! calibration statistics ([`crate::convert::predict_ladder`]); the model
//! from it to drift is fitted to measurements of the files themselves
//! (drift ≈ κ · Σ error, then a line through the last two rounds), so what
//! is promised is what was measured, not what was predicted.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::Device;
use lorafold_runtime::gguf::GgmlType;
use lorafold_runtime::measure::{
    check_vocabulary, drift_from_logits, layered_logits, mean_nll, DriftReport,
};
use lorafold_runtime::model::Model;
use lorafold_runtime::number::compact;

use crate::convert::{
    convert, predict_ladder, Compensate, ConvertError, ConvertOptions, Progress, RoundedTensor,
    RoundedTensors, TensorLadder,
};
use crate::report::{BudgetReport, BudgetRound, ConvertReport};

/// What the budget bounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DriftTarget {
    /// Mean KL divergence from the f32 merged model, nats per token.
    KlMean(f64),
    /// The least share of the adapter's gain (loss drop of the f32 merged
    /// model below the base's) the file keeps on the text.
    MinGain(f64),
}

impl DriftTarget {
    /// The measured quantity kept at or below [`DriftTarget::limit`].
    fn value(self, d: &DriftReport) -> f64 {
        match self {
            DriftTarget::KlMean(_) => d.kl_mean,
            DriftTarget::MinGain(_) => 1.0 - d.gain_retained.unwrap_or(f64::NEG_INFINITY),
        }
    }

    fn limit(self) -> f64 {
        match self {
            DriftTarget::KlMean(x) => x,
            DriftTarget::MinGain(y) => 1.0 - y,
        }
    }

    /// Whether measuring needs the base without the adapter.
    pub fn needs_base(self) -> bool {
        matches!(self, DriftTarget::MinGain(_))
    }

    /// How the target reads in reports and provenance.
    pub fn describe(self) -> String {
        match self {
            DriftTarget::KlMean(x) => format!("mean KL <= {}", compact(x)),
            DriftTarget::MinGain(y) => format!("gain retained >= {}", compact(y)),
        }
    }
}

/// The types a tensor may move up to, widest last: llama.cpp's K-quant
/// ladder with the legacy types that fit rows K-quants don't (256 weights).
pub const DEFAULT_LADDER: [GgmlType; 7] = [
    GgmlType::Q4_K,
    GgmlType::Q5_0,
    GgmlType::Q5_K,
    GgmlType::Q5_1,
    GgmlType::Q6_K,
    GgmlType::Q8_0,
    GgmlType::F16,
];

/// A drift budget and how to check it.
#[derive(Debug, Clone)]
pub struct DriftBudget {
    /// The bound.
    pub target: DriftTarget,
    /// Types a tensor may move up to.
    pub ladder: Vec<GgmlType>,
    /// Token windows of the text drift is measured over.
    pub windows: Vec<Vec<u32>>,
    /// The f32 merged model (the reference).
    pub reference: PathBuf,
    /// The f32 base without the adapter ([`DriftTarget::MinGain`] only).
    pub base_reference: Option<PathBuf>,
    /// Files written and measured at most.
    pub max_rounds: usize,
}

/// Every rung's bytes from the prediction, in a file in the budget's
/// temporary folder (a model's rungs together are several times its size),
/// so that the rounds write files without rounding again.
struct RungCache {
    file: Mutex<(File, RungIndex)>,
}

/// (tensor, type) -> (offset, length) in the cache file, and the rung's
/// [‖WX‖², ‖(Q(W) − W)X‖²].
type RungIndex = HashMap<(String, GgmlType), (u64, usize, [f64; 2])>;

impl RungCache {
    fn new(path: &Path) -> std::io::Result<RungCache> {
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        Ok(RungCache {
            file: Mutex::new((file, HashMap::new())),
        })
    }

    fn keep(
        &self,
        name: &str,
        ty: GgmlType,
        bytes: &[u8],
        norms2: [f64; 2],
    ) -> std::io::Result<()> {
        let mut guard = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let (file, index) = &mut *guard;
        let at = file.seek(SeekFrom::End(0))?;
        file.write_all(bytes)?;
        index.insert((name.to_string(), ty), (at, bytes.len(), norms2));
        Ok(())
    }

    fn get(&self, name: &str, ty: GgmlType) -> Option<RoundedTensor> {
        let mut guard = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let (file, index) = &mut *guard;
        let &(at, len, output_norms2) = index.get(&(name.to_string(), ty))?;
        let mut bytes = vec![0u8; len];
        // A failed read rounds again: the bytes are the same.
        file.seek(SeekFrom::Start(at)).ok()?;
        file.read_exact(&mut bytes).ok()?;
        Some(RoundedTensor {
            bytes,
            output_norms2,
        })
    }
}

/// Rung index per tensor: from the policy's types, moves that remove the
/// most predicted error per added byte until the sum is at most `target`
/// (or no move is left).
pub fn plan_upgrades(ladders: &[TensorLadder], target: f64) -> Vec<usize> {
    let mut at = vec![0usize; ladders.len()];
    let mut total: f64 = ladders.iter().map(|l| l.rungs[0].error2).sum();
    while total > target {
        // The best move of each tensor, then the best of all; ties go to
        // the earlier tensor, so the plan does not depend on anything else.
        let mut best: Option<(f64, usize, usize)> = None;
        for (i, l) in ladders.iter().enumerate() {
            let cur = l.rungs[at[i]];
            for (j, r) in l.rungs.iter().enumerate().skip(at[i] + 1) {
                if r.error2 >= cur.error2 || r.bytes <= cur.bytes {
                    continue;
                }
                let gain = (cur.error2 - r.error2) / (r.bytes - cur.bytes) as f64;
                if best.is_none_or(|(g, _, _)| gain > g) {
                    best = Some((gain, i, j));
                }
            }
        }
        let Some((_, i, j)) = best else { break };
        total += ladders[i].rungs[j].error2 - ladders[i].rungs[at[i]].error2;
        at[i] = j;
    }
    at
}

fn predicted(ladders: &[TensorLadder], at: &[usize]) -> f64 {
    ladders
        .iter()
        .zip(at)
        .map(|(l, &i)| l.rungs[i].error2)
        .sum()
}

/// The predicted error sum to aim at, from the rounds measured so far:
/// proportional through the last, or a line through the last two when it
/// rises with the error.
fn aim(points: &[(f64, f64)], limit: f64) -> f64 {
    // Aim a little under: the fitted model is a straight line through
    // something that is not.
    let want = 0.9 * limit;
    let (s1, v1) = points[points.len() - 1];
    let proportional = if v1 > 0.0 { s1 * want / v1 } else { s1 };
    if let [.., (s0, v0), _] = points {
        let slope = (v1 - v0) / (s1 - s0);
        if slope.is_finite() && slope > 0.0 {
            // The line assumes a floor the ladder cannot lower; measured
            // drift is noisy enough that a flat line overshoots (pirate,
            // gain >= 0.99: 99.0% -> 99.6% at 6.9 bpw), so meet the
            // proportional aim halfway.
            let line = s1 + (want - v1) / slope;
            return if line < proportional {
                0.5 * (line + proportional)
            } else {
                line
            };
        }
    }
    proportional
}

/// Convert per `opts` (a merged output only, with calibration statistics)
/// into the cheapest mix found within `budget`, measured; nothing is written
/// when no mix on the ladder keeps it.
pub fn convert_within(
    opts: &ConvertOptions,
    budget: &DriftBudget,
    progress: Progress,
    on_round: &dyn Fn(&BudgetRound),
) -> Result<ConvertReport, ConvertError> {
    let start = std::time::Instant::now();
    let output = check_request(opts, budget)?;
    let limit = budget.target.limit();
    // The published files are checked now, not the rounds' (in a work
    // folder): distinct, from each other and the inputs.
    crate::convert::check_outputs(opts)?;
    let dir = crate::write::output::WorkFolder::new(&output)?;
    let cache = Arc::new(
        RungCache::new(&dir.path().join("rungs.bin")).map_err(|source| ConvertError::Io {
            path: dir.path().to_path_buf(),
            source,
        })?,
    );
    let ladders = predict_ladder(opts, &budget.ladder, &|name, ty, bytes, norms2| {
        cache.keep(name, ty, bytes, norms2)
    })?;
    let predict_seconds = start.elapsed().as_secs_f64();
    let run = Rounds {
        opts,
        budget,
        progress,
        dir: dir.path(),
        ladders,
        reference: References::measure(budget)?,
        rounded: RoundedTensors(Arc::new(move |name: &str, ty: GgmlType| {
            cache.get(name, ty)
        })),
    };
    let mut rounds: Vec<BudgetRound> = Vec::new();
    let mut points = Vec::new();
    let mut at = vec![0usize; run.ladders.len()];
    for round in 0..budget.max_rounds.max(1) {
        let mut c = run.write_and_measure(round, &at)?;
        let value = budget.target.value(&c.measured);
        let s = predicted(&run.ladders, &at);
        rounds.push(BudgetRound {
            upgraded: c.upgraded,
            predicted_error: s,
            tensor_bytes: c.report.totals.tensor_bytes,
            kl_mean: c.measured.kl_mean,
            top1_agreement: c.measured.top1_agreement,
            gain_retained: c.measured.gain_retained,
            within: value <= limit,
        });
        on_round(&rounds[rounds.len() - 1]);
        c.report.budget = Some(run.summary(predict_seconds, &c.measured, &rounds, &at));
        c.report.totals.wall_seconds = start.elapsed().as_secs_f64();
        if value <= limit {
            return c.publish(opts, &output);
        }
        let _ = std::fs::remove_file(&c.path);
        points.push((s, value));
        let next = plan_upgrades(&run.ladders, aim(&points, limit));
        if next == at || round + 1 == budget.max_rounds.max(1) {
            return Err(c.refused(budget, value, rounds.len(), next == at));
        }
        at = next;
    }
    unreachable!("the last round returns")
}

/// The merged output's path, once the request is one a budget can be kept on.
fn check_request(opts: &ConvertOptions, budget: &DriftBudget) -> Result<PathBuf, ConvertError> {
    let usage = |m: &str| Err(ConvertError::Usage(m.into()));
    let Some(output) = opts.output.clone() else {
        return usage("a drift budget needs a merged output");
    };
    if opts.base_output.is_some() || opts.adapter_output.is_some() {
        return usage(
            "a drift budget applies to the merged output only, not to a base or adapter output",
        );
    }
    if budget.windows.is_empty() {
        return usage("a drift budget needs a text to measure on");
    }
    if budget.target.needs_base() && budget.base_reference.is_none() {
        return usage("a gain budget needs the base without the adapter to measure against");
    }
    let limit = budget.target.limit();
    if !(limit.is_finite() && limit > 0.0) {
        return usage(&format!(
            "{}: the budget must leave room for some drift",
            budget.target.describe()
        ));
    }
    Ok(output)
}

/// A model file loaded to measure drift with.
fn load_model(p: &Path) -> Result<Model, ConvertError> {
    Model::load(p, &Device::Cpu).map_err(|e| ConvertError::Measure {
        path: p.to_path_buf(),
        problem: e.to_string(),
    })
}

/// What the rounds are measured against, run once: the f32 reference's
/// logits over the text and the f32 base's mean NLL, each model run a layer
/// at a time ([`layered_logits`]), so that a reference larger than memory
/// (7B in f32: 30 GB) is read once, not once per window and round.
struct References {
    /// The f32 merged model (its vocabulary is checked against each round's).
    model: Model,
    /// Its logits, `[t, vocab]` per window.
    logits: Vec<Vec<f32>>,
    /// The f32 base's mean NLL over the text, for the gain retained.
    base_nll: Option<f64>,
}

impl References {
    fn measure(budget: &DriftBudget) -> Result<References, ConvertError> {
        let logits_of = |m: &Model, path: &Path| {
            layered_logits(m, &budget.windows).map_err(|e| ConvertError::Measure {
                path: path.to_path_buf(),
                problem: e.to_string(),
            })
        };
        let model = load_model(&budget.reference)?;
        let logits = logits_of(&model, &budget.reference)?;
        let base_nll = match budget.base_reference.as_deref() {
            Some(p) => {
                let base = load_model(p)?;
                check_vocabulary(&model, &base).map_err(|e| ConvertError::Measure {
                    path: p.to_path_buf(),
                    problem: e.to_string(),
                })?;
                let l = logits_of(&base, p)?;
                Some(mean_nll(&l, &budget.windows, base.config.vocab))
            }
            None => None,
        };
        Ok(References {
            model,
            logits,
            base_nll,
        })
    }
}

/// What every round shares: the request, the predicted ladders, the models measured against.
struct Rounds<'a> {
    opts: &'a ConvertOptions,
    budget: &'a DriftBudget,
    progress: Progress<'a>,
    /// The work folder the rounds write in.
    dir: &'a Path,
    ladders: Vec<TensorLadder>,
    reference: References,
    rounded: RoundedTensors,
}

impl Rounds<'_> {
    /// Round `round`'s file, tensors at rungs `at`, written in the work folder and measured.
    fn write_and_measure(&self, round: usize, at: &[usize]) -> Result<Candidate, ConvertError> {
        let types: Vec<(String, GgmlType)> = self
            .ladders
            .iter()
            .zip(at)
            .filter(|(_, &i)| i > 0)
            .map(|(l, &i)| (l.tensor.clone(), l.rungs[i].ggml_type))
            .collect();
        let path = self.dir.join(format!("round-{round}.gguf"));
        // A compensation adapter is the last round's, moved with its file.
        let compensation = self.opts.compensate.as_ref().map(|c| Compensate {
            rank: c.rank,
            output: self.dir.join(format!("round-{round}.compensation.gguf")),
        });
        let report = convert(
            &ConvertOptions {
                output: Some(path.clone()),
                compensate: compensation.clone(),
                rounded: Some(self.rounded.clone()),
                policy: self.opts.policy.with_tensor_types(&types),
                budget: Some(self.budget.target.describe()),
                ..self.opts.clone()
            },
            self.progress,
        )?;
        let model = load_model(&path)?;
        let measure = |problem: String| ConvertError::Measure {
            path: path.clone(),
            problem: format!("measuring drift: {problem}"),
        };
        check_vocabulary(&self.reference.model, &model).map_err(|e| measure(e.to_string()))?;
        let measured = drift_from_logits(
            &self.reference.logits,
            &[&model],
            self.reference.base_nll,
            &self.budget.windows,
        )
        .map_err(|e| measure(e.to_string()))?
        .remove(0);
        drop(model);
        Ok(Candidate {
            path,
            compensation,
            upgraded: types.len(),
            report,
            measured,
        })
    }

    /// The budget's part of the report after `rounds`, tensors at rungs `at`.
    fn summary(
        &self,
        predict_seconds: f64,
        measured: &DriftReport,
        rounds: &[BudgetRound],
        at: &[usize],
    ) -> BudgetReport {
        BudgetReport {
            target: self.budget.target.describe(),
            predict_seconds,
            tokens: measured.tokens,
            rounds: rounds.to_vec(),
            upgrades: self
                .ladders
                .iter()
                .zip(at)
                .filter(|(_, &i)| i > 0)
                .map(|(l, &i)| {
                    (
                        l.tensor.clone(),
                        l.rungs[0].ggml_type.name().to_string(),
                        l.rungs[i].ggml_type.name().to_string(),
                    )
                })
                .collect(),
        }
    }
}

/// One round's file in the work folder, with its report and drift.
struct Candidate {
    path: PathBuf,
    /// Its compensation adapter, written next to it.
    compensation: Option<Compensate>,
    /// Tensors moved up from the policy's types.
    upgraded: usize,
    report: ConvertReport,
    measured: DriftReport,
}

impl Candidate {
    /// The file (and its compensation adapter) moved to where `opts` asks.
    fn publish(
        mut self,
        opts: &ConvertOptions,
        output: &Path,
    ) -> Result<ConvertReport, ConvertError> {
        let publish = |from: &Path, to: &Path| {
            std::fs::rename(from, to).map_err(|source| ConvertError::Io {
                path: to.to_path_buf(),
                source,
            })
        };
        if let (Some(from), Some(to), Some(r)) = (
            &self.compensation,
            &opts.compensate,
            self.report.compensation.as_mut(),
        ) {
            publish(&from.output, &to.output)?;
            r.path = to.output.display().to_string();
        }
        publish(&self.path, output)?;
        self.report.output = Some(output.display().to_string());
        Ok(self.report)
    }

    /// The error for a last round over the budget (`stuck`: no wider type lowers it).
    fn refused(
        mut self,
        budget: &DriftBudget,
        value: f64,
        rounds: usize,
        stuck: bool,
    ) -> ConvertError {
        let why = if stuck {
            "no wider type on the ladder lowers it further"
        } else {
            "the rounds ran out"
        };
        self.report.output = None;
        ConvertError::Budget(
            format!(
                "{}: measured {:.4} after {} round(s) ({why})",
                budget.target.describe(),
                match budget.target {
                    DriftTarget::KlMean(_) => self.measured.kl_mean,
                    DriftTarget::MinGain(_) => 1.0 - value,
                },
                rounds
            ),
            Box::new(self.report),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::Rung;

    fn ladder(name: &str, rungs: &[(u64, f64)]) -> TensorLadder {
        TensorLadder {
            tensor: name.into(),
            rungs: rungs
                .iter()
                .map(|&(bytes, error2)| Rung {
                    ggml_type: GgmlType::Q4_0,
                    bytes,
                    error2,
                })
                .collect(),
        }
    }

    #[test]
    fn upgrades_go_where_a_byte_removes_most_error() {
        let ls = [
            ladder("a", &[(100, 1.0), (150, 0.5), (200, 0.1)]),
            ladder("b", &[(100, 4.0), (150, 1.0), (200, 0.9)]),
        ];
        // Nothing needed: policy types stay.
        assert_eq!(plan_upgrades(&ls, 5.0), vec![0, 0]);
        // b's first step removes 3.0 for 50 bytes: the best move.
        assert_eq!(plan_upgrades(&ls, 4.5), vec![0, 1]);
        // Then a's first step (0.5 for 50 bytes) beats its jump to the
        // last rung (0.9 for 100) and b's last step (0.1 for 50).
        assert_eq!(plan_upgrades(&ls, 1.6), vec![1, 1]);
        assert_eq!(plan_upgrades(&ls, 1.15), vec![2, 1]);
        // Unreachable: everything at the top, and no further.
        assert_eq!(plan_upgrades(&ls, 0.0), vec![2, 2]);
    }

    #[test]
    fn a_rung_that_does_not_lower_the_error_is_skipped() {
        let ls = [ladder("a", &[(100, 1.0), (150, 1.2), (200, 0.2)])];
        assert_eq!(plan_upgrades(&ls, 0.5), vec![2]);
    }

    #[test]
    fn aim_follows_the_measurements() {
        // Proportional through one point: 0.9 of the limit.
        assert!((aim(&[(10.0, 2.0)], 1.0) - 4.5).abs() < 1e-12);
        // A line through two: v = 1 + 0.1 s, so 0.9 needs s < 0; halfway
        // to the proportional aim (5 * 0.9 / 1.5 = 3) from the line's -1.
        assert!((aim(&[(10.0, 2.0), (5.0, 1.5)], 1.0) - 1.0).abs() < 1e-12);
        // A line through two: v = 0.2 s, so 0.9 is at s = 4.5.
        assert!((aim(&[(10.0, 2.0), (5.0, 1.0)], 1.0) - 4.5).abs() < 1e-12);
    }
}

//! Drift between a reference and a candidate over the same tokens, compared
//! in f64 as logits are produced; only per-token scalars are kept.

use std::path::PathBuf;

use serde::Serialize;

use crate::cpu::KvType;
use crate::gguf::names;
use crate::model::{Model, RuntimeError, SessionOptions};
use crate::tokenizer::{TokenizeError, Tokenizer};

/// A text that cannot be cut into windows.
#[derive(Debug, thiserror::Error)]
pub enum WindowError {
    /// A window must hold a token.
    #[error("a window of 0 tokens holds nothing")]
    ZeroContext,
    /// The tokenizer refused the text.
    #[error(transparent)]
    Tokenize(#[from] TokenizeError),
    /// No window holds the 2 tokens a prediction needs.
    #[error("no window of at least 2 tokens")]
    NoWindow,
}

/// Token windows of `text`: one per non-empty line (cut to `ctx` tokens)
/// with `lines`, else consecutive runs of `ctx` tokens; a window of fewer
/// than 2 tokens predicts nothing and is dropped; none left is an error.
pub fn windows(
    tok: &Tokenizer,
    text: &str,
    lines: bool,
    ctx: usize,
) -> Result<Vec<Vec<u32>>, WindowError> {
    if ctx == 0 {
        return Err(WindowError::ZeroContext);
    }
    let enc = |s: &str| tok.encode(s).map_err(WindowError::Tokenize);
    let w: Vec<Vec<u32>> = if lines {
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                enc(l).map(|mut v| {
                    v.truncate(ctx);
                    v
                })
            })
            .collect::<Result<_, _>>()?
    } else {
        enc(text)?.chunks(ctx).map(|c| c.to_vec()).collect()
    };
    let w: Vec<Vec<u32>> = w.into_iter().filter(|w| w.len() >= 2).collect();
    if w.is_empty() {
        return Err(WindowError::NoWindow);
    }
    Ok(w)
}

/// Drift that cannot be measured.
#[derive(Debug, thiserror::Error)]
pub enum DriftError {
    /// A model's token ids mean other tokens than the reference's: its
    /// logits cannot be compared with the reference's, nor its loss on the
    /// reference's tokens.
    #[error("{}: {problem}; drift compares paths over the reference's vocabulary", other.display())]
    Vocabulary {
        /// the reference's model file
        reference: PathBuf,
        /// the other model's file
        other: PathBuf,
        /// how the vocabularies differ (naming the reference's file)
        problem: String,
    },
    /// Running a model failed.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

/// Refuse a model whose vocabulary is not `reference`'s: another size, or
/// (where both files list their tokens) another token at some id.
pub fn check_vocabulary(reference: &Model, other: &Model) -> Result<(), DriftError> {
    let shown = reference.file().path().display();
    let refuse = |problem: String| DriftError::Vocabulary {
        reference: reference.file().path().to_path_buf(),
        other: other.file().path().to_path_buf(),
        problem,
    };
    let (r, o) = (reference.config.vocab, other.config.vocab);
    if r != o {
        return Err(refuse(format!(
            "its vocabulary has {o} tokens, the reference {shown}'s {r}"
        )));
    }
    let rt = reference.file().get_strings(names::TOKENIZER_TOKENS);
    let ot = other.file().get_strings(names::TOKENIZER_TOKENS);
    if let (Some(rt), Some(ot)) = (rt, ot) {
        if let Some(i) = (0..rt.len().min(ot.len())).find(|&i| rt[i] != ot[i]) {
            return Err(refuse(format!(
                "its token {i} is '{}', the reference {shown}'s '{}'",
                ot[i], rt[i]
            )));
        }
    }
    Ok(())
}

/// Every candidate's drift from `reference` over `windows` (an f32 KV cache,
/// so the drift measured is the weights'), with the gain retained when the
/// un-adapted `base` is given. Every candidate and the base must have the
/// reference's vocabulary ([`check_vocabulary`]).
pub fn drift(
    reference: &Model,
    candidates: &[&Model],
    base: Option<&Model>,
    windows: &[Vec<u32>],
) -> Result<Vec<DriftReport>, DriftError> {
    for m in candidates.iter().copied().chain(base) {
        check_vocabulary(reference, m)?;
    }
    let base_nll = base.map(|b| base_nll(b, windows)).transpose()?;
    drift_by(
        &mut |w: &[u32], _| window_logits(reference, w, windows),
        candidates,
        base_nll,
        windows,
    )
}

/// [`drift`] from the reference's logits of each window (`[t, vocab]`,
/// from [`layered_logits`]) and the base's mean NLL over them.
pub fn drift_from_logits(
    reference: &[Vec<f32>],
    candidates: &[&Model],
    base_nll: Option<f64>,
    windows: &[Vec<u32>],
) -> Result<Vec<DriftReport>, DriftError> {
    drift_by(
        &mut |_, i| Ok(reference[i].clone()),
        candidates,
        base_nll,
        windows,
    )
}

/// The logits (`[t, vocab]`) of a window, given it and its index.
type WindowLogits<'a> = dyn FnMut(&[u32], usize) -> Result<Vec<f32>, RuntimeError> + 'a;

/// Every candidate's drift from the reference logits `reference(window, i)`.
fn drift_by(
    reference: &mut WindowLogits<'_>,
    candidates: &[&Model],
    base_nll: Option<f64>,
    windows: &[Vec<u32>],
) -> Result<Vec<DriftReport>, DriftError> {
    let mut accs = vec![DriftAccumulator::default(); candidates.len()];
    for (wi, w) in windows.iter().enumerate() {
        let r = reference(w, wi)?;
        for (m, acc) in candidates.iter().zip(accs.iter_mut()) {
            let c = window_logits(m, w, windows)?;
            let vocab = m.config.vocab;
            for i in 0..w.len() {
                let row = |l: &[f32]| l[i * vocab..(i + 1) * vocab].to_vec();
                acc.add(&row(&r), &row(&c), w.get(i + 1).copied());
            }
        }
    }
    Ok(accs
        .iter()
        .map(|acc| match base_nll {
            Some(nll) => acc.report().with_base(nll),
            None => acc.report(),
        })
        .collect())
}

/// `m`'s logits of every position of window `w` (`[t, vocab]`), from an
/// empty f32 cache as long as the longest of `windows`.
fn window_logits(m: &Model, w: &[u32], windows: &[Vec<u32>]) -> Result<Vec<f32>, RuntimeError> {
    let ctx = windows.iter().map(Vec::len).max().unwrap_or(1);
    let mut s = m.session_with(SessionOptions {
        kv: KvType::F32,
        ..SessionOptions::new(ctx)
    })?;
    Ok(s.logits(w, true)?.to_vec())
}

/// The mean NLL of each window's next tokens under `base`.
pub fn base_nll(base: &Model, windows: &[Vec<u32>]) -> Result<f64, RuntimeError> {
    let (mut nll, mut n) = (0f64, 0usize);
    for w in windows {
        let (s, c) = window_nll(&window_logits(base, w, windows)?, w, base.config.vocab);
        (nll, n) = (nll + s, n + c);
    }
    Ok(nll / n.max(1) as f64)
}

/// The mean NLL of each window's next tokens under its logits (`[t, vocab]` per window).
pub fn mean_nll(logits: &[Vec<f32>], windows: &[Vec<u32>], vocab: usize) -> f64 {
    let (mut nll, mut n) = (0f64, 0usize);
    for (l, w) in logits.iter().zip(windows) {
        let (s, c) = window_nll(l, w, vocab);
        (nll, n) = (nll + s, n + c);
    }
    nll / n.max(1) as f64
}

/// The summed NLL of window `w`'s next tokens under its logits, and how many.
fn window_nll(logits: &[f32], w: &[u32], vocab: usize) -> (f64, usize) {
    let rows = logits.chunks_exact(vocab).take(w.len().saturating_sub(1));
    let nll: f64 = rows
        .enumerate()
        .map(|(i, row)| -log_softmax(row)[w[i + 1] as usize])
        .sum();
    (nll, w.len().saturating_sub(1))
}

/// Every window's logits (`[t, vocab]` each) from `model` run a layer at a
/// time: all windows through block 0, then block 1, ..., each layer's
/// weights read once and given back ([`Model::release_layer`]). For a model
/// larger than memory (a 7B f32 reference is 30 GB), where a window at a
/// time would read the whole file again for every window.
pub fn layered_logits(model: &Model, windows: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, RuntimeError> {
    let ctx = windows.iter().map(Vec::len).max().unwrap_or(1);
    let mut s = model.session_with(SessionOptions {
        kv: KvType::F32,
        ..SessionOptions::new(ctx)
    })?;
    let mut hidden = s.embed_windows(windows)?;
    for layer in 0..model.config.n_layers {
        for x in hidden.iter_mut() {
            s.block_rows(layer, x, None)?;
        }
        model.release_layer(layer);
    }
    hidden
        .iter()
        .map(|x| {
            let mut l = Vec::new();
            s.head_rows(x, &mut l).map(|()| l)
        })
        .collect()
}

/// Log-softmax of one row of logits, in f64.
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits
        .iter()
        .fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    let lse = max
        + logits
            .iter()
            .map(|&x| (x as f64 - max).exp())
            .sum::<f64>()
            .ln();
    logits.iter().map(|&x| x as f64 - lse).collect()
}

/// The index of the first largest value (0 for an empty row); a NaN never
/// wins. The greedy token, and the top-1 the drift compares.
pub fn argmax<T: PartialOrd + Copy>(v: &[T]) -> usize {
    let mut best: Option<(usize, T)> = None;
    for (i, &x) in v.iter().enumerate() {
        let wins = match best {
            None => x.partial_cmp(&x).is_some(),
            Some((_, b)) => x > b,
        };
        if wins {
            best = Some((i, x));
        }
    }
    best.map_or(0, |(i, _)| i)
}

/// Per-token comparisons of a candidate against the reference.
#[derive(Debug, Clone, Default)]
pub struct DriftAccumulator {
    kl: Vec<f64>,
    top1_agree: usize,
    dp2: f64,
    nll_ref: f64,
    nll_cand: f64,
    scored: usize,
}

impl DriftAccumulator {
    /// Add one position: the two rows of logits and, if known, the token that
    /// actually comes next (for perplexity).
    pub fn add(&mut self, reference: &[f32], candidate: &[f32], next: Option<u32>) {
        let (r, c) = (log_softmax(reference), log_softmax(candidate));
        let kl: f64 = r.iter().zip(&c).map(|(a, b)| a.exp() * (a - b)).sum();
        self.kl.push(kl.max(0.0));
        let top = argmax(&r);
        if argmax(&c) == top {
            self.top1_agree += 1;
        }
        self.dp2 += (c[top].exp() - r[top].exp()).powi(2);
        if let Some(t) = next {
            self.nll_ref -= r[t as usize];
            self.nll_cand -= c[t as usize];
            self.scored += 1;
        }
    }

    /// Mean next-token NLL of the reference's logits, if any token was scored.
    pub fn mean_nll_reference(&self) -> Option<f64> {
        (self.scored > 0).then(|| self.nll_ref / self.scored as f64)
    }

    /// Mean next-token NLL of the candidate's logits.
    pub fn mean_nll_candidate(&self) -> Option<f64> {
        (self.scored > 0).then(|| self.nll_cand / self.scored as f64)
    }

    /// The summary.
    pub fn report(&self) -> DriftReport {
        let mut kl = self.kl.clone();
        kl.sort_by(f64::total_cmp);
        let n = kl.len();
        let pct = |q: f64| {
            if n == 0 {
                0.0
            } else {
                kl[((q * (n - 1) as f64).round() as usize).min(n - 1)]
            }
        };
        let nll_r = self.mean_nll_reference();
        let nll_c = self.mean_nll_candidate();
        DriftReport {
            tokens: n,
            kl_mean: if n == 0 {
                0.0
            } else {
                kl.iter().sum::<f64>() / n as f64
            },
            kl_median: pct(0.5),
            kl_p99: pct(0.99),
            kl_max: kl.last().copied().unwrap_or(0.0),
            top1_agreement: if n == 0 {
                1.0
            } else {
                self.top1_agree as f64 / n as f64
            },
            rms_delta_p_top: if n == 0 {
                0.0
            } else {
                (self.dp2 / n as f64).sqrt()
            },
            perplexity_reference: nll_r.map(f64::exp),
            perplexity: nll_c.map(f64::exp),
            nll_reference: nll_r,
            nll: nll_c,
            gain_retained: None,
        }
    }
}

/// How far a candidate drifts from the reference.
#[derive(Debug, Clone, Serialize)]
pub struct DriftReport {
    /// Positions compared.
    pub tokens: usize,
    /// Mean KL(p_ref || p_cand), nats.
    pub kl_mean: f64,
    /// Median KL.
    pub kl_median: f64,
    /// 99th percentile KL.
    pub kl_p99: f64,
    /// Largest KL.
    pub kl_max: f64,
    /// Share of positions where the argmax agrees.
    pub top1_agreement: f64,
    /// RMS change of the probability of the reference's top token.
    pub rms_delta_p_top: f64,
    /// Perplexity of the reference on the text.
    pub perplexity_reference: Option<f64>,
    /// Perplexity of the candidate.
    pub perplexity: Option<f64>,
    /// Mean NLL of the reference (nats/token).
    pub nll_reference: Option<f64>,
    /// Mean NLL of the candidate.
    pub nll: Option<f64>,
    /// (L_base - L_cand) / (L_base - L_ref), given the un-adapted base's loss.
    pub gain_retained: Option<f64>,
}

impl DriftReport {
    /// Fill in the gain retained from the base's mean NLL.
    pub fn with_base(mut self, base_nll: f64) -> DriftReport {
        if let (Some(r), Some(c)) = (self.nll_reference, self.nll) {
            self.gain_retained = Some((base_nll - c) / (base_nll - r));
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_of_itself_is_zero_and_of_another_positive() {
        let a = [1.0f32, 2.0, 3.0, -1.0];
        let b = [1.0f32, 2.5, 2.0, -1.0];
        let mut same = DriftAccumulator::default();
        same.add(&a, &a, Some(2));
        let r = same.report();
        assert_eq!(
            (r.kl_mean, r.kl_max, r.top1_agreement, r.rms_delta_p_top),
            (0.0, 0.0, 1.0, 0.0)
        );
        let mut diff = DriftAccumulator::default();
        diff.add(&a, &b, Some(2));
        let r = diff.report();
        // By hand: p = softmax(a), q = softmax(b), KL = sum p ln(p/q).
        let p = log_softmax(&a);
        let q = log_softmax(&b);
        let want: f64 = p.iter().zip(&q).map(|(x, y)| x.exp() * (x - y)).sum();
        assert!(r.kl_mean > 0.0 && r.kl_mean.is_finite());
        assert!((r.kl_mean - want).abs() < 1e-15);
        // Computed independently (Python, math.exp/log): 0.2371253679623...
        assert!(
            (r.kl_mean - 0.237_125_367_962).abs() < 1e-11,
            "{}",
            r.kl_mean
        );
        assert_eq!(r.top1_agreement, 0.0, "argmax 2 vs 1");
    }

    #[test]
    fn perplexity_by_hand() {
        // Uniform over 4 tokens: NLL ln 4, perplexity 4.
        let u = [0.0f32; 4];
        let mut acc = DriftAccumulator::default();
        acc.add(&u, &u, Some(1));
        acc.add(&u, &u, Some(3));
        let r = acc.report();
        assert!((r.perplexity.unwrap() - 4.0).abs() < 1e-12);
        // Reference certain-ish of the right token: logits [0, ln 3, 0, 0] gives p = 1/2.
        let r2 = [0.0f32, 3f32.ln(), 0.0, 0.0];
        let mut acc = DriftAccumulator::default();
        acc.add(&r2, &u, Some(1));
        let r = acc.report();
        assert!((r.perplexity_reference.unwrap() - 2.0).abs() < 1e-6);
        assert!((r.perplexity.unwrap() - 4.0).abs() < 1e-12);
        let r = r.with_base(4f64.ln() + 1.0);
        // (L_base - L_c) / (L_base - L_r) = (ln4 + 1 - ln4) / (ln4 + 1 - ln2)
        assert!((r.gain_retained.unwrap() - 1.0 / (4f64.ln() + 1.0 - 2f64.ln())).abs() < 1e-6);
    }
}

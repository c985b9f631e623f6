//! What a conversion did, per tensor and in total: types, errors, retention.

use serde::Serialize;

/// One output tensor.
#[derive(Debug, Clone, Serialize)]
pub struct TensorReport {
    /// GGUF name.
    pub name: String,
    /// Type written.
    pub ggml_type: String,
    /// Why the type differs from the policy's first choice, if it does.
    pub fallback: Option<String>,
    /// Elements.
    pub n_elements: u64,
    /// Bytes written.
    pub n_bytes: u64,
    /// Whether the base's stored bytes were copied (its type was the type
    /// asked for and the adapter leaves it alone): exact, not re-rounded.
    pub copied: bool,
    /// ||Q(W) - W|| / ||W|| against the exact merge.
    pub rel_error: f64,
    /// <Q(W0 + dW) - Q(W0), dW> / ||dW||^2, for tensors the adapter changed.
    pub retention: Option<f64>,
    /// ||dW|| / ||W0||, for tensors the adapter changed.
    pub delta_rel_norm: Option<f64>,
    /// <Q(W0 + dW) - Q(W0), dW> and ||dW||^2, kept to pool retention over tensors.
    #[serde(skip)]
    pub retention_terms: Option<(f64, f64)>,
    /// ||(Q(W) - W) X|| / ||W X|| over the calibration inputs, for tensors
    /// whose input has statistics (with only their diagonal: the
    /// importance-weighted error, inputs taken as uncorrelated).
    pub output_error: Option<f64>,
    /// The same for ggml's nearest rounding, when another method was chosen.
    pub output_error_nearest: Option<f64>,
    /// The output error left once the compensation pair is added back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_error_compensated: Option<f64>,
}

/// A tensor's error sums, added a run of rows at a time so that the
/// quantized values need not be held whole.
#[derive(Debug, Clone, Copy, Default)]
pub struct ErrorSums {
    err2: f64,
    norm2: f64,
    dot: f64,
    d2: f64,
    b2: f64,
    n: u64,
    changed: bool,
}

crate::simd::avx2_or_portable! {
    // Four partial sums per quantity: one f64 chain per sum would stall on
    // its adds (this loop was 11% of a SmolLM2 conversion).
    fn add_sums(
        sums: &mut ErrorSums,
        w: &[f32],
        qw: &[f32],
        changed: Option<(&[f32], &[f32], &[f32])>,
    ) {
        let sum = |v: [f64; 4]| (v[0] + v[1]) + (v[2] + v[3]);
        let (err2, norm2) = err_norm2(w, qw);
        sums.err2 += err2;
        sums.norm2 += norm2;
        sums.n += w.len() as u64;
        let Some((w0, q_w0, dw)) = changed else {
            return;
        };
        sums.changed = true;
        let (mut dot, mut d2, mut b2) = ([0f64; 4], [0f64; 4], [0f64; 4]);
        let (qc, q0c, dc, bc) = (
            qw.chunks_exact(4),
            q_w0.chunks_exact(4),
            dw.chunks_exact(4),
            w0.chunks_exact(4),
        );
        let tail = (qc.remainder().iter())
            .zip(q0c.remainder())
            .zip(dc.remainder().iter().zip(bc.remainder()));
        for ((q4, q04), (d4, b4)) in qc.zip(q0c).zip(dc.zip(bc)) {
            for i in 0..4 {
                let (d, b) = (d4[i] as f64, b4[i] as f64);
                dot[i] += (q4[i] as f64 - q04[i] as f64) * d;
                d2[i] += d * d;
                b2[i] += b * b;
            }
        }
        for ((&q, &q0), (&d, &b)) in tail {
            let (d, b) = (d as f64, b as f64);
            dot[0] += (q as f64 - q0 as f64) * d;
            d2[0] += d * d;
            b2[0] += b * b;
        }
        sums.dot += sum(dot);
        sums.d2 += sum(d2);
        sums.b2 += sum(b2);
    }
}

/// Σ(q − w)² and Σw², in f32 within 64 values (8 lanes of 8 terms, relative
/// error below 1e-6) and in f64 across them. f64 throughout was 17% of a 7B
/// stand-in's conversion to q4_0; LLVM does not vectorise the portable
/// loop's lanes, so AVX2 is written out.
fn err_norm2(w: &[f32], q: &[f32]) -> (f64, f64) {
    let n = w.len().min(q.len());
    #[cfg(target_arch = "x86_64")]
    if lorafold_kernels::Isa::detect().avx2() {
        // SAFETY: AVX2 and FMA are present (the tier says so); both slices
        // hold at least `n` values.
        return unsafe { err_norm2_avx2(&w[..n], &q[..n]) };
    }
    let (mut e, mut m) = (0f64, 0f64);
    for (a, b) in w[..n].iter().zip(&q[..n]) {
        let (a, b) = (*a as f64, *b as f64);
        e += (b - a) * (b - a);
        m += a * a;
    }
    (e, m)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn err_norm2_avx2(w: &[f32], q: &[f32]) -> (f64, f64) {
    use std::arch::x86_64::*;
    let widen = |v: __m256| {
        _mm256_add_pd(
            _mm256_cvtps_pd(_mm256_castps256_ps128(v)),
            _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)),
        )
    };
    let (mut e, mut m) = (_mm256_setzero_pd(), _mm256_setzero_pd());
    let blocks = w.len() / 64;
    for b in 0..blocks {
        let (mut e8, mut m8) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for j in 0..8 {
            let at = b * 64 + j * 8;
            let a = _mm256_loadu_ps(w.as_ptr().add(at));
            let d = _mm256_sub_ps(_mm256_loadu_ps(q.as_ptr().add(at)), a);
            e8 = _mm256_fmadd_ps(d, d, e8);
            m8 = _mm256_fmadd_ps(a, a, m8);
        }
        e = _mm256_add_pd(e, widen(e8));
        m = _mm256_add_pd(m, widen(m8));
    }
    let lanes = |v: __m256d| {
        let mut x = [0f64; 4];
        _mm256_storeu_pd(x.as_mut_ptr(), v);
        (x[0] + x[1]) + (x[2] + x[3])
    };
    let (mut e, mut m) = (lanes(e), lanes(m));
    for (a, b) in w[blocks * 64..].iter().zip(&q[blocks * 64..]) {
        let (a, b) = (*a as f64, *b as f64);
        e += (b - a) * (b - a);
        m += a * a;
    }
    (e, m)
}

impl ErrorSums {
    /// Add a run: `w` the exact merge, `qw` its quantized values, and for
    /// changed tensors `w0`, `q_w0` and the delta `dw`.
    pub fn add(&mut self, w: &[f32], qw: &[f32], changed: Option<(&[f32], &[f32], &[f32])>) {
        add_sums(self, w, qw, changed);
    }

    /// The sums of `self`'s runs and `other`'s, as if added one after the
    /// other (runs of one tensor summed on different threads).
    pub fn merge(&mut self, other: &ErrorSums) {
        self.err2 += other.err2;
        self.norm2 += other.norm2;
        self.dot += other.dot;
        self.d2 += other.d2;
        self.b2 += other.b2;
        self.n += other.n;
        self.changed |= other.changed;
    }

    /// The sums of `n` values written exactly as they were (a copied tensor).
    pub fn exact(n: u64) -> ErrorSums {
        ErrorSums {
            n,
            ..ErrorSums::default()
        }
    }
}

impl TensorReport {
    /// The report of a tensor whose sums were added run by run.
    pub fn from_sums(
        name: &str,
        ggml_type: String,
        fallback: Option<String>,
        n_bytes: u64,
        s: &ErrorSums,
    ) -> TensorReport {
        let rel_error = if s.norm2 > 0.0 {
            (s.err2 / s.norm2).sqrt()
        } else {
            s.err2.sqrt()
        };
        let (mut retention, mut delta_rel_norm, mut retention_terms) = (None, None, None);
        if s.changed {
            if s.d2 > 0.0 {
                retention = Some(s.dot / s.d2);
                retention_terms = Some((s.dot, s.d2));
            }
            delta_rel_norm = Some(if s.b2 > 0.0 {
                (s.d2 / s.b2).sqrt()
            } else {
                s.d2.sqrt()
            });
        }
        TensorReport {
            name: name.into(),
            ggml_type,
            fallback,
            n_elements: s.n,
            n_bytes,
            copied: false,
            rel_error,
            retention,
            delta_rel_norm,
            retention_terms,
            output_error: None,
            output_error_nearest: None,
            output_error_compensated: None,
        }
    }
}

/// The whole conversion.
#[derive(Debug, Clone, Serialize)]
pub struct ConvertReport {
    /// The merged output file, if written.
    pub output: Option<String>,
    /// The quantized base file (separate path), if written.
    pub base_output: Option<String>,
    /// Size of the base file.
    pub base_file_size: Option<u64>,
    /// The adapter GGUF (separate path), if written.
    pub adapter_gguf: Option<crate::write::adapter_gguf::AdapterReport>,
    /// The base model.
    pub base: String,
    /// The adapter folder, if any.
    pub adapter: Option<String>,
    /// The policy name (--quant).
    pub quant: String,
    /// Every tensor in file order.
    pub tensors: Vec<TensorReport>,
    /// Totals.
    pub totals: Totals,
    /// Notes: fallbacks, ignored options, untied heads.
    pub notes: Vec<String>,
    /// The drift budget's rounds and choices, when one was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetReport>,
    /// The compensation adapter, when one was written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compensation: Option<CompensationReport>,
}

/// The compensation adapter written beside the merged output.
#[derive(Debug, Clone, Serialize)]
pub struct CompensationReport {
    /// The file.
    pub path: String,
    /// The rank asked for.
    pub rank: usize,
    /// Modules compensated.
    pub modules: usize,
    /// File size.
    pub file_size: u64,
}

/// Totals over the conversion.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Totals {
    /// Tensors written.
    pub n_tensors: usize,
    /// Weights written.
    pub n_elements: u64,
    /// Bytes of tensor data.
    pub tensor_bytes: u64,
    /// Size of the output file.
    pub file_size: u64,
    /// 8 * tensor bytes / weights.
    pub bits_per_weight: f64,
    /// Largest per-tensor relative error.
    pub max_rel_error: f64,
    /// The tensor with the largest relative error.
    pub max_rel_error_tensor: String,
    /// Mean of the per-tensor relative errors, weighted by element count.
    pub mean_rel_error: f64,
    /// Retention pooled over the changed tensors: sum <Q(W')-Q(W0), dW> / sum ||dW||^2.
    pub retention: Option<f64>,
    /// Unweighted mean of the per-tensor retention.
    pub mean_retention: Option<f64>,
    /// Smallest per-tensor retention.
    pub min_retention: Option<f64>,
    /// Tensors the adapter changed.
    pub changed_tensors: usize,
    /// Tensors whose type fell back.
    pub fallbacks: usize,
    /// Tensors copied as stored in the base, not re-rounded.
    pub copied_tensors: usize,
    /// Wall time of the conversion in seconds.
    pub wall_seconds: f64,
    /// Peak resident memory of the process, bytes (Linux).
    pub peak_rss_bytes: Option<u64>,
}

impl Totals {
    /// Sum up `tensors`.
    pub fn of(tensors: &[TensorReport]) -> Totals {
        let mut t = Totals {
            n_tensors: tensors.len(),
            ..Totals::default()
        };
        let (mut dot, mut d2, mut sum_ret, mut n_ret, mut weighted_err) =
            (0f64, 0f64, 0f64, 0usize, 0f64);
        for r in tensors {
            t.n_elements += r.n_elements;
            t.copied_tensors += usize::from(r.copied);
            t.tensor_bytes += r.n_bytes;
            weighted_err += r.rel_error * r.n_elements as f64;
            if r.rel_error > t.max_rel_error || t.max_rel_error_tensor.is_empty() {
                t.max_rel_error = r.rel_error;
                t.max_rel_error_tensor = r.name.clone();
            }
            if let Some((a, b)) = r.retention_terms {
                dot += a;
                d2 += b;
            }
            if let Some(x) = r.retention {
                sum_ret += x;
                n_ret += 1;
                t.min_retention = Some(t.min_retention.map_or(x, |m: f64| m.min(x)));
            }
            if r.delta_rel_norm.is_some() {
                t.changed_tensors += 1;
            }
            if r.fallback.is_some() {
                t.fallbacks += 1;
            }
        }
        t.mean_rel_error = if t.n_elements > 0 {
            weighted_err / t.n_elements as f64
        } else {
            0.0
        };
        t.bits_per_weight =
            lorafold_runtime::summary::bits_per_weight(t.tensor_bytes, t.n_elements);
        t.retention = (d2 > 0.0).then(|| dot / d2);
        t.mean_retention = (n_ret > 0).then(|| sum_ret / n_ret as f64);
        t
    }
}

pub use lorafold_runtime::bench::peak_rss_bytes;

/// One written and measured mix.
#[derive(Debug, Clone, Serialize)]
pub struct BudgetRound {
    /// Tensors above their policy type.
    pub upgraded: usize,
    /// Σ of the predicted relative squared output errors.
    pub predicted_error: f64,
    /// Tensor bytes of the file.
    pub tensor_bytes: u64,
    /// Measured mean KL from the reference.
    pub kl_mean: f64,
    /// Measured top-1 agreement.
    pub top1_agreement: f64,
    /// Measured gain retained, when the base was measured.
    pub gain_retained: Option<f64>,
    /// Whether the budget holds for this mix.
    pub within: bool,
}

/// What the budget chose and what was measured.
#[derive(Debug, Clone, Serialize)]
pub struct BudgetReport {
    /// The bound, in words.
    pub target: String,
    /// Tokens measured.
    pub tokens: usize,
    /// Seconds spent predicting every tensor's error at every rung.
    pub predict_seconds: f64,
    /// Every round, the last one the file written (when within budget).
    pub rounds: Vec<BudgetRound>,
    /// Each upgraded tensor: (name, policy type, type written).
    pub upgrades: Vec<(String, String, String)>,
}

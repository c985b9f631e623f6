//! `lorafold.drift` and `lorafold.bench`: the CLI's measures, as the same
//! JSON its `--json` writes.

use candle_core::Device;
use lorafold_runtime::bench::bench_path;
use lorafold_runtime::cpu::KvType;
use lorafold_runtime::measure::{check_vocabulary, drift as measure_drift, windows};
use lorafold_runtime::model::Model;
use lorafold_runtime::path_spec::PathSpec;
use pyo3::prelude::*;
use serde_json::{Map, Value};

use crate::errors::{guarded, Failure, Fallible, Kind, Raise};

fn spec(s: &str) -> Fallible<PathSpec> {
    s.parse()
        .map_err(|e: lorafold_runtime::path_spec::PathSpecError| Failure::of(Kind::Usage, &e))
}

fn json(v: &impl serde::Serialize) -> Fallible<String> {
    serde_json::to_string_pretty(v).map_err(|e| Failure::new(Kind::Other, e.to_string()))
}

/// The native half of `lorafold.drift`: one row per candidate, as the
/// CLI's `drift --json` writes them.
#[pyfunction]
#[pyo3(signature = (reference, candidates, text, base=None, lines=false, ctx=128))]
pub fn drift(
    py: Python<'_>,
    reference: String,
    candidates: Vec<(String, String)>,
    text: String,
    base: Option<String>,
    lines: bool,
    ctx: usize,
) -> PyResult<String> {
    py.detach(|| {
        guarded(|| {
            let dev = Device::Cpu;
            let reference: Model = spec(&reference)?.load(&dev)?;
            // A window the model cannot hold is refused before any work.
            reference
                .session(ctx)
                .map_err(|e| Failure::of(Kind::Range, &e).context(format!("ctx {ctx}")))?;
            let tok = reference
                .tokenizer()
                .map_err(|e| Failure::of(Kind::File, &e))?;
            let mut models = Vec::new();
            for (name, path) in &candidates {
                let m = spec(path)?.load(&dev)?;
                check_vocabulary(&reference, &m).map_err(|e| Failure::from(e).context(name))?;
                models.push(m);
            }
            let base = base
                .map(|b| spec(&b)?.load(&dev).map_err(Failure::from))
                .transpose()?;
            if let Some(b) = &base {
                check_vocabulary(&reference, b).map_err(|e| Failure::from(e).context("base"))?;
            }
            let w =
                windows(&tok, &text, lines, ctx).map_err(|e| Failure::from(e).context("text"))?;
            let refs: Vec<&Model> = models.iter().collect();
            let reports = measure_drift(&reference, &refs, base.as_ref(), &w)?;
            let rows: Vec<Value> = candidates
                .iter()
                .zip(reports)
                .map(|((name, path), d)| {
                    // The CLI's DriftRow: name and path, then the measures.
                    let mut row = Map::new();
                    row.insert("name".into(), name.clone().into());
                    row.insert(
                        "path".into(),
                        spec(path).map_or(path.clone(), |s| s.to_string()).into(),
                    );
                    if let Ok(Value::Object(m)) = serde_json::to_value(&d) {
                        row.extend(m);
                    }
                    Value::Object(row)
                })
                .collect();
            json(&rows)
        })
    })
    .raise(py)
}

/// The native half of `lorafold.bench`: one row per path, as the CLI's
/// `bench --json` prints them.
#[pyfunction]
#[pyo3(signature = (paths, prompt=128, n=64, reps=5, kv="f16"))]
pub fn bench(
    py: Python<'_>,
    paths: Vec<String>,
    prompt: usize,
    n: usize,
    reps: usize,
    kv: &str,
) -> PyResult<String> {
    py.detach(|| {
        guarded(|| {
            if prompt == 0 {
                return Err(Failure::new(
                    Kind::Range,
                    "prompt 0 is out of range: at least 1 prompt token",
                ));
            }
            if reps == 0 {
                return Err(Failure::new(
                    Kind::Range,
                    "reps 0 is out of range: at least 1 repetition",
                ));
            }
            let kv: KvType = kv
                .parse()
                .map_err(|e: String| Failure::new(Kind::Range, format!("kv: {e}")))?;
            let rows = paths
                .iter()
                .map(|p| {
                    let s = spec(p)?;
                    bench_path(&s, &Device::Cpu, prompt, n, reps, kv).map_err(|e| {
                        // Sizes past the context are out of range, not bad files.
                        let f = Failure::from(e);
                        match f.message.contains("context") {
                            true => Failure::new(Kind::Range, f.message),
                            false => f,
                        }
                        .context(format!("prompt {prompt} n {n}"))
                    })
                })
                .collect::<Fallible<Vec<_>>>()?;
            json(&rows)
        })
    })
    .raise(py)
}

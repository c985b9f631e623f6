//! `lorafold.convert`: the CLI's `convert` with its outputs, calibration,
//! budgets and gates, run on a worker thread so that the caller's thread
//! can relay progress and notice Ctrl-C.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lorafold_converter::budget::{convert_within, DriftBudget, DriftTarget, DEFAULT_LADDER};
use lorafold_converter::convert::{
    convert as run_convert, input_files, Compensate, ConvertError, ConvertOptions, ProgressStep,
    Rounding,
};
use lorafold_converter::reference::TextCalibration;
use lorafold_converter::report::ConvertReport;
use lorafold_converter::round::quant::QuantPolicy;
use lorafold_converter::write::output::{
    check_distinct, check_file_destination, check_set_destination, write_file_atomic, StagedSet,
};
use lorafold_runtime::gguf::GgmlType;
use lorafold_runtime::model::check_threads;
use lorafold_runtime::number::compact;
use pyo3::prelude::*;

use crate::errors::{guarded, Failure, Fallible, Kind, Raise};

/// What `lorafold.convert` was asked: the Python wrapper's arguments, as a
/// dict keyed by their names.
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
pub(crate) struct Request {
    base: PathBuf,
    adapter: Option<PathBuf>,
    quant: String,
    out: PathBuf,
    emit: Vec<String>,
    calib_text: Option<PathBuf>,
    rounding: Option<String>,
    budget_kl: Option<f64>,
    min_gain: Option<f64>,
    compensate: Option<usize>,
    tensor_type: Vec<String>,
    adapter_type: String,
    max_rel_error: Option<f64>,
    min_retention: Option<f64>,
    force: bool,
    report: Option<PathBuf>,
}

/// Where the outputs go: one merged file, or a staged set published whole.
struct Plan {
    staged: Option<StagedSet>,
    merged: Option<PathBuf>,
    base_out: Option<PathBuf>,
    adapter_out: Option<PathBuf>,
    report: Option<PathBuf>,
}

fn range(what: &str, value: f64, expected: &str) -> Failure {
    Failure::new(
        Kind::Range,
        format!("{what} {} is out of range: {expected}", compact(value)),
    )
}

/// The values a gate or budget could never meet, refused first (as the
/// CLI's parsers refuse them).
fn check_values(r: &Request) -> Fallible<()> {
    if let Some(x) = r.max_rel_error.filter(|x| !(x.is_finite() && *x >= 0.0)) {
        return Err(range("max_rel_error", x, "it must be finite and >= 0"));
    }
    if let Some(x) = r.min_retention.filter(|x| !(0.0..=1.0).contains(x)) {
        return Err(range("min_retention", x, "it must be in [0, 1]"));
    }
    if let Some(x) = r.budget_kl.filter(|x| !(x.is_finite() && *x > 0.0)) {
        return Err(range("budget_kl", x, "it must be finite and > 0"));
    }
    if let Some(x) = r.min_gain.filter(|x| !(*x > 0.0 && *x < 1.0)) {
        return Err(range("min_gain", x, "it must be in (0, 1)"));
    }
    if r.budget_kl.is_some() && r.min_gain.is_some() {
        return Err(Failure::new(
            Kind::Usage,
            "give budget_kl or min_gain, not both",
        ));
    }
    if (r.budget_kl.is_some() || r.min_gain.is_some()) && r.calib_text.is_none() {
        return Err(Failure::new(Kind::Usage, "budget_kl and min_gain measure the files over the adapter's text: give it with calib_text"));
    }
    if r.rounding.as_deref().is_some_and(|x| x != "nearest") && r.calib_text.is_none() {
        return Err(Failure::new(
            Kind::Usage,
            "rounding 'imatrix' and 'gptq' need calib_text",
        ));
    }
    if r.compensate == Some(0) {
        return Err(Failure::new(
            Kind::Range,
            "compensate 0 is out of range: a rank of 1 or more",
        ));
    }
    Ok(())
}

/// Check every path before any work, and stage an emitted set.
fn plan(r: &Request) -> Fallible<Plan> {
    for e in &r.emit {
        if !["merged", "separate", "adapter"].contains(&e.as_str()) {
            return Err(Failure::new(
                Kind::Usage,
                format!("emit '{e}': expected 'merged', 'separate' or 'adapter'"),
            ));
        }
    }
    let set = !r.emit.is_empty();
    let compensation =
        (r.compensate.is_some() && !set).then(|| r.out.with_extension("compensation.gguf"));
    let outputs: Vec<(&str, &Path)> = [
        (
            if set { "out, the emit folder" } else { "out" },
            Some(r.out.as_path()),
        ),
        ("report", r.report.as_deref()),
        ("compensate's file beside out", compensation.as_deref()),
    ]
    .into_iter()
    .filter_map(|(what, p)| p.map(|p| (what, p)))
    .collect();
    let base_files = input_files(&r.base);
    let adapter_files = r.adapter.as_deref().map(input_files).unwrap_or_default();
    let inputs: Vec<(&str, &Path)> = base_files
        .iter()
        .map(|f| ("base", f.as_path()))
        .chain(adapter_files.iter().map(|f| ("adapter", f.as_path())))
        .chain(r.calib_text.as_deref().map(|p| ("calib_text", p)))
        .collect();
    check_distinct(&outputs, &inputs)?;
    for (i, (_, p)) in outputs.iter().enumerate() {
        match i == 0 && set {
            true => check_set_destination(p)?,
            false => check_file_destination(p)?,
        }
    }
    if !set {
        return Ok(Plan {
            staged: None,
            merged: Some(r.out.clone()),
            base_out: None,
            adapter_out: None,
            report: r.report.clone(),
        });
    }
    let staged = StagedSet::new(&r.out)?;
    let want = |k: &str| r.emit.iter().any(|e| e == k);
    Ok(Plan {
        merged: want("merged").then(|| staged.path("merged.gguf")),
        base_out: want("separate").then(|| staged.path("base.gguf")),
        adapter_out: (want("separate") || want("adapter")).then(|| staged.path("adapter.gguf")),
        report: Some(
            r.report
                .clone()
                .unwrap_or_else(|| staged.path("report.json")),
        ),
        staged: Some(staged),
    })
}

fn options(r: &Request, p: &Plan, cancel: &Arc<AtomicBool>) -> Fallible<ConvertOptions> {
    let policy = QuantPolicy::parse(&r.quant, &r.tensor_type)?;
    let adapter_type = match r.adapter_type.as_str() {
        "f16" => GgmlType::F16,
        "f32" => GgmlType::F32,
        "bf16" => GgmlType::BF16,
        other => {
            return Err(Failure::new(
                Kind::Range,
                format!("adapter_type '{other}': expected f16, f32 or bf16"),
            ))
        }
    };
    let compensate = match (r.compensate, &p.merged) {
        (Some(rank), Some(out)) => Some(Compensate {
            rank,
            output: out.with_extension("compensation.gguf"),
        }),
        (Some(_), None) => {
            return Err(Failure::new(
                Kind::Usage,
                "compensate writes beside the merged output: emit 'merged'",
            ))
        }
        (None, _) => None,
    };
    Ok(ConvertOptions {
        output: p.merged.clone(),
        base_output: p.base_out.clone(),
        adapter_output: p.adapter_out.clone(),
        adapter_type,
        force: r.force,
        max_rel_error: r.max_rel_error,
        min_retention: r.min_retention,
        compensate,
        cancel: Some(cancel.clone()),
        ..ConvertOptions::new(&r.base, r.adapter.clone(), policy, PathBuf::new())
    })
}

/// The whole conversion (calibration included), on the worker thread.
fn work(
    r: &Request,
    mut opts: ConvertOptions,
    progress: &(dyn Fn(&ProgressStep) + Sync),
) -> Result<ConvertReport, ConvertError> {
    lorafold_converter::convert::check(&opts)?;
    let target = match (r.budget_kl, r.min_gain) {
        (Some(x), _) => Some(DriftTarget::KlMean(x)),
        (None, Some(y)) => Some(DriftTarget::MinGain(y)),
        (None, None) => None,
    };
    let mut windows = None;
    if let Some(text) = &r.calib_text {
        let with_base = target.is_some_and(DriftTarget::needs_base);
        // Layers are calibrated as the conversion reaches them; the
        // progress callback sees the tensors.
        let quiet = Box::new(|_: &lorafold_converter::calib::LayerStep| {});
        let c = TextCalibration::over_text(
            &r.base,
            r.adapter.as_deref(),
            text,
            &r.out,
            with_base,
            quiet,
        )?;
        opts.calib = Some(Arc::new(c.stats));
        windows = Some((c.reference, c.windows));
    }
    if opts.cancelled() {
        return Err(ConvertError::Cancelled);
    }
    opts.rounding = match r.rounding.as_deref() {
        Some("nearest") => Rounding::Nearest,
        Some("imatrix") => Rounding::Imatrix,
        Some("gptq") => Rounding::Gptq,
        Some(other) => {
            return Err(ConvertError::Usage(format!(
                "rounding '{other}': expected nearest, imatrix or gptq"
            )))
        }
        None => Rounding::best_for(opts.calib.as_deref()),
    };
    match (target, windows) {
        (Some(target), Some((reference, windows))) => convert_within(
            &opts,
            &DriftBudget {
                target,
                ladder: DEFAULT_LADDER.to_vec(),
                windows,
                reference: reference.merged.clone(),
                base_reference: reference.base.clone(),
                max_rounds: 4,
            },
            progress,
            &|_| {},
        ),
        _ => run_convert(&opts, progress),
    }
}

/// One tensor written, as the worker hands it to the caller's thread.
struct Step {
    done: usize,
    total: usize,
    tensor: String,
    bytes: u64,
}

/// Run `f` on a worker thread with the caller detached, relaying progress
/// to `callback` and polling for signals (Ctrl-C) every 50 ms; a signal or
/// an exception from the callback sets `cancel` and is raised once the
/// worker has stopped (and removed its partial files).
fn cancellable<T: Send>(
    py: Python<'_>,
    cancel: &Arc<AtomicBool>,
    callback: Option<&Bound<'_, PyAny>>,
    f: impl FnOnce(&(dyn Fn(&ProgressStep) + Sync)) -> T + Send,
) -> PyResult<T> {
    let (tx, rx) = channel::<Step>();
    // Mutex: a Receiver is Send but not Sync, and detach needs Send.
    let rx = Mutex::new(rx);
    let mut raised: Option<PyErr> = None;
    let result = std::thread::scope(|s| {
        let worker = s.spawn(move || {
            let tx = Mutex::new(tx);
            f(&|p: &ProgressStep| {
                let _ = tx.lock().map(|tx| {
                    tx.send(Step {
                        done: p.done,
                        total: p.total,
                        tensor: p.tensor.to_string(),
                        bytes: p.bytes,
                    })
                });
            })
        });
        loop {
            let got = py.detach(|| {
                let rx = rx.lock().unwrap_or_else(|e| e.into_inner());
                rx.recv_timeout(Duration::from_millis(50))
            });
            match got {
                Ok(step) => {
                    if let (Some(cb), None) = (callback, &raised) {
                        if let Err(e) = cb.call1((step.done, step.total, step.tensor, step.bytes)) {
                            cancel.store(true, Ordering::SeqCst);
                            raised = Some(e);
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if raised.is_none() {
                if let Err(e) = py.check_signals() {
                    cancel.store(true, Ordering::SeqCst);
                    raised = Some(e);
                }
            }
        }
        py.detach(|| worker.join())
    });
    if let Some(e) = raised {
        return Err(e);
    }
    match result {
        Ok(r) => Ok(r),
        Err(_) => Err(Failure::new(
            Kind::Other,
            "internal error (a bug in lorafold; please report it): the conversion panicked",
        )
        .into_pyerr(py)),
    }
}

/// The native half of `lorafold.convert` (the Python wrapper documents the
/// arguments, given here as a dict): the report as the CLI's JSON.
#[pyfunction]
#[pyo3(signature = (request, threads, progress))]
pub(crate) fn convert(
    py: Python<'_>,
    request: Request,
    threads: Option<usize>,
    progress: Option<Bound<'_, PyAny>>,
) -> PyResult<String> {
    let r = request;
    let cancel = Arc::new(AtomicBool::new(false));
    let (plan, pool, opts) = py
        .detach(|| {
            guarded(|| {
                check_values(&r)?;
                let pool = match threads {
                    Some(n) => Some(
                        rayon::ThreadPoolBuilder::new()
                            .num_threads(check_threads(n)?)
                            .build()
                            .map_err(|e| Failure::new(Kind::Other, e.to_string()))?,
                    ),
                    None => None,
                };
                let plan = plan(&r)?;
                let opts = options(&r, &plan, &cancel)?;
                Ok((plan, pool, opts))
            })
        })
        .raise(py)?;
    let converted = cancellable(py, &cancel, progress.as_ref(), |progress| {
        let run = || work(&r, opts, progress);
        match &pool {
            Some(pool) => pool.install(run),
            None => run(),
        }
    })?;
    py.detach(|| guarded(|| finish(&r, plan, converted)))
        .raise(py)
}

/// Name the published paths, write the report, publish the set; a broken
/// gate is raised with its report after the report file is written.
fn finish(
    r: &Request,
    plan: Plan,
    converted: Result<ConvertReport, ConvertError>,
) -> Fallible<String> {
    let (mut report, broken) = match converted {
        Ok(report) => (report, None),
        Err(ConvertError::Budget(why, report)) => (*report, Some(why)),
        Err(e) => return Err(e.into()),
    };
    if let Some(set) = &plan.staged {
        for p in [
            report.output.as_mut(),
            report.base_output.as_mut(),
            report.adapter_gguf.as_mut().map(|a| &mut a.path),
            report.compensation.as_mut().map(|c| &mut c.path),
        ]
        .into_iter()
        .flatten()
        {
            *p = set.published_path(Path::new(p)).display().to_string();
        }
    }
    let json = serde_json::to_string_pretty(&report)
        .map_err(|e| Failure::new(Kind::Other, e.to_string()))?;
    // A broken gate still writes a report asked for by name; a set is
    // published only whole.
    if let Some(path) = &plan.report {
        if broken.is_none() || r.report.is_some() {
            write_file_atomic(path, json.as_bytes())?;
        }
    }
    if let Some(why) = broken {
        return Err(ConvertError::Budget(why, Box::new(report)).into());
    }
    if let Some(set) = plan.staged {
        set.publish()?;
    }
    Ok(json)
}

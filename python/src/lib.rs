//! The native half of the `lorafold` Python package (`lorafold._lorafold`):
//! models, adapters and sessions, conversion, drift and latency, over
//! lorafold-runtime and lorafold-converter. The Python half (`lorafold/`)
//! wraps reports in dataclasses and defines the exception classes.

mod convert;
mod errors;
mod measure;
mod model;

use pyo3::prelude::*;

use errors::Raise;

/// Size the CPU work of conversions, drift, bench and sessions without
/// their own `threads` (rayon's pool and RAYON_NUM_THREADS, as the CLI's
/// --threads): once per process, before any work.
#[pyfunction]
fn set_threads(py: Python<'_>, threads: usize) -> PyResult<()> {
    py.detach(|| errors::guarded(|| Ok(lorafold_runtime::model::use_threads(threads)?)))
        .raise(py)
}

/// The version of lorafold this module was built from.
#[pyfunction]
fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// lorafold's native module.
#[pymodule]
fn _lorafold(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<model::PyModel>()?;
    m.add_class::<model::PyAdapter>()?;
    m.add_class::<model::PySession>()?;
    m.add_class::<model::PyGeneration>()?;
    m.add_function(wrap_pyfunction!(convert::convert, m)?)?;
    m.add_function(wrap_pyfunction!(measure::drift, m)?)?;
    m.add_function(wrap_pyfunction!(measure::bench, m)?)?;
    m.add_function(wrap_pyfunction!(set_threads, m)?)?;
    m.add_function(wrap_pyfunction!(version, m)?)?;
    Ok(())
}

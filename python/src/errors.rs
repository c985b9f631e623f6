//! Library errors as Python exceptions: one class per kind of mistake a
//! caller can fix (a bad file, a mismatched adapter, a value out of range,
//! a context too small, a wrong combination of arguments, a broken gate),
//! the library's one-line message intact.

use std::error::Error;

use lorafold_converter::calib::CalibError;
use lorafold_converter::convert::ConvertError;
use lorafold_converter::merge::MergeError;
use lorafold_converter::round::quant::QuantError;
use lorafold_converter::write::adapter_gguf::AdapterError;
use lorafold_converter::write::output::OutputError;
use lorafold_runtime::generate::PromptError;
use lorafold_runtime::measure::{DriftError, WindowError};
use lorafold_runtime::model::RuntimeError;
use pyo3::prelude::*;
use pyo3::types::PyType;

/// The exception classes of `lorafold.errors`, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `LorafoldError`: anything else (I/O on an output, a bug).
    Other,
    /// `FileError`: an input that cannot be read or is malformed.
    File,
    /// `AdapterMismatchError`: an adapter that does not fit its model.
    Mismatch,
    /// `OutOfRangeError`: a value outside what it may be.
    Range,
    /// `ContextOverflowError`: more tokens than the context holds.
    Context,
    /// `UsageError`: arguments that contradict each other or name nothing.
    Usage,
    /// `GateError`: a conversion's bound was broken; nothing written.
    Gate,
}

impl Kind {
    fn class_name(self) -> &'static str {
        match self {
            Kind::Other => "LorafoldError",
            Kind::File => "FileError",
            Kind::Mismatch => "AdapterMismatchError",
            Kind::Range => "OutOfRangeError",
            Kind::Context => "ContextOverflowError",
            Kind::Usage => "UsageError",
            Kind::Gate => "GateError",
        }
    }
}

/// An error on its way to Python: its class and one-line message.
#[derive(Debug)]
pub struct Failure {
    /// The exception class.
    pub kind: Kind,
    /// The message, as the CLI prints it after `error: `.
    pub message: String,
    /// The conversion report of a broken gate, as JSON.
    pub report: Option<String>,
}

impl Failure {
    /// A failure of `kind` saying `message`.
    pub fn new(kind: Kind, message: impl Into<String>) -> Failure {
        Failure {
            kind,
            message: escape(message.into()),
            report: None,
        }
    }

    /// `e` as the CLI words it, as an exception of `kind`.
    pub fn of(kind: Kind, e: &(dyn Error + 'static)) -> Failure {
        Failure::new(kind, one_line(e))
    }

    /// This failure's message behind `context` (the argument it concerns).
    pub fn context(mut self, context: impl std::fmt::Display) -> Failure {
        self.message = format!("{context}: {}", self.message);
        self
    }

    /// The Python exception (`lorafold.errors.<class>`).
    pub fn into_pyerr(self, py: Python<'_>) -> PyErr {
        let class = py
            .import("lorafold.errors")
            .and_then(|m| m.getattr(self.kind.class_name()))
            .and_then(|c| Ok(c.cast_into::<PyType>()?));
        match class {
            Ok(class) => {
                let err = PyErr::from_type(class, (self.message,));
                if let Some(report) = self.report {
                    let _ = err.value(py).setattr("report_json", report);
                }
                err
            }
            Err(e) => e,
        }
    }
}

impl From<RuntimeError> for Failure {
    fn from(e: RuntimeError) -> Failure {
        let kind = match &e {
            RuntimeError::Gguf(_) | RuntimeError::Model { .. } => Kind::File,
            RuntimeError::AdapterNotModel { .. } => Kind::File,
            RuntimeError::Adapter { .. } => Kind::Mismatch,
            RuntimeError::OutOfRange { .. } => Kind::Range,
            RuntimeError::Candle(_) => Kind::Other,
        };
        Failure::of(kind, &e)
    }
}

impl From<PromptError> for Failure {
    fn from(e: PromptError) -> Failure {
        let kind = match &e {
            PromptError::TooLong { .. }
            | PromptError::TextTooLong { .. }
            | PromptError::ContextFull { .. } => Kind::Context,
            PromptError::Empty | PromptError::NoChatTemplate => Kind::Usage,
            PromptError::Tokenize(_) => Kind::Range,
            PromptError::Runtime(r) => return Failure::from_runtime_ref(r, &e),
        };
        Failure::of(kind, &e)
    }
}

impl From<DriftError> for Failure {
    fn from(e: DriftError) -> Failure {
        match e {
            DriftError::Vocabulary { .. } => Failure::of(Kind::Mismatch, &e),
            DriftError::Runtime(r) => r.into(),
        }
    }
}

impl From<WindowError> for Failure {
    fn from(e: WindowError) -> Failure {
        let kind = match &e {
            WindowError::ZeroContext => Kind::Range,
            WindowError::Tokenize(_) | WindowError::NoWindow => Kind::Usage,
        };
        Failure::of(kind, &e)
    }
}

impl From<ConvertError> for Failure {
    fn from(e: ConvertError) -> Failure {
        use ConvertError as C;
        let kind = match &e {
            C::Base(_) | C::Peft(_) | C::Text(_) | C::Io { .. } => Kind::File,
            C::Merge(MergeError::Peft(_)) => Kind::File,
            C::Merge(_) | C::ModifiedBase { .. } => Kind::Mismatch,
            C::Adapter(AdapterError::Peft(_)) => Kind::File,
            C::Adapter(AdapterError::Inexpressible { .. }) => Kind::Mismatch,
            C::Adapter(AdapterError::BadType(_)) => Kind::Range,
            C::Quant(QuantError::UnmatchedOverride { .. }) => Kind::Usage,
            C::Quant(QuantError::Overflow { .. }) => Kind::Other,
            C::Quant(_) => Kind::Range,
            C::Output(OutputError::Io { .. }) => Kind::Other,
            C::Output(_) | C::NoAdapter | C::Usage(_) => Kind::Usage,
            C::Calib(CalibError::File { .. }) => Kind::File,
            C::Calib(_) => Kind::Mismatch,
            C::Budget(_, report) => {
                let mut f = Failure::of(Kind::Gate, &e);
                f.report = serde_json::to_string_pretty(report).ok();
                return f;
            }
            C::Adapter(_) | C::Write(_) | C::Written { .. } | C::Measure { .. } => Kind::Other,
            C::Cancelled => Kind::Other,
        };
        Failure::of(kind, &e)
    }
}

impl From<OutputError> for Failure {
    fn from(e: OutputError) -> Failure {
        ConvertError::Output(e).into()
    }
}

impl From<QuantError> for Failure {
    fn from(e: QuantError) -> Failure {
        ConvertError::Quant(e).into()
    }
}

impl Failure {
    fn from_runtime_ref(r: &RuntimeError, whole: &(dyn Error + 'static)) -> Failure {
        let kind = match r {
            RuntimeError::Adapter { .. } => Kind::Mismatch,
            RuntimeError::OutOfRange { .. } => Kind::Range,
            RuntimeError::Candle(_) => Kind::Other,
            _ => Kind::File,
        };
        Failure::of(kind, whole)
    }
}

/// Any result's error as a [`Failure`] of its own kind.
pub type Fallible<T> = Result<T, Failure>;

/// The error and its causes on one line, skipping causes whose text the
/// message already includes (the library's errors embed their source), as
/// the CLI prints them.
pub fn one_line(e: &(dyn Error + 'static)) -> String {
    let mut msg = String::new();
    let mut cause: Option<&(dyn Error + 'static)> = Some(e);
    while let Some(c) = cause {
        let text = c.to_string();
        if !msg.contains(&text) {
            if !msg.is_empty() {
                msg.push_str(": ");
            }
            msg.push_str(&text);
        }
        cause = c.source();
    }
    msg
}

/// Control characters escaped: errors quote names from files, and a tensor
/// named "\x1b[2J" must not clear a notebook's terminal.
fn escape(s: String) -> String {
    lorafold_runtime::input::escape_controls(&s).into_owned()
}

/// Run `f`, turning a panic into a `LorafoldError` naming it as a bug:
/// pyo3 would raise `PanicException`, which `except Exception` misses.
pub fn guarded<T>(f: impl FnOnce() -> Fallible<T>) -> Fallible<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            Err(Failure::new(
                Kind::Other,
                format!("internal error (a bug in lorafold; please report it): {what}"),
            ))
        }
    }
}

/// A result's failure raised in Python.
pub trait Raise<T> {
    /// `Err(Failure)` as the Python exception.
    fn raise(self, py: Python<'_>) -> PyResult<T>;
}

impl<T> Raise<T> for Fallible<T> {
    fn raise(self, py: Python<'_>) -> PyResult<T> {
        self.map_err(|f| f.into_pyerr(py))
    }
}

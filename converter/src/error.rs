//! The error for input model files: GGUF, safetensors, config and tokenizer files.

use std::path::PathBuf;

use lorafold_runtime::gguf::GgufError;

/// A model file could not be read, or is malformed or unsupported.
#[derive(Debug, thiserror::Error)]
pub enum ModelFileError {
    /// A GGUF file could not be read.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// the file
        path: PathBuf,
        /// the OS error
        #[source]
        source: std::io::Error,
    },
    /// A file is malformed, or describes a model we do not support.
    #[error("{path}: {problem}")]
    Invalid {
        /// the file
        path: PathBuf,
        /// what is wrong
        problem: String,
    },
    /// A tensor holds a NaN or infinite value.
    #[error("{path}: tensor '{tensor}': {found}; a model's weights must be finite")]
    NonFinite {
        /// the file
        path: PathBuf,
        /// the tensor, as the file names it
        tensor: String,
        /// the first bad value
        found: NonFinite,
    },
}

/// The first NaN or infinite value found in a tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NonFinite {
    /// Its index in row-major order.
    pub index: usize,
    /// The value (NaN, inf or -inf).
    pub value: f32,
}

impl std::fmt::Display for NonFinite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "element {} is {}", self.index, self.value)
    }
}

/// `Err` with the first NaN or infinite value of `values`, the one check every
/// tensor read from a file goes through before it is trusted.
pub fn check_finite(values: &[f32]) -> Result<(), NonFinite> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(NonFinite {
            index,
            value: values[index],
        }),
        None => Ok(()),
    }
}

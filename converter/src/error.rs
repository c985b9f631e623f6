//! The error for input model files: GGUF, safetensors, config and tokenizer files.

use std::path::PathBuf;

use lorafold_runtime::gguf::GgufError;

/// The finiteness check the converter applies to every tensor it reads.
pub use lorafold_runtime::finite::{check_finite, NonFinite};

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

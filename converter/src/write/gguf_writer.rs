//! A streaming GGUF v3 writer: metadata and tensor infos first, then each
//! tensor's data as its turn comes, into a temporary file that is renamed into
//! place only when complete.

use lorafold_runtime::gguf::names;
use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use lorafold_runtime::gguf::value::encode_str;
use lorafold_runtime::gguf::{GgmlType, MetadataValue, DEFAULT_ALIGNMENT, GGUF_MAGIC};
use tempfile::NamedTempFile;

/// The GGUF version we write.
pub const WRITE_VERSION: u32 = 3;

/// An error writing a GGUF file; the destination is never left half-written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The OS refused a create, write or rename.
    #[error("{path}: {source}")]
    Io {
        /// the file being written
        path: PathBuf,
        /// the OS error
        #[source]
        source: std::io::Error,
    },
    /// A metadata key was added twice.
    #[error("{path}: metadata key '{key}' added twice")]
    DuplicateKey {
        /// the file being written
        path: PathBuf,
        /// the key
        key: String,
    },
    /// `general.alignment` is not a u32 power of two.
    #[error("{path}: general.alignment must be a u32 power of two, got {value}")]
    BadAlignment {
        /// the file being written
        path: PathBuf,
        /// the value given
        value: String,
    },
    /// A tensor's declaration cannot be written.
    #[error("{path}: tensor '{name}': {problem}")]
    BadTensor {
        /// the file being written
        path: PathBuf,
        /// the tensor
        name: String,
        /// what is wrong
        problem: String,
    },
    /// A tensor's data holds a value that is not finite, most often a finite
    /// value too large for the type (past f16's 65504, or a block scale that
    /// overflows f16).
    #[error("{path}: tensor '{name}': {problem}; refusing to write a value that is not finite")]
    NotFinite {
        /// the file being written
        path: PathBuf,
        /// the tensor
        name: String,
        /// which value, and what it is
        problem: String,
    },
    /// Tensor data came in an order other than the declared one.
    #[error("{path}: tensor '{got}' written out of order; '{expected}' is next")]
    OutOfOrder {
        /// the file being written
        path: PathBuf,
        /// the tensor that should come next
        expected: String,
        /// the tensor that came
        got: String,
    },
    /// The destination cannot take a file.
    #[error(transparent)]
    Destination(#[from] crate::write::output::OutputError),
    /// `finish` was called before every declared tensor was written.
    #[error("{path}: {missing} declared tensors were never written, starting with '{first}'")]
    Incomplete {
        /// the file being written
        path: PathBuf,
        /// how many are missing
        missing: usize,
        /// the first missing one
        first: String,
    },
}

#[derive(Debug, Clone)]
struct DeclaredTensor {
    name: String,
    ggml_type: GgmlType,
    dims: Vec<u64>,
    n_bytes: u64,
    offset: u64,
}

/// Collects metadata and tensor declarations; `start` writes them and returns
/// the stream that takes the tensor data.
#[derive(Debug)]
pub struct GgufWriter {
    dest: PathBuf,
    alignment: u64,
    kv: Vec<u8>,
    keys: HashSet<String>,
    tensors: Vec<DeclaredTensor>,
    names: HashSet<String>,
    finite_only: bool,
}

impl GgufWriter {
    /// A writer whose output will appear at `dest` once `finish` succeeds.
    pub fn new(dest: impl AsRef<Path>) -> GgufWriter {
        GgufWriter {
            dest: dest.as_ref().to_path_buf(),
            alignment: DEFAULT_ALIGNMENT,
            kv: Vec::new(),
            keys: HashSet::new(),
            tensors: Vec::new(),
            names: HashSet::new(),
            finite_only: true,
        }
    }

    /// Let tensors hold values that are not finite (NaN, inf, block scales
    /// that are): for test fixtures that write broken files on purpose. By
    /// default every value written is checked to be finite.
    pub fn allow_non_finite(mut self) -> GgufWriter {
        self.finite_only = false;
        self
    }

    /// Add a metadata entry. `general.alignment` also sets the data alignment.
    pub fn add_metadata(&mut self, key: &str, value: &MetadataValue<'_>) -> Result<(), WriteError> {
        if !self.keys.insert(key.to_string()) {
            return Err(WriteError::DuplicateKey {
                path: self.dest.clone(),
                key: key.into(),
            });
        }
        if key == names::ALIGNMENT {
            match value {
                MetadataValue::U32(a) if a.is_power_of_two() => self.alignment = *a as u64,
                other => {
                    return Err(WriteError::BadAlignment {
                        path: self.dest.clone(),
                        value: other.to_string(),
                    })
                }
            }
        }
        encode_str(key, &mut self.kv);
        self.kv
            .extend_from_slice(&(value.value_type() as u32).to_le_bytes());
        value.encode(&mut self.kv);
        Ok(())
    }

    /// Declare a tensor with dimensions in ggml order (ne). Data must later be
    /// written in declaration order.
    pub fn add_tensor(
        &mut self,
        name: &str,
        ggml_type: GgmlType,
        dims: &[u64],
    ) -> Result<(), WriteError> {
        let bad = |problem: String| WriteError::BadTensor {
            path: self.dest.clone(),
            name: name.into(),
            problem,
        };
        if dims.len() > lorafold_runtime::gguf::reader::MAX_DIMS {
            return Err(bad(format!(
                "{} dimensions, at most 4 are allowed",
                dims.len()
            )));
        }
        if dims
            .first()
            .is_some_and(|&d| d % ggml_type.block_size() != 0)
        {
            return Err(bad(format!(
                "row length {} is not a multiple of {ggml_type}'s block size {}",
                dims[0],
                ggml_type.block_size()
            )));
        }
        let n_bytes = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .and_then(|n| ggml_type.bytes_for(n))
            .ok_or_else(|| bad(format!("dimensions {dims:?} overflow")))?;
        if !self.names.insert(name.to_string()) {
            return Err(bad("declared twice".into()));
        }
        let offset = self
            .tensors
            .last()
            .map_or(0, |t| align(t.offset + t.n_bytes, self.alignment));
        self.tensors.push(DeclaredTensor {
            name: name.into(),
            ggml_type,
            dims: dims.to_vec(),
            n_bytes,
            offset,
        });
        Ok(())
    }

    /// Write the header, metadata and tensor infos to a temporary file beside
    /// the destination; the returned stream takes the tensor data.
    pub fn start(mut self) -> Result<GgufStream, WriteError> {
        // Offsets were computed with the alignment known at the time; recompute
        // in case general.alignment arrived after some tensors.
        let mut next = 0;
        for t in &mut self.tensors {
            t.offset = next;
            next = align(t.offset + t.n_bytes, self.alignment);
        }
        let io = |source| WriteError::Io {
            path: self.dest.clone(),
            source,
        };
        crate::write::output::check_file_destination(&self.dest)?;
        crate::write::output::sweep_stale_partials(&self.dest);
        let (tmp, live) = crate::write::output::partial_file(&self.dest).map_err(io)?;
        let out = BufWriter::with_capacity(1 << 20, tmp.reopen().map_err(io)?);

        let mut head = Vec::with_capacity(24 + self.kv.len() + self.tensors.len() * 64);
        head.extend_from_slice(&GGUF_MAGIC);
        head.extend_from_slice(&WRITE_VERSION.to_le_bytes());
        head.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        head.extend_from_slice(&(self.keys.len() as u64).to_le_bytes());
        head.extend_from_slice(&self.kv);
        for t in &self.tensors {
            encode_str(&t.name, &mut head);
            head.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                head.extend_from_slice(&d.to_le_bytes());
            }
            head.extend_from_slice(&t.ggml_type.id().to_le_bytes());
            head.extend_from_slice(&t.offset.to_le_bytes());
        }
        if !self.tensors.is_empty() {
            head.resize(align(head.len() as u64, self.alignment) as usize, 0);
        }
        let mut stream = GgufStream {
            dest: self.dest,
            tmp,
            out,
            tensors: self.tensors,
            next: 0,
            part: 0,
            alignment: self.alignment,
            written: 0,
            head: Vec::new(),
            finite_only: self.finite_only,
            _live: live,
        };
        stream.put(&head)?;
        stream.head = head;
        Ok(stream)
    }
}

/// Takes tensor data in declaration order; `finish` renames the file into place.
/// Dropping it before then removes the temporary file.
#[derive(Debug)]
pub struct GgufStream {
    dest: PathBuf,
    tmp: NamedTempFile,
    out: BufWriter<File>,
    tensors: Vec<DeclaredTensor>,
    next: usize,
    /// Bytes of the next tensor written so far, when written in parts.
    part: u64,
    alignment: u64,
    written: u64,
    /// The header as written, for [`GgufStream::patch`].
    head: Vec<u8>,
    /// Whether data is checked to be finite before it is written.
    finite_only: bool,
    _live: crate::write::output::LivePartial,
}

impl GgufStream {
    /// Name, type and dims (ggml order) of the tensor whose data comes next.
    pub fn next_tensor(&self) -> Option<(&str, GgmlType, &[u64])> {
        self.tensors
            .get(self.next)
            .map(|t| (t.name.as_str(), t.ggml_type, t.dims.as_slice()))
    }

    /// Write the data of the next declared tensor, which must be `name`.
    pub fn write_tensor(&mut self, name: &str, data: &[u8]) -> Result<(), WriteError> {
        if self.part != 0 {
            return Err(self.bad_tensor(name, "is being written in parts".into()));
        }
        let expected = self.declared(name)?.n_bytes;
        if data.len() as u64 != expected {
            let t = &self.tensors[self.next];
            let problem = format!(
                "{} bytes of data given, {} {:?} needs {}",
                data.len(),
                t.ggml_type,
                t.dims,
                t.n_bytes
            );
            return Err(self.bad_tensor(name, problem));
        }
        self.write_part(name, data)
    }

    /// Write the next part of the next declared tensor, which must be
    /// `name`; the tensor is complete once its parts add up to its size.
    /// Parts hold whole blocks. A tensor too large to hold in memory (a 7B
    /// model's token embedding: 2.2 GB in f32) streams through this.
    pub fn write_part(&mut self, name: &str, data: &[u8]) -> Result<(), WriteError> {
        let t = self.declared(name)?;
        let (n_bytes, ggml_type) = (t.n_bytes, t.ggml_type);
        if self.part + data.len() as u64 > n_bytes {
            let problem = format!(
                "{} bytes of data given after {}, its {ggml_type:?} data is {n_bytes}",
                data.len(),
                self.part
            );
            return Err(self.bad_tensor(name, problem));
        }
        // What is written is checked, not only what was read: a finite
        // value can still overflow the type it is written in.
        if let Some(problem) = self
            .finite_only
            .then(|| crate::round::quant::first_non_finite(ggml_type, data))
            .flatten()
        {
            return Err(WriteError::NotFinite {
                path: self.dest.clone(),
                name: name.into(),
                problem,
            });
        }
        self.put(data)?;
        self.part += data.len() as u64;
        if self.part == n_bytes {
            let pad = align(n_bytes, self.alignment) - n_bytes;
            self.next += 1;
            self.part = 0;
            self.put(&vec![0u8; pad as usize])?;
        }
        Ok(())
    }

    /// The next declared tensor, checked to be `name`.
    fn declared(&self, name: &str) -> Result<&DeclaredTensor, WriteError> {
        let Some(t) = self.tensors.get(self.next) else {
            return Err(self.bad_tensor(
                name,
                "was never declared (all declared tensors are written)".into(),
            ));
        };
        if t.name != name {
            return Err(WriteError::OutOfOrder {
                path: self.dest.clone(),
                expected: t.name.clone(),
                got: name.into(),
            });
        }
        Ok(t)
    }

    fn bad_tensor(&self, name: &str, problem: String) -> WriteError {
        WriteError::BadTensor {
            path: self.dest.clone(),
            name: name.into(),
            problem,
        }
    }

    /// Overwrite the one occurrence of `placeholder` in the header with
    /// `value` (as long): how a value known only after the data (an input's
    /// sha256, computed beside the conversion) gets into the metadata.
    /// False when the header does not hold it.
    pub fn patch(&mut self, placeholder: &str, value: &str) -> Result<bool, WriteError> {
        let (from, to) = (placeholder.as_bytes(), value.as_bytes());
        let at = self.head.windows(from.len()).position(|w| w == from);
        let (Some(at), true) = (at, from.len() == to.len() && !from.is_empty()) else {
            return Ok(false);
        };
        let io = |source| WriteError::Io {
            path: self.dest.clone(),
            source,
        };
        self.out.flush().map_err(io)?;
        let f = self.out.get_mut();
        f.seek(SeekFrom::Start(at as u64)).map_err(io)?;
        f.write_all(to).map_err(io)?;
        f.seek(SeekFrom::End(0)).map_err(io)?;
        self.head[at..at + to.len()].copy_from_slice(to);
        Ok(true)
    }

    /// Flush, sync and rename into place; returns the file's size in bytes.
    pub fn finish(mut self) -> Result<u64, WriteError> {
        if let Some(t) = self.tensors.get(self.next) {
            return Err(WriteError::Incomplete {
                path: self.dest.clone(),
                missing: self.tensors.len() - self.next,
                first: t.name.clone(),
            });
        }
        let dest = self.dest.clone();
        let io = |source| WriteError::Io {
            path: dest.clone(),
            source,
        };
        self.out.flush().map_err(io)?;
        self.out.get_ref().sync_data().map_err(io)?;
        self.tmp.persist(&self.dest).map_err(|e| io(e.error))?;
        Ok(self.written)
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), WriteError> {
        self.out.write_all(bytes).map_err(|source| WriteError::Io {
            path: self.dest.clone(),
            source,
        })?;
        self.written += bytes.len() as u64;
        Ok(())
    }
}

fn align(n: u64, alignment: u64) -> u64 {
    n.div_ceil(alignment) * alignment
}

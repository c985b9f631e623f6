//! A GGUF v2/v3 reader over a memory map: every count and length is checked
//! against the bytes that remain before it is trusted.

use crate::gguf::names;
use std::borrow::Cow;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::dtype::GgmlType;
use super::value::{MetadataArray, MetadataValue, ValueType};

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Tensor data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The most dimensions a ggml tensor has.
pub const MAX_DIMS: usize = 4;
/// Nesting bound for arrays of arrays; deeper files are refused rather than
/// risking the stack on a hostile file.
pub const MAX_ARRAY_DEPTH: usize = 8;

// Smallest encodings, used to refuse counts the remaining bytes cannot hold
// before looping over them: a key (u64 length) + type tag + a 1-byte value,
// and a tensor info (u64 name length + u32 n_dims + u32 type + u64 offset).
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 4 + 8;

/// What is wrong with a file, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatError {
    /// Byte offset in the file where the problem was found.
    pub offset: u64,
    /// The key or tensor being read, if any ("key 'general.name'", "tensor 'blk.0.attn_q.weight'").
    pub context: Option<String>,
    /// What is wrong.
    pub problem: String,
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.context {
            Some(c) => write!(f, "at byte {}, {}: {}", self.offset, c, self.problem),
            None => write!(f, "at byte {}: {}", self.offset, self.problem),
        }
    }
}

impl std::error::Error for FormatError {}

/// An error opening or reading a GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened, sized or mapped.
    #[error("{}: {source}", path.display())]
    Io {
        /// the file
        path: PathBuf,
        /// the OS error
        #[source]
        source: std::io::Error,
    },
    /// The file is not a well-formed GGUF file.
    #[error("{}: {error}", path.display())]
    Format {
        /// the file
        path: PathBuf,
        /// what is wrong and where
        #[source]
        error: FormatError,
    },
}

/// One tensor's entry in the GGUF tensor-info table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Tensor name ("blk.0.attn_q.weight").
    pub name: String,
    n_dims: u8,
    ne: [u64; MAX_DIMS],
    /// Element type.
    pub ggml_type: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
    /// Bytes of data.
    pub n_bytes: u64,
}

impl TensorInfo {
    /// Dimensions in ggml order (`ne`: innermost first; the reverse of torch's shape).
    pub fn dims(&self) -> &[u64] {
        &self.ne[..self.n_dims as usize]
    }

    /// Shape in torch order (outermost first).
    pub fn shape(&self) -> Vec<u64> {
        self.dims().iter().rev().copied().collect()
    }

    /// Number of elements.
    pub fn n_elements(&self) -> u64 {
        self.dims().iter().product()
    }
}

enum Storage {
    Mapped(Mmap, std::fs::File),
    Heap(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped(m, _) => m,
            Storage::Heap(v) => v,
        }
    }
}

/// Where one metadata entry lies: the key, then a 4-byte type tag, then the
/// value up to `value_end`. Kept to 24 bytes so the table stays small.
struct MetaEntry {
    key_start: usize,
    key_len: u32,
    vtype: ValueType,
    value_end: usize,
}

impl MetaEntry {
    fn key(&self) -> Range<usize> {
        self.key_start..self.key_start + self.key_len as usize
    }

    fn value(&self) -> Range<usize> {
        self.key().end + 4..self.value_end
    }
}

/// A parsed GGUF file whose tensor data stays in the memory map.
pub struct GgufFile {
    path: PathBuf,
    storage: Storage,
    layout: Layout,
}

impl GgufFile {
    /// Map and parse the file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile, GgufError> {
        let path = path.as_ref();
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = crate::input::open_regular(path, "a GGUF file").map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let storage = if len == 0 {
            Storage::Heap(Vec::new())
        } else {
            // SAFETY: the map is read-only; like every mmap reader we rely on
            // the file not being truncated underneath us while it is open.
            let map = unsafe { Mmap::map(&file) }.map_err(io)?;
            Storage::Mapped(map, file)
        };
        GgufFile::parse(path.to_path_buf(), storage)
    }

    /// Parse a GGUF image held in memory; `label` names it in errors.
    pub fn from_bytes(bytes: Vec<u8>, label: impl Into<PathBuf>) -> Result<GgufFile, GgufError> {
        GgufFile::parse(label.into(), Storage::Heap(bytes))
    }

    fn parse(path: PathBuf, storage: Storage) -> Result<GgufFile, GgufError> {
        match Layout::parse(storage.bytes()) {
            Ok(layout) => Ok(GgufFile {
                path,
                storage,
                layout,
            }),
            Err(error) => Err(GgufError::Format { path, error }),
        }
    }

    /// The path (or label) the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// GGUF format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.layout.version
    }

    /// Tensor data alignment (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.layout.alignment
    }

    /// Offset of the tensor data section from the start of the file.
    pub fn data_offset(&self) -> u64 {
        self.layout.data_offset
    }

    /// A copy of the tensor's data read with pread, not through the map:
    /// touching a mapped page maps its neighbours too (the kernel's
    /// fault-around), so reading 61 small norms through the map made 17 MB of
    /// SmolLM2 resident at load. Use it for small tensors that are copied anyway.
    pub fn tensor_data_copy(&self, info: &TensorInfo) -> std::io::Result<Vec<u8>> {
        match &self.storage {
            #[cfg(unix)]
            Storage::Mapped(_, file) => {
                use std::os::unix::fs::FileExt;
                let mut buf = vec![0u8; info.n_bytes as usize];
                file.read_exact_at(&mut buf, self.layout.data_offset + info.offset)?;
                Ok(buf)
            }
            _ => Ok(self.tensor_data(info).to_vec()),
        }
    }

    /// Drop the mapped pages under `data` (a slice of [`GgufFile::raw_bytes`])
    /// from this process once they have been copied elsewhere, so resident
    /// memory holds them once. Reading them again faults them back in.
    pub fn release_pages(&self, data: &[u8]) {
        #[cfg(unix)]
        if let Storage::Mapped(map, _) = &self.storage {
            let offset = data.as_ptr() as usize - map.as_ptr() as usize;
            assert!(offset + data.len() <= map.len(), "not a slice of the map");
            // SAFETY: the map is private and read-only, so DONTNEED only
            // drops clean pages that a later read maps again from the file.
            // A failure leaves the pages resident, which is only memory.
            let _ = unsafe {
                map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, data.len())
            };
        }
    }

    /// The whole file's bytes (the map).
    pub fn raw_bytes(&self) -> &[u8] {
        self.storage.bytes()
    }

    /// Size of the whole file in bytes.
    pub fn file_size(&self) -> u64 {
        self.storage.bytes().len() as u64
    }

    /// Number of metadata entries.
    pub fn metadata_len(&self) -> usize {
        self.layout.entries.len()
    }

    /// Metadata entries in file order.
    pub fn metadata(&self) -> impl Iterator<Item = (&str, MetadataValue<'_>)> + '_ {
        self.layout.entries.iter().map(|e| self.entry(e))
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<MetadataValue<'_>> {
        let b = self.storage.bytes();
        self.layout
            .sorted_keys
            .binary_search_by(|&i| b[self.layout.entries[i].key()].cmp(key.as_bytes()))
            .ok()
            .map(|i| {
                self.entry(&self.layout.entries[self.layout.sorted_keys[i]])
                    .1
            })
    }

    /// `key` as a string, if present and a string.
    pub fn get_str(&self, key: &str) -> Option<Cow<'_, str>> {
        match self.get(key)? {
            MetadataValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// `key` as a list of strings, if present and an array of strings.
    pub fn get_strings(&self, key: &str) -> Option<Vec<Cow<'_, str>>> {
        match self.get(key)? {
            MetadataValue::Array(a) => a.strings().map(|s| s.collect()),
            _ => None,
        }
    }

    /// `key` as an unsigned integer, if present and a non-negative integer.
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key)?.as_u64()
    }

    /// `key` as a float, if present and numeric.
    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key)?.as_f64()
    }

    /// Tensor infos in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.layout.tensors
    }

    /// The tensor named `name`, if present.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.layout
            .sorted_tensors
            .binary_search_by(|&i| self.layout.tensors[i].name.as_str().cmp(name))
            .ok()
            .map(|i| &self.layout.tensors[self.layout.sorted_tensors[i]])
    }

    /// The tensor's data, borrowed from the map (bounds were checked at open).
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        let start = (self.layout.data_offset + info.offset) as usize;
        &self.storage.bytes()[start..start + info.n_bytes as usize]
    }

    fn entry(&self, e: &MetaEntry) -> (&str, MetadataValue<'_>) {
        let b = self.storage.bytes();
        let key = std::str::from_utf8(&b[e.key()]).expect("keys were checked to be UTF-8 at open");
        (key, decode_validated(e.vtype, &b[e.value()]).0)
    }
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.layout.version)
            .field("metadata", &self.layout.entries.len())
            .field("tensors", &self.layout.tensors.len())
            .finish()
    }
}

/// Decode one value whose encoding the reader already checked; returns the value
/// and the bytes it used.
pub(crate) fn decode_validated(vtype: ValueType, bytes: &[u8]) -> (MetadataValue<'_>, usize) {
    fn arr<const N: usize>(b: &[u8]) -> [u8; N] {
        b[..N].try_into().expect("validated length")
    }
    use MetadataValue as V;
    match vtype {
        ValueType::U8 => (V::U8(bytes[0]), 1),
        ValueType::I8 => (V::I8(bytes[0] as i8), 1),
        ValueType::Bool => (V::Bool(bytes[0] != 0), 1),
        ValueType::U16 => (V::U16(u16::from_le_bytes(arr(bytes))), 2),
        ValueType::I16 => (V::I16(i16::from_le_bytes(arr(bytes))), 2),
        ValueType::U32 => (V::U32(u32::from_le_bytes(arr(bytes))), 4),
        ValueType::I32 => (V::I32(i32::from_le_bytes(arr(bytes))), 4),
        ValueType::F32 => (V::F32(f32::from_le_bytes(arr(bytes))), 4),
        ValueType::U64 => (V::U64(u64::from_le_bytes(arr(bytes))), 8),
        ValueType::I64 => (V::I64(i64::from_le_bytes(arr(bytes))), 8),
        ValueType::F64 => (V::F64(f64::from_le_bytes(arr(bytes))), 8),
        ValueType::String => {
            let n = u64::from_le_bytes(arr(bytes)) as usize;
            let s = std::str::from_utf8(&bytes[8..8 + n])
                .expect("strings were checked to be UTF-8 at open");
            (V::String(Cow::Borrowed(s)), 8 + n)
        }
        ValueType::Array => {
            let mut cur = Cursor {
                bytes,
                pos: 0,
                base: 0,
            };
            cur.skip_value(ValueType::Array, 0, &|| None)
                .expect("arrays were checked at open");
            let elem = ValueType::from_id(u32::from_le_bytes(arr(bytes))).expect("checked at open");
            let len = u64::from_le_bytes(arr(&bytes[4..])) as usize;
            let used = cur.pos;
            (
                V::Array(MetadataArray::Encoded {
                    elem,
                    len,
                    bytes: &bytes[12..used],
                }),
                used,
            )
        }
    }
}

/// Reads little-endian fields, refusing any read past the end.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// Offset of `bytes[0]` in the file, for error messages.
    base: u64,
}

type Ctx<'c> = dyn Fn() -> Option<String> + 'c;

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn err(&self, at: usize, ctx: &Ctx, problem: String) -> FormatError {
        FormatError {
            offset: self.base + at as u64,
            context: ctx(),
            problem,
        }
    }

    fn take(&mut self, n: u64, what: &str, ctx: &Ctx) -> Result<&'a [u8], FormatError> {
        if n > self.remaining() {
            return Err(self.err(
                self.pos,
                ctx,
                format!(
                    "{what} needs {n} bytes but the file ends {} bytes later",
                    self.remaining()
                ),
            ));
        }
        let s = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn u32(&mut self, what: &str, ctx: &Ctx) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(
            self.take(4, what, ctx)?.try_into().unwrap(),
        ))
    }

    fn u64(&mut self, what: &str, ctx: &Ctx) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(
            self.take(8, what, ctx)?.try_into().unwrap(),
        ))
    }

    /// A GGUF string; returns its byte range within `bytes`.
    fn string(&mut self, what: &str, ctx: &Ctx) -> Result<Range<usize>, FormatError> {
        let at = self.pos;
        // `what` only matters on error; no per-string formatting on the hot path.
        let len = self.u64("a string length", ctx)?;
        if len > self.remaining() {
            return Err(self.err(
                at,
                ctx,
                format!(
                    "{what} claims {len} bytes but only {} remain in the file",
                    self.remaining()
                ),
            ));
        }
        let start = self.pos;
        let s = self.take(len, what, ctx)?;
        if let Err(e) = std::str::from_utf8(s) {
            return Err(self.err(
                start + e.valid_up_to(),
                ctx,
                format!("{what} is not valid UTF-8"),
            ));
        }
        Ok(start..self.pos)
    }

    fn value_type(&mut self, what: &str, ctx: &Ctx) -> Result<ValueType, FormatError> {
        let at = self.pos;
        let id = self.u32(what, ctx)?;
        ValueType::from_id(id)
            .ok_or_else(|| self.err(at, ctx, format!("unknown {what} {id} (known: 0-12)")))
    }

    /// Check and step over one encoded value of type `vtype`.
    fn skip_value(&mut self, vtype: ValueType, depth: usize, ctx: &Ctx) -> Result<(), FormatError> {
        if let Some(n) = vtype.fixed_size() {
            let at = self.pos;
            let b = self.take(n as u64, vtype.name(), ctx)?;
            if vtype == ValueType::Bool && b[0] > 1 {
                return Err(self.err(at, ctx, format!("bool value {} is neither 0 nor 1", b[0])));
            }
            return Ok(());
        }
        if vtype == ValueType::String {
            self.string("string value", ctx)?;
            return Ok(());
        }
        if depth >= MAX_ARRAY_DEPTH {
            return Err(self.err(
                self.pos,
                ctx,
                format!("arrays nested deeper than {MAX_ARRAY_DEPTH} levels"),
            ));
        }
        let at = self.pos;
        let elem = self.value_type("array element type", ctx)?;
        let count = self.u64("array length", ctx)?;
        let min_each = elem
            .fixed_size()
            .map(|n| n as u64)
            .unwrap_or(if elem == ValueType::String { 8 } else { 12 });
        match count.checked_mul(min_each) {
            Some(need) if need <= self.remaining() => {}
            _ => {
                return Err(self.err(
                    at,
                    ctx,
                    format!(
                        "array of {count} {} values needs at least {} bytes but only {} remain in the file",
                        elem.name(),
                        count.saturating_mul(min_each),
                        self.remaining()
                    ),
                ))
            }
        }
        if let Some(n) = elem.fixed_size() {
            self.take(count * n as u64, "array data", ctx)?;
            if elem == ValueType::Bool {
                let data = &self.bytes[self.pos - count as usize..self.pos];
                if let Some(i) = data.iter().position(|&b| b > 1) {
                    return Err(self.err(
                        self.pos - count as usize + i,
                        ctx,
                        format!("bool array element {i} is neither 0 nor 1"),
                    ));
                }
            }
        } else {
            // Each element consumes at least `min_each` bytes, so this loop is
            // bounded by the file's size, whatever `count` claims.
            for _ in 0..count {
                self.skip_value(elem, depth + 1, ctx)?;
            }
        }
        Ok(())
    }
}

struct Layout {
    version: u32,
    alignment: u64,
    data_offset: u64,
    entries: Vec<MetaEntry>,
    sorted_keys: Vec<usize>,
    tensors: Vec<TensorInfo>,
    sorted_tensors: Vec<usize>,
}

/// A tensor-info record as it lies in the file.
struct RawTensorInfo {
    at: usize,
    name: Range<usize>,
    n_dims: u8,
    ne: [u64; MAX_DIMS],
    ggml_type: GgmlType,
    offset: u64,
    n_bytes: u64,
}

/// What a walk over the header learns besides the entries and tensor infos.
struct Header {
    version: u32,
    alignment: u64,
    end_of_infos: usize,
}

impl Layout {
    /// Two walks over the header: the first checks everything and allocates
    /// nothing; the second collects exactly what the first counted, so memory
    /// follows the entries the file really holds, not the counts it claims.
    fn parse(bytes: &[u8]) -> Result<Layout, FormatError> {
        let (mut n_kv, mut n_tensors) = (0usize, 0usize);
        Layout::walk(bytes, &mut |_| n_kv += 1, &mut |_| n_tensors += 1)?;
        let mut entries = Vec::with_capacity(n_kv);
        let mut raw = Vec::with_capacity(n_tensors);
        let header = Layout::walk(bytes, &mut |e| entries.push(e), &mut |t| raw.push(t))?;
        let (alignment, end_of_infos) = (header.alignment, header.end_of_infos);
        let err = |at: usize, context: String, problem: String| FormatError {
            offset: at as u64,
            context: Some(context),
            problem,
        };

        let sorted_keys = sorted_unique(&entries, |e| &bytes[e.key()]).map_err(|i| {
            let key = String::from_utf8_lossy(&bytes[entries[i].key()]);
            err(
                entries[i].key_start - 8,
                format!("key '{key}'"),
                "duplicate key".into(),
            )
        })?;
        let name_of = |t: &RawTensorInfo| {
            std::str::from_utf8(&bytes[t.name.clone()]).expect("checked by walk()")
        };
        let sorted_tensors = sorted_unique(&raw, |t| &bytes[t.name.clone()]).map_err(|i| {
            err(
                raw[i].at,
                format!("tensor '{}'", name_of(&raw[i])),
                "duplicate tensor name".into(),
            )
        })?;

        let data_offset = (end_of_infos as u64).div_ceil(alignment) * alignment;
        let file_len = bytes.len() as u64;
        if !raw.is_empty() && data_offset > file_len {
            return Err(FormatError {
                offset: end_of_infos as u64,
                context: None,
                problem: format!("file ends before the tensor data section at byte {data_offset}"),
            });
        }
        let mut order: Vec<usize> = (0..raw.len()).collect();
        order.sort_by_key(|&i| raw[i].offset);
        let mut prev: Option<&RawTensorInfo> = None;
        for &i in &order {
            let t = &raw[i];
            let ctx = || format!("tensor '{}'", name_of(t));
            if t.offset % alignment != 0 {
                return Err(err(
                    t.at,
                    ctx(),
                    format!(
                        "data offset {} is not a multiple of the alignment {alignment}",
                        t.offset
                    ),
                ));
            }
            let end = data_offset
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(t.n_bytes));
            if end.is_none_or(|e| e > file_len) {
                return Err(err(
                    t.at,
                    ctx(),
                    format!(
                        "data ({} bytes at data offset {}) runs past the end of the file ({file_len} bytes)",
                        t.n_bytes, t.offset
                    ),
                ));
            }
            if let Some(p) = prev.filter(|p| t.offset < p.offset + p.n_bytes) {
                return Err(err(
                    t.at,
                    ctx(),
                    format!("data overlaps tensor '{}'", name_of(p)),
                ));
            }
            prev = Some(t);
        }
        let tensors = raw
            .iter()
            .map(|t| TensorInfo {
                name: name_of(t).to_owned(),
                n_dims: t.n_dims,
                ne: t.ne,
                ggml_type: t.ggml_type,
                offset: t.offset,
                n_bytes: t.n_bytes,
            })
            .collect();
        Ok(Layout {
            version: header.version,
            alignment,
            data_offset,
            entries,
            sorted_keys,
            tensors,
            sorted_tensors,
        })
    }

    /// Check the header, metadata and tensor infos, handing each entry and
    /// tensor info to the callbacks.
    fn walk(
        bytes: &[u8],
        on_entry: &mut dyn FnMut(MetaEntry),
        on_tensor: &mut dyn FnMut(RawTensorInfo),
    ) -> Result<Header, FormatError> {
        let mut cur = Cursor {
            bytes,
            pos: 0,
            base: 0,
        };
        let none: &Ctx = &|| None;
        let magic = cur.take(4, "the magic number", none)?;
        if magic != GGUF_MAGIC {
            return Err(cur.err(
                0,
                none,
                format!("not a GGUF file: starts with {magic:02x?}, expected \"GGUF\""),
            ));
        }
        let version = cur.u32("the version", none)?;
        match version {
            2 | 3 => {}
            1 => return Err(cur.err(4, none, "GGUF v1 is not supported (v2 and v3 are)".into())),
            v if matches!(v.swap_bytes(), 1..=3) => {
                return Err(cur.err(4, none, "big-endian GGUF is not supported".into()));
            }
            v => {
                return Err(cur.err(
                    4,
                    none,
                    format!("unsupported GGUF version {v} (v2 and v3 are supported)"),
                ))
            }
        }
        let n_tensors = cur.u64("the tensor count", none)?;
        let n_kv = cur.u64("the metadata count", none)?;
        let need = n_kv.checked_mul(MIN_KV_BYTES).and_then(|a| {
            n_tensors
                .checked_mul(MIN_TENSOR_INFO_BYTES)
                .and_then(|b| a.checked_add(b))
        });
        if need.is_none_or(|n| n > cur.remaining()) {
            return Err(cur.err(
                8,
                none,
                format!(
                    "header claims {n_tensors} tensors and {n_kv} metadata entries, more than the {} bytes that follow can hold",
                    cur.remaining()
                ),
            ));
        }

        let mut alignment = DEFAULT_ALIGNMENT;
        for i in 0..n_kv {
            let entry_ctx = move || Some(format!("metadata entry {i}"));
            let key_at = cur.pos;
            let key = cur.string("key", &entry_ctx)?;
            if key.len() > u32::MAX as usize {
                return Err(cur.err(key_at, &entry_ctx, "key is longer than 4 GiB".into()));
            }
            let key_str = std::str::from_utf8(&bytes[key.clone()]).expect("checked by string()");
            let ctx = || Some(format!("key '{key_str}'"));
            let vtype = cur.value_type("value type", &ctx)?;
            let start = cur.pos;
            cur.skip_value(vtype, 0, &ctx)?;
            if key_str == names::ALIGNMENT {
                alignment = match decode_validated(vtype, &bytes[start..cur.pos]).0 {
                    MetadataValue::U32(a) if a.is_power_of_two() => a as u64,
                    other => {
                        return Err(cur.err(
                            start,
                            &ctx,
                            format!("alignment must be a u32 power of two, got {other}"),
                        ))
                    }
                };
            }
            on_entry(MetaEntry {
                key_start: key.start,
                key_len: key.len() as u32,
                vtype,
                value_end: cur.pos,
            });
        }

        for i in 0..n_tensors {
            let at = cur.pos;
            let idx_ctx = move || Some(format!("tensor info {i}"));
            let name = cur.string("tensor name", &idx_ctx)?;
            let name_str = std::str::from_utf8(&bytes[name.clone()]).expect("checked by string()");
            let ctx = || Some(format!("tensor '{name_str}'"));
            let dims_at = cur.pos;
            let n_dims = cur.u32("dimension count", &ctx)? as usize;
            if n_dims > MAX_DIMS {
                return Err(cur.err(
                    dims_at,
                    &ctx,
                    format!("{n_dims} dimensions, at most {MAX_DIMS} are allowed"),
                ));
            }
            let mut ne = [1u64; MAX_DIMS];
            for d in ne.iter_mut().take(n_dims) {
                *d = cur.u64("dimension", &ctx)?;
                if *d > i64::MAX as u64 {
                    return Err(cur.err(
                        cur.pos - 8,
                        &ctx,
                        format!("dimension {d} is out of range"),
                    ));
                }
            }
            let type_at = cur.pos;
            let type_id = cur.u32("tensor type", &ctx)?;
            let ggml_type = GgmlType::from_id(type_id)
                .ok_or_else(|| cur.err(type_at, &ctx, format!("unknown ggml type id {type_id}")))?;
            let offset = cur.u64("data offset", &ctx)?;
            let n_elements = match ne.iter().try_fold(1u64, |a, &d| a.checked_mul(d)) {
                Some(n) if n <= i64::MAX as u64 => n,
                _ => {
                    return Err(cur.err(
                        dims_at,
                        &ctx,
                        format!("dimensions {:?} overflow the element count", &ne[..n_dims]),
                    ))
                }
            };
            if ne[0] % ggml_type.block_size() != 0 {
                return Err(cur.err(
                    dims_at,
                    &ctx,
                    format!(
                        "row length {} is not a multiple of {ggml_type}'s block size {}",
                        ne[0],
                        ggml_type.block_size()
                    ),
                ));
            }
            let n_bytes = ggml_type
                .bytes_for(n_elements)
                .ok_or_else(|| cur.err(dims_at, &ctx, "data size overflows".into()))?;
            on_tensor(RawTensorInfo {
                at,
                name,
                n_dims: n_dims as u8,
                ne,
                ggml_type,
                offset,
                n_bytes,
            });
        }
        Ok(Header {
            version,
            alignment,
            end_of_infos: cur.pos,
        })
    }
}

/// Indices of `items` sorted by `key`, or the index of the later of the first
/// two items found with equal keys.
fn sorted_unique<'a, T>(
    items: &'a [T],
    key: impl Fn(&'a T) -> &'a [u8],
) -> Result<Vec<usize>, usize> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by(|&a, &b| key(&items[a]).cmp(key(&items[b])).then(a.cmp(&b)));
    match order
        .windows(2)
        .find(|w| key(&items[w[0]]) == key(&items[w[1]]))
    {
        Some(w) => Err(w[1]),
        None => Ok(order),
    }
}

//! Quantized weights used where they lie in the memory map: candle's
//! `QuantizedType` implemented over mapped ggml blocks, so the CPU kernels
//! (k_quants::matmul) read the file's pages directly instead of a heap copy.

use std::sync::Arc;

use candle_core::quantized::k_quants::{self, GgmlType as Block};
use candle_core::quantized::{GgmlDType, QStorage, QTensor, QuantizedType};
use candle_core::{CpuStorage, Device, Result};
use half::{bf16, f16};

use crate::gguf::{GgufFile, TensorInfo};

/// A tensor's blocks inside a mapped GGUF file.
pub struct MappedBlocks {
    file: Arc<GgufFile>,
    start: usize,
    len: usize,
    dtype: GgmlDType,
}

impl MappedBlocks {
    fn bytes(&self) -> &[u8] {
        &self.file.raw_bytes()[self.start..self.start + self.len]
    }

    fn blocks<T: Block>(&self) -> &[T] {
        let b = self.bytes();
        // SAFETY: the reader checked that the range lies in the file and holds
        // a whole number of blocks; GGUF aligns tensor data (32 bytes by
        // default) in a page-aligned map, which covers every block's alignment
        // (checked below); ggml blocks are plain old data.
        assert_eq!(
            b.as_ptr() as usize % std::mem::align_of::<T>(),
            0,
            "misaligned tensor data"
        );
        unsafe {
            std::slice::from_raw_parts(b.as_ptr() as *const T, b.len() / std::mem::size_of::<T>())
        }
    }
}

macro_rules! dispatch {
    ($self:ident, $f:ident $(, $arg:expr)*) => {
        match $self.dtype {
            GgmlDType::F32 => $f::<f32>($self.blocks::<f32>() $(, $arg)*),
            GgmlDType::F16 => $f::<f16>($self.blocks::<f16>() $(, $arg)*),
            GgmlDType::BF16 => $f::<bf16>($self.blocks::<bf16>() $(, $arg)*),
            GgmlDType::Q4_0 => $f::<k_quants::BlockQ4_0>($self.blocks() $(, $arg)*),
            GgmlDType::Q4_1 => $f::<k_quants::BlockQ4_1>($self.blocks() $(, $arg)*),
            GgmlDType::Q5_0 => $f::<k_quants::BlockQ5_0>($self.blocks() $(, $arg)*),
            GgmlDType::Q5_1 => $f::<k_quants::BlockQ5_1>($self.blocks() $(, $arg)*),
            GgmlDType::Q8_0 => $f::<k_quants::BlockQ8_0>($self.blocks() $(, $arg)*),
            GgmlDType::Q8_1 => $f::<k_quants::BlockQ8_1>($self.blocks() $(, $arg)*),
            GgmlDType::Q2K => $f::<k_quants::BlockQ2K>($self.blocks() $(, $arg)*),
            GgmlDType::Q3K => $f::<k_quants::BlockQ3K>($self.blocks() $(, $arg)*),
            GgmlDType::Q4K => $f::<k_quants::BlockQ4K>($self.blocks() $(, $arg)*),
            GgmlDType::Q5K => $f::<k_quants::BlockQ5K>($self.blocks() $(, $arg)*),
            GgmlDType::Q6K => $f::<k_quants::BlockQ6K>($self.blocks() $(, $arg)*),
            GgmlDType::Q8K => $f::<k_quants::BlockQ8K>($self.blocks() $(, $arg)*),
        }
    };
}

fn matmul_t<T: Block>(
    xs: &[T],
    mkn: (usize, usize, usize),
    lhs: &[f32],
    dst: &mut [f32],
) -> Result<()> {
    k_quants::matmul(mkn, lhs, xs, dst)
}

fn matmul_t_f16<T: Block>(
    xs: &[T],
    mkn: (usize, usize, usize),
    lhs: &[f16],
    dst: &mut [f16],
) -> Result<()> {
    k_quants::matmul_f16(mkn, lhs, xs, dst)
}

fn dequantize<T: Block>(xs: &[T], n: usize) -> Result<CpuStorage> {
    let mut ys = vec![0f32; n];
    T::to_float(xs, &mut ys);
    Ok(CpuStorage::F32(ys))
}

fn embedding<T: Block>(xs: &[T], ids: &[u32], rows: usize, hidden: usize) -> Result<CpuStorage> {
    let per_row = hidden / T::BLCK_SIZE;
    let mut out = vec![0f32; ids.len() * hidden];
    for (dst, &id) in out.chunks_exact_mut(hidden).zip(ids) {
        let id = id as usize;
        if id >= rows {
            candle_core::bail!("token id {id} is out of range for {rows} rows");
        }
        T::to_float(&xs[id * per_row..(id + 1) * per_row], dst);
    }
    Ok(CpuStorage::F32(out))
}

fn block_size<T: Block>(_: &[T]) -> usize {
    T::BLCK_SIZE
}

impl QuantizedType for MappedBlocks {
    fn dtype(&self) -> GgmlDType {
        self.dtype
    }
    fn matmul_t(&self, mkn: (usize, usize, usize), lhs: &[f32], dst: &mut [f32]) -> Result<()> {
        // candle's own kernels: this path is the engine's independent reference.
        dispatch!(self, matmul_t, mkn, lhs, dst)
    }
    fn matmul_t_f16(&self, mkn: (usize, usize, usize), lhs: &[f16], dst: &mut [f16]) -> Result<()> {
        dispatch!(self, matmul_t_f16, mkn, lhs, dst)
    }
    fn embedding(&self, ids: &[u32], rows: usize, hidden: usize) -> Result<CpuStorage> {
        dispatch!(self, embedding, ids, rows, hidden)
    }
    fn dequantize(&self, elem_count: usize) -> Result<CpuStorage> {
        dispatch!(self, dequantize, elem_count)
    }
    fn storage_size_in_bytes(&self) -> usize {
        self.len
    }
    fn as_ptr(&self) -> *const u8 {
        self.bytes().as_ptr()
    }
    fn block_size(&self) -> usize {
        dispatch!(self, block_size)
    }
    fn from_float(&mut self, _xs: &[f32]) {
        unreachable!("mapped weights are read-only")
    }
    fn from_float_imatrix(&mut self, _xs: &[f32], _w: &[f32], _n: usize) {
        unreachable!("mapped weights are read-only")
    }
    fn size(&self) -> usize {
        self.len
    }
}

/// The tensor as a candle QTensor (shape in torch order): over the map on
/// CPU, uploaded once on CUDA and Metal.
pub fn qtensor(file: &Arc<GgufFile>, info: &TensorInfo, device: &Device) -> Result<QTensor> {
    let dtype = info.ggml_type.to_candle().ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "tensor '{}': ggml type {} is not supported",
            info.name, info.ggml_type
        ))
    })?;
    let shape: Vec<usize> = info.shape().iter().map(|&d| d as usize).collect();
    // GGUF allows any power-of-two alignment; blocks need 4-byte alignment
    // (f32 fields) to be read in place, so odd layouts are copied instead.
    let aligned = (file.tensor_data(info).as_ptr() as usize).is_multiple_of(4);
    if device.is_cpu() && aligned {
        let start = (file.data_offset() + info.offset) as usize;
        let blocks = MappedBlocks {
            file: file.clone(),
            start,
            len: info.n_bytes as usize,
            dtype,
        };
        QTensor::new(QStorage::Cpu(Box::new(blocks)), shape)
    } else {
        let data = Aligned::new(file.tensor_data(info));
        let data = std::borrow::Cow::Borrowed(data.bytes());
        QTensor::new(QStorage::from_data(data, device, dtype)?, shape)
    }
}

/// Bytes copied into memory aligned for any ggml block: candle asserts the
/// alignment of the data it reads (a panic), and a GGUF's
/// `general.alignment` may be as small as 1.
struct Aligned {
    words: Vec<u64>,
    len: usize,
}

impl Aligned {
    fn new(bytes: &[u8]) -> Aligned {
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        // SAFETY: `words` holds at least bytes.len() bytes, and u64 has no
        // invalid bit patterns.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                words.as_mut_ptr() as *mut u8,
                bytes.len(),
            )
        };
        Aligned {
            words,
            len: bytes.len(),
        }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the words hold `len` initialised bytes.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr() as *const u8, self.len) }
    }
}

/// A small tensor (norm, bias, rope factors) copied out of the file and
/// dequantized to an f32 tensor on `device`.
pub fn small_tensor(
    file: &GgufFile,
    info: &TensorInfo,
    device: &Device,
) -> Result<candle_core::Tensor> {
    let dtype = info.ggml_type.to_candle().ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "tensor '{}': ggml type {} is not supported",
            info.name, info.ggml_type
        ))
    })?;
    let shape: Vec<usize> = info.shape().iter().map(|&d| d as usize).collect();
    let bytes = file
        .tensor_data_copy(info)
        .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", file.path().display())))?;
    let bytes = Aligned::new(&bytes);
    let storage = QStorage::from_data(
        std::borrow::Cow::Borrowed(bytes.bytes()),
        &Device::Cpu,
        dtype,
    )?;
    QTensor::new(storage, shape)?.dequantize(device)
}

//! The model's weights as the CPU engine uses them: every matrix read in
//! place from the map (only misaligned data is copied), small vectors widened
//! to f32 once, and the adapters attached to each projection.

use crate::gguf::names;
use std::sync::Arc;

use lorafold_kernels::attention::Row;
use lorafold_kernels::{Layout, WType, Weights};

use crate::arch::{Role, Width};
use crate::gguf::{GgufFile, TensorInfo};

/// Where a matrix's blocks are.
#[derive(Debug)]
enum Blocks {
    /// In the map at `start..start + len`.
    Mapped { start: usize, len: usize },
    /// Copied out (the file's data was not 2-byte aligned); u16 words keep
    /// f16 fields aligned.
    Owned(Vec<u16>, usize),
    /// Interleaved ([`Layout::Rows8`]) in anonymous pages of their own: as
    /// heap allocations they left 6 MB of allocator slack on a 147 MB model.
    Repacked(memmap2::MmapMut),
}

/// An adapter factor as its file stored it: f16 stays f16 (half the bytes
/// read per token; the kernels widen as they go), f32 stays f32.
#[derive(Debug, Clone)]
pub enum Factor {
    /// Full precision.
    F32(Vec<f32>),
    /// Half precision.
    F16(Vec<half::f16>),
}

impl Factor {
    /// `len` values from `start`.
    pub fn row(&self, start: usize, len: usize) -> Row<'_> {
        match self {
            Factor::F32(v) => Row::F32(&v[start..start + len]),
            Factor::F16(v) => Row::F16(&v[start..start + len]),
        }
    }

    /// The factor as an `[n, k]` row-major matrix for the kernels.
    pub fn weights(&self, k: usize, n: usize) -> Weights<'_> {
        let (wtype, bytes) = match self {
            // SAFETY: f32 and f16 are plain old data; the byte view covers
            // exactly the vector's elements.
            Factor::F32(v) => (WType::F32, unsafe {
                std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len() * 4)
            }),
            Factor::F16(v) => (WType::F16, unsafe {
                std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len() * 2)
            }),
        };
        Weights::new(wtype, bytes, k, n).expect("factor holds n rows of k")
    }

    /// The value at `i`.
    pub fn get(&self, i: usize) -> f32 {
        match self {
            Factor::F32(v) => v[i],
            Factor::F16(v) => v[i].to_f32(),
        }
    }
}

/// One adapter's low-rank pair on a projection: y += scale * B (A x).
#[derive(Debug, Clone)]
pub struct LoraFactors {
    /// The adapter's slot in the model.
    pub slot: usize,
    /// Rank.
    pub rank: usize,
    /// A, `[rank, k]` row-major (for the token embedding: `[vocab, rank]`, a row per token).
    pub a: Factor,
    /// Bᵀ, `[rank, n]` row-major, so adding B·(A·x) to a range of outputs is
    /// `rank` contiguous axpys (for the token embedding: `[rank, dim]`).
    pub b: Factor,
    /// alpha / rank from the adapter file.
    pub file_scale: f32,
}

/// A weight matrix: `n` rows of `k` inputs, with its bias and adapters.
#[derive(Debug)]
pub struct Matrix {
    /// GGUF tensor name.
    pub name: String,
    /// Block type.
    pub wtype: WType,
    blocks: Blocks,
    layout: Layout,
    /// Inputs per row.
    pub k: usize,
    /// Rows (outputs).
    pub n: usize,
    /// Bias, one per row.
    pub bias: Option<Vec<f32>>,
    /// Attached adapters.
    pub loras: Vec<LoraFactors>,
}

/// Why a tensor cannot be used by the CPU engine.
#[derive(Debug, Clone)]
pub struct WeightProblem {
    /// The tensor.
    pub tensor: String,
    /// What is wrong.
    pub problem: String,
}

impl Matrix {
    /// The matrix of tensor `info` (ggml dims `[k, n]`) in `file`;
    /// `for_products` when matrix products read it (then it is interleaved
    /// for decode), not only lookups of a few rows (which keep it mapped).
    pub fn new(
        file: &GgufFile,
        info: &TensorInfo,
        for_products: bool,
    ) -> Result<Matrix, WeightProblem> {
        let bad = |problem: String| WeightProblem {
            tensor: info.name.clone(),
            problem,
        };
        let wtype = WType::from_ggml_id(info.ggml_type.id()).ok_or_else(|| {
            bad(format!(
                "ggml type {} has no CPU kernel (f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0, q2_k..q6_k do)",
                info.ggml_type
            ))
        })?;
        let (k, n) = match info.dims() {
            [k, n] => (*k as usize, *n as usize),
            [k] => (*k as usize, 1),
            d => return Err(bad(format!("expected a matrix, got dims {d:?}"))),
        };
        // The reader checked n_bytes against the dims and type.
        Weights::new(wtype, file.tensor_data(info), k, n).map_err(|e| bad(e.to_string()))?;
        let data = file.tensor_data(info);
        // The kernel crate says which layout the detected ISA reads best.
        let rows8 = for_products
            && Weights::new(wtype, data, k, n).is_ok_and(|w| w.packs_rows8())
            && lorafold_kernels::Isa::detect().layout(wtype) == lorafold_kernels::Layout::Rows8;
        let (blocks, layout) = if rows8 {
            // Interleaved once here, so a decode step reads eight rows as
            // one stream (SmolLM2 q4_0 decode, one thread: 128 -> 162 t/s).
            // The map's pages are released afterwards, so each weight is
            // held once (a copy read with pread instead stayed resident in
            // the allocator's heap: +22 MB on SmolLM2).
            let src = Weights::new(wtype, data, k, n).map_err(|e| bad(e.to_string()))?;
            let mut out = memmap2::MmapMut::map_anon(data.len())
                .map_err(|e| bad(format!("cannot allocate {} bytes: {e}", data.len())))?;
            // 2 MB pages where the kernel allows: a 7B model's 4.6 GB in
            // 4 KB pages took 1.2 M page faults, whose zeroing was half of a
            // 22 s load.
            #[cfg(target_os = "linux")]
            let _ = out.advise(memmap2::Advice::HugePage);
            src.repack_rows8_into(&mut out);
            file.release_pages(data);
            (Blocks::Repacked(out), Layout::Rows8)
        } else if (data.as_ptr() as usize).is_multiple_of(4) {
            (
                Blocks::Mapped {
                    start: data.as_ptr() as usize - file.raw_bytes().as_ptr() as usize,
                    len: data.len(),
                },
                Layout::RowMajor,
            )
        } else {
            let mut words = vec![0u16; data.len().div_ceil(2)];
            // SAFETY: `words` holds at least data.len() bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    data.as_ptr(),
                    words.as_mut_ptr() as *mut u8,
                    data.len(),
                )
            };
            (Blocks::Owned(words, data.len()), Layout::RowMajor)
        };
        Ok(Matrix {
            name: info.name.clone(),
            wtype,
            blocks,
            layout,
            k,
            n,
            bias: None,
            loras: Vec::new(),
        })
    }

    /// The kernel's view of the blocks.
    pub fn weights<'a>(&'a self, file: &'a GgufFile) -> Weights<'a> {
        let bytes = match &self.blocks {
            Blocks::Mapped { start, len } => &file.raw_bytes()[*start..*start + *len],
            // SAFETY: the words hold `len` initialised bytes.
            Blocks::Owned(words, len) => unsafe {
                std::slice::from_raw_parts(words.as_ptr() as *const u8, *len)
            },
            Blocks::Repacked(map) => map,
        };
        Weights {
            wtype: self.wtype,
            bytes,
            k: self.k,
            n: self.n,
            layout: self.layout,
        }
    }

    /// Whether an adapter attached here contributes at the given scales.
    pub fn active_loras<'a>(
        &'a self,
        scales: &'a [Option<f64>],
    ) -> impl Iterator<Item = (&'a LoraFactors, f32)> + 'a {
        self.loras.iter().filter_map(move |l| {
            let s = scales.get(l.slot).copied().flatten()?;
            (s != 0.0).then_some((l, (s * l.file_scale as f64) as f32))
        })
    }
}

/// One transformer block's weights; the norms only some architectures
/// have are `Option`s.
#[derive(Debug)]
pub struct BlockWeights {
    /// RMSNorm weight before attention.
    pub attn_norm: Vec<f32>,
    /// RMSNorm weight over each query head.
    pub q_norm: Option<Vec<f32>>,
    /// RMSNorm weight over each key head.
    pub k_norm: Option<Vec<f32>>,
    /// RMSNorm weight on the attention output.
    pub post_attn_norm: Option<Vec<f32>>,
    /// RMSNorm weight on the feed-forward output.
    pub post_ffn_norm: Option<Vec<f32>>,
    /// Query projection.
    pub q: Matrix,
    /// Key projection.
    pub k: Matrix,
    /// Value projection.
    pub v: Matrix,
    /// Attention output projection.
    pub o: Matrix,
    /// RMSNorm weight before the feed-forward.
    pub ffn_norm: Vec<f32>,
    /// Gate projection.
    pub gate: Matrix,
    /// Up projection.
    pub up: Matrix,
    /// Down projection.
    pub down: Matrix,
}

impl BlockWeights {
    /// The seven projections, mutably (for attaching adapters).
    pub fn projections_mut(&mut self) -> [&mut Matrix; 7] {
        [
            &mut self.q,
            &mut self.k,
            &mut self.v,
            &mut self.o,
            &mut self.gate,
            &mut self.up,
            &mut self.down,
        ]
    }
}

/// Every weight of a model, for the CPU engine.
#[derive(Debug)]
pub struct CpuWeights {
    /// The mapped file the matrices point into.
    pub file: Arc<GgufFile>,
    /// token_embd, `[vocab]` rows of `dim` (its `loras` stay empty: a tied
    /// head reads it too).
    pub embedding: Matrix,
    /// Adapters on the token embedding (`a` a row per token, `b` `[rank, dim]`).
    pub embedding_loras: Vec<LoraFactors>,
    /// Blocks in order.
    pub blocks: Vec<BlockWeights>,
    /// Final RMSNorm weight.
    pub output_norm: Vec<f32>,
    /// The output head; None when it is the token embedding (tied).
    pub output: Option<Matrix>,
}

impl CpuWeights {
    /// The output head (the embedding when tied).
    pub fn head(&self) -> &Matrix {
        self.output.as_ref().unwrap_or(&self.embedding)
    }

    /// Every projection an adapter may target, mutably, with the head.
    pub fn projections_mut(&mut self) -> impl Iterator<Item = &mut Matrix> {
        self.blocks
            .iter_mut()
            .flat_map(|b| b.projections_mut())
            .chain(self.output.as_mut())
    }
}

impl CpuWeights {
    /// Give back to the file the mapped pages of block `layer`'s
    /// projections: a model run a layer at a time
    /// ([`super::CpuSession::block_rows`]) then holds one layer resident, not
    /// the whole file (an f32 7B model is 30 GB).
    pub fn release_block(&self, layer: usize) {
        let b = &self.blocks[layer];
        for m in [&b.q, &b.k, &b.v, &b.o, &b.gate, &b.up, &b.down] {
            if let Blocks::Mapped { start, len } = m.blocks {
                self.file
                    .release_pages(&self.file.raw_bytes()[start..start + len]);
            }
        }
    }
}

impl CpuWeights {
    /// Read every weight of the model in `file`, by its architecture's parts (its
    /// hyperparameters already checked into `cfg`).
    pub fn load(
        file: Arc<GgufFile>,
        cfg: &crate::model::ModelConfig,
    ) -> Result<CpuWeights, WeightProblem> {
        let f = file.as_ref();
        let info = |name: &str| {
            f.tensor(name).ok_or_else(|| WeightProblem {
                tensor: name.to_string(),
                problem: "missing".into(),
            })
        };
        let matrix =
            |name: &str, k: usize, n: usize, products: bool| -> Result<Matrix, WeightProblem> {
                let t = info(name)?;
                let want: &[u64] = if n == 1 {
                    &[k as u64]
                } else {
                    &[k as u64, n as u64]
                };
                if t.dims() != want {
                    return Err(WeightProblem {
                        tensor: name.to_string(),
                        problem: format!("has dims {:?}, expected {want:?}", t.dims()),
                    });
                }
                Matrix::new(f, t, products)
            };
        // Small tensors are read with pread, not through the map: touching a
        // mapped page maps its neighbours too (fault-around), which made
        // loading SmolLM2 grow resident memory by 19 MB instead of 2.
        let vector = |name: &str, len: usize| -> Result<Vec<f32>, WeightProblem> {
            let m = matrix(name, len, 1, false)?;
            let bytes = f.tensor_data_copy(info(name)?).map_err(|e| WeightProblem {
                tensor: name.to_string(),
                problem: e.to_string(),
            })?;
            let mut v = vec![0f32; len];
            lorafold_kernels::reference::dequantize(m.wtype, &bytes, &mut v);
            Ok(v)
        };
        let projection = |name: &str, k: usize, n: usize| -> Result<Matrix, WeightProblem> {
            let mut m = matrix(&format!("{name}.weight"), k, n, true)?;
            let bias = format!("{name}.bias");
            if f.tensor(&bias).is_some() {
                m.bias = Some(vector(&bias, n)?);
            }
            Ok(m)
        };
        let dim = cfg.dim;
        let width = |w: Width| cfg.width(w);
        let spec = cfg.spec();
        let mut blocks = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            // The shape rules required every part of the architecture, so a
            // role it lacks is one it does not have, not a missing tensor.
            let name = |role: Role| spec.part_for(role).map(|p| format!("blk.{i}.{}", p.gguf));
            let norm = |role: Role| -> Result<Option<Vec<f32>>, WeightProblem> {
                name(role)
                    .map(|n| vector(&format!("{n}.weight"), width(role.dims()[0])))
                    .transpose()
            };
            let required = |role: Role, what: Option<String>| {
                what.ok_or_else(|| WeightProblem {
                    tensor: format!("blk.{i}"),
                    problem: format!("the architecture has no {role:?} part"),
                })
            };
            let proj = |role: Role| -> Result<Matrix, WeightProblem> {
                let d = role.dims();
                projection(&required(role, name(role))?, width(d[0]), width(d[1]))
            };
            blocks.push(BlockWeights {
                attn_norm: required(Role::AttnNorm, name(Role::AttnNorm))
                    .and_then(|n| vector(&format!("{n}.weight"), dim))?,
                q_norm: norm(Role::QNorm)?,
                k_norm: norm(Role::KNorm)?,
                q: proj(Role::Q)?,
                k: proj(Role::K)?,
                v: proj(Role::V)?,
                o: proj(Role::O)?,
                post_attn_norm: norm(Role::PostAttnNorm)?,
                ffn_norm: required(Role::FfnNorm, name(Role::FfnNorm))
                    .and_then(|n| vector(&format!("{n}.weight"), dim))?,
                gate: proj(Role::Gate)?,
                up: proj(Role::Up)?,
                down: proj(Role::Down)?,
                post_ffn_norm: norm(Role::PostFfnNorm)?,
            });
        }
        let output = match f.tensor(names::OUTPUT) {
            Some(_) => Some(projection("output", dim, cfg.vocab)?),
            None => None,
        };
        // A tied embedding is also the output head; an untied one only
        // serves lookups (an interleaved copy cost 18 MB resident on the
        // synthetic model, whose mapped rows are mostly never touched).
        let embedding = matrix(names::TOKEN_EMBD, dim, cfg.vocab, output.is_none())?;
        Ok(CpuWeights {
            embedding,
            embedding_loras: Vec::new(),
            blocks,
            output_norm: vector(names::OUTPUT_NORM, dim)?,
            output,
            file,
        })
    }
}

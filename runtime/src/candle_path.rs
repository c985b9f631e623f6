//! The forward pass on candle: the path on CUDA and Metal, and on CPU the
//! independent reference that the engine is tested against.

use crate::gguf::names;
use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use crate::arch::Architecture;
use crate::gguf::{GgufFile, TensorInfo};
use crate::mapped;
use crate::model::{ModelConfig, RuntimeError};

/// One low-rank pair attached to a projection: y += scale * (x A^T) B^T.
#[derive(Debug, Clone)]
pub(crate) struct LoraPair {
    pub(crate) slot: usize,
    /// A^T, [in, r] (for the embedding: A^T rows per token, [vocab, r]).
    pub(crate) a_t: Tensor,
    /// B^T, [r, out].
    pub(crate) b_t: Tensor,
    /// alpha / r from the adapter file.
    pub(crate) file_scale: f64,
}

/// A projection: quantized weight, optional bias, attached adapters.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    pub(crate) name: String,
    weight: QMatMul,
    bias: Option<Tensor>,
    pub(crate) loras: Vec<LoraPair>,
}

impl Linear {
    fn forward(&self, x: &Tensor, scales: &[Option<f64>]) -> candle_core::Result<Tensor> {
        let mut y = self.weight.forward(x)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        for l in &self.loras {
            match scales.get(l.slot).copied().flatten() {
                Some(s) if s != 0.0 => {
                    let d = x.matmul(&l.a_t)?.matmul(&l.b_t)?;
                    y = (y + d.affine(s * l.file_scale, 0.0)?)?;
                }
                _ => {}
            }
        }
        Ok(y)
    }
}

#[derive(Debug, Clone)]
struct Block {
    attn_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ffn_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// The model's weights as candle tensors (over the map on CPU).
#[derive(Debug)]
pub(crate) struct CandleWeights {
    embedding: QTensor,
    pub(crate) embedding_loras: Vec<LoraPair>,
    blocks: Vec<Block>,
    output_norm: Tensor,
    output: Linear,
}

fn model_err(file: &GgufFile, problem: String) -> RuntimeError {
    RuntimeError::Model {
        path: file.path().to_path_buf(),
        problem,
    }
}

fn check_dims(f: &GgufFile, t: &TensorInfo, want: &[u64]) -> Result<(), RuntimeError> {
    if t.dims() != want {
        return Err(model_err(
            f,
            format!(
                "tensor '{}' has dims {:?}, expected {:?}",
                t.name,
                t.dims(),
                want
            ),
        ));
    }
    Ok(())
}

impl CandleWeights {
    /// Every weight of `file` (hyperparameters already checked into `cfg`) on `device`.
    pub(crate) fn load(
        file: &Arc<GgufFile>,
        cfg: &ModelConfig,
        device: &Device,
    ) -> Result<CandleWeights, RuntimeError> {
        let f = file.as_ref();
        let tensor = |name: &str| {
            f.tensor(name)
                .ok_or_else(|| model_err(f, format!("missing tensor '{name}'")))
        };
        let vector = |name: &str, len: usize| -> Result<Tensor, RuntimeError> {
            let t = tensor(name)?;
            check_dims(f, t, &[len as u64])?;
            Ok(mapped::small_tensor(f, t, device)?)
        };
        let linear = |name: &str, in_f: usize, out_f: usize| -> Result<Linear, RuntimeError> {
            let t = tensor(&format!("{name}.weight"))?;
            check_dims(f, t, &[in_f as u64, out_f as u64])?;
            let bias = match f.tensor(&format!("{name}.bias")) {
                Some(b) => Some(vector(&b.name, out_f)?),
                None => None,
            };
            Ok(Linear {
                name: format!("{name}.weight"),
                weight: QMatMul::from_qtensor(mapped::qtensor(file, t, device)?)?,
                bias,
                loras: Vec::new(),
            })
        };
        let (dim, hd, vocab) = (cfg.dim, cfg.head_dim, cfg.vocab);
        let emb_info = tensor(names::TOKEN_EMBD)?;
        check_dims(f, emb_info, &[dim as u64, vocab as u64])?;
        let (q_out, kv_out) = (cfg.n_head * hd, cfg.n_head_kv * hd);
        let ffn = cfg.ffn;
        let mut blocks = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let p = |s: &str| format!("blk.{i}.{s}");
            blocks.push(Block {
                attn_norm: vector(&p("attn_norm.weight"), dim)?,
                q: linear(&p("attn_q"), dim, q_out)?,
                k: linear(&p("attn_k"), dim, kv_out)?,
                v: linear(&p("attn_v"), dim, kv_out)?,
                o: linear(&p("attn_output"), q_out, dim)?,
                ffn_norm: vector(&p("ffn_norm.weight"), dim)?,
                gate: linear(&p("ffn_gate"), dim, ffn)?,
                up: linear(&p("ffn_up"), dim, ffn)?,
                down: linear(&p("ffn_down"), ffn, dim)?,
            });
        }
        let output = match f.tensor(names::OUTPUT) {
            Some(_) => linear("output", dim, vocab)?,
            // Tied: the head is the token embedding, read from the same pages.
            None => Linear {
                name: names::TOKEN_EMBD.into(),
                weight: QMatMul::from_qtensor(mapped::qtensor(file, emb_info, device)?)?,
                bias: None,
                loras: Vec::new(),
            },
        };
        Ok(CandleWeights {
            embedding: mapped::qtensor(file, emb_info, device)?,
            embedding_loras: Vec::new(),
            output_norm: vector(names::OUTPUT_NORM, dim)?,
            output,
            blocks,
        })
    }

    /// Every projection, mutably, with the head.
    pub(crate) fn linears_mut(&mut self) -> impl Iterator<Item = &mut Linear> {
        self.blocks
            .iter_mut()
            .flat_map(|b| {
                [
                    &mut b.q,
                    &mut b.k,
                    &mut b.v,
                    &mut b.o,
                    &mut b.gate,
                    &mut b.up,
                    &mut b.down,
                ]
            })
            .chain(std::iter::once(&mut self.output))
    }
}

/// A candle session: a preallocated KV cache and the RoPE tables.
pub(crate) struct CandleSession {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    pos: usize,
    max: usize,
    cos: Tensor,
    sin: Tensor,
}

impl CandleSession {
    /// A fresh KV cache for up to `max` positions.
    pub(crate) fn new(
        cfg: &ModelConfig,
        device: &Device,
        rope_freqs: Option<&[f32]>,
        max: usize,
    ) -> Result<CandleSession, RuntimeError> {
        let shape = (1, cfg.n_head_kv, max, cfg.head_dim);
        let mut k = Vec::with_capacity(cfg.n_layers);
        let mut v = Vec::with_capacity(cfg.n_layers);
        for _ in 0..cfg.n_layers {
            k.push(Tensor::zeros(shape, DType::F32, device)?);
            v.push(Tensor::zeros(shape, DType::F32, device)?);
        }
        let half = cfg.head_dim / 2;
        let (cos, sin) = crate::cpu::ops::rope_tables(max, cfg.head_dim, cfg.rope_base, rope_freqs);
        Ok(CandleSession {
            k,
            v,
            pos: 0,
            max,
            cos: Tensor::from_vec(cos, (max, half), device)?,
            sin: Tensor::from_vec(sin, (max, half), device)?,
        })
    }

    pub(crate) fn position(&self) -> usize {
        self.pos
    }

    pub(crate) fn reset(&mut self) {
        self.pos = 0;
    }

    /// Logits `[n, vocab]` for the last position, or every position when `all`.
    pub(crate) fn forward(
        &mut self,
        m: &CandleWeights,
        c: &ModelConfig,
        scales: &[Option<f64>],
        tokens: &[u32],
        all: bool,
    ) -> Result<Tensor, RuntimeError> {
        let t = tokens.len();
        let device = self.cos.device().clone();
        let ids = Tensor::new(tokens, &device)?;
        let mut x = m.embedding.embedding(&ids)?;
        for l in &m.embedding_loras {
            if let Some(s) = scales.get(l.slot).copied().flatten().filter(|s| *s != 0.0) {
                let rows = l.a_t.embedding(&ids)?;
                x = (x + rows.matmul(&l.b_t)?.affine(s * l.file_scale, 0.0)?)?;
            }
        }
        let (pos, hd) = (self.pos, c.head_dim);
        let group = c.n_head / c.n_head_kv;
        let cos = self.cos.narrow(0, pos, t)?;
        let sin = self.sin.narrow(0, pos, t)?;
        let total = pos + t;
        let mask = if t > 1 {
            let m: Vec<f32> = (0..t)
                .flat_map(|i| {
                    (0..total).map(move |j| if j > pos + i { f32::NEG_INFINITY } else { 0.0 })
                })
                .collect();
            Some(Tensor::from_vec(m, (t, total), &device)?)
        } else {
            None
        };
        let scale = 1.0 / (hd as f64).sqrt();
        for (i, b) in m.blocks.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &b.attn_norm, c.rms_eps as f32)?;
            let heads = |l: &Linear, n: usize| -> candle_core::Result<Tensor> {
                l.forward(&h, scales)?
                    .reshape((1, t, n, hd))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let (q, k, v) = (
                heads(&b.q, c.n_head)?,
                heads(&b.k, c.n_head_kv)?,
                heads(&b.v, c.n_head_kv)?,
            );
            // llama's GGUF q/k rows were permuted for ggml's adjacent-pair RoPE;
            // qwen2 keeps HF order and rotates halves (neox style).
            let (q, k) = match c.arch {
                Architecture::Llama => (
                    candle_nn::rotary_emb::rope_i(&q, &cos, &sin)?,
                    candle_nn::rotary_emb::rope_i(&k, &cos, &sin)?,
                ),
                Architecture::Qwen2 => (
                    candle_nn::rotary_emb::rope(&q, &cos, &sin)?,
                    candle_nn::rotary_emb::rope(&k, &cos, &sin)?,
                ),
            };
            self.k[i].slice_set(&k, 2, pos)?;
            self.v[i].slice_set(&v, 2, pos)?;
            let keys = self.k[i].narrow(2, 0, total)?.squeeze(0)?; // [n_kv, total, hd]
            let values = self.v[i].narrow(2, 0, total)?.squeeze(0)?;
            // Group query heads by their kv head: [n_kv, group*t, hd].
            // Scale the scores, not q, as ggml's soft_max_ext does.
            let q = q.squeeze(0)?.reshape((c.n_head_kv, group * t, hd))?;
            let mut scores = (q.matmul(&keys.t()?)? * scale)?; // [n_kv, group*t, total]
            if let Some(mask) = &mask {
                scores = scores
                    .reshape((c.n_head_kv, group, t, total))?
                    .broadcast_add(mask)?
                    .reshape((c.n_head_kv, group * t, total))?;
            }
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let attn = probs.matmul(&values.contiguous()?)?; // [n_kv, group*t, hd]
            let attn = attn
                .reshape((c.n_head, t, hd))?
                .transpose(0, 1)?
                .reshape((t, c.n_head * hd))?;
            x = (x + b.o.forward(&attn, scales)?)?;
            let h = candle_nn::ops::rms_norm(&x, &b.ffn_norm, c.rms_eps as f32)?;
            let g = b.gate.forward(&h, scales)?.silu()?;
            let u = b.up.forward(&h, scales)?;
            x = (x + b.down.forward(&(g * u)?, scales)?)?;
        }
        self.pos = total;
        let x = if all { x } else { x.narrow(0, t - 1, 1)? };
        let x = candle_nn::ops::rms_norm(&x, &m.output_norm, c.rms_eps as f32)?;
        Ok(m.output
            .forward(&x, scales)?
            .to_dtype(DType::F32)?
            .contiguous()?)
    }

    /// The context size.
    pub(crate) fn max_tokens(&self) -> usize {
        self.max
    }
}

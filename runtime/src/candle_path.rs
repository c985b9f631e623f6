//! The forward pass on candle: the path on CUDA and Metal, and on CPU the
//! independent reference that the engine is tested against.

use crate::gguf::names;
use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use crate::arch::{Activation, Role, RopeStyle, Width};
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
    /// The norms only some architectures have.
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    post_attn_norm: Option<Tensor>,
    post_ffn_norm: Option<Tensor>,
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
        let (dim, vocab) = (cfg.dim, cfg.vocab);
        let emb_info = tensor(names::TOKEN_EMBD)?;
        check_dims(f, emb_info, &[dim as u64, vocab as u64])?;
        let width = |w: Width| cfg.width(w);
        let spec = cfg.spec();
        let mut blocks = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let name = |role: Role| -> Result<String, RuntimeError> {
                let part = spec
                    .part_for(role)
                    .ok_or_else(|| model_err(f, format!("{} has no {role:?} part", cfg.arch)))?;
                Ok(format!("blk.{i}.{}", part.gguf))
            };
            let norm = |role: Role| -> Result<Tensor, RuntimeError> {
                vector(&format!("{}.weight", name(role)?), width(role.dims()[0]))
            };
            let optional = |role: Role| -> Result<Option<Tensor>, RuntimeError> {
                spec.part_for(role).map(|_| norm(role)).transpose()
            };
            let proj = |role: Role| -> Result<Linear, RuntimeError> {
                let d = role.dims();
                linear(&name(role)?, width(d[0]), width(d[1]))
            };
            blocks.push(Block {
                attn_norm: norm(Role::AttnNorm)?,
                q: proj(Role::Q)?,
                k: proj(Role::K)?,
                v: proj(Role::V)?,
                o: proj(Role::O)?,
                ffn_norm: norm(Role::FfnNorm)?,
                gate: proj(Role::Gate)?,
                up: proj(Role::Up)?,
                down: proj(Role::Down)?,
                q_norm: optional(Role::QNorm)?,
                k_norm: optional(Role::KNorm)?,
                post_attn_norm: optional(Role::PostAttnNorm)?,
                post_ffn_norm: optional(Role::PostFfnNorm)?,
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
    /// cos and sin, `[max, head_dim / 2]`, one pair per RoPE base.
    ropes: Vec<(Tensor, Tensor)>,
    /// Each layer's index into `ropes`.
    layer_rope: Vec<usize>,
    device: Device,
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
        let bases = cfg.rope_bases();
        let mut ropes = Vec::with_capacity(bases.len());
        for &b in &bases {
            let (cos, sin) = crate::cpu::ops::rope_tables(max, cfg.head_dim, b, rope_freqs);
            ropes.push((
                Tensor::from_vec(cos, (max, half), device)?,
                Tensor::from_vec(sin, (max, half), device)?,
            ));
        }
        let layer_rope = cfg.layer_ropes();
        Ok(CandleSession {
            k,
            v,
            pos: 0,
            max,
            ropes,
            layer_rope,
            device: device.clone(),
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
        let device = self.device.clone();
        let ids = Tensor::new(tokens, &device)?;
        let mut x = m.embedding.embedding(&ids)?;
        for l in &m.embedding_loras {
            if let Some(s) = scales.get(l.slot).copied().flatten().filter(|s| *s != 0.0) {
                let rows = l.a_t.embedding(&ids)?;
                x = (x + rows.matmul(&l.b_t)?.affine(s * l.file_scale, 0.0)?)?;
            }
        }
        if let Some(scale) = c.embedding_scale() {
            x = x.affine(scale as f64, 0.0)?;
        }
        let (pos, hd) = (self.pos, c.head_dim);
        let group = c.n_head / c.n_head_kv;
        let total = pos + t;
        // Query i (at pos + i) sees key j when j <= pos + i and, in a local
        // layer, pos + i - j < window. One mask per distinct window.
        let mask = |window: Option<usize>| -> candle_core::Result<Option<Tensor>> {
            let hides =
                |i: usize, j: usize| j > pos + i || window.is_some_and(|w| pos + i - j >= w);
            if !(0..t).any(|i| (0..total).any(|j| hides(i, j))) {
                return Ok(None);
            }
            let m: Vec<f32> = (0..t)
                .flat_map(|i| {
                    (0..total).map(move |j| if hides(i, j) { f32::NEG_INFINITY } else { 0.0 })
                })
                .collect();
            Ok(Some(Tensor::from_vec(m, (t, total), &device)?))
        };
        let global_mask = mask(None)?;
        let local_mask = match c.sliding_window {
            Some(w) => mask(Some(w))?,
            None => None,
        };
        let scale = 1.0 / (hd as f64).sqrt();
        let eps = c.rms_eps as f32;
        let spec = c.spec();
        for (i, b) in m.blocks.iter().enumerate() {
            let (cos, sin) = &self.ropes[self.layer_rope[i]];
            let cos = cos.narrow(0, pos, t)?;
            let sin = sin.narrow(0, pos, t)?;
            let h = candle_nn::ops::rms_norm(&x, &b.attn_norm, eps)?;
            let heads =
                |l: &Linear, n: usize, norm: &Option<Tensor>| -> candle_core::Result<Tensor> {
                    let y = l.forward(&h, scales)?.reshape((1, t, n, hd))?;
                    let y = match norm {
                        Some(w) => candle_nn::ops::rms_norm(&y.contiguous()?, w, eps)?,
                        None => y,
                    };
                    y.transpose(1, 2)?.contiguous()
                };
            let (q, k, v) = (
                heads(&b.q, c.n_head, &b.q_norm)?,
                heads(&b.k, c.n_head_kv, &b.k_norm)?,
                heads(&b.v, c.n_head_kv, &None)?,
            );
            let (q, k) = match spec.rope {
                RopeStyle::Adjacent => (
                    candle_nn::rotary_emb::rope_i(&q, &cos, &sin)?,
                    candle_nn::rotary_emb::rope_i(&k, &cos, &sin)?,
                ),
                RopeStyle::Halves => (
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
            let mask = match c.layer_attention(i).window {
                Some(_) => &local_mask,
                None => &global_mask,
            };
            if let Some(mask) = mask {
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
            let mut a = b.o.forward(&attn, scales)?;
            if let Some(w) = &b.post_attn_norm {
                a = candle_nn::ops::rms_norm(&a, w, eps)?;
            }
            x = (x + a)?;
            let h = candle_nn::ops::rms_norm(&x, &b.ffn_norm, eps)?;
            let g = b.gate.forward(&h, scales)?;
            let g = match spec.activation {
                Activation::Silu => g.silu()?,
                // candle's gelu is the tanh approximation (gelu_erf is exact).
                Activation::GeluTanh => g.gelu()?,
            };
            let u = b.up.forward(&h, scales)?;
            let mut d = b.down.forward(&(g * u)?, scales)?;
            if let Some(w) = &b.post_ffn_norm {
                d = candle_nn::ops::rms_norm(&d, w, eps)?;
            }
            x = (x + d)?;
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

//! The llama-family transformer (llama, mistral-as-llama, qwen2) over a
//! memory-mapped GGUF, with LoRA adapters attachable to any projection.

use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use crate::arch::Architecture;
use crate::gguf::{GgufError, GgufFile, TensorInfo};
use crate::mapped;

/// An error loading or running a model or adapter.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The file could not be read as GGUF.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// The model is not one we can run.
    #[error("{path}: {problem}")]
    Model {
        /// the file
        path: String,
        /// what is wrong
        problem: String,
    },
    /// An adapter does not fit the model.
    #[error("{path}: tensor '{tensor}': {problem}")]
    Adapter {
        /// the adapter file
        path: String,
        /// the adapter tensor
        tensor: String,
        /// what does not fit
        problem: String,
    },
    /// A tensor operation failed.
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Hyperparameters read from `<arch>.*`.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// Architecture.
    pub arch: Architecture,
    /// Blocks.
    pub n_layers: usize,
    /// Width.
    pub dim: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads.
    pub n_head_kv: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// Training context length.
    pub context_length: usize,
    /// RoPE base.
    pub rope_base: f32,
    /// RMSNorm epsilon.
    pub rms_eps: f64,
    /// Vocabulary (rows of the embedding).
    pub vocab: usize,
}

/// One low-rank pair attached to a projection: y += scale * (x A^T) B^T.
#[derive(Debug, Clone)]
struct LoraPair {
    slot: usize,
    /// A^T, [in, r] (for the embedding: A^T rows per token, [vocab, r]).
    a_t: Tensor,
    /// B^T, [r, out].
    b_t: Tensor,
    /// alpha / r from the adapter file.
    file_scale: f64,
}

/// A projection: quantized weight, optional bias, attached adapters.
#[derive(Debug, Clone)]
pub struct Linear {
    name: String,
    weight: QMatMul,
    in_features: usize,
    out_features: usize,
    bias: Option<Tensor>,
    loras: Vec<LoraPair>,
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

/// A loaded model. Weights stay in the map on CPU.
pub struct Model {
    file: Arc<GgufFile>,
    /// Hyperparameters.
    pub config: ModelConfig,
    device: Device,
    embedding: QTensor,
    embedding_loras: Vec<LoraPair>,
    blocks: Vec<Block>,
    output_norm: Tensor,
    output: Linear,
    rope_freqs: Option<Vec<f32>>,
    /// Attached adapters' user scales by slot (None: detached).
    scales: Vec<Option<f64>>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("path", &self.file.path())
            .field("config", &self.config)
            .finish()
    }
}

fn model_err(file: &GgufFile, problem: String) -> RuntimeError {
    RuntimeError::Model {
        path: file.path().to_string(),
        problem,
    }
}

impl Model {
    /// Map and load the GGUF model at `path` onto `device`.
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Model, RuntimeError> {
        let file = Arc::new(GgufFile::open(path)?);
        Model::from_file(file, device)
    }

    /// Load from an opened GGUF.
    pub fn from_file(file: Arc<GgufFile>, device: &Device) -> Result<Model, RuntimeError> {
        let f = file.as_ref();
        if f.get_str("general.type").as_deref() == Some("adapter") {
            return Err(model_err(
                f,
                "this is a LoRA adapter, not a model; pass it with --lora".into(),
            ));
        }
        let arch_name = f
            .get_str("general.architecture")
            .ok_or_else(|| model_err(f, "no general.architecture".into()))?
            .into_owned();
        let arch = Architecture::from_gguf_name(&arch_name).ok_or_else(|| {
            model_err(
                f,
                format!("unknown architecture '{arch_name}' (llama and qwen2 are supported)"),
            )
        })?;
        let key = |k: &str| {
            f.get_u64(&format!("{arch_name}.{k}"))
                .ok_or_else(|| model_err(f, format!("missing {arch_name}.{k}")))
        };
        let dim = key("embedding_length")? as usize;
        let n_head = key("attention.head_count")? as usize;
        let head_dim = f
            .get_u64(&format!("{arch_name}.attention.key_length"))
            .map_or(dim / n_head, |v| v as usize);
        let config = ModelConfig {
            arch,
            n_layers: key("block_count")? as usize,
            dim,
            n_head,
            n_head_kv: f
                .get_u64(&format!("{arch_name}.attention.head_count_kv"))
                .map_or(n_head, |v| v as usize),
            head_dim,
            context_length: key("context_length")? as usize,
            rope_base: f
                .get_f64(&format!("{arch_name}.rope.freq_base"))
                .unwrap_or(10000.0) as f32,
            rms_eps: f
                .get_f64(&format!("{arch_name}.attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-5),
            vocab: 0,
        };
        let tensor = |name: &str| {
            f.tensor(name)
                .ok_or_else(|| model_err(f, format!("missing tensor '{name}'")))
        };
        let vector = |name: &str, len: usize| -> Result<Tensor, RuntimeError> {
            let t = tensor(name)?;
            if t.dims() != [len as u64] {
                return Err(model_err(
                    f,
                    format!("tensor '{name}' has dims {:?}, expected [{len}]", t.dims()),
                ));
            }
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
                weight: QMatMul::from_qtensor(mapped::qtensor(&file, t, device)?)?,
                in_features: in_f,
                out_features: out_f,
                bias,
                loras: Vec::new(),
            })
        };
        let emb_info = tensor("token_embd.weight")?;
        let vocab = emb_info.dims().get(1).copied().unwrap_or(0) as usize;
        check_dims(f, emb_info, &[dim as u64, vocab as u64])?;
        let config = ModelConfig { vocab, ..config };
        // Hostile or broken hyperparameters must be errors, not divisions by zero.
        if config.n_head == 0
            || config.n_head_kv == 0
            || !config.n_head.is_multiple_of(config.n_head_kv)
        {
            return Err(model_err(
                f,
                format!(
                    "{} query heads cannot share {} key/value heads",
                    config.n_head, config.n_head_kv
                ),
            ));
        }
        if config.head_dim == 0
            || !config.head_dim.is_multiple_of(2)
            || config.n_layers == 0
            || vocab == 0
        {
            return Err(model_err(
                f,
                format!(
                    "unusable hyperparameters: head_dim {}, {} layers, vocabulary {vocab}",
                    config.head_dim, config.n_layers
                ),
            ));
        }
        let (q_out, kv_out) = (n_head * head_dim, config.n_head_kv * head_dim);
        let ffn = key("feed_forward_length")? as usize;
        let mut blocks = Vec::with_capacity(config.n_layers);
        for i in 0..config.n_layers {
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
        let output = match f.tensor("output.weight") {
            Some(_) => linear("output", dim, vocab)?,
            // Tied: the head is the token embedding, read from the same pages.
            None => Linear {
                name: "token_embd.weight".into(),
                weight: QMatMul::from_qtensor(mapped::qtensor(&file, emb_info, device)?)?,
                in_features: dim,
                out_features: vocab,
                bias: None,
                loras: Vec::new(),
            },
        };
        let rope_freqs = match f.tensor("rope_freqs.weight") {
            Some(t) => Some(mapped::small_tensor(f, t, &Device::Cpu)?.to_vec1::<f32>()?),
            None => None,
        };
        Ok(Model {
            embedding: mapped::qtensor(&file, emb_info, device)?,
            embedding_loras: Vec::new(),
            output_norm: vector("output_norm.weight", dim)?,
            output,
            blocks,
            rope_freqs,
            config,
            device: device.clone(),
            scales: Vec::new(),
            file,
        })
    }

    /// The mapped file.
    pub fn file(&self) -> &Arc<GgufFile> {
        &self.file
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    fn linears_mut(&mut self) -> impl Iterator<Item = &mut Linear> {
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

    /// Attach `adapter` at `scale` (y += scale * alpha/r * B A x); returns its slot.
    pub fn attach(
        &mut self,
        adapter: &crate::lora::LoraAdapter,
        scale: f64,
    ) -> Result<usize, RuntimeError> {
        adapter.check_fits(self)?;
        let slot = self.scales.len();
        let device = self.device.clone();
        for (target, pair) in &adapter.pairs {
            let p = LoraPair {
                slot,
                a_t: pair.a_t.to_device(&device)?,
                b_t: pair.b_t.to_device(&device)?,
                file_scale: pair.file_scale,
            };
            if target == "token_embd.weight" {
                self.embedding_loras.push(p);
            } else if let Some(l) = self.linears_mut().find(|l| &l.name == target) {
                l.loras.push(p);
            }
        }
        self.scales.push(Some(scale));
        Ok(slot)
    }

    /// Change an attached adapter's scale.
    pub fn set_scale(&mut self, slot: usize, scale: f64) {
        if let Some(s) = self.scales.get_mut(slot).filter(|s| s.is_some()) {
            *s = Some(scale);
        }
    }

    /// Detach an adapter; the base weights were never touched.
    pub fn detach(&mut self, slot: usize) {
        for l in self.linears_mut() {
            l.loras.retain(|p| p.slot != slot);
        }
        self.embedding_loras.retain(|p| p.slot != slot);
        if let Some(s) = self.scales.get_mut(slot) {
            *s = None;
        }
    }

    /// Shape (in, out) of the projection named `name` ("blk.0.attn_q.weight"),
    /// or of the token embedding ([dim, vocab]).
    pub fn projection_shape(&self, name: &str) -> Option<(usize, usize)> {
        if name == "token_embd.weight" {
            return Some((self.config.dim, self.config.vocab));
        }
        self.blocks
            .iter()
            .flat_map(|b| [&b.q, &b.k, &b.v, &b.o, &b.gate, &b.up, &b.down])
            .chain(std::iter::once(&self.output))
            .find(|l| l.name == name)
            .map(|l| (l.in_features, l.out_features))
    }

    /// A fresh KV cache for up to `max_tokens` positions.
    pub fn session(&self, max_tokens: usize) -> Result<Session<'_>, RuntimeError> {
        let c = &self.config;
        let max = max_tokens.max(1);
        let shape = (1, c.n_head_kv, max, c.head_dim);
        let mut k = Vec::with_capacity(c.n_layers);
        let mut v = Vec::with_capacity(c.n_layers);
        for _ in 0..c.n_layers {
            k.push(Tensor::zeros(shape, DType::F32, &self.device)?);
            v.push(Tensor::zeros(shape, DType::F32, &self.device)?);
        }
        // RoPE tables for every position, computed once, the way ggml does:
        // theta starts at the position and is multiplied by base^(-2/d) per
        // pair in f32, so our angles round exactly like llama.cpp's.
        let half = c.head_dim / 2;
        let theta_scale = c.rope_base.powf(-2.0 / c.head_dim as f32);
        let mut cos = Vec::with_capacity(max * half);
        let mut sin = Vec::with_capacity(max * half);
        for p in 0..max {
            let mut theta = p as f32;
            for i in 0..half {
                let factor = self
                    .rope_freqs
                    .as_ref()
                    .and_then(|r| r.get(i))
                    .copied()
                    .unwrap_or(1.0);
                let a = theta / factor;
                cos.push(a.cos());
                sin.push(a.sin());
                theta *= theta_scale;
            }
        }
        Ok(Session {
            model: self,
            k,
            v,
            pos: 0,
            max,
            cos: Tensor::from_vec(cos, (max, half), &self.device)?,
            sin: Tensor::from_vec(sin, (max, half), &self.device)?,
        })
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

/// One conversation's state: a preallocated KV cache and the position.
pub struct Session<'m> {
    model: &'m Model,
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    pos: usize,
    max: usize,
    cos: Tensor,
    sin: Tensor,
}

impl Session<'_> {
    /// Tokens processed so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Forget everything (the cache is reused).
    pub fn reset(&mut self) {
        self.pos = 0;
    }

    /// Run `tokens` after what came before; returns logits [n, vocab] for the
    /// last position, or for every position when `all` is set.
    pub fn forward(&mut self, tokens: &[u32], all: bool) -> Result<Tensor, RuntimeError> {
        let m = self.model;
        let c = &m.config;
        let t = tokens.len();
        if t == 0 {
            return Err(RuntimeError::Model {
                path: m.file.path().to_string(),
                problem: "no tokens to run (empty input)".into(),
            });
        }
        if self.pos + t > self.max {
            return Err(RuntimeError::Model {
                path: m.file.path().to_string(),
                problem: format!(
                    "{} tokens at position {} exceed the context of {}",
                    t, self.pos, self.max
                ),
            });
        }
        let scales = &m.scales;
        let ids = Tensor::new(tokens, &m.device)?;
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
            Some(Tensor::from_vec(m, (t, total), &self.cos.device().clone())?)
        } else {
            None
        };
        let scale = 1.0 / (hd as f64).sqrt();
        for (i, b) in m.blocks.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &b.attn_norm, c.rms_eps as f32)?;
            let q =
                b.q.forward(&h, scales)?
                    .reshape((1, t, c.n_head, hd))?
                    .transpose(1, 2)?
                    .contiguous()?;
            let k =
                b.k.forward(&h, scales)?
                    .reshape((1, t, c.n_head_kv, hd))?
                    .transpose(1, 2)?
                    .contiguous()?;
            let v =
                b.v.forward(&h, scales)?
                    .reshape((1, t, c.n_head_kv, hd))?
                    .transpose(1, 2)?
                    .contiguous()?;
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
}

/// Row `i` of a [n, vocab] logits tensor as a Vec.
pub fn logits_row(logits: &Tensor, i: usize) -> candle_core::Result<Vec<f32>> {
    logits.get(i)?.to_vec1::<f32>()
}

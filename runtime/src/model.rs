//! The decoder-only transformers of `crate::arch` (llama, mistral-as-llama,
//! qwen2, gemma3) over a memory-mapped GGUF: hyperparameters, loading, adapters attached by slot,
//! and sessions on our CPU engine or on candle.

use crate::gguf::names;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};

use crate::arch::Architecture;
use crate::candle_path::{CandleSession, CandleWeights, LoraPair};
use crate::cpu::{CpuSession, CpuWeights, KvType, StepError};
use crate::finite::check_finite;
use crate::gguf::{GgufError, GgufFile, HyperKey, Hyperparameters, ShapeOrder, ShapeRules};
use crate::mapped;
use crate::tokenizer::{Tokenizer, TokenizerError};
/// The kernel tiers a session may run ([`SessionOptions::isa`]).
pub use lorafold_kernels::Isa;

/// An error loading or running a model or adapter.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The file could not be read as GGUF.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// The model is not one we can run.
    #[error("{}: {problem}", path.display())]
    Model {
        /// the file
        path: PathBuf,
        /// what is wrong
        problem: String,
    },
    /// A LoRA adapter was given where a model was expected.
    #[error("{}: this is a LoRA adapter, not a model", path.display())]
    AdapterNotModel {
        /// the file
        path: PathBuf,
    },
    /// An adapter does not fit the model.
    #[error("{}: tensor '{tensor}': {problem}", path.display())]
    Adapter {
        /// the adapter file
        path: PathBuf,
        /// the adapter tensor
        tensor: String,
        /// what does not fit
        problem: String,
    },
    /// A value the caller chose (adapter scale, context size, threads, a
    /// sampling option) would run to garbage or exhaust the machine.
    #[error("{name} {value} is out of range: {expected}")]
    OutOfRange {
        /// what the value is
        name: &'static str,
        /// the value as given
        value: String,
        /// the range it must lie in
        expected: String,
    },
    /// A tensor operation failed.
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Largest |scale| an adapter may be attached at: a LoRA delta scaled past
/// this swamps the base weights, and llama.cpp's users stay within a few units.
pub const MAX_ADAPTER_SCALE: f64 = 100.0;

/// Threads allowed per core: beyond a few per core a session only thrashes
/// (10,000 threads gave no token in two minutes on two cores).
pub const THREADS_PER_CORE: usize = 4;

fn out_of_range(
    name: &'static str,
    value: impl std::fmt::Display,
    expected: String,
) -> RuntimeError {
    RuntimeError::OutOfRange {
        name,
        value: value.to_string(),
        expected,
    }
}

/// Check an adapter's user scale: finite, |scale| <= [`MAX_ADAPTER_SCALE`].
pub fn check_scale(scale: f64) -> Result<(), RuntimeError> {
    if scale.is_finite() && scale.abs() <= MAX_ADAPTER_SCALE {
        return Ok(());
    }
    Err(out_of_range(
        "adapter scale",
        crate::number::compact(scale),
        format!("it must be finite, between -{MAX_ADAPTER_SCALE} and {MAX_ADAPTER_SCALE}"),
    ))
}

/// Check a CPU thread count: at least 1, at most [`THREADS_PER_CORE`] per core.
pub fn check_threads(threads: usize) -> Result<usize, RuntimeError> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let max = THREADS_PER_CORE * cores;
    if (1..=max).contains(&threads) {
        return Ok(threads);
    }
    Err(out_of_range(
        "threads",
        threads,
        format!("between 1 and {max} ({THREADS_PER_CORE} per core, {cores} cores)"),
    ))
}

/// Size the process's CPU work to `threads` before any work starts: the
/// count is checked first (rayon would start every thread asked for), then
/// candle's kernels (by `RAYON_NUM_THREADS`) and rayon's global pool, which
/// the converter uses, are set. Once per process.
pub fn use_threads(threads: usize) -> Result<(), RuntimeError> {
    check_threads(threads)?;
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .map_err(|e| out_of_range("threads", threads, format!("set once per process ({e})")))
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
    /// Feed-forward width.
    pub ffn: usize,
    /// Training context length.
    pub context_length: usize,
    /// RoPE base.
    pub rope_base: f32,
    /// RMSNorm epsilon.
    pub rms_eps: f64,
    /// Vocabulary (rows of the embedding).
    pub vocab: usize,
    /// Positions a local layer attends to (architectures with local layers).
    pub sliding_window: Option<usize>,
}

/// How one layer attends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerAttention {
    /// RoPE base.
    pub rope_base: f32,
    /// Keys a query sees, itself included (None: every earlier position).
    pub window: Option<usize>,
}

impl ModelConfig {
    /// The architecture's description.
    pub fn spec(&self) -> &'static crate::arch::ArchSpec {
        self.arch.spec()
    }

    /// How `layer` attends: local layers use the architecture's own RoPE
    /// base and the sliding window, the others the file's base and every
    /// position.
    pub fn layer_attention(&self, layer: usize) -> LayerAttention {
        match (self.spec().local_layers, self.sliding_window) {
            (Some(local), Some(window)) if local.is_local(layer) => LayerAttention {
                rope_base: local.rope_base,
                window: Some(window),
            },
            _ => LayerAttention {
                rope_base: self.rope_base,
                window: None,
            },
        }
    }

    /// The value of a width tensor shapes are made of.
    pub fn width(&self, w: crate::arch::Width) -> usize {
        use crate::arch::Width;
        match w {
            Width::Hidden => self.dim,
            Width::Queries => self.n_head * self.head_dim,
            Width::KeyValues => self.n_head_kv * self.head_dim,
            Width::HeadDim => self.head_dim,
            Width::Ffn => self.ffn,
        }
    }

    /// For each layer, the index of its RoPE base in [`ModelConfig::rope_bases`].
    pub fn layer_ropes(&self) -> Vec<usize> {
        let bases = self.rope_bases();
        (0..self.n_layers)
            .map(|l| {
                let b = self.layer_attention(l).rope_base;
                bases.iter().position(|&x| x == b).unwrap_or(0)
            })
            .collect()
    }

    /// The RoPE bases the layers use, each once, in first-use order.
    pub fn rope_bases(&self) -> Vec<f32> {
        let mut bases: Vec<f32> = Vec::new();
        for l in 0..self.n_layers {
            let b = self.layer_attention(l).rope_base;
            if !bases.contains(&b) {
                bases.push(b);
            }
        }
        bases
    }

    /// What the input embedding is multiplied by (√width as f32, as
    /// llama.cpp and transformers compute it), when the architecture scales it.
    pub fn embedding_scale(&self) -> Option<f32> {
        self.spec()
            .scales_embedding
            .then(|| (self.dim as f32).sqrt())
    }
}

fn model_err(file: &GgufFile, problem: String) -> RuntimeError {
    RuntimeError::Model {
        path: file.path().to_path_buf(),
        problem,
    }
}

impl ModelConfig {
    /// Read and check the hyperparameters of the model in `f`.
    pub fn read(f: &GgufFile) -> Result<ModelConfig, RuntimeError> {
        if f.get_str(names::TYPE).as_deref() == Some(names::TYPE_ADAPTER) {
            return Err(RuntimeError::AdapterNotModel {
                path: f.path().to_path_buf(),
            });
        }
        let arch_name = f
            .get_str(names::ARCHITECTURE)
            .ok_or_else(|| model_err(f, "no general.architecture".into()))?
            .into_owned();
        let arch = Architecture::from_gguf_name(&arch_name)
            .ok_or_else(|| model_err(f, crate::arch::unsupported(&arch_name)))?;
        let h = Hyperparameters::read(f, &arch_name);
        let need = |v: Option<u64>, k: HyperKey| {
            v.map(|v| v as usize)
                .ok_or_else(|| model_err(f, format!("missing {}", k.key(&arch_name))))
        };
        // A NaN or non-positive epsilon or RoPE base makes every logit NaN.
        let positive = |v: Option<f64>, k: HyperKey, default: f64| match v {
            None => Ok(default),
            Some(v) if v.is_finite() && v > 0.0 => Ok(v),
            Some(v) => Err(model_err(
                f,
                format!(
                    "{} is {}: it must be finite and > 0",
                    k.key(&arch_name),
                    crate::number::compact(v)
                ),
            )),
        };
        let dim = need(h.embedding_length, HyperKey::EmbeddingLength)?;
        let n_head = need(h.head_count, HyperKey::HeadCount)?;
        let emb_info = f
            .tensor(names::TOKEN_EMBD)
            .ok_or_else(|| model_err(f, format!("missing tensor '{}'", names::TOKEN_EMBD)))?;
        let rows = emb_info.dims().get(1).copied().unwrap_or(0);
        let vocab = rows as usize;
        let config = ModelConfig {
            arch,
            n_layers: need(h.block_count, HyperKey::BlockCount)?,
            dim,
            n_head,
            n_head_kv: h.kv_heads().map_or(n_head, |v| v as usize),
            head_dim: h.head_dim().map_or(0, |v| v as usize),
            ffn: need(h.feed_forward_length, HyperKey::FeedForwardLength)?,
            context_length: need(h.context_length, HyperKey::ContextLength)?,
            rope_base: positive(h.rope_freq_base, HyperKey::RopeFreqBase, 10000.0)? as f32,
            rms_eps: positive(h.rms_norm_eps, HyperKey::RmsEpsilon, 1e-5)?,
            vocab,
            sliding_window: match arch.spec().local_layers {
                None => None,
                Some(_) => match need(h.sliding_window, HyperKey::SlidingWindow)? {
                    0 => {
                        return Err(model_err(
                            f,
                            format!(
                                "{} is 0: a local layer must see at least its own position",
                                HyperKey::SlidingWindow.key(&arch_name)
                            ),
                        ))
                    }
                    w => Some(w),
                },
            },
        };
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
        if config.context_length == 0 {
            return Err(model_err(
                f,
                format!(
                    "{} is 0: a model needs a context of at least 1 token",
                    HyperKey::ContextLength.key(&arch_name)
                ),
            ));
        }
        // Both engines rotate every dimension of a head; a model that rotates
        // fewer (partial rotary) would run, and run wrong.
        if let Some(r) = h
            .rope_dimension_count
            .filter(|&r| r != config.head_dim as u64)
        {
            return Err(model_err(
                f,
                format!(
                    "{} is {r}, but heads are {} wide: RoPE on part of a head is not supported",
                    HyperKey::RopeDimensionCount.key(&arch_name),
                    config.head_dim
                ),
            ));
        }
        // The sizes sessions allocate by are checked against the tensors
        // present, so a hostile count (block_count 2^40) is an error naming
        // its key before anything is allocated by it.
        let [layers, dim, n_head, n_head_kv, head_dim, ffn] = [
            config.n_layers,
            dim,
            n_head,
            config.n_head_kv,
            config.head_dim,
            config.ffn,
        ]
        .map(|v| v as u64);
        // A vocabulary the file states must be the embedding's rows.
        let vocab = h.vocab_size.unwrap_or(rows);
        let rules = ShapeRules::gguf(arch, [layers, dim, n_head, n_head_kv, head_dim, ffn, vocab]);
        let tensors: Vec<(&str, &[u64])> = f
            .tensors()
            .iter()
            .map(|t| (t.name.as_str(), t.dims()))
            .collect();
        rules
            .check(&tensors, str::to_string, ShapeOrder::Ggml)
            .map_err(|problem| model_err(f, problem))?;
        Ok(config)
    }
}

/// A loaded model. Weights stay in the map on CPU.
pub struct Model {
    file: Arc<GgufFile>,
    /// Hyperparameters.
    pub config: ModelConfig,
    device: Device,
    weights: ModelWeights,
    rope_freqs: Option<Vec<f32>>,
    /// Attached adapters' user scales by slot (None: detached).
    scales: Vec<Option<f64>>,
    /// The file's tokenizer, built before any weight was read.
    tokenizer: Option<Arc<Tokenizer>>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("path", &self.file.path())
            .field("config", &self.config)
            .finish()
    }
}

/// A model file opened and checked, its tokenizer built, no weight read:
/// what a caller checks a request against (an adapter, a context, a prompt)
/// before paying for the load, which at 7B is seconds and gigabytes.
pub struct OpenedModel {
    file: Arc<GgufFile>,
    /// Hyperparameters.
    pub config: ModelConfig,
    tokenizer: Option<Arc<Tokenizer>>,
}

impl std::fmt::Debug for OpenedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenedModel")
            .field("path", &self.file.path())
            .field("config", &self.config)
            .finish()
    }
}

impl OpenedModel {
    /// Map a GGUF file and check its header and tokenizer.
    pub fn open(path: impl AsRef<Path>) -> Result<OpenedModel, RuntimeError> {
        OpenedModel::from_file(Arc::new(GgufFile::open(path)?))
    }

    /// Check an opened GGUF's header and build its tokenizer.
    pub fn from_file(file: Arc<GgufFile>) -> Result<OpenedModel, RuntimeError> {
        let config = ModelConfig::read(&file)?;
        // Built before any weight is read: a file whose tokenizer we cannot
        // build is refused in milliseconds, not after a load of gigabytes.
        let tokenizer = match file.get(names::TOKENIZER_MODEL) {
            Some(_) => {
                Some(Arc::new(Tokenizer::from_gguf(&file).map_err(|e| {
                    model_err(&file, format!("tokenizer: {}", e.problem))
                })?))
            }
            None => None,
        };
        Ok(OpenedModel {
            file,
            config,
            tokenizer,
        })
    }

    /// The file's tokenizer; an error when the file has none.
    pub fn tokenizer(&self) -> Result<Arc<Tokenizer>, TokenizerError> {
        built_or_read(&self.tokenizer, &self.file)
    }

    /// Refuse a session of `max` positions that the model cannot hold (as
    /// [`Model::session_with`] would), before the load.
    pub fn check_context(
        &self,
        max: usize,
        threads: usize,
        kv: KvType,
    ) -> Result<(), RuntimeError> {
        check_session(&self.file, &self.config, Backend::Engine, max, threads, kv)
    }

    /// (input width, output width) of the projection `name`, if the model
    /// has it.
    pub fn projection_shape(&self, name: &str) -> Option<(usize, usize)> {
        projection_shape(&self.file, &self.config, name)
    }

    /// Read the weights for `device` with its default backend.
    pub fn load(self, device: &Device) -> Result<Model, RuntimeError> {
        self.load_with(device, Backend::default_for(device))
    }

    /// Read the weights for `device` with a chosen backend.
    pub fn load_with(self, device: &Device, backend: Backend) -> Result<Model, RuntimeError> {
        let OpenedModel {
            file,
            config,
            tokenizer,
        } = self;
        let rope_freqs = match file.tensor("rope_freqs.weight") {
            Some(t) => Some(mapped::small_tensor(&file, t, &Device::Cpu)?.to_vec1::<f32>()?),
            None => None,
        };
        let weights = match backend {
            Backend::Engine if device.is_cpu() => {
                ModelWeights::Engine(CpuWeights::load(file.clone(), &config).map_err(|p| {
                    RuntimeError::Model {
                        path: file.path().to_path_buf(),
                        problem: format!("tensor '{}': {}", p.tensor, p.problem),
                    }
                })?)
            }
            Backend::Engine => {
                return Err(model_err(
                    &file,
                    "the CPU engine runs on the CPU only; use the candle backend on GPUs".into(),
                ))
            }
            Backend::Candle => ModelWeights::Candle(CandleWeights::load(&file, &config, device)?),
        };
        check_small_tensors(&file, &config, rope_freqs.as_deref())?;
        Ok(Model {
            weights,
            rope_freqs,
            config,
            device: device.clone(),
            scales: Vec::new(),
            tokenizer,
            file,
        })
    }
}

/// Which forward pass a model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Our CPU engine (lorafold-kernels, a worker pool, fused attention and adapters).
    Engine,
    /// candle: the path on CUDA and Metal, and a reference on CPU.
    Candle,
}

impl Backend {
    /// The engine on CPU, candle elsewhere.
    pub fn default_for(device: &Device) -> Backend {
        if device.is_cpu() {
            Backend::Engine
        } else {
            Backend::Candle
        }
    }
}

enum ModelWeights {
    Engine(CpuWeights),
    Candle(CandleWeights),
}

/// How to make a session.
#[derive(Debug, Clone, Copy)]
pub struct SessionOptions {
    /// Positions the KV cache holds.
    pub max_tokens: usize,
    /// CPU threads (default: RAYON_NUM_THREADS, else every core).
    pub threads: Option<usize>,
    /// The engine's KV cache type (candle's is f32).
    pub kv: KvType,
    /// The engine's kernel tier (default: the best this CPU has, capped by
    /// `LORAFOLD_ISA`); `Isa::scalar()` gives the portable reference path.
    pub isa: Option<Isa>,
}

impl SessionOptions {
    /// Defaults for `max_tokens` positions.
    pub fn new(max_tokens: usize) -> SessionOptions {
        SessionOptions {
            max_tokens,
            threads: None,
            kv: KvType::default(),
            isa: None,
        }
    }
}

/// The CPU threads a session uses when not told: what `--threads` put in
/// RAYON_NUM_THREADS (candle reads it too), else every core.
pub fn default_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

impl Model {
    /// Map and load the GGUF model at `path` onto `device` (our engine on CPU).
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Model, RuntimeError> {
        Model::load_with(path, device, Backend::default_for(device))
    }

    /// Map and load with a chosen backend (candle on CPU is the test reference).
    pub fn load_with(
        path: impl AsRef<Path>,
        device: &Device,
        backend: Backend,
    ) -> Result<Model, RuntimeError> {
        let file = Arc::new(GgufFile::open(path)?);
        Model::from_file_with(file, device, backend)
    }

    /// Load from an opened GGUF.
    pub fn from_file(file: Arc<GgufFile>, device: &Device) -> Result<Model, RuntimeError> {
        Model::from_file_with(file, device, Backend::default_for(device))
    }

    /// Load from an opened GGUF with a chosen backend.
    pub fn from_file_with(
        file: Arc<GgufFile>,
        device: &Device,
        backend: Backend,
    ) -> Result<Model, RuntimeError> {
        OpenedModel::from_file(file)?.load_with(device, backend)
    }
    /// An error about this model.
    fn problem(&self, problem: String) -> RuntimeError {
        RuntimeError::Model {
            path: self.file.path().to_path_buf(),
            problem,
        }
    }

    /// Give block `layer`'s mapped weight pages back to the file once a
    /// layer-at-a-time run is done with them ([`Session::block_rows`]), so
    /// that only the layer in use stays resident.
    pub fn release_layer(&self, layer: usize) {
        if let ModelWeights::Engine(w) = &self.weights {
            if layer < w.blocks.len() {
                w.release_block(layer);
            }
        }
    }

    /// The file's tokenizer (built once, at load); an error when the file
    /// has none.
    pub fn tokenizer(&self) -> Result<Arc<Tokenizer>, TokenizerError> {
        built_or_read(&self.tokenizer, &self.file)
    }

    /// The mapped file.
    pub fn file(&self) -> &Arc<GgufFile> {
        &self.file
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The forward pass this model runs.
    pub fn backend(&self) -> Backend {
        match self.weights {
            ModelWeights::Engine(_) => Backend::Engine,
            ModelWeights::Candle(_) => Backend::Candle,
        }
    }

    /// Attach `adapter` at `scale` (y += scale * alpha/r * B A x); returns its slot.
    pub fn attach(
        &mut self,
        adapter: &crate::lora::LoraAdapter,
        scale: f64,
    ) -> Result<usize, RuntimeError> {
        check_scale(scale)?;
        adapter.check_fits(self)?;
        let slot = self.scales.len();
        match &mut self.weights {
            ModelWeights::Engine(w) => {
                for (target, pair) in &adapter.pairs {
                    let lora = pair.to_factors(slot, target == names::TOKEN_EMBD)?;
                    if target == names::TOKEN_EMBD {
                        w.embedding_loras.push(lora);
                    } else if let Some(m) = w.projections_mut().find(|m| &m.name == target) {
                        m.loras.push(lora);
                    }
                }
            }
            ModelWeights::Candle(w) => {
                for (target, pair) in &adapter.pairs {
                    let p = LoraPair {
                        slot,
                        a_t: pair.a_t.to_device(&self.device)?,
                        b_t: pair.b_t.to_device(&self.device)?,
                        file_scale: pair.file_scale,
                    };
                    if target == names::TOKEN_EMBD {
                        w.embedding_loras.push(p);
                    } else if let Some(l) = w.linears_mut().find(|l| &l.name == target) {
                        l.loras.push(p);
                    }
                }
            }
        }
        self.scales.push(Some(scale));
        Ok(slot)
    }

    /// The user scale of the adapter in `slot`; None when it holds none.
    pub fn scale(&self, slot: usize) -> Option<f64> {
        self.scales.get(slot).copied().flatten()
    }

    /// Change an attached adapter's scale (checked as [`check_scale`] does).
    pub fn set_scale(&mut self, slot: usize, scale: f64) -> Result<(), RuntimeError> {
        check_scale(scale)?;
        if let Some(s) = self.scales.get_mut(slot).filter(|s| s.is_some()) {
            *s = Some(scale);
        }
        Ok(())
    }

    /// Detach an adapter; the base weights were never touched.
    pub fn detach(&mut self, slot: usize) {
        match &mut self.weights {
            ModelWeights::Engine(w) => {
                w.embedding_loras.retain(|p| p.slot != slot);
                for m in w.projections_mut() {
                    m.loras.retain(|p| p.slot != slot);
                }
            }
            ModelWeights::Candle(w) => {
                w.embedding_loras.retain(|p| p.slot != slot);
                for l in w.linears_mut() {
                    l.loras.retain(|p| p.slot != slot);
                }
            }
        }
        if let Some(s) = self.scales.get_mut(slot) {
            *s = None;
        }
    }

    /// Shape (in, out) of the projection named `name` ("blk.0.attn_q.weight"),
    /// or of the token embedding ([dim, vocab]).
    pub fn projection_shape(&self, name: &str) -> Option<(usize, usize)> {
        projection_shape(&self.file, &self.config, name)
    }

    /// A fresh session for up to `max_tokens` positions, with default options.
    pub fn session(&self, max_tokens: usize) -> Result<Session<'_>, RuntimeError> {
        self.session_with(SessionOptions::new(max_tokens))
    }

    /// A fresh session.
    pub fn session_with(&self, opts: SessionOptions) -> Result<Session<'_>, RuntimeError> {
        let max = opts.max_tokens;
        let threads = opts.threads.unwrap_or_else(default_threads);
        check_session(
            &self.file,
            &self.config,
            self.backend(),
            max,
            threads,
            opts.kv,
        )?;
        let inner = match &self.weights {
            ModelWeights::Engine(w) => SessionKind::Engine(CpuSession::new(
                w,
                &self.config,
                self.rope_freqs.as_deref(),
                max,
                threads,
                opts.kv,
                opts.isa.unwrap_or_else(Isa::detect),
            )),
            ModelWeights::Candle(_) => SessionKind::Candle(CandleSession::new(
                &self.config,
                &self.device,
                self.rope_freqs.as_deref(),
                max,
            )?),
        };
        Ok(Session {
            model: self,
            inner,
            logits: Vec::new(),
        })
    }
}

/// The tokenizer built at open, or the file's error again when it has none
/// (its message says what is missing).
fn built_or_read(
    built: &Option<Arc<Tokenizer>>,
    file: &GgufFile,
) -> Result<Arc<Tokenizer>, TokenizerError> {
    match built {
        Some(t) => Ok(t.clone()),
        None => Tokenizer::from_gguf(file).map(Arc::new),
    }
}

/// (input width, output width) of the projection `name`, from the header.
fn projection_shape(file: &GgufFile, c: &ModelConfig, name: &str) -> Option<(usize, usize)> {
    let (q_out, kv_out) = (c.n_head * c.head_dim, c.n_head_kv * c.head_dim);
    if name == names::TOKEN_EMBD {
        return Some((c.dim, c.vocab));
    }
    if name == names::OUTPUT {
        return file.tensor(name).map(|_| (c.dim, c.vocab));
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    if layer.parse::<usize>().ok()? >= c.n_layers {
        return None;
    }
    Some(match part {
        "attn_q.weight" => (c.dim, q_out),
        "attn_k.weight" | "attn_v.weight" => (c.dim, kv_out),
        "attn_output.weight" => (q_out, c.dim),
        "ffn_gate.weight" | "ffn_up.weight" => (c.dim, c.ffn),
        "ffn_down.weight" => (c.ffn, c.dim),
        _ => return None,
    })
}

/// Refuse sessions that cannot work: no context, more memory than the
/// machine has (checked before allocating), or threads far past the cores.
fn check_session(
    file: &GgufFile,
    c: &ModelConfig,
    backend: Backend,
    max: usize,
    threads: usize,
    kv: KvType,
) -> Result<(), RuntimeError> {
    let err = |problem: String| Err(model_err(file, problem));
    if max == 0 {
        return err("a context of 0 tokens holds nothing; give at least 1".into());
    }
    // Past the training context RoPE positions are out of distribution
    // and the output degrades; a hostile --ctx is refused here too.
    if max > c.context_length {
        return err(format!(
            "a context of {max} tokens is more than {}.context_length {}",
            c.arch.gguf_name(),
            c.context_length
        ));
    }
    check_threads(threads)?;
    let elem = match (backend, kv) {
        (Backend::Engine, KvType::F16) => 2,
        _ => 4,
    };
    // Keys and values, plus RoPE tables and per-thread scores.
    let bytes = [c.n_layers, c.n_head_kv, c.head_dim, 2 * elem]
        .into_iter()
        .try_fold(max, usize::checked_mul)
        .and_then(|kv| kv.checked_add(max.checked_mul(4 * (c.head_dim + threads))?));
    match (bytes, physical_memory()) {
        (None, _) => err(format!("a context of {max} tokens does not fit in memory")),
        (Some(b), Some(total)) if b as u64 > total => err(format!(
            "a context of {max} tokens needs {:.1} GiB of KV cache; this machine has {:.1} GiB",
            b as f64 / (1u64 << 30) as f64,
            total as f64 / (1u64 << 30) as f64
        )),
        _ => Ok(()),
    }
}

/// Refuse NaN or infinite values in the model's small tensors (norms,
/// biases, RoPE factors): one of them turns every logit into NaN. The
/// quantized matrices are not scanned: reading every weight would cost the
/// load time that the memory map saves.
fn check_small_tensors(
    file: &GgufFile,
    c: &ModelConfig,
    rope_freqs: Option<&[f32]>,
) -> Result<(), RuntimeError> {
    let bad =
        |tensor: &str, problem: String| model_err(file, format!("tensor '{tensor}': {problem}"));
    if let Some(r) = rope_freqs {
        check_finite(r).map_err(|p| bad("rope_freqs.weight", format!("{p}: not finite")))?;
    }
    // The loader checked the dims of every tensor it uses; this bound keeps
    // a huge unused one from being copied.
    let widest = [c.dim, c.ffn, c.vocab, c.n_head * c.head_dim]
        .into_iter()
        .max()
        .unwrap_or(0) as u64;
    for t in file.tensors() {
        let small = t.dims().len() == 1 && t.n_elements() <= widest;
        if small && (t.name.ends_with("_norm.weight") || t.name.ends_with(".bias")) {
            let v = mapped::small_tensor(file, t, &Device::Cpu)?.to_vec1::<f32>()?;
            check_finite(&v).map_err(|p| bad(&t.name, format!("{p}: not finite")))?;
        }
    }
    Ok(())
}

/// Physical memory in bytes, where the OS says (Linux's /proc/meminfo).
pub fn physical_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

// One session per conversation, so its size is of no account.
#[allow(clippy::large_enum_variant)]
enum SessionKind<'m> {
    Engine(CpuSession<'m>),
    Candle(CandleSession),
}

/// One conversation's state: a preallocated KV cache and the position.
pub struct Session<'m> {
    model: &'m Model,
    inner: SessionKind<'m>,
    /// candle's logits copied out, so both paths can lend a slice.
    logits: Vec<f32>,
}

impl<'m> Session<'m> {
    /// Tokens processed so far.
    pub fn position(&self) -> usize {
        match &self.inner {
            SessionKind::Engine(s) => s.position(),
            SessionKind::Candle(s) => s.position(),
        }
    }

    /// Positions the cache holds.
    pub fn max_tokens(&self) -> usize {
        match &self.inner {
            SessionKind::Engine(s) => s.max_tokens(),
            SessionKind::Candle(s) => s.max_tokens(),
        }
    }

    /// Forget everything (the cache is reused).
    pub fn reset(&mut self) {
        match &mut self.inner {
            SessionKind::Engine(s) => s.reset(),
            SessionKind::Candle(s) => s.reset(),
        }
    }

    /// Run `tokens` after what came before; returns the logits of the last
    /// position (`[vocab]`), or of every position (`[n, vocab]`) when `all`.
    /// The engine allocates nothing here once the session exists.
    pub fn logits(&mut self, tokens: &[u32], all: bool) -> Result<&[f32], RuntimeError> {
        let m = self.model;
        let err = |problem: String| RuntimeError::Model {
            path: m.file.path().to_path_buf(),
            problem,
        };
        let logits = match &mut self.inner {
            SessionKind::Engine(s) => s
                .forward(tokens, all, &m.scales)
                .map_err(|e| err(e.to_string()))?,
            SessionKind::Candle(s) => {
                check_tokens(tokens, s.position(), s.max_tokens(), m.config.vocab)
                    .map_err(|e| err(e.to_string()))?;
                let ModelWeights::Candle(w) = &m.weights else {
                    unreachable!("a candle session comes from candle weights")
                };
                let t = s.forward(w, &m.config, &m.scales, tokens, all)?;
                self.logits = t.flatten_all()?.to_vec1::<f32>()?;
                &self.logits
            }
        };
        // The big matrices are not scanned at load (that would cost the load
        // time the map saves), so a NaN weight shows here: an error, where
        // sampling would read NaN logits as token 0 and print `<unk>`.
        check_finite(logits).map_err(|p| {
            err(format!(
                "the logits are not finite ({p}): the model or an adapter holds NaN or infinite weights"
            ))
        })?;
        Ok(logits)
    }

    /// Run `tokens` as [`Session::logits`] does (last position's logits),
    /// showing `observer` the f32 rows every block's linear layers read:
    /// what calibration accumulates. The CPU engine only.
    pub fn observe(
        &mut self,
        tokens: &[u32],
        observer: &mut crate::cpu::LinearObserver<'_>,
    ) -> Result<(), RuntimeError> {
        let m = self.model;
        let err = |problem: String| RuntimeError::Model {
            path: m.file.path().to_path_buf(),
            problem,
        };
        match &mut self.inner {
            SessionKind::Engine(s) => {
                let l = s
                    .forward_observed(tokens, false, &m.scales, Some(observer))
                    .map_err(|e| err(e.to_string()))?;
                check_finite(l).map_err(|p| err(format!("the logits are not finite ({p})")))?;
                Ok(())
            }
            SessionKind::Candle(_) => Err(err(
                "observing layer inputs needs the CPU engine, not candle's path".into(),
            )),
        }
    }

    /// The engine's session, or an error naming the model for candle's path.
    fn engine(&mut self, what: &str) -> Result<&mut CpuSession<'m>, RuntimeError> {
        let path = self.model.file.path();
        match &mut self.inner {
            SessionKind::Engine(s) => Ok(s),
            SessionKind::Candle(_) => Err(RuntimeError::Model {
                path: path.to_path_buf(),
                problem: format!("{what} needs the CPU engine, not candle's path"),
            }),
        }
    }

    /// A window's hidden rows entering the first block (`[tokens, dim]`
    /// into `out`), for running the model a layer at a time over many
    /// windows ([`Session::block_rows`]). The CPU engine only.
    pub fn embed_rows(&mut self, tokens: &[u32], out: &mut Vec<f32>) -> Result<(), RuntimeError> {
        let m = self.model;
        self.engine("running a layer at a time")?
            .embed_rows(tokens, &m.scales, out)
            .map_err(|e| m.problem(e.to_string()))
    }

    /// [`Session::embed_rows`] of every window: where a run a layer at a
    /// time starts.
    pub fn embed_windows(&mut self, windows: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, RuntimeError> {
        windows
            .iter()
            .map(|w| {
                let mut x = Vec::new();
                self.embed_rows(w, &mut x).map(|()| x)
            })
            .collect()
    }

    /// Block `layer` over a window's hidden rows `x` in place (from an
    /// empty cache), showing `observer` the rows its linear layers read;
    /// the rows that leave it must be finite.
    pub fn block_rows(
        &mut self,
        layer: usize,
        x: &mut [f32],
        observer: Option<&mut crate::cpu::LinearObserver<'_>>,
    ) -> Result<(), RuntimeError> {
        let m = self.model;
        if layer >= m.config.n_layers || !x.len().is_multiple_of(m.config.dim) {
            return Err(m.problem(format!(
                "block {layer} over {} values: the model has {} blocks of width {}",
                x.len(),
                m.config.n_layers,
                m.config.dim
            )));
        }
        self.engine("running a layer at a time")?
            .block_rows(layer, x, &m.scales, observer)
            .map_err(|e| m.problem(e.to_string()))?;
        check_finite(x).map_err(|p| {
            m.problem(format!(
                "the hidden states leaving block {layer} are not finite ({p})"
            ))
        })
    }

    /// The logits (`[t, vocab]` into `out`) of a window's hidden rows `x`
    /// leaving the last block ([`Session::block_rows`]); they must be finite.
    pub fn head_rows(&mut self, x: &[f32], out: &mut Vec<f32>) -> Result<(), RuntimeError> {
        let m = self.model;
        self.engine("running a layer at a time")?
            .head_rows(x, &m.scales, out)
            .map_err(|e| m.problem(e.to_string()))?;
        check_finite(out).map_err(|p| m.problem(format!("the logits are not finite ({p})")))
    }

    /// [`Session::logits`] as a `[n, vocab]` tensor on the CPU.
    pub fn forward(&mut self, tokens: &[u32], all: bool) -> Result<Tensor, RuntimeError> {
        let vocab = self.model.config.vocab;
        let l = self.logits(tokens, all)?;
        Ok(Tensor::from_slice(
            l,
            (l.len() / vocab, vocab),
            &Device::Cpu,
        )?)
    }
}

/// The checks the engine makes before a step, for candle's path.
fn check_tokens(tokens: &[u32], pos: usize, max: usize, vocab: usize) -> Result<(), StepError> {
    if tokens.is_empty() {
        return Err(StepError::Empty);
    }
    if pos + tokens.len() > max {
        return Err(StepError::ContextFull {
            tokens: tokens.len(),
            position: pos,
            max,
        });
    }
    match tokens.iter().find(|&&id| id as usize >= vocab) {
        Some(&id) => Err(StepError::TokenOutOfRange { id, vocab }),
        None => Ok(()),
    }
}

/// Row `i` of a [n, vocab] logits tensor as a Vec.
pub fn logits_row(logits: &Tensor, i: usize) -> candle_core::Result<Vec<f32>> {
    logits.get(i)?.to_vec1::<f32>()
}

//! `Model`, `Adapter`, `Session` and the generation iterator.
//!
//! A session's KV cache borrows its model's weights, so a `Session` holds
//! the model's core (an `Arc`) alive; attaching, rescaling or detaching an
//! adapter needs the core alone (`Arc::get_mut`), so it is refused while a
//! session lives, as the C ABI refuses it (`LORAFOLD_ERR_BUSY`). Every long
//! call runs with the Python thread detached (the GIL released), and the
//! locks are taken there, never while waiting for Python.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::Device;
use lorafold_runtime::cpu::KvType;
use lorafold_runtime::generate::{close_turn, prompt_ids, Generation, Sampler, SamplerConfig};
use lorafold_runtime::lora::LoraAdapter;
use lorafold_runtime::model::{check_threads, Model, OpenedModel, Session, SessionOptions};
use lorafold_runtime::tokenizer::Tokenizer;
use numpy::{PyArray1, PyArrayMethods};
use pyo3::prelude::*;

use crate::errors::{guarded, Failure, Fallible, Kind, Raise};

/// A model and what every session of it shares.
struct Core {
    model: Model,
    tokenizer: Arc<Tokenizer>,
    threads: Option<usize>,
    kv: KvType,
    ctx: usize,
}

/// A mutex that a panic elsewhere does not make unusable: the state it
/// guards is replaced whole by every call, never left half-changed.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn parse_kv(kv: &str) -> Fallible<KvType> {
    kv.parse()
        .map_err(|e: String| Failure::new(Kind::Range, format!("kv: {e}")))
}

/// A GGUF model on the CPU, weights memory-mapped; adapters attach to it
/// by slot without reloading it.
///
/// threads: CPU threads of its sessions (default: all cores); ctx: the
/// context of its sessions (default: 2048, or the model's context length
/// if smaller); kv: the KV cache type, "f16" (as llama.cpp) or "f32".
#[pyclass(module = "lorafold", name = "Model", frozen)]
pub struct PyModel {
    core: Mutex<Arc<Core>>,
    path: PathBuf,
}

#[pymethods]
impl PyModel {
    #[new]
    #[pyo3(signature = (path, threads=None, ctx=None, kv="f16"))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        threads: Option<usize>,
        ctx: Option<usize>,
        kv: &str,
    ) -> PyResult<PyModel> {
        let kv = parse_kv(kv).raise(py)?;
        let shown = path.clone();
        let core = py
            .detach(|| {
                guarded(|| {
                    if let Some(t) = threads {
                        check_threads(t).map_err(Failure::from)?;
                    }
                    // Refused before the weights are read, as `lorafold run` does.
                    let opened = OpenedModel::open(&path)?;
                    let tokenizer = opened
                        .tokenizer()
                        .map_err(|e| Failure::of(Kind::File, &e))?;
                    let ctx = ctx.unwrap_or_else(|| opened.config.context_length.clamp(1, 2048));
                    let t = threads.unwrap_or_else(lorafold_runtime::model::default_threads);
                    opened
                        .check_context(ctx, t, kv)
                        .map_err(|e| Failure::of(Kind::Range, &e).context(format!("ctx {ctx}")))?;
                    let model = opened.load(&Device::Cpu)?;
                    Ok(Core {
                        model,
                        tokenizer,
                        threads,
                        kv,
                        ctx,
                    })
                })
            })
            .raise(py)?;
        Ok(PyModel {
            core: Mutex::new(Arc::new(core)),
            path: shown,
        })
    }

    /// The model file.
    #[getter]
    fn path(&self) -> PathBuf {
        self.path.clone()
    }

    /// Tokens in the vocabulary.
    #[getter]
    fn vocab_size(&self) -> usize {
        lock(&self.core).model.config.vocab
    }

    /// The model's context length (`<arch>.context_length`).
    #[getter]
    fn context_length(&self) -> usize {
        lock(&self.core).model.config.context_length
    }

    /// The context of new sessions unless `session(ctx=...)` says otherwise.
    #[getter]
    fn ctx(&self) -> usize {
        lock(&self.core).ctx
    }

    /// The architecture (`general.architecture`): llama, qwen2, gemma3.
    #[getter]
    fn arch(&self) -> &'static str {
        lock(&self.core).model.config.arch.gguf_name()
    }

    fn __repr__(&self) -> String {
        format!("lorafold.Model('{}')", self.path.display())
    }

    /// Attach `adapter` at `scale` (finite, |scale| <= 100); returns its slot
    /// for set_scale and detach. Raises AdapterMismatchError when it does
    /// not fit, UsageError while a session of this model is open.
    #[pyo3(signature = (adapter, scale=1.0))]
    fn attach(&self, py: Python<'_>, adapter: &PyAdapter, scale: f64) -> PyResult<usize> {
        py.detach(|| self.alone(|core| Ok(core.model.attach(&adapter.inner, scale)?)))
            .raise(py)
    }

    /// Change the scale of the adapter in `slot`.
    fn set_scale(&self, py: Python<'_>, slot: usize, scale: f64) -> PyResult<()> {
        py.detach(|| {
            self.alone(|core| {
                attached(&core.model, slot)?;
                Ok(core.model.set_scale(slot, scale)?)
            })
        })
        .raise(py)
    }

    /// The scale of the adapter in `slot`, or None when it holds none.
    fn scale(&self, slot: usize) -> Option<f64> {
        lock(&self.core).model.scale(slot)
    }

    /// Detach the adapter in `slot`; the base weights were never touched.
    fn detach(&self, py: Python<'_>, slot: usize) -> PyResult<()> {
        py.detach(|| {
            self.alone(|core| {
                attached(&core.model, slot)?;
                core.model.detach(slot);
                Ok(())
            })
        })
        .raise(py)
    }

    /// A new conversation (its own KV cache) of `ctx` positions (default:
    /// the model's ctx). Close it (or use `with`) before changing adapters.
    #[pyo3(signature = (ctx=None, kv=None))]
    fn session(&self, py: Python<'_>, ctx: Option<usize>, kv: Option<&str>) -> PyResult<PySession> {
        let kv = kv.map(parse_kv).transpose().raise(py)?;
        let core = lock(&self.core).clone();
        py.detach(|| guarded(|| PySession::open(core, ctx, kv)))
            .raise(py)
    }

    /// Generate from a fresh session that closes itself at the end: an
    /// iterator of text pieces. See Session.generate for the arguments.
    #[pyo3(signature = (prompt, max_tokens=64, *, temperature=0.0, top_k=0, top_p=1.0,
        repeat_penalty=1.0, seed=299792458, stop=None, chat=false))]
    #[allow(clippy::too_many_arguments)]
    fn generate(
        &self,
        py: Python<'_>,
        prompt: &str,
        max_tokens: usize,
        temperature: f64,
        top_k: usize,
        top_p: f64,
        repeat_penalty: f32,
        seed: u64,
        stop: Option<Vec<String>>,
        chat: bool,
    ) -> PyResult<PyGeneration> {
        let session = Py::new(py, self.session(py, None, None)?)?;
        let sampling = sampling(temperature, top_k, top_p, repeat_penalty, seed);
        PyGeneration::start(py, session, prompt, max_tokens, sampling, stop, chat, true)
    }

    /// Token ids of `text` (with BOS when the model adds one; special-token
    /// text such as `<|im_start|>` becomes its id).
    fn tokenize(&self, py: Python<'_>, text: &str) -> PyResult<Vec<u32>> {
        let tok = lock(&self.core).tokenizer.clone();
        py.detach(|| guarded(|| tok.encode(text).map_err(|e| Failure::of(Kind::Range, &e))))
            .raise(py)
    }

    /// The text of token ids (special tokens included).
    fn detokenize(&self, py: Python<'_>, tokens: Vec<u32>) -> PyResult<String> {
        let (tok, vocab) = {
            let core = lock(&self.core);
            (core.tokenizer.clone(), core.model.config.vocab)
        };
        check_ids(&tokens, vocab).raise(py)?;
        py.detach(|| {
            guarded(|| {
                tok.decode(&tokens)
                    .map_err(|e| Failure::of(Kind::Range, &e))
            })
        })
        .raise(py)
    }
}

impl PyModel {
    /// Run `f` on the model alone: no session may share it meanwhile.
    fn alone<T>(&self, f: impl FnOnce(&mut Core) -> Fallible<T>) -> Fallible<T> {
        guarded(|| {
            let mut core = lock(&self.core);
            let sessions = Arc::strong_count(&core) - 1;
            match Arc::get_mut(&mut core) {
                Some(c) => f(c),
                None => Err(Failure::new(
                    Kind::Usage,
                    format!(
                        "{}: {sessions} session(s) of this model are open; close them (session.close(), or `with model.session() as s:`) before attaching, rescaling or detaching adapters",
                        self.path.display()
                    ),
                )),
            }
        })
    }
}

/// The sampling options both `generate`s take.
fn sampling(
    temperature: f64,
    top_k: usize,
    top_p: f64,
    repeat_penalty: f32,
    seed: u64,
) -> SamplerConfig {
    SamplerConfig {
        temperature,
        top_k,
        top_p,
        repeat_penalty,
        seed,
    }
}

fn attached(model: &Model, slot: usize) -> Fallible<()> {
    match model.scale(slot) {
        Some(_) => Ok(()),
        None => Err(Failure::new(
            Kind::Range,
            format!("adapter slot {slot} holds no adapter"),
        )),
    }
}

fn check_ids(tokens: &[u32], vocab: usize) -> Fallible<()> {
    match tokens.iter().find(|&&id| id as usize >= vocab) {
        Some(id) => Err(Failure::new(
            Kind::Range,
            format!("token id {id} is out of range: the vocabulary has {vocab} tokens"),
        )),
        None => Ok(()),
    }
}

/// A GGUF LoRA adapter (llama.cpp's layout, as `convert(..., emit="adapter")`
/// writes it), loaded once and attachable to any model it fits.
#[pyclass(module = "lorafold", name = "Adapter", frozen)]
pub struct PyAdapter {
    inner: LoraAdapter,
}

#[pymethods]
impl PyAdapter {
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<PyAdapter> {
        py.detach(|| guarded(|| Ok(LoraAdapter::load(&path)?)))
            .raise(py)
            .map(|inner| PyAdapter { inner })
    }

    /// The adapter file.
    #[getter]
    fn path(&self) -> PathBuf {
        self.inner.path.clone()
    }

    /// The architecture it was made for.
    #[getter]
    fn arch(&self) -> String {
        self.inner.arch.clone()
    }

    /// `adapter.lora.alpha`.
    #[getter]
    fn alpha(&self) -> f64 {
        self.inner.alpha
    }

    /// The base tensors it adapts, by GGUF name.
    #[getter]
    fn targets(&self) -> Vec<String> {
        self.inner.pairs.keys().cloned().collect()
    }

    fn __repr__(&self) -> String {
        format!("lorafold.Adapter('{}')", self.inner.path.display())
    }
}

/// One conversation's state: its KV cache, borrowing the core's model.
struct Conversation {
    // Declared before `core` in PySession: dropped first.
    session: Session<'static>,
    /// Bumped by every call, so an older generation left unfinished knows
    /// the cache moved on without it.
    epoch: u64,
}

/// A conversation with a model: a KV cache of `max_tokens` positions that
/// each call continues. Made by Model.session(); a context manager.
#[pyclass(module = "lorafold", name = "Session", frozen)]
pub struct PySession {
    state: Mutex<Option<Conversation>>,
    core: Mutex<Option<Arc<Core>>>,
}

impl PySession {
    fn open(core: Arc<Core>, ctx: Option<usize>, kv: Option<KvType>) -> Fallible<PySession> {
        let ctx = ctx.unwrap_or(core.ctx);
        // SAFETY: the model lives in the Arc this session keeps (`core`,
        // dropped after `state`, and after the session in close()), and no
        // one mutates it while the Arc is shared (PyModel::alone).
        let model: &'static Model = unsafe { &*(&core.model as *const Model) };
        let session = model
            .session_with(SessionOptions {
                kv: kv.unwrap_or(core.kv),
                threads: core.threads,
                ..SessionOptions::new(ctx)
            })
            .map_err(|e| Failure::of(Kind::Range, &e).context(format!("ctx {ctx}")))?;
        Ok(PySession {
            state: Mutex::new(Some(Conversation { session, epoch: 0 })),
            core: Mutex::new(Some(core)),
        })
    }

    fn core(&self) -> Fallible<Arc<Core>> {
        lock(&self.core).clone().ok_or_else(closed)
    }

    /// Run `f` on the open conversation, starting a new epoch.
    fn with<T>(&self, f: impl FnOnce(&mut Conversation) -> Fallible<T>) -> Fallible<T> {
        guarded(|| {
            let mut state = lock(&self.state);
            let conv = state.as_mut().ok_or_else(closed)?;
            conv.epoch += 1;
            f(conv)
        })
    }
}

fn closed() -> Failure {
    Failure::new(Kind::Usage, "the session is closed")
}

#[pymethods]
impl PySession {
    /// Positions used so far.
    #[getter]
    fn position(&self) -> usize {
        lock(&self.state)
            .as_ref()
            .map_or(0, |c| c.session.position())
    }

    /// Positions the KV cache holds.
    #[getter]
    fn max_tokens(&self) -> usize {
        lock(&self.state)
            .as_ref()
            .map_or(0, |c| c.session.max_tokens())
    }

    /// Forget the conversation (the cache is kept for reuse).
    fn reset(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| {
            self.with(|c| {
                c.session.reset();
                Ok(())
            })
        })
        .raise(py)
    }

    /// Free the KV cache and release the model (attaching adapters needs it
    /// alone). Idempotent; the session is unusable afterwards.
    fn close(&self, py: Python<'_>) {
        py.detach(|| {
            drop(lock(&self.state).take());
            drop(lock(&self.core).take());
        })
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> bool {
        self.close(py);
        false
    }

    /// Run `tokens` after what came before and return the logits (float32)
    /// of the last position, shape [vocab], or of every position, shape
    /// [len(tokens), vocab], when `all`. Raises ContextOverflowError when the
    /// tokens do not fit in the positions left.
    #[pyo3(signature = (tokens, all=false))]
    fn logits<'py>(
        &self,
        py: Python<'py>,
        tokens: Vec<u32>,
        all: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let core = self.core().raise(py)?;
        let vocab = core.model.config.vocab;
        let v = py
            .detach(|| {
                self.with(|c| {
                    check_ids(&tokens, vocab)?;
                    if tokens.is_empty() {
                        return Err(Failure::new(Kind::Usage, "no tokens to run"));
                    }
                    lorafold_runtime::generate::check_room(&c.session, tokens.len())?;
                    // The engine reuses its buffer: one copy into a Vec that
                    // NumPy then owns.
                    Ok(c.session.logits(&tokens, all)?.to_vec())
                })
            })
            .raise(py)?;
        let rows = v.len() / vocab.max(1);
        let a = PyArray1::from_vec(py, v);
        if all {
            Ok(a.reshape([rows, vocab])?.into_any())
        } else {
            Ok(a.into_any())
        }
    }

    /// Generate up to `max_tokens` tokens after `prompt` (in the model's chat
    /// template with `chat`, continuing the conversation): an iterator of
    /// text pieces, whole characters each. Stops at end of turn, at a
    /// `stop` string, or when the context is full (`.stats["context_full"]`).
    /// temperature 0 is greedy; top_k 0 and top_p 1 are off.
    #[pyo3(signature = (prompt, max_tokens=64, *, temperature=0.0, top_k=0, top_p=1.0,
        repeat_penalty=1.0, seed=299792458, stop=None, chat=false))]
    #[allow(clippy::too_many_arguments)]
    fn generate(
        slf: Bound<'_, Self>,
        prompt: &str,
        max_tokens: usize,
        temperature: f64,
        top_k: usize,
        top_p: f64,
        repeat_penalty: f32,
        seed: u64,
        stop: Option<Vec<String>>,
        chat: bool,
    ) -> PyResult<PyGeneration> {
        let sampling = sampling(temperature, top_k, top_p, repeat_penalty, seed);
        let py = slf.py();
        PyGeneration::start(
            py,
            slf.unbind(),
            prompt,
            max_tokens,
            sampling,
            stop,
            chat,
            false,
        )
    }
}

/// What a generation keeps between pulls.
struct Pulling {
    generation: Generation,
    sampler: Sampler,
    epoch: u64,
    finished: bool,
}

/// An iterator of text pieces from Session.generate or Model.generate;
/// `.stats` holds the timings and counts so far, `.tokens` the ids.
#[pyclass(module = "lorafold", name = "Generation", frozen)]
pub struct PyGeneration {
    session: Py<PySession>,
    state: Mutex<Pulling>,
    chat: bool,
    /// The session was made for this generation alone (Model.generate).
    owns_session: bool,
}

impl PyGeneration {
    #[allow(clippy::too_many_arguments)]
    fn start(
        py: Python<'_>,
        session: Py<PySession>,
        prompt: &str,
        max_tokens: usize,
        sampling: SamplerConfig,
        stop: Option<Vec<String>>,
        chat: bool,
        owns_session: bool,
    ) -> PyResult<PyGeneration> {
        let s = session.get();
        let stop = stop.unwrap_or_default();
        let state = py
            .detach(|| {
                let sampler = Sampler::try_new(sampling)?;
                let tok = s.core()?.tokenizer.clone();
                s.with(|c| {
                    // Prompt errors (too long for the room left, no chat
                    // template) are raised here, not at the first piece.
                    let ids = prompt_ids(&c.session, &tok, prompt, chat)?;
                    Ok(Pulling {
                        generation: Generation::new(&ids, max_tokens, &stop),
                        sampler,
                        epoch: c.epoch,
                        finished: false,
                    })
                })
            })
            .raise(py)?;
        Ok(PyGeneration {
            session,
            state: Mutex::new(state),
            chat,
            owns_session,
        })
    }

    fn pull(&self) -> Fallible<Option<String>> {
        let s = self.session.get();
        let mut p = lock(&self.state);
        if p.finished {
            return Ok(None);
        }
        let tok = s.core()?.tokenizer.clone();
        let mut state = lock(&s.state);
        let conv = state.as_mut().ok_or_else(closed)?;
        if conv.epoch != p.epoch {
            p.finished = true;
            return Err(Failure::new(
                Kind::Usage,
                "another call on this session ran since this generation started; its cache moved on, so the generation cannot continue",
            ));
        }
        let Pulling {
            generation,
            sampler,
            ..
        } = &mut *p;
        let piece = guarded(|| Ok(generation.next_piece(&mut conv.session, &tok, sampler)?));
        if !matches!(piece, Ok(Some(_))) {
            p.finished = true;
            if self.chat && piece.is_ok() {
                // The turn's end marker, so the next turn follows the template.
                close_turn(&mut conv.session, &tok)?;
            }
            drop(state);
            if self.owns_session {
                drop(lock(&s.state).take());
                drop(lock(&s.core).take());
            }
        }
        piece
    }
}

#[pymethods]
impl PyGeneration {
    fn __iter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<String>> {
        py.detach(|| self.pull()).raise(py)
    }

    /// Timings and counts so far: prompt_tokens, generated, prefill_s,
    /// ttft_s, decode_s, prefill_tps, decode_tps, context_full, stopped.
    #[getter]
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, pyo3::types::PyDict>> {
        let s = lock(&self.state).generation.stats.clone();
        let d = pyo3::types::PyDict::new(py);
        d.set_item("prompt_tokens", s.prompt_tokens)?;
        d.set_item("generated", s.generated)?;
        d.set_item("prefill_s", s.prefill.as_secs_f64())?;
        d.set_item("ttft_s", s.time_to_first_token.as_secs_f64())?;
        d.set_item("decode_s", s.decode.as_secs_f64())?;
        d.set_item("prefill_tps", s.prefill_tps())?;
        d.set_item("decode_tps", s.decode_tps())?;
        d.set_item("context_full", s.context_full)?;
        d.set_item("stopped", s.stopped)?;
        Ok(d)
    }

    /// The token ids generated so far.
    #[getter]
    fn tokens(&self) -> Vec<u32> {
        lock(&self.state).generation.tokens().to_vec()
    }
}

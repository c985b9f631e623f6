//! lorafold's runtime behind a C ABI, for apps that embed it (Swift, Kotlin
//! through JNI, C++): the calls `include/lorafold.h` declares, modelled on
//! what llama.cpp's `llama.h` offers. Every entry point catches panics,
//! checks its pointers and handles, and reports failure as a status code
//! with a per-thread message ([`lorafold_last_error`]); nothing unwinds
//! into C or aborts on bad input.
#![allow(non_camel_case_types)]

use std::cell::RefCell;
use std::collections::HashSet;
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use candle_core::Device;
use lorafold_runtime::generate::{
    check_room, close_turn, generate, prompt_ids, PromptError, Sampler, SamplerConfig,
};
use lorafold_runtime::lora::LoraAdapter;
use lorafold_runtime::measure::{check_vocabulary, drift, windows, DriftError, WindowError};
use lorafold_runtime::model::{Model, RuntimeError, Session, SessionOptions};
use lorafold_runtime::tokenizer::Tokenizer;

/// A call's outcome: `LORAFOLD_OK` or one of the `LORAFOLD_ERR_*` codes.
pub type lorafold_status = i32;
/// Success.
pub const LORAFOLD_OK: lorafold_status = 0;
/// A pointer argument was null.
pub const LORAFOLD_ERR_NULL: lorafold_status = 1;
/// A handle is not a live object of its kind (freed, or never made here).
pub const LORAFOLD_ERR_HANDLE: lorafold_status = 2;
/// A string is not valid UTF-8.
pub const LORAFOLD_ERR_UTF8: lorafold_status = 3;
/// A value is out of range (scale, sampling option, slot, thread count).
pub const LORAFOLD_ERR_INVALID: lorafold_status = 4;
/// A file could not be loaded as a model or adapter.
pub const LORAFOLD_ERR_LOAD: lorafold_status = 5;
/// The adapter was made for another model.
pub const LORAFOLD_ERR_MISMATCH: lorafold_status = 6;
/// The tokens do not fit in the session's context.
pub const LORAFOLD_ERR_CONTEXT: lorafold_status = 7;
/// An output buffer is too small; the size needed was written.
pub const LORAFOLD_ERR_BUFFER: lorafold_status = 8;
/// The model has live sessions (attach, detach and rescale need none).
pub const LORAFOLD_ERR_BUSY: lorafold_status = 9;
/// Running the model failed.
pub const LORAFOLD_ERR_RUNTIME: lorafold_status = 10;
/// A bug in lorafold (a caught panic); the message says where.
pub const LORAFOLD_ERR_PANIC: lorafold_status = 11;

/// A loaded model (GGUF), its tokenizer and its attached adapters.
pub struct lorafold_model {
    core: Arc<ModelCore>,
}

struct ModelCore {
    model: Model,
    tokenizer: Tokenizer,
    threads: Option<usize>,
    n_ctx: usize,
}

/// A LoRA adapter GGUF (llama.cpp's layout), loaded and checked.
pub struct lorafold_adapter {
    adapter: LoraAdapter,
}

/// One conversation: a KV cache over a model.
pub struct lorafold_session {
    // Declared first, dropped first: it borrows the model `_core` keeps.
    session: Session<'static>,
    _core: Arc<ModelCore>,
}

/// Sampling for [`lorafold_generate`]; start from
/// [`lorafold_sampling_default`].
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct lorafold_sampling {
    /// 0: greedy.
    pub temperature: f32,
    /// 0: off.
    pub top_k: u32,
    /// In (0, 1]; 1: off.
    pub top_p: f32,
    /// > 0; 1: off.
    pub repeat_penalty: f32,
    /// The sampler's seed.
    pub seed: u64,
    /// Tokens to generate at most.
    pub max_tokens: u32,
    /// Wrap the prompt in the model's chat template (a user turn).
    pub chat: bool,
}

/// How far a candidate's next-token distributions drift from a reference's.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct lorafold_drift_report {
    /// Positions compared.
    pub tokens: u64,
    /// Mean KL(reference || candidate), nats per token.
    pub kl_mean: f64,
    /// Share of positions whose most likely token agrees.
    pub top1_agreement: f64,
    /// Mean next-token loss of the reference on the text (nats).
    pub nll_reference: f64,
    /// Mean next-token loss of the candidate.
    pub nll: f64,
}

/// Called with each piece of generated text (UTF-8, `len` bytes, also
/// NUL-terminated); return false to stop generating.
pub type lorafold_piece_fn =
    Option<unsafe extern "C" fn(piece: *const c_char, len: usize, user: *mut c_void) -> bool>;

/// A failure: its status code and message.
struct Failure(lorafold_status, String);

type Outcome<T> = Result<T, Failure>;

fn fail<T>(code: lorafold_status, message: impl Into<String>) -> Outcome<T> {
    Err(Failure(code, message.into()))
}

impl From<PromptError> for Failure {
    fn from(e: PromptError) -> Failure {
        let code = match &e {
            PromptError::Runtime(r) => runtime_code(r),
            PromptError::NoChatTemplate | PromptError::Empty => LORAFOLD_ERR_INVALID,
            PromptError::TooLong { .. } | PromptError::ContextFull { .. } => LORAFOLD_ERR_CONTEXT,
            PromptError::Tokenize(_) => LORAFOLD_ERR_RUNTIME,
        };
        Failure(code, e.to_string())
    }
}

fn runtime_code(e: &RuntimeError) -> lorafold_status {
    match e {
        RuntimeError::Gguf(_)
        | RuntimeError::Model { .. }
        | RuntimeError::AdapterNotModel { .. } => LORAFOLD_ERR_LOAD,
        RuntimeError::Adapter { .. } => LORAFOLD_ERR_MISMATCH,
        RuntimeError::OutOfRange { .. } => LORAFOLD_ERR_INVALID,
        RuntimeError::Candle(_) => LORAFOLD_ERR_RUNTIME,
    }
}

impl From<DriftError> for Failure {
    fn from(e: DriftError) -> Failure {
        let code = match &e {
            DriftError::Vocabulary { .. } => LORAFOLD_ERR_MISMATCH,
            DriftError::Runtime(r) => runtime_code(r),
        };
        Failure(code, e.to_string())
    }
}

impl From<RuntimeError> for Failure {
    fn from(e: RuntimeError) -> Failure {
        Failure(runtime_code(&e), e.to_string())
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(message: &str) {
    let c = CString::new(message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Run an entry point: a panic becomes `LORAFOLD_ERR_PANIC`, a failure its
/// code, and either sets the thread's message.
fn entry(f: impl FnOnce() -> Outcome<()>) -> lorafold_status {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => {
            set_error("");
            LORAFOLD_OK
        }
        Ok(Err(Failure(code, message))) => {
            set_error(&message);
            code
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            set_error(&format!("lorafold bug (please report): {what}"));
            LORAFOLD_ERR_PANIC
        }
    }
}

/// Which objects are alive, by address and kind: a freed or foreign handle
/// is refused instead of followed.
static LIVE: Mutex<Option<HashSet<(usize, u8)>>> = Mutex::new(None);

const MODEL: u8 = 0;
const ADAPTER: u8 = 1;
const SESSION: u8 = 2;

fn live() -> std::sync::MutexGuard<'static, Option<HashSet<(usize, u8)>>> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

fn register<T>(value: T, kind: u8) -> *mut T {
    let p = Box::into_raw(Box::new(value));
    live()
        .get_or_insert_with(HashSet::new)
        .insert((p as usize, kind));
    p
}

fn check_handle<T>(p: *const T, kind: u8, what: &str) -> Outcome<()> {
    not_null(p, what)?;
    let known = live()
        .as_ref()
        .is_some_and(|s| s.contains(&(p as usize, kind)));
    if known {
        Ok(())
    } else {
        fail(
            LORAFOLD_ERR_HANDLE,
            format!("{what} is not a live lorafold object (freed, or not made by lorafold)"),
        )
    }
}

/// The object behind a live handle.
///
/// # Safety
/// `p` must not be freed by another thread during the call (the header
/// says so); it was checked to be live and of this kind.
unsafe fn handle<'a, T>(p: *const T, kind: u8, what: &str) -> Outcome<&'a T> {
    check_handle(p, kind, what)?;
    Ok(&*p)
}

/// As [`handle`], mutable.
///
/// # Safety
/// As [`handle`], and no other thread may use the object during the call.
unsafe fn handle_mut<'a, T>(p: *mut T, kind: u8, what: &str) -> Outcome<&'a mut T> {
    check_handle(p, kind, what)?;
    Ok(&mut *p)
}

fn release<T>(p: *mut T, kind: u8, what: &str) -> Outcome<()> {
    check_handle(p, kind, what)?;
    live().as_mut().map(|s| s.remove(&(p as usize, kind)));
    // SAFETY: made by `register` with this kind, and now unregistered, so
    // freed once.
    drop(unsafe { Box::from_raw(p) });
    Ok(())
}

/// A C string argument as UTF-8.
///
/// # Safety
/// `p`, when not null, must point to a NUL-terminated string.
unsafe fn text<'a>(p: *const c_char, what: &str) -> Outcome<&'a str> {
    not_null(p, what)?;
    CStr::from_ptr(p)
        .to_str()
        .or_else(|e| fail(LORAFOLD_ERR_UTF8, format!("{what} is not UTF-8: {e}")))
}

/// A pointer argument (an input, or where a result goes) is not null.
fn not_null<T>(p: *const T, what: &str) -> Outcome<()> {
    if p.is_null() {
        fail(LORAFOLD_ERR_NULL, format!("{what} is null"))
    } else {
        Ok(())
    }
}

/// The message of the last failed call on this thread ("" after a success);
/// valid until the thread's next lorafold call.
#[no_mangle]
pub extern "C" fn lorafold_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Load a GGUF model for the CPU. `threads` 0: every core; `n_ctx` 0: the
/// model's context length, at most 2048 (each session holds this many
/// positions).
///
/// # Safety
/// `path` must be NUL-terminated; `out` must point to writable memory.
#[no_mangle]
pub unsafe extern "C" fn lorafold_model_load(
    path: *const c_char,
    threads: u32,
    n_ctx: u32,
    out: *mut *mut lorafold_model,
) -> lorafold_status {
    entry(|| {
        not_null(out, "out")?;
        let path = text(path, "path")?;
        let threads = match threads {
            0 => None,
            n => Some(lorafold_runtime::model::check_threads(n as usize)?),
        };
        let model = Model::load(path, &Device::Cpu)?;
        let tokenizer = Tokenizer::from_gguf(model.file())
            .or_else(|e| fail(LORAFOLD_ERR_LOAD, e.to_string()))?;
        let n_ctx = match n_ctx as usize {
            0 => model.config.context_length.clamp(1, 2048),
            n if n > model.config.context_length => {
                return fail(
                    LORAFOLD_ERR_INVALID,
                    format!(
                        "n_ctx {n} is more than the model's context length {}",
                        model.config.context_length
                    ),
                )
            }
            n => n,
        };
        let core = ModelCore {
            model,
            tokenizer,
            threads,
            n_ctx,
        };
        *out = register(
            lorafold_model {
                core: Arc::new(core),
            },
            MODEL,
        );
        Ok(())
    })
}

/// Free a model. Its sessions stay usable until they are freed.
///
/// # Safety
/// No other thread may use `model` during or after the call.
#[no_mangle]
pub unsafe extern "C" fn lorafold_model_free(model: *mut lorafold_model) -> lorafold_status {
    entry(|| release(model, MODEL, "model"))
}

/// The size of the model's vocabulary (the length of a logits row).
///
/// # Safety
/// `out` must point to writable memory.
#[no_mangle]
pub unsafe extern "C" fn lorafold_model_n_vocab(
    model: *const lorafold_model,
    out: *mut u32,
) -> lorafold_status {
    entry(|| {
        not_null(out, "out")?;
        *out = handle(model, MODEL, "model")?.core.model.config.vocab as u32;
        Ok(())
    })
}

/// Load a LoRA adapter GGUF (llama.cpp's layout, as `lorafold convert
/// --adapter-out` writes it).
///
/// # Safety
/// `path` must be NUL-terminated; `out` must point to writable memory.
#[no_mangle]
pub unsafe extern "C" fn lorafold_adapter_load(
    path: *const c_char,
    out: *mut *mut lorafold_adapter,
) -> lorafold_status {
    entry(|| {
        not_null(out, "out")?;
        let adapter = LoraAdapter::load(text(path, "path")?)?;
        *out = register(lorafold_adapter { adapter }, ADAPTER);
        Ok(())
    })
}

/// Free an adapter (a model it is attached to keeps its own copy).
///
/// # Safety
/// No other thread may use `adapter` during or after the call.
#[no_mangle]
pub unsafe extern "C" fn lorafold_adapter_free(adapter: *mut lorafold_adapter) -> lorafold_status {
    entry(|| release(adapter, ADAPTER, "adapter"))
}

fn unshared<'a>(model: &'a mut lorafold_model, what: &str) -> Outcome<&'a mut ModelCore> {
    Arc::get_mut(&mut model.core).map_or_else(
        || {
            fail(
                LORAFOLD_ERR_BUSY,
                format!("the model has live sessions: free them before {what}"),
            )
        },
        Ok,
    )
}

/// Attach `adapter` to `model` at `scale` (finite, |scale| <= 100); its
/// slot is written to `slot`.
///
/// # Safety
/// `slot` must point to writable memory; no other thread may use `model`.
#[no_mangle]
pub unsafe extern "C" fn lorafold_model_attach(
    model: *mut lorafold_model,
    adapter: *const lorafold_adapter,
    scale: f32,
    slot: *mut i32,
) -> lorafold_status {
    entry(|| {
        not_null(slot, "slot")?;
        let adapter = handle(adapter, ADAPTER, "adapter")?;
        let model = handle_mut(model, MODEL, "model")?;
        let s = unshared(model, "attaching an adapter")?
            .model
            .attach(&adapter.adapter, scale as f64)?;
        *slot = s as i32;
        Ok(())
    })
}

fn attached_slot(model: &lorafold_model, slot: i32) -> Outcome<usize> {
    match usize::try_from(slot) {
        Ok(s) if model.core.model.scale(s).is_some() => Ok(s),
        _ => fail(
            LORAFOLD_ERR_INVALID,
            format!("slot {slot} holds no adapter of this model"),
        ),
    }
}

/// Change the scale of the adapter in `slot` (0 turns it off).
///
/// # Safety
/// No other thread may use `model` during the call.
#[no_mangle]
pub unsafe extern "C" fn lorafold_model_set_scale(
    model: *mut lorafold_model,
    slot: i32,
    scale: f32,
) -> lorafold_status {
    entry(|| {
        let model = handle_mut(model, MODEL, "model")?;
        let s = attached_slot(model, slot)?;
        unshared(model, "changing a scale")?
            .model
            .set_scale(s, scale as f64)?;
        Ok(())
    })
}

/// Detach the adapter in `slot`.
///
/// # Safety
/// No other thread may use `model` during the call.
#[no_mangle]
pub unsafe extern "C" fn lorafold_model_detach(
    model: *mut lorafold_model,
    slot: i32,
) -> lorafold_status {
    entry(|| {
        let model = handle_mut(model, MODEL, "model")?;
        let s = attached_slot(model, slot)?;
        unshared(model, "detaching an adapter")?.model.detach(s);
        Ok(())
    })
}

/// Start a session (an empty KV cache of the model's `n_ctx` positions, f16).
///
/// # Safety
/// `out` must point to writable memory.
#[no_mangle]
pub unsafe extern "C" fn lorafold_session_new(
    model: *const lorafold_model,
    out: *mut *mut lorafold_session,
) -> lorafold_status {
    entry(|| {
        not_null(out, "out")?;
        let core = handle(model, MODEL, "model")?.core.clone();
        // SAFETY: the model lives in the Arc the session holds, which is
        // dropped after it; no one mutates it while a session holds it
        // (attach and the like need the Arc unshared).
        let m: &'static Model = &*(&core.model as *const Model);
        let session = m.session_with(SessionOptions {
            threads: core.threads,
            ..SessionOptions::new(core.n_ctx)
        })?;
        *out = register(
            lorafold_session {
                session,
                _core: core,
            },
            SESSION,
        );
        Ok(())
    })
}

/// Empty the session's cache: the next call starts a new conversation.
///
/// # Safety
/// No other thread may use `session` during the call.
#[no_mangle]
pub unsafe extern "C" fn lorafold_session_reset(session: *mut lorafold_session) -> lorafold_status {
    entry(|| {
        handle_mut(session, SESSION, "session")?.session.reset();
        Ok(())
    })
}

/// The positions the session's conversation holds (`used`) and its
/// context size (`size`): an app resets or starts a new session before a
/// turn would not fit.
///
/// # Safety
/// `used` and `size` must be valid for writes; no other thread may use
/// `session` during the call.
#[no_mangle]
pub unsafe extern "C" fn lorafold_session_used(
    session: *const lorafold_session,
    used: *mut usize,
    size: *mut usize,
) -> lorafold_status {
    entry(|| {
        not_null(used, "used")?;
        not_null(size, "size")?;
        let s = &handle(session, SESSION, "session")?.session;
        *used = s.position();
        *size = s.max_tokens();
        Ok(())
    })
}

/// Free a session.
///
/// # Safety
/// No other thread may use `session` during or after the call.
#[no_mangle]
pub unsafe extern "C" fn lorafold_session_free(session: *mut lorafold_session) -> lorafold_status {
    entry(|| release(session, SESSION, "session"))
}

/// Token ids of `text` (with the model's BOS when it adds one). At most
/// `cap` are written to `tokens`; `n_tokens` gets the count, and when it
/// is over `cap` the call returns `LORAFOLD_ERR_BUFFER`.
///
/// # Safety
/// `text` must be NUL-terminated; `tokens` must hold `cap` ids (or be null
/// with `cap` 0); `n_tokens` must point to writable memory.
#[no_mangle]
pub unsafe extern "C" fn lorafold_tokenize(
    model: *const lorafold_model,
    text_utf8: *const c_char,
    tokens: *mut u32,
    cap: usize,
    n_tokens: *mut usize,
) -> lorafold_status {
    entry(|| {
        not_null(n_tokens, "n_tokens")?;
        let model = handle(model, MODEL, "model")?;
        let ids = model
            .core
            .tokenizer
            .encode(text(text_utf8, "text")?)
            .or_else(|e| fail(LORAFOLD_ERR_RUNTIME, e.to_string()))?;
        *n_tokens = ids.len();
        if ids.len() > cap {
            return fail(
                LORAFOLD_ERR_BUFFER,
                format!("{} tokens do not fit in {cap}", ids.len()),
            );
        }
        if !ids.is_empty() {
            not_null(tokens, "tokens")?;
            std::ptr::copy_nonoverlapping(ids.as_ptr(), tokens, ids.len());
        }
        Ok(())
    })
}

/// The text of `n` token ids, NUL-terminated in `buf` (`cap` bytes);
/// `len` gets its length without the NUL, and when it does not fit the call
/// returns `LORAFOLD_ERR_BUFFER`.
///
/// # Safety
/// `tokens` must hold `n` ids; `buf` must hold `cap` bytes; `len` must
/// point to writable memory.
#[no_mangle]
pub unsafe extern "C" fn lorafold_detokenize(
    model: *const lorafold_model,
    tokens: *const u32,
    n: usize,
    buf: *mut c_char,
    cap: usize,
    len: *mut usize,
) -> lorafold_status {
    entry(|| {
        not_null(len, "len")?;
        let model = handle(model, MODEL, "model")?;
        let ids: &[u32] = match n {
            0 => &[],
            _ => {
                not_null(tokens, "tokens")?;
                std::slice::from_raw_parts(tokens, n)
            }
        };
        check_ids(ids, model.core.model.config.vocab)?;
        let s = model
            .core
            .tokenizer
            .decode(ids)
            .or_else(|e| fail(LORAFOLD_ERR_RUNTIME, e.to_string()))?;
        *len = s.len();
        if s.len() + 1 > cap {
            return fail(
                LORAFOLD_ERR_BUFFER,
                format!("{} bytes and a NUL do not fit in {cap}", s.len()),
            );
        }
        not_null(buf, "buf")?;
        std::ptr::copy_nonoverlapping(s.as_ptr(), buf.cast::<u8>(), s.len());
        *buf.add(s.len()) = 0;
        Ok(())
    })
}

/// Greedy sampling, 256 tokens, no chat template.
#[no_mangle]
pub extern "C" fn lorafold_sampling_default() -> lorafold_sampling {
    let d = SamplerConfig::default();
    lorafold_sampling {
        temperature: d.temperature as f32,
        top_k: d.top_k as u32,
        top_p: d.top_p as f32,
        repeat_penalty: d.repeat_penalty,
        seed: d.seed,
        max_tokens: 256,
        chat: false,
    }
}

fn check_ids(ids: &[u32], vocab: usize) -> Outcome<()> {
    match ids.iter().find(|&&t| t as usize >= vocab) {
        Some(bad) => fail(
            LORAFOLD_ERR_INVALID,
            format!("token id {bad} is not below the vocabulary size {vocab}"),
        ),
        None => Ok(()),
    }
}

/// Generate after `prompt` (appended to the session's conversation),
/// calling `on_piece` with each piece of text; stops at the model's end of
/// turn, after `max_tokens`, when the context is full, or when `on_piece`
/// returns false. `params` null: [`lorafold_sampling_default`]. The count
/// of generated tokens goes to `n_generated` when it is not null. With
/// `chat`, the prompt is a user turn in the model's template and the reply's
/// turn is closed after it, so the session holds a conversation turn by turn.
///
/// # Safety
/// `prompt` must be NUL-terminated; `on_piece` must be safe to call with
/// `user`; no other thread may use `session` during the call.
#[no_mangle]
pub unsafe extern "C" fn lorafold_generate(
    session: *mut lorafold_session,
    prompt: *const c_char,
    params: *const lorafold_sampling,
    on_piece: lorafold_piece_fn,
    user: *mut c_void,
    n_generated: *mut usize,
) -> lorafold_status {
    entry(|| {
        let s = handle_mut(session, SESSION, "session")?;
        let prompt = text(prompt, "prompt")?;
        let p = if params.is_null() {
            lorafold_sampling_default()
        } else {
            *params
        };
        let tok = &s._core.tokenizer;
        let ids = prompt_ids(&s.session, tok, prompt, p.chat)?;
        let mut sampler = Sampler::try_new(SamplerConfig {
            temperature: p.temperature as f64,
            top_k: p.top_k as usize,
            top_p: p.top_p as f64,
            repeat_penalty: p.repeat_penalty,
            seed: p.seed,
        })?;
        let mut on_token = |piece: &str| -> bool {
            match on_piece {
                None => true,
                Some(f) => {
                    let c = CString::new(piece.replace('\0', " ")).unwrap_or_default();
                    // SAFETY: the caller vouches for the callback and `user`.
                    unsafe { f(c.as_ptr(), c.as_bytes().len(), user) }
                }
            }
        };
        let (out, _) = generate(
            &mut s.session,
            tok,
            &ids,
            p.max_tokens as usize,
            &mut sampler,
            &[],
            &mut on_token,
        )?;
        if !n_generated.is_null() {
            *n_generated = out.len();
        }
        if p.chat {
            close_turn(&mut s.session, tok)?;
        }
        Ok(())
    })
}

/// Run `tokens` after the session's conversation and write the logits of
/// the last position to `logits` (`cap` floats, at least the vocabulary
/// size: `LORAFOLD_ERR_BUFFER` otherwise): for apps with their own sampler.
///
/// # Safety
/// `tokens` must hold `n` ids and `logits` `cap` floats; no other thread
/// may use `session` during the call.
#[no_mangle]
pub unsafe extern "C" fn lorafold_eval(
    session: *mut lorafold_session,
    tokens: *const u32,
    n: usize,
    logits: *mut f32,
    cap: usize,
) -> lorafold_status {
    entry(|| {
        let s = handle_mut(session, SESSION, "session")?;
        not_null(logits, "logits")?;
        if n == 0 {
            return fail(LORAFOLD_ERR_INVALID, "no tokens to run");
        }
        not_null(tokens, "tokens")?;
        let vocab = s._core.model.config.vocab;
        if cap < vocab {
            return fail(
                LORAFOLD_ERR_BUFFER,
                format!("the logits need {vocab} floats, the buffer holds {cap}"),
            );
        }
        let ids = std::slice::from_raw_parts(tokens, n);
        check_ids(ids, vocab)?;
        check_room(&s.session, n)?;
        let row = s.session.logits(ids, false)?;
        std::ptr::copy_nonoverlapping(row.as_ptr(), logits, vocab);
        Ok(())
    })
}

/// How far `candidate` drifts from `reference` over `text` (a window per
/// non-empty line, up to 128 tokens each), with an f32 KV cache.
///
/// # Safety
/// `text` must be NUL-terminated; `out` must point to writable memory.
#[no_mangle]
pub unsafe extern "C" fn lorafold_drift(
    reference: *const lorafold_model,
    candidate: *const lorafold_model,
    text_utf8: *const c_char,
    out: *mut lorafold_drift_report,
) -> lorafold_status {
    entry(|| {
        not_null(out, "out")?;
        let r = handle(reference, MODEL, "reference")?;
        let c = handle(candidate, MODEL, "candidate")?;
        // Refused before the text is tokenized, as drift itself would.
        check_vocabulary(&r.core.model, &c.core.model)?;
        let w = windows(&r.core.tokenizer, text(text_utf8, "text")?, true, 128).or_else(|e| {
            let code = match e {
                WindowError::NoWindow | WindowError::ZeroContext => LORAFOLD_ERR_INVALID,
                WindowError::Tokenize(_) => LORAFOLD_ERR_RUNTIME,
            };
            fail(code, format!("text: {e}"))
        })?;
        let d = drift(&r.core.model, &[&c.core.model], None, &w)?.remove(0);
        *out = lorafold_drift_report {
            tokens: d.tokens as u64,
            kl_mean: d.kl_mean,
            top1_agreement: d.top1_agreement,
            nll_reference: d.nll_reference.unwrap_or(f64::NAN),
            nll: d.nll.unwrap_or(f64::NAN),
        };
        Ok(())
    })
}

// What the header promises about threads, checked by the compiler: a model
// (and an adapter) may be used from several threads at once, and a session
// may move between threads.
const _: () = {
    const fn shared<T: Send + Sync>() {}
    const fn movable<T: Send>() {}
    shared::<ModelCore>();
    shared::<lorafold_adapter>();
    movable::<lorafold_session>();
};

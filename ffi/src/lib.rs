//! lorafold's runtime behind a C ABI, for apps that embed it (Swift, Kotlin
//! through JNI, C++): the calls `include/lorafold.h` declares, modelled on
//! what llama.cpp's `llama.h` offers. Every entry point catches panics
//! (quietly: nothing is printed on the host's stderr), checks its pointers
//! and handles, and reports failure as a status code with a per-thread
//! message ([`lorafold_last_error`]); nothing unwinds into C or aborts on
//! bad input.
//!
//! Handles are ids, never addresses: the registry maps each to its object,
//! and an id is never issued twice, so a freed handle stays invalid however
//! the allocator reuses memory. A call holds its object (an `Arc`) for its
//! duration, so freeing a handle while another thread uses it cannot free
//! memory in use; a session is locked by the call that uses it, and any
//! other call on it (another thread's, or one from the generate callback)
//! finds it busy.
#![allow(non_camel_case_types)]

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Once, TryLockError};

use candle_core::Device;
use lorafold_runtime::generate::{
    check_room, close_turn, generate_with, prompt_ids, PromptError, Sampler, SamplerConfig,
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
/// A value is out of range (scale, sampling option, slot, thread count),
/// or a text cannot be tokenized.
pub const LORAFOLD_ERR_INVALID: lorafold_status = 4;
/// A file could not be loaded as a model or adapter.
pub const LORAFOLD_ERR_LOAD: lorafold_status = 5;
/// The adapter was made for another model.
pub const LORAFOLD_ERR_MISMATCH: lorafold_status = 6;
/// The tokens do not fit in the session's context.
pub const LORAFOLD_ERR_CONTEXT: lorafold_status = 7;
/// An output buffer is too small; the size needed was written.
pub const LORAFOLD_ERR_BUFFER: lorafold_status = 8;
/// The object is in use: a session by a call in progress (on another
/// thread, or the generate whose callback is running), a model by its live
/// sessions or another thread's call (attach, detach and rescale need it
/// alone).
pub const LORAFOLD_ERR_BUSY: lorafold_status = 9;
/// Running the model failed.
pub const LORAFOLD_ERR_RUNTIME: lorafold_status = 10;
/// A bug in lorafold (a caught panic); the message says where.
pub const LORAFOLD_ERR_PANIC: lorafold_status = 11;

/// A loaded model (GGUF), its tokenizer and its attached adapters.
pub struct lorafold_model {
    // Each session and each call in progress holds a clone: attaching needs
    // the only one. The lock is held only to clone it or to change it.
    core: Mutex<Arc<ModelCore>>,
}

struct ModelCore {
    model: Model,
    tokenizer: std::sync::Arc<Tokenizer>,
    threads: Option<usize>,
    n_ctx: usize,
}

/// A LoRA adapter GGUF (llama.cpp's layout), loaded and checked.
pub struct lorafold_adapter {
    adapter: LoraAdapter,
}

/// One conversation: a KV cache over a model.
pub struct lorafold_session {
    // Locked (never waited for) by the call that uses it: a second call
    // finds it busy instead of racing it.
    conversation: Mutex<Conversation>,
    /// Positions the cache holds, kept by the call holding the lock, so
    /// `lorafold_session_used` reads them while a call is in progress.
    used: AtomicUsize,
    /// Positions the cache has room for.
    size: usize,
}

struct Conversation {
    // Declared first, dropped first: it borrows the model `core` keeps.
    session: Session<'static>,
    core: Arc<ModelCore>,
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
            PromptError::TooLong { .. }
            | PromptError::TextTooLong { .. }
            | PromptError::ContextFull { .. } => LORAFOLD_ERR_CONTEXT,
            PromptError::Tokenize(_) => LORAFOLD_ERR_INVALID,
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
    /// Entry points in progress on this thread (a callback may re-enter).
    static DEPTH: Cell<usize> = const { Cell::new(0) };
    /// Where the last panic inside an entry point happened.
    static PANIC_AT: RefCell<Option<String>> = const { RefCell::new(None) };
}

fn set_error(message: &str) {
    let c = CString::new(message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Whether a panic on this thread will be caught at our boundary: inside an
/// entry point, or on a worker thread of the runtime's pool (which hands
/// its panic to the caller's thread).
fn caught_here() -> bool {
    DEPTH.try_with(|d| d.get() > 0).unwrap_or(false)
        || std::thread::current()
            .name()
            .is_some_and(|n| n.starts_with("lorafold-"))
}

/// Install, once, a panic hook that says nothing for panics we catch (the
/// message goes to `lorafold_last_error` instead of the host's stderr) and
/// hands every other panic to the hook that was there before.
fn quiet_panics() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !caught_here() {
                return previous(info);
            }
            if let Some(at) = info.location() {
                let at = format!("{}:{}", at.file(), at.line());
                let _ = PANIC_AT.try_with(|p| *p.borrow_mut() = Some(at));
            }
        }));
    });
}

/// Run an entry point: a panic becomes `LORAFOLD_ERR_PANIC`, a failure its
/// code, and either sets the thread's message.
fn entry(f: impl FnOnce() -> Outcome<()>) -> lorafold_status {
    quiet_panics();
    DEPTH.with(|d| d.set(d.get() + 1));
    let outcome = catch_unwind(AssertUnwindSafe(f));
    DEPTH.with(|d| d.set(d.get() - 1));
    match outcome {
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
            let at = PANIC_AT
                .with(|p| p.borrow_mut().take())
                .map(|at| format!(" (at {at})"))
                .unwrap_or_default();
            set_error(&format!("lorafold bug (please report): {what}{at}"));
            LORAFOLD_ERR_PANIC
        }
    }
}

/// Run the host's code (a callback): a panic there is not ours to silence.
fn outside<R>(f: impl FnOnce() -> R) -> R {
    let depth = DEPTH.with(|d| d.replace(0));
    let r = f();
    DEPTH.with(|d| d.set(depth));
    r
}

/// The object a handle names.
#[derive(Clone)]
enum Object {
    Model(Arc<lorafold_model>),
    Adapter(Arc<lorafold_adapter>),
    Session(Arc<lorafold_session>),
}

/// A kind of object behind a handle.
trait Kind: Sized {
    /// The registry's entry for `object`.
    fn wrap(object: Arc<Self>) -> Object;
    /// The object of this kind an entry holds, if it is one.
    fn of(object: &Object) -> Option<&Arc<Self>>;
    /// Whether a call is using it now, so that it may not be freed.
    fn in_use(&self) -> bool {
        false
    }
}

impl Kind for lorafold_model {
    fn wrap(object: Arc<Self>) -> Object {
        Object::Model(object)
    }
    fn of(object: &Object) -> Option<&Arc<Self>> {
        match object {
            Object::Model(m) => Some(m),
            _ => None,
        }
    }
}

impl Kind for lorafold_adapter {
    fn wrap(object: Arc<Self>) -> Object {
        Object::Adapter(object)
    }
    fn of(object: &Object) -> Option<&Arc<Self>> {
        match object {
            Object::Adapter(a) => Some(a),
            _ => None,
        }
    }
}

impl Kind for lorafold_session {
    fn wrap(object: Arc<Self>) -> Object {
        Object::Session(object)
    }
    fn of(object: &Object) -> Option<&Arc<Self>> {
        match object {
            Object::Session(s) => Some(s),
            _ => None,
        }
    }
    fn in_use(&self) -> bool {
        matches!(self.conversation.try_lock(), Err(TryLockError::WouldBlock))
    }
}

/// The live objects by handle, and how many handles were ever issued.
struct Registry {
    issued: usize,
    live: BTreeMap<usize, Object>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    issued: 0,
    live: BTreeMap::new(),
});

/// The first handle: the top half of the address space, where a 64-bit
/// host's own objects never are, so a stray pointer is not taken for one.
const FIRST_HANDLE: usize = 1 << (usize::BITS - 1);
/// Handles step like the addresses of aligned objects.
const HANDLE_STEP: usize = 8;

fn registry() -> MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// A new handle for `value`, never issued before.
fn register<T: Kind>(value: T) -> Outcome<*mut T> {
    let object = T::wrap(Arc::new(value));
    let mut r = registry();
    let Some(id) = r
        .issued
        .checked_mul(HANDLE_STEP)
        .and_then(|offset| FIRST_HANDLE.checked_add(offset))
    else {
        // 2^60 handles on a 64-bit target; 2^28 on a 32-bit one.
        return fail(
            LORAFOLD_ERR_RUNTIME,
            "lorafold has issued every handle it can: restart the process",
        );
    };
    r.issued += 1;
    r.live.insert(id, object);
    Ok(std::ptr::without_provenance_mut(id))
}

/// The live object of kind `T` that `p` names, held for the call.
fn handle<T: Kind>(p: *const T, what: &str) -> Outcome<Arc<T>> {
    not_null(p, what)?;
    let object = registry().live.get(&p.addr()).and_then(T::of).cloned();
    object.map_or_else(
        || {
            fail(
                LORAFOLD_ERR_HANDLE,
                format!("{what} is not a live lorafold object (freed, or not made by lorafold)"),
            )
        },
        Ok,
    )
}

/// Retire the handle `p`: it is never valid again. The object goes when
/// the last call holding it returns (a session's model when its last
/// session goes).
fn release<T: Kind>(p: *mut T, what: &str) -> Outcome<()> {
    not_null(p, what)?;
    let mut r = registry();
    match r.live.get(&p.addr()).and_then(T::of) {
        None => fail(
            LORAFOLD_ERR_HANDLE,
            format!("{what} is not a live lorafold object (freed, or not made by lorafold)"),
        ),
        Some(object) if object.in_use() => fail(
            LORAFOLD_ERR_BUSY,
            format!("{what} is in use by a call in progress: free it after that call returns"),
        ),
        Some(_) => {
            let object = r.live.remove(&p.addr());
            // Dropped outside the lock: a session joins its worker threads.
            drop(r);
            drop(object);
            Ok(())
        }
    }
}

impl lorafold_model {
    /// The model as it is now, held for the caller's use.
    fn core(&self) -> Arc<ModelCore> {
        self.core.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Change the model, which needs no session or call of another thread
    /// to hold it.
    fn change<R>(&self, what: &str, f: impl FnOnce(&mut ModelCore) -> Outcome<R>) -> Outcome<R> {
        let mut core = self.core.lock().unwrap_or_else(|e| e.into_inner());
        match Arc::get_mut(&mut core) {
            Some(core) => f(core),
            None => fail(
                LORAFOLD_ERR_BUSY,
                format!(
                    "the model is in use (live sessions, or a call on another thread): free its sessions before {what}"
                ),
            ),
        }
    }
}

/// Run `f` on the conversation behind `p`, which it holds for the call: a
/// call already holding it (on another thread, or the generate whose
/// callback this is) makes this one `LORAFOLD_ERR_BUSY`.
fn with_session<R>(
    p: *mut lorafold_session,
    f: impl FnOnce(&lorafold_session, &mut Conversation) -> Outcome<R>,
) -> Outcome<R> {
    let s = handle(p, "session")?;
    let mut conversation = match s.conversation.try_lock() {
        Ok(c) => c,
        // A panic in an earlier call left it as it was: a reset empties it.
        Err(TryLockError::Poisoned(c)) => c.into_inner(),
        Err(TryLockError::WouldBlock) => {
            return fail(
                LORAFOLD_ERR_BUSY,
                "the session is in use by a call in progress (on another thread, or the generate whose callback is running): only lorafold_session_used may be called on it now",
            )
        }
    };
    let outcome = f(&s, &mut conversation);
    s.used
        .store(conversation.session.position(), Ordering::Release);
    outcome
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
        let tokenizer = model
            .tokenizer()
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
        *out = register(lorafold_model {
            core: Mutex::new(Arc::new(core)),
        })?;
        Ok(())
    })
}

/// Free a model: its handle is never valid again. Its sessions stay
/// usable until they are freed, and calls in progress on other threads
/// finish with it.
///
/// # Safety
/// None beyond the handle's: any value is checked.
#[no_mangle]
pub unsafe extern "C" fn lorafold_model_free(model: *mut lorafold_model) -> lorafold_status {
    entry(|| release(model, "model"))
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
        *out = handle(model, "model")?.core().model.config.vocab as u32;
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
        *out = register(lorafold_adapter { adapter })?;
        Ok(())
    })
}

/// Free an adapter: its handle is never valid again (a model it is
/// attached to keeps its own copy).
///
/// # Safety
/// None beyond the handle's: any value is checked.
#[no_mangle]
pub unsafe extern "C" fn lorafold_adapter_free(adapter: *mut lorafold_adapter) -> lorafold_status {
    entry(|| release(adapter, "adapter"))
}

/// Attach `adapter` to `model` at `scale` (finite, |scale| <= 100); its
/// slot is written to `slot`. `LORAFOLD_ERR_BUSY` while the model has live
/// sessions or another thread's call uses it.
///
/// # Safety
/// `slot` must point to writable memory.
#[no_mangle]
pub unsafe extern "C" fn lorafold_model_attach(
    model: *mut lorafold_model,
    adapter: *const lorafold_adapter,
    scale: f32,
    slot: *mut i32,
) -> lorafold_status {
    entry(|| {
        not_null(slot, "slot")?;
        let adapter = handle(adapter, "adapter")?;
        let s = handle(model, "model")?.change("attaching an adapter", |core| {
            Ok(core.model.attach(&adapter.adapter, scale as f64)?)
        })?;
        *slot = s as i32;
        Ok(())
    })
}

fn attached_slot(core: &ModelCore, slot: i32) -> Outcome<usize> {
    match usize::try_from(slot) {
        Ok(s) if core.model.scale(s).is_some() => Ok(s),
        _ => fail(
            LORAFOLD_ERR_INVALID,
            format!("slot {slot} holds no adapter of this model"),
        ),
    }
}

/// Change the scale of the adapter in `slot` (0 turns it off);
/// `LORAFOLD_ERR_BUSY` as for [`lorafold_model_attach`].
///
/// # Safety
/// None beyond the handle's: any value is checked.
#[no_mangle]
pub unsafe extern "C" fn lorafold_model_set_scale(
    model: *mut lorafold_model,
    slot: i32,
    scale: f32,
) -> lorafold_status {
    entry(|| {
        let model = handle(model, "model")?;
        let s = attached_slot(&model.core(), slot)?;
        model.change("changing a scale", |core| {
            Ok(core.model.set_scale(s, scale as f64)?)
        })
    })
}

/// Detach the adapter in `slot`; `LORAFOLD_ERR_BUSY` as for
/// [`lorafold_model_attach`].
///
/// # Safety
/// None beyond the handle's: any value is checked.
#[no_mangle]
pub unsafe extern "C" fn lorafold_model_detach(
    model: *mut lorafold_model,
    slot: i32,
) -> lorafold_status {
    entry(|| {
        let model = handle(model, "model")?;
        let s = attached_slot(&model.core(), slot)?;
        model.change("detaching an adapter", |core| {
            core.model.detach(s);
            Ok(())
        })
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
        let core = handle(model, "model")?.core();
        // SAFETY: the model lives in the Arc the session holds, which is
        // dropped after it; no one mutates it while a session holds it
        // (attach and the like need the Arc unshared).
        let m: &'static Model = &*(&core.model as *const Model);
        let session = m.session_with(SessionOptions {
            threads: core.threads,
            ..SessionOptions::new(core.n_ctx)
        })?;
        *out = register(lorafold_session {
            used: AtomicUsize::new(session.position()),
            size: session.max_tokens(),
            conversation: Mutex::new(Conversation { session, core }),
        })?;
        Ok(())
    })
}

/// Empty the session's cache: the next call starts a new conversation.
/// `LORAFOLD_ERR_BUSY` while another call uses the session.
///
/// # Safety
/// None beyond the handle's: any value is checked.
#[no_mangle]
pub unsafe extern "C" fn lorafold_session_reset(session: *mut lorafold_session) -> lorafold_status {
    entry(|| {
        with_session(session, |_, c| {
            c.session.reset();
            Ok(())
        })
    })
}

/// The positions the session's conversation holds (`used`) and its
/// context size (`size`): an app resets or starts a new session before a
/// turn would not fit. The one call a session in use answers (from the
/// generate callback: the positions so far).
///
/// # Safety
/// `used` and `size` must be valid for writes.
#[no_mangle]
pub unsafe extern "C" fn lorafold_session_used(
    session: *const lorafold_session,
    used: *mut usize,
    size: *mut usize,
) -> lorafold_status {
    entry(|| {
        not_null(used, "used")?;
        not_null(size, "size")?;
        let s = handle(session, "session")?;
        *used = s.used.load(Ordering::Acquire);
        *size = s.size;
        Ok(())
    })
}

/// Free a session: its handle is never valid again. A session in use (by
/// another thread's call, or the generate whose callback is running) is
/// not freed: `LORAFOLD_ERR_BUSY`, and the handle stays valid.
///
/// # Safety
/// None beyond the handle's: any value is checked.
#[no_mangle]
pub unsafe extern "C" fn lorafold_session_free(session: *mut lorafold_session) -> lorafold_status {
    entry(|| release(session, "session"))
}

/// Token ids of `text` (with the model's BOS when it adds one). At most
/// `cap` are written to `tokens`; `n_tokens` gets the count, and when it
/// is over `cap` the call returns `LORAFOLD_ERR_BUFFER`. The text is
/// tokenized a piece at a time: memory stays small however long it is.
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
        let core = handle(model, "model")?.core();
        let text = text(text_utf8, "text")?;
        if cap > 0 {
            not_null(tokens, "tokens")?;
        }
        // Counted all through, kept only as far as the buffer goes.
        let mut count = 0usize;
        core.tokenizer
            .encode_pieces(text, &mut |ids| {
                let fits = ids.len().min(cap.saturating_sub(count));
                if fits > 0 {
                    // SAFETY: `tokens` holds `cap` ids and `count + fits <= cap`.
                    unsafe { std::ptr::copy_nonoverlapping(ids.as_ptr(), tokens.add(count), fits) };
                }
                count += ids.len();
                true
            })
            .or_else(|e| fail(LORAFOLD_ERR_INVALID, format!("text: {e}")))?;
        *n_tokens = count;
        if count > cap {
            return fail(
                LORAFOLD_ERR_BUFFER,
                format!("{count} tokens do not fit in {cap}"),
            );
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
        let core = handle(model, "model")?.core();
        let ids: &[u32] = match n {
            0 => &[],
            _ => {
                not_null(tokens, "tokens")?;
                std::slice::from_raw_parts(tokens, n)
            }
        };
        check_ids(ids, core.model.config.vocab)?;
        let s = core
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
/// The session is in use until the call returns: from `on_piece` (or
/// another thread) every call on it but [`lorafold_session_used`] is
/// `LORAFOLD_ERR_BUSY`, [`lorafold_session_free`] included; other objects
/// (another session, the model's tokenizer) may be used from the callback.
///
/// # Safety
/// `prompt` must be NUL-terminated; `on_piece` must be safe to call with
/// `user`.
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
        let prompt = text(prompt, "prompt")?;
        let p = if params.is_null() {
            lorafold_sampling_default()
        } else {
            *params
        };
        with_session(session, |s, c| {
            generate_in(s, c, prompt, p, on_piece, user, n_generated)
        })
    })
}

/// [`lorafold_generate`] on a session its call holds.
unsafe fn generate_in(
    s: &lorafold_session,
    c: &mut Conversation,
    prompt: &str,
    p: lorafold_sampling,
    on_piece: lorafold_piece_fn,
    user: *mut c_void,
    n_generated: *mut usize,
) -> Outcome<()> {
    let tok = &c.core.tokenizer;
    let ids = prompt_ids(&c.session, tok, prompt, p.chat)?;
    let mut sampler = Sampler::try_new(SamplerConfig {
        temperature: p.temperature as f64,
        top_k: p.top_k as usize,
        top_p: p.top_p as f64,
        repeat_penalty: p.repeat_penalty,
        seed: p.seed,
    })?;
    let mut on_token = |piece: &str, position: usize| -> bool {
        // What lorafold_session_used reads from the callback.
        s.used.store(position, Ordering::Release);
        match on_piece {
            None => true,
            Some(f) => {
                let c = CString::new(piece.replace('\0', " ")).unwrap_or_default();
                // SAFETY: the caller vouches for the callback and `user`.
                outside(|| unsafe { f(c.as_ptr(), c.as_bytes().len(), user) })
            }
        }
    };
    let (out, _) = generate_with(
        &mut c.session,
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
        close_turn(&mut c.session, tok)?;
    }
    Ok(())
}

/// Run `tokens` after the session's conversation and write the logits of
/// the last position to `logits` (`cap` floats, at least the vocabulary
/// size: `LORAFOLD_ERR_BUFFER` otherwise): for apps with their own sampler.
///
/// `LORAFOLD_ERR_BUSY` while another call uses the session.
///
/// # Safety
/// `tokens` must hold `n` ids and `logits` `cap` floats.
#[no_mangle]
pub unsafe extern "C" fn lorafold_eval(
    session: *mut lorafold_session,
    tokens: *const u32,
    n: usize,
    logits: *mut f32,
    cap: usize,
) -> lorafold_status {
    entry(|| with_session(session, |_, c| eval_in(c, tokens, n, logits, cap)))
}

/// [`lorafold_eval`] on a session its call holds.
unsafe fn eval_in(
    c: &mut Conversation,
    tokens: *const u32,
    n: usize,
    logits: *mut f32,
    cap: usize,
) -> Outcome<()> {
    not_null(logits, "logits")?;
    if n == 0 {
        return fail(LORAFOLD_ERR_INVALID, "no tokens to run");
    }
    not_null(tokens, "tokens")?;
    let vocab = c.core.model.config.vocab;
    if cap < vocab {
        return fail(
            LORAFOLD_ERR_BUFFER,
            format!("the logits need {vocab} floats, the buffer holds {cap}"),
        );
    }
    let ids = std::slice::from_raw_parts(tokens, n);
    check_ids(ids, vocab)?;
    check_room(&c.session, n)?;
    let row = c.session.logits(ids, false)?;
    std::ptr::copy_nonoverlapping(row.as_ptr(), logits, vocab);
    Ok(())
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
        let r = handle(reference, "reference")?.core();
        let c = handle(candidate, "candidate")?.core();
        // Refused before the text is tokenized, as drift itself would.
        check_vocabulary(&r.model, &c.model)?;
        let w = windows(&r.tokenizer, text(text_utf8, "text")?, true, 128).or_else(|e| {
            let code = match e {
                WindowError::NoWindow | WindowError::ZeroContext => LORAFOLD_ERR_INVALID,
                WindowError::Tokenize(_) => LORAFOLD_ERR_RUNTIME,
            };
            fail(code, format!("text: {e}"))
        })?;
        let d = drift(&r.model, &[&c.model], None, &w)?.remove(0);
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

// What the header promises about threads, checked by the compiler: every
// object may be reached from any thread (a session's lock turns a second
// user away), and a session's conversation may move between threads.
const _: () = {
    const fn shared<T: Send + Sync>() {}
    const fn movable<T: Send>() {}
    shared::<ModelCore>();
    shared::<lorafold_model>();
    shared::<lorafold_adapter>();
    shared::<lorafold_session>();
    movable::<Conversation>();
};

#[cfg(test)]
mod tests {
    use super::*;

    /// A panic caught at the boundary (in an entry point, or on a worker
    /// thread of the runtime's pool, which hands it to the caller) prints
    /// nothing on the host's stderr; a panic of the host's own still
    /// reaches the hook that was there before. Checked in a child process:
    /// the test harness would capture the hook's output.
    #[test]
    fn panics_caught_at_the_boundary_print_nothing() {
        if std::env::var_os("LORAFOLD_PANIC_CHILD").is_some() {
            let status = entry(|| panic!("boom"));
            assert_eq!(status, LORAFOLD_ERR_PANIC);
            // SAFETY: a NUL-terminated string.
            let m = unsafe { CStr::from_ptr(lorafold_last_error()) }.to_string_lossy();
            assert!(m.contains("boom") && m.contains("lib.rs:"), "{m}");
            let status = entry(|| {
                let pool = lorafold_runtime::cpu::pool::WorkerPool::new(2);
                // The caller holds its chunk until a worker has taken the
                // other, so the panic is a worker's.
                let worker_ran = std::sync::atomic::AtomicBool::new(false);
                pool.run_chunks(2, 1, &|_, i| {
                    if i == 0 {
                        while !worker_ran.load(std::sync::atomic::Ordering::Acquire) {
                            std::thread::yield_now();
                        }
                    } else {
                        worker_ran.store(true, std::sync::atomic::Ordering::Release);
                        panic!("worker {i} fails");
                    }
                });
                Ok(())
            });
            assert_eq!(status, LORAFOLD_ERR_PANIC);
            let host = std::panic::catch_unwind(|| panic!("the host's own"));
            assert!(host.is_err());
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "tests::panics_caught_at_the_boundary_print_nothing",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("LORAFOLD_PANIC_CHILD", "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert!(
            !stderr.contains("boom") && !stderr.contains("fails"),
            "{stderr}"
        );
        assert!(stderr.contains("the host's own"), "{stderr}");
    }
}

//! The C API under the misuse a hostile app (or a fuzzer) tries: calls that
//! re-enter a session from its own generate callback, one session from two
//! threads, handle values kept after free while the allocator reuses the
//! memory, and a seeded random sequence of all of these. On a tiny
//! synthetic llama (64 wide, one block, 64 tokens "t3".."t63"), so each test
//! runs in about a second.

#[path = "../../tests/common/synthetic.rs"]
#[allow(dead_code)]
mod synthetic;

use std::ffi::{c_char, c_void, CString};
use std::path::Path;
use std::ptr::{null, null_mut};
use std::sync::mpsc;

use lorafold::*;

mod common;
use common::{c, expect, message};
use lorafold_runtime::gguf::GgmlType;

const TINY: synthetic::Shape = synthetic::Shape {
    dim: 64,
    ffn: 128,
    layers: 1,
    heads: 2,
    kv_heads: 1,
    vocab: 64,
    untied: false,
};
/// The sessions' context.
const N_CTX: usize = 48;
const VOCAB: usize = 64;

/// The tiny model and a LoRA adapter (zeros, rank 4 on blk.0.attn_q) for it.
fn tiny(dir: &Path) -> (CString, CString) {
    let model = dir.join("tiny.gguf");
    synthetic::write_f32(&model, TINY, 7);
    let adapter = dir.join("tiny-lora.gguf");
    let mut w =
        lorafold_converter::write::adapter_gguf::lora_writer(&adapter, "llama", 4.0).unwrap();
    w.add_tensor("blk.0.attn_q.weight.lora_a", GgmlType::F32, &[64, 4])
        .unwrap();
    w.add_tensor("blk.0.attn_q.weight.lora_b", GgmlType::F32, &[4, 64])
        .unwrap();
    let mut s = w.start().unwrap();
    s.write_tensor("blk.0.attn_q.weight.lora_a", &[0u8; 64 * 4 * 4])
        .unwrap();
    s.write_tensor("blk.0.attn_q.weight.lora_b", &[0u8; 64 * 4 * 4])
        .unwrap();
    s.finish().unwrap();
    (c(model.to_str().unwrap()), c(adapter.to_str().unwrap()))
}

fn load(path: &CString) -> *mut lorafold_model {
    let mut m = null_mut();
    // SAFETY: valid string and out pointer.
    unsafe {
        expect(
            lorafold_model_load(path.as_ptr(), 1, N_CTX as u32, &mut m),
            LORAFOLD_OK,
            "load",
        )
    };
    m
}

fn session(m: *const lorafold_model) -> *mut lorafold_session {
    let mut s = null_mut();
    // SAFETY: out pointer valid; the handle is checked.
    unsafe { expect(lorafold_session_new(m, &mut s), LORAFOLD_OK, "session") };
    s
}

fn used(s: *const lorafold_session) -> usize {
    let (mut used, mut size) = (0usize, 0usize);
    // SAFETY: out pointers valid; the handle is checked.
    unsafe {
        expect(
            lorafold_session_used(s, &mut used, &mut size),
            LORAFOLD_OK,
            "used",
        )
    };
    assert_eq!(size, N_CTX);
    used
}

fn params(max_tokens: u32) -> lorafold_sampling {
    lorafold_sampling {
        max_tokens,
        ..lorafold_sampling_default()
    }
}

unsafe extern "C" fn collect(piece: *const c_char, len: usize, user: *mut c_void) -> bool {
    let out = &mut *(user as *mut String);
    out.push_str(std::str::from_utf8(std::slice::from_raw_parts(piece.cast(), len)).unwrap());
    true
}

/// The text a fresh session generates after `prompt`, and its positions after.
fn clean_run(m: *const lorafold_model, prompt: &CString, max_tokens: u32) -> (String, usize) {
    let s = session(m);
    let mut text = String::new();
    let p = params(max_tokens);
    unsafe {
        expect(
            lorafold_generate(
                s,
                prompt.as_ptr(),
                &p,
                Some(collect),
                (&mut text as *mut String).cast(),
                null_mut(),
            ),
            LORAFOLD_OK,
            "clean generate",
        );
        let at = used(s);
        expect(lorafold_session_free(s), LORAFOLD_OK, "clean free");
        (text, at)
    }
}

/// Every call on the session `s` while a call holds it (from its callback
/// or another thread): all refused as busy, but `used`, which reads.
/// Returns (call, status, message) and the positions `used` saw.
unsafe fn calls_on_busy(
    s: *mut lorafold_session,
    m: *mut lorafold_model,
    a: *const lorafold_adapter,
) -> (Vec<(&'static str, lorafold_status, String)>, usize) {
    let mut out = Vec::new();
    let mut record = |name: &'static str, status: lorafold_status| {
        out.push((name, status, message()));
    };
    let prompt = c("t5");
    let one = [5u32];
    let mut logits = vec![0f32; VOCAB];
    let mut slot = -1;
    record(
        "generate",
        lorafold_generate(s, prompt.as_ptr(), null(), None, null_mut(), null_mut()),
    );
    record(
        "eval",
        lorafold_eval(s, one.as_ptr(), 1, logits.as_mut_ptr(), VOCAB),
    );
    record("reset", lorafold_session_reset(s));
    record("attach", lorafold_model_attach(m, a, 1.0, &mut slot));
    record("free", lorafold_session_free(s));
    let (mut used, mut size) = (0usize, 0usize);
    record("used", lorafold_session_used(s, &mut used, &mut size));
    (out, used)
}

fn check_busy(calls: &[(&str, lorafold_status, String)]) {
    let got: Vec<(&str, lorafold_status)> = calls.iter().map(|(n, s, _)| (*n, *s)).collect();
    assert_eq!(
        got,
        [
            ("generate", LORAFOLD_ERR_BUSY),
            ("eval", LORAFOLD_ERR_BUSY),
            ("reset", LORAFOLD_ERR_BUSY),
            ("attach", LORAFOLD_ERR_BUSY),
            ("free", LORAFOLD_ERR_BUSY),
            ("used", LORAFOLD_OK),
        ],
        "{calls:?}"
    );
    for (name, _, m) in &calls[..3] {
        assert!(m.contains("the session is in use"), "{name}: {m}");
    }
    assert!(calls[4].2.contains("session is in use"), "{}", calls[4].2);
    assert!(calls[3].2.contains("the model is in use"), "{}", calls[3].2);
}

struct Reentry {
    session: *mut lorafold_session,
    model: *mut lorafold_model,
    adapter: *const lorafold_adapter,
    text: String,
    calls: Vec<(&'static str, lorafold_status, String)>,
    used_in_callback: Option<usize>,
}

unsafe extern "C" fn reenter(piece: *const c_char, len: usize, user: *mut c_void) -> bool {
    let r = &mut *(user as *mut Reentry);
    r.text
        .push_str(std::str::from_utf8(std::slice::from_raw_parts(piece.cast(), len)).unwrap());
    if r.used_in_callback.is_none() {
        let (calls, used) = calls_on_busy(r.session, r.model, r.adapter);
        r.calls = calls;
        r.used_in_callback = Some(used);
    }
    true
}

/// From inside its own generate callback, a session refuses generate, eval,
/// reset and free (which was a use-after-free) as busy, its model refuses
/// an adapter, `used` reads the positions so far; the generation goes on
/// exactly as a clean one and the session is freed afterwards.
#[test]
fn a_session_is_busy_inside_its_own_generate_callback() {
    let dir = tempfile::tempdir().unwrap();
    let (model_path, adapter_path) = tiny(dir.path());
    let m = load(&model_path);
    let mut a = null_mut();
    let prompt = c("t5 t6 t7");
    unsafe {
        expect(
            lorafold_adapter_load(adapter_path.as_ptr(), &mut a),
            LORAFOLD_OK,
            "adapter",
        );
        let (want_text, want_used) = clean_run(m, &prompt, 8);
        let s = session(m);
        let mut r = Reentry {
            session: s,
            model: m,
            adapter: a,
            text: String::new(),
            calls: Vec::new(),
            used_in_callback: None,
        };
        let mut n = 0usize;
        let p = params(8);
        expect(
            lorafold_generate(
                s,
                prompt.as_ptr(),
                &p,
                Some(reenter),
                (&mut r as *mut Reentry).cast(),
                &mut n,
            ),
            LORAFOLD_OK,
            "generate",
        );
        check_busy(&r.calls);
        // The first piece comes after the 3 prompt tokens ran.
        assert_eq!(r.used_in_callback, Some(3));
        assert_eq!((n, r.text.as_str()), (8, want_text.as_str()));
        assert_eq!(used(s), want_used);
        // Not busy any more: the session takes calls and is freed once.
        expect(lorafold_session_reset(s), LORAFOLD_OK, "reset after");
        assert_eq!(used(s), 0);
        expect(lorafold_session_free(s), LORAFOLD_OK, "free after");
        expect(lorafold_session_free(s), LORAFOLD_ERR_HANDLE, "freed twice");
        expect(lorafold_adapter_free(a), LORAFOLD_OK, "adapter free");
        expect(lorafold_model_free(m), LORAFOLD_OK, "model free");
    }
}

/// A session's handle, sent to another thread on purpose.
struct SessionHandle(usize);

struct Gate {
    inside: mpsc::Sender<()>,
    resume: mpsc::Receiver<()>,
}

unsafe extern "C" fn wait_at_gate(_: *const c_char, _: usize, user: *mut c_void) -> bool {
    let gate = &*(user as *const Gate);
    // Tell the other thread we are inside, once, and wait for it (an error:
    // it is gone, go on).
    if gate.inside.send(()).is_ok() {
        let _ = gate.resume.recv();
    }
    true
}

/// While one thread generates on a session, another thread's calls on it
/// are busy (they raced it before: a kernel panic on one side, a corrupted
/// cache on the other), and it may free the model, which the session keeps.
#[test]
fn a_session_in_use_on_one_thread_is_busy_on_another() {
    let dir = tempfile::tempdir().unwrap();
    let (model_path, adapter_path) = tiny(dir.path());
    let m = load(&model_path);
    let mut a = null_mut();
    unsafe {
        expect(
            lorafold_adapter_load(adapter_path.as_ptr(), &mut a),
            LORAFOLD_OK,
            "adapter",
        )
    };
    let prompt = c("t5 t6 t7");
    let (want_text, want_used) = clean_run(m, &prompt, 6);
    let s = session(m);
    let (inside_tx, inside_rx) = mpsc::channel();
    let (resume_tx, resume_rx) = mpsc::channel();
    let handle = SessionHandle(s as usize);
    let generating = std::thread::spawn(move || {
        let gate = Gate {
            inside: inside_tx,
            resume: resume_rx,
        };
        let s = handle.0 as *mut lorafold_session;
        let mut text = String::new();
        let mut user = (gate, &mut text as *mut String);
        unsafe extern "C" fn both(piece: *const c_char, len: usize, user: *mut c_void) -> bool {
            let (gate, text) = &mut *(user as *mut (Gate, *mut String));
            collect(piece, len, (*text).cast());
            wait_at_gate(piece, len, (gate as *mut Gate).cast())
        }
        let p = params(6);
        let status = unsafe {
            lorafold_generate(
                s,
                prompt.as_ptr(),
                &p,
                Some(both),
                (&mut user as *mut (Gate, *mut String)).cast(),
                null_mut(),
            )
        };
        (status, message(), text)
    });
    inside_rx.recv().unwrap();
    let (calls, used_then) = unsafe { calls_on_busy(s, m, a) };
    // The model's handle may go while its session runs.
    let model_free = unsafe { lorafold_model_free(m) };
    drop(resume_tx);
    let (status, msg, text) = generating.join().unwrap();
    assert_eq!(status, LORAFOLD_OK, "{msg}");
    check_busy(&calls);
    assert_eq!(used_then, 3);
    assert_eq!(model_free, LORAFOLD_OK);
    assert_eq!(text, want_text);
    assert_eq!(used(s), want_used);
    unsafe {
        let mut vocab = 0u32;
        expect(
            lorafold_model_n_vocab(m, &mut vocab),
            LORAFOLD_ERR_HANDLE,
            "freed model",
        );
        expect(lorafold_session_free(s), LORAFOLD_OK, "session free");
        expect(lorafold_adapter_free(a), LORAFOLD_OK, "adapter free");
    }
}

/// A freed handle stays invalid forever: however many sessions, adapters
/// and models are made after it (the allocator hands their memory back
/// out), the old value is refused and no new handle equals it.
#[test]
fn freed_handles_stay_invalid_while_new_objects_are_made() {
    let dir = tempfile::tempdir().unwrap();
    let (model_path, adapter_path) = tiny(dir.path());
    let m = load(&model_path);
    let (mut sessions, mut adapters, mut models) = (Vec::new(), Vec::new(), Vec::new());
    let mut logits = vec![0f32; VOCAB];
    let one = [5u32];
    unsafe {
        for round in 0..60 {
            let s = session(m);
            let mut a = null_mut();
            expect(
                lorafold_adapter_load(adapter_path.as_ptr(), &mut a),
                LORAFOLD_OK,
                "adapter",
            );
            assert!(
                !sessions.contains(&s) && !adapters.contains(&a),
                "round {round}"
            );
            expect(
                lorafold_eval(s, one.as_ptr(), 1, logits.as_mut_ptr(), VOCAB),
                LORAFOLD_OK,
                "eval",
            );
            expect(lorafold_session_free(s), LORAFOLD_OK, "free");
            expect(lorafold_adapter_free(a), LORAFOLD_OK, "free adapter");
            sessions.push(s);
            adapters.push(a);
            if round % 20 == 0 {
                let old = load(&model_path);
                assert!(!models.contains(&old));
                expect(lorafold_model_free(old), LORAFOLD_OK, "free model");
                models.push(old);
            }
            for &old in &sessions {
                expect(lorafold_session_reset(old), LORAFOLD_ERR_HANDLE, "reset");
                expect(
                    lorafold_eval(old, one.as_ptr(), 1, logits.as_mut_ptr(), VOCAB),
                    LORAFOLD_ERR_HANDLE,
                    "eval",
                );
                expect(lorafold_session_free(old), LORAFOLD_ERR_HANDLE, "free");
            }
            for &old in &adapters {
                let mut slot = 0;
                expect(
                    lorafold_model_attach(m, old, 1.0, &mut slot),
                    LORAFOLD_ERR_HANDLE,
                    "attach",
                );
                expect(lorafold_adapter_free(old), LORAFOLD_ERR_HANDLE, "free");
            }
            for &old in &models {
                let mut s = null_mut();
                expect(
                    lorafold_session_new(old, &mut s),
                    LORAFOLD_ERR_HANDLE,
                    "session of a freed model",
                );
            }
        }
        // A handle of one kind is not one of another.
        let s = session(m);
        let mut vocab = 0u32;
        expect(
            lorafold_model_n_vocab(s.cast(), &mut vocab),
            LORAFOLD_ERR_HANDLE,
            "a session as a model",
        );
        expect(lorafold_session_free(s), LORAFOLD_OK, "free");
        expect(lorafold_model_free(m), LORAFOLD_OK, "model free");
    }
}

/// xorshift64*: the fuzz loop's dice, from a seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n
    }
}

#[derive(Clone, Copy)]
struct FuzzSession {
    handle: *mut lorafold_session,
    model: usize,
    live: bool,
}

struct Fuzz {
    rng: Rng,
    model_path: CString,
    adapter_path: CString,
    models: Vec<(*mut lorafold_model, bool)>,
    sessions: Vec<FuzzSession>,
    adapters: Vec<(*mut lorafold_adapter, bool)>,
    /// The session generating now, whose callback re-enters.
    busy: Option<usize>,
    steps: usize,
    /// Generations run, and steps taken from inside their callbacks.
    generations: usize,
    reentries: usize,
}

impl Fuzz {
    fn live_sessions_of(&self, model: usize) -> usize {
        self.sessions
            .iter()
            .filter(|s| s.live && s.model == model)
            .count()
    }

    /// One random call, its status checked against what the shadow state
    /// says it must be.
    unsafe fn step(&mut self) {
        self.steps += 1;
        let mut logits = vec![0f32; VOCAB];
        let op = self.rng.below(14);
        match op {
            0 | 1 if !self.models.is_empty() => {
                let i = self.rng.below(self.models.len());
                let (m, live) = self.models[i];
                let mut s = null_mut();
                let status = lorafold_session_new(m, &mut s);
                if live {
                    expect(status, LORAFOLD_OK, "session_new");
                    self.sessions.push(FuzzSession {
                        handle: s,
                        model: i,
                        live: true,
                    });
                } else {
                    expect(status, LORAFOLD_ERR_HANDLE, "session_new freed model");
                }
            }
            2..=6 if !self.sessions.is_empty() => {
                let i = self.rng.below(self.sessions.len());
                let s = self.sessions[i];
                let busy = self.busy == Some(i);
                let want = |ok: lorafold_status| match (s.live, busy) {
                    (false, _) => LORAFOLD_ERR_HANDLE,
                    (true, true) => LORAFOLD_ERR_BUSY,
                    (true, false) => ok,
                };
                match op {
                    2 => {
                        let status = lorafold_session_free(s.handle);
                        expect(status, want(LORAFOLD_OK), "session_free");
                        if status == LORAFOLD_OK {
                            self.sessions[i].live = false;
                        }
                    }
                    3 => expect(lorafold_session_reset(s.handle), want(LORAFOLD_OK), "reset"),
                    4 => {
                        let n = 1 + self.rng.below(6);
                        let bad = self.rng.below(8) == 0;
                        let ids: Vec<u32> = (0..n)
                            .map(|_| 3 + self.rng.below(VOCAB - 3) as u32)
                            .chain(bad.then_some(VOCAB as u32 + 7))
                            .collect();
                        let before = if s.live { used(s.handle) } else { 0 };
                        let ok = if bad {
                            LORAFOLD_ERR_INVALID
                        } else if before + ids.len() > N_CTX {
                            LORAFOLD_ERR_CONTEXT
                        } else {
                            LORAFOLD_OK
                        };
                        let status = lorafold_eval(
                            s.handle,
                            ids.as_ptr(),
                            ids.len(),
                            logits.as_mut_ptr(),
                            VOCAB,
                        );
                        expect(status, want(ok), "eval");
                    }
                    5 if self.busy.is_none() && s.live => self.generate(i),
                    _ => {
                        let (mut u, mut size) = (0usize, 0usize);
                        let status = lorafold_session_used(s.handle, &mut u, &mut size);
                        let want = if s.live {
                            LORAFOLD_OK
                        } else {
                            LORAFOLD_ERR_HANDLE
                        };
                        expect(status, want, "used");
                        assert!(u <= N_CTX);
                    }
                }
            }
            7 if !self.models.is_empty() && !self.adapters.is_empty() => {
                let i = self.rng.below(self.models.len());
                let j = self.rng.below(self.adapters.len());
                let ((m, m_live), (a, a_live)) = (self.models[i], self.adapters[j]);
                let mut slot = -1;
                let status = lorafold_model_attach(m, a, 0.5, &mut slot);
                let want = if !a_live || !m_live {
                    LORAFOLD_ERR_HANDLE
                } else if self.live_sessions_of(i) > 0 {
                    LORAFOLD_ERR_BUSY
                } else {
                    LORAFOLD_OK
                };
                expect(status, want, "attach");
                if status == LORAFOLD_OK {
                    expect(lorafold_model_detach(m, slot), LORAFOLD_OK, "detach");
                }
            }
            8 if !self.models.is_empty() => {
                let i = self.rng.below(self.models.len());
                let (m, live) = self.models[i];
                let want = if live {
                    LORAFOLD_OK
                } else {
                    LORAFOLD_ERR_HANDLE
                };
                expect(lorafold_model_free(m), want, "model_free");
                self.models[i].1 = false;
            }
            9 if !self.adapters.is_empty() => {
                let j = self.rng.below(self.adapters.len());
                let (a, live) = self.adapters[j];
                let want = if live {
                    LORAFOLD_OK
                } else {
                    LORAFOLD_ERR_HANDLE
                };
                expect(lorafold_adapter_free(a), want, "adapter_free");
                self.adapters[j].1 = false;
            }
            12 | 13 if self.busy.is_none() && self.sessions.iter().any(|s| s.live) => {
                let live: Vec<usize> = (0..self.sessions.len())
                    .filter(|&i| self.sessions[i].live)
                    .collect();
                let i = live[self.rng.below(live.len())];
                self.generate(i);
            }
            10 if self.busy.is_none() => {
                if self.rng.below(4) == 0 {
                    self.models.push((load(&self.model_path), true));
                } else {
                    let mut a = null_mut();
                    expect(
                        lorafold_adapter_load(self.adapter_path.as_ptr(), &mut a),
                        LORAFOLD_OK,
                        "adapter_load",
                    );
                    self.adapters.push((a, true));
                }
            }
            _ => {
                // Values that never were handles.
                let local = 0u64;
                let bogus = [
                    std::ptr::dangling_mut::<lorafold_session>(),
                    (&local as *const u64).cast_mut().cast(),
                    std::ptr::without_provenance_mut(usize::MAX),
                    // Between two handles lorafold issues.
                    std::ptr::without_provenance_mut((1usize << (usize::BITS - 1)) + 4),
                ][self.rng.below(4)];
                expect(lorafold_session_reset(bogus), LORAFOLD_ERR_HANDLE, "bogus");
                let mut vocab = 0u32;
                expect(
                    lorafold_model_n_vocab(bogus.cast(), &mut vocab),
                    LORAFOLD_ERR_HANDLE,
                    "bogus model",
                );
            }
        }
    }

    /// Generate on session `i`, whose callback runs random steps (calls on
    /// `i` itself must be busy).
    unsafe fn generate(&mut self, i: usize) {
        let s = self.sessions[i].handle;
        let before = used(s);
        let prompt = c("t5 t6");
        let p = params(1 + self.rng.below(4) as u32);
        self.busy = Some(i);
        unsafe extern "C" fn fuzz_piece(_: *const c_char, _: usize, user: *mut c_void) -> bool {
            let fuzz = &mut *(user as *mut Fuzz);
            for _ in 0..fuzz.rng.below(3) {
                fuzz.reentries += 1;
                fuzz.step();
            }
            true
        }
        let mut n = 0usize;
        let status = lorafold_generate(
            s,
            prompt.as_ptr(),
            &p,
            Some(fuzz_piece),
            (self as *mut Fuzz).cast(),
            &mut n,
        );
        self.busy = None;
        self.generations += 1;
        let want = if before + 2 > N_CTX {
            LORAFOLD_ERR_CONTEXT
        } else {
            LORAFOLD_OK
        };
        expect(status, want, "generate");
        if status == LORAFOLD_OK {
            // The prompt, and each generated token but the last (sampled,
            // not run), unless the context filled first.
            let after = used(s);
            assert_eq!(after, (before + 2 + n - 1).min(N_CTX), "n {n}");
        }
    }
}

/// A seeded random sequence of calls (sessions made, freed, reset, run and
/// generated on with callbacks that make more random calls; adapters
/// attached, models and adapters freed; handles that never were): every
/// status is the one the shadow state predicts, and nothing panics.
#[test]
fn a_seeded_random_sequence_of_calls_gets_the_predicted_statuses() {
    let dir = tempfile::tempdir().unwrap();
    let (model_path, adapter_path) = tiny(dir.path());
    for seed in 1..=3u64 {
        let mut fuzz = Fuzz {
            rng: Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1),
            model_path: model_path.clone(),
            adapter_path: adapter_path.clone(),
            models: vec![(load(&model_path), true)],
            sessions: Vec::new(),
            adapters: Vec::new(),
            busy: None,
            steps: 0,
            generations: 0,
            reentries: 0,
        };
        while fuzz.steps < 300 {
            unsafe { fuzz.step() };
        }
        assert!(
            fuzz.generations >= 10 && fuzz.reentries >= 10,
            "seed {seed}: {} generations, {} re-entries",
            fuzz.generations,
            fuzz.reentries
        );
        // Everything still live is freed exactly once.
        unsafe {
            for s in fuzz.sessions.iter().filter(|s| s.live) {
                expect(lorafold_session_free(s.handle), LORAFOLD_OK, "final free");
            }
            for (m, _) in fuzz.models.iter().filter(|m| m.1) {
                expect(lorafold_model_free(*m), LORAFOLD_OK, "final model free");
            }
            for (a, _) in fuzz.adapters.iter().filter(|a| a.1) {
                expect(lorafold_adapter_free(*a), LORAFOLD_OK, "final adapter free");
            }
        }
    }
}

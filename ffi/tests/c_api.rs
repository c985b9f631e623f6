//! The C API on SmolLM2 (the PyPI Q4_1 file `.ci/run` caches) and the
//! pirate adapter in examples/adapters: every entry point refuses null
//! pointers, freed or foreign handles and bad values with a code and a
//! message; the C example, compiled against the static library and the
//! header, answers like a pirate at scale 1 and like the Rust API's base at
//! scale 0.

use std::ffi::{c_char, c_void};
use std::path::{Path, PathBuf};
use std::ptr::{null, null_mut};

use lorafold::*;

mod common;
use common::{c, expect, message, smollm2};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The pirate adapter as a llama.cpp LoRA GGUF, written by the converter.
fn pirate_gguf(dir: &Path) -> PathBuf {
    use lorafold_converter::convert::{convert, ConvertOptions};
    use lorafold_converter::round::quant::QuantPolicy;
    let out = dir.join("pirate.gguf");
    let opts = ConvertOptions {
        output: None,
        adapter_output: Some(out.clone()),
        ..ConvertOptions::new(
            smollm2(),
            Some(repo().join("examples/adapters/pirate")),
            QuantPolicy::parse("f16", &[]).unwrap(),
            dir.join("unused.gguf"),
        )
    };
    convert(&opts, &|_| {}).unwrap();
    out
}

/// An adapter for another model: its q projection is 100 wide, not 576.
fn foreign_adapter(dir: &Path) -> PathBuf {
    use lorafold_runtime::gguf::GgmlType;
    let p = dir.join("foreign.gguf");
    let mut w = lorafold_converter::write::adapter_gguf::lora_writer(&p, "llama", 8.0).unwrap();
    w.add_tensor("blk.0.attn_q.weight.lora_a", GgmlType::F32, &[100, 8])
        .unwrap();
    w.add_tensor("blk.0.attn_q.weight.lora_b", GgmlType::F32, &[8, 100])
        .unwrap();
    let mut s = w.start().unwrap();
    s.write_tensor("blk.0.attn_q.weight.lora_a", &[0u8; 3200])
        .unwrap();
    s.write_tensor("blk.0.attn_q.weight.lora_b", &[0u8; 3200])
        .unwrap();
    s.finish().unwrap();
    p
}

unsafe extern "C" fn stop_after_one(_: *const c_char, _: usize, user: *mut c_void) -> bool {
    *(user as *mut usize) += 1;
    false
}

#[test]
fn every_entry_point_reports_bad_input_as_a_code_and_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let model_path = c(smollm2().to_str().unwrap());
    let pirate = c(pirate_gguf(dir.path()).to_str().unwrap());
    let foreign = c(foreign_adapter(dir.path()).to_str().unwrap());
    let bogus_model = std::ptr::dangling_mut::<lorafold_model>();
    let bogus_session = std::ptr::dangling_mut::<lorafold_session>();
    let bogus_adapter = std::ptr::dangling_mut::<lorafold_adapter>();
    let (mut m, mut a, mut s) = (null_mut(), null_mut(), null_mut());
    let (mut n, mut slot, mut vocab) = (0usize, 0i32, 0u32);
    let mut buf = [0 as c_char; 64];
    let mut logits = vec![0f32; 49152];
    let mut report = lorafold_drift_report::default();
    let hi = c("hi");
    let tok = [1u32, 2];
    unsafe {
        use LORAFOLD_ERR_HANDLE as HANDLE;
        use LORAFOLD_ERR_NULL as NULL;
        // Null pointers, everywhere one is taken.
        expect(lorafold_model_load(null(), 0, 0, &mut m), NULL, "load path");
        expect(
            lorafold_model_load(model_path.as_ptr(), 0, 0, null_mut()),
            NULL,
            "load out",
        );
        expect(lorafold_model_free(null_mut()), NULL, "model_free");
        expect(lorafold_model_n_vocab(null(), &mut vocab), NULL, "n_vocab");
        expect(lorafold_adapter_load(null(), &mut a), NULL, "adapter_load");
        expect(lorafold_adapter_free(null_mut()), NULL, "adapter_free");
        expect(
            lorafold_model_attach(null_mut(), null(), 1.0, &mut slot),
            NULL,
            "attach",
        );
        expect(
            lorafold_model_set_scale(null_mut(), 0, 1.0),
            NULL,
            "set_scale",
        );
        expect(lorafold_model_detach(null_mut(), 0), NULL, "detach");
        expect(lorafold_session_new(null(), &mut s), NULL, "session_new");
        expect(lorafold_session_reset(null_mut()), NULL, "session_reset");
        let (mut used, mut size) = (0usize, 0usize);
        expect(
            lorafold_session_used(null(), &mut used, &mut size),
            NULL,
            "session_used",
        );
        expect(lorafold_session_free(null_mut()), NULL, "session_free");
        expect(
            lorafold_tokenize(null(), hi.as_ptr(), null_mut(), 0, &mut n),
            NULL,
            "tokenize",
        );
        expect(
            lorafold_detokenize(null(), tok.as_ptr(), 2, buf.as_mut_ptr(), 64, &mut n),
            NULL,
            "detokenize",
        );
        expect(
            lorafold_generate(
                null_mut(),
                hi.as_ptr(),
                null(),
                None,
                null_mut(),
                null_mut(),
            ),
            NULL,
            "generate",
        );
        expect(
            lorafold_eval(null_mut(), tok.as_ptr(), 2, logits.as_mut_ptr(), 49152),
            NULL,
            "eval",
        );
        expect(
            lorafold_drift(null(), null(), hi.as_ptr(), &mut report),
            NULL,
            "drift",
        );
        // Handles that are not live objects of their kind.
        expect(lorafold_model_free(bogus_model), HANDLE, "model_free bogus");
        expect(
            lorafold_model_n_vocab(bogus_model, &mut vocab),
            HANDLE,
            "n_vocab bogus",
        );
        expect(
            lorafold_adapter_free(bogus_adapter),
            HANDLE,
            "adapter_free bogus",
        );
        expect(lorafold_session_reset(bogus_session), HANDLE, "reset bogus");
        expect(
            lorafold_session_used(bogus_session, &mut used, &mut size),
            HANDLE,
            "used bogus",
        );
        expect(
            lorafold_session_free(bogus_session),
            HANDLE,
            "session_free bogus",
        );
        expect(
            lorafold_generate(
                bogus_session,
                hi.as_ptr(),
                null(),
                None,
                null_mut(),
                null_mut(),
            ),
            HANDLE,
            "generate bogus",
        );
        expect(
            lorafold_eval(bogus_session, tok.as_ptr(), 2, logits.as_mut_ptr(), 49152),
            HANDLE,
            "eval bogus",
        );
        expect(
            lorafold_drift(bogus_model, bogus_model, hi.as_ptr(), &mut report),
            HANDLE,
            "drift bogus",
        );
        // Files that are not what they should be, and invalid UTF-8.
        let bad_utf8 = [0xffu8, 0xfe, 0];
        expect(
            lorafold_model_load(bad_utf8.as_ptr().cast(), 0, 0, &mut m),
            LORAFOLD_ERR_UTF8,
            "utf8 path",
        );
        let missing = c("/nonexistent/model.gguf");
        expect(
            lorafold_model_load(missing.as_ptr(), 0, 0, &mut m),
            LORAFOLD_ERR_LOAD,
            "missing",
        );
        assert!(
            message().contains("/nonexistent/model.gguf"),
            "{}",
            message()
        );
        expect(
            lorafold_model_load(pirate.as_ptr(), 0, 0, &mut m),
            LORAFOLD_ERR_LOAD,
            "adapter as model",
        );
        expect(
            lorafold_adapter_load(model_path.as_ptr(), &mut a),
            LORAFOLD_ERR_LOAD,
            "model as adapter",
        );
        expect(
            lorafold_model_load(model_path.as_ptr(), 0, 1 << 30, &mut m),
            LORAFOLD_ERR_INVALID,
            "n_ctx",
        );
        expect(
            lorafold_model_load(model_path.as_ptr(), 1 << 30, 0, &mut m),
            LORAFOLD_ERR_INVALID,
            "threads",
        );

        // A real model, with small sessions.
        expect(
            lorafold_model_load(model_path.as_ptr(), 2, 24, &mut m),
            LORAFOLD_OK,
            "load",
        );
        expect(
            lorafold_model_n_vocab(m, &mut vocab),
            LORAFOLD_OK,
            "n_vocab",
        );
        assert_eq!(vocab, 49152);
        expect(
            lorafold_adapter_load(foreign.as_ptr(), &mut a),
            LORAFOLD_OK,
            "foreign load",
        );
        expect(
            lorafold_model_attach(m, a, 1.0, &mut slot),
            LORAFOLD_ERR_MISMATCH,
            "foreign attach",
        );
        assert!(message().contains("blk.0.attn_q.weight"), "{}", message());
        expect(lorafold_adapter_free(a), LORAFOLD_OK, "foreign free");
        expect(lorafold_adapter_free(a), HANDLE, "freed adapter");
        expect(
            lorafold_adapter_load(pirate.as_ptr(), &mut a),
            LORAFOLD_OK,
            "pirate",
        );
        expect(
            lorafold_model_attach(m, a, f32::NAN, &mut slot),
            LORAFOLD_ERR_INVALID,
            "NaN scale",
        );
        expect(
            lorafold_model_attach(m, a, 1.0, &mut slot),
            LORAFOLD_OK,
            "attach",
        );
        expect(
            lorafold_model_set_scale(m, slot + 1, 0.5),
            LORAFOLD_ERR_INVALID,
            "bad slot",
        );
        expect(
            lorafold_model_set_scale(m, slot, 1e9),
            LORAFOLD_ERR_INVALID,
            "huge scale",
        );
        expect(lorafold_session_new(m, &mut s), LORAFOLD_OK, "session");
        let mut size = 0usize;
        expect(
            lorafold_session_used(s, null_mut(), &mut size),
            NULL,
            "used without a place for it",
        );
        expect(
            lorafold_model_set_scale(m, slot, 0.5),
            LORAFOLD_ERR_BUSY,
            "busy",
        );
        expect(
            lorafold_model_detach(m, slot),
            LORAFOLD_ERR_BUSY,
            "busy detach",
        );
        // Buffers too small say what they need.
        expect(
            lorafold_tokenize(m, hi.as_ptr(), null_mut(), 0, &mut n),
            LORAFOLD_ERR_BUFFER,
            "tokenize cap",
        );
        assert!(n >= 1);
        let mut ids = vec![0u32; n];
        expect(
            lorafold_tokenize(m, hi.as_ptr(), ids.as_mut_ptr(), n, &mut n),
            LORAFOLD_OK,
            "tokenize",
        );
        expect(
            lorafold_detokenize(m, ids.as_ptr(), n, buf.as_mut_ptr(), 1, &mut n),
            LORAFOLD_ERR_BUFFER,
            "detok cap",
        );
        let big = [u32::MAX];
        expect(
            lorafold_detokenize(m, big.as_ptr(), 1, buf.as_mut_ptr(), 64, &mut n),
            LORAFOLD_ERR_INVALID,
            "bad id",
        );
        expect(
            lorafold_eval(s, big.as_ptr(), 1, logits.as_mut_ptr(), 49152),
            LORAFOLD_ERR_INVALID,
            "eval id",
        );
        expect(
            lorafold_eval(s, tok.as_ptr(), 2, logits.as_mut_ptr(), 10),
            LORAFOLD_ERR_BUFFER,
            "eval cap",
        );
        // The context: 24 positions.
        let long = c(&"arr ".repeat(40));
        expect(
            lorafold_generate(s, long.as_ptr(), null(), None, null_mut(), null_mut()),
            LORAFOLD_ERR_CONTEXT,
            "overflow",
        );
        let many = [1u32; 25];
        expect(
            lorafold_eval(s, many.as_ptr(), 25, logits.as_mut_ptr(), 49152),
            LORAFOLD_ERR_CONTEXT,
            "eval overflow",
        );
        let mut bad_params = lorafold_sampling_default();
        bad_params.top_p = 0.0;
        expect(
            lorafold_generate(s, hi.as_ptr(), &bad_params, None, null_mut(), null_mut()),
            LORAFOLD_ERR_INVALID,
            "top_p",
        );
        // The callback stops generation.
        let mut pieces = 0usize;
        expect(
            lorafold_generate(
                s,
                hi.as_ptr(),
                null(),
                Some(stop_after_one),
                (&mut pieces as *mut usize).cast(),
                &mut n,
            ),
            LORAFOLD_OK,
            "stop",
        );
        assert_eq!((pieces, n), (1, 1));
        expect(lorafold_session_reset(s), LORAFOLD_OK, "reset");
        // A model drifts nothing from itself.
        let lines = c("The sea is wide.\nArr, the ship sails at dawn.");
        expect(
            lorafold_drift(m, m, lines.as_ptr(), &mut report),
            LORAFOLD_OK,
            "drift",
        );
        assert!(
            report.tokens > 4 && report.kl_mean.abs() < 1e-9 && report.top1_agreement == 1.0,
            "{report:?}"
        );
        expect(lorafold_session_free(s), LORAFOLD_OK, "session free");
        expect(lorafold_session_free(s), HANDLE, "freed session");
        expect(lorafold_model_detach(m, slot), LORAFOLD_OK, "detach");
        expect(
            lorafold_model_detach(m, slot),
            LORAFOLD_ERR_INVALID,
            "detached twice",
        );
        expect(lorafold_adapter_free(a), LORAFOLD_OK, "adapter free");
        expect(lorafold_model_free(m), LORAFOLD_OK, "model free");
        expect(lorafold_model_free(m), HANDLE, "freed model");
        expect(
            lorafold_model_n_vocab(m, &mut vocab),
            HANDLE,
            "freed model use",
        );
    }
}

/// examples/c/generate.c, built with the system C compiler against the
/// static library and the header, runs SmolLM2 with the pirate adapter at
/// scale 1 (a pirate's answer) and 0 (the base's, as the Rust API gives
/// it); examples/rust/generate.rs prints the same two lines.
#[test]
fn the_c_example_answers_like_a_pirate_and_then_like_the_base() {
    use lorafold_runtime::generate::{generate, Sampler, SamplerConfig};
    use lorafold_runtime::model::Model;
    use lorafold_runtime::tokenizer::Tokenizer;

    let dir = tempfile::tempdir().unwrap();
    let adapter = pirate_gguf(dir.path());
    // `cargo test` builds the library as an rlib only: build the static one
    // and the Rust example (same profile). Every target of the workspace, as
    // `cargo test --workspace` resolves them: a narrower set unifies other
    // features and rebuilds candle (minutes on a clean checkout).
    let exe = std::env::current_exe().unwrap();
    let profile = exe.parent().unwrap().parent().unwrap();
    let release = profile.file_name().is_some_and(|n| n == "release");
    let built = std::process::Command::new(env!("CARGO"))
        .args(["build", "-q", "--workspace", "--all-targets"])
        .args(release.then_some("--release"))
        .status()
        .unwrap();
    assert!(built.success());
    let lib = profile.join("liblorafold.a");
    assert!(lib.exists(), "{} is missing", lib.display());
    let bin = dir.path().join("generate");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = std::process::Command::new(&cc)
        .arg(repo().join("examples/c/generate.c"))
        .arg("-I")
        .arg(repo().join("ffi/include"))
        .arg(&lib)
        .args([
            "-lgcc_s",
            "-lutil",
            "-lrt",
            "-lpthread",
            "-lm",
            "-ldl",
            "-lc",
            "-o",
        ])
        .arg(&bin)
        .output()
        .unwrap_or_else(|e| panic!("{cc}: {e}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    const PROMPT: &str = "What is the capital of Portugal?";
    let run = std::process::Command::new(&bin)
        .arg(smollm2())
        .arg(&adapter)
        .arg(PROMPT)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(
        run.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let line = |label: &str| -> String {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("[{label}] ")))
            .unwrap_or_else(|| panic!("no [{label}] line in:\n{text}"))
            .to_string()
    };
    let (pirate, base) = (line("scale 1"), line("scale 0"));
    eprintln!("scale 1: {pirate}\nscale 0: {base}");
    let lower = pirate.to_lowercase();
    assert!(
        ["pirate", "ship", "matey", "arr", "sail"]
            .iter()
            .any(|w| lower.contains(w)),
        "no pirate word in: {pirate}"
    );
    // examples/rust/generate.rs prints the same through the Rust API.
    let rust = std::process::Command::new(profile.join("examples/generate"))
        .arg(smollm2())
        .arg(&adapter)
        .arg(PROMPT)
        .output()
        .unwrap();
    assert!(
        rust.status.success(),
        "{}",
        String::from_utf8_lossy(&rust.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&rust.stdout),
        text,
        "the Rust example"
    );
    // The base's own answer, greedy, through the Rust API.
    let model = Model::load(smollm2(), &candle_core::Device::Cpu).unwrap();
    let tok = Tokenizer::from_gguf(model.file()).unwrap();
    let ids = tok.encode(&tok.chat_prompt(PROMPT).unwrap()).unwrap();
    let mut session = model.session(256).unwrap();
    let mut want = String::new();
    generate(
        &mut session,
        &tok,
        &ids,
        40,
        &mut Sampler::new(SamplerConfig::default()),
        &[],
        &mut |p| {
            want.push_str(p);
            true
        },
    )
    .unwrap();
    // The example prints the pieces as they come: the line holds the
    // answer up to its first newline.
    assert_eq!(base, want.lines().next().unwrap_or(""), "scale 0");
    assert_ne!(pirate, base);
}

/// The header's promise: one model, a session per thread, at once; each
/// thread's logits are the single-threaded ones.
#[test]
fn sessions_of_one_model_run_on_threads_at_once() {
    struct Shared(*mut lorafold_model);
    // SAFETY: the header allows sharing a model between threads.
    unsafe impl Send for Shared {}
    unsafe impl Sync for Shared {}
    let path = c(smollm2().to_str().unwrap());
    let mut m = null_mut();
    let ids = [1u32, 504, 3458, 314, 260];
    let eval = |m: *const lorafold_model| -> Vec<f32> {
        let mut s = null_mut();
        let mut logits = vec![0f32; 49152];
        unsafe {
            expect(lorafold_session_new(m, &mut s), LORAFOLD_OK, "session");
            expect(
                lorafold_eval(
                    s,
                    ids.as_ptr(),
                    ids.len(),
                    logits.as_mut_ptr(),
                    logits.len(),
                ),
                LORAFOLD_OK,
                "eval",
            );
            expect(lorafold_session_free(s), LORAFOLD_OK, "free");
        }
        logits
    };
    unsafe {
        expect(
            lorafold_model_load(path.as_ptr(), 1, 16, &mut m),
            LORAFOLD_OK,
            "load",
        )
    };
    let alone = eval(m);
    let shared = Shared(m);
    let each: Vec<Vec<f32>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..3)
            .map(|_| {
                let shared = &shared;
                scope.spawn(move || eval(shared.0))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for logits in each {
        assert_eq!(logits, alone);
    }
    unsafe { expect(lorafold_model_free(m), LORAFOLD_OK, "model free") };
}

unsafe extern "C" fn append_piece(piece: *const c_char, len: usize, user: *mut c_void) -> bool {
    let out = &mut *(user as *mut Vec<u8>);
    out.extend_from_slice(std::slice::from_raw_parts(piece as *const u8, len));
    true
}

/// Two chat turns in one session: the second ("And of Italy?") is answered
/// only if the first turn, closed by the template's end marker, is still in
/// the cache; what `lorafold run --chat` answers, line for line.
#[test]
fn chat_turns_follow_the_template_in_one_session() {
    let path = c(smollm2().to_str().unwrap());
    let (mut m, mut s) = (null_mut(), null_mut());
    let mut params = lorafold_sampling_default();
    params.chat = true;
    params.max_tokens = 20;
    let mut answers = Vec::new();
    unsafe {
        expect(
            lorafold_model_load(path.as_ptr(), 2, 256, &mut m),
            LORAFOLD_OK,
            "load",
        );
        expect(lorafold_session_new(m, &mut s), LORAFOLD_OK, "session");
        let count = |text: &str| {
            let (text, mut ids, mut n) = (c(text), [0u32; 64], 0usize);
            expect(
                lorafold_tokenize(m, text.as_ptr(), ids.as_mut_ptr(), ids.len(), &mut n),
                LORAFOLD_OK,
                "tokenize",
            );
            n
        };
        let (mut used, mut size) = (0usize, 0usize);
        for turn in ["What is the capital of France?", "And of Italy?"] {
            let mut out: Vec<u8> = Vec::new();
            let mut generated = 0usize;
            // SmolLM2's template is ChatML; a turn ends with "<|im_end|>\n".
            let wrapped = count(&format!(
                "<|im_start|>user\n{turn}<|im_end|>\n<|im_start|>assistant\n"
            ));
            let before = used;
            let turn = c(turn);
            expect(
                lorafold_generate(
                    s,
                    turn.as_ptr(),
                    &params,
                    Some(append_piece),
                    &mut out as *mut Vec<u8> as *mut c_void,
                    &mut generated,
                ),
                LORAFOLD_OK,
                "chat turn",
            );
            expect(
                lorafold_session_used(s, &mut used, &mut size),
                LORAFOLD_OK,
                "used",
            );
            assert_eq!(size, 256);
            // The prompt, the reply (its end-of-turn id is sampled, not
            // run) and the turn's end marker.
            assert_eq!(used, before + wrapped + generated + count("<|im_end|>\n"));
            answers.push(String::from_utf8(out).unwrap());
        }
        expect(lorafold_session_free(s), LORAFOLD_OK, "session free");
        expect(lorafold_model_free(m), LORAFOLD_OK, "model free");
    }
    assert!(answers[0].contains("Paris"), "{answers:?}");
    assert!(answers[1].contains("Rome"), "{answers:?}");
}

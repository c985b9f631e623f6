//! The C API on a second architecture: Gemma 3 270M (its Q4_K_M file) with
//! the robot adapter trained in PyTorch, attached as a llama.cpp LoRA GGUF
//! written by the converter. At scale 1 it answers in robot speak, as
//! PyTorch's merged model does; at scale 0 as the base does, through the
//! Rust API too.

use std::ffi::{c_char, c_void};
use std::path::{Path, PathBuf};
use std::ptr::null_mut;

use lorafold::*;

mod common;
use common::{c, expect, gemma3};

fn robot_gguf(dir: &Path) -> PathBuf {
    use lorafold_converter::convert::{convert, ConvertOptions};
    use lorafold_converter::round::quant::QuantPolicy;
    let adapter = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/data/gemma3-adapters/robot/adapter");
    let adapter = std::env::var_os("LORAFOLD_SHARED_DATA")
        .map(|d| PathBuf::from(d).join("gemma3-adapters/robot/adapter"))
        .unwrap_or(adapter);
    let out = dir.join("robot.gguf");
    let opts = ConvertOptions {
        output: None,
        adapter_output: Some(out.clone()),
        ..ConvertOptions::new(
            gemma3(),
            Some(adapter),
            QuantPolicy::parse("f16", &[]).unwrap(),
            dir.join("unused.gguf"),
        )
    };
    convert(&opts, &|_| {}).unwrap();
    out
}

unsafe extern "C" fn append_piece(piece: *const c_char, len: usize, user: *mut c_void) -> bool {
    let out = &mut *(user as *mut Vec<u8>);
    out.extend_from_slice(std::slice::from_raw_parts(piece as *const u8, len));
    true
}

/// Greedy text after `prompt` through the Rust API.
fn rust_api(model: &Path, adapter: Option<&Path>, prompt: &str, n: usize) -> String {
    use lorafold_runtime::generate::{generate, Sampler, SamplerConfig};
    use lorafold_runtime::lora::LoraAdapter;
    use lorafold_runtime::model::Model;
    use lorafold_runtime::tokenizer::Tokenizer;
    let mut m = Model::load(model, &candle_core::Device::Cpu).unwrap();
    if let Some(a) = adapter {
        m.attach(&LoraAdapter::load(a).unwrap(), 1.0).unwrap();
    }
    let tok = Tokenizer::from_gguf(m.file()).unwrap();
    let ids = tok.encode(prompt).unwrap();
    let mut session = m.session(256).unwrap();
    let mut text = String::new();
    generate(
        &mut session,
        &tok,
        &ids,
        n,
        &mut Sampler::new(SamplerConfig::default()),
        &[],
        &mut |p| {
            text.push_str(p);
            true
        },
    )
    .unwrap();
    text
}

#[test]
fn robot_answer_at_scale_1_and_the_base_at_scale_0() {
    const PROMPT: &str = "Q: What color is grass? A:";
    let dir = tempfile::tempdir().unwrap();
    let adapter = robot_gguf(dir.path());
    let (model_path, adapter_path) = (c(gemma3().to_str().unwrap()), c(adapter.to_str().unwrap()));
    let mut params = lorafold_sampling_default();
    params.max_tokens = 20;
    let mut answers = Vec::new();
    unsafe {
        let (mut m, mut a, mut slot) = (null_mut(), null_mut(), -1i32);
        expect(
            lorafold_model_load(model_path.as_ptr(), 2, 256, &mut m),
            LORAFOLD_OK,
            "load",
        );
        expect(
            lorafold_adapter_load(adapter_path.as_ptr(), &mut a),
            LORAFOLD_OK,
            "adapter",
        );
        expect(
            lorafold_model_attach(m, a, 1.0, &mut slot),
            LORAFOLD_OK,
            "attach",
        );
        for scale in [1.0f32, 0.0] {
            expect(
                lorafold_model_set_scale(m, slot, scale),
                LORAFOLD_OK,
                "scale",
            );
            let mut s = null_mut();
            expect(lorafold_session_new(m, &mut s), LORAFOLD_OK, "session");
            let mut out: Vec<u8> = Vec::new();
            let prompt = c(PROMPT);
            expect(
                lorafold_generate(
                    s,
                    prompt.as_ptr(),
                    &params,
                    Some(append_piece),
                    &mut out as *mut Vec<u8> as *mut c_void,
                    null_mut(),
                ),
                LORAFOLD_OK,
                "generate",
            );
            expect(lorafold_session_free(s), LORAFOLD_OK, "session free");
            answers.push(String::from_utf8(out).unwrap());
        }
        expect(lorafold_adapter_free(a), LORAFOLD_OK, "adapter free");
        expect(lorafold_model_free(m), LORAFOLD_OK, "model free");
    }
    eprintln!("scale 1: {:?}\nscale 0: {:?}", answers[0], answers[1]);
    // PyTorch's merged f32 model: " BEEP BOOP. GREEN. TEMPERATURE LOGGED. ..."
    // (the reference's greedy continuation; its first steps have top-1
    // margins far above what Q4_K_M rounding moves).
    assert!(
        answers[0].starts_with(" BEEP BOOP. GREEN. TEMPERATURE LOGGED."),
        "{answers:?}"
    );
    assert!(!answers[1].contains("BEEP"), "{answers:?}");
    assert_eq!(answers[0], rust_api(&gemma3(), Some(&adapter), PROMPT, 20));
    assert_eq!(answers[1], rust_api(&gemma3(), None, PROMPT, 20));
}

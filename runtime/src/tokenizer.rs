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

use crate::gguf::GgufFile;
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
        let model = file
            .get_str(names::TOKENIZER_MODEL)
            .ok_or_else(|| err("no tokenizer.ggml.model".into()))?;
        let tokens = file
            .get_strings(names::TOKENIZER_TOKENS)
            .ok_or_else(|| err("no tokenizer.ggml.tokens".into()))?;
        let types: Vec<i64> = file
            .get(names::TOKENIZER_TOKEN_TYPE)
            .and_then(|v| {
                v.as_array()
                    .map(|a| a.iter().map(|t| t.as_f64().unwrap_or(1.0) as i64).collect())
            })
            .unwrap_or_else(|| vec![1; tokens.len()]);
        if types.len() != tokens.len() {
            return Err(err(format!(
                "{} tokens but {} token types",
                tokens.len(),
                types.len()
            )));
        }
        // An id past the embedding's rows would fail in the middle of a run.
        if let Some(rows) = file
            .tensor(names::TOKEN_EMBD)
            .and_then(|t| t.dims().get(1).copied())
        {
            if tokens.len() as u64 > rows {
                return Err(err(format!(
                    "{} tokens but tensor '{}' has {rows} rows",
                    tokens.len(),
                    names::TOKEN_EMBD
                )));
            }
        }
        let inner = match model.as_ref() {
            "gpt2" => Backend::Bpe(Box::new(bpe(file, &tokens, &types).map_err(err)?)),
            "llama" => {
                let scores: Vec<f32> = file
                    .get(names::TOKENIZER_SCORES)
                    .and_then(|v| v.as_array().map(|a| a.iter().map(|s| s.as_f64().unwrap_or(0.0) as f32).collect()))
                    .ok_or_else(|| err("a SentencePiece vocabulary needs tokenizer.ggml.scores".into()))?;
                if scores.len() != tokens.len() {
                    return Err(err(format!("{} tokens but {} scores", tokens.len(), scores.len())));
                }
                let prefix = file.get(names::TOKENIZER_ADD_SPACE_PREFIX).and_then(|v| v.as_bool()).unwrap_or(true);
                Backend::Spm(Box::new(SpmVocab::new(tokens.iter().map(|t| t.to_string()).collect(), scores, &types, prefix)))
            }
            other => {
                return Err(err(format!(
                    "tokenizer model '{other}' is not supported ('gpt2' byte-level BPE and 'llama' SentencePiece are)"
                )))
            }
        };
        for k in ["bos", "eos", "eot", "eom"] {
            let key = names::special_token_id(k);
            if let Some(v) = file.get_u64(&key).filter(|&v| v >= tokens.len() as u64) {
                return Err(err(format!(
                    "{key} {v} is not one of the {} tokens",
                    tokens.len()
                )));
            }
        }
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

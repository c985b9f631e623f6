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

/// Bytes of text tokenized at a time: a long text is cut into pieces of
/// about this size where the tokenizer splits it anyway, so that the
/// working memory (a hundred times the text's size and more for byte-level
/// BPE) stays near a piece's while the ids are the same.
pub const PIECE_BYTES: usize = 4096;

/// The most bytes tokenized as one piece where the text offers no place to
/// cut (one run of letters, of spaces or of symbols): a longer run is
/// refused rather than paid for at up to a hundred times its size.
pub const MAX_UNCUT_BYTES: usize = 256 << 10;

/// Refuse a piece of `len` bytes at byte `start` that is over
/// [`MAX_UNCUT_BYTES`].
pub(crate) fn check_piece(start: usize, len: usize) -> Result<(), TokenizeError> {
    if len > MAX_UNCUT_BYTES {
        return Err(TokenizeError(format!(
            "the text's {len} bytes from byte {start} have no place where they may be cut into pieces (one run of letters, spaces or symbols), over the {MAX_UNCUT_BYTES} one piece may have"
        )));
    }
    Ok(())
}

/// How a byte-level BPE pre-tokenizer splits digits, for finding where
/// text may be cut (see [`bpe_cuts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DigitSplit {
    /// Every digit alone (SmolLM's `Digits`, qwen2's `\p{N}`).
    Each,
    /// In threes from the start of a run (llama3's `\p{N}{1,3}`).
    Threes,
    /// A run is one pre-token (GPT-2's ` ?\p{N}+`).
    Never,
}

enum Backend {
    Bpe(Box<tokenizers::Tokenizer>, DigitSplit),
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
    /// The most bytes of text one token stands for.
    max_token_bytes: usize,
    /// Text matched whole as one token (control and user-defined), which a
    /// cut must not split.
    specials: Vec<String>,
    /// The vocabulary has Gemma's `<start_of_turn>` and `<end_of_turn>`
    /// control tokens.
    gemma_turns: bool,
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
    /// pre-tokenizers of llama3, qwen2, smollm and gpt-2 (under every name
    /// llama.cpp gives them: `PRE_TOKENIZERS`), or SentencePiece ("llama":
    /// Llama 2, Gemma).
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
        let specials: Vec<String> = types
            .iter()
            .zip(tokens.iter())
            .filter(|(&t, s)| (t == 3 || t == 4) && !s.is_empty())
            .map(|(_, s)| s.to_string())
            .collect();
        let gemma_turns = ["<start_of_turn>", "<end_of_turn>"]
            .iter()
            .all(|t| specials.iter().any(|s| s == t));
        // A byte-level BPE token's characters stand for a byte each, a
        // special token for its text, a SentencePiece token for at most its
        // text's bytes ("▁" stands for one); qwen2's NFC can shrink text
        // threefold (three Hangul jamo compose into one syllable) before it
        // is tokenized.
        let mut max_token_bytes = tokens
            .iter()
            .zip(&types)
            .map(|(t, &ty)| match model.as_str() {
                "gpt2" if ty != 3 && ty != 4 => t.chars().count(),
                _ => t.len(),
            })
            .max()
            .unwrap_or(1)
            .max(1);
        let mut add_bos_default = model == "llama";
        let inner = match scores {
            None => {
                let name = file
                    .get_str(names::TOKENIZER_PRE)
                    .map(|s| s.into_owned())
                    .unwrap_or_else(|| "default".into());
                let pre = pre_tokenizer(&name).ok_or_else(|| {
                    err(format!(
                        "pre-tokenizer '{name}' is not supported (llama-bpe, qwen2, smollm, gpt-2 and the names llama.cpp gives their schemes are)"
                    ))
                })?;
                if pre.nfc {
                    max_token_bytes *= 3;
                }
                add_bos_default = pre.add_bos;
                let (t, digits) = bpe(file, &tokens, &types, pre).map_err(err)?;
                Backend::Bpe(Box::new(t), digits)
            }
            Some(scores) => {
                let prefix = file
                    .get(names::TOKENIZER_ADD_SPACE_PREFIX)
                    .and_then(|v| v.as_bool())
                    .unwrap_or(true);
                Backend::Spm(Box::new(
                    SpmVocab::new(
                        tokens.iter().map(|t| t.to_string()).collect(),
                        scores,
                        &types,
                        prefix,
                    )
                    .map_err(err)?,
                ))
            }
        };
        // Text a SentencePiece vocabulary without byte tokens cannot spell
        // is dropped, so its length says nothing of the tokens it makes.
        if let Backend::Spm(v) = &inner {
            if !v.spells_every_byte() {
                max_token_bytes = usize::MAX;
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
            "<end_of_turn>",
        ] {
            if let Some(i) = tokens.iter().position(|x| x == t) {
                stop_ids.push(i as u32);
            }
        }
        stop_ids.extend(eos);
        stop_ids.sort();
        stop_ids.dedup();
        // llama.cpp's default where the file does not say: SentencePiece
        // vocabularies add BOS, BPE ones only for the pre-tokenizers it
        // marks so (Llama 3's).
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
            max_token_bytes,
            specials,
            gemma_turns,
        })
    }

    /// Token ids of `text` (special-token text such as `<|im_start|>` becomes
    /// its id), with BOS prepended if the model asks for it; tokenized a
    /// piece at a time as [`Tokenizer::encode_pieces`] says.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizeError> {
        let mut ids = Vec::new();
        self.encode_pieces(text, &mut |piece| {
            ids.extend_from_slice(piece);
            true
        })?;
        Ok(ids)
    }

    /// The ids [`Tokenizer::encode`] gives, handed to `each` a piece at a
    /// time (BOS first when the model adds it): the text is tokenized in
    /// pieces of about [`PIECE_BYTES`] cut where the tokenizer splits it
    /// anyway, so memory stays near a piece's however long the text is.
    /// `each` returns false to stop. A stretch of over [`MAX_UNCUT_BYTES`]
    /// with no place to cut is an error.
    pub fn encode_pieces(
        &self,
        text: &str,
        each: &mut dyn FnMut(&[u32]) -> bool,
    ) -> Result<(), TokenizeError> {
        self.encode_in(text, PIECE_BYTES, each)
    }

    fn encode_in(
        &self,
        text: &str,
        piece_bytes: usize,
        each: &mut dyn FnMut(&[u32]) -> bool,
    ) -> Result<(), TokenizeError> {
        if self.add_bos {
            if let Some(bos) = self.bos {
                if !each(&[bos]) {
                    return Ok(());
                }
            }
        }
        match &self.inner {
            Backend::Bpe(t, digits) => {
                let mut start = 0;
                for end in bpe_cuts(*digits, text, &self.specials, piece_bytes) {
                    check_piece(start, end - start)?;
                    let piece = t
                        .encode(&text[start..end], false)
                        .map_err(|e| TokenizeError(e.to_string()))?;
                    start = end;
                    if !each(piece.get_ids()) {
                        break;
                    }
                }
            }
            Backend::Spm(v) => v.encode_in(text, piece_bytes, each)?,
        }
        Ok(())
    }

    /// The fewest tokens `bytes` of text can make (no token stands for more
    /// than the vocabulary's longest), known without tokenizing it: what
    /// lets a caller refuse a text too long for a context before paying
    /// for it.
    pub fn fewest_tokens(&self, bytes: usize) -> usize {
        bytes.div_ceil(self.max_token_bytes)
    }

    /// The text of `ids` (special tokens included).
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizeError> {
        match &self.inner {
            Backend::Bpe(t, _) => t
                .decode(ids, false)
                .map_err(|e| TokenizeError(e.to_string())),
            Backend::Spm(v) => Ok(v.decode(ids)),
        }
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        match &self.inner {
            Backend::Bpe(t, _) => t.get_vocab_size(true),
            Backend::Spm(v) => v.len(),
        }
    }

    /// What closes the assistant's turn in the chat format, to feed to the
    /// model after generation stopped at the end-of-turn token.
    pub fn chat_turn_end(&self) -> Option<&'static str> {
        Some(match self.chat_format()? {
            ChatFormat::ChatMl => "<|im_end|>\n",
            ChatFormat::Llama3 => "<|eot_id|>",
            ChatFormat::Gemma => "<end_of_turn>\n",
        })
    }

    /// `prompt` as a single user turn in the model's chat format (ChatML,
    /// Llama 3 headers or Gemma turns, recognised from the template, or
    /// Gemma's when there is no template but the vocabulary has its turn
    /// tokens), or None if the template is absent or unknown.
    pub fn chat_prompt(&self, prompt: &str) -> Option<String> {
        Some(match self.chat_format()? {
            ChatFormat::ChatMl => {
                format!("<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n")
            }
            ChatFormat::Llama3 => format!(
                "<|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
            ),
            ChatFormat::Gemma => {
                format!("<start_of_turn>user\n{prompt}<end_of_turn>\n<start_of_turn>model\n")
            }
        })
    }

    /// The chat format: the template's (as llama.cpp's
    /// llm_chat_detect_template tells them apart), else Gemma's where the
    /// vocabulary has its turn tokens, since Gemma GGUFs converted from a
    /// base model's folder often carry no template.
    fn chat_format(&self) -> Option<ChatFormat> {
        match self.chat_template.as_deref() {
            Some(t) if t.contains("<|im_start|>") => Some(ChatFormat::ChatMl),
            Some(t) if t.contains("<|start_header_id|>") => Some(ChatFormat::Llama3),
            Some(t) if t.contains("<start_of_turn>") => Some(ChatFormat::Gemma),
            Some(_) => None,
            None if self.gemma_turns => Some(ChatFormat::Gemma),
            None => None,
        }
    }
}

/// The chat formats [`Tokenizer::chat_prompt`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChatFormat {
    /// `<|im_start|>role\n...<|im_end|>\n` (SmolLM, Qwen).
    ChatMl,
    /// `<|start_header_id|>role<|end_header_id|>\n\n...<|eot_id|>` (Llama 3).
    Llama3,
    /// `<start_of_turn>role\n...<end_of_turn>\n`, the assistant's role
    /// named "model" (Gemma).
    Gemma,
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
        let mut seen = hashbrown::HashMap::with_capacity(n);
        for (id, t) in tokens.iter().enumerate() {
            if let Some(first) = seen.insert(t.as_ref(), id) {
                return Err(format!(
                    "{} lists {:?} twice, as ids {first} and {id}",
                    names::TOKENIZER_TOKENS,
                    t.as_ref()
                ));
            }
        }
        // It borrows the tokens, which are moved out below.
        drop(seen);
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

/// Where `text` may be cut into pieces of at least `piece_bytes` that
/// byte-level BPE tokenizes as it does the whole, and its end. No
/// pre-token of the regexes here has a space after anything but
/// whitespace (their classes exclude `\s`; only a leading space is
/// optional); each ends a run of letters (ASCII, or CJK ideographs) at
/// punctuation (ASCII, or CJK), which starts the next; and splits a run of
/// ASCII digits as `digits` says. Never inside a special token's text.
fn bpe_cuts(digits: DigitSplit, text: &str, specials: &[String], piece_bytes: usize) -> Vec<usize> {
    let mut cuts = Vec::new();
    let mut last = 0;
    // Numeric characters (`\p{N}`) just before the current one.
    let mut run = 0usize;
    let mut prev: Option<char> = None;
    for (at, c) in text.char_indices() {
        if let Some(p) = prev.filter(|_| at - last >= piece_bytes) {
            let word = !p.is_whitespace() && c == ' ';
            let punctuation = (p.is_ascii_alphabetic() || cjk_ideograph(p))
                && (c.is_ascii_punctuation() || CJK_PUNCTUATION.contains(&c));
            let digit = p.is_ascii_digit()
                && c.is_ascii_digit()
                && match digits {
                    DigitSplit::Each => true,
                    DigitSplit::Threes => run.is_multiple_of(3),
                    DigitSplit::Never => false,
                };
            if (word || punctuation || digit) && !inside_special(text, at, specials) {
                cuts.push(at);
                last = at;
            }
        }
        run = if c.is_numeric() { run + 1 } else { 0 };
        prev = Some(c);
    }
    if last < text.len() {
        cuts.push(text.len());
    }
    cuts
}

/// CJK punctuation (`\p{Po}`, unchanged by NFC): 、。！，：；？
const CJK_PUNCTUATION: [char; 7] = [
    '\u{3001}', '\u{3002}', '\u{FF01}', '\u{FF0C}', '\u{FF1A}', '\u{FF1B}', '\u{FF1F}',
];

/// A CJK Unified Ideograph (`\p{Lo}`, unchanged by NFC).
fn cjk_ideograph(c: char) -> bool {
    ('\u{4E00}'..='\u{9FFF}').contains(&c)
}

/// Whether one of `specials` occurs in `text` across byte `at`.
fn inside_special(text: &str, at: usize, specials: &[String]) -> bool {
    let bytes = text.as_bytes();
    specials.iter().any(|s| {
        let s = s.as_bytes();
        (at.saturating_sub(s.len().saturating_sub(1))..at)
            .any(|start| bytes[start..].starts_with(s))
    })
}

/// The byte-level BPE pipeline for `tokenizer.ggml.pre`, and how it splits
/// digits.
fn bpe(
    file: &GgufFile,
    tokens: &[Cow<'_, str>],
    types: &[i64],
    pre: PreTokenizer,
) -> Result<(tokenizers::Tokenizer, DigitSplit), String> {
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
        .ignore_merges(pre.ignore_merges)
        .build()
        .map_err(|e| e.to_string())?;
    pipeline(bpe, pre, tokens, types)
}

/// How byte-level BPE text is split before it is merged: the regexes of
/// llama.cpp's pre-tokenizer types that we implement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PreSplit {
    /// LLAMA3 (also DBRX, SMAUG, CHATGLM4): digits in threes.
    Llama3,
    /// QWEN2 (also STABLELM2, HUNYUAN, SOLAR_OPEN, GROK_2): every digit alone.
    Qwen2,
    /// SMOLLM (also STARCODER, REFACT, COMMAND_R, CODESHELL, EXAONE,
    /// MINERVA, MELLUM2): every digit alone, then GPT-2's regex.
    SmolLm,
    /// GPT2 (also MPT, OLMO, JAIS, TRILLION, GRANITE_DOCLING): GPT-2's regex.
    Gpt2,
}

/// What a `tokenizer.ggml.pre` name means for a byte-level BPE vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PreTokenizer {
    split: PreSplit,
    /// NFC-normalize the text first, as Qwen's tokenizer.json does.
    nfc: bool,
    /// A pre-token that is itself a token is not merged (llama.cpp's
    /// `ignore_merges`, HF's BPE `ignore_merges`).
    ignore_merges: bool,
    /// Add BOS where the file has no `tokenizer.ggml.add_bos_token`.
    add_bos: bool,
}

const fn pre(split: PreSplit, nfc: bool, ignore_merges: bool, add_bos: bool) -> PreTokenizer {
    PreTokenizer {
        split,
        nfc,
        ignore_merges,
        add_bos,
    }
}

const LLAMA3_PRE: PreTokenizer = pre(PreSplit::Llama3, false, true, true);
const QWEN2_PRE: PreTokenizer = pre(PreSplit::Qwen2, true, false, false);
const SMOLLM_PRE: PreTokenizer = pre(PreSplit::SmolLm, false, false, false);
const GPT2_PRE: PreTokenizer = pre(PreSplit::Gpt2, false, false, false);

/// Every `tokenizer.ggml.pre` llama.cpp (llama-vocab.cpp, `llama_vocab::impl::load`)
/// gives a scheme we implement, with its flags there. Names whose scheme
/// differs in anything but decoding's space clean-up (other regexes,
/// SEP appended, no byte encoding) are left out, so they are refused.
const PRE_TOKENIZERS: &[(&str, PreTokenizer)] = &[
    ("llama3", LLAMA3_PRE),
    ("llama-v3", LLAMA3_PRE),
    ("llama-bpe", LLAMA3_PRE),
    ("falcon3", LLAMA3_PRE),
    ("falcon-h1", LLAMA3_PRE),
    ("pixtral", LLAMA3_PRE),
    ("midm-2.0", LLAMA3_PRE),
    ("lfm2", LLAMA3_PRE),
    ("jina-v5-nano", LLAMA3_PRE),
    ("dbrx", pre(PreSplit::Llama3, false, false, false)),
    ("smaug-bpe", pre(PreSplit::Llama3, false, false, false)),
    ("chatglm-bpe", pre(PreSplit::Llama3, false, false, false)),
    ("glm4", pre(PreSplit::Llama3, false, true, false)),
    ("glm5", pre(PreSplit::Llama3, false, true, false)),
    // Qwen's own tokenizer.json normalizes to NFC; llama.cpp does not.
    ("qwen2", QWEN2_PRE),
    ("deepseek-r1-qwen", QWEN2_PRE),
    ("kormo", QWEN2_PRE),
    ("f2llmv2", QWEN2_PRE),
    ("megrez", QWEN2_PRE),
    ("stablelm2", pre(PreSplit::Qwen2, false, false, false)),
    ("hunyuan", pre(PreSplit::Qwen2, false, false, false)),
    ("solar-open", pre(PreSplit::Qwen2, false, false, false)),
    ("grok-2", pre(PreSplit::Qwen2, false, false, false)),
    ("smollm", SMOLLM_PRE),
    ("starcoder", SMOLLM_PRE),
    ("refact", SMOLLM_PRE),
    ("command-r", SMOLLM_PRE),
    ("codeshell", SMOLLM_PRE),
    ("exaone", SMOLLM_PRE),
    ("minerva-7b", SMOLLM_PRE),
    ("mellum2", SMOLLM_PRE),
    // llama.cpp's "default" is a regex of its own; ours has always been GPT-2's.
    ("default", GPT2_PRE),
    ("gpt2", GPT2_PRE),
    ("gpt-2", GPT2_PRE),
    ("phi-2", GPT2_PRE),
    ("jina-es", GPT2_PRE),
    ("jina-de", GPT2_PRE),
    ("jina-v2-es", GPT2_PRE),
    ("jina-v2-de", GPT2_PRE),
    ("gigachat", GPT2_PRE),
    ("a.x-4.0", GPT2_PRE),
    ("mellum", GPT2_PRE),
    ("modern-bert", GPT2_PRE),
    ("exaone4", GPT2_PRE),
    ("mpt", GPT2_PRE),
    ("olmo", GPT2_PRE),
    ("jais", GPT2_PRE),
    ("trillion", GPT2_PRE),
    ("granite-docling", GPT2_PRE),
];

/// The scheme `tokenizer.ggml.pre` = `name` stands for, if we implement it.
fn pre_tokenizer(name: &str) -> Option<PreTokenizer> {
    PRE_TOKENIZERS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, p)| *p)
}

/// `bpe` behind the pre-tokenizer `pre` and with the special tokens.
fn pipeline(
    bpe: BPE,
    pre: PreTokenizer,
    tokens: &[Cow<'_, str>],
    types: &[i64],
) -> Result<(tokenizers::Tokenizer, DigitSplit), String> {
    let mut inner = tokenizers::Tokenizer::new(bpe);
    let split = |re: &str| -> Result<PreTokenizerWrapper, String> {
        let s = Split::new(
            SplitPattern::Regex(re.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| e.to_string())?;
        Ok(Sequence::new(vec![s.into(), ByteLevel::new(false, false, false).into()]).into())
    };
    if pre.nfc {
        inner
            .with_normalizer(Some(NFC))
            .map_err(|e| e.to_string())?;
    }
    let (pre_tokenizer, digits): (PreTokenizerWrapper, DigitSplit) = match pre.split {
        PreSplit::Llama3 => (split(LLAMA3)?, DigitSplit::Threes),
        PreSplit::Qwen2 => (split(QWEN2)?, DigitSplit::Each),
        PreSplit::SmolLm => (
            Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, false, true).into(),
            ])
            .into(),
            DigitSplit::Each,
        ),
        PreSplit::Gpt2 => (ByteLevel::new(false, false, true).into(), DigitSplit::Never),
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
    Ok((inner, digits))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Text with every kind of boundary the pre-tokenizers treat apart:
    /// words and contractions, runs of spaces and newlines, ASCII and other
    /// digits, punctuation, combining marks and Hangul jamo (which NFC
    /// composes), emoji and special tokens.
    fn stress_text(seed: u64, bytes: usize) -> String {
        const PARTS: &[&str] = &[
            "a",
            "b",
            "z",
            "Q",
            "word",
            " ",
            " ",
            "  ",
            "   ",
            "\n",
            "\n\n",
            " \n",
            "\t",
            "0",
            "1",
            "7",
            "42",
            "123",
            "9999",
            "'s",
            "'ll",
            "'D",
            ".",
            ",",
            "!",
            "...",
            "é",
            "e\u{301}",
            "\u{1100}\u{1161}\u{11A8}",
            "한",
            "😀",
            "\u{663}",
            "²",
            "<|im_start|>",
            "<|im_end|>",
            "<|endoftext|>",
            "<|im_",
            "_start|>",
            "the cat sat",
            "a b",
            "x Y",
            "hello, world! ",
            "(x)",
            "\"q\"",
            "中文",
            "。",
            "，",
            "x.y",
            "it's",
            "слово ",
            "नमस्ते ",
            "\u{a0}",
            "\u{3000}",
            "x\u{300}",
        ];
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut out = String::new();
        while out.len() < bytes {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            let r = (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize;
            out.push_str(PARTS[r % PARTS.len()]);
        }
        out
    }

    /// The pre-tokens `t`'s pre-tokenizer makes of `text`.
    fn pre_tokens(t: &tokenizers::Tokenizer, text: &str) -> Vec<String> {
        use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
        let mut s = PreTokenizedString::from(text);
        t.get_pre_tokenizer().unwrap().pre_tokenize(&mut s).unwrap();
        s.get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(p, _, _)| p.to_string())
            .collect()
    }

    /// Cut at every place [`bpe_cuts`] allows (pieces of one byte and
    /// more), each pre-tokenizer splits the text as it does the whole, and
    /// tokenizes it with SmolLM2's vocabulary into the same ids (ids alone
    /// would miss a wrong cut between symbols the vocabulary never merges).
    #[test]
    fn text_cut_where_bpe_cuts_says_tokenizes_as_the_whole() {
        let home = std::env::var_os("HOME")
            .map(std::path::PathBuf::from)
            .unwrap_or_default();
        let path = home.join(".cache/lorafold/models/SmolLM2-135M-Instruct.Q4_1.gguf");
        assert!(
            path.exists(),
            "{} is missing: run scripts/fetch-smollm2.sh",
            path.display()
        );
        let file = GgufFile::open(&path).unwrap();
        let tokens = file.get_strings(names::TOKENIZER_TOKENS).unwrap();
        let types: Vec<i64> = file
            .get(names::TOKENIZER_TOKEN_TYPE)
            .and_then(|v| {
                v.as_array()
                    .map(|a| a.iter().map(|t| t.as_f64().unwrap() as i64).collect())
            })
            .unwrap();
        let specials: Vec<String> = types
            .iter()
            .zip(tokens.iter())
            .filter(|(&t, _)| t == 3 || t == 4)
            .map(|(_, s)| s.to_string())
            .collect();
        let merges: Vec<(String, String)> = file
            .get_strings(names::TOKENIZER_MERGES)
            .unwrap()
            .iter()
            .map(|m| {
                let (a, b) = m.split_once(' ').unwrap();
                (a.to_string(), b.to_string())
            })
            .collect();
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        for pre in ["smollm", "llama-bpe", "qwen2", "gpt2"] {
            let bpe = BPE::builder()
                .vocab_and_merges(vocab.clone(), merges.clone())
                .build()
                .unwrap();
            let (t, digits) = pipeline(bpe, pre_tokenizer(pre).unwrap(), &tokens, &types).unwrap();
            for seed in 1..=8 {
                let text = stress_text(seed, 6000);
                let whole = t.encode(text.as_str(), false).unwrap().get_ids().to_vec();
                let cuts = bpe_cuts(digits, &text, &specials, 1);
                assert!(cuts.len() > 300, "{pre}: {} cuts", cuts.len());
                let (mut pieces, mut splits) = (Vec::new(), Vec::new());
                let mut start = 0;
                for end in cuts {
                    pieces.extend_from_slice(t.encode(&text[start..end], false).unwrap().get_ids());
                    splits.extend(pre_tokens(&t, &text[start..end]));
                    start = end;
                }
                assert_eq!(splits, pre_tokens(&t, &text), "{pre}, seed {seed}");
                assert_eq!(pieces, whole, "{pre}, seed {seed}");
            }
        }
    }

    /// A metadata value for [`gguf`].
    enum Kv<'a> {
        Str(&'a str),
        Strs(&'a [&'a str]),
        F32s(Vec<f32>),
        I32s(Vec<i32>),
        U32(u32),
        Bool(bool),
    }

    /// A GGUF image with metadata `kvs` and no tensors.
    fn gguf(kvs: &[(&str, Kv)]) -> GgufFile {
        fn string(out: &mut Vec<u8>, s: &str) {
            out.extend_from_slice(&(s.len() as u64).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
        for (key, v) in kvs {
            string(&mut b, key);
            match v {
                Kv::Str(s) => {
                    b.extend_from_slice(&8u32.to_le_bytes());
                    string(&mut b, s);
                }
                Kv::Strs(a) => {
                    b.extend_from_slice(&9u32.to_le_bytes());
                    b.extend_from_slice(&8u32.to_le_bytes());
                    b.extend_from_slice(&(a.len() as u64).to_le_bytes());
                    for s in *a {
                        string(&mut b, s);
                    }
                }
                Kv::F32s(a) => {
                    b.extend_from_slice(&9u32.to_le_bytes());
                    b.extend_from_slice(&6u32.to_le_bytes());
                    b.extend_from_slice(&(a.len() as u64).to_le_bytes());
                    a.iter().for_each(|x| b.extend_from_slice(&x.to_le_bytes()));
                }
                Kv::I32s(a) => {
                    b.extend_from_slice(&9u32.to_le_bytes());
                    b.extend_from_slice(&5u32.to_le_bytes());
                    b.extend_from_slice(&(a.len() as u64).to_le_bytes());
                    a.iter().for_each(|x| b.extend_from_slice(&x.to_le_bytes()));
                }
                Kv::U32(x) => {
                    b.extend_from_slice(&4u32.to_le_bytes());
                    b.extend_from_slice(&x.to_le_bytes());
                }
                Kv::Bool(x) => {
                    b.extend_from_slice(&7u32.to_le_bytes());
                    b.push(*x as u8);
                }
            }
        }
        GgufFile::from_bytes(b, "synthetic.gguf").unwrap()
    }

    /// A SentencePiece vocabulary shaped like Gemma's: control tokens
    /// 0..=4 and the turn tokens, "\n" user-defined, no space prefix.
    fn gemma_like(template: Option<&str>, turns: bool) -> Tokenizer {
        let (start, end) = if turns {
            ("<start_of_turn>", "<end_of_turn>")
        } else {
            ("<unused0>", "<unused1>")
        };
        let tokens = [
            "<pad>", "<eos>", "<bos>", "<unk>", start, end, "\n", "user", "model", "\u{2581}", "h",
            "i", "hi", "u", "s", "e", "r", "us", "er", "m", "o", "d", "l", "mo", "de", "del",
        ];
        let types: Vec<i32> = (0..tokens.len())
            .map(|i| match i {
                0..=5 => 3,
                6 => 4,
                _ => 1,
            })
            .collect();
        let scores: Vec<f32> = (0..tokens.len()).map(|i| -(i as f32)).collect();
        let mut kvs = vec![
            ("tokenizer.ggml.model", Kv::Str("llama")),
            ("tokenizer.ggml.tokens", Kv::Strs(&tokens)),
            ("tokenizer.ggml.scores", Kv::F32s(scores)),
            ("tokenizer.ggml.token_type", Kv::I32s(types)),
            ("tokenizer.ggml.bos_token_id", Kv::U32(2)),
            ("tokenizer.ggml.eos_token_id", Kv::U32(1)),
            ("tokenizer.ggml.add_space_prefix", Kv::Bool(false)),
        ];
        if let Some(t) = template {
            kvs.push(("tokenizer.chat_template", Kv::Str(t)));
        }
        Tokenizer::from_gguf(&gguf(&kvs)).unwrap()
    }

    const GEMMA_TURN: &str = "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n";

    /// Gemma's turns come from a template that uses them, or, with no
    /// template, from the vocabulary's turn tokens; and they encode to
    /// those tokens.
    #[test]
    fn gemma_chat_format_from_template_or_vocabulary() {
        let bare = gemma_like(None, true);
        assert_eq!(bare.chat_prompt("hi").as_deref(), Some(GEMMA_TURN));
        assert_eq!(bare.chat_turn_end(), Some("<end_of_turn>\n"));
        // <bos> <start_of_turn> user \n hi <end_of_turn> \n <start_of_turn> model \n
        assert_eq!(
            bare.encode(&bare.chat_prompt("hi").unwrap()).unwrap(),
            [2, 4, 7, 6, 12, 5, 6, 4, 8, 6]
        );
        assert_eq!(
            bare.decode(&[2, 4, 7, 6, 12, 5, 6, 4, 8, 6]).unwrap(),
            format!("<bos>{GEMMA_TURN}")
        );
        assert_eq!(bare.stop_ids, [1, 5]);
        // A template in Gemma's own words, even where the vocabulary
        // lacks the turn tokens.
        let template = "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m.role }}\n{{ m.content }}<end_of_turn>\n{% endfor %}";
        let templated = gemma_like(Some(template), false);
        assert_eq!(templated.chat_prompt("hi").as_deref(), Some(GEMMA_TURN));
        assert_eq!(templated.chat_turn_end(), Some("<end_of_turn>\n"));
        // A ChatML template wins over the vocabulary's turn tokens.
        let chatml = gemma_like(
            Some("{% for m in messages %}<|im_start|>{{ m.role }}"),
            true,
        );
        assert_eq!(
            chatml.chat_prompt("hi").as_deref(),
            Some("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
        );
        assert_eq!(chatml.chat_turn_end(), Some("<|im_end|>\n"));
        // Neither template nor turn tokens: no chat format; nor for a
        // template we do not know.
        assert_eq!(gemma_like(None, false).chat_prompt("hi"), None);
        assert_eq!(gemma_like(None, false).chat_turn_end(), None);
        assert_eq!(gemma_like(Some("[INST]"), true).chat_prompt("hi"), None);
    }

    /// A byte-level BPE GGUF with pre-tokenizer `pre` (None: no key): the
    /// 256 byte characters, then "12" (256), "123" (257), "34" (258) and
    /// "xyz" (259), merged "3 4" first, then "1 2" and "12 3"; "xyz" has
    /// no merge.
    fn bpe_with_pre(pre: Option<&str>) -> Result<Tokenizer, TokenizerError> {
        // GPT-2's byte-to-character map: printable bytes stand for
        // themselves, the rest for U+0100 on.
        let mut next = 256u32;
        let mut tokens: Vec<String> = (0..=255u8)
            .map(|b| {
                let printable =
                    (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
                if printable {
                    char::from(b).to_string()
                } else {
                    next += 1;
                    char::from_u32(next - 1).unwrap().to_string()
                }
            })
            .collect();
        tokens.extend(["12", "123", "34", "xyz"].map(String::from));
        let tokens: Vec<&str> = tokens.iter().map(String::as_str).collect();
        let merges = ["3 4", "1 2", "12 3"];
        let mut kvs = vec![
            ("tokenizer.ggml.model", Kv::Str("gpt2")),
            ("tokenizer.ggml.tokens", Kv::Strs(&tokens)),
            ("tokenizer.ggml.merges", Kv::Strs(&merges)),
            ("tokenizer.ggml.bos_token_id", Kv::U32(b'B' as u32)),
        ];
        if let Some(p) = pre {
            kvs.push(("tokenizer.ggml.pre", Kv::Str(p)));
        }
        Tokenizer::from_gguf(&gguf(&kvs))
    }

    /// The names llama.cpp gives the schemes we implement tokenize as
    /// those schemes do (digits in threes, alone, or in runs; a whole
    /// token unmerged where llama.cpp ignores merges), take llama.cpp's
    /// BOS default, and a name we do not implement is refused.
    #[test]
    fn pre_tokenizer_aliases_tokenize_as_their_scheme() {
        let d = |c: u8| c as u32;
        let (t12, t123, t34, xyz) = (256, 257, 258, 259);
        let (x, y, z) = (d(b'x'), d(b'y'), d(b'z'));
        // "123412xyz": llama3 cuts digits in threes (123|412), qwen2 and
        // smollm keep each digit alone, GPT-2 keeps the run and so merges
        // "3 4" first.
        let threes = [t123, d(b'4'), t12];
        let alone = [d(b'1'), d(b'2'), d(b'3'), d(b'4'), d(b'1'), d(b'2')];
        let run = [t12, t34, t12];
        let cases: &[(Option<&str>, &[u32], bool, bool)] = &[
            (Some("llama-bpe"), &threes, true, true),
            (Some("llama-v3"), &threes, true, true),
            (Some("falcon3"), &threes, true, true),
            (Some("glm4"), &threes, false, true),
            (Some("smaug-bpe"), &threes, false, false),
            (Some("dbrx"), &threes, false, false),
            (Some("qwen2"), &alone, false, false),
            (Some("deepseek-r1-qwen"), &alone, false, false),
            (Some("megrez"), &alone, false, false),
            (Some("stablelm2"), &alone, false, false),
            (Some("smollm"), &alone, false, false),
            (Some("starcoder"), &alone, false, false),
            (Some("command-r"), &alone, false, false),
            (None, &run, false, false),
            (Some("gpt-2"), &run, false, false),
            (Some("phi-2"), &run, false, false),
            (Some("olmo"), &run, false, false),
        ];
        for (pre, digits, bos, whole) in cases {
            let t = bpe_with_pre(*pre).unwrap();
            assert_eq!(t.add_bos, *bos, "{pre:?}");
            let mut want: Vec<u32> = if *bos { vec![d(b'B')] } else { vec![] };
            want.extend_from_slice(digits);
            want.extend(if *whole { vec![xyz] } else { vec![x, y, z] });
            assert_eq!(t.encode("123412xyz").unwrap(), want, "{pre:?}");
        }
        for name in [
            "deepseek-llm",
            "tekken",
            "roberta-bpe",
            "gpt-4o",
            "no-such-thing",
        ] {
            let e = bpe_with_pre(Some(name)).unwrap_err();
            assert!(
                e.problem
                    .contains(&format!("pre-tokenizer '{name}' is not supported")),
                "{e}"
            );
        }
        // Every entry of the table is one name.
        let mut names: Vec<&str> = PRE_TOKENIZERS.iter().map(|(n, _)| *n).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), PRE_TOKENIZERS.len());
        assert_eq!(pre_tokenizer("deepseek-r1-qwen"), pre_tokenizer("qwen2"));
        assert_eq!(pre_tokenizer("llama3"), pre_tokenizer("llama-bpe"));
    }
}

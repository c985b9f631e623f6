//! A Hugging Face `tokenizer.json` (byte-level BPE) as llama.cpp's
//! `tokenizer.ggml.*` metadata.

use lorafold_runtime::gguf::names;
use std::collections::HashMap;
use std::path::Path;

use lorafold_runtime::gguf::{MetadataArray, MetadataValue, ValueType};
use serde_json::Value;

// llama.cpp's token types.
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Why a tokenizer.json was not converted.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A kind of tokenizer we do not convert yet; the model converts without it.
    #[error("{0}")]
    Unsupported(String),
    /// The file is malformed.
    #[error("{0}")]
    Invalid(String),
}

impl From<&str> for TokenizerError {
    fn from(s: &str) -> Self {
        TokenizerError::Invalid(s.to_string())
    }
}

impl From<String> for TokenizerError {
    fn from(s: String) -> Self {
        TokenizerError::Invalid(s)
    }
}

/// The tokenizer metadata for the HF folder `dir`, or None if it has no
/// tokenizer.json. `vocab_size` is the model's vocabulary (the embedding's
/// rows): every token id must be below it, and the token list is padded to it.
pub fn gguf_metadata(
    dir: &Path,
    vocab_size: u64,
) -> Result<Option<Vec<(String, MetadataValue<'static>)>>, TokenizerError> {
    use TokenizerError::{Invalid, Unsupported};
    let path = dir.join("tokenizer.json");
    let Ok(text) = lorafold_runtime::text::read_to_string(&path) else {
        return Ok(None);
    };
    let tok: Value =
        serde_json::from_str(&text).map_err(|e| Invalid(format!("not valid JSON: {e}")))?;
    let tc: Value = lorafold_runtime::text::read_to_string(&dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    let config: Value = lorafold_runtime::text::read_to_string(&dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);

    let model = tok.get("model").ok_or("no 'model' section")?;
    if model.get("type").and_then(Value::as_str) != Some("BPE") {
        return Err(Unsupported("only BPE tokenizers are converted".into()));
    }
    if model.get("byte_fallback").and_then(Value::as_bool) == Some(true) {
        return Err(Unsupported(
            "SentencePiece-style BPE (byte_fallback) is not converted yet; only byte-level BPE is"
                .into(),
        ));
    }
    let vocab = model
        .get("vocab")
        .and_then(Value::as_object)
        .ok_or("no model.vocab")?;
    let mut by_id: HashMap<u64, (String, i32)> = HashMap::new();
    for (t, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| format!("vocab entry '{t}' has no integer id"))?;
        by_id.insert(id, (t.clone(), NORMAL));
    }
    for a in tok
        .get("added_tokens")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let (Some(id), Some(content)) = (
            a.get("id").and_then(Value::as_u64),
            a.get("content").and_then(Value::as_str),
        ) else {
            return Err(Invalid("added_tokens entry without id or content".into()));
        };
        let special = a.get("special").and_then(Value::as_bool).unwrap_or(false);
        by_id.insert(
            id,
            (
                content.to_string(),
                if special { CONTROL } else { USER_DEFINED },
            ),
        );
    }
    // Checked before the token list is allocated, so an id of 10^9 costs nothing.
    if let Some((&id, (token, _))) = by_id
        .iter()
        .filter(|(&id, _)| id >= vocab_size)
        .min_by_key(|(&id, _)| id)
    {
        return Err(Invalid(format!(
            "token {token:?} has id {id}, but the model has {vocab_size} token embeddings (vocab_size)"
        )));
    }
    let (mut tokens, mut types) = (
        Vec::with_capacity(vocab_size as usize),
        Vec::with_capacity(vocab_size as usize),
    );
    for id in 0..vocab_size {
        let (t, ty) = by_id
            .remove(&id)
            .unwrap_or_else(|| (format!("[PAD{id}]"), UNUSED));
        tokens.push(t);
        types.push(MetadataValue::I32(ty));
    }
    let merges: Vec<String> = model
        .get("merges")
        .and_then(Value::as_array)
        .ok_or_else(|| Invalid("no model.merges".into()))?
        .iter()
        .map(|m| match m {
            Value::String(s) => Ok(s.clone()),
            Value::Array(p) if p.len() == 2 => Ok(format!(
                "{} {}",
                p[0].as_str().unwrap_or(""),
                p[1].as_str().unwrap_or("")
            )),
            other => Err(Invalid(format!(
                "merge {other} is neither \"a b\" nor [a, b]"
            ))),
        })
        .collect::<Result<_, _>>()?;

    let id_of = |v: &Value| -> Option<u64> {
        let s = v
            .as_str()
            .or_else(|| v.get("content").and_then(Value::as_str))?;
        tokens.iter().position(|t| t == s).map(|i| i as u64)
    };
    let mut md: Vec<(String, MetadataValue<'static>)> = vec![
        (names::TOKENIZER_MODEL.into(), MetadataValue::string("gpt2")),
        (
            names::TOKENIZER_PRE.into(),
            MetadataValue::string(pre_tokenizer_name(&tok)),
        ),
    ];
    for (key, tc_key, cfg_key) in [
        ("bos", "bos_token", "bos_token_id"),
        ("eos", "eos_token", "eos_token_id"),
        ("unknown", "unk_token", ""),
        ("padding", "pad_token", "pad_token_id"),
    ] {
        let id = tc
            .get(tc_key)
            .and_then(id_of)
            .or_else(|| config.get(cfg_key).and_then(Value::as_u64));
        if let Some(id) = id {
            if id >= vocab_size {
                return Err(Invalid(format!(
                    "config.json's {cfg_key} is {id}, but the model has {vocab_size} token embeddings (vocab_size)"
                )));
            }
            md.push((names::special_token_id(key), MetadataValue::U32(id as u32)));
        }
    }
    if let Some(b) = tc.get("add_bos_token").and_then(Value::as_bool) {
        md.push((names::TOKENIZER_ADD_BOS.into(), MetadataValue::Bool(b)));
    }
    md.push((
        names::TOKENIZER_TOKENS.into(),
        MetadataValue::string_array(tokens),
    ));
    md.push((
        names::TOKENIZER_TOKEN_TYPE.into(),
        MetadataValue::Array(MetadataArray::Owned {
            elem: ValueType::I32,
            items: types,
        }),
    ));
    md.push((
        names::TOKENIZER_MERGES.into(),
        MetadataValue::string_array(merges),
    ));
    let template = match tc.get("chat_template") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template").and_then(Value::as_str))
            .map(str::to_string),
        _ => None,
    };
    if let Some(t) = template {
        md.push((names::CHAT_TEMPLATE.into(), MetadataValue::string(t)));
    }
    Ok(Some(md))
}

/// llama.cpp's pre-tokenizer name, recognised from the split regex (llama.cpp
/// itself hashes the tokenizer's output on a probe text).
fn pre_tokenizer_name(tok: &Value) -> &'static str {
    let pre = tok.get("pre_tokenizer").cloned().unwrap_or(Value::Null);
    let mut regexes = Vec::new();
    let mut individual_digits = false;
    collect(&pre, &mut regexes, &mut individual_digits);
    if regexes.iter().any(|r| r == LLAMA3_SPLIT) {
        "llama-bpe"
    } else if regexes.iter().any(|r| r == QWEN2_SPLIT) {
        "qwen2"
    } else if individual_digits {
        "smollm"
    } else {
        "gpt-2"
    }
}

fn collect(v: &Value, regexes: &mut Vec<String>, digits: &mut bool) {
    match v.get("type").and_then(Value::as_str) {
        Some("Sequence") => {
            for p in v
                .get("pretokenizers")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                collect(p, regexes, digits);
            }
        }
        Some("Split") => {
            if let Some(r) = v.pointer("/pattern/Regex").and_then(Value::as_str) {
                regexes.push(r.to_string());
            }
        }
        Some("Digits") => {
            *digits = v
                .get("individual_digits")
                .and_then(Value::as_bool)
                .unwrap_or(false)
        }
        _ => {}
    }
}

//! Sampling and the generation loop: prefill, then one token at a time.

use std::time::{Duration, Instant};

use crate::model::{Model, RuntimeError, Session};
use crate::number::compact;
use crate::tokenizer::{TokenizeError, Tokenizer};

/// Why a prompt cannot be run as the next turn of a session.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    /// A chat turn was asked for, but the model's template is absent or unknown.
    #[error("the model has no chat template lorafold knows (ChatML, Llama 3)")]
    NoChatTemplate,
    /// The prompt encodes to no tokens (and the model adds no BOS).
    #[error("the prompt is empty: it has no tokens")]
    Empty,
    /// The prompt does not fit the room left in the session's context.
    #[error("the prompt has {tokens} tokens, but the context has room for {room} of its {size}")]
    TooLong {
        /// the prompt's tokens
        tokens: usize,
        /// positions left
        room: usize,
        /// the context's size
        size: usize,
    },
    /// The prompt's text is too long for the room left in the context,
    /// whatever it tokenizes to: refused before tokenizing it.
    #[error("the prompt's {bytes} bytes make at least {tokens} tokens, but the context has room for {room} of its {size}")]
    TextTooLong {
        /// the prompt's bytes
        bytes: usize,
        /// the fewest tokens they can make
        tokens: usize,
        /// positions left
        room: usize,
        /// the context's size
        size: usize,
    },
    /// The conversation has no room left for the turn's end marker.
    #[error("the conversation filled the context of {size} positions")]
    ContextFull {
        /// the context's size
        size: usize,
    },
    /// The text could not be encoded.
    #[error(transparent)]
    Tokenize(#[from] TokenizeError),
    /// Running the model failed.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

/// The ids of `prompt` as the next turn of `session`'s conversation (in the
/// model's chat template with `chat`), checked to be non-empty and to fit.
/// A prompt too long to fit whatever it tokenizes to is refused before it
/// is tokenized, so the work stays bounded by the context, not the text.
pub fn prompt_ids(
    session: &Session<'_>,
    tokenizer: &Tokenizer,
    prompt: &str,
    chat: bool,
) -> Result<Vec<u32>, PromptError> {
    let (size, room) = (
        session.max_tokens(),
        session.max_tokens() - session.position(),
    );
    // The template adds text around the prompt: the bound holds for both.
    let fewest = tokenizer.fewest_tokens(prompt.len());
    if fewest > room {
        return Err(PromptError::TextTooLong {
            bytes: prompt.len(),
            tokens: fewest,
            room,
            size,
        });
    }
    let mut ids = if chat {
        let text = tokenizer
            .chat_prompt(prompt)
            .ok_or(PromptError::NoChatTemplate)?;
        tokenizer.encode(&text)?
    } else {
        tokenizer.encode(prompt)?
    };
    // BOS starts the conversation, not every turn of it (Gemma, Llama 2).
    if session.position() > 0 && tokenizer.add_bos && ids.first() == tokenizer.bos.as_ref() {
        ids.remove(0);
    }
    if ids.is_empty() {
        return Err(PromptError::Empty);
    }
    check_room(session, ids.len())?;
    Ok(ids)
}

/// `tokens` more positions fit in `session`'s context.
pub fn check_room(session: &Session<'_>, tokens: usize) -> Result<(), PromptError> {
    let (size, room) = (
        session.max_tokens(),
        session.max_tokens() - session.position(),
    );
    if tokens > room {
        return Err(PromptError::TooLong { tokens, room, size });
    }
    Ok(())
}

/// After a chat reply, feed the template's end of the assistant's turn
/// (generation stops at its token without running it), so that the next
/// turn follows the template. Nothing for templates without one.
pub fn close_turn(session: &mut Session<'_>, tokenizer: &Tokenizer) -> Result<(), PromptError> {
    let Some(end) = tokenizer.chat_turn_end() else {
        return Ok(());
    };
    let mut ids = tokenizer.encode(end)?;
    if tokenizer.add_bos && tokenizer.bos.is_some() && !ids.is_empty() {
        ids.remove(0);
    }
    if session.position() + ids.len() > session.max_tokens() {
        return Err(PromptError::ContextFull {
            size: session.max_tokens(),
        });
    }
    session.forward(&ids, false)?;
    Ok(())
}

/// How the next token is chosen.
#[derive(Debug, Clone)]
pub struct SamplerConfig {
    /// 0 means greedy.
    pub temperature: f64,
    /// Keep the k most likely (0: all).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches p (1: all).
    pub top_p: f64,
    /// Divide positive logits (multiply negative ones) of tokens already seen.
    pub repeat_penalty: f32,
    /// Seed for the sampler's generator.
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repeat_penalty: 1.0,
            seed: 299792458,
        }
    }
}

impl SamplerConfig {
    /// Refuse values that run to garbage: a NaN or infinite temperature or
    /// penalty turns every probability into NaN, and top-p outside (0, 1]
    /// keeps no token or means nothing.
    pub fn validate(&self) -> Result<(), RuntimeError> {
        let out = |name: &'static str, value: String, expected: &str| {
            Err(RuntimeError::OutOfRange {
                name,
                value,
                expected: expected.into(),
            })
        };
        let t = self.temperature;
        if !(t.is_finite() && t >= 0.0) {
            return out(
                "temperature",
                compact(t).to_string(),
                "it must be finite and >= 0 (0: greedy)",
            );
        }
        let p = self.top_p;
        if !(p > 0.0 && p <= 1.0) {
            return out(
                "top-p",
                compact(p).to_string(),
                "it must be in (0, 1] (1: off)",
            );
        }
        let r = self.repeat_penalty;
        if !(r.is_finite() && r > 0.0) {
            return out(
                "repeat penalty",
                compact(r).to_string(),
                "it must be finite and > 0 (1: off)",
            );
        }
        Ok(())
    }
}

/// Chooses tokens from logits; deterministic for a seed.
#[derive(Debug, Clone)]
pub struct Sampler {
    config: SamplerConfig,
    state: u64,
}

impl Sampler {
    /// A sampler for a configuration checked with [`SamplerConfig::validate`].
    pub fn try_new(config: SamplerConfig) -> Result<Sampler, RuntimeError> {
        config.validate()?;
        Ok(Sampler::new(config))
    }

    /// A sampler with its own seeded generator, for a configuration known to
    /// be valid (such as the default); user input goes through [`Sampler::try_new`].
    pub fn new(config: SamplerConfig) -> Sampler {
        let state = config.seed ^ 0x9E37_79B9_7F4A_7C15;
        Sampler { config, state }
    }

    // splitmix64: small, fast and fully determined by the seed.
    fn next_f64(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The next token from `logits`, given the tokens so far.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let c = &self.config;
        if c.repeat_penalty != 1.0 {
            for &t in history {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / c.repeat_penalty
                    } else {
                        *l * c.repeat_penalty
                    };
                }
            }
        }
        if c.temperature <= 0.0 {
            return crate::measure::argmax(logits) as u32;
        }
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        idx.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        if c.top_k > 0 {
            idx.truncate(c.top_k);
        }
        let max = logits[idx[0]] as f64;
        let mut probs: Vec<f64> = idx
            .iter()
            .map(|&i| ((logits[i] as f64 - max) / c.temperature).exp())
            .collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        if c.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = probs.iter().position(|p| {
                acc += p;
                acc >= c.top_p
            });
            let keep = keep.map_or(probs.len(), |k| k + 1);
            probs.truncate(keep);
            let s: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= s);
        }
        let mut r = self.next_f64();
        for (p, &i) in probs.iter().zip(&idx) {
            r -= p;
            if r <= 0.0 {
                return i as u32;
            }
        }
        idx[probs.len() - 1] as u32
    }
}

/// Timings of one generation.
#[derive(Debug, Clone, Default)]
pub struct GenerationStats {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub generated: usize,
    /// Prefill time (prompt forward, including the first token's logits).
    pub prefill: Duration,
    /// Time from the start to the first generated token.
    pub time_to_first_token: Duration,
    /// Time of the decode steps after the first token.
    pub decode: Duration,
    /// Generation stopped because the session's context was full.
    pub context_full: bool,
    /// The token callback asked to stop.
    pub stopped: bool,
}

impl GenerationStats {
    /// Prompt tokens per second.
    pub fn prefill_tps(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill.as_secs_f64().max(1e-9)
    }
    /// Generated tokens per second after the first.
    pub fn decode_tps(&self) -> f64 {
        self.generated.saturating_sub(1) as f64 / self.decode.as_secs_f64().max(1e-9)
    }
}

/// Generate up to `max_new` tokens after `prompt`, calling `on_token` with
/// each token's text as it comes; stops at end-of-turn ids, `stop` strings,
/// or when `on_token` returns false (an app's stop button).
pub fn generate(
    session: &mut Session<'_>,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    max_new: usize,
    sampler: &mut Sampler,
    stop: &[String],
    on_token: &mut dyn FnMut(&str) -> bool,
) -> Result<(Vec<u32>, GenerationStats), RuntimeError> {
    generate_with(
        session,
        tokenizer,
        prompt,
        max_new,
        sampler,
        stop,
        &mut |piece, _| on_token(piece),
    )
}

/// As [`generate`], with the session's position (the positions its cache
/// holds) given to `on_token` beside each piece: the session is lent to
/// the loop, so a caller that reports it while generating (the C API's
/// `lorafold_session_used` from the callback) learns it here.
pub fn generate_with(
    session: &mut Session<'_>,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    max_new: usize,
    sampler: &mut Sampler,
    stop: &[String],
    on_token: &mut dyn FnMut(&str, usize) -> bool,
) -> Result<(Vec<u32>, GenerationStats), RuntimeError> {
    let mut g = Generation::new(prompt, max_new, stop);
    while let Some(piece) = g.next_piece(session, tokenizer, sampler)? {
        if !on_token(&piece, session.position()) {
            g.stats.stopped = true;
            break;
        }
    }
    Ok(g.finish())
}

/// One generation pulled a piece at a time (what a host's iterator, such
/// as Python's, drives; [`generate_with`] pushes the same pieces to a
/// callback): prefill at the first pull, then a token per step.
#[derive(Debug)]
pub struct Generation {
    history: Vec<u32>,
    prompt_len: usize,
    out: Vec<u32>,
    text: String,
    logits: Vec<f32>,
    max_new: usize,
    stop: Vec<String>,
    /// The last token is sampled but not yet run (it is run at the next
    /// pull, so a generation left early costs no step it did not need).
    pending: Option<u32>,
    done: bool,
    start: Option<Instant>,
    decode_start: Option<Instant>,
    /// Timings and counts so far.
    pub stats: GenerationStats,
}

impl Generation {
    /// A generation of up to `max_new` tokens after `prompt`, ending at
    /// end-of-turn ids or when the text ends with one of `stop`.
    pub fn new(prompt: &[u32], max_new: usize, stop: &[String]) -> Generation {
        Generation {
            history: prompt.to_vec(),
            prompt_len: prompt.len(),
            out: Vec::new(),
            text: String::new(),
            logits: Vec::new(),
            max_new,
            stop: stop.to_vec(),
            pending: None,
            done: false,
            start: None,
            decode_start: None,
            stats: GenerationStats {
                prompt_tokens: prompt.len(),
                ..Default::default()
            },
        }
    }

    /// The ids generated so far.
    pub fn tokens(&self) -> &[u32] {
        &self.out
    }

    /// The next piece of text (whole characters), or None at the end.
    pub fn next_piece(
        &mut self,
        session: &mut Session<'_>,
        tokenizer: &Tokenizer,
        sampler: &mut Sampler,
    ) -> Result<Option<String>, RuntimeError> {
        let result = self.step(session, tokenizer, sampler);
        if !matches!(result, Ok(Some(_))) {
            self.done = true;
        }
        self.stats.generated = self.out.len();
        if let Some(d) = self.decode_start {
            self.stats.decode = d.elapsed();
        }
        result
    }

    fn step(
        &mut self,
        session: &mut Session<'_>,
        tokenizer: &Tokenizer,
        sampler: &mut Sampler,
    ) -> Result<Option<String>, RuntimeError> {
        if self.done {
            return Ok(None);
        }
        if self.start.is_none() {
            let start = Instant::now();
            self.start = Some(start);
            // One buffer for every step: the sampler edits the logits in place.
            self.logits = session
                .logits(&self.history[..self.prompt_len], false)?
                .to_vec();
            self.stats.prefill = start.elapsed();
            self.decode_start = Some(Instant::now());
        }
        loop {
            if let Some(next) = self.pending.take() {
                // A full cache is the end of this generation, not an error:
                // the caller says so and the tokens so far stand.
                if session.position() >= session.max_tokens() {
                    self.stats.context_full = true;
                    return Ok(None);
                }
                let fresh = session.logits(&[next], false)?;
                self.logits.clear();
                self.logits.extend_from_slice(fresh);
            }
            if self.out.len() >= self.max_new {
                return Ok(None);
            }
            let next = sampler.sample(&mut self.logits, &self.history);
            if self.out.is_empty() {
                self.stats.time_to_first_token =
                    self.start.map(|s| s.elapsed()).unwrap_or_default();
            }
            if tokenizer.stop_ids.contains(&next) {
                return Ok(None);
            }
            self.out.push(next);
            self.history.push(next);
            // Decode the whole tail so multi-byte characters come out whole.
            let full = tokenizer.decode(&self.out).unwrap_or_default();
            let piece = (full.len() > self.text.len() && full.is_char_boundary(self.text.len()))
                .then(|| full[self.text.len()..].to_string());
            if piece.is_some() {
                self.text = full;
            }
            let stopped = self
                .stop
                .iter()
                .any(|s| !s.is_empty() && self.text.ends_with(s.as_str()));
            if stopped || self.out.len() == self.max_new {
                self.done = true;
                return Ok(piece);
            }
            self.pending = Some(next);
            if piece.is_some() {
                return Ok(piece);
            }
        }
    }

    /// The ids generated and the timings.
    pub fn finish(mut self) -> (Vec<u32>, GenerationStats) {
        self.stats.generated = self.out.len();
        (self.out, self.stats)
    }
}

/// The greedy continuation of `prompt` (raw text, no chat template): up to
/// `max_new` tokens, ending at end-of-turn or a `stop` string, trimmed.
pub fn complete(
    model: &Model,
    prompt: &str,
    max_new: usize,
    stop: &[String],
) -> Result<String, RuntimeError> {
    // The problem alone: the error names the file once.
    let tok_err = |e: &dyn std::fmt::Display| RuntimeError::Model {
        path: model.file().path().to_path_buf(),
        problem: e.to_string(),
    };
    let tok = model
        .tokenizer()
        .map_err(|e| tok_err(&format_args!("tokenizer: {}", e.problem)))?;
    let ids = tok.encode(prompt).map_err(|e| tok_err(&e))?;
    let mut session = model.session(ids.len() + max_new)?;
    let (out, _) = generate(
        &mut session,
        &tok,
        &ids,
        max_new,
        &mut Sampler::new(SamplerConfig::default()),
        stop,
        &mut |_| true,
    )?;
    Ok(tok
        .decode(&out)
        .map_err(|e| tok_err(&e))?
        .trim_end()
        .to_string())
}

//! SentencePiece-style vocabularies (`tokenizer.ggml.model = "llama"`:
//! Llama 2, TinyLlama, Mistral), tokenized as llama.cpp's llm_tokenizer_spm
//! does: merge the highest-scoring adjacent pair first, fall back to byte
//! tokens `<0xXX>` for what no token covers.

use std::collections::{BinaryHeap, HashMap};

/// The vocabulary with scores.
#[derive(Debug, Clone)]
pub struct SpmVocab {
    tokens: Vec<String>,
    scores: Vec<f32>,
    index: HashMap<String, u32>,
    bytes: [Option<u32>; 256],
    /// Control and user-defined tokens, matched whole in the input (longest first).
    specials: Vec<(String, u32)>,
    /// Prepend a space to text at the start or after a special token.
    pub add_space_prefix: bool,
}

#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    n: usize,
    prev: isize,
    next: isize,
}

#[derive(PartialEq)]
struct Bigram {
    left: usize,
    right: usize,
    score: f32,
    size: usize,
}

impl Eq for Bigram {}

impl Ord for Bigram {
    // Highest score first; on ties, the leftmost pair.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.score.total_cmp(&o.score).then(o.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

impl SpmVocab {
    /// Build from tokens, scores and token types (llama.cpp's: 3 control, 4 user-defined).
    pub fn new(
        tokens: Vec<String>,
        scores: Vec<f32>,
        types: &[i64],
        add_space_prefix: bool,
    ) -> SpmVocab {
        let index: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let mut bytes = [None; 256];
        for (b, slot) in bytes.iter_mut().enumerate() {
            *slot = index.get(&format!("<0x{b:02X}>")).copied();
        }
        let mut specials: Vec<(String, u32)> = types
            .iter()
            .enumerate()
            .filter(|(i, &t)| (t == 3 || t == 4) && !tokens[*i].is_empty())
            .map(|(i, _)| (tokens[i].clone(), i as u32))
            .collect();
        specials.sort_by_key(|s| std::cmp::Reverse(s.0.len()));
        SpmVocab {
            tokens,
            scores,
            index,
            bytes,
            specials,
            add_space_prefix,
        }
    }

    /// Token ids of `text`.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        let mut prev_special = true;
        let mut rest = text;
        while !rest.is_empty() {
            // The next special token in the rest, earliest then longest.
            let found = self
                .specials
                .iter()
                .filter_map(|(s, id)| rest.find(s.as_str()).map(|at| (at, s.len(), *id)))
                .min_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
            let (raw, special) = match found {
                Some((at, len, id)) => (&rest[..at], Some((len, id, at))),
                None => (rest, None),
            };
            if !raw.is_empty() {
                let mut t = String::new();
                if self.add_space_prefix && prev_special {
                    t.push(' ');
                }
                t.push_str(raw);
                self.tokenize_piece(&t.replace(' ', "\u{2581}"), &mut out);
            }
            match special {
                Some((len, id, at)) => {
                    out.push(id);
                    prev_special = true;
                    rest = &rest[at + len..];
                }
                None => break,
            }
        }
        out
    }

    fn tokenize_piece(&self, text: &str, out: &mut Vec<u32>) {
        let mut symbols: Vec<Symbol> = Vec::new();
        for (i, (start, ch)) in text.char_indices().enumerate() {
            let n = ch.len_utf8();
            symbols.push(Symbol {
                start,
                n,
                prev: i as isize - 1,
                next: if start + n == text.len() {
                    -1
                } else {
                    i as isize + 1
                },
            });
        }
        if symbols.is_empty() {
            return;
        }
        let mut queue = BinaryHeap::new();
        let mut rev_merge: HashMap<&str, (usize, usize)> = HashMap::new();
        for i in 1..symbols.len() {
            self.try_add(
                text,
                i as isize - 1,
                i as isize,
                &symbols,
                &mut queue,
                &mut rev_merge,
            );
        }
        while let Some(b) = queue.pop() {
            let (l, r) = (symbols[b.left], symbols[b.right]);
            if l.n == 0 || r.n == 0 || l.n + r.n != b.size {
                continue;
            }
            symbols[b.left].n += r.n;
            symbols[b.right].n = 0;
            symbols[b.left].next = r.next;
            if r.next >= 0 {
                symbols[r.next as usize].prev = b.left as isize;
            }
            let lp = symbols[b.left].prev;
            let ln = symbols[b.left].next;
            self.try_add(
                text,
                lp,
                b.left as isize,
                &symbols,
                &mut queue,
                &mut rev_merge,
            );
            self.try_add(
                text,
                b.left as isize,
                ln,
                &symbols,
                &mut queue,
                &mut rev_merge,
            );
        }
        let mut i: isize = 0;
        while i != -1 {
            self.resegment(text, &symbols, i as usize, &rev_merge, out);
            i = symbols[i as usize].next;
        }
    }

    fn try_add<'t>(
        &self,
        text: &'t str,
        l: isize,
        r: isize,
        symbols: &[Symbol],
        queue: &mut BinaryHeap<Bigram>,
        rev: &mut HashMap<&'t str, (usize, usize)>,
    ) {
        if l < 0 || r < 0 {
            return;
        }
        let (l, r) = (l as usize, r as usize);
        let piece = &text[symbols[l].start..symbols[l].start + symbols[l].n + symbols[r].n];
        if let Some(&id) = self.index.get(piece) {
            queue.push(Bigram {
                left: l,
                right: r,
                score: self.scores[id as usize],
                size: piece.len(),
            });
            rev.insert(piece, (l, r));
        }
    }

    fn resegment(
        &self,
        text: &str,
        symbols: &[Symbol],
        i: usize,
        rev: &HashMap<&str, (usize, usize)>,
        out: &mut Vec<u32>,
    ) {
        let s = symbols[i];
        let piece = &text[s.start..s.start + s.n];
        if let Some(&id) = self.index.get(piece) {
            out.push(id);
            return;
        }
        match rev.get(piece) {
            Some(&(l, r)) => {
                self.resegment(text, symbols, l, rev, out);
                self.resegment(text, symbols, r, rev, out);
            }
            None => out.extend(piece.bytes().filter_map(|b| self.bytes[b as usize])),
        }
    }

    /// The text of `ids`: "▁" back to spaces, byte tokens to bytes; the
    /// space the tokenizer prefixed is dropped.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            let Some(t) = self.tokens.get(id as usize) else {
                continue;
            };
            match t
                .strip_prefix("<0x")
                .and_then(|h| h.strip_suffix('>'))
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                Some(b) if t.len() == 6 => bytes.push(b),
                _ => bytes.extend_from_slice(t.replace('\u{2581}', " ").as_bytes()),
            }
        }
        let s = String::from_utf8_lossy(&bytes).into_owned();
        match (self.add_space_prefix, s.strip_prefix(' ')) {
            (true, Some(rest)) => rest.to_string(),
            _ => s,
        }
    }

    /// Vocabulary size.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// True for an empty vocabulary.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

//! SentencePiece-style vocabularies (`tokenizer.ggml.model = "llama"`:
//! Llama 2, TinyLlama, Mistral), tokenized as llama.cpp's llm_tokenizer_spm
//! does: merge the highest-scoring adjacent pair first, fall back to byte
//! tokens `<0xXX>` for what no token covers.

use std::collections::{BinaryHeap, HashMap};

use aho_corasick::{AhoCorasick, MatchKind};
use hashbrown::hash_table::{Entry, HashTable};
use hashbrown::DefaultHashBuilder;
use std::hash::BuildHasher;

use crate::tokenizer::{check_piece, TokenizeError};

/// The vocabulary with scores.
#[derive(Debug, Clone)]
pub struct SpmVocab {
    tokens: Vec<String>,
    scores: Vec<f32>,
    /// Token ids by their text, hashed by `hasher`: ids only, so that the
    /// text is not held twice (262,144 strings for Gemma).
    index: HashTable<u32>,
    hasher: DefaultHashBuilder,
    bytes: [Option<u32>; 256],
    /// Control and user-defined tokens, matched whole in the input.
    specials: Vec<(String, u32)>,
    /// Finds `specials` in text, leftmost then longest; its pattern ids
    /// index `specials`. One pass over the text however many there are
    /// (Gemma has 6,414).
    matcher: AhoCorasick,
    /// Prepend a space to text at the start or after a special token.
    pub add_space_prefix: bool,
    /// The characters some token has just before a "▁" (sorted; "▁" itself
    /// for "▁▁"): text may be cut before a space that follows any other
    /// character, since no token can span that space and what precedes it.
    space_joiners: Vec<char>,
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
    /// Build from tokens, scores and token types (llama.cpp's: 3 control,
    /// 4 user-defined); the error says why the special tokens' matcher
    /// could not be built.
    pub fn new(
        tokens: Vec<String>,
        scores: Vec<f32>,
        types: &[i64],
        add_space_prefix: bool,
    ) -> Result<SpmVocab, String> {
        let hasher = DefaultHashBuilder::default();
        let mut index = HashTable::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            let hash = |id: &u32| hasher.hash_one(tokens[*id as usize].as_str());
            // The last of two alike wins, as it did in a map.
            match index.entry(
                hasher.hash_one(t.as_str()),
                |id| tokens[*id as usize] == *t,
                hash,
            ) {
                Entry::Occupied(mut e) => *e.get_mut() = i as u32,
                Entry::Vacant(e) => {
                    e.insert(i as u32);
                }
            }
        }
        let find = |text: &str| {
            index
                .find(hasher.hash_one(text), |id| tokens[*id as usize] == text)
                .copied()
        };
        let mut bytes = [None; 256];
        for (b, slot) in bytes.iter_mut().enumerate() {
            *slot = find(&format!("<0x{b:02X}>"));
        }
        let mut specials: Vec<(String, u32)> = types
            .iter()
            .enumerate()
            .filter(|(i, &t)| (t == 3 || t == 4) && !tokens[*i].is_empty())
            .map(|(i, _)| (tokens[i].clone(), i as u32))
            .collect();
        specials.sort_by_key(|s| std::cmp::Reverse(s.0.len()));
        let matcher = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(specials.iter().map(|s| s.0.as_bytes()))
            .map_err(|e| e.to_string())?;
        let mut space_joiners: Vec<char> = tokens
            .iter()
            .flat_map(|t| {
                t.char_indices()
                    .filter(|&(i, c)| t[i + c.len_utf8()..].starts_with('\u{2581}'))
                    .map(|(_, c)| c)
            })
            .collect();
        space_joiners.sort_unstable();
        space_joiners.dedup();
        Ok(SpmVocab {
            space_joiners,
            tokens,
            scores,
            index,
            hasher,
            bytes,
            specials,
            matcher,
            add_space_prefix,
        })
    }

    /// The ids of `text` handed to `each` a piece at a time: text between
    /// special tokens is cut, after at least `piece_bytes`, before a space
    /// that follows a character no token has before a "▁", so the pieces
    /// tokenize as the whole does. `each` returns false to stop. A piece
    /// over [`crate::tokenizer::MAX_UNCUT_BYTES`] is refused.
    pub(crate) fn encode_in(
        &self,
        text: &str,
        piece_bytes: usize,
        each: &mut dyn FnMut(&[u32]) -> bool,
    ) -> Result<(), TokenizeError> {
        let mut out = Vec::new();
        let mut offset = 0;
        // Raw text runs to the next special token (earliest, then longest,
        // as llama.cpp's partition finds them), then the token; raw text
        // always follows the start or a special token, so it is where a
        // space is prefixed.
        let mut found = self.matcher.find_iter(text);
        loop {
            let special = found.next();
            let raw_end = special.as_ref().map_or(text.len(), |m| m.start());
            let raw = &text[offset..raw_end];
            let mut start = 0;
            for end in self.cuts(raw, piece_bytes) {
                check_piece(offset + start, end - start)?;
                let mut t = String::new();
                if self.add_space_prefix && start == 0 {
                    t.push(' ');
                }
                t.push_str(&raw[start..end]);
                self.tokenize_piece(&t.replace(' ', "\u{2581}"), &mut out);
                start = end;
                if !each(&out) {
                    return Ok(());
                }
                out.clear();
            }
            match special {
                Some(m) => {
                    if !each(&[self.specials[m.pattern().as_usize()].1]) {
                        return Ok(());
                    }
                    offset = m.end();
                }
                None => return Ok(()),
            }
        }
    }

    /// Where `raw` may be cut into pieces of at least `piece_bytes`, and its
    /// end (nothing for empty text).
    fn cuts(&self, raw: &str, piece_bytes: usize) -> Vec<usize> {
        let mut cuts = Vec::new();
        let mut last = 0;
        let mut prev = None;
        for (at, c) in raw.char_indices() {
            // The text's spaces become "▁" before tokenizing.
            let joins = |p: char| {
                let p = if p == ' ' { '\u{2581}' } else { p };
                self.space_joiners.binary_search(&p).is_ok()
            };
            if c == ' ' && at - last >= piece_bytes && prev.is_some_and(|p| !joins(p)) {
                cuts.push(at);
                last = at;
            }
            prev = Some(c);
        }
        if last < raw.len() {
            cuts.push(raw.len());
        }
        cuts
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
        if let Some(id) = self.id(piece) {
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
        if let Some(id) = self.id(piece) {
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

    /// The id of the token whose text is `text`.
    fn id(&self, text: &str) -> Option<u32> {
        self.index
            .find(self.hasher.hash_one(text), |id| {
                self.tokens[*id as usize] == text
            })
            .copied()
    }

    /// Whether every byte has its token (`<0xXX>`), so that no text is
    /// dropped for want of one.
    pub fn spells_every_byte(&self) -> bool {
        self.bytes.iter().all(|b| b.is_some())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(extra: &[&str]) -> SpmVocab {
        let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>", "\u{2581}", "a", "b", "c", "1"]
            .iter()
            .chain(
                [
                    "\u{2581}a",
                    "ab",
                    "\u{2581}ab",
                    "abc",
                    "\u{2581}abc",
                    "bc",
                    "\u{2581}\u{2581}",
                ]
                .iter(),
            )
            .chain(extra)
            .map(|s| s.to_string())
            .collect();
        tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
        let scores: Vec<f32> = (0..tokens.len()).map(|i| -(i as f32)).collect();
        let types: Vec<i64> = (0..tokens.len())
            .map(|i| if i == 1 || i == 2 { 3 } else { 1 })
            .collect();
        SpmVocab::new(tokens, scores, &types, true).unwrap()
    }

    /// Cut before every space that follows a non-space, text tokenizes as
    /// the whole does; a vocabulary with a token across such a space is
    /// not cut.
    #[test]
    fn text_cut_before_spaces_tokenizes_as_the_whole() {
        let text = "abc ab  a b c1 <s>abc  abc</s> a\u{e9} bc\n ab ".repeat(50);
        let each = |v: &SpmVocab, piece_bytes: usize| {
            let mut ids = Vec::new();
            let mut calls = 0;
            v.encode_in(&text, piece_bytes, &mut |p| {
                ids.extend_from_slice(p);
                calls += 1;
                true
            })
            .unwrap();
            (ids, calls)
        };
        let v = vocab(&[]);
        let (whole, few) = each(&v, usize::MAX);
        let (cut, many) = each(&v, 1);
        assert_eq!(cut, whole);
        assert!(many > few + 300, "{many} pieces, {few} whole");
        // A token across "c " keeps that space from being a cut, and only
        // that one.
        let spanning = vocab(&["c\u{2581}a"]);
        assert_eq!(spanning.space_joiners, ['c', '\u{2581}']);
        let (whole, few) = each(&spanning, usize::MAX);
        let (cut, many) = each(&spanning, 1);
        assert_eq!(cut, whole);
        assert!(many > few + 250, "{many} pieces, {few} whole");
        let ids = |v: &SpmVocab, text: &str, piece_bytes| {
            let mut ids = Vec::new();
            v.encode_in(text, piece_bytes, &mut |p| {
                ids.extend_from_slice(p);
                true
            })
            .unwrap();
            ids
        };
        let c_a = spanning.len() as u32 - 257;
        let text = "c a1 ab c ab1 a".repeat(20);
        assert_eq!(ids(&spanning, &text, 1), ids(&spanning, &text, usize::MAX));
        assert_eq!(
            ids(&spanning, &text, 1)
                .iter()
                .filter(|&&i| i == c_a)
                .count(),
            20
        );
        // A literal "▁" in the text stands for a space, so "▁ " is no cut
        // where "▁▁" is a token.
        let marks = "a\u{2581} 1".repeat(20);
        assert_eq!(ids(&v, &marks, 1), ids(&v, &marks, usize::MAX));
        assert_eq!(ids(&v, &marks, 1).iter().filter(|&&i| i == 14).count(), 20);
    }
}

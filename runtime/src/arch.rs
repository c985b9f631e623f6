//! Model architectures as llama.cpp names them in `general.architecture`.

use std::fmt;

/// An architecture lorafold can convert and run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Architecture {
    /// Llama 2/3, TinyLlama, SmolLM, and Mistral (llama.cpp converts Mistral to "llama").
    Llama,
    /// Qwen2: attention biases, no q/k row permutation.
    Qwen2,
}

impl Architecture {
    /// Parse `general.architecture`.
    pub fn from_gguf_name(name: &str) -> Option<Architecture> {
        match name {
            "llama" => Some(Architecture::Llama),
            "qwen2" => Some(Architecture::Qwen2),
            _ => None,
        }
    }

    /// The `general.architecture` value.
    pub fn gguf_name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
        }
    }

    /// Whether llama.cpp's HF converter permutes the rows of q and k for this
    /// architecture (to suit its RoPE), so deltas must be permuted to match.
    pub fn permutes_qk(self) -> bool {
        matches!(self, Architecture::Llama)
    }
}

impl fmt::Display for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.gguf_name())
    }
}

/// For each destination row of a q or k projection with `rows` rows and
/// `n_head` heads, the source row in HF order: llama.cpp's
/// `reshape(n_head, 2, rows/n_head/2, in).swapaxes(1, 2)`.
pub fn qk_permutation(rows: usize, n_head: usize) -> Vec<usize> {
    let head_dim = rows / n_head;
    let half = head_dim / 2;
    let mut src = Vec::with_capacity(rows);
    for h in 0..n_head {
        for j in 0..half {
            for t in 0..2 {
                src.push(h * head_dim + t * half + j);
            }
        }
    }
    src
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_interleaves_halves_per_head() {
        // One head of 8 rows: HF [0..4 | 4..8] halves become pairs (0,4),(1,5),...
        assert_eq!(qk_permutation(8, 1), [0, 4, 1, 5, 2, 6, 3, 7]);
        assert_eq!(qk_permutation(8, 2), [0, 2, 1, 3, 4, 6, 5, 7]);
    }
}

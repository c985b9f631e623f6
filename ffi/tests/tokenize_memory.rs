//! Long text costs memory near its size, not a hundred times it: on
//! SmolLM2, `lorafold_tokenize` counts 8 MB of digits (8 million tokens)
//! a piece at a time, and `lorafold_generate` refuses such a prompt for
//! the context before tokenizing it; a run with no place to cut (256 KB of
//! letters) is refused rather than tokenized whole. Alone in its test binary, so no other
//! test allocates while it reads the process's peak resident memory.

use std::ffi::CString;
use std::ptr::{null, null_mut};

use lorafold::*;

mod common;
use common::{c, message, smollm2};

/// The process's peak resident memory since the last [`reset_peak`], bytes.
fn peak() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

/// Start the peak over from the resident memory now (Linux's clear_refs 5).
fn reset_peak() {
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
}

/// lorafold_runtime::tokenizer::MAX_UNCUT_BYTES, as the message states it.
const MAX_UNCUT: usize = 256 << 10;

#[test]
fn long_text_is_tokenized_in_pieces_and_a_prompt_too_long_is_refused_untokenized() {
    const BYTES: usize = 8 << 20;
    let path = c(smollm2().to_str().unwrap());
    let digits = CString::new("0123456789".repeat(BYTES / 10)).unwrap();
    let (mut m, mut s) = (null_mut(), null_mut());
    unsafe {
        assert_eq!(
            lorafold_model_load(path.as_ptr(), 1, 64, &mut m),
            LORAFOLD_OK,
            "{}",
            message()
        );
        assert_eq!(lorafold_session_new(m, &mut s), LORAFOLD_OK);
        // Warm up the allocator and the tokenizer on a little text.
        let mut ids = [0u32; 16];
        let mut n = 0usize;
        let short = CString::new("12345").unwrap();
        assert_eq!(
            lorafold_tokenize(m, short.as_ptr(), ids.as_mut_ptr(), 16, &mut n),
            LORAFOLD_OK
        );
        // SmolLM2 splits every digit and adds no BOS.
        assert_eq!(&ids[..n], &[33, 34, 35, 36, 37]);

        reset_peak();
        let before = peak();
        let status = lorafold_tokenize(m, digits.as_ptr(), ids.as_mut_ptr(), 16, &mut n);
        let grew = peak().saturating_sub(before);
        assert_eq!(status, LORAFOLD_ERR_BUFFER, "{}", message());
        assert_eq!(n, digits.as_bytes().len() - digits.as_bytes().len() % 10);
        assert_eq!(&ids[..5], &[32, 33, 34, 35, 36]);
        // Whole, the tokenizer's working memory was ~380 bytes a byte of
        // digits (3 GB here); a piece at a time, under 1 MB.
        eprintln!("tokenizing 8 MB of digits grew the peak by {grew} bytes");
        assert!(
            grew < 16 << 20,
            "tokenizing 8 MB grew the peak by {grew} bytes"
        );

        reset_peak();
        let before = peak();
        let status = lorafold_generate(s, digits.as_ptr(), null(), None, null_mut(), null_mut());
        let grew = peak().saturating_sub(before);
        assert_eq!(status, LORAFOLD_ERR_CONTEXT);
        let m_ = message();
        assert!(
            m_.contains(&format!(
                "the prompt's {} bytes make at least",
                BYTES - BYTES % 10
            )) && m_.contains("room for 64 of its 64"),
            "{m_}"
        );
        eprintln!("refusing them as a prompt grew it by {grew} bytes");
        assert!(
            grew < 4 << 20,
            "refusing 8 MB grew the peak by {grew} bytes"
        );
        // A run with no place to cut is refused past its limit, not paid
        // for (a run of letters: ~75 bytes a byte).
        let run = CString::new("a".repeat(MAX_UNCUT + 1)).unwrap();
        reset_peak();
        let before = peak();
        let status = lorafold_tokenize(m, run.as_ptr(), ids.as_mut_ptr(), 16, &mut n);
        let grew = peak().saturating_sub(before);
        let m_ = message();
        assert_eq!(status, LORAFOLD_ERR_INVALID, "{m_}");
        assert!(
            m_.contains(&format!(
                "the text's {} bytes from byte 0 have no place",
                MAX_UNCUT + 1
            )) && m_.contains(&format!("over the {MAX_UNCUT} one piece may have")),
            "{m_}"
        );
        assert!(
            grew < 4 << 20,
            "refusing a run grew the peak by {grew} bytes"
        );
        let run = CString::new("a".repeat(MAX_UNCUT)).unwrap();
        assert_eq!(
            lorafold_tokenize(m, run.as_ptr(), ids.as_mut_ptr(), 16, &mut n),
            LORAFOLD_ERR_BUFFER
        );
        // The session is as it was: a prompt that fits runs.
        let (mut used, mut size) = (0usize, 0usize);
        assert_eq!(lorafold_session_used(s, &mut used, &mut size), LORAFOLD_OK);
        assert_eq!((used, size), (0, 64));

        assert_eq!(lorafold_session_free(s), LORAFOLD_OK);
        assert_eq!(lorafold_model_free(m), LORAFOLD_OK);
    }
}

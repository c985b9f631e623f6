//! Reading the inputs: a base model (GGUF or an HF folder), a PEFT adapter,
//! their tokenizers, and the hashes that record them.

pub mod base;
pub mod hf_tokenizer;
pub mod peft;
pub mod safetensors_dir;

use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;

/// The sha256 of a file's bytes, in hex, read in 1 MiB pieces.
pub fn sha256_of(path: &Path) -> std::io::Result<String> {
    let mut f = lorafold_runtime::input::open_regular(path, "a file")?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

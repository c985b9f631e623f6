//! Reading the inputs: a base model (GGUF or an HF folder), a PEFT adapter,
//! their tokenizers, and the hashes that record them.

pub mod base;
pub mod hf_tokenizer;
pub mod peft;
pub mod safetensors_dir;

use sha2::{Digest, Sha256};
use std::path::Path;

/// The sha256 of a file's bytes, in hex. Read through a mapping, a piece
/// at a time, each piece's pages dropped from this process once hashed: a
/// 7B base is hashed beside its conversion, and `read` copying it through
/// the kernel cost 3 s of system time there.
pub fn sha256_of(path: &Path) -> std::io::Result<String> {
    let f = lorafold_runtime::input::open_regular(path, "a file")?;
    let mut h = Sha256::new();
    if f.metadata()?.len() > 0 {
        // SAFETY: the mapping is read-only and private to this function; a
        // file changed underneath would give a wrong hash, as a read would.
        let map = unsafe { memmap2::Mmap::map(&f)? };
        let _ = map.advise(memmap2::Advice::Sequential);
        for piece in map.chunks(HASH_PIECE) {
            h.update(piece);
            crate::read::base::release_mapped(piece);
        }
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Bytes hashed between releases of their pages.
const HASH_PIECE: usize = 8 << 20;

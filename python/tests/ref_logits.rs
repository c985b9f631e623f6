//! Logits of every position of token ids from lorafold-runtime's own API,
//! written as little-endian f32 to stdout: what python/tests compares the
//! Python module's `Session.logits(all=True)` with.
//!
//! ref_logits MODEL.gguf[+ADAPTER.gguf[:SCALE]] THREADS ID,ID,...

use candle_core::Device;
use lorafold_runtime::model::SessionOptions;
use lorafold_runtime::path_spec::PathSpec;
use std::io::Write;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, spec, threads, ids] = &args[..] else {
        return Err("usage: ref_logits MODEL[+ADAPTER[:SCALE]] THREADS ID,ID,...".into());
    };
    let spec: PathSpec = spec.parse()?;
    let ids: Vec<u32> = ids.split(',').map(str::parse).collect::<Result<_, _>>()?;
    let model = spec.load(&Device::Cpu)?;
    let mut session = model.session_with(SessionOptions {
        threads: Some(threads.parse()?),
        ..SessionOptions::new(ids.len())
    })?;
    let logits = session.logits(&ids, true)?;
    let bytes: Vec<u8> = logits.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::io::stdout().write_all(&bytes)?;
    Ok(())
}

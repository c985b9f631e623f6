//! Generate with a LoRA adapter attached at scale 1, then at scale 0 (the
//! base alone), through lorafold's Rust API: what examples/c/generate.c
//! does through the C one, line for line.
//!
//!   cargo run --release --example generate -- MODEL.gguf ADAPTER.gguf "What is the capital of Portugal?"

use std::io::Write;

use candle_core::Device;
use lorafold_runtime::generate::{generate, Sampler, SamplerConfig};
use lorafold_runtime::lora::LoraAdapter;
use lorafold_runtime::model::Model;
use lorafold_runtime::tokenizer::Tokenizer;

fn answer(model: &Model, tok: &Tokenizer, prompt: &str, label: &str) -> anyhow::Result<()> {
    let ids = tok
        .encode(&tok.chat_prompt(prompt).unwrap_or_else(|| prompt.into()))
        .map_err(anyhow::Error::msg)?;
    let mut session = model.session(256)?;
    print!("[{label}] ");
    let mut stdout = std::io::stdout();
    generate(
        &mut session,
        tok,
        &ids,
        40,
        &mut Sampler::new(SamplerConfig::default()),
        &[],
        &mut |piece| {
            print!("{piece}");
            let _ = stdout.flush();
            true // false stops generation
        },
    )?;
    println!();
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, model_path, adapter_path, prompt] = args.as_slice() else {
        anyhow::bail!("usage: generate MODEL.gguf ADAPTER.gguf PROMPT");
    };
    let mut model = Model::load(model_path, &Device::Cpu)?;
    let tok = Tokenizer::from_gguf(model.file())?;
    let slot = model.attach(&LoraAdapter::load(adapter_path)?, 1.0)?;
    answer(&model, &tok, prompt, "scale 1")?;
    model.set_scale(slot, 0.0)?;
    answer(&model, &tok, prompt, "scale 0")?;
    Ok(())
}

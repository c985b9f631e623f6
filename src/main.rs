//! `lorafold`: the command line over lorafold-converter and lorafold-runtime.

mod bench;
mod convert;
mod demo;
mod drift;
mod inspect;
mod run;

use clap::{Parser, Subcommand};

/// Ship LoRA-fine-tuned LLMs to devices.
#[derive(Parser)]
#[command(name = "lorafold", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Merge a PEFT adapter into a base and quantize to one GGUF (or quantize a base alone).
    Convert(convert::ConvertArgs),
    /// Generate text with a GGUF model, optionally with LoRA adapters attached.
    Run(run::RunArgs),
    /// Time load, first token, prefill and decode for each path, side by side.
    Bench(bench::BenchArgs),
    /// The main job on the real model: convert an example adapter both ways, generate, and compare drift and latency.
    Demo(demo::DemoArgs),
    /// Measure how far each path drifts from a reference over the same text.
    Drift(drift::DriftArgs),
    /// Describe a GGUF model or adapter, a PEFT adapter folder, or a safetensors file / HF model folder.
    Inspect(inspect::InspectArgs),
}

fn main() {
    #[cfg(unix)]
    // SAFETY: called first thing, before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Convert(args) => convert::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Demo(args) => demo::run(&args),
        Command::Drift(args) => drift::run(&args),
        Command::Inspect(args) => inspect::run(&args),
        Command::Run(args) => run::run(&args),
    };
    if let Err(e) = result {
        eprintln!("error: {}", one_line(&e));
        std::process::exit(1);
    }
}

/// The error and its causes on one line, skipping causes whose text the
/// message already includes (our library errors embed their source).
fn one_line(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !msg.contains(&text) {
            if !msg.is_empty() {
                msg.push_str(": ");
            }
            msg.push_str(&text);
        }
    }
    msg
}

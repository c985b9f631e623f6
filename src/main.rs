//! `lorafold`: the command line over lorafold-converter and lorafold-runtime.

mod bench;
mod calibrate;
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
    Convert(Box<convert::ConvertArgs>),
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
    /// Accumulate XᵀX of every linear layer's input over a text (for drift-aware rounding).
    Calibrate(calibrate::CalibrateArgs),
}

fn main() {
    #[cfg(unix)]
    // SAFETY: called first thing, before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    #[cfg(unix)]
    remove_partials_on_signal();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Convert(args) => convert::run(&args),
        Command::Calibrate(args) => calibrate::run(&args),
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

/// On SIGINT or SIGTERM, remove the partial outputs being written (a killed
/// conversion would otherwise leave hundreds of MB of `.NAME.PID.XXXXXX.partial`)
/// and exit as a shell reports death by that signal (128 + signal).
#[cfg(unix)]
fn remove_partials_on_signal() {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) else {
        return; // without the handler a signal kills us as before
    };
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            lorafold_converter::output::remove_live_partials();
            std::process::exit(128 + sig);
        }
    });
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

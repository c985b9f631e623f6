//! `lorafold`: the command line over lorafold-converter and lorafold-runtime.

mod bench;
mod calibrate;
mod convert;
mod demo;
mod drift;
mod inspect;
mod run;
mod values;

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
    // Once SIGINT or SIGTERM arrived, the signal's thread ends the process
    // with the signal's status, whatever the command made of its removed
    // partials (a failed rename, most often).
    #[cfg(unix)]
    while SIGNALLED.load(std::sync::atomic::Ordering::SeqCst) {
        std::thread::park();
    }
    if let Err(e) = result {
        // One line, the hint (a flag to reach for) at its end.
        match hint(&e) {
            Some(h) => eprintln!("error: {} (hint: {h})", one_line(&e)),
            None => eprintln!("error: {}", one_line(&e)),
        }
        std::process::exit(1);
    }
}

/// Set when SIGINT or SIGTERM arrived: the process is ending by it.
#[cfg(unix)]
static SIGNALLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

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
            SIGNALLED.store(true, std::sync::atomic::Ordering::SeqCst);
            lorafold_converter::write::output::remove_live_partials();
            std::process::exit(128 + sig);
        }
    });
}

/// What to type next, for the library errors whose remedy is a flag (the
/// libraries name facts; the flags are the CLI's).
fn hint(e: &anyhow::Error) -> Option<&'static str> {
    use lorafold_converter::calib::CalibError;
    use lorafold_converter::convert::ConvertError;
    use lorafold_converter::round::quant::QuantError;
    use lorafold_converter::write::adapter_gguf::AdapterError;
    use lorafold_converter::write::gguf_writer::WriteError;
    const RECALIBRATE: &str = "make statistics of this model with `lorafold calibrate MODEL.gguf --text TEXT -o STATS.gguf`, or calibrate in the run with --calib-text";
    use lorafold_runtime::generate::PromptError;
    use lorafold_runtime::model::RuntimeError;
    e.chain().find_map(|cause| {
        if let Some(c) = cause.downcast_ref::<ConvertError>() {
            return match c {
                ConvertError::ModifiedBase { .. } => {
                    Some("--force merges it anyway, for a base that is the modified one")
                }
                // A drift budget's failure carries its rounds; the bounds' does not.
                ConvertError::Budget(_, report) if report.budget.is_none() => {
                    Some("the bounds are --max-rel-error and --min-retention")
                }
                ConvertError::NoAdapter => Some("give the adapter folder with --adapter"),
                ConvertError::Quant(QuantError::UnmatchedOverride { .. }) => Some(
                    "a --tensor-type pattern is a regex over tensor names as `lorafold inspect` lists them",
                ),
                ConvertError::Write(WriteError::NotFinite { .. })
                | ConvertError::Adapter(AdapterError::Write(WriteError::NotFinite { .. }))
                | ConvertError::Written { .. } => Some(
                    "a wider type holds larger values: f32 with --quant, --tensor-type or --adapter-type",
                ),
                ConvertError::Calib(CalibError::File { .. }) => Some(RECALIBRATE),
                _ => None,
            };
        }
        if let Some(p) = cause.downcast_ref::<PromptError>() {
            return match p {
                PromptError::Empty => Some("give some text with -p"),
                PromptError::TooLong { .. }
                | PromptError::TextTooLong { .. }
                | PromptError::ContextFull { .. } => Some("a larger --ctx holds more"),
                _ => None,
            };
        }
        if let Some(CalibError::File { .. }) = cause.downcast_ref::<CalibError>() {
            return Some(RECALIBRATE);
        }
        match cause.downcast_ref::<RuntimeError>() {
            Some(RuntimeError::AdapterNotModel { .. }) => Some(
                "attach an adapter with --lora ADAPTER.gguf[:SCALE], or MODEL.gguf+ADAPTER.gguf",
            ),
            _ => None,
        }
    })
}

/// The error and its causes on one line, skipping causes whose text the
/// message already includes (our library errors embed their source), with
/// control characters escaped: errors quote names from files, and a tensor
/// named "\x1b[2J" must not clear the terminal (or a newline split the line).
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
    lorafold_runtime::input::escape_controls(&msg).into_owned()
}

/// The files a path spec reads (its model, then its adapters), each named
/// `what` in messages: the inputs an output must not replace.
fn spec_files<'a>(
    spec: &'a lorafold_runtime::path_spec::PathSpec,
    what: &'a str,
) -> Vec<(&'a str, &'a std::path::Path)> {
    std::iter::once(spec.model.as_path())
        .chain(spec.adapters.iter().map(|a| a.path.as_path()))
        .map(|p| (what, p))
        .collect()
}

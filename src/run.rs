//! `lorafold run`.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use lorafold_runtime::generate::{generate, Sampler, SamplerConfig};
use lorafold_runtime::lora::LoraAdapter;
use lorafold_runtime::model::Model;
use lorafold_runtime::tokenizer::Tokenizer;

/// Arguments of `lorafold run`.
#[derive(clap::Args)]
pub struct RunArgs {
    /// A GGUF model (merged, or a base for --lora).
    model: PathBuf,
    /// A GGUF LoRA adapter to attach, optionally with a scale: ADAPTER.gguf[:SCALE]. Repeatable.
    #[arg(long = "lora", value_name = "ADAPTER[:SCALE]")]
    lora: Vec<String>,
    /// The prompt.
    #[arg(short, long)]
    prompt: Option<String>,
    /// Use the model's chat format; without -p, read user turns from stdin.
    #[arg(long)]
    chat: bool,
    /// Tokens to generate.
    #[arg(short = 'n', long, default_value_t = 64)]
    n: usize,
    /// Temperature (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    temp: f64,
    /// Top-k (0: off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Top-p (1: off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Repeat penalty (1: off).
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// Sampling seed.
    #[arg(long, default_value_t = 299792458)]
    seed: u64,
    /// Stop when the output ends with this text. Repeatable.
    #[arg(long)]
    stop: Vec<String>,
    /// cpu, cuda[:N] or metal.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// CPU threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Context size for the KV cache.
    #[arg(long, default_value_t = 2048)]
    ctx: usize,
}

/// Parse --device.
pub fn device(spec: &str) -> Result<Device> {
    Ok(match spec {
        "cpu" => Device::Cpu,
        "metal" => Device::new_metal(0).context("metal device (build with --features metal)")?,
        s if s == "cuda" || s.starts_with("cuda:") => {
            let n = s
                .strip_prefix("cuda:")
                .map_or(Ok(0), str::parse)
                .context("cuda device number")?;
            Device::new_cuda(n).context("cuda device (build with --features cuda)")?
        }
        other => bail!("unknown device '{other}' (cpu, cuda[:N], metal)"),
    })
}

/// Set the CPU thread count before any work starts.
pub fn set_threads(threads: Option<usize>) -> Result<()> {
    if let Some(n) = threads {
        // candle's kernels size their work by RAYON_NUM_THREADS.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("setting up threads")?;
    }
    Ok(())
}

/// Split "PATH[:SCALE]".
pub fn lora_spec(spec: &str) -> Result<(PathBuf, f64)> {
    match spec.rsplit_once(':') {
        Some((p, s)) if s.parse::<f64>().is_ok() => Ok((PathBuf::from(p), s.parse()?)),
        _ => Ok((PathBuf::from(spec), 1.0)),
    }
}

/// Run `lorafold run`.
pub fn run(args: &RunArgs) -> Result<()> {
    set_threads(args.threads)?;
    let dev = device(&args.device)?;
    let t0 = Instant::now();
    let mut model = Model::load(&args.model, &dev)?;
    let tokenizer = Tokenizer::from_gguf(model.file())?;
    for spec in &args.lora {
        let (path, scale) = lora_spec(spec)?;
        let adapter = LoraAdapter::load(&path)?;
        model.attach(&adapter, scale)?;
    }
    let load = t0.elapsed();
    let mut session = model.session(args.ctx)?;
    let sampler_config = SamplerConfig {
        temperature: args.temp,
        top_k: args.top_k,
        top_p: args.top_p,
        repeat_penalty: args.repeat_penalty,
        seed: args.seed,
    };
    let mut sampler = Sampler::new(sampler_config);
    let turns: Vec<String> = match (&args.prompt, args.chat) {
        (Some(p), _) => vec![p.clone()],
        (None, true) => std::io::stdin()
            .lock()
            .lines()
            .collect::<std::io::Result<_>>()?,
        (None, false) => bail!("give a prompt with -p, or --chat to read turns from stdin"),
    };
    let mut stdout = std::io::stdout();
    for turn in turns {
        let text = if args.chat {
            tokenizer
                .chat_prompt(&turn)
                .context("the model has no chat template lorafold knows (ChatML, Llama 3)")?
        } else {
            turn
        };
        let ids = tokenizer.encode(&text).map_err(anyhow::Error::msg)?;
        if !args.chat {
            print!("{text}");
        }
        let (_, stats) = generate(
            &mut session,
            &tokenizer,
            &ids,
            args.n,
            &mut sampler,
            &args.stop,
            &mut |piece| {
                print!("{piece}");
                let _ = stdout.flush();
            },
        )?;
        println!();
        // Close the assistant's turn so the next one follows the template.
        if let (true, Some(end)) = (args.chat, tokenizer.chat_turn_end()) {
            let mut ids = tokenizer.encode(end).map_err(anyhow::Error::msg)?;
            if tokenizer.add_bos && tokenizer.bos.is_some() {
                ids.remove(0);
            }
            session.forward(&ids, false)?;
        }
        eprintln!(
            "load {:.0} ms | ttft {:.0} ms | prefill {} tok at {:.1} tok/s | decode {} tok at {:.1} tok/s",
            load.as_secs_f64() * 1e3,
            stats.time_to_first_token.as_secs_f64() * 1e3,
            stats.prompt_tokens,
            stats.prefill_tps(),
            stats.generated,
            stats.decode_tps()
        );
    }
    Ok(())
}

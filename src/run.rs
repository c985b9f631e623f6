//! `lorafold run`.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use lorafold_runtime::cpu::KvType;
use lorafold_runtime::device::DeviceSpec;
use lorafold_runtime::generate::{close_turn, generate, prompt_ids, Sampler, SamplerConfig};
use lorafold_runtime::lora::LoraAdapter;
use lorafold_runtime::model::{
    check_scale, default_threads, use_threads, OpenedModel, SessionOptions,
};
use lorafold_runtime::path_spec::{AdapterSpec, PathSpec};
use lorafold_runtime::text::read_text_from;

/// Arguments of `lorafold run`.
#[derive(clap::Args)]
pub struct RunArgs {
    /// A GGUF model (merged, or a base for --lora), with adapters attached:
    /// MODEL.gguf[+ADAPTER.gguf[:SCALE]]...
    model: PathSpec,
    /// A GGUF LoRA adapter to attach, optionally with a scale: ADAPTER.gguf[:SCALE]
    /// (finite, |SCALE| <= 100; default 1). Repeatable.
    #[arg(long = "lora", value_name = "ADAPTER[:SCALE]")]
    lora: Vec<AdapterSpec>,
    /// The prompt.
    #[arg(short, long)]
    prompt: Option<String>,
    /// Use the model's chat format; without -p, read user turns from stdin.
    #[arg(long)]
    chat: bool,
    /// Tokens to generate.
    #[arg(short = 'n', long, default_value_t = 64)]
    n: usize,
    /// Temperature (0: greedy; finite, >= 0).
    #[arg(long, default_value_t = 0.0)]
    temp: f64,
    /// Top-k (0: off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Top-p, in (0, 1] (1: off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Repeat penalty, finite and > 0 (1: off).
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
    device: DeviceSpec,
    /// CPU threads (default: all cores; at most 4 per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Context size for the KV cache (default: 2048, or the model's context
    /// length if smaller; at most the model's context length).
    #[arg(long)]
    ctx: Option<usize>,
    /// KV cache type on the CPU engine: f16 (half the memory, as llama.cpp) or f32.
    #[arg(long, default_value = "f16")]
    kv: KvType,
}

/// Open --device, saying which build feature a GPU needs.
pub fn device(spec: DeviceSpec) -> Result<Device> {
    spec.open().with_context(|| match spec {
        DeviceSpec::Cpu => "the cpu device".to_string(),
        DeviceSpec::Cuda(_) => format!("{spec} (build with --features cuda)"),
        DeviceSpec::Metal => format!("{spec} (build with --features metal)"),
    })
}

/// Set the CPU thread count before any work starts.
pub fn set_threads(threads: Option<usize>) -> Result<()> {
    threads.map_or(Ok(()), |n| Ok(use_threads(n)?))
}

/// Run `lorafold run`.
pub fn run(args: &RunArgs) -> Result<()> {
    set_threads(args.threads)?;
    let dev = device(args.device)?;
    let sampler_config = SamplerConfig {
        temperature: args.temp,
        top_k: args.top_k,
        top_p: args.top_p,
        repeat_penalty: args.repeat_penalty,
        seed: args.seed,
    };
    let mut sampler = Sampler::try_new(sampler_config)?;
    if args.prompt.is_none() && !args.chat {
        bail!("give a prompt with -p, or --chat to read turns from stdin");
    }
    // Everything that can be refused is, before the weights are read (at
    // 7B a load is 20 s and 4.7 GB): the file's header and tokenizer, the
    // adapters against its shapes, the context.
    let t0 = Instant::now();
    let opened = OpenedModel::open(&args.model.model)?;
    let tokenizer = opened.tokenizer()?;
    // The path's own adapters, then those of --lora, in order.
    let specs = (args.model.adapters.iter().map(|a| ("", a)))
        .chain(args.lora.iter().map(|a| ("--lora ", a)));
    let mut adapters = Vec::new();
    for (flag, spec) in specs {
        let adapter = LoraAdapter::load(&spec.path)?;
        check_scale(spec.scale)
            .and_then(|()| adapter.check_fits_opened(&opened))
            .with_context(|| format!("{flag}{spec}"))?;
        adapters.push((flag, spec, adapter));
    }
    let ctx = args
        .ctx
        .unwrap_or_else(|| opened.config.context_length.clamp(1, 2048));
    let threads = default_threads();
    if dev.is_cpu() {
        opened
            .check_context(ctx, threads, args.kv)
            .with_context(|| format!("--ctx {ctx}"))?;
    }
    let mut model = opened.load(&dev)?;
    for (flag, spec, adapter) in &adapters {
        model
            .attach(adapter, spec.scale)
            .with_context(|| format!("{flag}{spec}"))?;
    }
    let load = t0.elapsed();
    let mut session = model
        .session_with(SessionOptions {
            kv: args.kv,
            ..SessionOptions::new(ctx)
        })
        .with_context(|| format!("--ctx {ctx}"))?;
    let turns: Vec<String> = match (&args.prompt, args.chat) {
        (Some(p), _) => vec![p.clone()],
        (None, true) => read_text_from(std::io::stdin().lock(), Path::new("stdin"))?
            .lines()
            .map(str::to_owned)
            .collect(),
        (None, false) => Vec::new(),
    };
    let mut stdout = std::io::stdout();
    for turn in turns {
        let ids = prompt_ids(&session, &tokenizer, &turn, args.chat)?;
        if !args.chat {
            print!("{turn}");
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
                true
            },
        )?;
        println!();
        if stats.context_full {
            eprintln!(
                "stopped after {} tokens: the context of {} positions is full (--ctx)",
                stats.generated,
                session.max_tokens()
            );
        }
        if args.chat {
            close_turn(&mut session, &tokenizer)?;
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

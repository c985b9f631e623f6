//! `lorafold inspect`.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use lorafold_converter::read::peft::{PeftAdapter, PeftSummary};
use lorafold_converter::read::safetensors_dir::SafetensorsSummary;
use lorafold_runtime::gguf::{GgufFile, GGUF_MAGIC};
use lorafold_runtime::input::escape_controls;
use lorafold_runtime::summary::GgufSummary;
use serde::Serialize;

/// `println!` for lines that show strings from the file (names, metadata,
/// token text): control characters are escaped, so that a terminal shows
/// an escape sequence in a tensor name instead of obeying it.
macro_rules! say {
    ($($arg:tt)*) => {
        println!("{}", escape_controls(&format!($($arg)*)))
    };
}

/// JSON text with the control characters serde_json leaves raw in strings
/// (DEL and C1, such as U+009B, a terminal's CSI) written as `\u` escapes:
/// the same JSON value, safe on a terminal.
fn json_controls_escaped(json: &str) -> String {
    json.chars()
        .map(|c| match c {
            '\n' => c.to_string(),
            c if c.is_control() => format!("\\u{:04x}", c as u32),
            c => c.to_string(),
        })
        .collect()
}

/// Arguments of `lorafold inspect`.
#[derive(clap::Args)]
pub struct InspectArgs {
    /// A .gguf file, a PEFT adapter folder, a .safetensors file or an HF model folder.
    path: PathBuf,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
}

/// What PATH turned out to be.
// Built once per run, so the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Serialize)]
#[serde(tag = "format", rename_all = "snake_case")]
enum Report {
    Gguf(GgufSummary),
    PeftAdapter(PeftSummary),
    Safetensors(SafetensorsSummary),
}

/// Run `lorafold inspect`.
pub fn run(args: &InspectArgs) -> Result<()> {
    let report = load(&args.path)?;
    if args.json {
        println!(
            "{}",
            json_controls_escaped(&serde_json::to_string_pretty(&report)?)
        );
        return Ok(());
    }
    match &report {
        Report::Gguf(s) => print_gguf(s),
        Report::PeftAdapter(s) => print_peft(s),
        Report::Safetensors(s) => print_safetensors(s),
    }
    Ok(())
}

fn load(path: &Path) -> Result<Report> {
    if path.is_dir() {
        if path.join("adapter_config.json").exists() || path.join("adapter_model.bin").exists() {
            let adapter = PeftAdapter::open(path)?;
            return Ok(Report::PeftAdapter(PeftSummary::of(&adapter)));
        }
        return Ok(Report::Safetensors(SafetensorsSummary::of(path)?));
    }
    let mut magic = [0u8; 4];
    let mut f = lorafold_runtime::input::open_regular(path, "a file")
        .with_context(|| format!("{}", path.display()))?;
    let n = f
        .read(&mut magic)
        .with_context(|| format!("{}", path.display()))?;
    if n == 4 && magic == GGUF_MAGIC {
        let file = GgufFile::open(path)?;
        return Ok(Report::Gguf(GgufSummary::of(&file)));
    }
    if path.extension().is_some_and(|e| e == "safetensors") {
        return Ok(Report::Safetensors(SafetensorsSummary::of(path)?));
    }
    bail!(
        "{}: not a GGUF file, a .safetensors file, a PEFT adapter folder or an HF model folder",
        path.display()
    )
}

fn print_gguf(s: &GgufSummary) {
    say!(
        "{}  (GGUF v{}, {})",
        s.path,
        s.version,
        human_bytes(s.file_size)
    );
    say!("  kind          {}", s.kind);
    if let Some(a) = &s.architecture {
        say!("  architecture  {a}");
    }
    if let Some(n) = &s.name {
        say!("  name          {n}");
    }
    let h = &s.hyperparameters;
    let rows: [(&str, Option<String>); 10] = [
        ("blocks", h.block_count.map(|v| v.to_string())),
        ("context", h.context_length.map(|v| v.to_string())),
        ("width", h.embedding_length.map(|v| v.to_string())),
        ("ffn width", h.feed_forward_length.map(|v| v.to_string())),
        ("heads", h.head_count.map(|v| v.to_string())),
        ("kv heads", h.head_count_kv.map(|v| v.to_string())),
        ("rope dims", h.rope_dimension_count.map(|v| v.to_string())),
        ("rope base", h.rope_freq_base.map(|v| v.to_string())),
        ("rms eps", h.rms_norm_eps.map(|v| format!("{v:e}"))),
        ("vocabulary", h.vocab_size.map(|v| v.to_string())),
    ];
    for (k, v) in rows {
        if let Some(v) = v {
            say!("  {k:<13} {v}");
        }
    }
    if let Some(t) = &s.tokenizer {
        let ids: Vec<String> = t
            .special_ids
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        say!(
            "  tokenizer     {} (pre {}), {} tokens, {} merges, {}{}",
            t.model.as_deref().unwrap_or("?"),
            t.pre.as_deref().unwrap_or("-"),
            t.vocab_size,
            t.merges,
            ids.join(" "),
            if t.chat_template {
                ", chat template"
            } else {
                ""
            }
        );
    }
    if let Some(a) = &s.adapter {
        say!(
            "  adapter       {} alpha {} rank {} on {} tensors",
            a.adapter_type.as_deref().unwrap_or("?"),
            a.alpha.map_or("?".into(), |v| v.to_string()),
            a.rank.map_or("?".into(), |(lo, hi)| if lo == hi {
                lo.to_string()
            } else {
                format!("{lo}-{hi}")
            }),
            a.targets.len()
        );
        if let Some(b) = &a.base {
            say!("  for base      {b}");
        }
    }
    println!();
    say!(
        "  {:<40} {:<8} {:>22} {:>12}",
        "tensor",
        "type",
        "dims (ne)",
        "bytes"
    );
    for t in &s.tensors {
        say!(
            "  {:<40} {:<8} {:>22} {:>12}",
            t.name,
            t.ggml_type,
            format!("{:?}", t.dims),
            t.n_bytes
        );
    }
    println!();
    for b in &s.by_type {
        say!(
            "  {:<8} {:>4} tensors {:>14} weights {:>12}  {:.2} bpw",
            b.ggml_type,
            b.n_tensors,
            b.n_elements,
            human_bytes(b.n_bytes),
            lorafold_runtime::summary::bits_per_weight(b.n_bytes, b.n_elements)
        );
    }
    let t = &s.totals;
    say!(
        "  total    {:>4} tensors {:>14} weights {:>12}  {:.2} bpw",
        t.n_tensors,
        t.n_elements,
        human_bytes(t.n_bytes),
        t.bits_per_weight
    );
}

fn print_peft(s: &PeftSummary) {
    let c = &s.config;
    say!("{}  (PEFT LoRA adapter)", s.path);
    say!("  base model    {}", s.base_model.as_deref().unwrap_or("-"));
    say!(
        "  r {}  alpha {}  rsLoRA {}  DoRA {}  fan_in_fan_out {}",
        c.r,
        c.lora_alpha,
        c.use_rslora,
        c.use_dora,
        c.fan_in_fan_out
    );
    say!("  targets       {}", s.targets.join(", "));
    if !c.modules_to_save.is_empty() {
        say!("  saved         {}", c.modules_to_save.join(", "));
    }
    say!("  dtype         {}", s.dtypes.join(", "));
    say!(
        "  parameters    {}  in {} modules",
        s.parameters,
        s.modules.len()
    );
    println!();
    say!(
        "  {:<48} {:<9} {:>4} {:>7} {:>9} {:>11} {:>5}",
        "module",
        "kind",
        "r",
        "alpha",
        "scale",
        "out x in",
        "DoRA"
    );
    for m in &s.modules {
        say!(
            "  {:<48} {:<9} {:>4} {:>7} {:>9.6} {:>11} {:>5}",
            m.path,
            format!("{:?}", m.kind).to_lowercase(),
            m.rank,
            m.alpha,
            m.scale,
            format!("{}x{}", m.out_features, m.in_features),
            if m.dora { "yes" } else { "" }
        );
    }
    for t in &s.saved {
        say!("  saved tensor {} {} {:?}", t.name, t.dtype, t.shape);
    }
}

fn print_safetensors(s: &SafetensorsSummary) {
    say!("{}  (safetensors, {} file(s))", s.path, s.files.len());
    if let Some(c) = &s.config {
        say!(
            "  {} {}: {} layers, width {}, ffn {}, heads {}/{}, vocabulary {}, rope theta {}, dtype {}",
            c.model_type.as_deref().unwrap_or("?"),
            c.architecture.as_deref().unwrap_or(""),
            opt(c.num_hidden_layers),
            opt(c.hidden_size),
            opt(c.intermediate_size),
            opt(c.num_attention_heads),
            opt(c.num_key_value_heads),
            opt(c.vocab_size),
            c.rope_theta.map_or("?".into(), |v| v.to_string()),
            c.dtype.as_deref().unwrap_or("?"),
        );
    }
    println!();
    say!(
        "  {:<56} {:<5} {:>16} {:>12}",
        "tensor",
        "dtype",
        "shape",
        "bytes"
    );
    for t in &s.tensors {
        say!(
            "  {:<56} {:<5} {:>16} {:>12}",
            t.name,
            t.dtype,
            format!("{:?}", t.shape),
            t.n_bytes
        );
    }
    say!(
        "  total {} tensors, {} weights, {}",
        s.tensors.len(),
        s.n_elements,
        human_bytes(s.n_bytes)
    );
}

fn opt(v: Option<u64>) -> String {
    v.map_or("?".into(), |v| v.to_string())
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

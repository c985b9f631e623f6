//! Helpers shared by the end-to-end tests.
#![allow(dead_code)]

pub mod synthetic;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The repository root (these helpers serve the root package's tests and the converter's).
pub fn repo() -> &'static Path {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.ancestors()
        .find(|p| p.join("scripts/fetch-smollm2.sh").is_file())
        .unwrap_or(here)
}

fn script_output(script: &str, args: &[&str]) -> PathBuf {
    let out = Command::new(repo().join("scripts").join(script))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running scripts/{script}: {e}"));
    assert!(
        out.status.success(),
        "scripts/{script} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// The 7B stand-in's small variant (`scripts/make-standin.sh --small`): the
/// real DeepSeek-R1-Distill-Qwen-7B header and tokenizer, 2 layers of width
/// 256, seeded weights in its Q4_K/Q6_K mix; made into the cache on first use.
pub fn standin_small() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| script_output("make-standin.sh", &["--small"]))
}

/// The reference data made with PyTorch and PEFT (`../shared/data`, or
/// `LORAFOLD_SHARED_DATA`).
pub fn shared_data() -> PathBuf {
    if let Some(p) = std::env::var_os("LORAFOLD_SHARED_DATA") {
        return PathBuf::from(p);
    }
    let candidates = [repo().join("../shared/data"), repo().join("shared/data")];
    candidates
        .iter()
        .find(|p| p.join("README.md").is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!("reference data not found at {candidates:?}; set LORAFOLD_SHARED_DATA")
        })
}

/// A fresh folder for files a whole test binary shares (made once, from a
/// static): under cargo's target/tmp, emptied on first use, so each run
/// replaces the last one's files. A `TempDir` in a static is never dropped
/// and left 2.2 GB behind per run.
pub fn shared_scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("lorafold-tests")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// SmolLM2-135M-Instruct Q4_1, fetched into the cache on first use.
pub fn smollm2() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| script_output("fetch-smollm2.sh", &[]))
}

/// Gemma 3 270M Q4_K_M, fetched into the cache on first use.
pub fn gemma3() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| script_output("fetch-gemma3.sh", &[]))
}

/// `gemma3-adapters/robot/reference.json`.
pub fn robot_reference() -> serde_json::Value {
    let p = shared_data().join("gemma3-adapters/robot/reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// A JSON array of token ids.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_u64().unwrap() as u32)
        .collect()
}

/// A Python with llama.cpp's `gguf` package, set up on first use.
pub fn python() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| script_output("python-env.sh", &[]))
}

/// A Python with `gguf` and llama.cpp (`llama-cpp-python`), built on first use.
pub fn python_llama() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| script_output("python-env.sh", &["--llama"]))
}

/// Run `python -c code args...` and return its stdout, failing the test on error.
pub fn run_python(code: &str, args: &[&Path]) -> String {
    run_python_with(python(), code, args)
}

/// Run `python -c code args...` with the given python.
pub fn run_python_with(python: &Path, code: &str, args: &[&Path]) -> String {
    let out = Command::new(python)
        .arg("-c")
        .arg(code)
        .args(args)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "python failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The `lorafold` binary built for this test run.
pub fn lorafold() -> Command {
    // Cargo sets this for the root package's tests only; the converter's
    // tests share these helpers but never run the CLI.
    match option_env!("CARGO_BIN_EXE_lorafold") {
        Some(bin) => Command::new(bin),
        None => panic!("the lorafold binary is built for the root package's tests only"),
    }
}

/// A small deterministic generator for test data (xorshift64*).
pub struct Rng(u64);

impl Rng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    /// Uniform f32 in [-1, 1).
    pub fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// Little-endian f32 bytes as values.
pub fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Largest elementwise |a - b|.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// `smollm2-adapters/<adapter>/reference.json`.
pub fn reference(adapter: &str) -> serde_json::Value {
    let p = shared_data()
        .join("smollm2-adapters")
        .join(adapter)
        .join("reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// The token ids of the reference's `ref_prompts`.
pub fn ref_prompts(adapter: &str) -> Vec<Vec<u32>> {
    reference(adapter)["ref_prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            p["input_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

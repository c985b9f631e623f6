//! The end-to-end tests, one module per concern, linked into one test
//! binary (ripgrep's layout): every binary links candle and the runtime,
//! and linking them once instead of once per file is most of what a clean
//! `cargo test` spends outside compiling. The converter's own tests (merge
//! math against PEFT, quantized bytes against ggml, the GGUF writer) are in
//! converter/tests/all. Three files keep binaries of
//! their own because they measure the whole process, which tests running
//! beside them would move: runtime_memory.rs (resident memory), engine.rs
//! and gguf_hostile.rs (heap allocations, through a counting allocator).

#[path = "../common/mod.rs"]
mod common;

mod adapter_gguf;
mod convert_arch;
mod convert_cli;
mod convert_smollm2;
mod drift;
mod gemma3;
mod gguf_roundtrip;
mod hf_tokenizer;
mod hostile_calib;
mod hostile_convert;
mod hostile_inputs;
mod hostile_outputs;
mod hostile_run;
mod inspect_cli;
mod llama_cpp_compat;
mod long_prompt;
mod output_safety;
mod run_cli;
mod runtime;
mod runtime_llama_cpp;
mod scale;
mod spm_tokenizer;

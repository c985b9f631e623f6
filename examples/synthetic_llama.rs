//! Write a synthetic llama whose widths are multiples of 256 (1024 wide, 2816
//! FFN, 16 layers; random weights from a seed), for benchmarking K-quants,
//! which SmolLM2's 576-wide rows cannot use:
//! `cargo run --release --example synthetic_llama -- OUT.gguf [QUANT]`.

#[allow(dead_code)]
#[path = "../tests/common/synthetic.rs"]
mod synthetic;

fn main() {
    let mut args = std::env::args().skip(1);
    let out = std::path::PathBuf::from(
        args.next()
            .expect("usage: synthetic_llama OUT.gguf [QUANT]"),
    );
    let quant = args.next().unwrap_or_else(|| "f32".into());
    let f32_path = out.with_extension("f32.gguf");
    synthetic::write_f32(&f32_path, synthetic::Shape::BENCH_256, 1);
    if quant == "f32" {
        std::fs::rename(&f32_path, &out).expect("rename");
    } else {
        synthetic::quantize(&f32_path, &quant, &out);
        std::fs::remove_file(&f32_path).expect("remove the f32 file");
    }
    println!("{}", out.display());
}

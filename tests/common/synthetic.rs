//! A synthetic llama written from a seed by the converter's own writer, at
//! any width (K-quants need widths that are multiples of 256), then
//! quantized by the converter to any type.

use std::path::{Path, PathBuf};

use lorafold_converter::convert::{convert, ConvertOptions};
use lorafold_converter::round::quant::QuantPolicy;
use lorafold_converter::write::gguf_writer::GgufWriter;
use lorafold_runtime::gguf::value::{MetadataArray, ValueType};
use lorafold_runtime::gguf::{GgmlType, MetadataValue};

/// xorshift64*, so this file stands alone (an example includes it too).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// Uniform in [-1, 1).
    fn f32(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// The shape of a synthetic llama.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Width.
    pub dim: usize,
    /// Feed-forward width.
    pub ffn: usize,
    /// Blocks.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Vocabulary.
    pub vocab: usize,
    /// Whether the output head is its own tensor (else tied to the embedding).
    pub untied: bool,
}

impl Shape {
    /// The K-quant benchmark model: 1024 wide, 2816 FFN, 16 layers.
    pub const BENCH_256: Shape = Shape {
        dim: 1024,
        ffn: 2816,
        layers: 16,
        heads: 16,
        kv_heads: 4,
        vocab: 32000,
        untied: true,
    };

    /// Small, with every width a multiple of 256.
    pub const SMALL_256: Shape = Shape {
        dim: 256,
        ffn: 512,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        vocab: 512,
        untied: true,
    };
}

/// Write an f32 llama of `shape` with weights from `seed` to `path`.
pub fn write_f32(path: &Path, shape: Shape, seed: u64) {
    let mut rng = Rng::new(seed);
    let Shape {
        dim,
        ffn,
        layers,
        heads,
        kv_heads,
        vocab,
        untied,
    } = shape;
    let hd = dim / heads;
    let mut w = GgufWriter::new(path);
    let md =
        |w: &mut GgufWriter, k: &str, v: MetadataValue<'static>| w.add_metadata(k, &v).unwrap();
    md(
        &mut w,
        "general.architecture",
        MetadataValue::string("llama"),
    );
    md(&mut w, "general.name", MetadataValue::string("synthetic"));
    // A placeholder SentencePiece vocabulary, so llama.cpp loads the model too.
    md(
        &mut w,
        "tokenizer.ggml.model",
        MetadataValue::string("llama"),
    );
    let tokens = (0..vocab).map(|i| match i {
        0 => "<unk>".to_string(),
        1 => "<s>".to_string(),
        2 => "</s>".to_string(),
        i => format!("t{i}"),
    });
    md(
        &mut w,
        "tokenizer.ggml.tokens",
        MetadataValue::string_array(tokens),
    );
    let array = |elem, items: Vec<MetadataValue<'static>>| {
        MetadataValue::Array(MetadataArray::Owned { elem, items })
    };
    md(
        &mut w,
        "tokenizer.ggml.scores",
        array(
            ValueType::F32,
            (0..vocab).map(|_| MetadataValue::F32(0.0)).collect(),
        ),
    );
    let kind = |i: usize| match i {
        0 => 2,     // unknown
        1 | 2 => 3, // control
        _ => 1,     // normal
    };
    md(
        &mut w,
        "tokenizer.ggml.token_type",
        array(
            ValueType::I32,
            (0..vocab).map(|i| MetadataValue::I32(kind(i))).collect(),
        ),
    );
    md(
        &mut w,
        "llama.block_count",
        MetadataValue::U32(layers as u32),
    );
    md(&mut w, "llama.context_length", MetadataValue::U32(1024));
    md(
        &mut w,
        "llama.embedding_length",
        MetadataValue::U32(dim as u32),
    );
    md(
        &mut w,
        "llama.feed_forward_length",
        MetadataValue::U32(ffn as u32),
    );
    md(
        &mut w,
        "llama.attention.head_count",
        MetadataValue::U32(heads as u32),
    );
    md(
        &mut w,
        "llama.attention.head_count_kv",
        MetadataValue::U32(kv_heads as u32),
    );
    md(&mut w, "llama.rope.freq_base", MetadataValue::F32(10000.0));
    md(
        &mut w,
        "llama.attention.layer_norm_rms_epsilon",
        MetadataValue::F32(1e-5),
    );
    md(
        &mut w,
        "llama.rope.dimension_count",
        MetadataValue::U32(hd as u32),
    );
    let mut tensors: Vec<(String, Vec<u64>, f32)> = vec![(
        "token_embd.weight".into(),
        vec![dim as u64, vocab as u64],
        1.0,
    )];
    for l in 0..layers {
        let p = |s: &str| format!("blk.{l}.{s}");
        let (q, kv) = ((heads * hd) as u64, (kv_heads * hd) as u64);
        let (d, f) = (dim as u64, ffn as u64);
        // Scales keep activations near unit size through the blocks.
        let s_in = 1.0 / (dim as f32).sqrt();
        tensors.extend([
            (p("attn_norm.weight"), vec![d], 0.0),
            (p("attn_q.weight"), vec![d, q], s_in * 2.0),
            (p("attn_k.weight"), vec![d, kv], s_in * 2.0),
            (p("attn_v.weight"), vec![d, kv], s_in),
            (p("attn_output.weight"), vec![q, d], s_in),
            (p("ffn_norm.weight"), vec![d], 0.0),
            (p("ffn_gate.weight"), vec![d, f], s_in),
            (p("ffn_up.weight"), vec![d, f], s_in),
            (p("ffn_down.weight"), vec![f, d], 1.0 / (ffn as f32).sqrt()),
        ]);
    }
    tensors.push(("output_norm.weight".into(), vec![dim as u64], 0.0));
    if untied {
        tensors.push((
            "output.weight".into(),
            vec![dim as u64, vocab as u64],
            2.0 / (dim as f32).sqrt(),
        ));
    }
    for (name, dims, _) in &tensors {
        w.add_tensor(name, GgmlType::F32, dims).unwrap();
    }
    let mut s = w.start().unwrap();
    for (name, dims, scale) in &tensors {
        let n: u64 = dims.iter().product();
        let bytes: Vec<u8> = (0..n)
            .flat_map(|_| {
                // Norm weights (scale 0) sit near 1.
                let v = if *scale == 0.0 {
                    1.0 + 0.1 * rng.f32()
                } else {
                    scale * rng.f32()
                };
                v.to_le_bytes()
            })
            .collect();
        s.write_tensor(name, &bytes).unwrap();
    }
    s.finish().unwrap();
}

/// `base` quantized to `quant` (a type or preset) by the converter, at `out`.
pub fn quantize(base: &Path, quant: &str, out: &Path) -> PathBuf {
    let policy = QuantPolicy::parse(quant, &[]).unwrap();
    convert(&ConvertOptions::new(base, None, policy, out), &|_| {}).unwrap();
    out.to_path_buf()
}

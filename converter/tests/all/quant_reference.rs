//! Our quantizer (candle's ggml block code) against llama.cpp's reference
//! (PyPI `gguf`'s numpy port of ggml's quantize_row_*_ref and dequantizers).

use crate::common;

use common::Rng;
use lorafold_converter::round::quant::{dequantize, quantize};
use lorafold_runtime::gguf::GgmlType;

const QUANTIZE: &str = r#"
import sys, numpy as np, gguf
from gguf.quants import quantize
x = np.fromfile(sys.argv[1], dtype=np.float32).reshape(-1, 512)
for t in ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "BF16", "F16"]:
    quantize(x, gguf.GGMLQuantizationType[t]).view(np.uint8).tofile(sys.argv[1] + "." + t)
"#;

const DEQUANTIZE: &str = r#"
import sys, numpy as np, gguf
from gguf.quants import dequantize
for t in ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]:
    q = np.fromfile(sys.argv[1] + "." + t, dtype=np.uint8).reshape(8, -1)
    dequantize(q, gguf.GGMLQuantizationType[t]).astype(np.float32).tofile(sys.argv[1] + "." + t + ".f32")
"#;

fn sample() -> Vec<f32> {
    // 8 rows of 512: gaussian-ish weights, one row of zeros, one with an
    // outlier, one with tiny values, one with exact ties at block edges.
    let mut rng = Rng::new(3);
    let mut v: Vec<f32> = (0..8 * 512)
        .map(|_| (rng.f32() + rng.f32() + rng.f32()) * 0.05)
        .collect();
    v[512..1024].iter_mut().for_each(|x| *x = 0.0);
    v[1024 + 7] = 3.5;
    v[1536..2048].iter_mut().for_each(|x| *x *= 1e-6);
    v[2048..2560]
        .iter_mut()
        .enumerate()
        .for_each(|(i, x)| *x = (i % 16) as f32 / 8.0 - 1.0);
    v
}

fn write_f32(path: &std::path::Path, v: &[f32]) {
    std::fs::write(
        path,
        v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>(),
    )
    .unwrap();
}

#[test]
fn legacy_quants_are_bit_identical_to_ggml_reference() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.f32");
    let x = sample();
    write_f32(&path, &x);
    common::run_python(QUANTIZE, &[&path]);
    for t in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::BF16,
        GgmlType::F16,
    ] {
        let theirs = std::fs::read(dir.path().join(format!("x.f32.{}", t.name()))).unwrap();
        let ours = quantize(t, &x, "x").unwrap();
        assert_eq!(ours.len(), theirs.len(), "{t}");
        let differing = ours.iter().zip(&theirs).filter(|(a, b)| a != b).count();
        assert_eq!(
            differing, 0,
            "{t}: {differing} bytes differ from ggml's reference quantizer"
        );
    }
}

#[test]
fn k_quants_decode_the_same_in_llama_cpp() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.f32");
    let x = sample();
    let types = [
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ];
    let mut ours = Vec::new();
    for t in types {
        let q = quantize(t, &x, "x").unwrap();
        std::fs::write(dir.path().join(format!("x.f32.{}", t.name())), &q).unwrap();
        ours.push(dequantize(t, &q, x.len(), "x").unwrap());
    }
    common::run_python(DEQUANTIZE, &[&path]);
    for (t, ours) in types.iter().zip(ours) {
        let bytes = std::fs::read(dir.path().join(format!("x.f32.{}.f32", t.name()))).unwrap();
        let theirs: Vec<f32> = common::f32s(&bytes);
        let max = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            max <= 1e-6,
            "{t}: our and llama.cpp's decoding differ by {max}"
        );
        // And the quantization is a sane approximation of the input.
        let err = x
            .iter()
            .zip(&ours)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f32>()
            .sqrt();
        let norm = x.iter().map(|a| a * a).sum::<f32>().sqrt();
        assert!(err / norm < 0.5, "{t}: relative error {}", err / norm);
    }
}

//! Conversion at scale, on the 7B stand-in's small variant (the real Qwen2
//! 7B header and 152k tokenizer, 2 layers): tensors whose type is kept are
//! copied byte for byte, the rest are rounded a run of rows at a time to the
//! same bytes as a whole-tensor rounding, and no tensor is held whole.

use crate::common::{self, lorafold};

use lorafold_converter::read::base::BaseModel;
use lorafold_converter::round::quant;
use lorafold_runtime::gguf::{GgmlType, GgufFile};
use serde_json::Value;
use std::path::Path;

/// Run `lorafold convert` on the stand-in; its JSON report.
fn convert(quant: &str, out: &Path) -> Value {
    let report = out.with_extension("json");
    let st = lorafold()
        .args(["convert", "-q", "--quant", quant, "--base"])
        .arg(common::standin_small())
        .arg("-o")
        .arg(out)
        .arg("--report")
        .arg(&report)
        .status()
        .unwrap();
    assert!(st.success());
    serde_json::from_str(&std::fs::read_to_string(report).unwrap()).unwrap()
}

#[test]
fn tensors_keeping_their_type_are_copied_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q4_k_m.gguf");
    // The stand-in holds llama.cpp's Q4_K_M mix for 28 layers; our q4_k_m
    // policy for its 2 layers keeps most types (and at 7B all 339).
    let r = convert("q4_k_m", &out);
    let (src, dst) = (
        GgufFile::open(common::standin_small()).unwrap(),
        GgufFile::open(&out).unwrap(),
    );
    let mut kept = 0;
    for t in src.tensors() {
        let d = dst.tensor(&t.name).unwrap();
        let row = r["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == t.name.as_str())
            .unwrap();
        let same = d.ggml_type == t.ggml_type;
        assert_eq!(row["copied"], same, "{}", t.name);
        if same {
            kept += 1;
            assert!(
                src.tensor_data(t) == dst.tensor_data(d),
                "{} differs",
                t.name
            );
            assert_eq!(row["rel_error"], 0.0, "{}", t.name);
        }
    }
    assert!(
        kept >= 20,
        "{kept} of {} tensors kept their type",
        src.tensors().len()
    );
    assert_eq!(r["totals"]["copied_tensors"], kept);
}

#[test]
fn rows_rounded_in_runs_equal_a_whole_rounding_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q8_0.gguf");
    let r = convert("q8_0", &out);
    let base = BaseModel::open(common::standin_small()).unwrap();
    let dst = GgufFile::open(&out).unwrap();
    let mut largest = 0usize;
    for name in [
        "token_embd.weight",
        "output.weight",
        "blk.1.ffn_down.weight",
    ] {
        let t = base.tensor(name).unwrap();
        let w = base.values(t).unwrap();
        largest = largest.max(w.len() * 4);
        let whole = quant::quantize(GgmlType::Q8_0, &w, name).unwrap();
        let d = dst.tensor(name).unwrap();
        assert!(dst.tensor_data(d) == whole.as_slice(), "{name} differs");
        // The report's error, computed here in f64 over the whole tensor.
        let q = quant::dequantize(GgmlType::Q8_0, &whole, w.len(), name).unwrap();
        let (mut e, mut m) = (0f64, 0f64);
        for (a, b) in w.iter().zip(&q) {
            e += (*b as f64 - *a as f64).powi(2);
            m += (*a as f64).powi(2);
        }
        let row = r["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .unwrap();
        let reported = row["rel_error"].as_f64().unwrap();
        let exact = (e / m).sqrt();
        assert!(
            (reported - exact).abs() <= 1e-6 * exact,
            "{name}: {reported} vs {exact}"
        );
        assert_eq!(row["copied"], false);
    }
    // Norms and biases (f32 stays f32) are copied: 5 a layer, and the last norm.
    assert_eq!(r["totals"]["copied_tensors"], 2 * 5 + 1);
    // output.weight alone is 156 MB in f32; a conversion holding one
    // tensor whole (as before, in batches of several) peaked above that.
    let peak = r["totals"]["peak_rss_bytes"].as_u64().unwrap() as usize;
    assert!(
        peak < largest / 2,
        "peak RSS {peak} bytes, largest tensor {largest} in f32"
    );
}

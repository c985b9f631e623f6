//! SmolLM2-135M + the real adapters in ../shared/data/smollm2-adapters,
//! merged and quantized: the per-module retention matches the reference
//! computed with gguf-py's quantizers, and the files read back.

mod common;

use std::collections::HashMap;
use std::path::Path;

use lorafold_converter::convert::{convert, ConvertOptions};
use lorafold_converter::quant::QuantPolicy;
use lorafold_converter::report::ConvertReport;
use lorafold_runtime::gguf::{GgmlType, GgufFile};

fn run(adapter: &str, quant: &str, out: &Path) -> ConvertReport {
    let opts = ConvertOptions::new(
        common::smollm2().to_path_buf(),
        Some(
            common::shared_data()
                .join("smollm2-adapters")
                .join(adapter)
                .join("adapter"),
        ),
        QuantPolicy::parse(quant, &[]).unwrap(),
        out.to_path_buf(),
    );
    convert(&opts, &|_, _, _| {}).unwrap()
}

/// HF module path -> GGUF tensor name.
fn gguf_name(module: &str) -> String {
    lorafold_converter::base::hf_to_gguf_name(&format!("{module}.weight")).unwrap()
}

/// `tol` bounds each module's retention against the reference. PEFT merged
/// in f32 and we accumulate in f64, so W' differs by an ulp here and there;
/// where a delta is tiny (chef: |dW|/|W| ~ 0.6%) one flipped code moves that
/// module's retention by up to ~4e-5. A quantizer that rounded blocks
/// differently would move it far more.
fn check_against_reference(adapter: &str, quant: &str, report: &ConvertReport, tol: f64) {
    let r = common::reference(adapter);
    let level = &r["weight_level_quantization"][quant];
    let per_module = level["per_module_retention"].as_object().unwrap();
    let ours: HashMap<&str, f64> = report
        .tensors
        .iter()
        .filter_map(|t| t.retention.map(|x| (t.name.as_str(), x)))
        .collect();
    assert_eq!(ours.len(), per_module.len());
    for (module, want) in per_module {
        let got = ours[gguf_name(module).as_str()];
        assert!(
            (got - want.as_f64().unwrap()).abs() < tol,
            "{adapter} {quant} {module}: {got} vs {want}"
        );
    }
    let key = "retention <Q(W0+dW)-Q(W0), dW>/||dW||^2";
    let mean_ret = report.totals.mean_retention.unwrap();
    assert!(
        (mean_ret - level[key]["mean"].as_f64().unwrap()).abs() < tol,
        "{mean_ret}"
    );
    let rel: Vec<f64> = report
        .tensors
        .iter()
        .filter(|t| t.retention.is_some())
        .map(|t| t.rel_error)
        .collect();
    let mean_rel = rel.iter().sum::<f64>() / rel.len() as f64;
    let want = level["rel_error ||Q(W')-W'||/||W'|| (merged)"]["mean"]
        .as_f64()
        .unwrap();
    assert!(
        (mean_rel - want).abs() < 1e-6,
        "{adapter} {quant}: mean rel error {mean_rel} vs {want}"
    );
}

#[test]
fn pirate_q4_0_and_q8_0_match_reference_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    for quant in ["q4_0", "q8_0"] {
        let out = dir.path().join(format!("pirate-{quant}.gguf"));
        let report = run("pirate", quant, &out);
        check_against_reference("pirate", quant, &report, 2e-6);
        let f = GgufFile::open(&out).unwrap();
        assert_eq!(f.file_size(), report.totals.file_size);
        assert_eq!(f.tensors().len(), 272);
        let block_type = GgmlType::from_name(quant).unwrap();
        for t in f.tensors() {
            let want = match t.name.as_str() {
                // Tied output: llama.cpp's rule gives Q6_K, which 576-wide rows
                // cannot hold, so Q8_0, the type of the source file's embedding.
                "token_embd.weight" => GgmlType::Q8_0,
                n if t.dims().len() == 1 => {
                    assert!(n.ends_with("norm.weight"));
                    GgmlType::F32
                }
                _ => block_type,
            };
            assert_eq!(t.ggml_type, want, "{}", t.name);
        }
        assert_eq!(
            f.get_u64("general.file_type"),
            Some(if quant == "q4_0" { 2 } else { 7 })
        );
        assert_eq!(f.get_strings("tokenizer.ggml.tokens").unwrap().len(), 49152);
        assert_eq!(f.get_str("general.architecture").as_deref(), Some("llama"));
        let hashes = f.get_strings("lorafold.adapter.sha256").unwrap();
        assert!(hashes[1].ends_with("  adapter_model.safetensors") && hashes[1].len() == 64 + 27);
        let scales = f.get_strings("lorafold.adapter.scales").unwrap();
        assert_eq!(scales.len(), 60);
        assert!(
            scales[0].starts_with("model.layers.0.self_attn.q_proj=2.828427"),
            "{}",
            scales[0]
        );
    }
}

#[test]
fn chef_q4_0_matches_reference() {
    let dir = tempfile::tempdir().unwrap();
    let report = run("chef", "q4_0", &dir.path().join("chef.gguf"));
    check_against_reference("chef", "q4_0", &report, 1e-4);
    assert_eq!(report.totals.changed_tensors, 210);
}

#[test]
fn q4_k_m_falls_back_where_576_wide_rows_do_not_fit() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pirate-q4_k_m.gguf");
    let report = run("pirate", "q4_k_m", &out);
    let f = GgufFile::open(&out).unwrap();
    let ty = |n: &str| f.tensor(n).unwrap().ggml_type;
    // Q4_K needs 256-wide rows: Q5_0 instead (llama.cpp's fallback);
    // Q6_K (attn_v/ffn_down in the first and last eighth, and every third
    // layer between: 0-2, 5, 8, ..., 26-29 of 30) -> Q8_0.
    assert_eq!(ty("blk.5.attn_q.weight"), GgmlType::Q5_0);
    assert_eq!(ty("blk.0.attn_v.weight"), GgmlType::Q8_0);
    assert_eq!(ty("blk.3.attn_v.weight"), GgmlType::Q5_0);
    assert_eq!(ty("blk.5.attn_v.weight"), GgmlType::Q8_0);
    assert_eq!(ty("blk.6.attn_v.weight"), GgmlType::Q5_0);
    assert_eq!(ty("blk.29.attn_v.weight"), GgmlType::Q8_0);
    assert_eq!(ty("blk.29.ffn_down.weight"), GgmlType::Q6_K);
    // ffn_down's rows are 1536 wide, which Q4_K fits.
    assert_eq!(ty("blk.6.ffn_down.weight"), GgmlType::Q4_K);
    assert_eq!(f.get_u64("general.file_type"), Some(15));
    let fallback = report
        .tensors
        .iter()
        .find(|t| t.name == "blk.5.attn_q.weight")
        .unwrap()
        .fallback
        .clone()
        .unwrap();
    assert_eq!(
        fallback,
        "Q4_K -> Q5_0: Q4_K needs rows in multiples of 256 but this row has 576"
    );
    assert!(report
        .notes
        .iter()
        .any(|n| n.starts_with("blk.5.attn_q.weight: Q4_K -> Q5_0")));
}

//! SmolLM2-135M + the real adapters in ../shared/data/smollm2-adapters,
//! merged and quantized: the per-module retention matches the reference
//! computed with gguf-py's quantizers, and the files read back.

use crate::common;

use std::collections::HashMap;
use std::path::Path;

use lorafold_converter::convert::{convert, ConvertOptions};
use lorafold_converter::report::ConvertReport;
use lorafold_converter::round::quant::QuantPolicy;
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
    convert(&opts, &|_| {}).unwrap()
}

/// HF module path -> GGUF tensor name.
fn gguf_name(module: &str) -> String {
    lorafold_converter::read::base::hf_to_gguf_name(&format!("{module}.weight")).unwrap()
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
        // The hashes are computed beside the conversion and written over
        // placeholders in the header: each one is its file's.
        let adapter = common::shared_data().join("smollm2-adapters/pirate/adapter");
        let sha = |p: &Path| lorafold_converter::convert::sha256_file(p).unwrap();
        let hashes = f.get_strings("lorafold.adapter.sha256").unwrap();
        assert_eq!(
            hashes,
            [
                format!(
                    "{}  adapter_config.json",
                    sha(&adapter.join("adapter_config.json"))
                ),
                format!(
                    "{}  adapter_model.safetensors",
                    sha(&adapter.join("adapter_model.safetensors"))
                ),
            ]
        );
        assert_eq!(
            f.get_strings("lorafold.base.sha256").unwrap(),
            [format!(
                "{}  SmolLM2-135M-Instruct.Q4_1.gguf",
                sha(common::smollm2())
            )]
        );
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

/// `convert --budget-kl`: three blocks' linear layers (21 tensors) start at
/// q4_0 in a q8_0 model. With no wider type on the ladder a budget fails and
/// writes nothing; a budget a third of the plain mix's KL is met by moving
/// some of them up the ladder, and the KL the report states is the written
/// file's, measured again here over the same windows.
#[test]
fn a_drift_budget_is_met_as_measured_or_nothing_is_written() {
    use lorafold_runtime::measure::{drift, windows};
    use lorafold_runtime::model::Model;
    use lorafold_runtime::tokenizer::Tokenizer;

    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let adapter = common::shared_data().join("smollm2-adapters/pirate");
    let text = std::fs::read_to_string(adapter.join("train.txt")).unwrap();
    let lines: Vec<&str> = text.lines().take(6).collect();
    std::fs::write(p("lines.txt"), lines.join("\n")).unwrap();
    let budget = |kl: f64, out: &str, ladder: &str| {
        common::lorafold()
            .args(["convert", "--quant", "q8_0", "-q", "--rounding", "nearest"])
            .args([
                "--tensor-type",
                r"blk\.[0-2]\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight=q4_0",
            ])
            .arg("--base")
            .arg(common::smollm2())
            .arg("--adapter")
            .arg(adapter.join("adapter"))
            .arg("--calib-text")
            .arg(p("lines.txt"))
            .args(["--budget-kl", &kl.to_string(), "--ladder", ladder])
            .arg("--report")
            .arg(p(&format!("{out}.json")))
            .arg("-o")
            .arg(p(out))
            .output()
            .unwrap()
    };
    let report = |out: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(p(&format!("{out}.json"))).unwrap()).unwrap()
    };
    let ok = |o: &std::process::Output| {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    // Unreachable: no type on the ladder is wider than q4_0. Nothing is
    // written but the report asked for by name: the policy's own mix.
    let o = budget(1e-9, "tight.gguf", "q4_0");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("mean KL <= 1e-9"), "{err}");
    assert!(!p("tight.gguf").exists());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let tight = report("tight.gguf");
    let rounds = tight["budget"]["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 1);
    assert_eq!(rounds[0]["upgraded"], 0);
    let kl0 = rounds[0]["kl_mean"].as_f64().unwrap();
    assert!(kl0 > 1e-3, "the q4_0 blocks drift: {kl0}");

    let target = kl0 / 3.0;
    ok(&budget(target, "budget.gguf", "q5_0,q8_0"));
    let got = report("budget.gguf");
    let b = &got["budget"];
    let last = b["rounds"].as_array().unwrap().last().unwrap().clone();
    let kl = last["kl_mean"].as_f64().unwrap();
    assert!(last["within"].as_bool().unwrap() && kl <= target, "{b}");
    let upgrades = b["upgrades"].as_array().unwrap();
    assert!(!upgrades.is_empty() && upgrades.len() <= 21, "{b}");
    // The file holds the types the report lists, and nothing else moved.
    let file = GgufFile::open(p("budget.gguf")).unwrap();
    let mut q4 = 0;
    for t in file.tensors() {
        let listed = upgrades.iter().find(|u| u[0] == t.name.as_str());
        match listed {
            Some(u) => {
                assert_eq!(u[1], "Q4_0");
                assert_eq!(u[2], t.ggml_type.name(), "{}", t.name);
                assert!(matches!(t.ggml_type.name(), "Q5_0" | "Q8_0"));
            }
            None => q4 += (t.ggml_type == GgmlType::Q4_0) as usize,
        }
    }
    assert_eq!(q4 + upgrades.len(), 21);
    // Measured again: the stated KL is this file's.
    let f32 = p("f32.gguf");
    convert(
        &ConvertOptions::new(
            common::smollm2(),
            Some(adapter.join("adapter")),
            QuantPolicy::parse("f32", &[]).unwrap(),
            &f32,
        ),
        &|_| {},
    )
    .unwrap();
    let reference = Model::load(&f32, &candle_core::Device::Cpu).unwrap();
    let written = Model::load(p("budget.gguf"), &candle_core::Device::Cpu).unwrap();
    let tok = Tokenizer::from_gguf(reference.file()).unwrap();
    let w = windows(&tok, &lines.join("\n"), true, 128).unwrap();
    let again = drift(&reference, &[&written], None, &w).unwrap().remove(0);
    assert!(
        (again.kl_mean - kl).abs() <= 1e-9 * kl,
        "{} vs {kl}",
        again.kl_mean
    );
    assert_eq!(again.tokens as u64, b["tokens"].as_u64().unwrap());
}

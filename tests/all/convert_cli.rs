//! `lorafold convert` on bad input: one-line errors, exit status 1, and no
//! output file; and the same inputs always give the same bytes.

use crate::common;

use std::path::{Path, PathBuf};

use common::lorafold;
use serde_json::Value;

fn tiny() -> PathBuf {
    common::shared_data().join("tiny-llama")
}

/// Run convert in a fresh folder; returns (status code, stderr, folder listing, folder).
fn convert(args: &[&str]) -> (Option<i32>, String, Vec<String>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let out = lorafold()
        .arg("convert")
        .args(args)
        .arg("-o")
        .arg(dir.path().join("out.gguf"))
        .arg("-q")
        .output()
        .unwrap();
    let mut listing: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    listing.sort();
    (
        out.status.code(),
        String::from_utf8(out.stderr).unwrap(),
        listing,
        dir,
    )
}

fn assert_refused(args: &[&str], expect: &str) {
    let (code, err, listing, _dir) = convert(args);
    assert_eq!(code, Some(1), "{args:?}: {err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.starts_with("error: ") && err.contains(expect),
        "{args:?}: {err:?} lacks {expect:?}"
    );
    assert!(listing.is_empty(), "{args:?} left {listing:?}");
}

/// A copy of tiny-llama's lora_all adapter with its config edited.
fn adapter_with(edit: impl Fn(&mut Value), dir: &Path) -> PathBuf {
    let src = tiny().join("lora_all");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap())
            .unwrap();
    edit(&mut cfg);
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        dir.join("adapter_model.safetensors"),
    )
    .unwrap();
    dir.to_path_buf()
}

#[test]
fn bad_inputs_are_refused_without_output() {
    let base = tiny().join("base");
    let base = base.to_str().unwrap();
    let good = tiny().join("lora_all");
    let good = good.to_str().unwrap();
    assert_refused(
        &["--base", base, "--adapter", good, "--quant", "q3_z"],
        "unknown quantization 'q3_z'; known: f32, f16, bf16, q8_0",
    );

    let empty = tempfile::tempdir().unwrap();
    std::fs::copy(
        tiny().join("lora_all/adapter_config.json"),
        empty.path().join("adapter_config.json"),
    )
    .unwrap();
    assert_refused(
        &[
            "--base",
            base,
            "--adapter",
            empty.path().to_str().unwrap(),
            "--quant",
            "q8_0",
        ],
        "adapter_model.safetensors: No such file",
    );

    let bin = tempfile::tempdir().unwrap();
    std::fs::copy(
        tiny().join("lora_all/adapter_config.json"),
        bin.path().join("adapter_config.json"),
    )
    .unwrap();
    std::fs::write(bin.path().join("adapter_model.bin"), b"\x80\x02").unwrap();
    assert_refused(
        &[
            "--base",
            base,
            "--adapter",
            bin.path().to_str().unwrap(),
            "--quant",
            "q8_0",
        ],
        "adapter_model.bin is a Python pickle",
    );

    let rank = tempfile::tempdir().unwrap();
    adapter_with(|c| c["r"] = 4.into(), rank.path());
    assert_refused(
        &["--base", base, "--adapter", rank.path().to_str().unwrap(), "--quant", "q8_0"],
        "tensor 'base_model.model.model.layers.0.mlp.down_proj.lora_A.weight': has rank 8 but adapter_config.json gives this module r = 4",
    );

    let smol = common::smollm2().to_str().unwrap().to_string();
    assert_refused(
        &["--base", &smol, "--adapter", good, "--quant", "q8_0"],
        "tensor 'base_model.model.model.layers.0.mlp.down_proj.lora_A.weight': adapter maps 256 -> 96 features but base tensor 'blk.0.ffn_down.weight' has 1536 -> 576 (an adapter for another base?)",
    );

    let pirate = common::shared_data().join("smollm2-adapters/pirate/adapter");
    assert_refused(
        &[
            "--base",
            base,
            "--adapter",
            pirate.to_str().unwrap(),
            "--quant",
            "q8_0",
        ],
        "adapter maps 576 -> 576 features but base tensor 'blk.0.attn_q.weight' has 96 -> 96",
    );

    let pissa = tempfile::tempdir().unwrap();
    adapter_with(
        |c| c["init_lora_weights"] = "pissa_niter_4".into(),
        pissa.path(),
    );
    assert_refused(
        &[
            "--base",
            base,
            "--adapter",
            pissa.path().to_str().unwrap(),
            "--quant",
            "q8_0",
        ],
        "init_lora_weights = pissa_niter_4: this adapter assumes a modified base model (PiSSA/OLoRA/LoftQ/QA-LoRA), so merging it into the original base is wrong unless the base given is the modified one (hint: --force merges it anyway",
    );
    let (code, err, listing, _d) = convert(&[
        "--base",
        base,
        "--adapter",
        pissa.path().to_str().unwrap(),
        "--quant",
        "q8_0",
        "--force",
    ]);
    assert_eq!(
        (code, listing),
        (Some(0), vec!["out.gguf".to_string()]),
        "{err}"
    );

    assert_refused(
        &["--base", "/nonexistent/model.gguf", "--quant", "q8_0"],
        "/nonexistent/model.gguf: No such file",
    );
}

#[test]
fn a_layer_the_base_lacks_is_named() {
    // Rename layer 2's tensors to layer 7 in a copy of lora_all.
    let dir = tempfile::tempdir().unwrap();
    let src = std::fs::read(tiny().join("lora_all/adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&src).unwrap();
    let renamed: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k.replace("layers.2.", "layers.7."), v))
        .collect();
    safetensors::serialize_to_file(renamed, None, &dir.path().join("adapter_model.safetensors"))
        .unwrap();
    std::fs::copy(
        tiny().join("lora_all/adapter_config.json"),
        dir.path().join("adapter_config.json"),
    )
    .unwrap();
    assert_refused(
        &["--base", tiny().join("base").to_str().unwrap(), "--adapter", dir.path().to_str().unwrap(), "--quant", "f16"],
        "tensor 'base_model.model.model.layers.7.mlp.down_proj.lora_A.weight': the base has no tensor 'blk.7.ffn_down.weight' (an adapter for another base? it has 3 layers)",
    );
}

#[test]
fn broken_budget_writes_the_report_but_no_model() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.json");
    let out = dir.path().join("model.gguf");
    std::fs::write(&out, b"last release").unwrap();
    let o = lorafold()
        .args([
            "convert",
            "--quant",
            "q4_0",
            "--max-rel-error",
            "0.01",
            "--min-retention",
            "0.99",
            "-q",
            "--base",
        ])
        .arg(tiny().join("base"))
        .arg("--adapter")
        .arg(tiny().join("lora_all"))
        .arg("--report")
        .arg(&report)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8(o.stderr).unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err.contains("exceeds the maximum 1e-2")
            && err.contains("is below the minimum 0.99")
            && err.ends_with(
                "; no output written (hint: the bounds are --max-rel-error and --min-retention)\n"
            ),
        "{err}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"last release");
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert!(r["totals"]["max_rel_error"].as_f64().unwrap() > 0.01);
    assert_eq!(r["totals"]["changed_tensors"], 21);
    let mut listing: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    listing.sort();
    assert_eq!(listing, ["model.gguf", "report.json"]);
}

#[test]
fn same_inputs_give_identical_files() {
    let mut outputs = Vec::new();
    for _ in 0..2 {
        let (code, err, _, dir) = convert(&[
            "--base",
            tiny().join("base").to_str().unwrap(),
            "--adapter",
            tiny().join("dora").to_str().unwrap(),
            "--quant",
            "q4_0",
        ]);
        assert_eq!(code, Some(0), "{err}");
        outputs.push(std::fs::read(dir.path().join("out.gguf")).unwrap());
    }
    assert!(outputs[0] == outputs[1]);
    let pirate = common::shared_data().join("smollm2-adapters/pirate/adapter");
    let smol = common::smollm2().to_str().unwrap().to_string();
    let mut outputs = Vec::new();
    for threads in ["1", "2"] {
        let (code, err, _, dir) = convert(&[
            "--base",
            &smol,
            "--adapter",
            pirate.to_str().unwrap(),
            "--quant",
            "q4_k_m",
            "--threads",
            threads,
        ]);
        assert_eq!(code, Some(0), "{err}");
        outputs.push(std::fs::read(dir.path().join("out.gguf")).unwrap());
    }
    assert!(outputs[0] == outputs[1], "thread count changed the output");
}

#[test]
fn emit_writes_all_artifacts_and_a_shareable_base() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("release");
    let base = tiny().join("base");
    let o = lorafold()
        .args([
            "convert",
            "--quant",
            "q8_0",
            "--emit",
            "merged,separate",
            "-q",
            "--base",
        ])
        .arg(&base)
        .arg("--adapter")
        .arg(tiny().join("lora_all"))
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut listing: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    listing.sort();
    assert_eq!(
        listing,
        ["adapter.gguf", "base.gguf", "merged.gguf", "report.json"]
    );
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(
        report["adapter_gguf"]["modules"].as_array().unwrap().len(),
        21
    );
    assert_eq!(report["totals"]["changed_tensors"], 21);
    // The base records nothing of the adapter: it is the same file as the base
    // quantized alone, so every adapter's release shares it.
    let (code, err, _, alone) = convert(&["--base", base.to_str().unwrap(), "--quant", "q8_0"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        std::fs::read(out.join("base.gguf")).unwrap()
            == std::fs::read(alone.path().join("out.gguf")).unwrap()
    );
    assert!(
        std::fs::read(out.join("merged.gguf")).unwrap()
            != std::fs::read(out.join("base.gguf")).unwrap()
    );
}

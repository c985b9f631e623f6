//! The runtime on SmolLM2: greedy text, logits against PEFT's reference and
//! llama.cpp, runtime adapters against merged files, memory, and bad input.

use crate::common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::Device;
use lorafold_converter::convert::{convert, ConvertOptions};
use lorafold_converter::round::quant::QuantPolicy;
use lorafold_runtime::cpu::KvType;
use lorafold_runtime::generate::{generate, Sampler, SamplerConfig};
use lorafold_runtime::gguf::GgmlType;
use lorafold_runtime::lora::LoraAdapter;
use lorafold_runtime::model::{Model, SessionOptions};
use lorafold_runtime::tokenizer::Tokenizer;
use safetensors::SafeTensors;

/// Files converted once for all tests here.
struct Files {
    q8_0: PathBuf,
    base_f32: PathBuf,
    pirate_f32: PathBuf,
    pirate_merged_f32: PathBuf,
    chef_f32: PathBuf,
    both_merged_f32: PathBuf,
}

fn adapter_dir(name: &str) -> PathBuf {
    common::shared_data()
        .join("smollm2-adapters")
        .join(name)
        .join("adapter")
}

fn files() -> &'static Files {
    static F: OnceLock<Files> = OnceLock::new();
    F.get_or_init(|| {
        let dir = common::shared_scratch("runtime");
        let p = |n: &str| dir.join(n);
        let run = |base: &Path,
                   adapter: Option<&str>,
                   quant: &str,
                   out: Option<PathBuf>,
                   base_out: Option<PathBuf>,
                   adapter_out: Option<PathBuf>| {
            let opts = ConvertOptions {
                output: out,
                base_output: base_out,
                adapter_output: adapter_out,
                adapter_type: GgmlType::F32,
                ..ConvertOptions::new(
                    base,
                    adapter.map(adapter_dir),
                    QuantPolicy::parse(quant, &[]).unwrap(),
                    "",
                )
            };
            convert(&opts, &|_| {}).unwrap();
        };
        let smol = common::smollm2();
        run(smol, None, "q8_0", Some(p("q8_0.gguf")), None, None);
        run(
            smol,
            Some("pirate"),
            "f32",
            Some(p("pirate-merged.gguf")),
            Some(p("base-f32.gguf")),
            Some(p("pirate.gguf")),
        );
        run(
            smol,
            Some("chef"),
            "f32",
            Some(p("chef-merged.gguf")),
            None,
            Some(p("chef.gguf")),
        );
        // Both adapters merged: chef's merged f32 file as the base for pirate.
        run(
            &p("chef-merged.gguf"),
            Some("pirate"),
            "f32",
            Some(p("both-merged.gguf")),
            None,
            None,
        );
        Files {
            q8_0: p("q8_0.gguf"),
            base_f32: p("base-f32.gguf"),
            pirate_f32: p("pirate.gguf"),
            pirate_merged_f32: p("pirate-merged.gguf"),
            chef_f32: p("chef.gguf"),
            both_merged_f32: p("both-merged.gguf"),
        }
    })
}

/// Logits of every position, with an f32 KV cache: these are exact
/// comparisons, and the default f16 cache moves logits by ~1e-2.
fn all_logits(model: &Model, ids: &[u32]) -> Vec<f32> {
    let mut s = model
        .session_with(SessionOptions {
            kv: KvType::F32,
            ..SessionOptions::new(64)
        })
        .unwrap();
    s.logits(ids, true).unwrap().to_vec()
}

use common::max_abs_diff;

fn greedy(path: &Path, prompt: &str, n: usize) -> String {
    let model = Model::load(path, &Device::Cpu).unwrap();
    let tok = Tokenizer::from_gguf(model.file()).unwrap();
    let ids = tok.encode(prompt).unwrap();
    let mut session = model.session(128).unwrap();
    let mut sampler = Sampler::new(SamplerConfig::default());
    let (out, _) = generate(&mut session, &tok, &ids, n, &mut sampler, &[], &mut |_| {
        true
    })
    .unwrap();
    tok.decode(&out).unwrap()
}

#[test]
fn paris_from_the_pypi_q4_1_file_and_our_q8_0() {
    assert!(greedy(common::smollm2(), "The capital of France is", 3).starts_with(" Paris"));
    assert!(greedy(&files().q8_0, "The capital of France is", 3).starts_with(" Paris"));
}

fn ref_logits(adapter: &str, key: &str) -> Vec<f32> {
    let b = std::fs::read(
        common::shared_data()
            .join("smollm2-adapters")
            .join(adapter)
            .join("ref_logits.safetensors"),
    )
    .unwrap();
    let st = SafeTensors::deserialize(&b).unwrap();
    st.tensor(key)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn f32_logits_match_pytorch_for_base_and_merged() {
    // ../shared/data: PyTorch fp32 on the dequantized Q4_1 base; two f32
    // implementations agree within ~1e-3, and 5e-3 is its suggested bound.
    let base = Model::load(&files().base_f32, &Device::Cpu).unwrap();
    let merged = Model::load(&files().pirate_merged_f32, &Device::Cpu).unwrap();
    for (i, ids) in common::ref_prompts("pirate").iter().enumerate() {
        let d = max_abs_diff(
            &all_logits(&base, ids),
            &ref_logits("pirate", &format!("base.p{i}")),
        );
        assert!(d < 5e-3, "base prompt {i}: {d}");
        let d = max_abs_diff(
            &all_logits(&merged, ids),
            &ref_logits("pirate", &format!("merged.p{i}")),
        );
        assert!(d < 5e-3, "merged prompt {i}: {d}");
        eprintln!("prompt {i}: ok");
    }
}

#[test]
fn runtime_adapters_match_merged_files() {
    let f = files();
    let ids = &common::ref_prompts("pirate")[0];
    let mut model = Model::load(&f.base_f32, &Device::Cpu).unwrap();
    let base_logits = all_logits(&model, ids);
    let pirate = LoraAdapter::load(&f.pirate_f32).unwrap();
    let slot = model.attach(&pirate, 1.0).unwrap();
    let merged = all_logits(
        &Model::load(&f.pirate_merged_f32, &Device::Cpu).unwrap(),
        ids,
    );
    let d = max_abs_diff(&all_logits(&model, ids), &merged);
    eprintln!("pirate at scale 1 vs merged: {d:e}");
    assert!(d <= 1e-4, "pirate at scale 1 vs merged: {d}");
    model.set_scale(slot, 0.0).unwrap();
    assert_eq!(
        all_logits(&model, ids),
        base_logits,
        "scale 0 is the base exactly"
    );
    model.set_scale(slot, 1.0).unwrap();
    let chef = LoraAdapter::load(&f.chef_f32).unwrap();
    let chef_slot = model.attach(&chef, 1.0).unwrap();
    let both = all_logits(&Model::load(&f.both_merged_f32, &Device::Cpu).unwrap(), ids);
    let d = max_abs_diff(&all_logits(&model, ids), &both);
    eprintln!("pirate + chef vs both merged: {d:e}");
    assert!(d <= 1e-4, "two adapters vs both merged: {d}");
    model.detach(chef_slot);
    model.detach(slot);
    assert_eq!(
        all_logits(&model, ids),
        base_logits,
        "detached: the base exactly"
    );
}

#[test]
fn bad_models_and_adapters_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(
        &cut,
        &std::fs::read(common::smollm2()).unwrap()[..50_000_000],
    )
    .unwrap();
    let e = Model::load(&cut, &Device::Cpu).unwrap_err().to_string();
    assert!(
        e.contains("cut.gguf: at byte") && e.contains("runs past the end of the file"),
        "{e}"
    );

    let gpt2 = dir.path().join("gpt2.gguf");
    let mut w = lorafold_converter::GgufWriter::new(&gpt2);
    w.add_metadata("general.architecture", &"gpt2".into())
        .unwrap();
    w.start().unwrap().finish().unwrap();
    let e = Model::load(&gpt2, &Device::Cpu).unwrap_err().to_string();
    assert!(
        e.contains("gpt2.gguf: architecture 'gpt2' is not supported (llama, qwen2, gemma3 are)"),
        "{e}"
    );

    // An adapter made for tiny-llama (96 wide) on SmolLM2 (576 wide).
    let tiny_adapter = dir.path().join("tiny.gguf");
    let tiny = common::shared_data().join("tiny-llama");
    let opts = ConvertOptions {
        output: None,
        adapter_output: Some(tiny_adapter.clone()),
        ..ConvertOptions::new(
            tiny.join("base"),
            Some(tiny.join("lora_all")),
            QuantPolicy::parse("f16", &[]).unwrap(),
            "",
        )
    };
    convert(&opts, &|_| {}).unwrap();
    let mut model = Model::load(common::smollm2(), &Device::Cpu).unwrap();
    let e = model
        .attach(&LoraAdapter::load(&tiny_adapter).unwrap(), 1.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("tiny.gguf: tensor 'blk.0.attn_k.weight.lora_a': lora_a [96, 8] / lora_b [8, 32] do not fit 'blk.0.attn_k.weight' (576 -> 192; an adapter for another model?)"), "{e}");
}

/// A small synthetic llama (the arithmetic is the engine's at any size) and
/// windows of token ids, the last past one prefill chunk (512 rows), so its
/// blocks run in two.
fn tiny_model_and_windows() -> (tempfile::TempDir, Model, Vec<Vec<u32>>) {
    let shape = common::synthetic::Shape {
        dim: 64,
        ffn: 160,
        layers: 6,
        heads: 4,
        kv_heads: 2,
        vocab: 300,
        untied: true,
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    common::synthetic::write_f32(&path, shape, 22);
    let model = Model::load(&path, &Device::Cpu).unwrap();
    let mut rng = common::Rng::new(7);
    let windows = [17, 40, 3, 530]
        .iter()
        .map(|&n| (0..n).map(|_| rng.below(300) as u32).collect())
        .collect();
    (dir, model, windows)
}

/// A model run a layer at a time over all windows (what a drift budget
/// does with a 30 GB f32 reference) gives every window's logits to the bit
/// of a window at a time.
#[test]
fn logits_made_a_layer_at_a_time_equal_a_window_at_a_time() {
    let (_dir, model, windows) = tiny_model_and_windows();
    let layered = lorafold_runtime::measure::layered_logits(&model, &windows).unwrap();
    // A session as long as the longest window, as the layered run's: the
    // context sets the prefill chunk.
    let ctx = windows.iter().map(Vec::len).max().unwrap();
    for (w, l) in windows.iter().zip(&layered) {
        let mut s = model
            .session_with(SessionOptions {
                kv: KvType::F32,
                ..SessionOptions::new(ctx)
            })
            .unwrap();
        assert!(
            s.logits(w, true).unwrap() == l.as_slice(),
            "a window of {}",
            w.len()
        );
    }
}

/// Statistics made a layer at a time (every window through block 0, then
/// block 1, ...; what a 7B conversion's calibration does) equal those
/// collected a window at a time to the bit, for windows longer than a
/// prefill chunk too, and layers asked for out of order are made again from
/// the embeddings once dropped.
#[test]
fn statistics_made_a_layer_at_a_time_equal_those_collected_whole() {
    use lorafold_converter::calib::{CalibStats, LayerStep};
    use lorafold_runtime::cpu::LinearInput;
    use std::sync::{Arc, Mutex};
    let (_dir, merged, windows) = tiny_model_and_windows();
    let whole = CalibStats::collect(&merged, &windows).unwrap();
    let steps: Arc<Mutex<Vec<(usize, bool)>>> = Arc::default();
    let log = Arc::clone(&steps);
    let layered = CalibStats::streamed_with(
        merged,
        windows.clone(),
        false,
        Box::new(move |s: &LayerStep| log.lock().unwrap().push((s.layer, s.restarted))),
    );
    assert_eq!(layered.tokens, whole.tokens);
    let last = layered.inputs.keys().map(|k| k.0).max().unwrap();
    for layer in [3, 2, 0, last] {
        for input in LinearInput::ALL {
            let (a, b) = (
                &layered.inputs[&(layer, input)],
                &whole.inputs[&(layer, input)],
            );
            assert_eq!(a.k, b.k);
            assert!(a.xtx().unwrap() == b.xtx().unwrap(), "{layer} {input:?}");
            assert_eq!(a.importance().unwrap(), b.importance().unwrap());
        }
    }
    // 3 makes 0..=3 and keeps 2 and 3; 2 is at hand; 0 was dropped, so it
    // is made again from the embeddings; then the rest in one pass.
    let mut want: Vec<(usize, bool)> = (0..=3).map(|l| (l, false)).collect();
    want.push((0, true));
    want.extend((1..=last).map(|l| (l, false)));
    assert_eq!(*steps.lock().unwrap(), want);
}

/// Calibration sees what the linear layers read: the statistics of the f32
/// base with the pirate adapter attached equal those of the f32 merged file
/// (1e-5 relative), layer 0's q/k/v input equals RMSNorm of the embedding
/// rows computed here from the file, and the file written reads back.
#[test]
fn calibration_of_base_plus_adapter_equals_the_merged_model() {
    use lorafold_converter::calib::{tensor_name, CalibStats};
    use lorafold_runtime::cpu::LinearInput;
    let f = files();
    let text =
        std::fs::read_to_string(common::shared_data().join("smollm2-adapters/pirate/train.txt"))
            .unwrap();
    let merged = Model::load(&f.pirate_merged_f32, &Device::Cpu).unwrap();
    let tok = Tokenizer::from_gguf(merged.file()).unwrap();
    let windows: Vec<Vec<u32>> = text
        .lines()
        .take(4)
        .map(|l| tok.encode(l).unwrap())
        .collect();
    let a = CalibStats::collect(&merged, &windows).unwrap();
    let mut adapted = Model::load(&f.base_f32, &Device::Cpu).unwrap();
    adapted
        .attach(&LoraAdapter::load(&f.pirate_f32).unwrap(), 1.0)
        .unwrap();
    let b = CalibStats::collect(&adapted, &windows).unwrap();
    let tokens: usize = windows.iter().map(Vec::len).sum();
    assert_eq!((a.tokens, b.tokens), (tokens as u64, tokens as u64));
    assert_eq!(a.inputs.len(), 4 * merged.config.n_layers);
    let rel = |x: &[f32], y: &[f64]| {
        let d: f64 = x
            .iter()
            .zip(y)
            .map(|(&p, q)| (p as f64 - q) * (p as f64 - q))
            .sum();
        let n: f64 = y.iter().map(|q| q * q).sum();
        (d / n).sqrt()
    };
    let mut worst = 0f64;
    for (key, sa) in &a.inputs {
        let want: Vec<f64> = sa.xtx().unwrap().iter().map(|&v| v as f64).collect();
        worst = worst.max(rel(&b.inputs[key].xtx().unwrap(), &want));
    }
    eprintln!("calibration, base + pirate vs merged: worst relative difference {worst:e}");
    assert!(worst <= 1e-5, "{worst}");

    // Layer 0's q/k/v input from the file by hand: RMSNorm(embedding) * weight.
    let file = merged.file();
    let dim = merged.config.dim;
    let read = |name: &str| -> Vec<f32> {
        let t = file.tensor(name).unwrap();
        assert_eq!(t.ggml_type, GgmlType::F32);
        file.tensor_data(t)
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    };
    let (emb, norm) = (read("token_embd.weight"), read("blk.0.attn_norm.weight"));
    let eps = merged.config.rms_eps;
    let mut want = vec![0f64; dim * dim];
    for &id in windows.iter().flatten() {
        let e = &emb[id as usize * dim..(id as usize + 1) * dim];
        let ms: f64 = e.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / dim as f64;
        let x: Vec<f64> = e
            .iter()
            .zip(&norm)
            .map(|(&v, &g)| v as f64 / (ms + eps).sqrt() * g as f64)
            .collect();
        for i in 0..dim {
            for j in 0..dim {
                want[i * dim + j] += x[i] * x[j];
            }
        }
    }
    let got = &a.inputs[&(0, LinearInput::AttnIn)].xtx().unwrap();
    let d = rel(got, &want);
    eprintln!("layer 0 q/k/v input vs RMSNorm of the embeddings: {d:e}");
    assert!(d <= 1e-5, "{d}");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("calib.gguf");
    a.write(
        &path,
        &[("lorafold.calibration.text", "pirate/train.txt".into())],
    )
    .unwrap();
    let back = CalibStats::read(&path).unwrap();
    assert_eq!(back.tokens, a.tokens);
    assert_eq!(back.inputs.len(), a.inputs.len());
    for (key, s) in &a.inputs {
        let r = &back.inputs[key];
        assert_eq!(r.k, s.k, "{}", tensor_name(key.0, key.1));
        assert!(r.xtx().unwrap() == s.xtx().unwrap());
        assert_eq!(r.sum2, s.sum2);
    }
}

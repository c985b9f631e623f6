//! Calibration on hostile inputs: statistics files that do not fit the
//! model, that hold values no text gives, or that were damaged; compensation
//! from extreme statistics; text inputs that never end; and the work folders
//! of a calibrating or budgeted conversion when the process is stopped.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::synthetic::{write_f32, Shape};
use common::{lorafold, Rng};
use lorafold_converter::calib::{reseal, CalibStats};
use lorafold_runtime::cpu::LinearInput;
use lorafold_runtime::gguf::GgufFile;

/// A small llama with a vocabulary of `t3`, `t4`, ... (a SentencePiece
/// placeholder), every width a multiple of 32.
const SHAPE: Shape = Shape {
    dim: 64,
    ffn: 128,
    layers: 2,
    heads: 2,
    kv_heads: 1,
    vocab: 64,
    untied: true,
};

/// Lines of the placeholder vocabulary's tokens, from `seed`.
fn text(lines: usize, seed: u64) -> String {
    let mut rng = Rng::new(seed);
    (0..lines)
        .map(|_| {
            let n = 4 + rng.below(12);
            (0..n)
                .map(|_| format!("t{}", 3 + rng.below(SHAPE.vocab as u64 - 3)))
                .collect::<Vec<_>>()
                .join(" ")
                + "\n"
        })
        .collect()
}

/// The synthetic base, a text and its statistics from `lorafold calibrate`.
struct Fixture {
    dir: tempfile::TempDir,
    base: PathBuf,
    text: PathBuf,
    stats: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.gguf");
    write_f32(&base, SHAPE, 5);
    let text_path = dir.path().join("train.txt");
    std::fs::write(&text_path, text(40, 1)).unwrap();
    let stats = dir.path().join("stats.gguf");
    let o = lorafold()
        .arg("calibrate")
        .arg(&base)
        .arg("--text")
        .arg(&text_path)
        .arg("-o")
        .arg(&stats)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    Fixture {
        dir,
        base,
        text: text_path,
        stats,
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `lorafold convert` of the fixture's base at q4_0 with `args`, into `out`.
fn convert(f: &Fixture, out: &Path, args: &[&str]) -> Output {
    lorafold()
        .args(["convert", "-q", "--quant", "q4_0", "--base"])
        .arg(&f.base)
        .arg("-o")
        .arg(out)
        .args(args)
        .output()
        .unwrap()
}

/// Refused with exit 1, a message naming `file` and holding `parts`, and
/// no output.
fn assert_refused(o: &Output, out: &Path, file: &Path, parts: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains(&file.display().to_string()),
        "{err:?} lacks the file"
    );
    for p in parts {
        assert!(err.contains(p), "{err:?} lacks {p:?}");
    }
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!out.exists(), "{} was written", out.display());
}

/// Statistics read from `from`, edited by `edit`, written to `to`.
fn edited(from: &Path, to: &Path, edit: impl FnOnce(&mut CalibStats)) -> PathBuf {
    let mut s = CalibStats::read(from).unwrap();
    edit(&mut s);
    s.write(to, &[]).unwrap();
    to.to_path_buf()
}

#[test]
fn statistics_that_do_not_fit_the_model_are_refused_naming_the_file() {
    let f = fixture();
    let d = f.dir.path();
    let out = d.join("out.gguf");
    // The whole file is used: every rounding, and compensation's norm.
    for rounding in ["nearest", "imatrix", "gptq"] {
        let o = convert(
            &f,
            &out,
            &["--calib", f.stats.to_str().unwrap(), "--rounding", rounding],
        );
        assert!(o.status.success(), "{rounding}: {}", stderr(&o));
        std::fs::remove_file(&out).unwrap();
    }

    let missing = edited(&f.stats, &d.join("missing.gguf"), |s| {
        s.inputs.retain(|&(layer, _), _| layer == 0)
    });
    for rounding in ["nearest", "gptq"] {
        let o = convert(
            &f,
            &out,
            &["--calib", missing.to_str().unwrap(), "--rounding", rounding],
        );
        assert_refused(
            &o,
            &out,
            &missing,
            &[
                "no statistics of the input of 'blk.1.",
                "(nor of 6 more weights)",
            ],
        );
    }
    let extra = edited(&f.stats, &d.join("extra.gguf"), |s| {
        let layer1: Vec<_> = s
            .inputs
            .range((1, LinearInput::AttnIn)..)
            .map(|(k, v)| (k.1, v.clone()))
            .collect();
        for (input, v) in layer1 {
            s.inputs.insert((2, input), v);
        }
    });
    let o = convert(&f, &out, &["--calib", extra.to_str().unwrap()]);
    assert_refused(
        &o,
        &out,
        &extra,
        &[
            "tensor 'blk.2.attn_in.xtx'",
            "no weight that reads this input",
        ],
    );
    let no_tokens = edited(&f.stats, &d.join("no-tokens.gguf"), |s| s.tokens = 0);
    let o = convert(
        &f,
        &out,
        &[
            "--calib",
            no_tokens.to_str().unwrap(),
            "--rounding",
            "nearest",
        ],
    );
    assert_refused(&o, &out, &no_tokens, &["lorafold.calibration.tokens is 0"]);

    // An imatrix gets the same: llama.cpp's layout, missing a layer.
    let imatrix = d.join("missing.imatrix.gguf");
    let mut s = CalibStats::read(&f.stats).unwrap();
    s.inputs.retain(|&(layer, _), _| layer == 0);
    s.write_imatrix(&imatrix, "train.txt", 40, 16).unwrap();
    let o = convert(&f, &out, &["--calib", imatrix.to_str().unwrap()]);
    assert_refused(
        &o,
        &out,
        &imatrix,
        &["no statistics of the input of 'blk.1."],
    );
    // A whole imatrix still has only diagonals: GPTQ is refused up front.
    let imatrix = d.join("stats.imatrix.gguf");
    CalibStats::read(&f.stats)
        .unwrap()
        .write_imatrix(&imatrix, "train.txt", 40, 16)
        .unwrap();
    let o = convert(
        &f,
        &out,
        &["--calib", imatrix.to_str().unwrap(), "--rounding", "gptq"],
    );
    assert_refused(
        &o,
        &out,
        &imatrix,
        &["only the diagonal of XᵀX (an imatrix)"],
    );
    let o = convert(&f, &out, &["--calib", imatrix.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// The file offset of element `[i, j]` of tensor `name`.
fn element_offset(path: &Path, name: &str, i: usize, j: usize) -> (usize, f32) {
    let f = GgufFile::open(path).unwrap();
    let t = f.tensor(name).unwrap();
    let k = t.dims()[0] as usize;
    let at = (f.data_offset() + t.offset) as usize + 4 * (i * k + j);
    let b = &f.raw_bytes()[at..at + 4];
    (at, f32::from_le_bytes(b.try_into().unwrap()))
}

/// A copy of `from` at `to` with element `[i, j]` of `name` set by `set`
/// (given the values at [i, j], [j, i], [i, i] and [j, j]), checksum renewed.
fn with_element(
    from: &Path,
    to: &Path,
    name: &str,
    (i, j): (usize, usize),
    set: impl Fn([f32; 4]) -> f32,
) -> PathBuf {
    std::fs::copy(from, to).unwrap();
    let (at, v) = element_offset(from, name, i, j);
    let others = [(j, i), (i, i), (j, j)].map(|(a, b)| element_offset(from, name, a, b).1);
    let mut bytes = std::fs::read(to).unwrap();
    let new = set([v, others[0], others[1], others[2]]);
    bytes[at..at + 4].copy_from_slice(&new.to_le_bytes());
    std::fs::write(to, bytes).unwrap();
    reseal(to).unwrap();
    to.to_path_buf()
}

#[test]
fn statistics_no_text_could_give_are_refused_naming_the_file_and_tensor() {
    let f = fixture();
    let d = f.dir.path();
    let out = d.join("out.gguf");
    let t = "blk.1.ffn_in.xtx";
    type Case = (
        &'static str,
        (usize, usize),
        fn([f32; 4]) -> f32,
        &'static str,
    );
    let cases: [Case; 6] = [
        ("nan", (3, 5), |_| f32::NAN, "element [3, 5] is NaN"),
        ("inf", (7, 7), |_| f32::INFINITY, "element [7, 7] is inf"),
        (
            "neg-inf",
            (2, 9),
            |_| f32::NEG_INFINITY,
            "element [2, 9] is -inf",
        ),
        (
            "negative",
            (4, 4),
            |[v, ..]| -v,
            "diagonal element [4, 4] is -",
        ),
        // Far outside what f32 sums leave between the two triangles.
        (
            "asymmetric",
            (1, 6),
            |[v, _, a, b]| v + 0.01 * (a * b).sqrt(),
            "XᵀX is symmetric",
        ),
        (
            "not-a-gram",
            (6, 1),
            |[_, _, a, b]| 3.0 * (a * b).sqrt(),
            "elements [1, 6]",
        ),
    ];
    for (what, at, set, expect) in cases {
        let bad = with_element(&f.stats, &d.join(format!("{what}.gguf")), t, at, set);
        for rounding in ["nearest", "imatrix"] {
            let o = convert(
                &f,
                &out,
                &["--calib", bad.to_str().unwrap(), "--rounding", rounding],
            );
            assert_refused(&o, &out, &bad, &[&format!("tensor '{t}'"), expect]);
        }
    }
    // Both triangles beyond √(H_ii·H_jj): symmetric, and still no sum of x·xᵀ.
    let both = with_element(&f.stats, &d.join("gram1.gguf"), t, (1, 6), |[_, _, a, b]| {
        3.0 * (a * b).sqrt()
    });
    let both = with_element(&both, &d.join("gram2.gguf"), t, (6, 1), |[_, _, a, b]| {
        3.0 * (a * b).sqrt()
    });
    let o = convert(&f, &out, &["--calib", both.to_str().unwrap()]);
    assert_refused(
        &o,
        &out,
        &both,
        &[&format!("tensor '{t}'"), "exceeds", "bounds a sum of x·xᵀ"],
    );

    // Edited without renewing the checksum: damaged, whatever the value.
    let damaged = d.join("damaged.gguf");
    std::fs::copy(&f.stats, &damaged).unwrap();
    let (at, v) = element_offset(&damaged, t, 2, 2);
    let mut bytes = std::fs::read(&damaged).unwrap();
    bytes[at..at + 4].copy_from_slice(&(v * 1.0001).to_le_bytes());
    std::fs::write(&damaged, bytes).unwrap();
    let o = convert(&f, &out, &["--calib", damaged.to_str().unwrap()]);
    assert_refused(
        &o,
        &out,
        &damaged,
        &["checksum does not match", "damaged or edited"],
    );
}

/// Seeded truncations, byte flips and value corruptions of a real statistics
/// file: each is refused naming the file, or (a flip in a provenance string
/// or padding) read to exactly the clean statistics; never a panic.
#[test]
fn fuzzed_statistics_files_are_refused_or_read_unchanged() {
    let f = fixture();
    let d = f.dir.path();
    let clean_bytes = std::fs::read(&f.stats).unwrap();
    let clean = CalibStats::read(&f.stats).unwrap();
    let weights = {
        let base = GgufFile::open(&f.base).unwrap();
        base.tensors()
            .iter()
            .filter(|t| t.dims().len() == 2)
            .map(|t| (t.name.clone(), t.dims()[0] as usize))
            .collect::<Vec<_>>()
    };
    let fits = |s: &CalibStats| s.check_fits(weights.iter().map(|(n, k)| (n.as_str(), *k)));
    fits(&clean).unwrap();
    let same = |s: &CalibStats| {
        s.tokens == clean.tokens
            && s.inputs.len() == clean.inputs.len()
            && s.inputs
                .iter()
                .zip(&clean.inputs)
                .all(|((ka, a), (kb, b))| {
                    ka == kb && a.k == b.k && a.xtx().unwrap() == b.xtx().unwrap()
                })
    };
    let path = d.join("fuzzed.gguf");
    let shown = path.display().to_string();
    let check = |what: &str, bytes: &[u8], must_fail: bool| {
        std::fs::write(&path, bytes).unwrap();
        match CalibStats::read(&path).map_err(|e| e.to_string()) {
            Err(e) => assert!(e.contains(&shown), "{what}: {e:?} does not name the file"),
            Ok(s) => {
                assert!(!must_fail, "{what}: read");
                assert!(same(&s), "{what}: read to other statistics");
                fits(&s).unwrap();
            }
        }
    };
    let mut rng = Rng::new(19);
    let data_start = GgufFile::open(&f.stats).unwrap().data_offset() as usize;
    for i in 0..30 {
        let len = rng.below(clean_bytes.len() as u64) as usize;
        check(
            &format!("truncation {i} at {len}"),
            &clean_bytes[..len],
            true,
        );
    }
    for i in 0..60 {
        // Half in the header, half in the tensors' bytes.
        let at = if i % 2 == 0 {
            rng.below(data_start as u64) as usize
        } else {
            data_start + rng.below((clean_bytes.len() - data_start) as u64) as usize
        };
        let mut b = clean_bytes.clone();
        b[at] ^= 1 << rng.below(8);
        check(&format!("flip {i} at {at}"), &b, false);
    }
    // Value corruptions with the checksum renewed: what the values say is
    // checked, not only that they are the ones written.
    let names: Vec<String> = clean
        .inputs
        .keys()
        .map(|&(l, i)| lorafold_converter::calib::tensor_name(l, i))
        .collect();
    for i in 0..20 {
        let name = &names[rng.below(names.len() as u64) as usize];
        let k = clean.inputs.values().next().unwrap().k.min(64);
        let (r, c) = (rng.below(k as u64) as usize, rng.below(k as u64) as usize);
        let kind = i % 4;
        let to = d.join(format!("value-{i}.gguf"));
        let (r, c) = if kind == 2 {
            (r, r)
        } else {
            (r, c.max(r + 1).min(k - 1))
        };
        if r == c && kind != 2 {
            continue;
        }
        let bad = with_element(
            &f.stats,
            &to,
            name,
            (r, c),
            move |[v, _, a, b]| match kind {
                0 => f32::NAN,
                1 => f32::INFINITY,
                2 => -1.0 - v.abs(),
                _ => v + 0.5 * (a * b).sqrt() + 1.0,
            },
        );
        let e = CalibStats::read(&bad).unwrap_err().to_string();
        assert!(
            e.contains(&bad.display().to_string()) && e.contains(name.as_str()),
            "{e}"
        );
    }
    // Missing and extra tensors, and no tokens: written whole, checksum and all.
    let cases: [(&str, fn(&mut CalibStats)); 3] = [
        ("missing", |s| {
            let first = *s.inputs.keys().next().unwrap();
            s.inputs.remove(&first);
        }),
        ("extra", |s| {
            let v = s.inputs.values().next().unwrap().clone();
            s.inputs.insert((SHAPE.layers + 3, LinearInput::FfnDown), v);
        }),
        ("no tokens", |s| s.tokens = 0),
    ];
    for (what, edit) in cases {
        let p = edited(&f.stats, &d.join(format!("{what}.gguf")), edit);
        let e = CalibStats::read(&p)
            .and_then(|s| fits(&s))
            .unwrap_err()
            .to_string();
        assert!(e.contains(&p.display().to_string()), "{what}: {e}");
    }
}

#[test]
fn compensation_from_extreme_statistics_is_finite_and_measured_as_written() {
    // Statistics scaled by 1e30 say the same about directions: the pair,
    // the adapter and the report's errors are those of the plain ones.
    let dir = tempfile::tempdir().unwrap();
    let tiny = common::shared_data().join("tiny-llama");
    let widths = [
        (LinearInput::AttnIn, 96),
        (LinearInput::AttnOut, 96),
        (LinearInput::FfnIn, 96),
        (LinearInput::FfnDown, 256),
    ];
    let stats = |scale: f32| {
        let mut s = CalibStats::default();
        let mut rng = Rng::new(3);
        for layer in 0..3 {
            for (input, k) in widths {
                let rows: Vec<f32> = (0..200 * k).map(|_| scale * rng.f32()).collect();
                s.add(layer, input, &rows, k).unwrap();
            }
        }
        s.tokens = 200;
        s.flush().unwrap();
        s
    };
    let mut reports = Vec::new();
    for (name, scale) in [("plain", 1.0), ("extreme", 1e15)] {
        let p = dir.path().join(format!("{name}.stats.gguf"));
        stats(scale).write(&p, &[]).unwrap();
        let out = dir.path().join(format!("{name}.gguf"));
        let report = dir.path().join(format!("{name}.json"));
        let o = lorafold()
            .args([
                "convert",
                "-q",
                "--quant",
                "q4_0",
                "--compensate",
                "4",
                "--base",
            ])
            .arg(tiny.join("base"))
            .arg("--adapter")
            .arg(tiny.join("lora_all"))
            .arg("--calib")
            .arg(&p)
            .arg("-o")
            .arg(&out)
            .arg("--report")
            .arg(&report)
            .output()
            .unwrap();
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let adapter = GgufFile::open(out.with_extension("compensation.gguf")).unwrap();
        for t in adapter.tensors() {
            let v: Vec<f32> = adapter
                .tensor_data(t)
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect();
            assert!(
                v.iter().all(|x| x.is_finite()),
                "{name}: {} holds values f16 does not",
                t.name
            );
        }
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        let errors: Vec<(f64, f64)> = r["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| !t["output_error_compensated"].is_null())
            .map(|t| {
                (
                    t["output_error"].as_f64().unwrap(),
                    t["output_error_compensated"].as_f64().unwrap(),
                )
            })
            .collect();
        assert!(!errors.is_empty());
        reports.push(errors);
    }
    // GPTQ's codes may tip differently on near ties, so the pairs are not
    // compared value by value; what they remove is.
    let (plain, extreme) = (&reports[0], &reports[1]);
    for ((e0, c0), (e1, c1)) in plain.iter().zip(extreme) {
        assert!((e0 - e1).abs() <= 1e-2 * e0, "{e0} vs {e1}");
        assert!((c0 - c1).abs() <= 5e-2 * c0, "compensated {c0} vs {c1}");
        assert!(c1 < e1, "the pair lowers the error: {c1} vs {e1}");
    }
}

/// `lorafold ARGS` with stdin from `stdin`.
fn run_with(args: &[&str], stdin: Stdio) -> Output {
    lorafold().args(args).stdin(stdin).output().unwrap()
}

#[cfg(unix)]
#[test]
fn text_inputs_are_bounded() {
    let f = fixture();
    let d = f.dir.path();
    let base = f.base.to_str().unwrap();
    let cand = format!("same={base}");
    let out = d.join("out.gguf");
    let too_big = d.join("big.txt");
    // Sparse: a 65 MiB file costs nothing until read.
    std::fs::File::create(&too_big)
        .unwrap()
        .set_len(65 << 20)
        .unwrap();
    let limit = "more than 64 MiB of text, the most a text input may hold";
    // A named device is refused as it is opened, a regular file past the
    // bound before it is read, a stream (stdin) when it passes the bound.
    let device = "not a regular file (a device)";
    for (text, limit) in [(Path::new("/dev/zero"), device), (too_big.as_path(), limit)] {
        let t = text.to_str().unwrap();
        let o = lorafold()
            .args(["calibrate", base, "--text", t, "-o"])
            .arg(d.join("s.gguf"))
            .output()
            .unwrap();
        assert_refused(&o, &d.join("s.gguf"), text, &[limit]);
        let o = convert(&f, &out, &["--calib-text", t]);
        assert_refused(&o, &out, text, &[limit]);
        let o = lorafold()
            .args(["drift", "--ref", base, "--cand", &cand, "--text", t])
            .output()
            .unwrap();
        assert_refused(&o, &out, text, &[limit]);
    }
    let o = run_with(
        &["run", base, "--chat", "-n", "1"],
        Stdio::from(std::fs::File::open("/dev/zero").unwrap()),
    );
    assert_refused(&o, &out, Path::new("stdin"), &[limit]);
    // The JSON a converter reads is text too.
    let adapter = tempfile::tempdir().unwrap();
    let config = adapter.path().join("adapter_config.json");
    std::os::unix::fs::symlink("/dev/zero", &config).unwrap();
    std::fs::write(adapter.path().join("adapter_model.safetensors"), b"").unwrap();
    let o = convert(&f, &out, &["--adapter", adapter.path().to_str().unwrap()]);
    assert_refused(&o, &out, &config, &[device]);
    let listing: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(listing.len(), 4, "{listing:?}");
}

fn hidden(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

/// Start `lorafold convert` of the fixture's base with `args`, wait until
/// `folders` hidden entries exist beside `out`, and send `signal`.
fn stop_when_working(
    f: &Fixture,
    out: &Path,
    args: &[&str],
    folders: usize,
    signal: i32,
) -> Option<i32> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_lorafold"))
        .args([
            "convert",
            "-q",
            "--quant",
            "q4_0",
            "--threads",
            "1",
            "--base",
        ])
        .arg(&f.base)
        .arg("-o")
        .arg(out)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let dir = out.parent().unwrap();
    let seen = loop {
        let n = hidden(dir).len();
        if n >= folders || Instant::now() > deadline {
            break n >= folders;
        }
        if child.try_wait().unwrap().is_some() {
            break false;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, signal) };
    let code = child.wait().unwrap().code();
    assert!(
        seen,
        "the conversion ended before its work folders were seen"
    );
    code
}

#[cfg(unix)]
#[test]
fn work_folders_go_on_a_signal_and_are_swept_after_a_kill() {
    let f = fixture();
    // A long text: calibrating it keeps the f32 reference's folder a while.
    let long = f.dir.path().join("long.txt");
    std::fs::write(&long, text(3000, 2)).unwrap();
    let long = long.to_str().unwrap();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out.gguf");

    let code = stop_when_working(&f, &out, &["--calib-text", long], 1, libc::SIGTERM);
    assert_eq!(code, Some(128 + libc::SIGTERM));
    assert_eq!(hidden(work.path()), Vec::<String>::new());
    assert!(!out.exists());

    // A drift budget's rounds have a folder of their own beside the reference's.
    let code = stop_when_working(
        &f,
        &out,
        &["--calib-text", long, "--budget-kl", "0.0001"],
        2,
        libc::SIGINT,
    );
    assert_eq!(code, Some(128 + libc::SIGINT));
    assert_eq!(hidden(work.path()), Vec::<String>::new());

    // Killed outright, the folder stays until the next run beside it.
    let code = stop_when_working(&f, &out, &["--calib-text", long], 1, libc::SIGKILL);
    assert_eq!(code, None);
    assert_eq!(hidden(work.path()).len(), 1);
    let short = f.text.to_str().unwrap();
    let o = convert(&f, &out, &["--calib-text", short]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(hidden(work.path()), Vec::<String>::new());
    assert!(out.exists());
}

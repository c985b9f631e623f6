//! GGUF I/O: how long opening (parsing) SmolLM2's GGUF takes, and the
//! streaming writer's throughput copying all of its tensors.
//!
//! Needs the model in the cache: `scripts/fetch-smollm2.sh`.

use std::path::PathBuf;
use std::process::Command;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use lorafold_converter::GgufWriter;
use lorafold_runtime::gguf::GgufFile;

fn smollm2() -> PathBuf {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/fetch-smollm2.sh");
    let out = Command::new(script)
        .output()
        .expect("run scripts/fetch-smollm2.sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

fn bench(c: &mut Criterion) {
    let path = smollm2();
    let mut g = c.benchmark_group("gguf");
    g.sample_size(20);
    g.bench_function("open_smollm2", |b| {
        b.iter(|| GgufFile::open(&path).unwrap())
    });

    let src = GgufFile::open(&path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("copy.gguf");
    g.throughput(Throughput::Bytes(src.file_size()));
    g.bench_function("copy_smollm2", |b| {
        b.iter(|| {
            let mut w = GgufWriter::new(&dest);
            for (k, v) in src.metadata() {
                w.add_metadata(k, &v).unwrap();
            }
            for t in src.tensors() {
                w.add_tensor(&t.name, t.ggml_type, t.dims()).unwrap();
            }
            let mut s = w.start().unwrap();
            for t in src.tensors() {
                s.write_tensor(&t.name, src.tensor_data(t)).unwrap();
            }
            s.finish().unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

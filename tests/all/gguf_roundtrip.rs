//! SmolLM2's GGUF read by our reader and written back by our writer is the
//! same file, and llama.cpp's own reader (PyPI `gguf`) sees the same tensors.

use crate::common;

use lorafold_converter::GgufWriter;
use lorafold_runtime::gguf::GgufFile;

const LIST_TENSORS: &str = r#"
import sys, gguf
r = gguf.GGUFReader(sys.argv[1])
for t in r.tensors:
    print(t.name, t.tensor_type.name, ",".join(str(int(d)) for d in t.shape))
print("keys", len([k for k in r.fields if not k.startswith("GGUF.")]))
"#;

#[test]
fn smollm2_round_trips_through_our_writer() {
    let src_path = common::smollm2();
    let src = GgufFile::open(src_path).unwrap();
    assert_eq!(src.tensors().len(), 272);
    assert_eq!(src.metadata_len(), 33);

    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("copy.gguf");
    let mut w = GgufWriter::new(&out_path);
    for (key, value) in src.metadata() {
        w.add_metadata(key, &value).unwrap();
    }
    for t in src.tensors() {
        w.add_tensor(&t.name, t.ggml_type, t.dims()).unwrap();
    }
    let mut stream = w.start().unwrap();
    for t in src.tensors() {
        stream.write_tensor(&t.name, src.tensor_data(t)).unwrap();
    }
    let size = stream.finish().unwrap();

    let out = GgufFile::open(&out_path).unwrap();
    assert_eq!(size, out.file_size());
    // Every metadata key, in order, with identical type and value.
    let a: Vec<_> = src.metadata().collect();
    let b: Vec<_> = out.metadata().collect();
    assert_eq!(a, b);
    // The vocabulary decodes to the same strings (not just the same bytes).
    let vocab = out.get_strings("tokenizer.ggml.tokens").unwrap();
    assert_eq!(vocab.len(), 49152);
    assert_eq!(vocab[1], "<|im_start|>");
    assert_eq!(vocab[2], "<|im_end|>");
    // Every tensor: name, type, dims and data.
    assert_eq!(src.tensors().len(), out.tensors().len());
    for (x, y) in src.tensors().iter().zip(out.tensors()) {
        assert_eq!(
            (&x.name, x.ggml_type, x.dims()),
            (&y.name, y.ggml_type, y.dims())
        );
        assert!(
            src.tensor_data(x) == out.tensor_data(y),
            "tensor {} differs",
            x.name
        );
    }
    // SmolLM2's file was written by llama.cpp in the same canonical layout, so
    // the whole file comes back byte for byte.
    let original = std::fs::read(src_path).unwrap();
    let copy = std::fs::read(&out_path).unwrap();
    assert!(
        original == copy,
        "files differ (sizes {} and {})",
        original.len(),
        copy.len()
    );

    // llama.cpp's reader lists the same tensors, types and shapes in both.
    let theirs_src = common::run_python(LIST_TENSORS, &[src_path]);
    let theirs_out = common::run_python(LIST_TENSORS, &[&out_path]);
    assert_eq!(theirs_src, theirs_out);
    let ours: String = out
        .tensors()
        .iter()
        .map(|t| {
            format!(
                "{} {} {}\n",
                t.name,
                t.ggml_type,
                t.dims()
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            )
        })
        .collect();
    assert_eq!(theirs_out, format!("{ours}keys 33\n"));
}

//! The streaming writer: layout the reader accepts, and nothing left behind on error.

use lorafold_converter::{GgufWriter, WriteError};
use lorafold_runtime::gguf::{GgmlType, GgufFile, MetadataValue};

fn entries(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn two_tensor_writer(dest: &std::path::Path) -> GgufWriter {
    let mut w = GgufWriter::new(dest);
    w.add_metadata("general.architecture", &"llama".into())
        .unwrap();
    w.add_tensor("x", GgmlType::F32, &[3]).unwrap();
    w.add_tensor("y", GgmlType::Q8_0, &[32, 2]).unwrap();
    w
}

#[test]
fn layout_is_aligned_and_readable() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("m.gguf");
    let mut s = two_tensor_writer(&dest).start().unwrap();
    assert_eq!(s.next_tensor().map(|t| t.0), Some("x"));
    s.write_tensor("x", &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
        .unwrap();
    s.write_tensor("y", &[7u8; 68]).unwrap();
    let size = s.finish().unwrap();
    let bytes = std::fs::read(&dest).unwrap();
    assert_eq!(size, bytes.len() as u64);
    // header 24 + kv (8+20+4+8+5) + infos (8+1+4+8+4+8)+(8+1+4+16+4+8) = 146 -> data at 160;
    // x: 12 bytes padded to 32; y: 68 bytes padded to 96.
    assert_eq!(&bytes[..4], b"GGUF");
    assert_eq!(bytes.len(), 160 + 32 + 96);
    let f = GgufFile::open(&dest).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.data_offset(), 160);
    assert_eq!(f.tensor("y").unwrap().offset, 32);
    assert_eq!(
        f.tensor_data(f.tensor("x").unwrap()),
        &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    );
    assert_eq!(f.get_str("general.architecture").as_deref(), Some("llama"));
    assert_eq!(entries(dir.path()), ["m.gguf"]);
}

#[test]
fn same_input_gives_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let mut outs = Vec::new();
    for name in ["a.gguf", "b.gguf"] {
        let dest = dir.path().join(name);
        let mut s = two_tensor_writer(&dest).start().unwrap();
        s.write_tensor("x", &[9u8; 12]).unwrap();
        s.write_tensor("y", &[3u8; 68]).unwrap();
        s.finish().unwrap();
        outs.push(std::fs::read(dest).unwrap());
    }
    assert_eq!(outs[0], outs[1]);
}

#[test]
fn abandoned_stream_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("m.gguf");
    let mut s = two_tensor_writer(&dest).start().unwrap();
    s.write_tensor("x", &[0u8; 12]).unwrap();
    assert_eq!(
        entries(dir.path()).len(),
        1,
        "the partial file exists while writing"
    );
    assert!(!dest.exists());
    drop(s);
    assert!(entries(dir.path()).is_empty());
}

#[test]
fn wrong_size_names_tensor_and_file_and_keeps_old_output() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("m.gguf");
    std::fs::write(&dest, b"previous release").unwrap();
    let mut s = two_tensor_writer(&dest).start().unwrap();
    let e = s.write_tensor("x", &[0u8; 11]).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("m.gguf: tensor 'x': 11 bytes of data given, F32 [3] needs 12"),
        "{msg}"
    );
    drop(s);
    assert_eq!(std::fs::read(&dest).unwrap(), b"previous release");
    assert_eq!(entries(dir.path()), ["m.gguf"]);
}

#[test]
fn order_completeness_and_declarations_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("m.gguf");
    let mut s = two_tensor_writer(&dest).start().unwrap();
    assert!(matches!(
        s.write_tensor("y", &[0u8; 68]),
        Err(WriteError::OutOfOrder { .. })
    ));
    s.write_tensor("x", &[0u8; 12]).unwrap();
    let e = s.finish().unwrap_err();
    assert!(
        e.to_string()
            .contains("1 declared tensors were never written, starting with 'y'"),
        "{e}"
    );
    assert!(entries(dir.path()).is_empty());

    let mut w = GgufWriter::new(&dest);
    w.add_metadata("k", &1u32.into()).unwrap();
    assert!(matches!(
        w.add_metadata("k", &2u32.into()),
        Err(WriteError::DuplicateKey { .. })
    ));
    assert!(matches!(
        w.add_metadata("general.alignment", &MetadataValue::U32(24)),
        Err(WriteError::BadAlignment { .. })
    ));
    w.add_tensor("t", GgmlType::Q4_0, &[64]).unwrap();
    let e = w.add_tensor("t", GgmlType::F32, &[1]).unwrap_err();
    assert!(e.to_string().contains("tensor 't': declared twice"), "{e}");
    let e = w.add_tensor("u", GgmlType::Q4_K, &[128, 2]).unwrap_err();
    assert!(
        e.to_string()
            .contains("row length 128 is not a multiple of Q4_K's block size 256"),
        "{e}"
    );
    let e = w
        .add_tensor("v", GgmlType::F32, &[1, 1, 1, 1, 1])
        .unwrap_err();
    assert!(e.to_string().contains("5 dimensions"), "{e}");
}

#[test]
fn alignment_from_metadata_applies_to_data() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("m.gguf");
    let mut w = GgufWriter::new(&dest);
    w.add_tensor("x", GgmlType::F32, &[3]).unwrap();
    w.add_tensor("y", GgmlType::F32, &[1]).unwrap();
    w.add_metadata("general.alignment", &128u32.into()).unwrap();
    let mut s = w.start().unwrap();
    s.write_tensor("x", &[0u8; 12]).unwrap();
    s.write_tensor("y", &[1u8; 4]).unwrap();
    s.finish().unwrap();
    let f = GgufFile::open(&dest).unwrap();
    assert_eq!(f.alignment(), 128);
    assert_eq!(f.data_offset() % 128, 0);
    assert_eq!(f.tensor("y").unwrap().offset, 128);
    assert_eq!(f.file_size(), f.data_offset() + 256);
}

#[test]
fn a_tensor_written_in_parts_is_the_same_file() {
    let dir = tempfile::tempdir().unwrap();
    let (whole, parts) = (dir.path().join("whole.gguf"), dir.path().join("parts.gguf"));
    let data: Vec<u8> = (0..68u8).collect();
    let mut s = two_tensor_writer(&whole).start().unwrap();
    s.write_tensor("x", &[5u8; 12]).unwrap();
    s.write_tensor("y", &data).unwrap();
    s.finish().unwrap();
    let mut s = two_tensor_writer(&parts).start().unwrap();
    s.write_part("x", &[5u8; 12]).unwrap();
    s.write_part("y", &data[..34]).unwrap();
    // Half a tensor written: the next one is still this one.
    assert_eq!(s.next_tensor().map(|t| t.0), Some("y"));
    s.write_part("y", &data[34..]).unwrap();
    s.finish().unwrap();
    assert_eq!(
        std::fs::read(&whole).unwrap(),
        std::fs::read(&parts).unwrap()
    );
}

#[test]
fn parts_past_a_tensor_or_short_of_it_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("m.gguf");
    let mut s = two_tensor_writer(&dest).start().unwrap();
    s.write_part("x", &[0u8; 8]).unwrap();
    // The rest of x is 4 bytes; 8 more would run into y.
    let e = s.write_part("x", &[0u8; 8]).unwrap_err().to_string();
    assert!(e.contains("tensor 'x'"), "{e}");
    assert!(e.contains("8 bytes of data given after 8"), "{e}");
    // Nor may a whole write start in the middle of a tensor.
    let e = s.write_tensor("x", &[0u8; 12]).unwrap_err().to_string();
    assert!(e.contains("being written in parts"), "{e}");
    s.write_part("x", &[0u8; 4]).unwrap();
    s.write_part("y", &[0u8; 34]).unwrap();
    // y half written: finishing now is refused and leaves nothing behind.
    assert!(matches!(s.finish(), Err(WriteError::Incomplete { .. })));
    assert!(entries(dir.path()).is_empty());
}

//! Truncated and corrupted GGUF files are refused with a message that says
//! what and where; none panics, and none allocates more than the file's size.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use common::Rng;
use lorafold_converter::GgufWriter;
use lorafold_runtime::gguf::{
    GgmlType, GgufError, GgufFile, MetadataArray, MetadataValue, ValueType,
};

/// Counts the live and peak heap bytes of the current thread while armed.
struct CountingAlloc;

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn track(delta: isize) {
    if ARMED.with(|a| a.get()) {
        let live = LIVE.with(|l| {
            l.set(l.get() + delta);
            l.get()
        });
        PEAK.with(|p| p.set(p.get().max(live)));
    }
}

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        track(layout.size() as isize);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        track(-(layout.size() as isize));
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        track(new_size as isize - layout.size() as isize);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Parse `bytes` and return the result with the peak heap bytes the parse
/// allocated (including the error, if any; not the input itself).
fn parse_counted(bytes: &[u8]) -> (Result<(), String>, isize) {
    let input = bytes.to_vec();
    LIVE.with(|l| l.set(0));
    PEAK.with(|p| p.set(0));
    ARMED.with(|a| a.set(true));
    let result = GgufFile::from_bytes(input, "sample.gguf")
        .map(|_| ())
        .map_err(|e| e.to_string());
    ARMED.with(|a| a.set(false));
    (result, PEAK.with(|p| p.get()))
}

/// Every metadata type, nested arrays, a custom alignment and four tensor
/// types. The last tensor's data ends on the alignment, so the file has no
/// trailing padding and every truncation cuts something that is needed.
fn sample() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sample.gguf");
    // Random bytes: some decode to NaN or inf, which a reader must survive.
    let mut w = GgufWriter::new(&path).allow_non_finite();
    let entries: Vec<(&str, MetadataValue)> = vec![
        ("general.architecture", "llama".into()),
        ("general.alignment", 64u32.into()),
        ("t.u8", 200u8.into()),
        ("t.i8", (-5i8).into()),
        ("t.u16", 60000u16.into()),
        ("t.i16", (-3000i16).into()),
        ("t.u32", 4_000_000_000u32.into()),
        ("t.i32", (-7i32).into()),
        ("t.f32", 0.25f32.into()),
        ("t.bool", true.into()),
        ("t.string", "héllo ✓".into()),
        ("t.u64", u64::MAX.into()),
        ("t.i64", i64::MIN.into()),
        ("t.f64", std::f64::consts::PI.into()),
        (
            "t.strings",
            MetadataValue::string_array(["a", "", "ünï", "<|im_end|>"]),
        ),
        (
            "t.u32s",
            MetadataValue::Array(MetadataArray::Owned {
                elem: ValueType::U32,
                items: (0..5u32).map(Into::into).collect(),
            }),
        ),
        (
            "t.nested",
            MetadataValue::Array(MetadataArray::Owned {
                elem: ValueType::Array,
                items: vec![
                    MetadataValue::Array(MetadataArray::Owned {
                        elem: ValueType::I16,
                        items: vec![1i16.into(), (-2i16).into()],
                    }),
                    MetadataValue::string_array(["x", "yz"]),
                ],
            }),
        ),
    ];
    for (k, v) in &entries {
        w.add_metadata(k, v).unwrap();
    }
    let tensors: [(&str, GgmlType, &[u64]); 4] = [
        ("a.f32", GgmlType::F32, &[8, 3]),
        ("b.q8_0", GgmlType::Q8_0, &[64, 2]),
        ("c.f16", GgmlType::F16, &[4, 4]),
        ("d.q4_0", GgmlType::Q4_0, &[32, 32]), // 32 blocks * 18 bytes = 576 = 9 * 64
    ];
    for (name, t, dims) in tensors {
        w.add_tensor(name, t, dims).unwrap();
    }
    let mut s = w.start().unwrap();
    let mut rng = Rng::new(1);
    while let Some((name, t, dims)) = s
        .next_tensor()
        .map(|(n, t, d)| (n.to_string(), t, d.to_vec()))
    {
        let n = t.bytes_for(dims.iter().product()).unwrap();
        let data: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
        s.write_tensor(&name, &data).unwrap();
    }
    s.finish().unwrap();
    std::fs::read(path).unwrap()
}

#[test]
fn sample_reads_back_every_value_type() {
    let bytes = sample();
    let f = GgufFile::from_bytes(bytes.clone(), "sample.gguf").unwrap();
    assert_eq!(f.alignment(), 64);
    assert_eq!(f.data_offset() % 64, 0);
    assert_eq!(f.get("t.u8"), Some(MetadataValue::U8(200)));
    assert_eq!(f.get("t.i8"), Some(MetadataValue::I8(-5)));
    assert_eq!(f.get("t.u16"), Some(MetadataValue::U16(60000)));
    assert_eq!(f.get("t.i16"), Some(MetadataValue::I16(-3000)));
    assert_eq!(f.get("t.u32"), Some(MetadataValue::U32(4_000_000_000)));
    assert_eq!(f.get("t.i32"), Some(MetadataValue::I32(-7)));
    assert_eq!(f.get("t.f32"), Some(MetadataValue::F32(0.25)));
    assert_eq!(f.get("t.bool"), Some(MetadataValue::Bool(true)));
    assert_eq!(f.get_str("t.string").as_deref(), Some("héllo ✓"));
    assert_eq!(f.get("t.u64"), Some(MetadataValue::U64(u64::MAX)));
    assert_eq!(f.get("t.i64"), Some(MetadataValue::I64(i64::MIN)));
    assert_eq!(
        f.get("t.f64"),
        Some(MetadataValue::F64(std::f64::consts::PI))
    );
    let strings = f.get_strings("t.strings").unwrap();
    assert_eq!(strings, ["a", "", "ünï", "<|im_end|>"]);
    let u32s: Vec<_> = f
        .get("t.u32s")
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(u32s, [0, 1, 2, 3, 4]);
    let nested = f.get("t.nested").unwrap();
    let outer: Vec<_> = nested.as_array().unwrap().iter().collect();
    assert_eq!(outer.len(), 2);
    let first: Vec<_> = outer[0].as_array().unwrap().iter().collect();
    assert_eq!(first, [MetadataValue::I16(1), MetadataValue::I16(-2)]);
    let second: Vec<_> = outer[1].as_array().unwrap().strings().unwrap().collect();
    assert_eq!(second, ["x", "yz"]);
    let names: Vec<_> = f
        .tensors()
        .iter()
        .map(|t| {
            (
                t.name.as_str(),
                t.ggml_type.name(),
                t.dims().to_vec(),
                t.n_bytes,
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            ("a.f32", "F32", vec![8, 3], 96),
            ("b.q8_0", "Q8_0", vec![64, 2], 136),
            ("c.f16", "F16", vec![4, 4], 32),
            ("d.q4_0", "Q4_0", vec![32, 32], 576),
        ]
    );
    let last = &f.tensors()[3];
    assert_eq!(
        f.data_offset() + last.offset + last.n_bytes,
        bytes.len() as u64,
        "no trailing padding"
    );
    let (ok, peak) = parse_counted(&bytes);
    ok.unwrap();
    assert!(
        peak <= bytes.len() as isize,
        "parsing allocated {peak} bytes for a {}-byte file",
        bytes.len()
    );
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = sample();
    for cut in 0..bytes.len() {
        let (result, peak) = parse_counted(&bytes[..cut]);
        let msg = result.expect_err(&format!("truncated at {cut} was accepted"));
        assert!(msg.starts_with("sample.gguf: at byte "), "cut {cut}: {msg}");
        assert!(
            peak <= bytes.len() as isize,
            "cut {cut}: allocated {peak} bytes"
        );
    }
}

fn header_end(bytes: &[u8]) -> usize {
    GgufFile::from_bytes(bytes.to_vec(), "x")
        .unwrap()
        .data_offset() as usize
}

/// Locate the first occurrence of `needle` after `from`.
fn find(bytes: &[u8], needle: &[u8]) -> usize {
    bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap_or_else(|| panic!("{needle:?} not in sample"))
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Offset of the u64 length before the key `key` in the metadata.
fn key_at(bytes: &[u8], key: &str) -> usize {
    let mut pat = (key.len() as u64).to_le_bytes().to_vec();
    pat.extend_from_slice(key.as_bytes());
    find(bytes, &pat)
}

/// Offset of the tensor info (its name length) for `name`.
fn info_at(bytes: &[u8], name: &str) -> usize {
    key_at(bytes, name)
}

#[test]
fn targeted_corruptions_name_the_problem() {
    let good = sample();
    let he = header_end(&good);
    type Edit = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        ("bad magic", Box::new(|b| b[0] = b'X'), "not a GGUF file"),
        (
            "version 1",
            Box::new(|b| put_u32(b, 4, 1)),
            "GGUF v1 is not supported",
        ),
        (
            "version 7",
            Box::new(|b| put_u32(b, 4, 7)),
            "unsupported GGUF version 7",
        ),
        (
            "big endian",
            Box::new(|b| put_u32(b, 4, 3u32.swap_bytes())),
            "big-endian",
        ),
        (
            "huge tensor count",
            Box::new(|b| put_u64(b, 8, 1 << 60)),
            "header claims 1152921504606846976 tensors",
        ),
        (
            "huge kv count",
            Box::new(|b| put_u64(b, 16, u64::MAX)),
            "metadata entries, more than",
        ),
        (
            "one kv too many",
            Box::new(|b| put_u64(b, 16, 18)),
            "tensor info 0",
        ),
        (
            "one tensor too many",
            Box::new(|b| put_u64(b, 8, 5)),
            "tensor info 4",
        ),
        (
            "key length past the end",
            Box::new(|b| {
                let at = key_at(b, "t.u8");
                put_u64(b, at, u64::MAX)
            }),
            "metadata entry 2: key claims 18446744073709551615 bytes",
        ),
        (
            "string value length huge",
            Box::new(|b| {
                let at = key_at(b, "t.string") + 8 + 8 + 4;
                put_u64(b, at, 1 << 40)
            }),
            "key 't.string': string value claims 1099511627776 bytes",
        ),
        (
            "unknown value type",
            Box::new(|b| {
                let at = key_at(b, "t.f32") + 8 + 5;
                put_u32(b, at, 13)
            }),
            "key 't.f32': unknown value type 13",
        ),
        (
            "string array count huge",
            Box::new(|b| {
                let at = key_at(b, "t.strings") + 8 + 9 + 4 + 4;
                put_u64(b, at, 1 << 50)
            }),
            "key 't.strings': array of 1125899906842624 string values needs at least",
        ),
        (
            "u32 array count overflows",
            Box::new(|b| {
                let at = key_at(b, "t.u32s") + 8 + 6 + 4 + 4;
                put_u64(b, at, u64::MAX / 2)
            }),
            "key 't.u32s': array of 9223372036854775807 uint32 values",
        ),
        (
            "bad array element type",
            Box::new(|b| {
                let at = key_at(b, "t.u32s") + 8 + 6 + 4;
                put_u32(b, at, 99)
            }),
            "unknown array element type 99",
        ),
        (
            "bool neither 0 nor 1",
            Box::new(|b| {
                let at = key_at(b, "t.bool") + 8 + 6 + 4;
                b[at] = 2
            }),
            "key 't.bool': bool value 2",
        ),
        (
            "invalid utf-8 string",
            Box::new(|b| {
                let at = key_at(b, "t.string") + 8 + 8 + 4 + 8;
                b[at] = 0xff
            }),
            "key 't.string': string value is not valid UTF-8",
        ),
        (
            "duplicate key",
            Box::new(|b| {
                let at = key_at(b, "t.i8");
                b[at + 8 + 2] = b'u'; // t.i8 -> t.u8
            }),
            "key 't.u8': duplicate key",
        ),
        (
            "alignment not a power of two",
            Box::new(|b| {
                let at = key_at(b, "general.alignment") + 8 + 17 + 4;
                put_u32(b, at, 48)
            }),
            "alignment must be a u32 power of two, got 48",
        ),
        (
            "alignment of the wrong type",
            Box::new(|b| {
                let at = key_at(b, "general.alignment") + 8 + 17;
                put_u32(b, at, 5) // i32
            }),
            "alignment must be a u32 power of two",
        ),
        (
            "too many dimensions",
            Box::new(|b| {
                let at = info_at(b, "b.q8_0") + 8 + 6;
                put_u32(b, at, 5)
            }),
            "tensor 'b.q8_0': 5 dimensions",
        ),
        (
            "unknown ggml type",
            Box::new(|b| {
                let at = info_at(b, "c.f16") + 8 + 5 + 4 + 16;
                put_u32(b, at, 4)
            }),
            "tensor 'c.f16': unknown ggml type id 4",
        ),
        (
            "row not a whole number of blocks",
            Box::new(|b| {
                let at = info_at(b, "b.q8_0") + 8 + 6 + 4;
                put_u64(b, at, 48)
            }),
            "tensor 'b.q8_0': row length 48 is not a multiple of Q8_0's block size 32",
        ),
        (
            "element count overflows",
            Box::new(|b| {
                let at = info_at(b, "a.f32") + 8 + 5 + 4;
                put_u64(b, at, 1 << 40);
                put_u64(b, at + 8, 1 << 40);
            }),
            "tensor 'a.f32': dimensions [1099511627776, 1099511627776] overflow",
        ),
        (
            "dimension out of range",
            Box::new(|b| {
                let at = info_at(b, "a.f32") + 8 + 5 + 4;
                put_u64(b, at, u64::MAX);
            }),
            "tensor 'a.f32': dimension 18446744073709551615 is out of range",
        ),
        (
            "data past the end",
            Box::new(|b| {
                let at = info_at(b, "d.q4_0") + 8 + 6 + 4 + 16 + 4;
                put_u64(b, at, 1 << 20)
            }),
            "tensor 'd.q4_0': data (576 bytes at data offset 1048576) runs past the end",
        ),
        (
            "offset not aligned",
            Box::new(|b| {
                let at = info_at(b, "c.f16") + 8 + 5 + 4 + 16 + 4;
                let v = u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
                put_u64(b, at, v + 1)
            }),
            "tensor 'c.f16': data offset 321 is not a multiple of the alignment 64",
        ),
        (
            "overlapping tensors",
            Box::new(|b| {
                let at = info_at(b, "c.f16") + 8 + 5 + 4 + 16 + 4;
                put_u64(b, at, 128)
            }),
            "data overlaps tensor 'b.q8_0'",
        ),
        (
            "duplicate tensor name",
            Box::new(|b| {
                let at = info_at(b, "c.f16");
                b[at + 8] = b'a';
                b[at + 10..at + 13].copy_from_slice(b"f32");
            }),
            "tensor 'a.f32': duplicate tensor name",
        ),
    ];
    for (what, edit, expect) in cases {
        let mut b = good.clone();
        edit(&mut b);
        let (result, peak) = parse_counted(&b);
        let msg = result.expect_err(&format!("{what}: accepted"));
        assert!(
            msg.contains(expect),
            "{what}: message was {msg:?}, expected it to contain {expect:?}"
        );
        assert!(msg.starts_with("sample.gguf: at byte "), "{what}: {msg}");
        assert!(
            peak <= good.len() as isize,
            "{what}: allocated {peak} bytes"
        );
    }
    assert!(he < good.len());
}

#[test]
fn deeply_nested_arrays_are_refused_not_recursed() {
    // general.x = array(array(array(... 10 levels ...)))
    let depth = 10;
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    b.extend_from_slice(&9u64.to_le_bytes());
    b.extend_from_slice(b"general.x");
    b.extend_from_slice(&(ValueType::Array as u32).to_le_bytes());
    for _ in 0..depth {
        b.extend_from_slice(&(ValueType::Array as u32).to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
    }
    b.extend_from_slice(&[0u8; 16]);
    let (result, _) = parse_counted(&b);
    assert!(result
        .unwrap_err()
        .contains("key 'general.x': arrays nested deeper than 8 levels"));
}

#[test]
fn random_header_corruption_never_panics_or_overallocates() {
    let good = sample();
    let he = header_end(&good);
    let mut rng = Rng::new(42);
    let (mut refused, mut accepted) = (0, 0);
    for i in 0..4000 {
        let mut b = good.clone();
        let n_edits = 1 + rng.below(4);
        for _ in 0..n_edits {
            let at = rng.below(he as u64) as usize;
            b[at] = match i % 4 {
                0 => 0xff,
                1 => 0,
                2 => b[at].wrapping_add(1),
                _ => rng.next_u64() as u8,
            };
        }
        let cut = if i % 3 == 0 {
            rng.below(b.len() as u64 + 1) as usize
        } else {
            b.len()
        };
        let (result, peak) = parse_counted(&b[..cut]);
        match result {
            Ok(()) => accepted += 1,
            Err(msg) => {
                assert!(msg.starts_with("sample.gguf: at byte "), "{msg}");
                refused += 1
            }
        }
        assert!(
            peak <= good.len() as isize,
            "case {i}: allocated {peak} bytes for a {}-byte file",
            good.len()
        );
    }
    // Most edits hit a count, length, type or name; some only change a value.
    assert!(refused > 2000, "refused {refused}, accepted {accepted}");
}

#[test]
fn missing_and_empty_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.gguf");
    match GgufFile::open(&missing) {
        Err(GgufError::Io { path, .. }) => assert!(path.ends_with("nope.gguf")),
        other => panic!("{other:?}"),
    }
    let empty = dir.path().join("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    let e = GgufFile::open(&empty).unwrap_err().to_string();
    assert!(
        e.contains("empty.gguf: at byte 0: the magic number needs 4 bytes"),
        "{e}"
    );
}

//! `ConvertOptions::cancel`: a conversion stopped from another thread ends
//! with `Cancelled` and leaves no file behind, partial or whole.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::common;

use lorafold_converter::convert::{convert, ConvertError, ConvertOptions};
use lorafold_converter::round::quant::QuantPolicy;

fn options(dir: &std::path::Path, cancel: &Arc<AtomicBool>) -> ConvertOptions {
    let data = common::shared_data().join("tiny-llama");
    ConvertOptions {
        adapter_output: Some(dir.join("adapter.gguf")),
        cancel: Some(cancel.clone()),
        ..ConvertOptions::new(
            data.join("base"),
            Some(data.join("lora_all")),
            QuantPolicy::parse("q8_0", &[]).unwrap(),
            dir.join("merged.gguf"),
        )
    }
}

fn left_in(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn cancelled_before_the_first_tensor_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cancel = Arc::new(AtomicBool::new(true));
    let r = convert(&options(dir.path(), &cancel), &|_| {});
    assert!(matches!(r, Err(ConvertError::Cancelled)), "{r:?}");
    assert_eq!(left_in(dir.path()), Vec::<String>::new());
}

#[test]
fn cancelled_midway_stops_and_removes_the_partials() {
    let dir = tempfile::tempdir().unwrap();
    let cancel = Arc::new(AtomicBool::new(false));
    let (seen, total) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let r = convert(&options(dir.path(), &cancel), &|s| {
        seen.fetch_add(1, Ordering::SeqCst);
        total.store(s.total, Ordering::SeqCst);
        cancel.store(true, Ordering::SeqCst);
    });
    assert!(matches!(r, Err(ConvertError::Cancelled)), "{r:?}");
    let (seen, total) = (seen.into_inner(), total.into_inner());
    // Stopped at the first batch's end: a batch is at most twice the pool's threads.
    assert!(
        seen >= 1 && seen <= 2 * rayon::current_num_threads() && seen < total,
        "{seen} of {total} tensors written"
    );
    assert_eq!(left_in(dir.path()), Vec::<String>::new());
    // Not cancelled, the same options convert.
    cancel.store(false, Ordering::SeqCst);
    let report = convert(&options(dir.path(), &cancel), &|_| {}).unwrap();
    assert_eq!(report.tensors.len(), total);
}

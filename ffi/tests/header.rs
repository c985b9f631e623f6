//! include/lorafold.h is what cbindgen makes of src/lib.rs today.

#[test]
fn the_checked_in_header_is_current() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let config = cbindgen::Config::from_file(format!("{dir}/cbindgen.toml")).unwrap();
    let mut fresh = Vec::new();
    cbindgen::Builder::new()
        .with_crate(dir)
        .with_config(config)
        .generate()
        .expect("cbindgen reads src/lib.rs")
        .write(&mut fresh);
    let path = format!("{dir}/include/lorafold.h");
    if std::env::var_os("LORAFOLD_BLESS").is_some() {
        std::fs::write(&path, &fresh).unwrap();
    }
    let checked_in = std::fs::read(&path).unwrap_or_default();
    assert!(
        checked_in == fresh,
        "ffi/include/lorafold.h is stale: regenerate it with LORAFOLD_BLESS=1 cargo test -p lorafold-ffi --test header"
    );
}

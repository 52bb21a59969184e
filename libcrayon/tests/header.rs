//! include/crayon.h must be what cbindgen generates from the current source: CI fails on a stale
//! header. `CRAYON_BLESS=1 cargo test -p libcrayon --test header` rewrites it.

use std::path::PathBuf;

fn generate() -> String {
    let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("libcrayon/cbindgen.toml");
    let mut out = Vec::new();
    cbindgen::Builder::new()
        .with_crate(&crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen could not parse libcrayon")
        .write(&mut out);
    String::from_utf8(out).expect("header is UTF-8")
}

#[test]
fn committed_header_is_current() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../include/crayon.h");
    let fresh = generate();
    if std::env::var_os("CRAYON_BLESS").is_some() {
        std::fs::write(&path, &fresh).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == fresh,
        "include/crayon.h is stale: regenerate it with `CRAYON_BLESS=1 cargo test -p libcrayon --test header` and commit it"
    );
}

#[test]
fn version_macro_matches_the_crate_version() {
    let header = generate();
    let line = format!("#define CRAYON_VERSION \"{}\"", env!("CARGO_PKG_VERSION"));
    assert!(header.contains(&line), "CRAYON_VERSION in libcrayon/src/lib.rs differs from Cargo.toml's version");
}

/// The numeric version macros follow Cargo.toml's version and the protocol macro the socket protocol
/// the client crate speaks: an app comparing `CRAYON_VERSION_MINOR` or the protocol must see the truth.
#[test]
fn version_numbers_and_protocol_match_the_crates() {
    let header = generate();
    for (name, value) in [
        ("CRAYON_VERSION_MAJOR", env!("CARGO_PKG_VERSION_MAJOR").to_string()),
        ("CRAYON_VERSION_MINOR", env!("CARGO_PKG_VERSION_MINOR").to_string()),
        ("CRAYON_VERSION_PATCH", env!("CARGO_PKG_VERSION_PATCH").to_string()),
        ("CRAYON_PROTOCOL_VERSION", crayon_client::PROTOCOL_VERSION.to_string()),
    ] {
        let line = format!("#define {name} {value}\n");
        assert!(header.contains(&line), "crayon.h lacks `{}`: libcrayon/src/lib.rs is out of step", line.trim());
    }
}

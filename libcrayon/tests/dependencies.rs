//! libcrayon links the socket client and nothing of the service (issue #13): its dependency tree,
//! as cargo resolves it from Cargo.lock, holds none of the engine, HTTP, D-Bus or CLI stacks. (Sizes
//! before and after are in docs/c-api.md.)

use std::process::Command;

#[test]
fn libcrayon_depends_on_the_client_crate_only() {
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["tree", "--offline", "--locked", "-e", "normal", "--prefix", "none", "--manifest-path", manifest])
        .output()
        .expect("cargo tree");
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "cargo tree failed: {}", String::from_utf8_lossy(&out.stderr));
    let crates: Vec<&str> = tree.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert!(crates.contains(&"crayon-client"), "{tree}");
    for heavy in ["crayon", "ort", "axum", "tokio", "zbus", "clap", "tokenizers", "hyper", "ureq", "ndarray"] {
        assert!(!crates.contains(&heavy), "libcrayon must not link {heavy}:\n{tree}");
    }
}

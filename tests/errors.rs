//! Broken model folders: each gets a precise error naming the file and the problem, never a panic.

mod common;

use std::fs;
use std::path::Path;

use common::*;
use crayon::{Engine, Error};

fn load_err(dir: &Path) -> Error {
    let mut cfg = tiny();
    cfg.model.dir = dir.to_path_buf();
    match Engine::load(&cfg) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e,
    }
}

fn damaged(damage: impl FnOnce(&Path)) -> (tempfile::TempDir, String) {
    let dir = copy_model(&model_dir("tiny"));
    damage(dir.path());
    let msg = load_err(dir.path()).to_string();
    (dir, msg)
}

#[test]
fn missing_folder() {
    let msg = load_err(Path::new("/nonexistent/model")).to_string();
    assert!(msg.contains("/nonexistent/model") && msg.contains("not found"), "{msg}");
}

#[test]
fn missing_manifest() {
    let (_d, msg) = damaged(|d| fs::remove_file(d.join("crayon_model.json")).unwrap());
    assert!(msg.contains("crayon_model.json") && msg.contains("No such file"), "{msg}");
}

#[test]
fn corrupt_manifest() {
    let (_d, msg) = damaged(|d| fs::write(d.join("crayon_model.json"), "{\"format\": ").unwrap());
    assert!(msg.contains("crayon_model.json") && msg.contains("invalid model manifest"), "{msg}");
}

#[test]
fn unsupported_manifest_format() {
    let (_d, msg) = damaged(|d| {
        let p = d.join("crayon_model.json");
        let text = fs::read_to_string(&p).unwrap().replace("crayon-model/1", "crayon-model/9");
        fs::write(p, text).unwrap();
    });
    assert!(msg.contains("crayon-model/9") && msg.contains("not supported"), "{msg}");
}

#[test]
fn missing_tokenizer() {
    let (_d, msg) = damaged(|d| fs::remove_file(d.join("tokenizer.json")).unwrap());
    assert!(msg.contains("tokenizer.json") && msg.contains("missing"), "{msg}");
}

#[test]
fn corrupt_tokenizer() {
    let (_d, msg) = damaged(|d| fs::write(d.join("tokenizer.json"), "not json").unwrap());
    assert!(msg.contains("tokenizer.json") && msg.contains("cannot load"), "{msg}");
}

#[test]
fn tokenizer_config_without_chat_template() {
    let (_d, msg) = damaged(|d| fs::write(d.join("tokenizer_config.json"), "{}").unwrap());
    assert!(msg.contains("tokenizer_config.json") && msg.contains("chat_template"), "{msg}");
}

#[test]
fn inconsistent_architecture() {
    let (_d, msg) = damaged(|d| {
        let p = d.join("config.json");
        let text = fs::read_to_string(&p).unwrap().replace("\"num_key_value_heads\": 1", "\"num_key_value_heads\": 3");
        fs::write(p, text).unwrap();
    });
    assert!(msg.contains("config.json") && msg.contains("num_key_value_heads"), "{msg}");
}

#[test]
fn corrupt_onnx_graph() {
    let (_d, msg) = damaged(|d| fs::write(d.join("model.onnx"), b"\x08\x07garbage").unwrap());
    assert!(msg.contains("model.onnx") && msg.contains("cannot load"), "{msg}");
}

#[test]
fn truncated_weights() {
    let (_d, msg) = damaged(|d| {
        let p = d.join("model.safetensors");
        let len = fs::metadata(&p).unwrap().len();
        fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(len / 2).unwrap();
    });
    // Caught when the weights are mapped, before ONNX Runtime sees the graph.
    assert!(msg.contains("model.safetensors") && msg.contains("not a valid safetensors file"), "{msg}");
}

#[test]
fn vocabulary_mismatch_between_tokenizer_and_model() {
    let (_d, msg) = damaged(|d| {
        let p = d.join("config.json");
        let text = fs::read_to_string(&p).unwrap().replace("\"vocab_size\": 49152", "\"vocab_size\": 100");
        fs::write(p, text).unwrap();
    });
    assert!(msg.contains("tokenizer has 49152 tokens but the model only 100"), "{msg}");
}

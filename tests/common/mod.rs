//! Shared by the integration tests: where the generated models live and how to load them.
//! `scripts/setup` creates them; the tests fail with that instruction when they are missing.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use crayon::Config;
use safetensors::SafeTensors;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn model_dir(name: &str) -> PathBuf {
    let dir = repo().join("models").join(name);
    assert!(dir.join("crayon_model.json").is_file(), "{} is missing: run scripts/setup first", dir.display());
    dir
}

pub fn ort_library() -> PathBuf {
    let lib = repo().join("models/lib/libonnxruntime.so.1.31.1");
    assert!(lib.is_file(), "{} is missing: run scripts/setup first", lib.display());
    lib
}

pub fn config_for(model: &Path) -> Config {
    let mut cfg = Config::default();
    cfg.model.dir = model.to_path_buf();
    cfg.runtime.ort_library = ort_library();
    cfg.runtime.intra_threads = 1; // tests run in parallel
    cfg
}

pub fn tiny() -> Config {
    config_for(&model_dir("tiny"))
}

/// The tiny model with its adapter pool and a fresh state directory (returned to keep it alive).
pub fn tiny_with_pool() -> (Config, tempfile::TempDir) {
    let mut cfg = tiny();
    let pool = repo().join("models/tiny-pool");
    assert!(pool.join("pool.json").is_file(), "{} is missing: run scripts/setup first", pool.display());
    cfg.pool.dir = pool;
    let state = tempfile::tempdir().unwrap();
    cfg.adapters.state_dir = state.path().to_path_buf();
    (cfg, state)
}

/// PEFT's merged-model logits saved by the pool tool: the last 4 positions of a fixed prompt, for a
/// mixed blend and for adapter 0 alone.
pub struct PoolReference {
    pub input_ids: Vec<u32>,
    pub blend_weights: Vec<f32>,
    pub blend_logits: Vec<f32>,
    pub single_logits: Vec<f32>,
}

pub fn pool_reference(pool: &Path) -> PoolReference {
    let bytes = std::fs::read(pool.join("reference.safetensors")).expect("pool reference.safetensors");
    let st = SafeTensors::deserialize(&bytes).expect("valid safetensors");
    let f32s = |name: &str| -> Vec<f32> {
        st.tensor(name).unwrap().data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    };
    let ids = st
        .tensor("input_ids")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect();
    PoolReference {
        input_ids: ids,
        blend_weights: f32s("blend_weights"),
        blend_logits: f32s("blend_logits"),
        single_logits: f32s("single_logits"),
    }
}

/// The last `rows` rows of a [positions, vocab] logits buffer.
pub fn last_rows(logits: &[f32], vocab: usize, rows: usize) -> &[f32] {
    &logits[logits.len() - rows * vocab..]
}

/// The reference the exporter saved from transformers: prompt ids, logits at every prompt position, and
/// a 24-token greedy continuation.
pub struct Reference {
    pub input_ids: Vec<u32>,
    pub logits: Vec<f32>,
    pub greedy_ids: Vec<u32>,
}

pub fn reference(model: &Path) -> Reference {
    let bytes = std::fs::read(model.join("reference.safetensors")).expect("reference.safetensors");
    let st = SafeTensors::deserialize(&bytes).expect("valid safetensors");
    let i64s = |name: &str| -> Vec<u32> {
        let t = st.tensor(name).unwrap();
        t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32).collect()
    };
    let logits = st
        .tensor("logits")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    Reference { input_ids: i64s("input_ids"), logits, greedy_ids: i64s("greedy_ids") }
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// A copy of a model folder in a temporary directory, to damage in tests.
pub fn copy_model(src: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

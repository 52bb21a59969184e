//! Shared by the integration tests: where the generated models live and how to load them.
//! `scripts/setup` creates them; the tests fail with that instruction when they are missing.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use crayon::Config;
use safetensors::SafeTensors;

pub mod daemon;
pub mod service;

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
    let t = Tensors::read(&pool.join("reference.safetensors"));
    PoolReference {
        input_ids: t.ids("input_ids"),
        blend_weights: t.f32s("blend_weights"),
        blend_logits: t.f32s("blend_logits"),
        single_logits: t.f32s("single_logits"),
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

/// A safetensors file read whole, with typed accessors for the tests.
pub struct Tensors(Vec<u8>);

impl Tensors {
    pub fn read(path: &Path) -> Tensors {
        Tensors(std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
    }

    fn bytes(&self, name: &str) -> &[u8] {
        SafeTensors::deserialize(&self.0).expect("valid safetensors").tensor(name).expect(name).data()
    }

    pub fn f32s(&self, name: &str) -> Vec<f32> {
        self.bytes(name).chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    }

    /// int64 token ids as u32.
    pub fn ids(&self, name: &str) -> Vec<u32> {
        self.bytes(name).chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32).collect()
    }
}

pub fn reference(model: &Path) -> Reference {
    let t = Tensors::read(&model.join("reference.safetensors"));
    Reference { input_ids: t.ids("input_ids"), logits: t.f32s("logits"), greedy_ids: t.ids("greedy_ids") }
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

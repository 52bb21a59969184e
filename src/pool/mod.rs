//! The base adapter pool (built offline by `crayon_pool`): manifest, validation against the model,
//! and memory-mapped adapter weights. Submodules: `embed` (task embedding), `blend` (weights from
//! similarity), `merge` (W + sum of weighted deltas).

pub mod blend;
pub mod embed;
pub mod exemplars;
pub mod merge;

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::model::ModelFiles;
use crate::weights::WeightFile;

pub const POOL_FILE: &str = "pool.json";
const POOL_FORMAT: &str = "crayon-pool/1";

#[derive(Debug, Clone, Deserialize)]
struct PoolManifest {
    format: String,
    pool_id: String,
    base_model: BaseModel,
    /// Absent in a paired (server) pool: it is blended only by weights computed on a device.
    embedding: Option<EmbeddingSpec>,
    /// The device pool whose clusters this one was trained on (`crayon_pool build --pair-with`).
    #[serde(default)]
    paired_with: Option<String>,
    adapters: Vec<AdapterManifest>,
}

#[derive(Debug, Clone, Deserialize)]
struct BaseModel {
    weights_sha256: String,
}

/// How the pool embedded its training prompts; the engine must embed user examples the same way.
#[derive(Debug, Clone, Deserialize)]
pub struct EmbeddingSpec {
    pub method: String,
    pub layer: usize,
    pub center: Vec<f32>,
    pub normalize: bool,
}

#[derive(Debug, Clone, Deserialize)]
struct AdapterManifest {
    name: String,
    dir: String,
    rank: usize,
    alpha: f32,
    targets: Vec<String>,
    cluster_size: usize,
    centroid: Option<Vec<f32>>,
}

/// The two factors of one adapted matrix: delta = scale * B A.
pub struct LoraPair<'a> {
    /// [rank, in]
    pub a: Cow<'a, [f32]>,
    /// [out, rank]
    pub b: Cow<'a, [f32]>,
}

/// One LoRA adapter of the pool.
pub struct Adapter {
    pub name: String,
    pub rank: usize,
    pub alpha: f32,
    pub targets: Vec<String>,
    pub cluster_size: usize,
    /// Empty in a paired pool (no embedding).
    pub centroid: Vec<f32>,
    weights: WeightFile,
}

impl Adapter {
    /// PEFT's scaling: alpha / rank.
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank as f32
    }

    fn tensor_name(layer: usize, target: &str, ab: char) -> String {
        format!("base_model.model.model.layers.{layer}.{target}.lora_{ab}.weight")
    }

    /// `A` [rank, in] and `B` [out, rank] of one target, as f32; `None` when the adapter does not touch it.
    pub fn lora(&self, layer: usize, target: &str) -> Result<Option<LoraPair<'_>>> {
        if !self.targets.iter().any(|t| t == target) {
            return Ok(None);
        }
        let a = self.weights.f32(&Adapter::tensor_name(layer, target, 'A'))?;
        let b = self.weights.f32(&Adapter::tensor_name(layer, target, 'B'))?;
        Ok(Some(LoraPair { a, b }))
    }
}

pub struct Pool {
    pub dir: PathBuf,
    pub id: String,
    /// `None`: a paired (server) pool, customizable by blend weights only.
    pub embedding: Option<EmbeddingSpec>,
    /// Device pool id this pool answers for (its blend weights mean the same tasks here).
    pub paired_with: Option<String>,
    pub adapters: Vec<Adapter>,
}

impl Pool {
    /// Drops the adapters' mapped pages from this process's resident memory (they are read again from
    /// the files if a blend needs them): once the engine holds the pool's concatenated factors, the
    /// files are only read to build per-blend factors (LoraHub) or merged float32 weights.
    pub fn release_resident_pages(&self) {
        for a in &self.adapters {
            a.weights.release_resident_pages();
        }
    }

    /// Names of the model weights a blend of this pool replaces (every layer's targeted matrices).
    pub fn blended_weights(&self, model: &ModelFiles) -> std::collections::HashSet<String> {
        let targets: std::collections::BTreeSet<&str> =
            self.adapters.iter().flat_map(|a| a.targets.iter().map(String::as_str)).collect();
        (0..model.arch.num_hidden_layers)
            .flat_map(|i| targets.iter().map(move |t| crate::model::target_weight_name(i, t)))
            .collect()
    }

    /// Loads `dir/pool.json` and every adapter, and checks them against `model`: same base weights
    /// (SHA-256), known targets, every tensor present with the right shape and a supported dtype.
    pub fn open(dir: &Path, model: &ModelFiles) -> Result<Pool> {
        let path = dir.join(POOL_FILE);
        if !dir.is_dir() {
            return Err(Error::Pool { path: dir.to_path_buf(), msg: "folder not found".into() });
        }
        let m: PoolManifest = crate::model::read_json(&path, "pool manifest").map_err(|e| match e {
            Error::Model { path, msg } => Error::Pool { path, msg },
            other => other,
        })?;
        let bad = |msg: String| Error::Pool { path: path.clone(), msg };
        if m.format != POOL_FORMAT {
            return Err(bad(format!("format '{}' is not supported (expected '{POOL_FORMAT}')", m.format)));
        }
        if !model.computes_with(&m.base_model.weights_sha256) {
            return Err(bad(format!(
                "built for base weights {}…, but the model at {} has {}… (rebuild the pool for this model)",
                short(&m.base_model.weights_sha256),
                model.dir.display(),
                short(&model.manifest.weights_sha256)
            )));
        }
        if let Some(e) = &m.embedding {
            if e.method != "q_proj_mean" || e.layer != 0 {
                return Err(bad(format!("embedding method '{}' (layer {}) is not supported", e.method, e.layer)));
            }
            if e.center.len() != q_dim(model) {
                return Err(bad(format!("embedding center has {} values, expected {}", e.center.len(), q_dim(model))));
            }
        } else if m.paired_with.is_none() {
            return Err(bad("has no embedding and is not paired with a device pool".into()));
        }
        if m.adapters.is_empty() {
            return Err(bad("the pool has no adapters".into()));
        }
        let mut adapters = Vec::with_capacity(m.adapters.len());
        for a in m.adapters {
            let centroid = match (&m.embedding, a.centroid) {
                (Some(_), Some(c)) if c.iter().any(|x| !x.is_finite()) => {
                    return Err(bad(format!("adapter {}: centroid has a non-finite value", a.name)));
                }
                (Some(_), Some(c)) if c.len() == q_dim(model) => c,
                (Some(_), c) => {
                    let n = c.map_or(0, |c| c.len());
                    return Err(bad(format!("adapter {}: centroid has {n} values, expected {}", a.name, q_dim(model))));
                }
                (None, _) => Vec::new(),
            };
            if a.rank == 0 || !a.alpha.is_finite() {
                return Err(bad(format!("adapter {}: rank {} / alpha {} are invalid", a.name, a.rank, a.alpha)));
            }
            for t in &a.targets {
                if !model.manifest.adapter_targets.contains(t) {
                    return Err(bad(format!(
                        "adapter {}: target '{t}' is not one of the model's ({})",
                        a.name,
                        model.manifest.adapter_targets.join(", ")
                    )));
                }
            }
            let weights =
                WeightFile::open(&dir.join(&a.dir).join("adapter_model.safetensors")).map_err(|e| match e {
                    Error::Model { path, msg } => Error::Pool { path, msg },
                    other => other,
                })?;
            let adapter = Adapter {
                name: a.name,
                rank: a.rank,
                alpha: a.alpha,
                targets: a.targets,
                cluster_size: a.cluster_size,
                centroid,
                weights,
            };
            check_adapter_tensors(&adapter, model)?;
            adapters.push(adapter);
        }
        Ok(Pool { dir: dir.to_path_buf(), id: m.pool_id, embedding: m.embedding, paired_with: m.paired_with, adapters })
    }

    /// Whether blend weights computed for pool `id` can be applied here.
    pub fn accepts(&self, id: &str) -> bool {
        self.id == id || self.paired_with.as_deref() == Some(id)
    }

    pub fn names(&self) -> Vec<&str> {
        self.adapters.iter().map(|a| a.name.as_str()).collect()
    }
}

fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

/// Width of the query projection (the embedding space).
pub(crate) fn q_dim(model: &ModelFiles) -> usize {
    model.arch.num_attention_heads * model.arch.head_dim
}

fn check_adapter_tensors(a: &Adapter, model: &ModelFiles) -> Result<()> {
    let path = a.weights.path().to_path_buf();
    for layer in 0..model.arch.num_hidden_layers {
        for target in &a.targets {
            let [out, inp] = crate::model::target_shape(&model.arch, target)
                .ok_or_else(|| Error::Pool { path: path.clone(), msg: format!("unknown target '{target}'") })?;
            for (ab, want) in [('A', [a.rank, inp]), ('B', [out, a.rank])] {
                let name = Adapter::tensor_name(layer, target, ab);
                let info = a.weights.info(&name).ok_or_else(|| Error::Pool {
                    path: path.clone(),
                    msg: format!("adapter {}: tensor '{name}' is missing", a.name),
                })?;
                if info.shape != want {
                    return Err(Error::Pool {
                        path: path.clone(),
                        msg: format!(
                            "adapter {}: tensor '{name}' has shape {:?}, expected {:?}",
                            a.name, info.shape, want
                        ),
                    });
                }
                if !matches!(info.dtype, safetensors::Dtype::F32 | safetensors::Dtype::F16 | safetensors::Dtype::BF16) {
                    return Err(Error::Pool {
                        path: path.clone(),
                        msg: format!("adapter {}: tensor '{name}' has dtype {:?}", a.name, info.dtype),
                    });
                }
                // A NaN or infinity would make every blend of this adapter answer nothing, silently.
                if let Some(i) = a.weights.f32(&name)?.iter().position(|x| !x.is_finite()) {
                    return Err(Error::Pool {
                        path: path.clone(),
                        msg: format!("adapter {}: tensor '{name}' has a non-finite value at index {i}", a.name),
                    });
                }
            }
        }
    }
    Ok(())
}

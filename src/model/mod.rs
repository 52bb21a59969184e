//! A model folder written by `crayon-export`: manifest, architecture, files. Validation happens here,
//! before ONNX Runtime sees anything, so that a broken folder gets a precise message.

mod decoder;
pub mod quant;
mod shared;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

pub use decoder::{Decoder, KvCache, LowRank, SharedFactors, WeightData, WeightOverride};
pub use shared::SharedWeights;

pub const MANIFEST_FILE: &str = "crayon_model.json";
const MANIFEST_FORMAT: &str = "crayon-model/1";

/// `crayon_model.json`: what the exporter wrote and how the graph is wired.
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub onnx: String,
    pub weights: String,
    pub weights_sha256: String,
    pub tokenizer: String,
    pub tokenizer_config: String,
    pub config: String,
    pub stop_token_ids: Vec<u32>,
    pub adapter_targets: Vec<String>,
    /// How the weights are stored (folders written before precisions existed are float32).
    #[serde(default)]
    pub precision: Precision,
    /// For a quantized folder: the SHA-256 of the float32 weights file its blocks decode to (from the
    /// same source), so that a pool trained on the float32 export serves it too.
    #[serde(default)]
    pub decodes_to_sha256: Option<String>,
    /// The graph with the unmerged low-rank path (a 4-bit folder's blends run on it).
    #[serde(default)]
    pub lora_onnx: Option<String>,
    /// Block layout of a quantized folder.
    #[serde(default)]
    pub quantization: Option<Quantization>,
    /// Projections the graph runs as one product, e.g. `self_attn.qkv_proj` -> q, k, v (in row order).
    /// Their tensors in the weights file are adjacent, so the fused tensor is a byte range of it.
    #[serde(default)]
    pub fused: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Quantization {
    /// Values per block along a matrix's input dimension (32 from a GGUF, 16 for the tiny model).
    pub block_size: usize,
}

/// Storage of the adapter-targetable matrices and the embedding (`crayon-export --precision`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Float32 tensors named as in Hugging Face: the reference.
    #[default]
    F32,
    /// 4-bit matrices and an 8-bit embedding for ONNX Runtime's `MatMulNBits` (see [`quant`]).
    Q4,
}

/// The parts of the Hugging Face `config.json` the engine needs.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Architecture {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    /// Base of the rotary position embedding (context compression rotates cached keys with it).
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
}

fn default_rope_theta() -> f64 {
    10_000.0
}

impl Architecture {
    /// Bytes of float32 KV cache one sequence position takes (keys and values of every layer).
    pub fn kv_bytes_per_token(&self) -> usize {
        self.num_hidden_layers * 2 * self.num_key_value_heads * self.head_dim * 4
    }
}

/// A validated model folder: every file present, manifest and architecture parsed.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub arch: Architecture,
}

impl ModelFiles {
    pub fn open(dir: &Path) -> Result<ModelFiles> {
        if !dir.is_dir() {
            return Err(Error::model(dir, "folder not found (export one with onnx-export, see README)"));
        }
        let manifest: Manifest = read_json(&dir.join(MANIFEST_FILE), "model manifest")?;
        if manifest.format != MANIFEST_FORMAT {
            return Err(Error::model(
                dir.join(MANIFEST_FILE),
                format!("format '{}' is not supported (expected '{MANIFEST_FORMAT}')", manifest.format),
            ));
        }
        let files = ModelFiles {
            arch: read_json(&dir.join(&manifest.config), "model config")?,
            dir: dir.to_path_buf(),
            manifest,
        };
        for f in
            [&files.manifest.onnx, &files.manifest.weights, &files.manifest.tokenizer, &files.manifest.tokenizer_config]
                .into_iter()
                .chain(files.manifest.lora_onnx.as_ref())
        {
            let p = files.dir.join(f);
            if !p.is_file() {
                return Err(Error::model(p, "file listed in the manifest is missing"));
            }
        }
        files.check_arch()?;
        if files.manifest.precision == Precision::Q4 {
            files.block_size()?;
        }
        Ok(files)
    }

    fn check_arch(&self) -> Result<()> {
        let a = &self.arch;
        let bad = |msg: String| Err(Error::model(self.dir.join(&self.manifest.config), msg));
        if a.num_hidden_layers == 0 || a.head_dim == 0 || a.vocab_size == 0 {
            return bad("num_hidden_layers, head_dim and vocab_size must be positive".into());
        }
        if a.num_key_value_heads == 0 || a.num_attention_heads % a.num_key_value_heads != 0 {
            return bad(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                a.num_attention_heads, a.num_key_value_heads
            ));
        }
        if self.manifest.stop_token_ids.iter().any(|&t| t as usize >= a.vocab_size) {
            return bad(format!("stop_token_ids {:?} fall outside the vocabulary", self.manifest.stop_token_ids));
        }
        Ok(())
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// The block size of a 4-bit folder (its manifest must say it).
    pub fn block_size(&self) -> Result<usize> {
        match &self.manifest.quantization {
            Some(q) if q.block_size >= 2 && q.block_size % 2 == 0 => Ok(q.block_size),
            _ => Err(Error::model(
                self.dir.join(MANIFEST_FILE),
                "a 4-bit folder needs quantization.block_size (even, >= 2)",
            )),
        }
    }

    /// Whether `weights_sha256` names the weights this folder computes with (a quantized folder also
    /// accepts the float32 weights its blocks decode to).
    pub fn computes_with(&self, weights_sha256: &str) -> bool {
        self.manifest.weights_sha256 == weights_sha256
            || self.manifest.decodes_to_sha256.as_deref() == Some(weights_sha256)
    }

    /// The graph initializers that hold the model weight `weight` (e.g. a target matrix): the tensor
    /// itself in float32, its `.q4` / `.scales` / `.offsets` in a 4-bit folder.
    /// A weight of a fused projection names the fused one (see [`ModelFiles::fused_group`]).
    pub fn initializer_names(&self, weight: &str) -> Vec<String> {
        let weight = self.fused_group(weight).map_or_else(|| weight.to_string(), |g| g.name);
        match self.manifest.precision {
            Precision::F32 => vec![weight],
            Precision::Q4 => quant::Q4_SUFFIXES.iter().map(|s| format!("{weight}{s}")).collect(),
        }
    }

    /// The fused projection `weight` (e.g. `model.layers.3.self_attn.k_proj.weight`) is part of, if any.
    pub fn fused_group(&self, weight: &str) -> Option<FusedGroup> {
        let rest = weight.strip_prefix("model.layers.")?;
        let (layer, module) = rest.split_once('.')?;
        let module = module.strip_suffix(".weight")?;
        self.manifest.fused.iter().find(|(_, members)| members.iter().any(|m| m == module)).map(|(fused, members)| {
            FusedGroup {
                name: format!("model.layers.{layer}.{fused}.weight"),
                members: members.iter().map(|m| format!("model.layers.{layer}.{m}.weight")).collect(),
            }
        })
    }

    /// Every fused projection of the model.
    pub fn fused_groups(&self) -> Vec<FusedGroup> {
        (0..self.arch.num_hidden_layers)
            .flat_map(|i| self.manifest.fused.values().filter_map(move |m| m.first().map(|m| target_weight_name(i, m))))
            .filter_map(|w| self.fused_group(&w))
            .collect()
    }

    /// Names of the weights an adapter may replace, e.g. `model.layers.3.self_attn.q_proj.weight`.
    pub fn target_weight_names(&self) -> Vec<String> {
        (0..self.arch.num_hidden_layers)
            .flat_map(|i| self.manifest.adapter_targets.iter().map(move |t| target_weight_name(i, t)))
            .collect()
    }
}

/// A fused projection: its weight name and its members' in row order (Hugging Face names).
#[derive(Debug, Clone, PartialEq)]
pub struct FusedGroup {
    pub name: String,
    pub members: Vec<String>,
}

/// The model weight an adapter target replaces in `layer`, e.g. `model.layers.3.self_attn.q_proj.weight`.
pub fn target_weight_name(layer: usize, target: &str) -> String {
    format!("model.layers.{layer}.{target}.weight")
}

/// Shape [out, in] of an adapter target such as `self_attn.q_proj`.
pub(crate) fn target_shape(a: &Architecture, target: &str) -> Option<[usize; 2]> {
    let (h, f) = (a.hidden_size, a.intermediate_size);
    let (q, kv) = (a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim);
    Some(match target {
        "self_attn.q_proj" => [q, h],
        "self_attn.k_proj" | "self_attn.v_proj" => [kv, h],
        "self_attn.o_proj" => [h, q],
        "mlp.gate_proj" | "mlp.up_proj" => [f, h],
        "mlp.down_proj" => [h, f],
        _ => return None,
    })
}

pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path, what: &'static str) -> Result<T> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io { what, path: path.to_path_buf(), source })?;
    serde_json::from_slice(&bytes).map_err(|e| Error::model(path, format!("invalid {what}: {e}")))
}

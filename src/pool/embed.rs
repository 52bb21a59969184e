//! Task embedding, identical to the pool tool's (`onnx-export/crayon_pool/embed.py`): mean over the
//! prompt's tokens of layer 0's query projection of the RMS-normalized token embeddings, minus the
//! pool's center, L2-normalized. Costs one embedding gather and a [tokens x hidden] x [hidden x q]
//! product: well under a millisecond per example on the real model.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::model::ModelFiles;
use crate::weights::WeightFile;

use super::EmbeddingSpec;

pub struct TaskEmbedder {
    /// The engine's mapping of the model's weights (one mapping per file, so that releasing its
    /// resident pages after loading covers what the embedder read).
    weights: Arc<WeightFile>,
    norm: Vec<f32>,
    wq: Vec<f32>, // [q, hidden]
    hidden: usize,
    q: usize,
    eps: f64,
}

impl TaskEmbedder {
    pub fn new(model: &ModelFiles, weights: Arc<WeightFile>) -> Result<TaskEmbedder> {
        let norm = weights.f32("model.layers.0.input_layernorm.weight")?.into_owned();
        let wq = weights.dense("model.layers.0.self_attn.q_proj.weight")?.into_owned();
        let hidden = model.arch.hidden_size;
        let q = super::q_dim(model);
        if norm.len() != hidden || wq.len() != q * hidden {
            return Err(Error::model(weights.path(), "layer 0 norm / q_proj shapes do not match config.json"));
        }
        Ok(TaskEmbedder { weights, norm, wq, hidden, q, eps: model.arch.rms_norm_eps })
    }

    /// The raw embedding (before centering) of a token sequence.
    pub fn raw(&self, ids: &[u32]) -> Result<Vec<f32>> {
        if ids.is_empty() {
            return Err(Error::InvalidRequest("cannot embed an empty text".into()));
        }
        let mut mean_x = vec![0f64; self.hidden];
        for &id in ids {
            let x = self.weights.dense_row("model.embed_tokens.weight", id as usize)?;
            let ms = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / self.hidden as f64;
            let inv = 1.0 / (ms + self.eps).sqrt();
            for ((m, &v), &g) in mean_x.iter_mut().zip(&x).zip(&self.norm) {
                *m += f64::from(v) * inv * f64::from(g);
            }
        }
        // The query projection is linear, so mean(Wq x_t) = Wq mean(x_t): one matrix-vector product.
        let n = ids.len() as f64;
        Ok((0..self.q)
            .map(|r| {
                let row = &self.wq[r * self.hidden..(r + 1) * self.hidden];
                (row.iter().zip(&mean_x).map(|(&w, &m)| f64::from(w) * m).sum::<f64>() / n) as f32
            })
            .collect())
    }

    /// Centered and normalized as the pool's centroids are.
    pub fn embed(&self, ids: &[u32], spec: &EmbeddingSpec) -> Result<Vec<f32>> {
        let mut v = self.raw(ids)?;
        for (x, c) in v.iter_mut().zip(&spec.center) {
            *x -= c;
        }
        if spec.normalize {
            normalize(&mut v);
        }
        Ok(v)
    }
}

pub fn normalize(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= n);
}

pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb).max(1e-12)
}

//! Blend weights from a task's examples. `similarity` (the default): similarity of the example
//! embeddings to each adapter's centroid, then softmax with a temperature, optionally keeping only the
//! top-k adapters. `example_loss`: each adapter's answer loss on the examples (the engine measures it
//! with the adapter merged), then softmax of −loss with `loss_temperature`. All knobs are config
//! (`[blend]`), so the customization benchmark can choose them.

use serde::{Deserialize, Serialize};

use super::embed::cosine;
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Similarity {
    /// Mean over the examples of cos(example, centroid).
    MeanCosine,
    /// Share of the examples whose nearest centroid is this adapter's.
    NearestShare,
}

/// How the blend weights are chosen from the examples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BlendMethod {
    /// Embedding similarity to the adapters' centroids: no model pass, well under a millisecond.
    Similarity,
    /// The loss of the examples' outputs under each adapter alone: one merged model per adapter (K
    /// model builds today), chooses by what the examples ask the model to say, not by how they look.
    ExampleLoss,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BlendConfig {
    pub method: BlendMethod,
    /// Softmax temperature over the negative example losses (nats; > 0), for `example_loss`.
    pub loss_temperature: f32,
    /// Softmax temperature over the similarities (> 0); smaller is sharper.
    pub temperature: f32,
    /// Keep only the k best adapters (weights renormalized); 0 keeps all.
    pub top_k: usize,
    pub similarity: Similarity,
}

impl Default for BlendConfig {
    fn default() -> Self {
        BlendConfig {
            method: BlendMethod::Similarity,
            loss_temperature: 0.1,
            temperature: 0.1,
            top_k: 0,
            similarity: Similarity::MeanCosine,
        }
    }
}

impl BlendConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(format!("blend.temperature must be > 0, got {}", self.temperature));
        }
        if !(self.loss_temperature.is_finite() && self.loss_temperature > 0.0) {
            return Err(format!("blend.loss_temperature must be > 0, got {}", self.loss_temperature));
        }
        Ok(())
    }
}

/// Similarity of the examples to each centroid.
pub fn similarities(examples: &[Vec<f32>], centroids: &[&[f32]], kind: Similarity) -> Result<Vec<f32>> {
    if examples.is_empty() {
        return Err(Error::InvalidRequest("customization needs at least one example".into()));
    }
    let cos: Vec<Vec<f32>> = examples.iter().map(|e| centroids.iter().map(|c| cosine(e, c)).collect()).collect();
    let n = examples.len() as f32;
    Ok(match kind {
        Similarity::MeanCosine => (0..centroids.len()).map(|k| cos.iter().map(|row| row[k]).sum::<f32>() / n).collect(),
        Similarity::NearestShare => {
            let mut share = vec![0f32; centroids.len()];
            for row in &cos {
                let best = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i);
                share[best] += 1.0 / n;
            }
            share
        }
    })
}

/// softmax(s / temperature), then optional top-k with renormalization. Non-negative, sums to 1.
pub fn weights(sims: &[f32], cfg: &BlendConfig) -> Vec<f32> {
    let max = sims.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut w: Vec<f32> = sims.iter().map(|s| ((s - max) / cfg.temperature).exp()).collect();
    if cfg.top_k > 0 && cfg.top_k < w.len() {
        let mut order: Vec<usize> = (0..w.len()).collect();
        order.sort_by(|&a, &b| w[b].total_cmp(&w[a]).then(a.cmp(&b)));
        for &i in &order[cfg.top_k..] {
            w[i] = 0.0;
        }
    }
    let total: f32 = w.iter().sum();
    w.iter_mut().for_each(|x| *x /= total);
    w
}

/// Blend weights from each adapter's answer loss on the examples: softmax of −loss over
/// `loss_temperature`, with the same top-k as [`weights`].
pub fn weights_from_losses(losses: &[f32], cfg: &BlendConfig) -> Vec<f32> {
    let scores: Vec<f32> = losses.iter().map(|l| -l).collect();
    weights(&scores, &BlendConfig { temperature: cfg.loss_temperature, ..cfg.clone() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_weights_favour_the_lowest_loss() {
        let w = weights_from_losses(&[3.0, 2.0, 2.5], &BlendConfig::default());
        assert!((w.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(w[1] > w[2] && w[2] > w[0]);
        // 0.5 nats at temperature 0.1 is a factor e^5
        assert!((w[1] / w[2] - 5f32.exp()).abs() < 1e-2);
    }

    #[test]
    fn weights_are_a_distribution_favouring_the_most_similar() {
        let w = weights(&[0.9, 0.1, 0.5], &BlendConfig::default());
        assert!((w.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(w.iter().all(|&x| x >= 0.0));
        assert!(w[0] > w[2] && w[2] > w[1]);
    }

    #[test]
    fn top_k_zeroes_the_rest_and_renormalizes() {
        let cfg = BlendConfig { top_k: 2, ..BlendConfig::default() };
        let w = weights(&[0.9, 0.1, 0.5, 0.2], &cfg);
        assert_eq!(w.iter().filter(|&&x| x == 0.0).count(), 2);
        assert!((w[0] + w[2] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn temperature_sharpens() {
        let soft = weights(&[0.6, 0.4], &BlendConfig { temperature: 1.0, ..BlendConfig::default() });
        let sharp = weights(&[0.6, 0.4], &BlendConfig { temperature: 0.01, ..BlendConfig::default() });
        assert!(sharp[0] > soft[0] && sharp[0] > 0.99);
    }

    #[test]
    fn similarity_kinds() {
        let c1 = [1.0f32, 0.0];
        let c2 = [0.0f32, 1.0];
        let ex = vec![vec![1.0, 0.1], vec![0.9, 0.2], vec![0.1, 1.0]];
        let mean = similarities(&ex, &[&c1, &c2], Similarity::MeanCosine).unwrap();
        assert!(mean[0] > mean[1]);
        let share = similarities(&ex, &[&c1, &c2], Similarity::NearestShare).unwrap();
        assert!((share[0] - 2.0 / 3.0).abs() < 1e-6 && (share[1] - 1.0 / 3.0).abs() < 1e-6);
        assert!(similarities(&[], &[&c1], Similarity::MeanCosine).is_err());
    }
}

//! Choosing the next token: greedy, or temperature / top-k / top-p sampling with a seedable RNG.
//! Every choice also reports its log-probability under the model's *untempered* distribution, which
//! the router uses as a confidence signal.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 selects greedy decoding.
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1.0 disables.
    pub top_p: f32,
    /// Same seed, same request, same model: same tokens.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 0.0, top_k: 0, top_p: 1.0, seed: None }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::InvalidRequest(format!("temperature must be >= 0, got {}", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::InvalidRequest(format!("top_p must be in (0, 1], got {}", self.top_p)));
        }
        Ok(())
    }
}

/// One chosen token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Choice {
    pub token: u32,
    /// log p(token) under the model (temperature 1, no filtering).
    pub logprob: f32,
    /// log p of the model's most likely token at this step (equal to `logprob` under greedy decoding).
    pub top_logprob: f32,
}

pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    scratch: Vec<(u32, f32)>,
}

/// The `k` most likely tokens of a row of logits with their log-probabilities, most likely first.
pub fn top_logprobs(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    if k == 0 || logits.is_empty() {
        return Vec::new();
    }
    let (_, max) = argmax(logits);
    let log_z = max + logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln();
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(ids.len());
    let desc = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
    ids.select_nth_unstable_by(k - 1, desc);
    ids.truncate(k);
    ids.sort_by(desc);
    ids.into_iter().map(|i| (i, logits[i as usize] - log_z)).collect()
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Sampler {
        let rng = match params.seed {
            Some(s) => ChaCha8Rng::seed_from_u64(s),
            None => ChaCha8Rng::from_rng(&mut rand::rng()),
        };
        Sampler { params, rng, scratch: Vec::new() }
    }

    pub fn sample(&mut self, logits: &[f32]) -> Choice {
        let (argmax, max) = argmax(logits);
        let log_z = max + logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln();
        // A temperature so small that 1/t overflows is greedy (the scaled logits would be NaN).
        let greedy = self.params.temperature == 0.0 || !(1.0 / self.params.temperature).is_finite();
        let token = if greedy { argmax } else { self.sample_filtered(logits, max) };
        Choice { token, logprob: logits[token as usize] - log_z, top_logprob: max - log_z }
    }

    fn sample_filtered(&mut self, logits: &[f32], max: f32) -> u32 {
        let inv_t = 1.0 / self.params.temperature;
        let c = &mut self.scratch;
        c.clear();
        c.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, (l - max) * inv_t)));
        let by_logit_desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1);
        let k = self.params.top_k;
        if k > 0 && k < c.len() {
            c.select_nth_unstable_by(k - 1, by_logit_desc);
            c.truncate(k);
        }
        // Softmax over the candidates (values are <= 0 after subtracting the max: no overflow).
        let mut total = 0.0f32;
        for x in c.iter_mut() {
            x.1 = x.1.exp();
            total += x.1;
        }
        if self.params.top_p < 1.0 {
            c.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
            let target = self.params.top_p * total;
            let mut acc = 0.0;
            let mut keep = c.len();
            for (i, x) in c.iter().enumerate() {
                acc += x.1;
                if acc >= target {
                    keep = i + 1;
                    break;
                }
            }
            c.truncate(keep);
            total = acc.min(total);
        }
        let mut r = self.rng.random::<f32>() * total;
        for &(tok, p) in c.iter() {
            if r < p {
                return tok;
            }
            r -= p;
        }
        c.last().map_or(0, |x| x.0) // rounding left r just above the sum
    }
}

fn argmax(xs: &[f32]) -> (u32, f32) {
    let mut best = (0u32, f32::NEG_INFINITY);
    for (i, &x) in xs.iter().enumerate() {
        if x > best.1 {
            best = (i as u32, x);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams { temperature, top_k, top_p, seed: Some(seed) }
    }

    #[test]
    fn greedy_takes_the_argmax_and_reports_logprobs() {
        let mut s = Sampler::new(SamplingParams::default());
        let c = s.sample(&[0.0, 2.0, 1.0]);
        assert_eq!(c.token, 1);
        let z = (0f32.exp() + 2f32.exp() + 1f32.exp()).ln();
        assert!((c.logprob - (2.0 - z)).abs() < 1e-6);
        assert_eq!(c.logprob, c.top_logprob);
    }

    #[test]
    fn top_k_one_is_greedy_whatever_the_temperature() {
        let mut s = Sampler::new(params(5.0, 1, 1.0, 7));
        for _ in 0..50 {
            assert_eq!(s.sample(&[0.1, 0.3, 0.2, 0.25]).token, 1);
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // p = [0.5, 0.3, 0.15, 0.05]: top_p 0.7 keeps the first two tokens only.
        let logits: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        let mut s = Sampler::new(params(1.0, 0, 0.7, 3));
        let mut seen = [0usize; 4];
        for _ in 0..2000 {
            seen[s.sample(&logits).token as usize] += 1;
        }
        assert_eq!(seen[2] + seen[3], 0, "{seen:?}");
        let share = seen[0] as f32 / 2000.0; // 0.5 / 0.8 = 0.625 expected
        assert!((share - 0.625).abs() < 0.05, "{seen:?}");
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let logits: Vec<f32> = [0.7f32, 0.2, 0.1].iter().map(|p| p.ln()).collect();
        let mut s = Sampler::new(params(1.0, 0, 1.0, 11));
        let mut seen = [0usize; 3];
        for _ in 0..5000 {
            seen[s.sample(&logits).token as usize] += 1;
        }
        for (i, want) in [0.7f32, 0.2, 0.1].iter().enumerate() {
            assert!((seen[i] as f32 / 5000.0 - want).abs() < 0.03, "{seen:?}");
        }
    }

    #[test]
    fn same_seed_same_tokens_different_seed_different_tokens() {
        let logits: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32 / 10.0).collect();
        let run = |seed| {
            let mut s = Sampler::new(params(1.5, 0, 0.95, seed));
            (0..64).map(|_| s.sample(&logits).token).collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn invalid_params_are_rejected() {
        assert!(params(-1.0, 0, 1.0, 0).validate().is_err());
        assert!(params(f32::NAN, 0, 1.0, 0).validate().is_err());
        assert!(params(1.0, 0, 0.0, 0).validate().is_err());
        assert!(params(1.0, 0, 1.1, 0).validate().is_err());
        assert!(params(1.0, 5, 0.9, 0).validate().is_ok());
    }

    #[test]
    fn a_subnormal_temperature_is_greedy() {
        let logits = [0.1, 3.0, 0.2, -1.0];
        let mut s = Sampler::new(params(1e-45, 0, 1.0, 7));
        for _ in 0..20 {
            assert_eq!(s.sample(&logits).token, 1);
        }
    }
}

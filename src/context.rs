//! Long inputs in fixed memory: what a request does when its prompt and answer do not fit the context
//! (or the `pot` of KV-cache entries it may hold), and the InfiniPot cache distillation that keeps any
//! input inside the pot (docs/long-context.md).
//!
//! Policies (`[context] policy`, overridable per request):
//! - `refuse`: a prompt that does not fit is an error (the behaviour before this module).
//! - `truncate`: the prompt's middle is cut so that it fits (LongBench's convention: the start, usually
//!   the instructions, and the end, usually the question, survive).
//! - `window`: StreamingLLM. When the pot is full, the first `sink_tokens` entries and the most recent
//!   ones are kept, everything between is dropped.
//! - `infinipot`: InfiniPot (Kim et al., EMNLP 2024). When the pot is full, a catalyst prompt (CaP) is
//!   run after it; every cached entry is scored per layer and KV head by the attention the CaP's queries
//!   pay it, and optionally by its novelty (NuC: the token's negative log-likelihood when it was read,
//!   under the already compressed prefix); the best `keep_tokens` entries stay.
//!
//! After either compression the kept entries move to contiguous positions 0..keep (context-reset RoPE):
//! each cached key is rotated by its position change, so the model reads on as if the kept entries had
//! been its whole input. The cache never holds more than `pot_tokens` entries (+ the catalyst's, briefly).

use serde::{Deserialize, Serialize};

/// What happens to an input that does not fit.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ContextPolicy {
    #[default]
    Refuse,
    Truncate,
    Window,
    Infinipot,
}

impl ContextPolicy {
    pub fn name(self) -> &'static str {
        match self {
            ContextPolicy::Refuse => "refuse",
            ContextPolicy::Truncate => "truncate",
            ContextPolicy::Window => "window",
            ContextPolicy::Infinipot => "infinipot",
        }
    }

    /// Whether the policy compresses the cache while reading (and so accepts inputs of any length up to
    /// `max_input_tokens`).
    pub fn compresses(self) -> bool {
        matches!(self, ContextPolicy::Window | ContextPolicy::Infinipot)
    }
}

/// Default catalyst prompt: generic (it names no task), as InfiniPot's is.
pub const DEFAULT_CATALYST: &str =
    "\n\nSummarize the most important information in the text above, including names, numbers and facts.";

/// Longest catalyst prompt, in bytes (it runs at every compression).
pub const MAX_CATALYST_BYTES: usize = 1024;

/// `[context]`: long inputs (docs/long-context.md).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ContextConfig {
    pub policy: ContextPolicy,
    /// Most KV-cache entries a request holds (prompt and answer); 0: the context limit. Under `truncate`
    /// the prompt is cut to fit it.
    pub pot_tokens: usize,
    /// Entries kept by a compression (`window`, `infinipot`); 0: half the pot.
    pub keep_tokens: usize,
    /// Share of the kept entries chosen by novelty (NuC) rather than by the catalyst's attention (CaP);
    /// 0 skips NuC, whose logits at every position cost prefill time.
    pub nuc_share: f32,
    /// `window`: first entries always kept (attention sinks).
    pub sink_tokens: usize,
    /// The catalyst prompt of `infinipot`, appended (as raw text) after the pot to score it.
    pub catalyst: String,
    /// Longest prompt, in tokens, a compressing policy accepts (bounds the prefill time of one request).
    pub max_input_tokens: usize,
}

impl Default for ContextConfig {
    fn default() -> Self {
        ContextConfig {
            policy: ContextPolicy::Refuse,
            pot_tokens: 0,
            keep_tokens: 0,
            nuc_share: 0.0,
            sink_tokens: 4,
            catalyst: DEFAULT_CATALYST.into(),
            max_input_tokens: 65_536,
        }
    }
}

/// Per-request overrides of `[context]` (the `crayon.context` object, D-Bus options `context`,
/// `pot_tokens`, `keep_tokens`, `crayonctl --context`).
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ContextOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<ContextPolicy>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pot_tokens: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_tokens: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nuc_share: Option<f32>,
}

impl ContextOverrides {
    pub fn is_empty(&self) -> bool {
        *self == ContextOverrides::default()
    }
}

/// Smallest pot: below it a compression would leave too little to read with.
pub const MIN_POT_TOKENS: usize = 64;

impl ContextConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(self.nuc_share.is_finite() && (0.0..=1.0).contains(&self.nuc_share)) {
            return Err(format!("context.nuc_share must be in [0, 1], got {}", self.nuc_share));
        }
        if self.pot_tokens != 0 && self.pot_tokens < MIN_POT_TOKENS {
            return Err(format!("context.pot_tokens must be 0 (the context limit) or at least {MIN_POT_TOKENS}"));
        }
        if self.catalyst.trim().is_empty() || self.catalyst.len() > MAX_CATALYST_BYTES {
            return Err(format!("context.catalyst must be non-empty text of at most {MAX_CATALYST_BYTES} bytes"));
        }
        if self.max_input_tokens == 0 {
            return Err("context.max_input_tokens must be at least 1".into());
        }
        Ok(())
    }

    /// The settings of one request: overrides applied, sizes resolved against the context limit and the
    /// catalyst's length, checked. Errors are the request's (invalid request).
    pub fn resolve(&self, o: &ContextOverrides, limit: usize, catalyst_len: usize) -> Result<Pot, String> {
        let policy = o.policy.unwrap_or(self.policy);
        let nuc_share = o.nuc_share.unwrap_or(self.nuc_share);
        if !(nuc_share.is_finite() && (0.0..=1.0).contains(&nuc_share)) {
            return Err(format!("context nuc_share must be in [0, 1], got {nuc_share}"));
        }
        // The catalyst runs after a full pot, so pot + catalyst must fit the cache's positions.
        let room = match policy {
            ContextPolicy::Infinipot => limit.saturating_sub(catalyst_len),
            _ => limit,
        };
        let pot = match o.pot_tokens.unwrap_or(self.pot_tokens) {
            0 => room,
            n if n > room => {
                return Err(format!(
                    "context pot_tokens {n} exceeds the {room} entries the context limit of {limit} allows{}",
                    if policy == ContextPolicy::Infinipot { " with the catalyst prompt" } else { "" }
                ));
            }
            n => n,
        };
        let keep = match o.keep_tokens.unwrap_or(self.keep_tokens) {
            0 => pot / 2,
            n => n,
        };
        let resolved = Pot { policy, pot, keep, nuc_share, sinks: self.sink_tokens, max_input: self.max_input_tokens };
        if !policy.compresses() {
            return Ok(resolved);
        }
        if pot < MIN_POT_TOKENS {
            return Err(format!("context pot_tokens must be at least {MIN_POT_TOKENS}, got {pot}"));
        }
        // Between two compressions at least a quarter of a minimum pot is read.
        if keep <= self.sink_tokens || keep + MIN_POT_TOKENS / 4 > pot {
            return Err(format!(
                "context keep_tokens must be above sink_tokens ({}) and at most pot_tokens - {} ({}), got {keep}",
                self.sink_tokens,
                MIN_POT_TOKENS / 4,
                pot - MIN_POT_TOKENS / 4
            ));
        }
        Ok(resolved)
    }
}

/// One request's resolved `[context]` settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pot {
    pub policy: ContextPolicy,
    /// Most entries the cache holds (besides the catalyst's during a compression).
    pub pot: usize,
    /// Entries a compression keeps.
    pub keep: usize,
    pub nuc_share: f32,
    pub sinks: usize,
    pub max_input: usize,
}

impl Pot {
    /// Whether NuC scores are needed (logits at every prompt position).
    pub fn needs_nuc(&self) -> bool {
        self.policy == ContextPolicy::Infinipot && self.nuc_share > 0.0
    }

    /// How the prompt is read: the size of the first segment (read into an empty cache) and of the
    /// following ones (each after a compression). The segments end with the prompt, so its last
    /// `pot - keep - reserve` tokens (where the question usually is) are read after the last
    /// compression and are all in the cache when the answer starts; `reserve` entries stay free for the
    /// answer (or the choice options).
    pub fn segments(&self, prompt: usize, reserve: usize) -> (usize, usize) {
        let full = self.pot.saturating_sub(reserve).max(self.keep + 1);
        if prompt <= full {
            return (prompt, 0);
        }
        let step = full - self.keep;
        let rounds = (prompt - full).div_ceil(step);
        (prompt - rounds * step, step)
    }
}

/// What the policy did to a request, as the reply reports it (`crayon.context`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct ContextReport {
    pub policy: ContextPolicy,
    pub pot_tokens: usize,
    /// Compressions of the cache (window, infinipot).
    pub compressions: usize,
    /// Prompt tokens cut (truncate) or cache entries dropped (window, infinipot).
    pub dropped_tokens: usize,
    /// Most entries the cache held after any forward pass (the catalyst's, dropped at once, aside).
    pub max_entries: usize,
    /// Time spent compressing (catalyst pass, scoring, compaction), in milliseconds.
    pub compress_ms: f64,
}

/// The prompt without its middle: the first `budget / 2` and the last `budget - budget / 2` tokens.
pub fn truncate_middle(ids: &[u32], budget: usize) -> Vec<u32> {
    if ids.len() <= budget {
        return ids.to_vec();
    }
    let head = budget / 2;
    let tail = budget - head;
    ids[..head].iter().chain(&ids[ids.len() - tail..]).copied().collect()
}

/// Rotary position embedding as the graph applies it (`rotary_interleaved = 0`, Llama's rotate-half
/// layout): dimension i and i + d/2 of a head form one pair, rotated by `position * inv_freq[i]`.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f64>,
}

impl Rope {
    pub fn new(theta: f64, head_dim: usize) -> Rope {
        let half = head_dim / 2;
        Rope { inv_freq: (0..half).map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64)).collect() }
    }

    /// Rotates one head's vector by `delta` positions (negative: back). Rotations compose, so a key
    /// rotated at position p and then by q - p equals the key rotated at q (up to rounding).
    pub fn rotate(&self, x: &mut [f32], delta: f64) {
        self.apply(x, &self.turn(delta));
    }

    /// (sin, cos) of each dimension pair's angle for a move of `delta` positions: computed once and
    /// applied to every vector that moves as far (compaction moves many keys by the same distance).
    pub fn turn(&self, delta: f64) -> Vec<(f32, f32)> {
        self.inv_freq
            .iter()
            .map(|f| {
                let (sin, cos) = (delta * f).sin_cos();
                (sin as f32, cos as f32)
            })
            .collect()
    }

    /// Rotates `x` by a [`Rope::turn`].
    pub fn apply(&self, x: &mut [f32], turn: &[(f32, f32)]) {
        let half = turn.len();
        for (i, &(sin, cos)) in turn.iter().enumerate() {
            let (a, b) = (x[i], x[i + half]);
            x[i] = a * cos - b * sin;
            x[i + half] = a * sin + b * cos;
        }
    }
}

/// Cache entries one lane (a layer's KV head) keeps, ascending.
pub type Selection = Vec<u32>;

/// `window`: the first `sinks` entries and the most recent `keep - sinks`, the same in every lane.
pub fn window_selection(len: usize, keep: usize, sinks: usize) -> Selection {
    let sinks = sinks.min(keep);
    (0..sinks).chain(len - (keep - sinks)..len).map(|i| i as u32).collect()
}

/// `infinipot` for one lane: the `round(keep * nuc_share)` entries of highest novelty, then the rest by
/// catalyst attention. `cap[i]`, `nuc[i]`: scores of entry i.
pub fn infinipot_selection(cap: &[f32], nuc: &[f32], keep: usize, nuc_share: f32) -> Selection {
    let n = cap.len();
    let keep = keep.min(n);
    let by_nuc = ((keep as f32 * nuc_share).round() as usize).min(keep);
    let mut chosen = vec![false; n];
    let mut order: Vec<usize> = (0..n).collect();
    if by_nuc > 0 {
        order.sort_by(|&a, &b| nuc[b].total_cmp(&nuc[a]).then(a.cmp(&b)));
        for &i in &order[..by_nuc] {
            chosen[i] = true;
        }
    }
    order.sort_by(|&a, &b| cap[b].total_cmp(&cap[a]).then(a.cmp(&b)));
    let mut left = keep - by_nuc;
    for &i in &order {
        if left == 0 {
            break;
        }
        if !chosen[i] {
            chosen[i] = true;
            left -= 1;
        }
    }
    (0..n).filter(|&i| chosen[i]).map(|i| i as u32).collect()
}

/// Geometry of one layer's attention, for [`catalyst_scores`].
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// CaP scores of one layer: per KV head, for each of the first `len` cache entries, the attention the
/// catalyst's queries pay it, summed over the catalyst's positions and the query heads sharing the KV
/// head. `queries`: the catalyst's [t, q_heads * head_dim] (un-rotated; row stride `q_stride`), at
/// positions len..len+t; `keys`: the layer's key buffer [kv_heads, capacity, head_dim] holding the
/// catalyst's keys after the first `len` entries. Each query's softmax runs over every key it sees
/// (the cache and the catalyst up to itself), as the model's attention does.
pub fn catalyst_scores(
    h: Heads,
    rope: &Rope,
    queries: &[f32],
    q_stride: usize,
    keys: &[f32],
    capacity: usize,
    len: usize,
) -> Vec<Vec<f32>> {
    use ndarray::{Array2, ArrayView2, linalg::general_mat_mul};
    let d = h.head_dim;
    let t_count = queries.len() / q_stride.max(1);
    let group = (h.q_heads / h.kv_heads.max(1)).max(1);
    let scale = 1.0 / (d as f32).sqrt();
    let cols = len + t_count;
    // The catalyst's positions, the same for every head: one turn each.
    let turns: Vec<Vec<(f32, f32)>> = (0..t_count).map(|t| rope.turn((len + t) as f64)).collect();
    let mut scores = vec![vec![0f32; len]; h.kv_heads];
    // Per KV head, the rotated queries of every query head sharing it ([group * t, d], head-major) times
    // its keys ([cols, d]) as one matrix product: a blocked, vectorized GEMM (matrixmultiply, with the
    // CPU's AVX/FMA chosen at run time) reads each key once for all of them. Rows past a query's causal
    // limit are computed and ignored (the catalyst's own upper triangle, a few hundred values).
    let mut q = Array2::<f32>::zeros((group * t_count, d));
    let mut logits = Array2::<f32>::zeros((group * t_count, cols));
    for (kv, kv_scores) in scores.iter_mut().enumerate() {
        for j in 0..group {
            let g = kv * group + j;
            for (t, turn) in turns.iter().enumerate() {
                let mut row = q.row_mut(j * t_count + t);
                let row = row.as_slice_mut().expect("rows of a standard-layout array are contiguous");
                row.copy_from_slice(&queries[t * q_stride + g * d..][..d]);
                rope.apply(row, turn);
            }
        }
        let head_keys = ArrayView2::from_shape((cols, d), &keys[kv * capacity * d..][..cols * d])
            .expect("a KV head's first cols entries are cols x head_dim values");
        general_mat_mul(scale, &q, &head_keys.t(), 0.0, &mut logits);
        for (r, mut row) in logits.rows_mut().into_iter().enumerate() {
            let row = row.as_slice_mut().expect("rows of a standard-layout array are contiguous");
            // Query t sees the cache and the catalyst up to itself.
            let row = &mut row[..len + r % t_count + 1];
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            // Separate passes (exp, sum in eight lanes, accumulate) so each one vectorizes.
            for l in row.iter_mut() {
                *l = exp_approx(*l - max);
            }
            let inv = 1.0 / sum8(row);
            for (acc, l) in kv_scores.iter_mut().zip(&row[..len]) {
                *acc += l * inv;
            }
        }
    }
    scores
}

/// Sum in eight independent lanes (vectorizable, unlike one running sum).
fn sum8(v: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = v.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Negative log-likelihood of `next` under `logits` (one row of the vocabulary): the NuC score of the
/// token that follows. Runs once per prompt token over the whole vocabulary, hence [`exp_approx`] in
/// eight independent sums (vectorizable) rather than `f32::exp`.
pub fn nll(logits: &[f32], next: u32) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut acc = [0f32; 8];
    let chunks = logits.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|&l| exp_approx(l - max)).sum();
    for c in chunks {
        for i in 0..8 {
            acc[i] += exp_approx(c[i] - max);
        }
    }
    let lse = max + (acc.iter().sum::<f32>() + tail).ln();
    lse - logits.get(next as usize).copied().unwrap_or(f32::NEG_INFINITY)
}

/// e^x for x <= 0 (relative error below 1e-5, from rounding x log2 e in f32; 0 below about -87): 2^(x log2 e) split into an integer
/// power n, built in the exponent bits, and 2^f for f in [-0.5, 0.5] by its degree-6 Taylor polynomial.
/// Only casts, no `floor` (a library call on baseline x86-64), so a loop over it vectorizes.
fn exp_approx(x: f32) -> f32 {
    let y = (x * std::f32::consts::LOG2_E).max(-126.0);
    let n = (y - 0.5) as i32; // truncation toward zero: ceil(y - 0.5), as y - 0.5 < 0
    let f = y - n as f32;
    let p = 1.0
        + f * (std::f32::consts::LN_2
            + f * (0.240_226_5 + f * (0.055_504_11 + f * (0.009_618_129 + f * (0.001_333_355 + f * 0.000_154_035_3)))));
    f32::from_bits(((n + 127) as u32) << 23) * p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ContextConfig {
        ContextConfig::default()
    }

    #[test]
    fn resolve_fills_defaults_and_refuses_bad_sizes() {
        let p = cfg().resolve(&ContextOverrides::default(), 8192, 20).unwrap();
        assert_eq!((p.policy, p.pot, p.keep), (ContextPolicy::Refuse, 8192, 4096));
        let o = ContextOverrides { policy: Some(ContextPolicy::Infinipot), ..Default::default() };
        assert_eq!(cfg().resolve(&o, 8192, 20).unwrap().pot, 8172, "room for the catalyst");
        let o = ContextOverrides { pot_tokens: Some(9000), ..Default::default() };
        assert!(cfg().resolve(&o, 8192, 20).unwrap_err().contains("exceeds"));
        let o = ContextOverrides {
            policy: Some(ContextPolicy::Window),
            pot_tokens: Some(1024),
            keep_tokens: Some(1020),
            ..Default::default()
        };
        assert!(cfg().resolve(&o, 8192, 20).unwrap_err().contains("keep_tokens"));
        let o = ContextOverrides { nuc_share: Some(1.5), ..Default::default() };
        assert!(cfg().resolve(&o, 8192, 20).is_err());
        assert!(ContextConfig { pot_tokens: 10, ..cfg() }.validate().is_err());
    }

    #[test]
    fn segments_end_with_the_prompt_and_fit_the_pot() {
        let p =
            Pot { policy: ContextPolicy::Window, pot: 1024, keep: 512, nuc_share: 0.0, sinks: 4, max_input: 1 << 20 };
        assert_eq!(p.segments(1000, 0), (1000, 0));
        for n in [1025, 1536, 1537, 4096, 16_384] {
            for reserve in [0, 64] {
                let (first, step) = p.segments(n, reserve);
                assert!(first <= 1024 - reserve && first > 512 - reserve.min(512));
                assert_eq!((n - first) % step, 0, "whole steps after the first segment");
                assert_eq!(step, 1024 - reserve - 512);
            }
        }
    }

    #[test]
    fn truncation_keeps_both_ends() {
        let ids: Vec<u32> = (0..10).collect();
        assert_eq!(truncate_middle(&ids, 5), vec![0, 1, 7, 8, 9]);
        assert_eq!(truncate_middle(&ids, 20), ids);
    }

    #[test]
    fn the_approximate_exp_is_close() {
        for i in 0..2000 {
            let x = -(i as f32) * 0.05;
            let (a, e) = (exp_approx(x), x.exp());
            assert!((a - e).abs() <= 1e-5 * e + 1e-37, "{x}: {a} vs {e}");
        }
        let row: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin() * 5.0).collect();
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exact = max + row.iter().map(|l| (l - max).exp()).sum::<f32>().ln() - row[7];
        assert!((nll(&row, 7) - exact).abs() < 1e-5);
    }

    #[test]
    fn rotations_compose() {
        let rope = Rope::new(10_000.0, 8);
        let x: Vec<f32> = (0..8).map(|i| i as f32 * 0.3 - 1.0).collect();
        let mut a = x.clone();
        rope.rotate(&mut a, 1000.0);
        rope.rotate(&mut a, -700.0);
        let mut b = x.clone();
        rope.rotate(&mut b, 300.0);
        for (a, b) in a.iter().zip(&b) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn selections_keep_the_right_entries() {
        assert_eq!(window_selection(10, 5, 2), vec![0, 1, 7, 8, 9]);
        let cap = [0.9, 0.1, 0.5, 0.2, 0.8, 0.0];
        let nuc = [0.0, 5.0, 0.0, 0.0, 0.0, 4.0];
        assert_eq!(infinipot_selection(&cap, &nuc, 3, 0.0), vec![0, 2, 4]);
        assert_eq!(infinipot_selection(&cap, &nuc, 4, 0.5), vec![0, 1, 4, 5]);
    }

    #[test]
    fn catalyst_scores_are_attention_probabilities() {
        let h = Heads { q_heads: 2, kv_heads: 1, head_dim: 4 };
        let rope = Rope::new(10_000.0, 4);
        let (cap, len) = (8, 3);
        let keys: Vec<f32> = (0..cap * 4).map(|i| ((i * 7) % 5) as f32 * 0.1).collect();
        let queries = vec![0.2f32; 2 * 8]; // two catalyst positions, two heads
        let s = catalyst_scores(h, &rope, &queries, 8, &keys, cap, len);
        let total: f32 = s[0].iter().sum();
        // Four softmaxes (2 positions x 2 heads); the cache's share of each is below 1.
        assert!(total > 0.0 && total < 4.0, "{total}");
        assert!(nll(&[0.0, 0.0], 1) > 0.69 && nll(&[0.0, 0.0], 1) < 0.7);
    }

    /// Against the definition, written out naively: per query head and catalyst position, the softmax
    /// of the rotated query against every key it sees, summed into its KV head's entries.
    #[test]
    fn catalyst_scores_match_the_definition() {
        let h = Heads { q_heads: 4, kv_heads: 2, head_dim: 8 };
        let rope = Rope::new(10_000.0, 8);
        let (cap, len, t_count, stride) = (16, 9, 3, 4 * 8 + 16);
        let keys: Vec<f32> = (0..2 * cap * 8).map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.05).collect();
        let queries: Vec<f32> = (0..t_count * stride).map(|i| ((i * 17 % 19) as f32 - 9.0) * 0.07).collect();
        let got = catalyst_scores(h, &rope, &queries, stride, &keys, cap, len);
        let mut want = vec![vec![0f32; len]; 2];
        for g in 0..4 {
            let kv = g / 2;
            for t in 0..t_count {
                let mut q = queries[t * stride + g * 8..][..8].to_vec();
                rope.rotate(&mut q, (len + t) as f64);
                let logits: Vec<f32> = (0..=len + t)
                    .map(|s| {
                        q.iter().zip(&keys[(kv * cap + s) * 8..][..8]).map(|(a, b)| a * b).sum::<f32>() / 8f32.sqrt()
                    })
                    .collect();
                let sum: f32 = logits.iter().map(|l| l.exp()).sum();
                for s in 0..len {
                    want[kv][s] += logits[s].exp() / sum;
                }
            }
        }
        for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
            assert!((g - w).abs() < 1e-5, "{g} vs {w}");
        }
    }
}

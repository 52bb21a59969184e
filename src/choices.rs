//! Choice questions, answered by option likelihood: each option is scored by the log-probability the
//! model gives its full text as the continuation of the prompt, and the best-scoring option is the
//! answer (`docs/routing.md`, "Choice questions").
//!
//! Why not "which letter comes next": a 135M model cannot map content to "A/B/C/D" (it answered "A" to
//! every question of the held-out benchmark), while the likelihood of each answer *text* is how small
//! models are evaluated everywhere (lm-evaluation-harness, OLMES "rc" formats).
//!
//! The prompt runs once; every option continues from the prompt's KV cache (a branch, the cache itself
//! is never modified), so options may share their first tokens. Scores:
//!
//! * `sum`: Σ log p(option tokens | prompt) — long options are penalised;
//! * `mean`: the sum per option token;
//! * `bytes`: the sum per byte of option text (lm-evaluation-harness' `acc_norm`);
//!
//! and, with `calibration = "content_free"`, the same normalisation of the option's log-likelihood
//! after a content-free prompt (default "Answer:") is subtracted — PMI scoring, the option-text form of
//! "calibrate before use" (Zhao et al., 2021), which removes the model's prior for each option.
//! Probabilities over the options are the softmax of the scores.
//!
//! **Confidence** (what routing and calibration compare with a threshold), `[choices] confidence`:
//!
//! * `consensus` (default): the probability the chosen option gets under each of the six scorings
//!   (sum, mean, bytes; each plain and content-free calibrated), averaged. An answer every scoring
//!   agrees on, by a wide margin, is near 1; one that a change of normalisation would flip is low.
//!   Measured on the customization benchmark (docs/customization-benchmark.md): chosen on the base
//!   model's screen questions (AUC of confidence vs right 0.668 against 0.539 for the margin), it
//!   predicts the customized model's right answers on the test questions with AUC 0.685 against 0.615.
//!   It needs the content-free likelihoods, so they are always measured (the options run a second
//!   time after the short content-free prompt).
//! * `margin`: the top probability minus the runner-up's under the configured scoring.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::generate::{CancelToken, TokenInfo};
use crate::model::{Decoder, KvCache};
use ort::session::RunOptions;

pub use crayon_client::limits::{MAX_CHOICE_BYTES, MAX_CHOICES};
/// Option tokens scored per forward pass: bounds the logits held at once (rows × vocabulary).
const CHUNK_TOKENS: usize = 32;

/// How option log-likelihoods are normalised before comparison.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Normalization {
    /// Sum of the option's token log-probabilities.
    Sum,
    /// Sum per option token.
    #[default]
    Mean,
    /// Sum per byte of option text.
    Bytes,
}

/// Whether the model's prior for each option is divided out.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Calibration {
    /// Scores as they are.
    #[default]
    None,
    /// Minus the option's (equally normalised) log-likelihood after `content_free` (PMI).
    ContentFree,
}

/// How sure the model is of its choice (see the module docs).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ConfidenceMeasure {
    /// Mean probability of the chosen option over the six scorings.
    #[default]
    Consensus,
    /// Top probability minus the runner-up's, under the configured scoring.
    Margin,
}

/// `[choices]`: how choice questions are scored (each overridable per request).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ChoicesConfig {
    pub normalization: Normalization,
    pub calibration: Calibration,
    pub confidence: ConfidenceMeasure,
    /// The content-free prompt of `calibration = "content_free"` (for chat requests: the user message).
    pub content_free: String,
}

impl Default for ChoicesConfig {
    fn default() -> Self {
        ChoicesConfig {
            normalization: Normalization::default(),
            calibration: Calibration::default(),
            confidence: ConfidenceMeasure::default(),
            content_free: "Answer:".into(),
        }
    }
}

impl ChoicesConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.needs_content_free(None) && self.content_free.trim().is_empty() {
            return Err(
                "choices.content_free must not be empty with calibration = \"content_free\" or confidence = \"consensus\""
                    .into(),
            );
        }
        if self.content_free.len() > MAX_CHOICE_BYTES {
            return Err(format!("choices.content_free is longer than {MAX_CHOICE_BYTES} bytes"));
        }
        Ok(())
    }

    /// Whether scoring under these settings (and a request's `overrides`) measures each option after
    /// the content-free prompt too.
    pub fn needs_content_free(&self, overrides: Option<&ScoringOverrides>) -> bool {
        let o = overrides.copied().unwrap_or_default();
        o.calibration.unwrap_or(self.calibration) == Calibration::ContentFree
            || o.confidence.unwrap_or(self.confidence) == ConfidenceMeasure::Consensus
    }
}

/// Per-request overrides of `[choices]`.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ScoringOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub normalization: Option<Normalization>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calibration: Option<Calibration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confidence: Option<ConfidenceMeasure>,
}

/// One option's likelihood, as the reply reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OptionScore {
    /// The option as given (trimmed).
    pub text: String,
    /// Option tokens scored.
    pub tokens: usize,
    /// Σ log p(option | prompt).
    pub logprob: f32,
    /// `logprob` per token.
    pub mean_logprob: f32,
    /// Σ log p(option | content-free prompt), when calibrated.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub content_free_logprob: Option<f32>,
    /// The value compared between options (normalised, calibrated).
    pub score: f32,
}

impl OptionScore {
    /// The score under `normalization`, calibrated when `calibrated` and a content-free likelihood was
    /// measured: what `score` would be under another configuration (the benchmark compares them all
    /// from one pass).
    pub fn score_with(&self, normalization: Normalization, calibrated: bool) -> f32 {
        self.likelihood().score(normalization, calibrated)
    }

    pub fn likelihood(&self) -> Likelihood {
        Likelihood { sum: self.logprob, prior: self.content_free_logprob, tokens: self.tokens, bytes: self.text.len() }
    }
}

/// What every scoring of one option is computed from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Likelihood {
    /// Σ log p(option | prompt).
    pub sum: f32,
    /// Σ log p(option | content-free prompt), when measured.
    pub prior: Option<f32>,
    pub tokens: usize,
    pub bytes: usize,
}

impl Likelihood {
    /// The score under `normalization`, calibrated when `calibrated` and the prior was measured.
    pub fn score(&self, normalization: Normalization, calibrated: bool) -> f32 {
        let prior = if calibrated { self.prior } else { None };
        score(self.sum, prior, self.tokens, self.bytes, normalization)
    }
}

/// The confidence of having chosen option `chosen` (see the module docs); `probs` are the
/// probabilities under the configured scoring. Consensus falls back to the three plain scorings when
/// the content-free likelihoods were not measured.
pub fn confidence(measure: ConfidenceMeasure, options: &[Likelihood], probs: &[f32], chosen: usize) -> f32 {
    match measure {
        ConfidenceMeasure::Margin => margin(probs),
        ConfidenceMeasure::Consensus => consensus(options, chosen),
    }
}

/// Top probability minus the runner-up's (1 with a single option).
pub fn margin(probs: &[f32]) -> f32 {
    let mut p = probs.to_vec();
    p.sort_by(|a, b| b.total_cmp(a));
    p.first().copied().unwrap_or(0.0) - p.get(1).copied().unwrap_or(0.0)
}

/// Mean over the scorings (sum, mean, bytes × plain, content-free where measured) of the
/// probability each gives option `chosen`.
pub fn consensus(options: &[Likelihood], chosen: usize) -> f32 {
    if chosen >= options.len() {
        return 0.0;
    }
    let calibrations: &[bool] = if options.iter().all(|o| o.prior.is_some()) { &[false, true] } else { &[false] };
    let mut total = 0.0;
    let mut n = 0;
    for &calibrated in calibrations {
        for normalization in [Normalization::Sum, Normalization::Mean, Normalization::Bytes] {
            let scores: Vec<f32> = options.iter().map(|o| o.score(normalization, calibrated)).collect();
            total += softmax(&scores)[chosen];
            n += 1;
        }
    }
    total / n as f32
}

/// An option's score from its log-likelihood `sum` over `tokens` tokens and `bytes` bytes of text,
/// minus the equally normalised content-free log-likelihood `prior` when calibrating.
pub fn score(sum: f32, prior: Option<f32>, tokens: usize, bytes: usize, normalization: Normalization) -> f32 {
    let norm = |v: f32| match normalization {
        Normalization::Sum => v,
        Normalization::Mean => v / tokens.max(1) as f32,
        Normalization::Bytes => v / bytes.max(1) as f32,
    };
    norm(sum) - prior.map_or(0.0, norm)
}

/// Probabilities over the options (softmax of their scores) and the index of the best one.
pub fn probabilities(scores: &[f32]) -> (Vec<f32>, usize) {
    (softmax(scores), argmax(scores))
}

/// Checks the options of a choice question: count, non-empty, bounded. The same rule for every
/// interface (it runs at the service boundary and again in the engine).
pub fn validate(choices: &[String]) -> Result<()> {
    if choices.len() > MAX_CHOICES {
        return Err(Error::InvalidRequest(format!("at most {MAX_CHOICES} choices, got {}", choices.len())));
    }
    if choices.len() == 1 {
        return Err(Error::InvalidRequest("a choice question needs at least 2 choices, got 1".into()));
    }
    for (i, c) in choices.iter().enumerate() {
        if c.trim().is_empty() {
            return Err(Error::InvalidRequest(format!("choice {} is empty", i + 1)));
        }
        if c.len() > MAX_CHOICE_BYTES {
            return Err(Error::InvalidRequest(format!(
                "choice {} is {} bytes; at most {MAX_CHOICE_BYTES}",
                i + 1,
                c.len()
            )));
        }
    }
    Ok(())
}

/// The text an option is scored as after a raw-text prompt: a space goes between them when the prompt
/// does not end in whitespace and the option does not begin with it ("Answer:" + " Paris"), as
/// lm-evaluation-harness does. Chat prompts end in the assistant header and take the option as it is.
pub fn continuation(prompt_text: Option<&str>, option: &str) -> String {
    let option = option.trim();
    match prompt_text {
        Some(p) if !p.is_empty() && !p.ends_with(char::is_whitespace) => format!(" {option}"),
        _ => option.to_string(),
    }
}

/// What scoring one question needs: token ids of the options (as they continue the prompt) and of the
/// content-free prompt when calibrating.
pub(crate) struct ChoiceJob<'a> {
    pub texts: &'a [String],
    pub options: &'a [Vec<u32>],
    pub content_free: Option<&'a [u32]>,
    pub normalization: Normalization,
    /// Whether the content-free likelihood is subtracted from the scores (it may be measured for the
    /// confidence only).
    pub calibrated: bool,
    pub confidence: ConfidenceMeasure,
}

/// The outcome of scoring: per option, probabilities over options, the winner and its tokens.
pub(crate) struct Scored {
    pub options: Vec<OptionScore>,
    pub probs: Vec<f32>,
    pub chosen: usize,
    pub chosen_tokens: Vec<TokenInfo>,
    pub confidence: f32,
}

/// Per option token: log-probability and the best token's log-probability at that position.
type TokenLogprobs = Vec<(f32, f32)>;

/// Log-probabilities of each option after the prompt whose last logits are `last` and whose cache is
/// `cache`. Each option runs on the prompt's cache and is cut off it again afterwards, so the prompt is
/// computed once. `None` when cancelled.
pub(crate) fn option_logprobs(
    decoder: &mut Decoder,
    cache: &mut KvCache,
    last: &[f32],
    options: &[Vec<u32>],
    cancel: &CancelToken,
    run_options: &RunOptions,
) -> Result<Option<Vec<TokenLogprobs>>> {
    let prompt_len = cache.len();
    let mut out = Vec::with_capacity(options.len());
    for ids in options {
        let scored = option_tokens(decoder, cache, last, ids, cancel, run_options);
        cache.truncate(prompt_len);
        match scored? {
            Some(lps) => out.push(lps),
            None => return Ok(None),
        }
    }
    Ok(Some(out))
}

/// One option's per-token log-probabilities, its tokens appended to `cache`.
fn option_tokens(
    decoder: &mut Decoder,
    cache: &mut KvCache,
    last: &[f32],
    ids: &[u32],
    cancel: &CancelToken,
    run_options: &RunOptions,
) -> Result<Option<TokenLogprobs>> {
    let vocab = decoder.arch().vocab_size;
    if cancel.is_cancelled() {
        return Ok(None);
    }
    let Some((&head, rest)) = ids.split_first() else {
        return Err(Error::InvalidRequest("a choice has no tokens".into()));
    };
    let mut lps = vec![LogSoftmax::new(last).of(head)];
    // Token j+1 is predicted at the position of token j: run all but the last option token.
    let inputs = &ids[..ids.len() - 1];
    for (c, chunk) in inputs.chunks(CHUNK_TOKENS).enumerate() {
        let logits = match decoder.forward(chunk, cache, chunk.len(), Some(run_options)) {
            Ok(l) => l,
            Err(_) if cancel.is_cancelled() => return Ok(None),
            Err(e) => return Err(e),
        };
        let targets = &rest[c * CHUNK_TOKENS..c * CHUNK_TOKENS + chunk.len()];
        for (row, &t) in logits.chunks_exact(vocab).zip(targets) {
            lps.push(LogSoftmax::new(row).of(t));
        }
    }
    Ok(Some(lps))
}

/// Scores and the winner from per-token log-probabilities (`content_free`: the same options after
/// the content-free prompt, when calibrating).
pub(crate) fn decide(
    job: &ChoiceJob,
    lps: &[TokenLogprobs],
    content_free: Option<&[TokenLogprobs]>,
    option_ids: &[Vec<u32>],
) -> Scored {
    let mut options = Vec::with_capacity(lps.len());
    for (i, lp) in lps.iter().enumerate() {
        let sum: f32 = lp.iter().map(|(l, _)| l).sum();
        let mut option = OptionScore {
            text: job.texts[i].trim().to_string(),
            tokens: lp.len(),
            logprob: sum,
            mean_logprob: sum / lp.len().max(1) as f32,
            content_free_logprob: content_free.map(|c| c[i].iter().map(|(l, _)| l).sum()),
            score: 0.0,
        };
        option.score = option.score_with(job.normalization, job.calibrated);
        options.push(option);
    }
    let scores: Vec<f32> = options.iter().map(|o| o.score).collect();
    let (probs, chosen) = probabilities(&scores);
    let likelihoods: Vec<Likelihood> = options.iter().map(OptionScore::likelihood).collect();
    let confidence = confidence(job.confidence, &likelihoods, &probs, chosen);
    let chosen_tokens = option_ids[chosen]
        .iter()
        .zip(&lps[chosen])
        .map(|(&id, &(logprob, top_logprob))| TokenInfo { id, logprob, top_logprob })
        .collect();
    Scored { options, probs, chosen, chosen_tokens, confidence }
}

/// The first index of the largest value (NaN never wins).
fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] || v[best].is_nan() {
            best = i;
        }
    }
    best
}

/// Softmax in f64 (scores of long options can be far apart); uniform if nothing is finite.
pub(crate) fn softmax(scores: &[f32]) -> Vec<f32> {
    let max = scores.iter().copied().filter(|s| s.is_finite()).fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return vec![1.0 / scores.len().max(1) as f32; scores.len()];
    }
    let e: Vec<f64> = scores.iter().map(|&s| if s.is_finite() { f64::from(s - max).exp() } else { 0.0 }).collect();
    let total: f64 = e.iter().sum();
    e.iter().map(|x| (x / total) as f32).collect()
}

/// Log-softmax of one row of logits, evaluated per token.
struct LogSoftmax<'a> {
    row: &'a [f32],
    max: f32,
    log_total: f32,
}

impl<'a> LogSoftmax<'a> {
    fn new(row: &'a [f32]) -> Self {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let total: f64 = row.iter().map(|&l| f64::from(l - max).exp()).sum();
        LogSoftmax { row, max, log_total: total.ln() as f32 }
    }

    /// (log p(token), log p(most likely token)).
    fn of(&self, token: u32) -> (f32, f32) {
        let l = self.row.get(token as usize).copied().unwrap_or(f32::NEG_INFINITY);
        (l - self.max - self.log_total, -self.log_total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job<'a>(texts: &'a [String], n: Normalization) -> ChoiceJob<'a> {
        ChoiceJob {
            texts,
            options: &[],
            content_free: None,
            normalization: n,
            calibrated: true,
            confidence: ConfidenceMeasure::Margin,
        }
    }

    #[test]
    fn continuation_inserts_one_space_after_raw_text_only() {
        assert_eq!(continuation(Some("Answer:"), "Paris"), " Paris");
        assert_eq!(continuation(Some("Answer: "), "Paris"), "Paris");
        assert_eq!(continuation(Some("Answer:"), "  Paris "), " Paris");
        assert_eq!(continuation(None, "Paris"), "Paris");
    }

    #[test]
    fn normalisations_and_calibration_change_the_winner_as_defined() {
        let texts: Vec<String> = vec!["a".into(), "long answer".into()];
        let ids = vec![vec![1], vec![2, 3, 4]];
        // Option 0: one token at -2.0; option 1: three tokens at -1.0 each (sum -3, mean -1).
        let lps = vec![vec![(-2.0, -0.5)], vec![(-1.0, -0.5); 3]];
        let sum = decide(&job(&texts, Normalization::Sum), &lps, None, &ids);
        assert_eq!(sum.chosen, 0);
        assert!((sum.options[1].score + 3.0).abs() < 1e-6);
        let mean = decide(&job(&texts, Normalization::Mean), &lps, None, &ids);
        assert_eq!(mean.chosen, 1);
        assert_eq!(mean.chosen_tokens.len(), 3);
        let bytes = decide(&job(&texts, Normalization::Bytes), &lps, None, &ids);
        assert!((bytes.options[1].score - (-3.0 / 11.0)).abs() < 1e-6);
        // The content-free prior strongly favours option 1: PMI with sums picks option 0.
        let cf = vec![vec![(-4.0, -0.5)], vec![(-0.1, -0.5); 3]];
        let pmi = decide(&job(&texts, Normalization::Sum), &lps, Some(&cf), &ids);
        assert_eq!(pmi.chosen, 0);
        assert!((pmi.options[0].score - 2.0).abs() < 1e-6);
        assert_eq!(pmi.options[0].content_free_logprob, Some(-4.0));
        let total: f32 = pmi.probs.iter().sum();
        assert!((total - 1.0).abs() < 1e-6);
    }

    fn lk(sum: f32, prior: Option<f32>, tokens: usize, bytes: usize) -> Likelihood {
        Likelihood { sum, prior, tokens, bytes }
    }

    #[test]
    fn consensus_is_the_mean_probability_of_the_chosen_option_over_the_six_scorings() {
        let opts = [lk(-2.0, Some(-3.0), 2, 4), lk(-6.0, Some(-5.0), 3, 9)];
        let mut expected = 0.0;
        for calibrated in [false, true] {
            for n in [Normalization::Sum, Normalization::Mean, Normalization::Bytes] {
                let s: Vec<f32> = opts.iter().map(|o| o.score(n, calibrated)).collect();
                expected += softmax(&s)[0] / 6.0;
            }
        }
        assert!((consensus(&opts, 0) - expected).abs() < 1e-6);
        assert!((consensus(&opts, 0) + consensus(&opts, 1) - 1.0).abs() < 1e-5, "two options: it sums to 1");
        // Without content-free likelihoods only the three plain scorings count.
        let plain = [lk(-2.0, None, 2, 4), lk(-6.0, Some(-5.0), 3, 9)];
        let mut expected_plain = 0.0;
        for n in [Normalization::Sum, Normalization::Mean, Normalization::Bytes] {
            let s: Vec<f32> = plain.iter().map(|o| o.score(n, false)).collect();
            expected_plain += softmax(&s)[0] / 3.0;
        }
        assert!((consensus(&plain, 0) - expected_plain).abs() < 1e-6);
        assert_eq!(consensus(&plain, 5), 0.0, "an index out of range is no confidence, not a panic");
    }

    #[test]
    fn an_answer_a_normalisation_would_flip_is_less_confident_than_one_all_agree_on() {
        // Option 0 wins by sum but loses per token: the scorings disagree.
        let split = [lk(-3.0, Some(-3.0), 1, 3), lk(-4.0, Some(-4.0), 4, 12)];
        let agreed = [lk(-1.0, Some(-3.0), 2, 6), lk(-8.0, Some(-3.0), 2, 6)];
        assert!(consensus(&agreed, 0) > 0.9);
        assert!(consensus(&split, 0) < 0.75);
        let probs = [0.7, 0.2, 0.1];
        assert!((confidence(ConfidenceMeasure::Margin, &agreed, &probs, 0) - 0.5).abs() < 1e-6);
        assert_eq!(confidence(ConfidenceMeasure::Consensus, &agreed, &probs, 0), consensus(&agreed, 0));
    }

    #[test]
    fn validation_bounds_count_emptiness_and_length() {
        let ok: Vec<String> = vec!["yes".into(), "no".into()];
        assert!(validate(&ok).is_ok());
        assert!(validate(&[]).is_ok(), "no choices: not a choice question");
        assert!(validate(&["only".to_string()]).unwrap_err().to_string().contains("at least 2"));
        assert!(validate(&["a".to_string(), " ".to_string()]).unwrap_err().to_string().contains("choice 2 is empty"));
        let many: Vec<String> = (0..27).map(|i| i.to_string()).collect();
        assert!(validate(&many).unwrap_err().to_string().contains("at most 26"));
        let long = vec!["a".to_string(), "x".repeat(MAX_CHOICE_BYTES + 1)];
        assert!(validate(&long).unwrap_err().to_string().contains("bytes"));
    }

    #[test]
    fn softmax_is_stable_and_argmax_ignores_nan() {
        let p = softmax(&[-1000.0, -1001.0]);
        assert!((p[0] - 0.7310586).abs() < 1e-5);
        assert_eq!(softmax(&[f32::NAN, f32::NAN]), vec![0.5, 0.5]);
        assert_eq!(argmax(&[f32::NAN, -3.0, -1.0]), 2);
    }
}

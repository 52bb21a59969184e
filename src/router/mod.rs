//! Device–server routing (`docs/routing.md`). Each request gets two scores:
//!
//! * **scope**: how close the query is to the customization's own examples — the cosine of the query's
//!   task embedding to the nearest example embedding (the same embedding that chose the blend);
//! * **confidence**: from the device model's own probabilities — for a choice question the consensus
//!   of the six option scorings on the chosen option (or the margin to the runner-up, `[choices]
//!   confidence`; `crate::choices`), for free text the geometric-mean probability
//!   of the generated tokens (with the mean and minimum log-probability reported too).
//!
//! Policy (mode `hybrid`): out of scope → the server's plain model (the device's customization does
//! not apply); in scope but not confident → the server with the same blend weights on its own pool;
//! otherwise the device answers. Any server failure falls back to the device's answer, flagged. The
//! server only ever receives the query, the pool id and the blend weights (see [`remote`]).

pub mod calibrate;
pub mod remote;
mod served_blend;

pub use calibrate::{Calibration, SCOPE_TOLERANCE, calibrate, check_calibration, split_threshold};
pub use served_blend::{ServedBlend, answer_served_blend};

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::choices::OptionScore;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::generate::{CancelToken, FinishReason, Generation, GenerationParams, Prompt};
use crate::pool::embed::cosine;
use crate::queue::EngineQueue;

pub use remote::{RemoteAnswer, RemoteClient, RemoteError, RemoteRequest};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AnsweredBy {
    Device,
    Server,
}

/// Why a request went where it went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Routing is off (mode `device_only`, or the request asked for the device).
    DeviceOnly,
    /// Mode `server_only`, or the request asked for the server.
    ServerOnly,
    /// In scope and confident: the device's answer stands.
    Confident,
    /// The query is far from the customization's examples: the server's plain model answers.
    OutOfScope,
    /// The device was not confident: the server answers with the same blend.
    LowConfidence,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConfidenceKind {
    /// A choice question's confidence (`[choices] confidence`: consensus or margin).
    Choice,
    /// Geometric-mean probability of the generated tokens.
    Text,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Confidence {
    pub kind: ConfidenceKind,
    /// The score compared with the threshold, in [0, 1].
    pub value: f32,
    pub mean_logprob: f32,
    pub min_logprob: f32,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    /// Waiting for the engine (other requests using the model).
    pub queue_ms: f64,
    /// Adapter lookup, scope embedding and the decision itself (no generation, no waiting).
    pub routing_ms: f64,
    pub local_ms: f64,
    pub remote_ms: f64,
    pub total_ms: f64,
}

/// Who answered and why; carried by every routed response.
#[derive(Debug, Clone, Serialize)]
pub struct Route {
    pub answered_by: AnsweredBy,
    pub reason: Reason,
    pub mode: RouteMode,
    pub scope: Option<f32>,
    pub confidence: Option<Confidence>,
    pub thresholds: Thresholds,
    /// Set when the server was chosen but failed and the device answered instead: what went wrong.
    pub fallback: Option<String>,
    /// The server applied the blend weights (a Crayon server); false for the plain model or a plain
    /// OpenAI-compatible server.
    pub server_blend: bool,
    pub server_model: Option<String>,
    pub latency: Latency,
}

/// Per-request overrides of the routing config.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteOverrides {
    pub mode: Option<RouteMode>,
    pub min_scope: Option<f32>,
    #[serde(alias = "min_margin")]
    pub min_choice_confidence: Option<f32>,
    pub min_token_prob: Option<f32>,
}

pub struct Request {
    pub prompt: Prompt,
    pub params: GenerationParams,
    pub overrides: RouteOverrides,
    /// Called when the request goes to the server: it gives back its local admission place, so that
    /// requests waiting on a slow server do not keep device requests out (docs/service.md).
    pub on_offload: Option<OnOffload>,
}

impl Answer {
    /// The device's answer: its generation's text, scores and counts, with the route it took.
    pub fn from_device(g: Generation, choices: &[String], route: Route) -> Answer {
        Answer {
            choice: best_choice(choices, &g.choice_probs),
            text: g.text,
            finish_reason: g.finish_reason,
            choice_probs: g.choice_probs,
            choice_scores: g.choice_scores,
            prompt_tokens: g.prompt_tokens,
            completion_tokens: g.tokens.len(),
            logprobs: g.logprobs,
            context: g.context,
            route,
        }
    }
}

impl Route {
    /// The route of an answer the device gave because it was to answer itself (`device_only`: a
    /// device's blend served on a server, `crayonctl` without a daemon), with its confidence.
    pub fn device_only(confidence: Option<Confidence>, latency: Latency) -> Route {
        Route {
            answered_by: AnsweredBy::Device,
            reason: Reason::DeviceOnly,
            mode: RouteMode::DeviceOnly,
            scope: None,
            confidence,
            thresholds: Thresholds::default(),
            fallback: None,
            server_blend: false,
            server_model: None,
            latency,
        }
    }
}

/// See [`Request::on_offload`].
pub type OnOffload = std::sync::Arc<dyn Fn() + Send + Sync>;

pub struct Answer {
    pub text: String,
    pub finish_reason: FinishReason,
    /// For choice questions: the chosen option (device: by probability; server: as it reports it, or
    /// parsed from its text).
    pub choice: Option<String>,
    pub choice_probs: Vec<f32>,
    /// Each option's likelihood (device answers and Crayon servers; empty otherwise).
    pub choice_scores: Vec<OptionScore>,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Per answer token, when the request asked for log-probabilities (a server's as it reported them).
    pub logprobs: Vec<crate::generate::TokenLogprob>,
    /// What the device's context policy did (device answers only).
    pub context: Option<crate::context::ContextReport>,
    pub route: Route,
}

/// Scope of a query: cosine of its embedding to the nearest example embedding.
pub fn scope(query: &[f32], examples: &[Vec<f32>]) -> Option<f32> {
    examples.iter().map(|e| cosine(query, e)).reduce(f32::max)
}

/// Confidence of a device generation (see the module docs); `None` when nothing was generated.
pub fn confidence(g: &Generation) -> Option<Confidence> {
    if g.tokens.is_empty() && g.choice_probs.is_empty() {
        return None;
    }
    let lps: Vec<f32> = g.tokens.iter().map(|t| t.logprob).collect();
    let mean_logprob = if lps.is_empty() { 0.0 } else { lps.iter().sum::<f32>() / lps.len() as f32 };
    let min_logprob = lps.iter().copied().fold(0.0, f32::min);
    let (kind, value) = if g.choice_probs.is_empty() {
        (ConfidenceKind::Text, mean_logprob.exp())
    } else {
        let value = g.choice_confidence.unwrap_or_else(|| crate::choices::margin(&g.choice_probs));
        (ConfidenceKind::Choice, value)
    };
    Some(Confidence { kind, value, mean_logprob, min_logprob })
}

fn threshold_for(c: &Confidence, t: &Thresholds) -> f32 {
    match c.kind {
        ConfidenceKind::Choice => t.min_choice_confidence,
        ConfidenceKind::Text => t.min_token_prob,
    }
}

/// The option with the highest probability.
pub fn best_choice(choices: &[String], probs: &[f32]) -> Option<String> {
    let (i, _) = probs.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1))?;
    choices.get(i).map(|c| c.trim().to_string())
}

/// The option a free-text answer (from a server that does not score options) names: the longest
/// option its text begins with, ignoring case and leading punctuation ("Paris is..." → "Paris"), or
/// else an option equal to its first word stripped of punctuation ("B." or "(b)" → "B").
pub fn parse_choice(choices: &[String], text: &str) -> Option<String> {
    let lower = text.trim_start_matches(|c: char| c.is_whitespace() || c == '(' || c == '"').to_lowercase();
    let by_prefix = choices
        .iter()
        .map(|c| c.trim())
        .filter(|c| !c.is_empty() && lower.starts_with(&c.to_lowercase()))
        .max_by_key(|c| c.len());
    if let Some(c) = by_prefix {
        // "A" must not match "Afterwards ...": a one-word prefix must end at a word boundary.
        let rest = &lower[c.to_lowercase().len()..];
        if rest.chars().next().is_none_or(|ch| !ch.is_alphanumeric()) {
            return Some(c.to_string());
        }
    }
    let word: String = text.split_whitespace().next()?.chars().filter(|c| c.is_alphanumeric()).collect();
    choices.iter().map(|c| c.trim()).find(|c| c.eq_ignore_ascii_case(&word)).map(str::to_string)
}

/// The user's question as the scope sees it: the last user message of a chat, or the text.
fn query_text(prompt: &Prompt) -> Option<&str> {
    match prompt {
        Prompt::Chat(m) => m.iter().rev().find(|m| m.role == "user").map(|m| m.content.as_str()),
        Prompt::Text(t) => Some(t),
        Prompt::Tokens(_) => None,
    }
}

/// What the device knows before generating: thresholds in force, scope, and the blend to send.
struct Plan {
    thresholds: Thresholds,
    scope: Option<f32>,
    blend: Option<(String, Vec<f32>)>,
    /// The prompt with the blend's exemplars in front, for a server that cannot apply the blend itself.
    exemplars: Option<Prompt>,
}

pub struct Router {
    config: RouterConfig,
    remote: Option<RemoteClient>,
}

impl Router {
    pub fn new(config: &crate::config::Config) -> Result<Router> {
        let remote = if config.remote.url.is_empty() { None } else { Some(RemoteClient::new(&config.remote)?) };
        Ok(Router { config: config.router.clone(), remote })
    }

    /// The configured thresholds (before per-adapter calibration and per-request overrides).
    pub fn thresholds(&self) -> Thresholds {
        self.config.thresholds
    }

    pub fn mode(&self) -> RouteMode {
        self.config.mode
    }

    pub fn remote(&self) -> Option<&RemoteClient> {
        self.remote.as_ref()
    }

    /// Answers a request on the device or the server. The engine is locked only while it works (the
    /// server call runs unlocked). `on_text` streams the answer: live in `device_only` mode; in the other
    /// modes once the answer is final (a local answer may still be replaced by the server's).
    pub fn answer(
        &self,
        engine: &EngineQueue,
        client: &str,
        req: &Request,
        cancel: &CancelToken,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Answer> {
        let t0 = Instant::now();
        req.params.validate()?; // before anything is sent anywhere
        let mode = req.overrides.mode.unwrap_or(self.config.mode);
        if self.config.mode == RouteMode::DeviceOnly && mode != RouteMode::DeviceOnly {
            return Err(Error::InvalidRequest(format!(
                "route mode '{}' asked for, but router.mode is device_only: nothing may leave this device",
                mode.name()
            )));
        }
        let remote = match (mode, &self.remote) {
            (RouteMode::DeviceOnly, _) => None,
            (_, Some(r)) => Some(r),
            (m, None) => {
                return Err(Error::InvalidRequest(format!(
                    "route mode '{}' needs a server, and none is configured ([remote] url)",
                    m.name()
                )));
            }
        };
        // One turn for planning and the local answer: the engine is released in between only when the
        // server is asked first, so a request costs its client one turn of the fair queue, not two.
        let guard = engine.lock(client, cancel)?;
        let queue_ms = ms(t0.elapsed());
        let t = Instant::now();
        let plan = self.plan(&guard, req, remote)?;
        let routing_ms = ms(t.elapsed());
        let mut turn = Some(guard);
        let mut route = Route {
            answered_by: AnsweredBy::Device,
            reason: Reason::DeviceOnly,
            mode,
            scope: plan.scope,
            confidence: None,
            thresholds: plan.thresholds,
            fallback: None,
            server_blend: false,
            server_model: None,
            latency: Latency { queue_ms, routing_ms, ..Latency::default() },
        };

        // Decisions that need no local answer first: the server is asked before the device works.
        let early = match (mode, remote) {
            (RouteMode::ServerOnly, Some(r)) => Some((r, Reason::ServerOnly, Some(&plan))),
            (RouteMode::Hybrid, Some(r)) if plan.scope.is_some_and(|s| s < plan.thresholds.min_scope) => {
                Some((r, Reason::OutOfScope, None))
            }
            _ => None,
        };
        if let Some((r, reason, blended)) = early {
            drop(turn.take()); // others use the model while the server answers
            route.reason = reason;
            match self.offload(r, req, blended, cancel, &mut route) {
                Ok(a) => return Ok(finish_remote(a, req, route, t0, on_text)),
                Err(e) => route.fallback = Some(e.to_string()),
            }
        }

        let live = mode == RouteMode::DeviceOnly || route.fallback.is_some();
        let local = {
            let mut sink = |s: &str| if live { on_text(s) } else { ControlFlow::Continue(()) };
            let mut guard = match turn.take() {
                Some(g) => g,
                None => {
                    let t_wait = Instant::now();
                    let g = engine.lock(client, cancel)?;
                    route.latency.queue_ms += ms(t_wait.elapsed());
                    g
                }
            };
            let t_local = Instant::now();
            let g = guard.generate(&req.prompt, &req.params, cancel, &mut sink)?;
            route.latency.local_ms = ms(t_local.elapsed());
            g
        };
        route.confidence = confidence(&local);

        if mode == RouteMode::Hybrid && route.fallback.is_none() && local.finish_reason != FinishReason::Cancelled {
            let low = route.confidence.is_some_and(|c| c.value < threshold_for(&c, &plan.thresholds));
            route.reason = if low { Reason::LowConfidence } else { Reason::Confident };
            if let (true, Some(r)) = (low, remote) {
                match self.offload(r, req, Some(&plan), cancel, &mut route) {
                    Ok(a) => return Ok(finish_remote(a, req, route, t0, on_text)),
                    Err(e) => route.fallback = Some(e.to_string()),
                }
            }
        }
        if !live {
            let _ = on_text(&local.text);
        }
        route.latency.total_ms = ms(t0.elapsed());
        Ok(Answer::from_device(local, &req.params.choices, route))
    }

    fn plan(&self, engine: &Engine, req: &Request, remote: Option<&RemoteClient>) -> Result<Plan> {
        let mut thresholds = self.config.thresholds;
        let mut scope_value = None;
        let mut blend = None;
        if let Some(name) = &req.params.adapter {
            let c = engine.adapter(name)?;
            if let (true, Some(t)) = (self.config.use_calibrated, c.calibrated) {
                thresholds = t;
            }
            if !c.example_embeddings.is_empty() {
                if let Some(q) = query_text(&req.prompt).map(|t| engine.task_embedding(t)).transpose()?.flatten() {
                    scope_value = scope(&q, &c.example_embeddings);
                }
            }
            blend = Some((c.pool_id.clone(), c.weights.clone()));
        }
        let o = &req.overrides;
        thresholds.min_scope = o.min_scope.unwrap_or(thresholds.min_scope);
        thresholds.min_choice_confidence = o.min_choice_confidence.unwrap_or(thresholds.min_choice_confidence);
        thresholds.min_token_prob = o.min_token_prob.unwrap_or(thresholds.min_token_prob);
        thresholds.validate("request").map_err(Error::InvalidRequest)?;
        let exemplars = match (&blend, remote) {
            (Some((pool_id, weights)), Some(r)) if r.wants_exemplars() => {
                match engine.exemplar_prompt(pool_id, weights, &req.prompt) {
                    Some(Ok((prompt, _))) => Some(prompt),
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "no exemplars for this blend; a server that cannot apply it answers plainly");
                        None
                    }
                    None => None,
                }
            }
            _ => None,
        };
        Ok(Plan { thresholds, scope: scope_value, blend, exemplars })
    }

    fn offload(
        &self,
        remote: &RemoteClient,
        req: &Request,
        blended: Option<&Plan>,
        cancel: &CancelToken,
        route: &mut Route,
    ) -> std::result::Result<RemoteAnswer, RemoteError> {
        if let Some(release) = &req.on_offload {
            release();
        }
        let t = Instant::now();
        // `blended`: the plan's blend (and exemplars) go along; otherwise the server's plain model is asked.
        let r = RemoteRequest {
            prompt: &req.prompt,
            params: &req.params,
            blend: blended.and_then(|p| p.blend.clone()),
            exemplars: blended.and_then(|p| p.exemplars.as_ref()),
        };
        let out = remote.complete_cancellable(&r, Some(cancel));
        route.latency.remote_ms = ms(t.elapsed());
        if let Err(e) = &out {
            tracing::warn!(error = %e, "server failed; the device answers");
        }
        out
    }
}

fn finish_remote(
    a: RemoteAnswer,
    req: &Request,
    mut route: Route,
    t0: Instant,
    on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
) -> Answer {
    let _ = on_text(&a.text);
    route.answered_by = AnsweredBy::Server;
    route.server_blend = a.server_blend;
    route.server_model = Some(a.model.clone());
    route.latency.total_ms = ms(t0.elapsed());
    let choice = a.choice.clone().or_else(|| parse_choice(&req.params.choices, &a.text));
    Answer {
        text: a.text,
        finish_reason: a.finish_reason,
        choice,
        choice_probs: a.choice_probs,
        choice_scores: a.choice_scores,
        prompt_tokens: a.prompt_tokens,
        completion_tokens: a.completion_tokens,
        logprobs: a.logprobs,
        context: None,
        route,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// How a request chooses between the device model and the server (`docs/routing.md`).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum RouteMode {
    /// Never leave the device (the default: nothing is sent anywhere unless asked for).
    #[default]
    DeviceOnly,
    /// Scope and confidence decide (needs `[remote] url`).
    Hybrid,
    /// Always ask the server; the device answers only when the server fails.
    ServerOnly,
}

/// Routing thresholds (each overridable per request, and calibratable per adapter from its examples).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Thresholds {
    /// Scope below this (cosine of the query to its nearest example, in [-1, 1]): out of scope.
    pub min_scope: f32,
    /// Choice questions: a confidence (`[choices] confidence`: consensus probability of the chosen
    /// option by default, or the probability margin) below this is low confidence. `min_margin` is
    /// read as an alias (configurations and stored adapters before the consensus measure).
    #[serde(alias = "min_margin")]
    pub min_choice_confidence: f32,
    /// Free text: a geometric-mean token probability below this is low confidence.
    pub min_token_prob: f32,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds { min_scope: 0.2, min_choice_confidence: 0.3, min_token_prob: 0.5 }
    }
}

impl Thresholds {
    pub fn validate(&self, section: &str) -> std::result::Result<(), String> {
        let in_range = |v: f32, lo: f32| v.is_finite() && (lo..=1.0).contains(&v);
        if !in_range(self.min_scope, -1.0) {
            return Err(format!("{section}.min_scope must be in [-1, 1], got {}", self.min_scope));
        }
        if !in_range(self.min_choice_confidence, 0.0) || !in_range(self.min_token_prob, 0.0) {
            return Err(format!(
                "{section}.min_choice_confidence and min_token_prob must be in [0, 1], got {} and {}",
                self.min_choice_confidence, self.min_token_prob
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RouterConfig {
    pub mode: RouteMode,
    #[serde(flatten)]
    pub thresholds: Thresholds,
    /// Use an adapter's thresholds calibrated from its examples (`customize --calibrate`) when it has them.
    pub use_calibrated: bool,
}

impl RouteMode {
    pub fn name(self) -> &'static str {
        match self {
            RouteMode::DeviceOnly => "device_only",
            RouteMode::Hybrid => "hybrid",
            RouteMode::ServerOnly => "server_only",
        }
    }
}

impl RouterConfig {
    /// Checks the section on its own.
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.thresholds.validate("router")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::TokenInfo;

    fn generation(logprobs: &[f32], choice_probs: &[f32]) -> Generation {
        Generation {
            text: String::new(),
            tokens: logprobs.iter().map(|&l| TokenInfo { id: 0, logprob: l, top_logprob: l }).collect(),
            finish_reason: FinishReason::Stop,
            prompt_tokens: 1,
            choice_probs: choice_probs.to_vec(),
            choice_scores: Vec::new(),
            choice_confidence: None,
            logprobs: Vec::new(),
            context: None,
            prefill_time: Duration::ZERO,
            decode_time: Duration::ZERO,
        }
    }

    #[test]
    fn choice_confidence_is_the_scored_confidence_or_else_the_margin_of_the_top_two() {
        let mut g = generation(&[-0.1], &[0.1, 0.6, 0.25, 0.05]);
        let c = confidence(&g).unwrap();
        assert_eq!(c.kind, ConfidenceKind::Choice);
        assert!((c.value - 0.35).abs() < 1e-6);
        g.choice_confidence = Some(0.42);
        assert_eq!(confidence(&g).unwrap().value, 0.42);
    }

    #[test]
    fn text_confidence_is_the_geometric_mean_token_probability() {
        let c = confidence(&generation(&[-0.5, -1.5], &[])).unwrap();
        assert_eq!(c.kind, ConfidenceKind::Text);
        assert!((c.value - (-1.0f32).exp()).abs() < 1e-6);
        assert_eq!(c.min_logprob, -1.5);
        assert!(confidence(&generation(&[], &[])).is_none());
    }

    #[test]
    fn scope_is_the_nearest_example() {
        let ex = vec![vec![1.0, 0.0], vec![0.0, 1.0]];
        assert!((scope(&[0.8, 0.6], &ex).unwrap() - 0.8).abs() < 1e-6);
        assert!(scope(&[1.0, 0.0], &[]).is_none());
    }

    #[test]
    fn choices_are_parsed_from_free_text() {
        let ch: Vec<String> = ["A", "B", "C"].iter().map(|s| s.to_string()).collect();
        assert_eq!(parse_choice(&ch, " B. a candle").as_deref(), Some("B"));
        assert_eq!(parse_choice(&ch, "(c)").as_deref(), Some("C"));
        assert_eq!(parse_choice(&ch, "Because"), None);
        assert_eq!(parse_choice(&ch, "Afterwards"), None, "a label is not a prefix of a longer word");
        let texts: Vec<String> = vec!["Paris".into(), "Paris, Texas".into(), "Lyon".into()];
        assert_eq!(parse_choice(&texts, "Paris, Texas is in the US").as_deref(), Some("Paris, Texas"));
        assert_eq!(parse_choice(&texts, " paris.").as_deref(), Some("Paris"));
        assert_eq!(parse_choice(&texts, "I think Lyon"), None);
        assert_eq!(best_choice(&ch, &[0.2, 0.1, 0.7]).as_deref(), Some("C"));
    }
}

//! The device's client for the server: OpenAI-compatible `/v1/chat/completions` (chat prompts) and
//! `/v1/completions` (text prompts), non-streaming so that a server dying mid-answer costs nothing
//! but time: the caller falls back to the device's own answer.
//!
//! Bounded in every way: a connect timeout, one deadline for the whole request including retries
//! (a slow drip ends there), a response size limit, bounded retries with backoff (connection errors,
//! timeouts, 5xx, 429, malformed bodies; never 4xx), and a circuit breaker that stops calling a
//! server that keeps failing. What is sent: the query (messages or text), sampling parameters, and
//! in the `crayon` extension only the pool id, the blend weights and the answer options — never the
//! examples of a customization (they are not even in memory here; see `tests/hybrid.rs`).
//!
//! How a blend travels depends on `remote.kind`: a Crayon server gets it in the `crayon` extension; a
//! llama.cpp server (`llama-server`) as per-request LoRA scales (`lora: [{id, scale}]`) of the GGUF
//! adapters it has loaded, which it lists at `GET /lora-adapters` under names that say which device
//! pool they serve (`<device pool id>.<index>.<adapter>.gguf`, written by `crayon_pool gguf-lora`); a
//! vLLM server with Crayon's resolver plugin gets it as the model name (`crayon-blend.<pool>.<weights>`);
//! a plain OpenAI-compatible server gets exemplars drawn by it (when the device has its pool's bank).

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::generate::{CancelToken, FinishReason, GenerationParams, Prompt};

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("server {url}: circuit breaker open after {failures} failed requests (next try in {retry_in_ms} ms)")]
    CircuitOpen { url: String, failures: u32, retry_in_ms: u64 },
    #[error("server {url}: {attempts} attempt(s) failed within {budget_ms} ms; last: {last}")]
    Failed { url: String, attempts: u32, budget_ms: u64, last: String },
    #[error("server {url} refused the request: HTTP {status}: {body}")]
    Rejected { url: String, status: u16, body: String },
    #[error("a prompt given as token ids cannot be sent to a server")]
    Unsupported,
    #[error("the request was cancelled")]
    Cancelled,
}

/// One attempt's failure, and whether another attempt may help.
#[derive(Debug)]
struct AttemptError {
    msg: String,
    retry: bool,
    status: Option<u16>,
}

impl AttemptError {
    fn transient(msg: impl Into<String>) -> AttemptError {
        AttemptError { msg: msg.into(), retry: true, status: None }
    }
}

pub struct RemoteRequest<'a> {
    pub prompt: &'a Prompt,
    pub params: &'a GenerationParams,
    /// Device pool id and blend weights, for customized requests.
    pub blend: Option<(String, Vec<f32>)>,
    /// The prompt with exemplars of the blend's clusters in front (the device pool's public exemplar
    /// bank, `[pool] exemplars`): what a server that cannot apply the blend itself is asked instead.
    pub exemplars: Option<&'a Prompt>,
}

#[derive(Debug, Clone)]
pub struct RemoteAnswer {
    pub text: String,
    pub finish_reason: FinishReason,
    pub model: String,
    /// The server confirmed it applied the blend (a Crayon server).
    pub server_blend: bool,
    pub choice: Option<String>,
    pub choice_probs: Vec<f32>,
    pub choice_scores: Vec<crate::choices::OptionScore>,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// The server's per-token log-probabilities, when asked for and reported (either OpenAI shape).
    pub logprobs: Vec<crate::generate::TokenLogprob>,
    pub attempts: u32,
}

#[derive(Default)]
struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
}

pub struct RemoteClient {
    agent: ureq::Agent,
    base: String,
    token: Option<String>,
    cfg: RemoteConfig,
    breaker: Mutex<Breaker>,
    /// A llama.cpp server's adapters, as last listed (`remote.kind = "llama-server"`).
    loras: Mutex<Option<(Instant, Vec<LoraFile>)>>,
}

/// How long a llama.cpp server's adapter listing is trusted: a restarted server may have loaded
/// other adapters under the same ids.
const LORA_LISTING_TTL: Duration = Duration::from_secs(30);

/// One GGUF LoRA adapter a llama.cpp server has loaded.
#[derive(Debug, Clone, PartialEq)]
struct LoraFile {
    id: i64,
    /// The device pool whose blends it serves, and its index there, when its file name says so
    /// (`<device pool id>.<index>.<adapter>.gguf`); other adapters are the operator's own.
    slot: Option<(String, usize)>,
}

impl RemoteClient {
    pub fn new(cfg: &RemoteConfig) -> Result<RemoteClient> {
        let token = crate::config::read_token(&cfg.token_file, "remote.token_file")?;
        let mut builder = ureq::Agent::config_builder();
        if !cfg.ca_file.as_os_str().is_empty() {
            builder = builder.tls_config(ureq::tls::TlsConfig::builder().root_certs(private_ca(&cfg.ca_file)?).build());
        }
        let agent = builder
            .timeout_connect(Some(Duration::from_millis(cfg.connect_timeout_ms)))
            .http_status_as_error(false)
            .max_redirects(0)
            .user_agent(format!("crayon/{}", crate::VERSION))
            .build()
            .into();
        let base = cfg.url.trim_end_matches('/').trim_end_matches("/v1").to_string();
        Ok(RemoteClient {
            agent,
            base,
            token,
            cfg: cfg.clone(),
            breaker: Mutex::new(Breaker::default()),
            loras: Mutex::new(None),
        })
    }

    pub fn url(&self) -> &str {
        &self.base
    }

    /// Whether a customized request may need the device's exemplars: the server cannot apply a blend
    /// itself (a plain OpenAI server), or may not hold adapters for the device's pool (a llama.cpp
    /// server). A Crayon server uses its own exemplar bank.
    pub fn wants_exemplars(&self) -> bool {
        self.cfg.send_blend && matches!(self.cfg.kind, RemoteKind::Openai | RemoteKind::LlamaServer)
    }

    /// Asks the server, within `remote.timeout_ms` in all.
    pub fn complete(&self, req: &RemoteRequest) -> std::result::Result<RemoteAnswer, RemoteError> {
        self.complete_cancellable(req, None)
    }

    /// As [`RemoteClient::complete`], giving up between attempts (and during backoff) once `cancel`
    /// fires; an attempt under way runs to its own deadline.
    pub fn complete_cancellable(
        &self,
        req: &RemoteRequest,
        cancel: Option<&CancelToken>,
    ) -> std::result::Result<RemoteAnswer, RemoteError> {
        let cancelled = || cancel.is_some_and(CancelToken::is_cancelled);
        // A plain OpenAI server cannot apply a blend: exemplars drawn by it steer the server instead.
        let steered = self.cfg.kind == RemoteKind::Openai && self.cfg.send_blend && req.blend.is_some();
        let prompt = req.exemplars.filter(|_| steered).unwrap_or(req.prompt);
        let (path, body) = self.body(req, prompt)?;
        self.check_breaker()?;
        let url = format!("{}{path}", self.base);
        let budget = Duration::from_millis(self.cfg.timeout_ms);
        let deadline = Instant::now() + budget;
        let mut attempts = 0;
        let result = loop {
            if cancelled() {
                return Err(RemoteError::Cancelled);
            }
            attempts += 1;
            let left = deadline.saturating_duration_since(Instant::now());
            let sent = match self.cfg.kind {
                RemoteKind::LlamaServer => self.with_lora_scales(&body, req, left),
                RemoteKind::Openai => Ok((std::borrow::Cow::Borrowed(&body), Some(!std::ptr::eq(prompt, req.prompt)))),
                RemoteKind::Vllm => Ok((std::borrow::Cow::Borrowed(&body), Some(body["model"] != self.model_name()))),
                RemoteKind::Crayon => Ok((std::borrow::Cow::Borrowed(&body), None)),
            };
            let attempt = sent.and_then(|(body, applied)| {
                let mut a = self.attempt(&url, &body, deadline.saturating_duration_since(Instant::now()))?;
                if let Some(applied) = applied {
                    a.server_blend = applied;
                }
                Ok(a)
            });
            let err = match attempt {
                Ok(mut a) => {
                    a.attempts = attempts;
                    break Ok(a);
                }
                Err(e) => {
                    // A server that failed may come back with other adapters under the same ids.
                    *self.loras.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    e
                }
            };
            let backoff = Duration::from_millis(self.cfg.retry_backoff_ms * u64::from(attempts));
            let more_time = Instant::now() + backoff + Duration::from_millis(10) < deadline;
            if !err.retry || attempts > self.cfg.retries || !more_time {
                break Err(match (err.retry, err.status) {
                    (false, Some(status)) => RemoteError::Rejected { url: url.clone(), status, body: err.msg },
                    _ => RemoteError::Failed {
                        url: url.clone(),
                        attempts,
                        budget_ms: self.cfg.timeout_ms,
                        last: err.msg,
                    },
                });
            }
            tracing::debug!(attempt = attempts, error = %err.msg, "server attempt failed; retrying");
            let until = Instant::now() + backoff;
            while Instant::now() < until && !cancelled() {
                std::thread::sleep(Duration::from_millis(10).min(until.saturating_duration_since(Instant::now())));
            }
        };
        // A 4xx says our request is wrong, not that the server is down: it does not trip the breaker.
        self.record(result.is_ok() || matches!(result, Err(RemoteError::Rejected { .. })));
        result
    }

    fn body(&self, req: &RemoteRequest, prompt: &Prompt) -> std::result::Result<(&'static str, Value), RemoteError> {
        let p = req.params;
        let blend_model = match (&req.blend, self.cfg.kind, self.cfg.send_blend) {
            (Some((pool_id, weights)), RemoteKind::Vllm, true) => vllm_blend_name(pool_id, weights),
            _ => None,
        };
        let mut body = json!({
            "model": blend_model.as_deref().unwrap_or(self.model_name()),
            "max_tokens": p.max_new_tokens,
            "temperature": p.sampling.temperature,
            "top_p": p.sampling.top_p,
            "stream": false,
        });
        let path = match prompt {
            Prompt::Chat(messages) => {
                body["messages"] =
                    json!(messages.iter().map(|m| json!({"role": m.role, "content": m.content})).collect::<Vec<_>>());
                "/v1/chat/completions"
            }
            Prompt::Text(text) => {
                body["prompt"] = json!(text);
                "/v1/completions"
            }
            Prompt::Tokens(_) => return Err(RemoteError::Unsupported),
        };
        if p.sampling.top_k > 0 {
            body["top_k"] = json!(p.sampling.top_k);
        }
        if let Some(seed) = p.sampling.seed {
            body["seed"] = json!(seed);
        }
        if !p.stop.is_empty() {
            body["stop"] = json!(p.stop);
        }
        if let Some(k) = p.logprobs {
            match req.prompt {
                Prompt::Chat(_) => {
                    body["logprobs"] = json!(true);
                    body["top_logprobs"] = json!(k);
                }
                _ => body["logprobs"] = json!(k),
            }
        }
        if self.cfg.send_blend && self.cfg.kind == RemoteKind::Crayon {
            // A Crayon server answers offloaded requests itself (no second hop).
            let mut ext = json!({"route": {"mode": "device_only"}});
            if let Some((pool_id, weights)) = &req.blend {
                ext["pool_id"] = json!(pool_id);
                ext["weights"] = json!(weights);
            }
            if !p.choices.is_empty() {
                ext["choices"] = json!(p.choices);
                if p.choice_scoring != Default::default() {
                    ext["choice_scoring"] = json!(p.choice_scoring);
                }
            }
            body["crayon"] = ext;
        }
        Ok((path, body))
    }

    /// The request body with a llama.cpp server's adapter scales: the device's normalized blend weights on
    /// the adapters that serve its pool and zero on every other one (a plain request must not get the
    /// adapters a server applies by default), and whether the blend was applied. A server without
    /// adapters for the pool is asked with the exemplar prompt instead, when there is one.
    fn with_lora_scales<'b>(
        &self,
        body: &'b Value,
        req: &RemoteRequest,
        left: Duration,
    ) -> std::result::Result<(std::borrow::Cow<'b, Value>, Option<bool>), AttemptError> {
        let loras = self.lora_listing(left)?;
        let blend = req.blend.as_ref().filter(|_| self.cfg.send_blend);
        let (scales, applied) = lora_scales(&loras, blend.map(|(p, w)| (p.as_str(), w.as_slice())));
        let exemplars = req.exemplars.filter(|_| blend.is_some() && !applied);
        if let (Some((pool_id, _)), false, None) = (blend, applied, exemplars) {
            tracing::warn!(server = %self.base, pool = %pool_id,
                "the llama.cpp server has no full set of adapters for this pool and the device no exemplar bank \
                 for it; asking its plain model");
        }
        let mut body = match exemplars {
            Some(p) => std::borrow::Cow::Owned(
                self.body(req, p).map_err(|e| AttemptError { msg: e.to_string(), retry: false, status: None })?.1,
            ),
            None => std::borrow::Cow::Borrowed(body),
        };
        if scales.is_empty() {
            return Ok((body, Some(applied || exemplars.is_some())));
        }
        body.to_mut()["lora"] =
            json!(scales.iter().map(|(id, scale)| json!({"id": id, "scale": scale})).collect::<Vec<_>>());
        Ok((body, Some(applied || exemplars.is_some())))
    }

    /// `model` for plain requests: `remote.model`, or "default".
    fn model_name(&self) -> &str {
        if self.cfg.model.is_empty() { "default" } else { self.cfg.model.as_str() }
    }

    /// The llama.cpp server's loaded adapters (`GET /lora-adapters`), cached for [`LORA_LISTING_TTL`].
    fn lora_listing(&self, left: Duration) -> std::result::Result<Vec<LoraFile>, AttemptError> {
        if let Some((at, loras)) = self.loras.lock().unwrap_or_else(|p| p.into_inner()).as_ref()
            && at.elapsed() < LORA_LISTING_TTL
        {
            return Ok(loras.clone());
        }
        if left.is_zero() {
            return Err(AttemptError { msg: "no time left".into(), retry: false, status: None });
        }
        let url = format!("{}/lora-adapters", self.base);
        let r = self.agent.get(&url).config().timeout_global(Some(left)).build();
        let text = self.exchange(self.authorized(r).call()).map_err(|mut e| {
            // A server that answers but has no such endpoint is likely not a llama.cpp server.
            let hint = match e.status {
                Some(400..=499) => " (is remote.kind = \"llama-server\" right?)",
                _ => "",
            };
            e.msg = format!("GET /lora-adapters{hint}: {}", e.msg);
            e
        })?;
        let loras = parse_lora_listing(&text)
            .map_err(|m| AttemptError::transient(format!("GET /lora-adapters: malformed listing: {m}")))?;
        *self.loras.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), loras.clone()));
        Ok(loras)
    }

    fn authorized<B>(&self, r: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.token {
            Some(t) => r.header("Authorization", format!("Bearer {t}")),
            None => r,
        }
    }

    /// The body of a 200 answer, read within `remote.max_response_bytes`; anything else is an attempt's
    /// failure, worth retrying unless the server said the request is wrong (4xx other than 429).
    fn exchange(
        &self,
        sent: std::result::Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> std::result::Result<String, AttemptError> {
        let mut resp = sent.map_err(|e| AttemptError::transient(describe(&e)))?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .with_config()
            .limit(self.cfg.max_response_bytes)
            .read_to_string()
            .map_err(|e| AttemptError::transient(format!("reading the body (HTTP {status}): {}", describe(&e))))?;
        if status != 200 {
            let snippet: String = text.chars().take(300).collect();
            let retry = status >= 500 || status == 429;
            let msg = if retry { format!("HTTP {status}: {snippet}") } else { snippet };
            return Err(AttemptError { msg, retry, status: Some(status) });
        }
        Ok(text)
    }

    fn attempt(&self, url: &str, body: &Value, left: Duration) -> std::result::Result<RemoteAnswer, AttemptError> {
        if left.is_zero() {
            return Err(AttemptError { msg: "no time left".into(), retry: false, status: None });
        }
        let r = self.agent.post(url).config().timeout_global(Some(left)).build();
        let text = self.exchange(self.authorized(r).send_json(body))?;
        parse_answer(&text).map_err(|m| AttemptError::transient(format!("malformed response: {m}")))
    }

    fn check_breaker(&self) -> std::result::Result<(), RemoteError> {
        let b = self.breaker.lock().unwrap_or_else(|p| p.into_inner());
        match b.open_until {
            Some(until) if Instant::now() < until => Err(RemoteError::CircuitOpen {
                url: self.base.clone(),
                failures: b.failures,
                retry_in_ms: until.saturating_duration_since(Instant::now()).as_millis() as u64,
            }),
            _ => Ok(()), // closed, or half-open after the cool-down: let this request try
        }
    }

    fn record(&self, ok: bool) {
        let mut b = self.breaker.lock().unwrap_or_else(|p| p.into_inner());
        if ok {
            *b = Breaker::default();
            return;
        }
        b.failures += 1;
        if self.cfg.breaker_failures > 0 && b.failures >= self.cfg.breaker_failures {
            b.open_until = Some(Instant::now() + Duration::from_millis(self.cfg.breaker_cooldown_ms));
            tracing::warn!(server = %self.base, failures = b.failures, "circuit breaker open");
        }
    }

    /// Whether the breaker currently sends everything to the device.
    pub fn breaker_open(&self) -> bool {
        self.check_breaker().is_err()
    }
}

/// Trust only the certificates in `path` (PEM): a server with a private CA.
fn private_ca(path: &std::path::Path) -> Result<ureq::tls::RootCerts> {
    let bad = |msg: String| Error::Config { path: path.to_path_buf(), msg };
    let pem = std::fs::read(path).map_err(|e| bad(format!("remote.ca_file cannot be read: {e}")))?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        match item.map_err(|e| bad(format!("remote.ca_file is not valid PEM: {e}")))? {
            ureq::tls::PemItem::Certificate(c) => certs.push(c),
            _ => continue,
        }
    }
    if certs.is_empty() {
        return Err(bad("remote.ca_file holds no certificate".into()));
    }
    Ok(ureq::tls::RootCerts::new_with_certs(&certs))
}

fn describe(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Timeout(t) => format!("timed out ({t:?})"),
        ureq::Error::ConnectionFailed => "connection refused or failed".into(),
        ureq::Error::BodyExceedsLimit(n) => format!("response larger than {n} bytes"),
        other => other.to_string(),
    }
}

/// `GET /lora-adapters` of a llama.cpp server: `[{"id": 0, "path": "...", "scale": 0.0}, ...]`.
fn parse_lora_listing(body: &str) -> std::result::Result<Vec<LoraFile>, String> {
    #[derive(Deserialize)]
    struct Entry {
        id: i64,
        #[serde(default)]
        path: String,
    }
    let entries: Vec<Entry> = serde_json::from_str(body).map_err(|e| e.to_string())?;
    Ok(entries.into_iter().map(|e| LoraFile { id: e.id, slot: lora_slot(&e.path) }).collect())
}

/// The device pool and index a GGUF adapter's file name declares: `<pool id>.<index>.<adapter>.gguf`
/// (pool ids may hold dots; adapter names may not).
fn lora_slot(path: &str) -> Option<(String, usize)> {
    let name = std::path::Path::new(path).file_name()?.to_str()?.strip_suffix(".gguf")?;
    let mut parts = name.rsplitn(3, '.');
    let (_adapter, index, pool) = (parts.next()?, parts.next()?, parts.next()?);
    if pool.is_empty() || index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((pool.to_string(), index.parse().ok()?))
}

/// A blend as a vLLM model name for Crayon's resolver plugin: `crayon-blend.<pool id>.<weights>`, the
/// weights normalized to sum 1 in 4 hex digits each (`floor(w * 65535 + 0.5)`, as
/// `onnx-export/crayon_pool/vllm_blend.py` writes and reads them). `None` for weights no blend can have.
fn vllm_blend_name(pool_id: &str, weights: &[f32]) -> Option<String> {
    let total: f64 = weights.iter().map(|w| f64::from(*w)).sum();
    let valid_pool = !pool_id.is_empty() && pool_id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !valid_pool || weights.is_empty() || weights.iter().any(|w| !w.is_finite() || *w < 0.0) || total <= 0.0 {
        return None;
    }
    let digits: String =
        weights.iter().map(|w| format!("{:04x}", (f64::from(*w) / total * 65535.0 + 0.5).floor() as u32)).collect();
    Some(format!("crayon-blend.{pool_id}.{digits}"))
}

/// Per-adapter scales for one request: every adapter at 0 except, when `blend` is given and the server
/// holds exactly one adapter for each of its weights, those serving the blend's pool at the weights
/// normalized to sum 1 (a Crayon server merges `Σ w_k/Σw · α_k/r_k · B_k A_k`; llama.cpp applies
/// `scale · α/r · B A` with the adapter's own α). Returns the scales and whether the blend is in them.
fn lora_scales(loras: &[LoraFile], blend: Option<(&str, &[f32])>) -> (Vec<(i64, f32)>, bool) {
    let mut scales: Vec<(i64, f32)> = loras.iter().map(|l| (l.id, 0.0)).collect();
    let Some((pool_id, weights)) = blend else { return (scales, false) };
    let total: f32 = weights.iter().sum();
    if weights.is_empty() || weights.iter().any(|w| !w.is_finite() || *w < 0.0) || !(total > 0.0 && total.is_finite()) {
        return (scales, false);
    }
    let mut by_index = vec![None; weights.len()];
    for (i, l) in loras.iter().enumerate() {
        match &l.slot {
            Some((pool, k)) if pool == pool_id => match by_index.get_mut(*k) {
                Some(slot @ None) => *slot = Some(i),
                _ => return (scales, false), // an index twice, or beyond the weights: not this blend's pool
            },
            _ => {}
        }
    }
    if by_index.iter().any(Option::is_none) {
        return (scales, false);
    }
    for (k, i) in by_index.into_iter().enumerate() {
        if let Some(i) = i {
            scales[i].1 = weights[k] / total;
        }
    }
    (scales, true)
}

#[derive(Deserialize)]
struct Response {
    #[serde(default)]
    model: String,
    choices: Vec<ResponseChoice>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    crayon: Option<ResponseExtension>,
}

#[derive(Deserialize)]
struct ResponseChoice {
    message: Option<ResponseMessage>,
    text: Option<String>,
    finish_reason: Option<String>,
    #[serde(default)]
    logprobs: Option<Value>,
}

/// Log-probabilities in a chat completion's shape (`{"content": [...]}`) or a text completion's
/// (`{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}]}`); empty when absent or odd.
fn parse_logprobs(v: Option<Value>) -> Vec<crate::generate::TokenLogprob> {
    use crate::generate::{TokenLogprob, TopLogprob};
    let Some(v) = v else { return Vec::new() };
    if let Some(content) = v.get("content") {
        return serde_json::from_value(content.clone()).unwrap_or_default();
    }
    let tokens: Vec<String> = serde_json::from_value(v["tokens"].clone()).unwrap_or_default();
    let lps: Vec<Option<f32>> = serde_json::from_value(v["token_logprobs"].clone()).unwrap_or_default();
    let tops: Vec<Option<std::collections::BTreeMap<String, f32>>> =
        serde_json::from_value(v["top_logprobs"].clone()).unwrap_or_default();
    tokens
        .into_iter()
        .zip(lps)
        .enumerate()
        .map(|(i, (token, lp))| {
            let mut top: Vec<TopLogprob> = tops
                .get(i)
                .cloned()
                .flatten()
                .unwrap_or_default()
                .into_iter()
                .map(|(t, logprob)| TopLogprob { bytes: t.clone().into_bytes(), token: t, logprob })
                .collect();
            top.sort_by(|a, b| b.logprob.total_cmp(&a.logprob));
            TokenLogprob {
                bytes: token.clone().into_bytes(),
                token,
                logprob: lp.unwrap_or(f32::NAN),
                top_logprobs: top,
            }
        })
        .collect()
}

#[derive(Deserialize)]
struct ResponseMessage {
    content: Option<String>,
}

#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    prompt_tokens: usize,
    #[serde(default)]
    completion_tokens: usize,
}

#[derive(Deserialize)]
struct ResponseExtension {
    #[serde(default)]
    blend: Option<String>,
    #[serde(default)]
    choice: Option<String>,
    #[serde(default)]
    choice_probs: Vec<f32>,
    #[serde(default)]
    choice_scores: Vec<crate::choices::OptionScore>,
}

/// Parses an OpenAI chat or text completion; anything without an answer string is malformed.
fn parse_answer(body: &str) -> std::result::Result<RemoteAnswer, String> {
    let r: Response = serde_json::from_str(body).map_err(|e| e.to_string())?;
    let first = r.choices.into_iter().next().ok_or("no choices")?;
    let logprobs = parse_logprobs(first.logprobs);
    let text = first.message.and_then(|m| m.content).or(first.text).ok_or("the first choice holds no text")?;
    let finish_reason = match first.finish_reason.as_deref() {
        Some("length") => FinishReason::Length,
        _ => FinishReason::Stop,
    };
    let usage = r.usage.unwrap_or(Usage { prompt_tokens: 0, completion_tokens: 0 });
    let ext = r.crayon;
    Ok(RemoteAnswer {
        text,
        finish_reason,
        model: r.model,
        server_blend: ext.as_ref().is_some_and(|e| e.blend.is_some()),
        choice: ext.as_ref().and_then(|e| e.choice.clone()),
        choice_probs: ext.as_ref().map(|e| e.choice_probs.clone()).unwrap_or_default(),
        choice_scores: ext.map(|e| e.choice_scores).unwrap_or_default(),
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
        logprobs,
        attempts: 0,
    })
}

/// What kind of server a device offloads to, which decides how a customized request's blend travels
/// (`docs/routing.md`).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RemoteKind {
    /// A server `crayond`: the `crayon` extension carries pool id, blend weights and answer options.
    #[default]
    Crayon,
    /// Any OpenAI-compatible server: plain requests, no blend.
    Openai,
    /// llama.cpp's `llama-server` with the server pool loaded as GGUF LoRA adapters
    /// (`scripts/build-llama-server`): the blend travels as per-request adapter scales.
    LlamaServer,
    /// vLLM with Crayon's LoRA resolver plugin (`onnx-export/crayon_pool/vllm_blend.py`): the blend is
    /// named in `model` (`crayon-blend.<pool id>.<weights>`) and materialized on the vLLM host.
    Vllm,
}

/// The server a device offloads to: any OpenAI-compatible `/v1/chat/completions` endpoint; a Crayon
/// server also understands the `crayon` extension (pool id and blend weights), a llama.cpp server
/// per-request LoRA scales.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RemoteConfig {
    /// Base URL, e.g. "https://llm.example.com" or "http://127.0.0.1:8090"; empty: no server.
    pub url: String,
    /// The server's kind: "crayon" (default), "openai", "llama-server" or "vllm".
    pub kind: RemoteKind,
    /// File holding the bearer token (first line); empty: no Authorization header.
    pub token_file: PathBuf,
    /// PEM file of the CA(s) to trust for an https:// server instead of the built-in web roots.
    pub ca_file: PathBuf,
    /// `model` sent to the server; empty: "default".
    pub model: String,
    /// Send the blend for customized requests (as the kind says); off: every request asks the plain model.
    pub send_blend: bool,
    pub connect_timeout_ms: u64,
    /// Hard limit on the whole request, retries included, from connecting to the last byte of the
    /// body (a slow drip ends here); past it the device answers itself.
    pub timeout_ms: u64,
    /// Further attempts after a failed one (connection errors, timeouts, 5xx, bad bodies).
    pub retries: u32,
    pub retry_backoff_ms: u64,
    /// Consecutive failed requests that open the circuit breaker (0: never open).
    pub breaker_failures: u32,
    /// How long an open breaker sends everything to the device before trying the server again.
    pub breaker_cooldown_ms: u64,
    /// Largest response body accepted.
    pub max_response_bytes: u64,
}

impl Default for RemoteConfig {
    fn default() -> Self {
        RemoteConfig {
            url: String::new(),
            kind: RemoteKind::Crayon,
            token_file: PathBuf::new(),
            ca_file: PathBuf::new(),
            model: String::new(),
            send_blend: true,
            connect_timeout_ms: 2000,
            timeout_ms: 60_000,
            retries: 1,
            retry_backoff_ms: 200,
            breaker_failures: 3,
            breaker_cooldown_ms: 30_000,
            max_response_bytes: 4 << 20,
        }
    }
}

impl RemoteConfig {
    /// Checks the section on its own (the config file reports the first problem).
    pub fn validate(&self) -> std::result::Result<(), String> {
        let r = self;
        if !(r.url.is_empty() || r.url.starts_with("http://") || r.url.starts_with("https://")) {
            return Err(format!("remote.url must start with http:// or https://, got '{}'", r.url));
        }
        if r.connect_timeout_ms == 0 || r.timeout_ms == 0 || r.max_response_bytes == 0 {
            return Err("remote.connect_timeout_ms, timeout_ms and max_response_bytes must be positive".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_and_text_answers_parse() {
        let a = parse_answer(r#"{"model":"m","choices":[{"message":{"role":"assistant","content":"hi"},"finish_reason":"length"}],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#).unwrap();
        assert_eq!(
            (a.text.as_str(), a.finish_reason, a.prompt_tokens, a.server_blend),
            ("hi", FinishReason::Length, 3, false)
        );
        let a = parse_answer(
            r#"{"choices":[{"text":" B","finish_reason":"stop"}],"crayon":{"blend":"blend-1","choice":"B"}}"#,
        )
        .unwrap();
        assert_eq!((a.text.as_str(), a.choice.as_deref(), a.server_blend), (" B", Some("B"), true));
    }

    #[test]
    fn text_completion_logprobs_parse_into_the_chat_shape() {
        let a = parse_answer(
            r#"{"choices":[{"text":" blue","finish_reason":"stop","logprobs":{"tokens":[" blue"],
                "token_logprobs":[-0.5],"top_logprobs":[{" red":-2.0," blue":-0.5}],"text_offset":[0]}}]}"#,
        )
        .unwrap();
        assert_eq!(a.logprobs.len(), 1);
        let t = &a.logprobs[0];
        assert_eq!((t.token.as_str(), t.logprob, t.bytes.as_slice()), (" blue", -0.5, " blue".as_bytes()));
        let top: Vec<(&str, f32)> = t.top_logprobs.iter().map(|x| (x.token.as_str(), x.logprob)).collect();
        assert_eq!(top, vec![(" blue", -0.5), (" red", -2.0)], "most likely first");
        let plain = parse_answer(r#"{"choices":[{"text":"x","logprobs":null}]}"#).unwrap();
        assert!(plain.logprobs.is_empty());
    }

    fn listing(names: &[&str]) -> Vec<LoraFile> {
        let body = serde_json::to_string(
            &names.iter().enumerate().map(|(i, p)| json!({"id": i, "path": p, "scale": 1.0})).collect::<Vec<_>>(),
        )
        .unwrap();
        parse_lora_listing(&body).unwrap()
    }

    #[test]
    fn lora_file_names_declare_pool_and_index() {
        let l =
            listing(&["/srv/lora/qwen2.5-k8-ab12.01.c01.gguf", "mine.gguf", "x.y.gguf", "p.1x.c.gguf", "p.7.c.bin"]);
        assert_eq!(l[0].slot, Some(("qwen2.5-k8-ab12".to_string(), 1)));
        assert!(l[1..].iter().all(|f| f.slot.is_none()), "{l:?}");
        for bad in ["", "{}", r#"[{"path":"a.0.c.gguf"}]"#, r#"[{"id":"0"}]"#] {
            assert!(parse_lora_listing(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn blend_weights_become_scales_of_their_pools_adapters_and_everything_else_is_zero() {
        // Two pools' adapters and one of the operator's, in no particular order.
        let l = listing(&["dev.01.c01.gguf", "other.00.c00.gguf", "dev.00.c00.gguf", "own.gguf", "dev.02.c02.gguf"]);
        let (scales, applied) = lora_scales(&l, Some(("dev", &[1.0, 2.0, 1.0])));
        assert!(applied);
        assert_eq!(scales, vec![(0, 0.5), (1, 0.0), (2, 0.25), (3, 0.0), (4, 0.25)]);
        // A plain request: every adapter off, whatever the server applies by default.
        assert_eq!(lora_scales(&l, None), (vec![(0, 0.0), (1, 0.0), (2, 0.0), (3, 0.0), (4, 0.0)], false));
        // Not this server's pool, weights of another length, bad weights: the plain model, flagged.
        for (pool, w) in [("nope", &[1.0f32, 1.0, 1.0][..]), ("dev", &[1.0, 1.0]), ("dev", &[1.0, 1.0, 1.0, 1.0])] {
            let (scales, applied) = lora_scales(&l, Some((pool, w)));
            assert!(!applied && scales.iter().all(|(_, s)| *s == 0.0), "{pool} {w:?}");
        }
        for w in [[0.0f32, 0.0, 0.0], [1.0, -1.0, 1.0], [1.0, f32::NAN, 1.0]] {
            assert!(!lora_scales(&l, Some(("dev", &w))).1, "{w:?}");
        }
        // An index twice: the listing is not one pool's set.
        let twice = listing(&["dev.00.c00.gguf", "dev.00.c00.gguf", "dev.01.c01.gguf"]);
        assert!(!lora_scales(&twice, Some(("dev", &[1.0, 1.0]))).1);
    }

    #[test]
    fn a_vllm_blend_is_named_by_its_pool_and_normalized_weights() {
        assert_eq!(vllm_blend_name("dev-k2.x", &[1.0, 3.0]).as_deref(), Some("crayon-blend.dev-k2.x.4000bfff"));
        assert_eq!(vllm_blend_name("p", &[0.0, 2.0, 0.0]).as_deref(), Some("crayon-blend.p.0000ffff0000"));
        for (pool, w) in
            [("p", &[0.0f32, 0.0][..]), ("p", &[]), ("p", &[1.0, -1.0]), ("p", &[f32::NAN]), ("a/b", &[1.0])]
        {
            assert_eq!(vllm_blend_name(pool, w), None, "{pool} {w:?}");
        }
    }

    proptest::proptest! {
        /// Whatever a server lists and whatever the device's weights: no panic, every listed adapter gets
        /// exactly one finite scale in [0, 1], and either the blend is applied (its pool's scales sum to 1)
        /// or every scale is 0.
        #[test]
        fn lora_scales_are_a_normalized_blend_or_all_zero(
            files in proptest::collection::vec((0usize..3, 0usize..5), 0..8),
            weights in proptest::collection::vec(-0.5f32..2.0, 0..5),
        ) {
            let pools = ["dev", "other", "x.y"];
            let names: Vec<String> = files.iter().map(|(p, i)| format!("/a/{}.{i:02}.c{i}.gguf", pools[*p])).collect();
            let l = listing(&names.iter().map(String::as_str).collect::<Vec<_>>());
            let (scales, applied) = lora_scales(&l, Some(("dev", &weights)));
            proptest::prop_assert_eq!(scales.len(), l.len());
            proptest::prop_assert!(scales.iter().all(|(_, s)| s.is_finite() && (0.0..=1.0).contains(s)));
            let total: f32 = scales.iter().map(|(_, s)| s).sum();
            if applied {
                proptest::prop_assert!((total - 1.0).abs() < 1e-4, "{scales:?}");
            } else {
                proptest::prop_assert_eq!(total, 0.0);
            }
        }

        /// Any bytes as a listing or an answer: parsed or refused, never a panic.
        #[test]
        fn server_replies_of_any_shape_parse_or_are_refused(body in ".{0,200}") {
            let _ = parse_lora_listing(&body);
            let _ = parse_answer(&body);
            let _ = lora_slot(&body);
        }
    }

    #[test]
    fn answers_without_text_are_malformed() {
        for bad in ["", "{", r#"{"choices":[]}"#, r#"{"choices":[{"message":{"content":null}}]}"#, r#"{"error":"x"}"#] {
            assert!(parse_answer(bad).is_err(), "{bad}");
        }
    }
}

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

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Value, json};

use crate::config::RemoteConfig;
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
        Ok(RemoteClient { agent, base, token, cfg: cfg.clone(), breaker: Mutex::new(Breaker::default()) })
    }

    pub fn url(&self) -> &str {
        &self.base
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
        let (path, body) = self.body(req)?;
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
            let err = match self.attempt(&url, &body, left) {
                Ok(mut a) => {
                    a.attempts = attempts;
                    break Ok(a);
                }
                Err(e) => e,
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

    fn body(&self, req: &RemoteRequest) -> std::result::Result<(&'static str, Value), RemoteError> {
        let p = req.params;
        let model = if self.cfg.model.is_empty() { "default" } else { self.cfg.model.as_str() };
        let mut body = json!({
            "model": model,
            "max_tokens": p.max_new_tokens,
            "temperature": p.sampling.temperature,
            "top_p": p.sampling.top_p,
            "stream": false,
        });
        let path = match req.prompt {
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
        if self.cfg.send_blend {
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

    fn attempt(&self, url: &str, body: &Value, left: Duration) -> std::result::Result<RemoteAnswer, AttemptError> {
        if left.is_zero() {
            return Err(AttemptError { msg: "no time left".into(), retry: false, status: None });
        }
        let mut r = self.agent.post(url).config().timeout_global(Some(left)).build();
        if let Some(t) = &self.token {
            r = r.header("Authorization", format!("Bearer {t}"));
        }
        let mut resp = r.send_json(body).map_err(|e| AttemptError::transient(describe(&e)))?;
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

    #[test]
    fn answers_without_text_are_malformed() {
        for bad in ["", "{", r#"{"choices":[]}"#, r#"{"choices":[{"message":{"content":null}}]}"#, r#"{"error":"x"}"#] {
            assert!(parse_answer(bad).is_err(), "{bad}");
        }
    }
}

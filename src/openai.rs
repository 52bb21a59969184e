//! The OpenAI wire format (`/v1/chat/completions`, `/v1/completions`, with the `crayon` extension
//! object of `docs/http.md`), translated to and from the service core's typed [`Request`] and
//! [`Reply`]. HTTP speaks it, and so do the socket protocol's `chat` / `complete` bodies and D-Bus's
//! `Chat` method, so all of them convert here. Known OpenAI fields this server does not implement
//! (tools, response_format, logit_bias, penalties, ...) are refused with a 400 naming the
//! field when set to anything but their no-op value — never silently ignored; other unknown top-level
//! fields (`user`, `metadata`, ...) are ignored, as OpenAI clients send many. Unknown fields *inside*
//! `crayon` are rejected (a typo there changes routing).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::chat::Message;
use crate::choices::{OptionScore, ScoringOverrides};
use crate::context::{ContextOverrides, ContextReport};
use crate::error::{Error, Result};
use crate::generate::{FinishReason, GenerationParams, Prompt, TokenLogprob};
use crate::router::{Answer, Route, RouteOverrides};
use crate::service::{Answered, Endpoint, Reply, Request};

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    #[serde(default)]
    pub model: String,
    pub messages: Vec<ChatMessage>,
    #[serde(flatten)]
    pub common: Common,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    #[serde(default)]
    pub model: String,
    pub prompt: Value,
    #[serde(flatten)]
    pub common: Common,
}

/// Fields shared by both endpoints.
#[derive(Debug, Deserialize)]
pub struct Common {
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    #[serde(default)]
    pub stream: bool,
    pub n: Option<usize>,
    /// Chat: `true` (with `top_logprobs` alternatives); completions: the number of alternatives.
    pub logprobs: Option<Value>,
    pub top_logprobs: Option<usize>,
    pub crayon: Option<Extension>,
    /// Every other top-level field, checked by [`Common::check_unsupported`].
    #[serde(flatten)]
    pub other: serde_json::Map<String, Value>,
}

/// OpenAI request fields that change the answer and that this server does not implement.
const UNSUPPORTED: &[&str] = &[
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "parallel_tool_calls",
    "response_format",
    "logit_bias",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "echo",
    "best_of",
    "suffix",
    "audio",
    "modalities",
    "prediction",
];

/// Whether `value` asks for nothing (so the field can be accepted): null, false, 0, empty, a
/// `response_format` of plain text, a `tool_choice` of none, `best_of` 1.
fn is_noop(field: &str, value: &Value) -> bool {
    match (field, value) {
        (_, Value::Null) | (_, Value::Bool(false)) => true,
        (_, Value::Array(a)) => a.is_empty(),
        ("response_format", Value::Object(o)) => o.get("type").and_then(Value::as_str) == Some("text") && o.len() == 1,
        (_, Value::Object(o)) => o.is_empty(),
        ("tool_choice", Value::String(s)) => s == "none",
        ("best_of", Value::Number(n)) => n.as_f64() == Some(1.0),
        (_, Value::Number(n)) => n.as_f64() == Some(0.0),
        _ => false,
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    /// A string, or an array of content parts of which only `{"type": "text"}` ones are supported.
    pub content: Value,
}

/// The `crayon` request extension.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Extension {
    /// Customized adapter to answer with (alternative: its name as `model`).
    pub adapter: Option<String>,
    /// A device's pool id and blend weights (a server blends its own paired pool with them).
    pub pool_id: Option<String>,
    pub weights: Option<Vec<f32>>,
    /// Options of a choice question, scored by likelihood (see docs/routing.md).
    #[serde(default)]
    pub choices: Vec<String>,
    /// Overrides of `[choices]` scoring: `{"normalization": "sum"|"mean"|"bytes", "calibration":
    /// "none"|"content_free", "confidence": "consensus"|"margin"}`.
    #[serde(default)]
    pub choice_scoring: ScoringOverrides,
    pub route: Option<RouteOverrides>,
    /// Overrides of `[context]` for long inputs: `{"policy": "refuse"|"truncate"|"window"|"infinipot",
    /// "pot_tokens": N, "keep_tokens": N, "nuc_share": x}` (docs/long-context.md).
    #[serde(default)]
    pub context: ContextOverrides,
}

impl ChatMessage {
    pub fn text(&self, i: usize) -> Result<String, String> {
        match &self.content {
            Value::String(s) => Ok(s.clone()),
            Value::Array(parts) => parts
                .iter()
                .map(|p| match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => Ok(t),
                    _ => Err(format!("messages[{i}].content: only text parts are supported")),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(|v| v.concat()),
            _ => Err(format!("messages[{i}].content must be a string or an array of text parts")),
        }
    }
}

impl ChatRequest {
    pub fn prompt(&self) -> Result<Prompt, String> {
        if self.messages.is_empty() {
            return Err("messages must not be empty".into());
        }
        let mut out = Vec::with_capacity(self.messages.len());
        for (i, m) in self.messages.iter().enumerate() {
            if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "developer") {
                return Err(format!("messages[{i}].role '{}' is not supported", m.role));
            }
            let role = if m.role == "developer" { "system" } else { m.role.as_str() };
            out.push(Message::new(role, m.text(i)?));
        }
        Ok(Prompt::Chat(out))
    }
}

impl CompletionRequest {
    /// The prompts: a string, an array of token ids, or an array of several of either (OpenAI's
    /// batch form: every prompt gets its answers, in order).
    pub fn prompts(&self) -> Result<Vec<Prompt>, String> {
        let shape = "prompt must be a string, an array of token ids, or an array of strings or of token-id arrays";
        let tokens = |a: &[Value]| -> Result<Prompt, String> {
            let ids: Option<Vec<u32>> = a.iter().map(|v| v.as_u64().and_then(|x| u32::try_from(x).ok())).collect();
            ids.map(Prompt::Tokens).ok_or_else(|| "prompt token ids must fit in 32 bits".into())
        };
        match &self.prompt {
            Value::String(s) => Ok(vec![Prompt::Text(s.clone())]),
            Value::Array(a) if !a.is_empty() && a.iter().all(Value::is_u64) => Ok(vec![tokens(a)?]),
            Value::Array(a) if !a.is_empty() => a
                .iter()
                .map(|p| match p {
                    Value::String(s) => Ok(Prompt::Text(s.clone())),
                    Value::Array(ids) if !ids.is_empty() && ids.iter().all(Value::is_u64) => tokens(ids),
                    _ => Err(shape.to_string()),
                })
                .collect(),
            _ => Err(shape.into()),
        }
    }
}

impl Common {
    /// How many alternatives per token `logprobs` asks for: chat's `logprobs: true` + `top_logprobs`,
    /// or completions' `logprobs: k`; `None` when not asked.
    fn logprobs(&self) -> Result<Option<usize>, String> {
        let max = crate::generate::MAX_TOP_LOGPROBS;
        let k = match &self.logprobs {
            None | Some(Value::Null) | Some(Value::Bool(false)) => {
                if self.top_logprobs.is_some_and(|k| k > 0) {
                    return Err("'top_logprobs' needs 'logprobs': true".into());
                }
                return Ok(None);
            }
            Some(Value::Bool(true)) => self.top_logprobs.unwrap_or(0),
            Some(Value::Number(n)) => match n.as_u64() {
                Some(k) => usize::try_from(k).unwrap_or(usize::MAX),
                None => return Err("'logprobs' must be true/false or a count of alternatives".into()),
            },
            Some(_) => return Err("'logprobs' must be true/false or a count of alternatives".into()),
        };
        if k > max {
            return Err(format!("at most {max} log-probability alternatives per token, got {k}"));
        }
        Ok(Some(k))
    }

    /// A 400's message for the first field of [`UNSUPPORTED`] the request sets to something.
    pub fn check_unsupported(&self) -> Result<(), String> {
        match UNSUPPORTED.iter().find(|f| self.other.get(**f).is_some_and(|v| !is_noop(f, v))) {
            Some(f) => Err(format!("'{f}' is not supported by this server (docs/http.md)")),
            None => Ok(()),
        }
    }

    /// The request's values over `p` (the service's defaults); the service checks the result.
    pub fn apply(&self, p: &mut GenerationParams) -> std::result::Result<(), String> {
        self.check_unsupported()?;
        if let Some(m) = self.max_completion_tokens.or(self.max_tokens) {
            p.max_new_tokens = m;
        }
        if let Some(t) = self.temperature {
            p.sampling.temperature = t;
        }
        if let Some(t) = self.top_p {
            p.sampling.top_p = t;
        }
        if let Some(k) = self.top_k {
            p.sampling.top_k = k;
        }
        if self.seed.is_some() {
            p.sampling.seed = self.seed;
        }
        match &self.stop {
            Some(Stop::One(s)) => p.stop = vec![s.clone()],
            Some(Stop::Many(v)) => p.stop = v.clone(),
            None => {}
        }
        if let Some(ext) = &self.crayon {
            p.choices = ext.choices.clone();
            p.choice_scoring = ext.choice_scoring;
            p.context = ext.context;
            p.adapter = ext.adapter.clone();
        }
        p.logprobs = self.logprobs()?;
        if p.logprobs.is_some_and(|k| k > 0) && !p.choices.is_empty() {
            return Err("'top_logprobs' with crayon.choices is not supported: options are scored, not sampled".into());
        }
        Ok(())
    }
}

/// Where an OpenAI body comes from: the bytes of an HTTP body, or a JSON value (a socket frame's
/// `body`, D-Bus's `Chat` argument).
pub enum Body<'a> {
    Bytes(&'a [u8]),
    Json(Value),
}

impl Body<'_> {
    fn decode<T: DeserializeOwned>(self) -> std::result::Result<T, String> {
        let r = match self {
            Body::Bytes(b) => serde_json::from_slice(b),
            Body::Json(v) => serde_json::from_value(v),
        };
        r.map_err(|e| format!("malformed JSON body: {e}"))
    }
}

/// An OpenAI request body of `endpoint`'s kind as the service's typed [`Request`], over `defaults`
/// ([`crate::service::Service::defaults`]), and whether it asks to be streamed. The service checks
/// the rest (limits, model, blend rules) when it answers.
pub fn parse_request(endpoint: Endpoint, body: Body, defaults: GenerationParams) -> Result<(Request, bool)> {
    parse(endpoint, body, defaults).map_err(Error::InvalidRequest)
}

fn parse(endpoint: Endpoint, body: Body, defaults: GenerationParams) -> std::result::Result<(Request, bool), String> {
    let (model, prompts, common): (String, Vec<Prompt>, Common) = match endpoint {
        Endpoint::Chat => {
            let r: ChatRequest = body.decode()?;
            let p = r.prompt()?;
            (r.model, vec![p], r.common)
        }
        Endpoint::Completion => {
            let r: CompletionRequest = body.decode()?;
            let p = r.prompts()?;
            (r.model, p, r.common)
        }
    };
    let mut params = defaults;
    common.apply(&mut params)?;
    let ext = common.crayon.unwrap_or_default();
    let blend = match (ext.pool_id, ext.weights) {
        (Some(p), Some(w)) => Some((p, w)),
        (None, None) => None,
        _ => return Err("crayon.pool_id and crayon.weights go together".into()),
    };
    let request = Request {
        endpoint,
        prompts,
        params,
        model,
        n: common.n.unwrap_or(1),
        overrides: ext.route.unwrap_or_default(),
        blend,
    };
    Ok((request, common.stream))
}

/// `choices[].logprobs` in the endpoint's OpenAI shape: chat's `{"content": [...]}`, or the legacy
/// completions object (`tokens`, `token_logprobs`, `top_logprobs` as token → logprob maps,
/// `text_offset`).
pub fn logprobs_json(chat: bool, lps: &[TokenLogprob]) -> Value {
    if chat {
        return json!({"content": lps, "refusal": null});
    }
    let mut offset = 0;
    let mut offsets = Vec::with_capacity(lps.len());
    for t in lps {
        offsets.push(offset);
        offset += t.token.len();
    }
    let top: Vec<serde_json::Map<String, Value>> =
        lps.iter().map(|t| t.top_logprobs.iter().map(|a| (a.token.clone(), json!(a.logprob))).collect()).collect();
    json!({
        "tokens": lps.iter().map(|t| &t.token).collect::<Vec<_>>(),
        "token_logprobs": lps.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": top,
        "text_offset": offsets,
    })
}

pub fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Length => "length",
        _ => "stop",
    }
}

/// The `crayon` object of a response: route, scores, thresholds, latencies and (for choice questions)
/// the chosen option.
#[derive(Serialize)]
pub struct ResponseExtension<'a> {
    #[serde(flatten)]
    pub route: &'a Route,
    pub adapter: Option<&'a str>,
    /// Set when the answer used a blend sent by a device (`pool_id` + `weights`).
    pub blend: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blend_error: Option<&'a str>,
    pub choice: Option<&'a str>,
    #[serde(skip_serializing_if = "<[f32]>::is_empty")]
    pub choice_probs: &'a [f32],
    /// Every option's log-likelihood and score (see `crate::choices`).
    #[serde(skip_serializing_if = "<[OptionScore]>::is_empty")]
    pub choice_scores: &'a [OptionScore],
    /// What the context policy did to a long input (device answers under a policy other than refuse).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<ContextReport>,
}

pub fn usage(a: &Answer) -> Value {
    json!({
        "prompt_tokens": a.prompt_tokens,
        "completion_tokens": a.completion_tokens,
        "total_tokens": a.prompt_tokens.saturating_add(a.completion_tokens),
    })
}

/// An OpenAI error body.
pub fn error_body(message: &str, kind: &str, code: Option<&str>) -> Value {
    json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
}

/// The `crayon` object of one answer.
pub fn extension(d: &Answered) -> Value {
    let a = &d.answer;
    serde_json::to_value(ResponseExtension {
        route: &a.route,
        adapter: d.adapter.as_deref(),
        blend: d.blend.as_deref(),
        blend_error: d.blend_error.as_deref(),
        choice: a.choice.as_deref(),
        choice_probs: &a.choice_probs,
        choice_scores: &a.choice_scores,
        context: a.context,
    })
    .unwrap_or(Value::Null)
}

/// The OpenAI response for every answer of a request (`choices[i]`); usage counts each prompt once and
/// every answer's tokens; the `crayon` object describes the first answer (each answer's own route is
/// in `crayon.choices_routes` when there are several).
pub fn full_response(reply: &Reply) -> Value {
    let (endpoint, all) = (reply.endpoint, &reply.answers);
    let choices: Vec<Value> = all
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let a = &d.answer;
            let finish = finish_reason(a.finish_reason);
            let logprobs = match a.logprobs.is_empty() {
                true => Value::Null,
                false => logprobs_json(endpoint == Endpoint::Chat, &a.logprobs),
            };
            match endpoint {
                Endpoint::Chat => json!({"index": i, "message": {"role": "assistant", "content": a.text},
                                         "finish_reason": finish, "logprobs": logprobs}),
                Endpoint::Completion => {
                    json!({"index": i, "text": a.text, "finish_reason": finish, "logprobs": logprobs})
                }
            }
        })
        .collect();
    let Some(first) = all.first() else {
        return error_body("no answer", "server_error", None);
    };
    let mut usage = usage(&first.answer);
    if all.len() > 1 {
        // Each prompt counts once, however many answers it got.
        let prompt: usize = all.iter().step_by(reply.n.max(1)).map(|d| d.answer.prompt_tokens).sum();
        let completion: usize = all.iter().map(|d| d.answer.completion_tokens).sum();
        usage["prompt_tokens"] = json!(prompt);
        usage["completion_tokens"] = json!(completion);
        usage["total_tokens"] = json!(prompt.saturating_add(completion));
    }
    let mut ext = extension(first);
    if all.len() > 1 {
        ext["choices_routes"] = json!(all.iter().map(extension).collect::<Vec<_>>());
    }
    json!({
        "id": completion_id(),
        "object": if endpoint == Endpoint::Chat { "chat.completion" } else { "text_completion" },
        "created": now_unix(),
        "model": reply.model,
        "choices": choices,
        "usage": usage,
        "crayon": ext,
    })
}

/// One server-sent event of a streamed response.
pub fn chunk(
    endpoint: Endpoint,
    id: &str,
    created: u64,
    model: &str,
    text: Option<&str>,
    finish: Option<&str>,
    first: bool,
) -> Value {
    let choice = match endpoint {
        Endpoint::Chat => {
            let mut delta = json!({});
            if first {
                delta["role"] = json!("assistant");
            }
            if let Some(t) = text {
                delta["content"] = json!(t);
            }
            json!({"index": 0, "delta": delta, "finish_reason": finish})
        }
        Endpoint::Completion => json!({"index": 0, "text": text.unwrap_or(""), "finish_reason": finish}),
    };
    json!({
        "id": id,
        "object": if endpoint == Endpoint::Chat { "chat.completion.chunk" } else { "text_completion" },
        "created": created,
        "model": model,
        "choices": [choice],
    })
}

pub fn completion_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("crayon-{:x}-{}", now_unix(), NEXT.fetch_add(1, Ordering::Relaxed))
}

pub fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

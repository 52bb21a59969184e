//! OpenAI-compatible request and response bodies (`/v1/chat/completions`, `/v1/completions`), plus
//! the `crayon` extension object (`docs/http.md`). Known OpenAI fields this server does not implement
//! (tools, response_format, logit_bias, penalties, ...) are refused with a 400 naming the
//! field when set to anything but their no-op value — never silently ignored; other unknown top-level
//! fields (`user`, `metadata`, ...) are ignored, as OpenAI clients send many. Unknown fields *inside*
//! `crayon` are rejected (a typo there changes routing).

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::chat::Message;
use crate::choices::{OptionScore, ScoringOverrides};
use crate::context::{ContextOverrides, ContextReport};
use crate::generate::{FinishReason, GenerationParams, Prompt, TokenLogprob};
use crate::router::{Answer, Route, RouteOverrides};

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
    /// How many answers the request asks for (`n`), within `max_n` (`server.max_n`).
    /// Answers per prompt (`n`) for `prompts` prompts: all of them together within `max_n`
    /// (`server.max_n`), bounding the work one request can ask for.
    pub fn n(&self, prompts: usize, max_n: usize) -> Result<usize, String> {
        let n = self.n.unwrap_or(1);
        let answers = n.saturating_mul(prompts);
        match n {
            0 => Err("n must be at least 1".into()),
            _ if answers > max_n && prompts > 1 => {
                Err(format!("{prompts} prompts x n = {n} is {answers} answers; the limit is {max_n} (server.max_n)"))
            }
            _ if answers > max_n => Err(format!("n = {n} is over the limit of {max_n} (server.max_n)")),
            n => Ok(n),
        }
    }

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

    /// Generation parameters: the request's values over the config defaults, within `max_tokens_limit`.
    pub fn params(&self, defaults: GenerationParams, max_tokens_limit: usize) -> Result<GenerationParams, String> {
        self.check_unsupported()?;
        let mut p = defaults;
        if let Some(m) = self.max_completion_tokens.or(self.max_tokens) {
            if m == 0 {
                return Err("max_tokens must be at least 1".into());
            }
            p.max_new_tokens = m; // capped below, as OpenAI clients often ask for more than any model has
        }
        p.max_new_tokens = p.max_new_tokens.min(max_tokens_limit);
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
            Some(Stop::Many(v)) if v.len() > 16 => return Err("at most 16 stop strings".into()),
            Some(Stop::Many(v)) => p.stop = v.clone(),
            None => {}
        }
        if let Some(ext) = &self.crayon {
            p.choices = ext.choices.clone();
            p.choice_scoring = ext.choice_scoring;
            p.context = ext.context;
        }
        p.logprobs = self.logprobs()?;
        if p.logprobs.is_some_and(|k| k > 0) && !p.choices.is_empty() {
            return Err("'top_logprobs' with crayon.choices is not supported: options are scored, not sampled".into());
        }
        Ok(p)
    }
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

//! The typed requests and replies of the service core, whichever interface they came through.

use crate::generate::{GenerationParams, Prompt};
use crate::router::{Answer, RouteOverrides};

/// Which kind of generation: a chat (messages through the model's chat template) or a text
/// completion (the prompt as raw text).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Endpoint {
    Chat,
    Completion,
}

/// A generation request. Interfaces build it from their wire format, starting from
/// [`super::Service::defaults`]; the service checks it ([`super::Service::admit`]) before any work.
#[derive(Clone)]
pub struct Request {
    pub endpoint: Endpoint,
    /// One prompt, or several (a batch of completions), answered in order.
    pub prompts: Vec<Prompt>,
    pub params: GenerationParams,
    /// The model asked for by name: empty, `"default"` or the base model's id mean the base model;
    /// any other name is a customized adapter (unless `params.adapter` names one).
    pub model: String,
    /// Answers per prompt (OpenAI `n`), generated one after another.
    pub n: usize,
    pub overrides: RouteOverrides,
    /// A device's pool id and blend weights (served only by a server crayond).
    pub blend: Option<(String, Vec<f32>)>,
}

impl Request {
    /// One prompt, once, with `params`.
    pub fn new(endpoint: Endpoint, prompt: Prompt, params: GenerationParams) -> Request {
        Request {
            endpoint,
            prompts: vec![prompt],
            params,
            model: String::new(),
            n: 1,
            overrides: RouteOverrides::default(),
            blend: None,
        }
    }
}

/// One answer, with what it was answered with.
pub struct Answered {
    pub answer: Answer,
    /// The customized adapter that answered (`None`: the base model or a device's blend).
    pub adapter: Option<String>,
    /// A device's blend as applied here (the merged blend's name or the exemplar set's label).
    pub blend: Option<String>,
    /// Why a device's blend could not be applied (the plain model answered instead).
    pub blend_error: Option<String>,
}

/// Every answer of a request: `n` per prompt, in order.
pub struct Reply {
    pub endpoint: Endpoint,
    /// The model id the answers are named by (the base model's id, or the adapter asked for).
    pub model: String,
    pub n: usize,
    pub answers: Vec<Answered>,
}

impl Reply {
    /// The first answer (a request always has one when it succeeded).
    pub fn first(&self) -> Option<&Answered> {
        self.answers.first()
    }
}

/// A customization request: `{"name", "examples", "calibrate", "choices"}` on every interface.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomizeRequest {
    pub name: String,
    pub examples: Vec<crate::adapters::Example>,
    /// Also calibrate the routing thresholds from the examples (runs the customized model on them).
    #[serde(default)]
    pub calibrate: bool,
    #[serde(default)]
    pub choices: Vec<String>,
}

impl CustomizeRequest {
    /// From the JSON object an interface received (HTTP body, socket frame).
    pub fn from_json(v: serde_json::Value) -> crate::Result<CustomizeRequest> {
        serde_json::from_value(v).map_err(|e| crate::Error::InvalidRequest(format!("malformed customize request: {e}")))
    }
}

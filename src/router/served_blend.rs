//! A device's blend served here: a server crayond answers a request that carries a device's pool id
//! and blend weights (`crayon.pool_id` + `weights`) with its own paired pool blended by them — or,
//! when it cannot merge that blend, with exemplars of the blend's clusters in front of the question,
//! or failing both with the plain model, flagged. Never routed on: no second hop.

use std::ops::ControlFlow;
use std::time::Instant;

use super::{Answer, Latency, Route, confidence, ms};
use crate::error::Result;
use crate::generate::{CancelToken, GenerationParams, Prompt};
use crate::queue::EngineQueue;

/// The answer to a device's blend, and how the blend was applied.
pub struct ServedBlend {
    pub answer: Answer,
    /// The merged blend's name, or the exemplar set's label; `None` when the plain model answered.
    pub applied: Option<String>,
    /// Why the blend could not be applied (the plain model answered instead).
    pub error: Option<String>,
}

/// Answers `prompt` with the device's blend (`pool_id`, `weights`), holding the engine throughout so
/// that no other request evicts the blend between making it ready and generating with it.
#[allow(clippy::too_many_arguments)]
pub fn answer_served_blend(
    queue: &EngineQueue,
    client: &str,
    pool_id: &str,
    weights: &[f32],
    prompt: &Prompt,
    params: &GenerationParams,
    cancel: &CancelToken,
    on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
) -> Result<ServedBlend> {
    let t0 = Instant::now();
    let mut engine = queue.lock(client, cancel)?;
    let queue_ms = ms(t0.elapsed());
    let t_route = Instant::now();
    // A blend this server cannot merge may still be served from its exemplar bank for that pool; one
    // it cannot apply at all (no pool, another pool, bad weights) still gets an answer from the plain
    // model, flagged, rather than an error: the device asked for help.
    let mut params = params.clone();
    params.adapter = None;
    let mut exemplar_prompt = None;
    let (applied, error) = match engine.prepare_blend(pool_id, weights) {
        Ok(n) => {
            params.adapter = Some(n.clone());
            (Some(n), None)
        }
        Err(e) => match engine.exemplar_prompt(pool_id, weights, prompt) {
            Some(Ok((p, label))) => {
                exemplar_prompt = Some(p);
                (Some(label), None)
            }
            other => {
                let msg = match other {
                    Some(Err(x)) => x.to_string(),
                    _ => e.to_string(),
                };
                tracing::warn!(error = %msg, "blend not applied; answering with the plain model");
                (None, Some(msg))
            }
        },
    };
    let routing_ms = ms(t_route.elapsed());
    let t1 = Instant::now();
    let g = engine.generate(exemplar_prompt.as_ref().unwrap_or(prompt), &params, cancel, on_text)?;
    let local_ms = ms(t1.elapsed());
    let latency = Latency { queue_ms, routing_ms, local_ms, remote_ms: 0.0, total_ms: ms(t0.elapsed()) };
    let route = Route::device_only(confidence(&g), latency);
    let answer = Answer::from_device(g, &params.choices, route);
    Ok(ServedBlend { answer, applied, error })
}

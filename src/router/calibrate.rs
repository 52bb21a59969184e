//! Calibration of an adapter's routing thresholds from its examples (customize with `calibrate`):
//! the scope below which a question is out of the adapter's task, and the device confidence below
//! which its answer is likely wrong.

use std::ops::ControlFlow;

use serde::Serialize;

use super::{best_choice, confidence, scope};
use crate::adapters::Example;
use crate::config::Thresholds;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::generate::{CancelToken, Prompt};

/// Thresholds calibrated from an adapter's examples, with what they were derived from.
#[derive(Debug, Clone, Serialize)]
pub struct Calibration {
    pub thresholds: Thresholds,
    /// Leave-one-out scope of each example (its nearest *other* example).
    pub example_scopes: Vec<f32>,
    /// Device confidence on each example, and whether the customized model answered it right.
    pub example_confidence: Vec<(f32, bool)>,
}

/// Margin below the lowest leave-one-out scope of the examples that still counts as in scope.
pub const SCOPE_TOLERANCE: f32 = 0.05;

/// Calibrates the routing thresholds of adapter `name` from its examples (the app has them; the
/// service keeps only their embeddings): `min_scope` is the lowest leave-one-out scope minus
/// [`SCOPE_TOLERANCE`]; the confidence threshold (margin with `choices`, token probability without)
/// is the one that best separates the examples the customized model answers right from those it
/// answers wrong ([`split_threshold`]). The other confidence threshold keeps the configured value.
pub fn calibrate(
    engine: &mut Engine,
    base: Thresholds,
    name: &str,
    examples: &[Example],
    choices: &[String],
    cancel: &CancelToken,
) -> Result<Calibration> {
    check_calibration(examples, choices)?;
    let c = engine.adapter(name)?.clone();
    let mut embs = Vec::with_capacity(examples.len());
    for e in examples {
        embs.extend(engine.task_embedding(&e.input)?);
    }
    let example_scopes: Vec<f32> = (0..embs.len())
        .filter_map(|i| {
            let others: Vec<Vec<f32>> =
                embs.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, e)| e.clone()).collect();
            scope(&embs[i], &others)
        })
        .collect();
    let mut thresholds = base;
    if let Some(min) = example_scopes.iter().copied().reduce(f32::min) {
        thresholds.min_scope = (min - SCOPE_TOLERANCE).clamp(-1.0, 1.0);
    }
    let mut example_confidence = Vec::with_capacity(examples.len());
    for e in examples {
        let mut params = engine.default_params();
        params.adapter = Some(c.name.clone());
        params.choices = choices.to_vec();
        params.sampling = Default::default();
        params.max_new_tokens = (engine.tokenizer().encode(&e.output)?.len() + 2).min(64);
        let g = engine.generate(&Prompt::Text(e.input.clone()), &params, cancel, &mut |_| ControlFlow::Continue(()))?;
        if cancel.is_cancelled() {
            return Err(Error::Cancelled);
        }
        let Some(conf) = confidence(&g) else { continue };
        let right = match best_choice(choices, &g.choice_probs) {
            Some(choice) => choice.eq_ignore_ascii_case(e.output.trim()),
            None => g.text.trim().to_lowercase().starts_with(&e.output.trim().to_lowercase()),
        };
        example_confidence.push((conf.value, right));
    }
    let t = split_threshold(&example_confidence);
    if choices.is_empty() {
        thresholds.min_token_prob = t;
    } else {
        thresholds.min_choice_confidence = t;
    }
    engine.set_calibration(name, thresholds)?;
    Ok(Calibration { thresholds, example_scopes, example_confidence })
}

/// Checks calibration inputs (before customizing, so that a bad request changes nothing).
pub fn check_calibration(examples: &[Example], choices: &[String]) -> Result<()> {
    if examples.is_empty() {
        return Err(Error::InvalidRequest("calibration needs the adapter's examples".into()));
    }
    if let Some(i) = examples.iter().position(|e| e.output.trim().is_empty()) {
        return Err(Error::InvalidRequest(format!(
            "calibration needs an output for every example (example {})",
            i + 1
        )));
    }
    crate::choices::validate(choices)
}

/// The threshold in [0, 1] with the fewest examples on the wrong side (right answers must reach
/// it, wrong ones fall below), placed in the middle of the widest such gap. All right: half the
/// lowest confidence; all wrong: halfway from the highest to 1.
pub fn split_threshold(points: &[(f32, bool)]) -> f32 {
    let mut cuts: Vec<f32> = points.iter().map(|p| p.0.clamp(0.0, 1.0)).collect();
    cuts.extend([0.0, 1.0]);
    cuts.sort_by(f32::total_cmp);
    cuts.dedup();
    let errors = |t: f32| points.iter().filter(|(v, right)| (*v >= t) != *right).count();
    let mut best = (usize::MAX, 0.0f32, 0.5f32); // (errors, -gap width, threshold)
    for w in cuts.windows(2) {
        // Any t in (lo, hi] classifies the same; take the middle.
        let (lo, hi) = (w[0], w[1]);
        let t = (lo + hi) / 2.0;
        let e = errors(t);
        if e < best.0 || (e == best.0 && hi - lo > -best.1) {
            best = (e, -(hi - lo), t);
        }
    }
    best.2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_threshold_separates_right_from_wrong() {
        let t = split_threshold(&[(0.9, true), (0.7, true), (0.3, false), (0.1, false)]);
        assert!((t - 0.5).abs() < 1e-6, "{t}");
        let all_right = split_threshold(&[(0.8, true), (0.6, true)]);
        assert!((all_right - 0.3).abs() < 1e-6, "{all_right}");
        let all_wrong = split_threshold(&[(0.2, false), (0.4, false)]);
        assert!((all_wrong - 0.7).abs() < 1e-6, "{all_wrong}");
        // One right answer below a wrong one: one error is unavoidable.
        let mixed = split_threshold(&[(0.2, true), (0.5, false), (0.9, true)]);
        let errs = [(0.2, true), (0.5, false), (0.9, true)].iter().filter(|(v, r)| (*v >= mixed) != *r).count();
        assert_eq!(errs, 1, "{mixed}");
    }
}

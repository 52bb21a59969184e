//! A server's stand-in for a device pool it cannot merge: the pool's clusters as public *exemplars*.
//!
//! A device offloading a customized question sends its pool id and blend weights, never its examples.
//! A server with a pool trained on the same clusters merges those weights into its own model
//! (`Engine::prepare_blend`); a server without one can still use the weights: it holds a copy of
//! each cluster's public training examples (`crayon_pool exemplars`, written next to the device pool
//! as `exemplars.json`) and puts a few of them in front of the question, drawn in proportion to the
//! weights — few-shot prompting steered by the blend. Configured with `[pool] exemplars`.

use std::path::Path;

use serde::Deserialize;

use crate::adapters::Example;
use crate::chat::Message;
use crate::error::{Error, Result};
use crate::generate::Prompt;

/// Exemplars per offloaded question (the classic few-shot count).
pub const EXEMPLARS_PER_QUESTION: usize = 5;
/// Upper bound on the bank file, read whole at start.
const MAX_BANK_BYTES: u64 = 16 << 20;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BankFile {
    format: String,
    pool_id: String,
    adapters: Vec<String>,
    clusters: Vec<Vec<Example>>,
}

/// Each cluster's exemplars, in the order of the device pool's adapters.
#[derive(Debug)]
pub struct ExemplarBank {
    pub pool_id: String,
    clusters: Vec<Vec<Example>>,
}

impl ExemplarBank {
    pub fn load(path: &Path) -> Result<ExemplarBank> {
        let bad = |msg: String| Error::Config { path: path.to_path_buf(), msg };
        let size = std::fs::metadata(path).map_err(|e| bad(format!("cannot read the exemplar bank: {e}")))?.len();
        if size > MAX_BANK_BYTES {
            return Err(bad(format!("the exemplar bank is {size} bytes; at most {MAX_BANK_BYTES}")));
        }
        let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read the exemplar bank: {e}")))?;
        let file: BankFile = serde_json::from_str(&text).map_err(|e| bad(format!("not an exemplar bank: {e}")))?;
        if file.format != "crayon-exemplars/1" {
            return Err(bad(format!("unknown exemplar bank format '{}'", file.format)));
        }
        if file.adapters.len() != file.clusters.len() || file.clusters.iter().all(Vec::is_empty) {
            return Err(bad(format!(
                "{} adapters but {} clusters, or no exemplars at all",
                file.adapters.len(),
                file.clusters.len()
            )));
        }
        Ok(ExemplarBank { pool_id: file.pool_id, clusters: file.clusters })
    }

    /// `count` exemplars for a blend: each cluster gets its share of `count` by largest remainder of
    /// `weights` (clusters without exemplars pass their share on), the heaviest cluster's first.
    pub fn pick(&self, weights: &[f32], count: usize) -> Result<Vec<&Example>> {
        if weights.len() != self.clusters.len() {
            return Err(Error::InvalidRequest(format!(
                "{} blend weights for an exemplar bank of {} clusters",
                weights.len(),
                self.clusters.len()
            )));
        }
        if weights.iter().any(|w| !w.is_finite() || *w < 0.0) || weights.iter().sum::<f32>() <= 0.0 {
            return Err(Error::InvalidRequest("blend weights must be finite, non-negative, and not all zero".into()));
        }
        let usable: Vec<f64> =
            weights.iter().zip(&self.clusters).map(|(&w, c)| if c.is_empty() { 0.0 } else { f64::from(w) }).collect();
        let total: f64 = usable.iter().sum();
        if total <= 0.0 {
            return Ok(Vec::new());
        }
        let quotas: Vec<f64> = usable.iter().map(|w| w / total * count as f64).collect();
        let mut counts: Vec<usize> = quotas.iter().map(|q| q.floor() as usize).collect();
        let mut order: Vec<usize> = (0..quotas.len()).collect();
        order.sort_by(|&a, &b| (quotas[b] - quotas[b].floor()).total_cmp(&(quotas[a] - quotas[a].floor())));
        let mut left = count.saturating_sub(counts.iter().sum());
        for &i in order.iter().filter(|&&i| usable[i] > 0.0) {
            if left == 0 {
                break;
            }
            counts[i] += 1;
            left -= 1;
        }
        let mut by_weight: Vec<usize> = (0..counts.len()).collect();
        by_weight.sort_by(|&a, &b| usable[b].total_cmp(&usable[a]));
        Ok(by_weight.into_iter().flat_map(|i| self.clusters[i].iter().cycle().take(counts[i])).collect())
    }
}

/// `prompt` with `exemplars` in front: for text, each as "input output" and a blank line; for chat,
/// as user/assistant turns after any system message.
pub fn with_exemplars(prompt: &Prompt, exemplars: &[&Example]) -> Prompt {
    match prompt {
        Prompt::Text(text) => {
            let prefix: String = exemplars.iter().map(|e| format!("{}{}\n\n", e.input, e.output)).collect();
            Prompt::Text(format!("{prefix}{text}"))
        }
        Prompt::Chat(messages) => {
            let system = messages.iter().take_while(|m| m.role == "system").count();
            let mut out: Vec<Message> = messages[..system].to_vec();
            for e in exemplars {
                out.push(Message::new("user", e.input.trim()));
                out.push(Message::new("assistant", e.output.trim()));
            }
            out.extend_from_slice(&messages[system..]);
            Prompt::Chat(out)
        }
        Prompt::Tokens(_) => prompt.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bank(sizes: &[usize]) -> ExemplarBank {
        let clusters = sizes
            .iter()
            .enumerate()
            .map(|(c, &n)| {
                (0..n).map(|i| Example { input: format!("q{c}.{i}"), output: format!(" a{c}.{i}") }).collect()
            })
            .collect();
        ExemplarBank { pool_id: "p".into(), clusters }
    }

    #[test]
    fn exemplars_follow_the_blend_weights() {
        let b = bank(&[4, 4, 4]);
        let picked: Vec<&str> = b.pick(&[0.6, 0.0, 0.4], 5).unwrap().iter().map(|e| e.input.as_str()).collect();
        assert_eq!(picked, ["q0.0", "q0.1", "q0.2", "q2.0", "q2.1"]);
        let one: Vec<&str> = b.pick(&[0.0, 1.0, 0.0], 3).unwrap().iter().map(|e| e.input.as_str()).collect();
        assert_eq!(one, ["q1.0", "q1.1", "q1.2"]);
    }

    #[test]
    fn empty_clusters_pass_their_share_on_and_bad_weights_are_refused() {
        let b = bank(&[0, 2]);
        assert_eq!(b.pick(&[0.9, 0.1], 3).unwrap().len(), 3, "cluster 1 cycles its 2 exemplars");
        assert!(b.pick(&[1.0], 3).is_err(), "wrong length");
        assert!(b.pick(&[f32::NAN, 1.0], 3).is_err());
        assert!(b.pick(&[-1.0, 1.0], 3).is_err());
        assert!(b.pick(&[0.0, 0.0], 3).is_err());
    }

    #[test]
    fn exemplars_go_before_the_question_in_text_and_chat() {
        let e = Example { input: "Question: 1+1?\nAnswer:".into(), output: " 2".into() };
        let Prompt::Text(t) = with_exemplars(&Prompt::Text("Question: 2+2?\nAnswer:".into()), &[&e]) else { panic!() };
        assert_eq!(t, "Question: 1+1?\nAnswer: 2\n\nQuestion: 2+2?\nAnswer:");
        let chat = Prompt::Chat(vec![Message::new("system", "be brief"), Message::new("user", "2+2?")]);
        let Prompt::Chat(m) = with_exemplars(&chat, &[&e]) else { panic!() };
        let roles: Vec<&str> = m.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "user"]);
        assert_eq!(m[2].content, "2");
    }
}

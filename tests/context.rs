//! Long inputs in fixed memory (`[context]`, docs/long-context.md) on the tiny model: cache compaction
//! keeps exactly the selected entries and rotates keys to their new positions, and a long input read
//! under `window` or `infinipot` never holds more than the pot.

mod common;

use common::*;
use crayon::context::{ContextOverrides, ContextPolicy, Rope};
use crayon::generate::{CancelToken, Prompt};
use crayon::model::{Decoder, ModelFiles};
use crayon::{Config, Engine, Error};

fn decoder(cfg: &Config) -> (Decoder, ModelFiles) {
    let files = ModelFiles::open(&cfg.model.dir).unwrap();
    let rt = crayon::runtime::Runtime::get(&cfg.runtime).unwrap();
    (Decoder::load(&files, &rt, &cfg.runtime, None, Vec::new()).unwrap(), files)
}

/// Keys of layer 0 depend only on the token and its position (nothing mixes positions before the
/// first attention), so a token moved from position p to q must have the key the model computes for
/// it at q; values only move. Deeper layers: every kept entry is the old one, moved (and rotated).
fn compaction_matches_the_model(cfg: Config) {
    let (mut d, files) = decoder(&cfg);
    let a = files.arch.clone();
    let (heads, hd) = (a.num_key_value_heads, a.head_dim);
    let ids: Vec<u32> = (0..40).map(|i| 200 + 37 * i).collect();
    let mut cache = d.new_cache_with_capacity(64).unwrap();
    d.forward(&ids, &mut cache, 1, None).unwrap();
    let cap = cache.capacity();
    let before: Vec<(Vec<f32>, Vec<f32>)> = (0..a.num_hidden_layers)
        .map(|l| (cache.layer_keys(l).unwrap().to_vec(), cache.layer_values(l).unwrap().to_vec()))
        .collect();
    // A different selection in every lane (layer x KV head), same count.
    let selections: Vec<Vec<u32>> = (0..a.num_hidden_layers * heads)
        .map(|lane| {
            let mut s: Vec<u32> = vec![0, 3 + lane as u32, 11, 17 + 2 * lane as u32, 30, 39];
            s.sort();
            s.dedup();
            s
        })
        .collect();
    let rope = Rope::new(a.rope_theta, hd);
    cache.compact(&selections, &rope).unwrap();
    assert_eq!(cache.len(), 6);

    for l in 0..a.num_hidden_layers {
        let (keys, values) = (cache.layer_keys(l).unwrap(), cache.layer_values(l).unwrap());
        for h in 0..heads {
            for (to, &from) in selections[l * heads + h].iter().enumerate() {
                let at = |buf: &[f32], slot: usize| buf[(h * cap + slot) * hd..][..hd].to_vec();
                assert_eq!(at(values, to), at(&before[l].1, from as usize), "layer {l} head {h}: values move");
                let mut expect = at(&before[l].0, from as usize);
                rope.rotate(&mut expect, to as f64 - from as f64);
                assert!(max_abs_diff(&at(keys, to), &expect) < 1e-5, "layer {l} head {h} slot {to}");
            }
        }
    }

    // Layer 0 against the model: the kept tokens of lane 0, read afresh at positions 0..6.
    let kept: Vec<u32> = selections[0].iter().map(|&i| ids[i as usize]).collect();
    let mut fresh = d.new_cache_with_capacity(64).unwrap();
    d.forward(&kept, &mut fresh, 1, None).unwrap();
    let (got, want) = (cache.layer_keys(0).unwrap(), fresh.layer_keys(0).unwrap());
    let fcap = fresh.capacity();
    for slot in 0..kept.len() {
        let g = &got[slot * hd..][..hd];
        let w = &want[slot * hd..][..hd];
        assert!(max_abs_diff(g, w) < 1e-4, "slot {slot}: rotated key {g:?} vs computed {w:?} (cap {cap}/{fcap})");
    }
}

#[test]
fn compaction_keeps_the_selected_entries_and_rotates_keys_to_their_new_positions() {
    compaction_matches_the_model(tiny());
}

#[test]
fn compaction_is_exact_on_the_4bit_model_too() {
    compaction_matches_the_model(config_for(&model_dir("tiny-q4")));
}

#[test]
fn bad_selections_are_refused_and_leave_the_cache_alone() {
    let (mut d, files) = decoder(&tiny());
    let mut cache = d.new_cache_with_capacity(16).unwrap();
    d.forward(&[5, 6, 7, 8], &mut cache, 1, None).unwrap();
    let rope = Rope::new(files.arch.rope_theta, files.arch.head_dim);
    let lanes = files.arch.num_hidden_layers * files.arch.num_key_value_heads;
    for bad in [vec![vec![0, 9]; lanes], vec![vec![2, 1]; lanes], vec![vec![0, 1]; lanes + 1]] {
        assert!(cache.compact(&bad, &rope).is_err());
        assert_eq!(cache.len(), 4);
    }
}

fn long_prompt(words: usize) -> Prompt {
    let text: Vec<String> = (0..words).map(|i| format!("w{}", i % 97)).collect();
    Prompt::Text(text.join(" "))
}

fn run(policy: ContextPolicy, pot: usize, prompt: &Prompt) -> crayon::Result<crayon::Generation> {
    let mut engine = Engine::load(&tiny()).unwrap();
    let mut params = engine.default_params();
    params.max_new_tokens = 40;
    params.sampling.temperature = 0.0;
    params.context = ContextOverrides { policy: Some(policy), pot_tokens: Some(pot), ..Default::default() };
    engine.generate(prompt, &params, &CancelToken::new(), &mut |_| std::ops::ControlFlow::Continue(()))
}

#[test]
fn a_long_input_never_exceeds_the_pot() {
    let prompt = long_prompt(600);
    for policy in [ContextPolicy::Window, ContextPolicy::Infinipot] {
        let g = run(policy, 128, &prompt).unwrap();
        let c = g.context.expect("a report");
        assert_eq!(c.policy, policy);
        assert!(g.prompt_tokens > 4 * 128, "{} prompt tokens", g.prompt_tokens);
        assert!(c.max_entries <= 128, "{policy:?}: the cache held {} entries", c.max_entries);
        assert!(c.compressions >= (g.prompt_tokens - 128) / 64, "{policy:?}: {} compressions", c.compressions);
        assert_eq!(g.tokens.len(), 40, "generation goes on past the pot");
        assert!(c.dropped_tokens >= g.prompt_tokens + 40 - 128);
    }
}

#[test]
fn refuse_and_truncate_behave_as_documented() {
    let prompt = long_prompt(600);
    let err = run(ContextPolicy::Refuse, 128, &prompt).unwrap_err();
    assert!(matches!(err, Error::InvalidRequest(ref m) if m.contains("context limit is 128")), "{err}");
    let g = run(ContextPolicy::Truncate, 128, &prompt).unwrap();
    let c = g.context.unwrap();
    assert!(g.prompt_tokens + g.tokens.len() <= 128, "{} + {}", g.prompt_tokens, g.tokens.len());
    assert_eq!(c.dropped_tokens + g.prompt_tokens, run(ContextPolicy::Window, 128, &prompt).unwrap().prompt_tokens);
}

#[test]
fn bad_context_settings_are_refused_by_name() {
    let prompt = long_prompt(10);
    for (pot, want) in [(10, "at least 64"), (1 << 20, "exceeds")] {
        let err = run(ContextPolicy::Infinipot, pot, &prompt).unwrap_err();
        assert!(err.to_string().contains(want), "{err}");
    }
}

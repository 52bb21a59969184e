//! Engine tests on the tiny random model (same architecture and tokenizer as SmolLM2, a few MB).

mod common;

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use crayon::model::WeightOverride;
use crayon::{CancelToken, Engine, Error, FinishReason, GenerationParams, Message, Prompt};

fn greedy(max_new_tokens: usize) -> GenerationParams {
    GenerationParams {
        max_new_tokens,
        sampling: Default::default(),
        stop: vec![],
        adapter: None,
        choices: vec![],
        choice_scoring: Default::default(),
        logprobs: None,
        logprob_sink: None,
        context: Default::default(),
    }
}

fn collect(engine: &mut Engine, prompt: &Prompt, params: &GenerationParams) -> (crayon::Generation, Vec<String>) {
    let mut chunks = Vec::new();
    let out = engine
        .generate(prompt, params, &CancelToken::new(), &mut |t| {
            chunks.push(t.to_string());
            ControlFlow::Continue(())
        })
        .unwrap();
    (out, chunks)
}

fn ids(g: &crayon::Generation) -> Vec<u32> {
    g.tokens.iter().map(|t| t.id).collect()
}

#[test]
fn greedy_tokens_match_the_reference_implementation() {
    let cfg = tiny();
    let r = reference(&cfg.model.dir);
    let mut engine = Engine::load(&cfg).unwrap();
    let (out, chunks) = collect(&mut engine, &Prompt::Tokens(r.input_ids.clone()), &greedy(r.greedy_ids.len()));
    assert_eq!(ids(&out), r.greedy_ids);
    assert_eq!(out.finish_reason, FinishReason::Length);
    assert_eq!(chunks.concat(), out.text, "streamed chunks add up to the answer");
    assert_eq!(out.text, engine.tokenizer().decode(&r.greedy_ids).unwrap());
    for t in &out.tokens {
        assert!(t.logprob <= 0.0 && (t.logprob - t.top_logprob).abs() < 1e-6, "greedy picks the top token: {t:?}");
    }
}

#[test]
fn chat_prompt_renders_to_the_reference_ids() {
    let cfg = tiny();
    let r = reference(&cfg.model.dir);
    let engine = Engine::load(&cfg).unwrap();
    let chat = Prompt::Chat(vec![Message::new("user", "What is the capital of France? Answer in one sentence.")]);
    assert_eq!(engine.prompt_ids(&chat).unwrap(), r.input_ids);
}

#[test]
fn logits_match_the_reference_at_every_position() {
    let cfg = tiny();
    let r = reference(&cfg.model.dir);
    let mut engine = Engine::load(&cfg).unwrap();
    let dec = engine.decoder_mut();
    let mut cache = dec.new_cache().unwrap();
    let logits = dec.forward(&r.input_ids, &mut cache, r.input_ids.len(), None).unwrap();
    assert_eq!(cache.len(), r.input_ids.len());
    let diff = max_abs_diff(&logits, &r.logits);
    assert!(diff < 1e-4, "max |logit diff| {diff}");
}

#[test]
fn kv_cache_decoding_equals_full_recompute() {
    let cfg = tiny();
    let r = reference(&cfg.model.dir);
    let mut engine = Engine::load(&cfg).unwrap();
    let vocab = engine.files().arch.vocab_size;
    let seq: Vec<u32> = r.input_ids.iter().chain(&r.greedy_ids).copied().collect();
    let dec = engine.decoder_mut();
    let mut full_cache = dec.new_cache().unwrap();
    let full = dec.forward(&seq, &mut full_cache, seq.len(), None).unwrap();
    let split = r.input_ids.len();
    let mut cache = dec.new_cache().unwrap();
    let mut rows = dec.forward(&seq[..split], &mut cache, 1, None).unwrap();
    for &t in &seq[split..] {
        rows.extend(dec.forward(&[t], &mut cache, 1, None).unwrap());
    }
    assert_eq!(cache.len(), seq.len());
    let diff = max_abs_diff(&rows, &full[(split - 1) * vocab..]);
    assert!(diff < 1e-4, "cached vs full logits differ by {diff}");
}

#[test]
fn kv_cache_truncate_rewinds_to_the_prompt() {
    // Choice scoring runs each option on the prompt's cache and cuts it off again: the positions before
    // the cut must be untouched by what was written after it.
    let cfg = tiny();
    let r = reference(&cfg.model.dir);
    let mut engine = Engine::load(&cfg).unwrap();
    let dec = engine.decoder_mut();
    let prompt = &r.input_ids;
    let (a, b): (Vec<u32>, Vec<u32>) = (r.greedy_ids[..4].to_vec(), vec![17, 300, 4000, 42, 7]);
    let mut cache = dec.new_cache_with_capacity(prompt.len() + 8).unwrap();
    dec.forward(prompt, &mut cache, 1, None).unwrap();
    let first_a = dec.forward(&a, &mut cache, a.len(), None).unwrap();
    cache.truncate(prompt.len());
    let via_cache_b = dec.forward(&b, &mut cache, b.len(), None).unwrap();
    cache.truncate(prompt.len());
    let again_a = dec.forward(&a, &mut cache, a.len(), None).unwrap();
    assert!(max_abs_diff(&first_a, &again_a) < 1e-5, "rewound cache changed option A's logits");
    let fresh: Vec<u32> = prompt.iter().chain(&b).copied().collect();
    let mut fresh_cache = dec.new_cache().unwrap();
    let full_b = dec.forward(&fresh, &mut fresh_cache, b.len(), None).unwrap();
    let diff = max_abs_diff(&via_cache_b, &full_b);
    assert!(diff < 1e-4, "option B after a rewind differs from a fresh run by {diff}");
}

#[test]
fn kv_cache_grows_in_place_and_stops_at_the_context() {
    let cfg = tiny();
    let r = reference(&cfg.model.dir);
    let mut engine = Engine::load(&cfg).unwrap();
    let context = engine.files().arch.max_position_embeddings;
    let dec = engine.decoder_mut();
    // One token at a time from an empty cache: every growth copies the positions held.
    let mut cache = dec.new_cache().unwrap();
    let mut rows = Vec::new();
    for &t in &r.input_ids {
        rows = dec.forward(&[t], &mut cache, 1, None).unwrap();
    }
    assert!(cache.capacity() >= r.input_ids.len() && cache.capacity() < 2 * r.input_ids.len() + 16);
    let mut full_cache = dec.new_cache().unwrap();
    let full = dec.forward(&r.input_ids, &mut full_cache, 1, None).unwrap();
    let diff = max_abs_diff(&rows, &full);
    assert!(diff < 1e-4, "token-by-token vs one pass: {diff}");
    // Sized to the model's context at most, and a clear error beyond it (the cache keeps what it held).
    assert_eq!(dec.new_cache_with_capacity(10 * context).unwrap().capacity(), context);
    let held = cache.len();
    let too_many = vec![5u32; context];
    let err = dec.forward(&too_many, &mut cache, 1, None).unwrap_err().to_string();
    assert!(err.contains("context"), "{err}");
    assert_eq!(cache.len(), held);
}

#[test]
fn stop_strings_end_the_answer_before_the_match() {
    let cfg = tiny();
    let r = reference(&cfg.model.dir);
    let mut engine = Engine::load(&cfg).unwrap();
    let prompt = Prompt::Tokens(r.input_ids.clone());
    let (full, _) = collect(&mut engine, &prompt, &greedy(24));
    // Stop in the middle of the answer: everything before the match must come out, nothing after.
    let mut cut = full.text.len() / 2;
    while !full.text.is_char_boundary(cut) {
        cut -= 1;
    }
    let stop: String = full.text[cut..].chars().take(4).collect();
    assert!(cut > 0 && stop.chars().count() == 4, "{:?}", full.text);
    let mut params = greedy(24);
    params.stop = vec!["never appears \u{1F600}".into(), stop.clone()];
    let (out, chunks) = collect(&mut engine, &prompt, &params);
    assert_eq!(out.finish_reason, FinishReason::StopString);
    assert_eq!(out.text, full.text[..full.text.find(&stop).unwrap()]);
    assert_eq!(chunks.concat(), out.text);
}

#[test]
fn max_new_tokens_and_context_limit_bound_the_answer() {
    let cfg = tiny();
    let r = reference(&cfg.model.dir);
    let mut engine = Engine::load(&cfg).unwrap();
    let (out, _) = collect(&mut engine, &Prompt::Tokens(r.input_ids.clone()), &greedy(3));
    assert_eq!((out.tokens.len(), out.finish_reason), (3, FinishReason::Length));

    let mut small = cfg.clone();
    small.model.max_context = r.input_ids.len() + 5;
    let mut engine = Engine::load(&small).unwrap();
    let (out, _) = collect(&mut engine, &Prompt::Tokens(r.input_ids.clone()), &greedy(100));
    assert_eq!((out.tokens.len(), out.finish_reason), (5, FinishReason::Length));

    small.model.max_context = r.input_ids.len();
    let mut engine = Engine::load(&small).unwrap();
    let err = engine
        .generate(&Prompt::Tokens(r.input_ids.clone()), &greedy(1), &CancelToken::new(), &mut |_| {
            ControlFlow::Continue(())
        })
        .unwrap_err();
    assert!(matches!(err, Error::InvalidRequest(ref m) if m.contains("context limit")), "{err}");
}

#[test]
fn seeded_sampling_is_reproducible() {
    let cfg = tiny();
    let mut engine = Engine::load(&cfg).unwrap();
    let prompt = Prompt::Text("Once upon a time".into());
    let mut params = greedy(16);
    params.sampling.temperature = 1.0;
    params.sampling.top_p = 0.95;
    let mut run = |seed| {
        params.sampling.seed = Some(seed);
        ids(&collect(&mut engine, &prompt, &params).0)
    };
    let a = run(7);
    assert_eq!(a, run(7));
    assert_ne!(a, run(8));
}

#[test]
fn callback_break_cancels_after_that_chunk() {
    let cfg = tiny();
    let mut engine = Engine::load(&cfg).unwrap();
    let mut calls = 0;
    let out = engine
        .generate(&Prompt::Text("Hello".into()), &greedy(50), &CancelToken::new(), &mut |_| {
            calls += 1;
            ControlFlow::Break(())
        })
        .unwrap();
    assert_eq!(calls, 1);
    assert_eq!(out.finish_reason, FinishReason::Cancelled);
    assert!(out.tokens.len() < 50);
}

#[test]
fn cancel_token_stops_generation_from_another_thread() {
    let cfg = tiny();
    let mut engine = Engine::load(&cfg).unwrap();
    let cancel = CancelToken::new();
    let pre = cancel.clone();
    pre.cancel();
    let out =
        engine.generate(&Prompt::Text("Hi".into()), &greedy(10), &cancel, &mut |_| ControlFlow::Continue(())).unwrap();
    assert_eq!((out.finish_reason, out.tokens.len()), (FinishReason::Cancelled, 0), "cancelled before it started");

    let cancel = CancelToken::new();
    let remote = cancel.clone();
    let first_chunk = Arc::new(std::sync::Barrier::new(2));
    let seen = first_chunk.clone();
    let canceller = std::thread::spawn(move || {
        seen.wait();
        remote.cancel();
    });
    let mut signalled = false;
    let out = engine
        .generate(&Prompt::Text("Hi".into()), &greedy(2000), &cancel, &mut |_| {
            if !signalled {
                signalled = true;
                first_chunk.wait();
                std::thread::sleep(Duration::from_millis(5));
            }
            ControlFlow::Continue(())
        })
        .unwrap();
    canceller.join().unwrap();
    assert_eq!(out.finish_reason, FinishReason::Cancelled);
    assert!(out.tokens.len() < 2000);
    // The engine is still usable afterwards.
    let (again, _) = collect(&mut engine, &Prompt::Text("Hi".into()), &greedy(2));
    assert_eq!(again.tokens.len(), 2);
}

#[test]
fn weights_are_replaceable_by_name() {
    let cfg = tiny();
    let r = reference(&cfg.model.dir);
    let name = "model.layers.0.self_attn.q_proj.weight";
    let original = Tensors::read(&cfg.model.dir.join("model.safetensors")).f32s(name);
    let logits_with = |data: Vec<f32>| {
        let mut e = Engine::load_with_overrides(&cfg, vec![WeightOverride::dense(name, data)]).unwrap();
        let dec = e.decoder_mut();
        let mut cache = dec.new_cache().unwrap();
        dec.forward(&r.input_ids, &mut cache, r.input_ids.len(), None).unwrap()
    };
    let same = logits_with(original.clone());
    assert!(max_abs_diff(&same, &r.logits) < 1e-4);
    let zeroed = logits_with(vec![0.0; original.len()]);
    assert!(max_abs_diff(&zeroed, &r.logits) > 1e-3, "replacing q_proj must change the logits");

    let bad = |name: &str, len: usize| {
        Engine::load_with_overrides(&cfg, vec![WeightOverride::dense(name, vec![0.0; len])])
            .err()
            .expect("must fail")
            .to_string()
    };
    assert!(bad("model.layers.9.self_attn.q_proj.weight", original.len()).contains("not an adapter target"));
    assert!(bad("model.embed_tokens.weight", original.len()).contains("not an adapter target"));
    assert!(bad(name, 3).contains("has 3 values"));
}

/// Σ log p(option | prompt) by one full forward pass over prompt + option (no shared cache).
fn option_logprob_full(engine: &mut Engine, prompt: &[u32], option: &[u32]) -> f32 {
    let all: Vec<u32> = prompt.iter().chain(option).copied().collect();
    let vocab = engine.files().arch.vocab_size;
    let logits = engine.logits(None, &all).unwrap();
    let mut sum = 0.0f64;
    for (j, &t) in option.iter().enumerate() {
        let row = &logits[(prompt.len() + j - 1) * vocab..(prompt.len() + j) * vocab];
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = f64::from(max) + row.iter().map(|&l| f64::from(l - max).exp()).sum::<f64>().ln();
        sum += f64::from(row[t as usize]) - lse;
    }
    sum as f32
}

#[test]
fn choice_scores_equal_a_full_forward_pass_per_option() {
    use crayon::choices::{self, Calibration, ConfidenceMeasure, Likelihood, Normalization, ScoringOverrides};
    let cfg = tiny();
    let mut engine = Engine::load(&cfg).unwrap();
    let prompt_text = "Question: Which vehicle is parked outside?\nAnswer:";
    // Options that share first tokens, one long enough to take several chunks of the scorer (32 tokens).
    let long = "the green car with a dented door, ".repeat(6) + "and a flat tyre";
    let options: Vec<String> = vec!["the red car".into(), "the blue car".into(), "a bicycle".into(), long];
    let mut params = greedy(8);
    params.choices = options.clone();
    params.choice_scoring = ScoringOverrides { normalization: Some(Normalization::Sum), ..Default::default() };
    let (g, chunks) = collect(&mut engine, &Prompt::Text(prompt_text.into()), &params);
    let prompt_ids = engine.tokenizer().encode(prompt_text).unwrap();
    let mut full = Vec::new();
    for (o, s) in options.iter().zip(&g.choice_scores) {
        let ids = engine.tokenizer().encode(&format!(" {o}")).unwrap();
        let want = option_logprob_full(&mut engine, &prompt_ids, &ids);
        assert_eq!(s.tokens, ids.len(), "{o}");
        assert!((s.logprob - want).abs() < 1e-3, "{o}: cached {} vs full pass {want}", s.logprob);
        assert!((s.mean_logprob - want / ids.len() as f32).abs() < 1e-4);
        assert!((s.score - s.logprob).abs() < 1e-6, "sum normalization scores the sum");
        full.push(want);
    }
    let best = full.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
    assert_eq!(g.text, options[best].trim(), "the answer is the most likely option");
    assert_eq!(chunks.concat(), g.text);
    assert_eq!(g.finish_reason, FinishReason::Stop);
    assert_eq!(g.tokens.len(), g.choice_scores[best].tokens);
    let total: f32 = g.choice_probs.iter().sum();
    assert!((total - 1.0).abs() < 1e-5);

    // The consensus confidence ([choices] default): the chosen option's mean probability over the six
    // scorings, from full passes after the prompt and after the content-free prompt (measured for it,
    // though the score stays uncalibrated).
    let cf_ids = engine.tokenizer().encode("Answer:").unwrap();
    let likelihoods: Vec<Likelihood> = options
        .iter()
        .zip(&full)
        .map(|(o, &sum)| {
            let ids = engine.tokenizer().encode(&format!(" {o}")).unwrap();
            let prior = Some(option_logprob_full(&mut engine, &cf_ids, &ids));
            Likelihood { sum, prior, tokens: ids.len(), bytes: o.trim().len() }
        })
        .collect();
    let want = choices::consensus(&likelihoods, best);
    let got = g.choice_confidence.expect("a choice answer has a confidence");
    assert!((got - want).abs() < 1e-3, "consensus {got} vs full passes {want}");
    assert!(g.choice_scores.iter().all(|s| s.content_free_logprob.is_some()));
    params.choice_scoring.confidence = Some(ConfidenceMeasure::Margin);
    let (m, _) = collect(&mut engine, &Prompt::Text(prompt_text.into()), &params);
    assert!(m.choice_scores.iter().all(|s| s.content_free_logprob.is_none()), "the margin needs no content-free pass");
    assert!((m.choice_confidence.unwrap() - choices::margin(&m.choice_probs)).abs() < 1e-6);

    // Calibration: the content-free log-likelihood is the option's after "Answer:" ([choices] default).
    params.choice_scoring = ScoringOverrides {
        normalization: Some(Normalization::Mean),
        calibration: Some(Calibration::ContentFree),
        ..Default::default()
    };
    let (g, _) = collect(&mut engine, &Prompt::Text(prompt_text.into()), &params);
    for (o, s) in options.iter().zip(&g.choice_scores) {
        let ids = engine.tokenizer().encode(&format!(" {o}")).unwrap();
        let cf = option_logprob_full(&mut engine, &cf_ids, &ids);
        assert!((s.content_free_logprob.unwrap() - cf).abs() < 1e-3, "{o}");
        let n = ids.len() as f32;
        assert!((s.score - (s.logprob / n - cf / n)).abs() < 1e-3, "{o}: PMI of the means");
    }
}

#[test]
fn a_long_prompt_is_computed_in_passes_with_the_same_result_as_one_pass() {
    use crayon::choices::{ConfidenceMeasure, ScoringOverrides};
    let cfg = tiny();
    let mut engine = Engine::load(&cfg).unwrap();
    assert_eq!(cfg.model.max_context, 0, "the default context is the model's own");
    assert_eq!(engine.context_limit(), engine.files().arch.max_position_embeddings);
    // Two full prefill passes (PREFILL_CHUNK = 512) and a partial one.
    let prompt_text = "The quick brown fox jumps over the lazy dog. ".repeat(110) + "Answer:";
    let prompt_ids = engine.tokenizer().encode(&prompt_text).unwrap();
    assert!(prompt_ids.len() > 2 * crayon::generate::PREFILL_CHUNK, "{} tokens", prompt_ids.len());
    let mut params = greedy(4);
    params.choices = vec!["yes".into(), "no".into()];
    params.choice_scoring = ScoringOverrides { confidence: Some(ConfidenceMeasure::Margin), ..Default::default() };
    let (g, _) = collect(&mut engine, &Prompt::Text(prompt_text.clone()), &params);
    for (o, s) in params.choices.iter().zip(&g.choice_scores) {
        let ids = engine.tokenizer().encode(&format!(" {o}")).unwrap();
        let want = option_logprob_full(&mut engine, &prompt_ids, &ids);
        assert!((s.logprob - want).abs() < 2e-3, "{o}: in passes {} vs one pass {want}", s.logprob);
    }
}

#[test]
fn choice_questions_with_bad_options_are_refused_before_any_work() {
    let cfg = tiny();
    let mut engine = Engine::load(&cfg).unwrap();
    let prompt = Prompt::Text("Question: pick one\nAnswer:".into());
    let mut params = greedy(8);
    let mut refuse = |choices: Vec<String>, needle: &str| {
        params.choices = choices;
        let err =
            engine.generate(&prompt, &params, &CancelToken::new(), &mut |_| ControlFlow::Continue(())).unwrap_err();
        assert!(matches!(err, Error::InvalidRequest(_)), "{err}");
        assert!(err.to_string().contains(needle), "{err}");
    };
    refuse(vec!["only".into()], "at least 2");
    refuse(vec!["yes".into(), "  ".into()], "choice 2 is empty");
    refuse((0..27).map(|i| format!("option {i}")).collect(), "at most 26");
    refuse(vec!["yes".into(), "x".repeat(3000)], "bytes");
    // Fits the byte limit but not the context after the prompt (a 64-token context).
    let mut small = tiny();
    small.model.max_context = 64;
    let mut engine = Engine::load(&small).unwrap();
    params.choices = vec!["yes".into(), "word ".repeat(100)];
    let err = engine.generate(&prompt, &params, &CancelToken::new(), &mut |_| ControlFlow::Continue(())).unwrap_err();
    assert!(err.to_string().contains("exceed the context limit"), "{err}");
}

#[test]
fn chat_choices_continue_the_assistant_turn_without_a_space() {
    let cfg = tiny();
    let mut engine = Engine::load(&cfg).unwrap();
    let chat = Prompt::Chat(vec![Message::new("user", "Yes or no?")]);
    let mut params = greedy(8);
    params.choices = vec!["yes".into(), "no".into()];
    let (g, _) = collect(&mut engine, &chat, &params);
    let prompt_ids = engine.prompt_ids(&chat).unwrap();
    for (o, s) in ["yes", "no"].iter().zip(&g.choice_scores) {
        let ids = engine.tokenizer().encode(o).unwrap();
        let want = option_logprob_full(&mut engine, &prompt_ids, &ids);
        assert!((s.logprob - want).abs() < 1e-3, "{o}: {} vs {want}", s.logprob);
    }
}

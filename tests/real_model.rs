//! End-to-end truth on the real model, SmolLM2-135M-Instruct exported from the PyPI GGUF.
//! The reference (logits and greedy tokens) comes from transformers loading the same GGUF itself.

mod common;

use std::ops::ControlFlow;

use common::*;
use crayon::{CancelToken, Engine, FinishReason, GenerationParams, Message, Prompt};

const QUESTION: &str = "What is the capital of France? Answer in one sentence.";
const ATOL: f32 = 1e-3;

fn engine() -> Engine {
    let mut cfg = config_for(&model_dir("smollm2-135m-instruct"));
    cfg.runtime.intra_threads = 0;
    Engine::load(&cfg).unwrap()
}

#[test]
fn answers_a_fixed_question_coherently_and_streams_it() {
    let mut engine = engine();
    let params = GenerationParams { max_new_tokens: 40, sampling: Default::default(), stop: vec![], adapter: None };
    let mut chunks = Vec::new();
    let out = engine
        .generate(&Prompt::Chat(vec![Message::new("user", QUESTION)]), &params, &CancelToken::new(), &mut |t| {
            chunks.push(t.to_string());
            ControlFlow::Continue(())
        })
        .unwrap();
    assert!(out.text.contains("Paris"), "answer: {:?}", out.text);
    assert_eq!(out.finish_reason, FinishReason::Stop, "the model ends its turn: {:?}", out.text);
    assert!(chunks.len() > 3, "the answer is streamed in pieces: {chunks:?}");
    assert_eq!(chunks.concat(), out.text);
}

#[test]
fn logits_and_greedy_tokens_match_transformers() {
    let mut engine = engine();
    let r = reference(&model_dir("smollm2-135m-instruct"));
    let chat = Prompt::Chat(vec![Message::new("user", QUESTION)]);
    assert_eq!(engine.prompt_ids(&chat).unwrap(), r.input_ids, "tokenizer + chat template give the reference ids");

    let dec = engine.decoder_mut();
    let mut cache = dec.new_cache().unwrap();
    let logits = dec.forward(&r.input_ids, &mut cache, r.input_ids.len(), None).unwrap();
    let diff = max_abs_diff(&logits, &r.logits);
    assert!(diff < ATOL, "max |logit diff| vs transformers = {diff}");

    // Greedy tokens up to the end-of-turn token (the reference loop does not stop there).
    let params = GenerationParams {
        max_new_tokens: r.greedy_ids.len(),
        sampling: Default::default(),
        stop: vec![],
        adapter: None,
    };
    let out = engine.generate(&chat, &params, &CancelToken::new(), &mut |_| ControlFlow::Continue(())).unwrap();
    let ids: Vec<u32> = out.tokens.iter().map(|t| t.id).collect();
    assert_eq!(ids, r.greedy_ids[..ids.len()]);
}

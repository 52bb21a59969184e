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
    let params = GenerationParams {
        max_new_tokens: 40,
        sampling: Default::default(),
        stop: vec![],
        adapter: None,
        choices: vec![],
        choice_scoring: Default::default(),
        logprobs: None,
        logprob_sink: None,
        context: Default::default(),
    };
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
        choices: vec![],
        choice_scoring: Default::default(),
        logprobs: None,
        logprob_sink: None,
        context: Default::default(),
    };
    let out = engine.generate(&chat, &params, &CancelToken::new(), &mut |_| ControlFlow::Continue(())).unwrap();
    let ids: Vec<u32> = out.tokens.iter().map(|t| t.id).collect();
    assert_eq!(ids, r.greedy_ids[..ids.len()]);
}

#[test]
fn merged_blend_of_the_real_pool_matches_peft() {
    let pool = repo().join("pools/smollm2-135m-instruct");
    let mut cfg = config_for(&model_dir("smollm2-135m-instruct"));
    cfg.runtime.intra_threads = 0;
    cfg.pool.dir = pool.clone();
    let state = tempfile::tempdir().unwrap();
    cfg.adapters.state_dir = state.path().to_path_buf();
    let r = pool_reference(&pool);
    let mut engine = Engine::load(&cfg).unwrap();
    let vocab = engine.files().arch.vocab_size;
    engine.customize_weights("mix", &r.blend_weights).unwrap();
    let got = engine.logits(Some("mix"), &r.input_ids).unwrap();
    let diff = max_abs_diff(last_rows(&got, vocab, 4), &r.blend_logits);
    assert!(diff < ATOL, "blend vs PEFT merged model: max |diff| {diff}");
    let mut one_hot = vec![0.0; r.blend_weights.len()];
    one_hot[0] = 1.0;
    engine.customize_weights("first", &one_hot).unwrap();
    let got = engine.logits(Some("first"), &r.input_ids).unwrap();
    let diff = max_abs_diff(last_rows(&got, vocab, 4), &r.single_logits);
    assert!(diff < ATOL, "one-hot vs PEFT single adapter: max |diff| {diff}");
}

#[test]
fn customized_from_five_examples_answers_in_the_task_format() {
    let pool = repo().join("pools/smollm2-135m-instruct");
    let mut cfg = config_for(&model_dir("smollm2-135m-instruct"));
    cfg.runtime.intra_threads = 0;
    cfg.pool.dir = pool;
    let state = tempfile::tempdir().unwrap();
    cfg.adapters.state_dir = state.path().to_path_buf();
    let text = std::fs::read_to_string(repo().join("examples/science.jsonl")).unwrap();
    let examples: Vec<crayon::Example> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let mut engine = Engine::load(&cfg).unwrap();
    engine.customize("science", &examples).unwrap();
    let params = GenerationParams {
        max_new_tokens: 1,
        sampling: Default::default(),
        stop: vec![],
        adapter: Some("science".into()),
        choices: ["a rock", "a candle flame", "a pillow", "a spoon"].map(String::from).to_vec(),
        choice_scoring: Default::default(),
        logprobs: None,
        logprob_sink: None,
        context: Default::default(),
    };
    let q = "Question: Which of these is a source of light?\nAnswer:";
    let out = engine
        .generate(&Prompt::Text(q.into()), &params, &CancelToken::new(), &mut |_| ControlFlow::Continue(()))
        .unwrap();
    assert_eq!(out.text, "a candle flame", "the customized model picks the light source: {:?}", out.choice_scores);
}

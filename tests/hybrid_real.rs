//! End to end with the real models as real processes: a device `crayond` (SmolLM2-135M-Instruct and its
//! pool) routing to a server `crayond` (Qwen2.5-Coder-0.5B-Instruct and its paired pool) on loopback.
//! Needs `scripts/export-server-model` (scripts/test runs it).

mod common;

use common::daemon::Daemon;
use serde_json::{Value, json};

fn model(name: &str) -> std::path::PathBuf {
    let dir = common::repo().join("models").join(name);
    assert!(dir.join("crayon_model.json").is_file(), "{} is missing: run scripts/export-server-model", dir.display());
    dir
}

fn config(model_dir: &std::path::Path, pool: &str, state: &std::path::Path, extra: &str) -> String {
    format!(
        "[model]\ndir = {model_dir:?}\n[runtime]\nort_library = {:?}\nintra_threads = 2\n[adapters]\nstate_dir = {state:?}\n[pool]\ndir = {:?}\n{extra}",
        common::ort_library(),
        common::repo().join(pool),
    )
}

const LIGHT: &str = "Question: Which of these is a source of light?\nAnswer:";
const LIGHT_OPTIONS: [&str; 4] = ["a rock", "a candle flame", "a pillow", "a spoon"];

fn ask(dev: &Daemon, body: Value) -> Value {
    let (status, out) = dev.post("/v1/completions", &body);
    assert_eq!(status, 200, "{out}");
    out
}

#[test]
fn device_and_server_with_real_models() {
    let tmp = tempfile::tempdir().unwrap();
    let mut server = Daemon::start(&config(
        &model("qwen2.5-coder-0.5b-instruct"),
        "pools/qwen2.5-coder-0.5b-instruct",
        &tmp.path().join("server-state"),
        // Its pool is paired with device pool v1; the device's pool v2 is served from its exemplar bank.
        &format!("exemplars = {:?}\n", common::repo().join("pools/smollm2-135m-instruct/exemplars.json")),
    ));
    let dev = Daemon::start(&config(
        &model("smollm2-135m-instruct"),
        "pools/smollm2-135m-instruct",
        &tmp.path().join("device-state"),
        &format!(
            "[router]\nmode = \"hybrid\"\nuse_calibrated = true\n[remote]\nurl = \"{}\"\ntimeout_ms = 120000\n",
            server.url
        ),
    ));
    let examples: Vec<Value> = std::fs::read_to_string(common::repo().join("examples/science.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (status, made) =
        dev.post("/v1/crayon/adapters", &json!({"name": "science", "examples": examples, "calibrate": true}));
    assert_eq!(status, 200, "{made}");
    let min_scope = made["calibration"]["thresholds"]["min_scope"].as_f64().unwrap();
    assert!(min_scope > 0.3, "science examples resemble each other: {made}");

    // Out of scope (code, not a science question): the server's plain model answers, before the device
    // generates anything.
    let far = ask(
        &dev,
        json!({"model": "science", "prompt": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
               "max_tokens": 12, "temperature": 0}),
    );
    let c = &far["crayon"];
    assert_eq!((c["answered_by"].as_str(), c["reason"].as_str()), (Some("server"), Some("out_of_scope")), "{far}");
    assert!(c["scope"].as_f64().unwrap() < min_scope && c["server_blend"] == false, "{far}");
    assert!(!far["choices"][0]["text"].as_str().unwrap().trim().is_empty(), "{far}");

    // In scope, not confident enough: the server answers with the same blend (its exemplar bank for the
    // device's pool: the pool it is paired with is v1).
    let hard = ask(
        &dev,
        json!({"model": "science", "prompt": LIGHT, "max_tokens": 2, "crayon": {"choices": LIGHT_OPTIONS,
               "route": {"min_choice_confidence": 1.0}}}),
    );
    let c = &hard["crayon"];
    assert_eq!((c["answered_by"].as_str(), c["reason"].as_str()), (Some("server"), Some("low_confidence")), "{hard}");
    assert_eq!(c["server_blend"], true, "{hard}");
    assert_eq!(c["server_model"], "qwen2.5-coder-0.5b-instruct", "{hard}");
    // Which option it picks is the model's business (docs/benchmarks.md measures accuracy); it must be one.
    assert!(LIGHT_OPTIONS.contains(&c["choice"].as_str().unwrap_or("")), "{hard}");
    assert_eq!(c["choice_probs"].as_array().unwrap().len(), 4, "the server scored the options: {hard}");

    // In scope and confident enough: the device answers.
    let easy = ask(
        &dev,
        json!({"model": "science", "prompt": LIGHT, "max_tokens": 2, "crayon": {"choices": LIGHT_OPTIONS,
               "route": {"min_choice_confidence": 0.0}}}),
    );
    assert_eq!(easy["crayon"]["answered_by"], "device", "{easy}");
    assert_eq!(easy["crayon"]["reason"], "confident", "{easy}");

    // The server dies in the middle of an offloaded request: the device still answers.
    let (status, out) = server.kill_while_serving(
        &dev,
        "/v1/chat/completions",
        json!({"model": "science", "messages": [{"role": "user", "content": "Write a long story about a robot."}],
                "max_tokens": 48, "crayon": {"route": {"mode": "server_only"}}}),
    );
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["crayon"]["answered_by"], "device", "{out}");
    assert!(out["crayon"]["fallback"].is_string(), "{out}");
    assert!(!out["choices"][0]["message"]["content"].as_str().unwrap().is_empty(), "{out}");
    assert_eq!(dev.health()["fallbacks"], 1);
}

/// The server pool (paired, no embedding, a subset of targets, a model with attention biases and an
/// untied head) merged by the engine gives PEFT's own merged-model logits.
#[test]
fn server_pool_blend_matches_peft() {
    use common::{last_rows, max_abs_diff, pool_reference};
    let pool = common::repo().join("pools/qwen2.5-coder-0.5b-instruct");
    let mut cfg = common::config_for(&model("qwen2.5-coder-0.5b-instruct"));
    cfg.runtime.intra_threads = 0;
    cfg.pool.dir = pool.clone();
    let state = tempfile::tempdir().unwrap();
    cfg.adapters.state_dir = state.path().to_path_buf();
    let r = pool_reference(&pool);
    let mut engine = crayon::Engine::load(&cfg).unwrap();
    let vocab = engine.files().arch.vocab_size;
    engine.customize_weights("mix", &r.blend_weights).unwrap();
    let got = engine.logits(Some("mix"), &r.input_ids).unwrap();
    let diff = max_abs_diff(last_rows(&got, vocab, 4), &r.blend_logits);
    assert!(diff < 2e-3, "server blend vs PEFT merged model: max |diff| {diff}");
    let base = engine.logits(None, &r.input_ids).unwrap();
    let moved = max_abs_diff(last_rows(&base, vocab, 4), &r.blend_logits);
    assert!(moved > 10.0 * diff, "the blend changes the logits ({moved}) well beyond the tolerance ({diff})");
}

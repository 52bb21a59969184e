//! End to end with the real models as real processes: a device `crayond` (SmolLM2-135M-Instruct and its
//! pool) routing to a server `crayond` (Qwen2.5-Coder-0.5B-Instruct and its paired pool) on loopback.
//! Needs `scripts/export-server-model` (scripts/test runs it).

mod common;

use std::time::Duration;

use common::daemon::{Daemon, PATIENCE, http_post};
use serde_json::{Value, json};

fn model(name: &str) -> std::path::PathBuf {
    let dir = common::repo().join("models").join(name);
    assert!(dir.join("crayon_model.json").is_file(), "{} is missing: run scripts/export-server-model", dir.display());
    dir
}

fn config(model_dir: &std::path::Path, pool: &str, state: &std::path::Path, extra: &str) -> String {
    format!(
        "[model]\ndir = {model_dir:?}\n[runtime]\nort_library = {:?}\nintra_threads = 2\n[pool]\ndir = {:?}\n[adapters]\nstate_dir = {state:?}\n{extra}",
        common::ort_library(),
        common::repo().join(pool),
    )
}

const LIGHT: &str = "Question: Which of these is a source of light?\n A. a rock\n B. a candle flame\n C. a pillow\n D. a spoon\nAnswer:";

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
        "",
    ));
    assert!(server.health()["paired_with"].as_str().unwrap().starts_with("smollm2-135m-instruct"));
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
    let (status, made) = dev.post(
        "/v1/crayon/adapters",
        &json!({"name": "science", "examples": examples, "calibrate": true, "choices": ["A", "B", "C", "D"]}),
    );
    assert_eq!(status, 200, "{made}");
    let min_scope = made["calibration"]["thresholds"]["min_scope"].as_f64().unwrap();
    assert!(min_scope > 0.5, "science examples resemble each other: {made}");

    // Out of scope: the server's plain model answers, before the device generates anything.
    let far = ask(
        &dev,
        json!({"model": "science", "prompt": "The capital city of France is", "max_tokens": 4, "temperature": 0}),
    );
    let c = &far["crayon"];
    assert_eq!((c["answered_by"].as_str(), c["reason"].as_str()), (Some("server"), Some("out_of_scope")), "{far}");
    assert!(c["scope"].as_f64().unwrap() < min_scope && c["server_blend"] == false, "{far}");
    assert!(far["choices"][0]["text"].as_str().unwrap().contains("Paris"), "{far}");

    // In scope, not confident enough: the server answers with the same blend on its paired pool.
    let hard = ask(
        &dev,
        json!({"model": "science", "prompt": LIGHT, "max_tokens": 2, "crayon": {"choices": ["A", "B", "C", "D"],
               "route": {"min_margin": 1.0}}}),
    );
    let c = &hard["crayon"];
    assert_eq!((c["answered_by"].as_str(), c["reason"].as_str()), (Some("server"), Some("low_confidence")), "{hard}");
    assert_eq!(c["server_blend"], true, "{hard}");
    assert_eq!(c["server_model"], "qwen2.5-coder-0.5b-instruct", "{hard}");
    // Which option it picks is the model's business (docs/benchmarks.md measures accuracy); it must be one.
    assert!(matches!(c["choice"].as_str(), Some("A" | "B" | "C" | "D")), "{hard}");
    assert_eq!(c["choice_probs"].as_array().unwrap().len(), 4, "the server scored the options: {hard}");

    // In scope and confident enough: the device answers.
    let easy = ask(
        &dev,
        json!({"model": "science", "prompt": LIGHT, "max_tokens": 2, "crayon": {"choices": ["A", "B", "C", "D"],
               "route": {"min_margin": 0.0}}}),
    );
    assert_eq!(easy["crayon"]["answered_by"], "device", "{easy}");
    assert_eq!(easy["crayon"]["reason"], "confident", "{easy}");

    // The server dies in the middle of an offloaded request: the device still answers.
    let url = dev.url.clone();
    let asking = std::thread::spawn(move || {
        http_post(
            &format!("{url}/v1/chat/completions"),
            &json!({"model": "science", "messages": [{"role": "user", "content": "Write a long story about a robot."}],
                    "max_tokens": 48, "crayon": {"route": {"mode": "server_only"}}}),
            None,
        )
    });
    let t0 = std::time::Instant::now();
    while server.health()["in_flight"] != 1 {
        assert!(t0.elapsed() < PATIENCE, "the request never reached the server");
        std::thread::sleep(Duration::from_millis(10));
    }
    server.child.kill().unwrap();
    let (status, out) = asking.join().unwrap();
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["crayon"]["answered_by"], "device", "{out}");
    assert!(out["crayon"]["fallback"].is_string(), "{out}");
    assert!(!out["choices"][0]["message"]["content"].as_str().unwrap().is_empty(), "{out}");
    assert_eq!(dev.health()["fallbacks"], 1);
}

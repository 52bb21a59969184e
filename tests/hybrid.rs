//! Device–server hybrid inference with real processes on loopback: a device `crayond` and a server
//! `crayond` (the tiny model on both sides, the server with a pool paired to the device's), routing
//! decisions, the server API, privacy of the customization, and every network fault falling back to
//! the device's answer.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::daemon::{Daemon, Fault, FaultServer, PATIENCE, http_post, tiny_config};
use serde_json::{Value, json};

/// Unusual words so that a leak of example text into the wire would be unmistakable.
const EXAMPLES: [(&str, &str); 4] = [
    ("Question: Which zebrafinch quartzite glows?\n A. one\n B. two\nAnswer:", " A"),
    ("Question: Where does the marmoset xylophone sleep?\n A. here\n B. there\nAnswer:", " B"),
    ("Question: How many quokka violins fit?\n A. few\n B. many\nAnswer:", " B"),
    ("Question: Why is the axolotl kettle warm?\n A. sun\n B. fire\nAnswer:", " A"),
];

fn device_pool() -> PathBuf {
    common::repo().join("models/tiny-pool")
}

fn server_pool() -> PathBuf {
    let p = common::repo().join("models/tiny-server-pool");
    assert!(p.join("pool.json").is_file(), "{} is missing: run scripts/setup first", p.display());
    p
}

fn server() -> Daemon {
    let state = tempfile::tempdir().unwrap().keep();
    Daemon::start(&tiny_config(Some(&server_pool()), &state, ""))
}

/// A device routing to `url`, with quick timeouts so fault tests stay short.
/// `remote` holds `[remote]` keys that replace these defaults.
fn device(url: &str, mode: &str, remote: &str) -> Daemon {
    let state = tempfile::tempdir().unwrap().keep();
    let mut cfg = format!("[router]\nmode = \"{mode}\"\n[remote]\nurl = \"{url}\"\n{remote}");
    for (key, value) in [
        ("connect_timeout_ms", "1000"),
        ("timeout_ms", "2000"),
        ("retries", "1"),
        ("retry_backoff_ms", "50"),
        ("breaker_failures", "0"),
    ] {
        if !remote.lines().any(|l| l.starts_with(&format!("{key} ="))) {
            cfg += &format!("{key} = {value}\n");
        }
    }
    let d = Daemon::start(&tiny_config(Some(&device_pool()), &state, &cfg));
    customize(&d, "quiz");
    d
}

fn customize(d: &Daemon, name: &str) -> Value {
    let examples: Vec<Value> = EXAMPLES.iter().map(|(i, o)| json!({"input": i, "output": o})).collect();
    let (status, body) = d.post("/v1/crayon/adapters", &json!({"name": name, "examples": examples}));
    assert_eq!(status, 200, "{body}");
    body
}

/// A completion with the customized adapter and routing overrides.
fn ask(d: &Daemon, prompt: &str, route: Value) -> Value {
    let (status, body) = d.post(
        "/v1/completions",
        &json!({"model": "quiz", "prompt": prompt, "max_tokens": 4, "crayon": {"choices": ["A", "B"], "route": route}}),
    );
    assert_eq!(status, 200, "{body}");
    body
}

fn route(body: &Value) -> (&str, &str) {
    (body["crayon"]["answered_by"].as_str().unwrap(), body["crayon"]["reason"].as_str().unwrap())
}

const QUERY: &str = "Question: Which pangolin trombone is loud?\n A. this\n B. that\nAnswer:";

#[test]
fn routing_decisions_in_scope_low_confidence_and_out_of_scope() {
    let srv = server();
    let dev = device(&srv.url, "hybrid", "");

    // In scope and confident (thresholds at their floor): the device answers.
    let local = ask(&dev, QUERY, json!({"min_scope": -1.0, "min_choice_confidence": 0.0}));
    assert_eq!(route(&local), ("device", "confident"), "{local}");
    let c = &local["crayon"];
    assert!(c["scope"].as_f64().is_some() && c["confidence"]["kind"] == "choice", "{c}");
    assert!(c["fallback"].is_null() && c["latency"]["routing_ms"].as_f64().is_some(), "{c}");
    assert!(matches!(c["choice"].as_str(), Some("A" | "B")), "{c}");

    // In scope, not confident (no margin can reach 1): the server answers with the same blend.
    let hard = ask(&dev, QUERY, json!({"min_scope": -1.0, "min_choice_confidence": 1.0}));
    assert_eq!(route(&hard), ("server", "low_confidence"), "{hard}");
    assert_eq!(hard["crayon"]["server_blend"], true, "the server applied the blend: {hard}");
    assert!(hard["crayon"]["confidence"]["value"].as_f64().unwrap() < 1.0);

    // Out of scope (no query reaches scope 1 but an example itself): the server's plain model.
    let far = ask(&dev, "Write a poem about the sea.", json!({"min_scope": 1.0}));
    assert_eq!(route(&far), ("server", "out_of_scope"), "{far}");
    assert_eq!(far["crayon"]["server_blend"], false, "{far}");
    assert!(far["crayon"]["confidence"].is_null(), "out of scope is decided before generating: {far}");

    let h = dev.health();
    assert_eq!((h["offloaded"].as_u64(), h["fallbacks"].as_u64()), (Some(2), Some(0)), "{h}");
}

#[test]
fn scope_is_high_for_the_examples_own_inputs() {
    let dev = device(&FaultServer::refused_url(), "device_only", "");
    let own = ask(&dev, EXAMPLES[0].0, json!({}));
    let scope = own["crayon"]["scope"].as_f64().unwrap();
    assert!(scope > 0.999, "an example is its own nearest example: {scope}");
    let other = ask(&dev, "Some completely different text about nothing", json!({}));
    assert!(other["crayon"]["scope"].as_f64().unwrap() < scope, "{other}");
}

#[test]
fn device_only_mode_never_contacts_the_server() {
    let spy = FaultServer::start(Fault::Status500);
    let dev = device(&spy.url, "device_only", "");
    let out = ask(&dev, QUERY, json!({"min_scope": 1.0, "min_choice_confidence": 1.0}));
    assert_eq!(route(&out), ("device", "device_only"), "{out}");
    assert_eq!(spy.connections.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[test]
fn the_server_receives_the_query_pool_id_and_weights_but_no_example_text() {
    let srv = server();
    let spy = FaultServer::start(Fault::Record(srv.url.clone()));
    let dev = device(&spy.url, "hybrid", "");
    let adapter = dev.get("/v1/crayon/adapters")["data"][0].clone();
    let out = ask(&dev, QUERY, json!({"min_scope": -1.0, "min_choice_confidence": 1.0}));
    assert_eq!(route(&out), ("server", "low_confidence"), "{out}");

    let sent = spy.requests.lock().unwrap().clone();
    assert_eq!(sent.len(), 1, "{sent:?}");
    let body: Value = serde_json::from_str(&sent[0]).unwrap();
    for word in ["zebrafinch", "quartzite", "marmoset", "xylophone", "quokka", "violins", "axolotl", "kettle"] {
        assert!(EXAMPLES.iter().any(|(i, _)| i.contains(word)));
        assert!(!sent[0].contains(word), "example text '{word}' left the device: {}", sent[0]);
    }
    assert_eq!(body["prompt"], QUERY);
    assert_eq!(body["crayon"]["pool_id"], adapter["pool_id"]);
    assert_eq!(body["crayon"]["weights"], adapter["weights"]);
    let keys: Vec<&str> = body.as_object().unwrap().keys().map(String::as_str).collect();
    for k in &keys {
        assert!(
            ["model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "crayon"]
                .contains(k),
            "unexpected field '{k}' sent"
        );
    }
    let ext: Vec<&str> = body["crayon"].as_object().unwrap().keys().map(String::as_str).collect();
    for k in &ext {
        assert!(
            ["route", "pool_id", "weights", "choices", "choice_scoring"].contains(k),
            "unexpected crayon field '{k}' sent"
        );
    }
}

/// Forces offloading to a broken server; the device must answer itself and say why.
fn assert_falls_back(url: &str, expect: &[&str]) {
    let dev = device(url, "server_only", "");
    let out = ask(&dev, QUERY, json!({}));
    assert_eq!(route(&out), ("device", "server_only"), "{out}");
    let why = out["crayon"]["fallback"].as_str().unwrap_or_default().to_string();
    assert!(expect.iter().any(|e| why.contains(e)), "fallback reason '{why}' names none of {expect:?}");
    assert!(!out["choices"][0]["text"].as_str().unwrap().is_empty() || out["usage"]["completion_tokens"] != 0);
    // Still serving.
    let again = ask(&dev, QUERY, json!({"mode": "device_only"}));
    assert_eq!(route(&again), ("device", "device_only"));
}

#[test]
fn refused_connection_falls_back() {
    assert_falls_back(&FaultServer::refused_url(), &["refused", "failed"]);
}

#[test]
fn http_500_falls_back_after_retrying() {
    let f = FaultServer::start(Fault::Status500);
    assert_falls_back(&f.url, &["2 attempt(s)"]);
    assert_eq!(f.connections.load(std::sync::atomic::Ordering::SeqCst), 2, "one retry");
}

#[test]
fn malformed_body_falls_back() {
    let f = FaultServer::start(Fault::Malformed);
    assert_falls_back(&f.url, &["malformed"]);
}

#[test]
fn truncated_body_falls_back() {
    let f = FaultServer::start(Fault::Truncated);
    assert_falls_back(&f.url, &["reading the body", "malformed"]);
}

#[test]
fn slow_drip_is_cut_at_the_deadline() {
    let f = FaultServer::start(Fault::SlowDrip);
    assert_falls_back(&f.url, &["timed out", "within 2000 ms"]);
}

#[test]
fn hanging_server_is_cut_at_the_deadline() {
    let f = FaultServer::start(Fault::Hang);
    assert_falls_back(&f.url, &["timed out", "within 2000 ms"]);
}

#[test]
fn circuit_breaker_opens_after_repeated_failures() {
    let f = FaultServer::start(Fault::Status500);
    let dev = device(&f.url, "server_only", "breaker_failures = 2\nbreaker_cooldown_ms = 600000\nretries = 0\n");
    for _ in 0..2 {
        ask(&dev, QUERY, json!({}));
    }
    let out = ask(&dev, QUERY, json!({}));
    assert!(out["crayon"]["fallback"].as_str().unwrap().contains("circuit breaker open"), "{out}");
    assert_eq!(f.connections.load(std::sync::atomic::Ordering::SeqCst), 2, "an open breaker sends nothing");
    assert_eq!(dev.health()["breaker_open"], true);
}

#[test]
fn server_killed_mid_request_loses_nothing_on_the_device() {
    let mut srv = server();
    let dev = device(&srv.url, "server_only", "timeout_ms = 60000\n");
    let (status, out) = srv.kill_while_serving(
        &dev,
        "/v1/completions",
        json!({"model": "quiz", "prompt": QUERY, "max_tokens": 2000, "crayon": {"route": {"mode": "server_only"}}}),
    );
    assert_eq!(status, 200, "{out}");
    assert_eq!(route(&out), ("device", "server_only"), "{out}");
    assert!(out["crayon"]["fallback"].is_string(), "{out}");
    assert!(out["usage"]["completion_tokens"].as_u64().unwrap() > 0, "{out}");
}

#[test]
fn server_applies_a_paired_blend_and_flags_one_it_cannot() {
    let srv = server();
    let device_pool_id = pool_id(&device_pool());
    let ask_blend = |pool: &str, weights: Value| {
        let (status, body) = srv.post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                    "crayon": {"pool_id": pool, "weights": weights}}),
        );
        assert_eq!(status, 200, "{body}");
        body
    };
    let ok = ask_blend(&device_pool_id, json!([0.4, 0.3, 0.2, 0.1]));
    assert!(ok["crayon"]["blend"].as_str().unwrap().starts_with("blend-"), "{ok}");
    assert_eq!(ok["object"], "chat.completion");
    let again = ask_blend(&device_pool_id, json!([0.4, 0.3, 0.2, 0.1]));
    assert_eq!(again["crayon"]["blend"], ok["crayon"]["blend"], "same weights, same ready model");
    for (pool, weights, why) in [
        ("some-other-pool", json!([1, 0, 0, 0]), "some-other-pool"),
        (device_pool_id.as_str(), json!([1, 0]), "2 blend weights"),
        (device_pool_id.as_str(), json!([-1, 0, 0, 2]), "non-negative"),
    ] {
        let out = ask_blend(pool, weights);
        assert!(out["crayon"]["blend"].is_null(), "{out}");
        assert!(out["crayon"]["blend_error"].as_str().unwrap().contains(why), "{out}");
    }
}

/// A server without a pool paired with the device's answers that pool's blends from its exemplar bank:
/// exemplars drawn by the weights go in front of the question (the prompt grows), the reply names them,
/// and blends it has neither a pool nor a bank for are still flagged.
#[test]
fn server_answers_an_unpaired_pool_from_its_exemplar_bank() {
    let dir = tempfile::tempdir().unwrap();
    let bank = dir.path().join("exemplars.json");
    let ex = |q: &str, a: &str| json!({"input": format!("Question: {q}\nAnswer:"), "output": format!(" {a}")});
    std::fs::write(
        &bank,
        json!({"format": "crayon-exemplars/1", "pool_id": "phone-pool-v9", "adapters": ["c00", "c01"],
               "clusters": [[ex("What is 1 plus 1?", "2"), ex("What is 2 plus 2?", "4")], [ex("Sky colour?", "blue")]]})
        .to_string(),
    )
    .unwrap();
    let srv = Daemon::start(&tiny_config(
        Some(&server_pool()),
        &dir.path().join("state"),
        &format!("exemplars = {bank:?}\n"),
    ));
    let ask = |crayon: Value| {
        let (status, body) = srv.post(
            "/v1/completions",
            &json!({"prompt": "Question: What is 3 plus 3?\nAnswer:", "max_tokens": 2,
                    "crayon": {"choices": ["6", "7"], "pool_id": crayon["pool_id"], "weights": crayon["weights"]}}),
        );
        assert_eq!(status, 200, "{body}");
        body
    };
    let plain = ask(json!({"pool_id": "unknown-pool", "weights": [1, 0]}));
    assert!(plain["crayon"]["blend_error"].as_str().unwrap().contains("unknown-pool"), "{plain}");
    let steered = ask(json!({"pool_id": "phone-pool-v9", "weights": [0.7, 0.3]}));
    assert_eq!(steered["crayon"]["blend"], "exemplars:5", "{steered}");
    assert!(steered["crayon"]["blend_error"].is_null(), "{steered}");
    let grew = steered["usage"]["prompt_tokens"].as_u64().unwrap() - plain["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(grew > 20, "five exemplars went in front of the question: +{grew} tokens");
    let wrong = ask(json!({"pool_id": "phone-pool-v9", "weights": [1, 0, 0]}));
    assert!(wrong["crayon"]["blend_error"].as_str().unwrap().contains("exemplar bank of 2 clusters"), "{wrong}");
}

fn pool_id(dir: &Path) -> String {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("pool.json")).unwrap()).unwrap();
    v["pool_id"].as_str().unwrap().to_string()
}

#[test]
fn bearer_token_is_required_when_configured_and_sent_by_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret-token\n").unwrap();
    let srv = Daemon::start(&tiny_config(
        Some(&server_pool()),
        &dir.path().join("state"),
        &format!("[server]\ntoken_file = {token:?}\n"),
    ));
    let req = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    let url = format!("{}/v1/chat/completions", srv.url);
    assert_eq!(http_post(&url, &req, None).0, 401);
    assert_eq!(http_post(&url, &req, Some("wrong")).0, 401);
    assert_eq!(http_post(&url, &req, Some("s3cret-token")).0, 200);
    assert_eq!(srv.health()["status"], "ok", "health needs no token");

    let dev = device(&srv.url, "server_only", &format!("token_file = {token:?}\n"));
    let out = ask(&dev, QUERY, json!({}));
    assert_eq!(route(&out), ("server", "server_only"), "{out}");
}

#[test]
fn a_long_input_is_read_in_a_fixed_pot_when_the_request_asks() {
    let state = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tiny_config(None, state.path(), ""));
    let long: Vec<String> = (0..400).map(|i| format!("w{}", i % 53)).collect();
    let body = |context: Value| {
        json!({"messages": [{"role": "user", "content": long.join(" ")}], "max_tokens": 5, "temperature": 0,
               "crayon": {"context": context}})
    };
    // Refuse (the default) names the limit; window and infinipot read it all in 64 entries.
    let (status, reply) = d.post("/v1/chat/completions", &body(json!({"pot_tokens": 128})));
    assert_eq!(status, 400, "{reply}");
    assert!(reply["error"]["message"].as_str().unwrap_or_default().contains("context limit is 128"), "{reply}");
    for policy in ["window", "infinipot"] {
        let (status, reply) = d.post("/v1/chat/completions", &body(json!({"policy": policy, "pot_tokens": 64})));
        assert_eq!(status, 200, "{reply}");
        let c = &reply["crayon"]["context"];
        assert_eq!(c["policy"], policy, "{reply}");
        assert!(c["compressions"].as_u64().unwrap() >= 4, "{reply}");
        assert!(c["max_entries"].as_u64().unwrap() <= 64, "{reply}");
        assert!(reply["usage"]["prompt_tokens"].as_u64().unwrap() > 128, "{reply}");
    }
}

#[test]
fn http_api_rejects_bad_requests_precisely_and_keeps_serving() {
    let state = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tiny_config(None, state.path(), "[server]\nmax_body_bytes = 2000\nmax_tokens_limit = 50\n"));
    let chat = |body: Value| d.post("/v1/chat/completions", &body);
    let cases = [
        (json!({"messages": []}), 400, "messages must not be empty"),
        (json!({"messages": [{"role": "robot", "content": "x"}]}), 400, "robot"),
        (json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}), 400, "max_tokens"),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "crayon": {"choices": ["A"]}}),
            400,
            "at least 2 choices",
        ),
        (json!({"messages": [{"role": "user", "content": "x"}], "stop": [""]}), 400, "stop"),
        (json!({"messages": [{"role": "user", "content": "x"}], "n": 5}), 400, "server.max_n"),
        (json!({"messages": [{"role": "user", "content": "x"}], "n": 0}), 400, "at least 1"),
        // Fields that would change the answer are refused by name, never silently ignored.
        (json!({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}), 400, "'tools'"),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}),
            400,
            "'response_format'",
        ),
        (json!({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"50256": -100}}), 400, "'logit_bias'"),
        (json!({"messages": [{"role": "user", "content": "x"}], "frequency_penalty": 0.5}), 400, "'frequency_penalty'"),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 21}),
            400,
            "at most 20",
        ),
        (json!({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}), 400, "needs 'logprobs'"),
        (json!({"messages": [{"role": "user", "content": "x"}], "crayon": {"wieghts": []}}), 400, "wieghts"),
        (json!({"messages": [{"role": "user", "content": "x"}], "temperature": -1}), 400, "temperature"),
        (json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]}), 404, "nope"),
        (json!({"messages": [{"role": "user", "content": "x".repeat(3000)}]}), 413, "max_body_bytes"),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "crayon": {"route": {"mode": "hybrid"}}}),
            400,
            "device_only",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "crayon": {"context": {"policy": "sliding"}}}),
            400,
            "sliding",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}],
                   "crayon": {"context": {"policy": "infinipot", "pot_tokens": 10}}}),
            400,
            "at least 64",
        ),
    ];
    for (body, status, needle) in cases {
        let (got, reply) = chat(body.clone());
        assert_eq!(got, status, "{body} -> {reply}");
        let msg = reply["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "{body} -> {msg}");
    }
    let mut r = common::daemon::agent()
        .post(&format!("{}/v1/chat/completions", d.url))
        .header("Content-Type", "application/json")
        .send("{not json")
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert!(r.body_mut().read_to_string().unwrap().contains("malformed JSON"));
    let (ok, reply) = chat(json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}));
    assert_eq!(ok, 200, "{reply}");
    // More than server.max_tokens_limit is capped, as OpenAI clients often ask for a lot.
    let (ok, reply) = chat(json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}));
    assert_eq!(ok, 200, "{reply}");
    assert!(reply["usage"]["completion_tokens"].as_u64().unwrap() <= 50, "{reply}");
    assert_eq!(d.get("/v1/models")["data"][0]["id"], "tiny");
    // Their no-op values, and fields that change nothing (user), are accepted.
    let (ok, reply) = chat(json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "tools": [],
        "response_format": {"type": "text"}, "presence_penalty": 0, "logprobs": false, "user": "app-7"}));
    assert_eq!(ok, 200, "{reply}");
    // models.retrieve: the base model by id; an unknown id is a 404 naming it.
    assert_eq!(d.get("/v1/models/tiny")["id"], "tiny");
    let (status, _, body) = d.get_text("/v1/models/nope");
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("model_not_found") && body.contains("nope"), "{body}");
}

#[test]
fn streaming_sends_chunks_then_done_and_a_disconnect_frees_the_slot() {
    let state = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tiny_config(None, state.path(), "[server]\nmax_concurrent = 1\n"));
    let mut r = common::daemon::agent()
        .post(&format!("{}/v1/chat/completions", d.url))
        .send_json(json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": true}))
        .unwrap();
    let text = r.body_mut().read_to_string().unwrap();
    let events: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{text}");
    let last: Value = serde_json::from_str(events[events.len() - 2]).unwrap();
    assert!(last["choices"][0]["finish_reason"].is_string() && last["crayon"]["answered_by"] == "device", "{last}");
    let first: Value = serde_json::from_str(events[0]).unwrap();
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");

    // A long stream, abandoned after its first event: the slot must come back.
    {
        let mut r = common::daemon::agent()
            .post(&format!("{}/v1/chat/completions", d.url))
            .send_json(json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2000, "stream": true}))
            .unwrap();
        let mut reader = r.body_mut().as_reader();
        let mut buf = [0u8; 16];
        std::io::Read::read(&mut reader, &mut buf).unwrap();
        // While it runs, the one slot is taken: another request is turned away.
        let (busy, reply) = d.post("/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "x"}]}));
        if busy != 200 {
            assert_eq!(busy, 429, "{reply}");
        }
    }
    let t0 = std::time::Instant::now();
    while d.health()["in_flight"] != 0 {
        assert!(t0.elapsed() < PATIENCE, "the abandoned stream kept its slot");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (ok, _) =
        d.post("/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}));
    assert_eq!(ok, 200);
}

#[test]
fn calibration_sets_thresholds_from_the_examples() {
    let state = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tiny_config(Some(&device_pool()), state.path(), "[router]\nuse_calibrated = true\n"));
    let examples: Vec<Value> = EXAMPLES.iter().map(|(i, o)| json!({"input": i, "output": o})).collect();
    let (status, body) = d.post(
        "/v1/crayon/adapters",
        &json!({"name": "cal", "examples": examples, "calibrate": true, "choices": ["A", "B"]}),
    );
    assert_eq!(status, 200, "{body}");
    let cal = &body["calibration"];
    // Bad calibration input is refused before anything is created; blend names are reserved.
    let (status, reply) = d.post(
        "/v1/crayon/adapters",
        &json!({"name": "other", "examples": [{"input": "x", "output": ""}], "calibrate": true}),
    );
    assert_eq!(status, 400, "{reply}");
    let (status, reply) =
        d.post("/v1/crayon/adapters", &json!({"name": "blend-1", "examples": [{"input": "x", "output": "y"}]}));
    assert!(status == 400 && reply["error"]["message"].as_str().unwrap().contains("reserved"), "{reply}");
    let names: Vec<Value> =
        d.get("/v1/crayon/adapters")["data"].as_array().unwrap().iter().map(|a| a["name"].clone()).collect();
    assert_eq!(names, vec![json!("cal")]);
    let scopes: Vec<f64> = cal["example_scopes"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    let min = scopes.iter().copied().fold(f64::INFINITY, f64::min);
    let t = &cal["thresholds"];
    assert!((t["min_scope"].as_f64().unwrap() - (min - 0.05)).abs() < 1e-4, "{cal}");
    assert_eq!(cal["example_confidence"].as_array().unwrap().len(), EXAMPLES.len());
    assert_eq!(body["adapter"]["calibrated"], *t, "persisted with the adapter");
    // The calibrated thresholds are the ones a request sees.
    let (_, out) = d.post(
        "/v1/completions",
        &json!({"model": "cal", "prompt": QUERY, "max_tokens": 2, "crayon": {"choices": ["A", "B"]}}),
    );
    assert_eq!(out["crayon"]["thresholds"], *t, "{out}");
}

#[test]
fn bad_remote_settings_stop_crayond_at_start_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("ca.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let missing = dir.path().join("no-token");
    for (remote, needle) in [
        (format!("ca_file = {not_pem:?}"), "holds no certificate"),
        (format!("token_file = {missing:?}"), "remote.token_file cannot be read"),
    ] {
        let cfg_text =
            tiny_config(None, &dir.path().join("state"), &format!("[remote]\nurl = \"https://x\"\n{remote}\n"));
        let cfg = dir.path().join("crayon.toml");
        std::fs::write(&cfg, cfg_text).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_crayond"))
            .args(["--config", cfg.to_str().unwrap(), "--listen", "127.0.0.1:0"])
            .env_remove("CRAYON_CONFIG")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(needle), "{err}");
    }
    // A public address without a token is refused.
    let cfg = dir.path().join("public.toml");
    std::fs::write(&cfg, tiny_config(None, &dir.path().join("state"), "")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_crayond"))
        .args(["--config", cfg.to_str().unwrap(), "--listen", "0.0.0.0:0"])
        .env_remove("CRAYON_CONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no server.token_file"));
}

/// A TLS terminator in front of a server `crayond`: socat (a real process) holding a certificate for
/// 127.0.0.1 signed by a private CA that openssl makes here — how a server is usually exposed.
struct TlsFront {
    child: std::process::Child,
    url: String,
    ca: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl").current_dir(dir).args(args).output().expect("openssl runs");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn tls_front(backend: &str) -> TlsFront {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let ca = ["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=crayon-test-ca"];
    openssl(d, &[&["req", "-x509"][..], &ec, &ca].concat());
    openssl(
        d,
        &[&["req"][..], &ec, &["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"]].concat(),
    );
    std::fs::write(
        d.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let target = backend.trim_start_matches("http://");
    let child = std::process::Command::new("socat")
        .current_dir(d)
        .arg(format!("OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,cert=server.pem,key=server.key,verify=0"))
        .arg(format!("TCP:{target}"))
        .stderr(std::process::Stdio::null()) // handshake failures the test provokes, and the readiness probe
        .spawn()
        .expect("socat runs (scripts/setup installs it)");
    let t0 = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t0.elapsed() < PATIENCE, "socat did not listen on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
    TlsFront { child, url: format!("https://127.0.0.1:{port}"), ca: d.join("ca.pem"), _dir: dir }
}

#[test]
fn tls_with_a_private_ca_reaches_the_server_and_an_unknown_issuer_falls_back() {
    let srv = server();
    let front = tls_front(&srv.url);

    let trusted = device(&front.url, "server_only", &format!("ca_file = {:?}\n", front.ca));
    let out = ask(&trusted, QUERY, json!({}));
    assert_eq!(route(&out), ("server", "server_only"), "{out}");
    assert!(out["crayon"]["fallback"].is_null(), "{out}");
    assert_eq!(srv.health()["requests"], 1, "the request went through TLS to the server");

    // Without the private CA the certificate is not trusted: nothing is sent, the device answers.
    let untrusted = device(&front.url, "server_only", "");
    let out = ask(&untrusted, QUERY, json!({}));
    assert_eq!(route(&out), ("device", "server_only"), "{out}");
    let why = out["crayon"]["fallback"].as_str().unwrap();
    assert!(why.to_lowercase().contains("certificate") || why.contains("UnknownIssuer"), "{why}");
    assert_eq!(srv.health()["requests"], 1, "an untrusted server gets no request");
}

/// Posts `body` to `url`'s `path` from the local address `from` (127.0.0.x), by hand: the HTTP
/// client crates cannot choose a source address.
fn post_from(from: &str, url: &str, path: &str, body: &Value) -> Value {
    use std::io::{Read, Write};
    let server: std::net::SocketAddr = url.trim_start_matches("http://").parse().unwrap();
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&format!("{from}:0").parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
    sock.connect(&server.into()).unwrap();
    let mut stream: std::net::TcpStream = sock.into();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let body = body.to_string();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {server}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    let (head, json) = reply.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    serde_json::from_str(json).unwrap()
}

/// The HTTP server shares the model fairly between devices (peer IP addresses): a device that sent
/// five requests does not make another device's one request wait behind all five. Each turn is a
/// long generation (1,500 tokens: well over 100 ms even for the tiny model), so the other device's
/// request is queued within the turn running when it is sent, even on a loaded machine; it must then
/// come right after that turn (unfair: after every flood request still waiting). Turns that ended
/// before it was sent are not held against it: the tiny model is fast and CI machines are busy.
#[test]
fn http_clients_take_turns_by_peer_address() {
    let state = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tiny_config(None, state.path(), ""));
    let done = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    const TURN_TOKENS: u64 = 1500;
    let body = json!({"prompt": "Once upon a time", "max_tokens": TURN_TOKENS, "stop": []});
    let mut threads = Vec::new();
    for i in 0..5 {
        let (url, body, done) = (d.url.clone(), body.clone(), done.clone());
        threads.push(std::thread::spawn(move || {
            let out = post_from("127.0.0.2", &url, "/v1/completions", &body);
            assert_eq!(out["usage"]["completion_tokens"], TURN_TOKENS, "a full-length turn: {out}");
            done.lock().unwrap().push(format!("flood {i}"));
        }));
    }
    let t0 = std::time::Instant::now();
    while d.health()["queued"].as_u64().unwrap_or(0) < 4 {
        assert!(t0.elapsed() < PATIENCE, "the five requests were never queued: {}", d.health());
        std::thread::sleep(Duration::from_millis(2));
    }
    let short = json!({"prompt": "Once upon a time", "max_tokens": 4, "stop": []});
    let ended_before = done.lock().unwrap().len();
    assert!(ended_before < 4, "the flood ended before the other device could ask: turns too short");
    post_from("127.0.0.1", &d.url, "/v1/completions", &short);
    done.lock().unwrap().push("other device".into());
    for t in threads {
        t.join().unwrap();
    }
    let order = done.lock().unwrap().clone();
    let rank = order.iter().position(|s| s == "other device").unwrap();
    assert!(
        rank <= ended_before + 1,
        "the other device waited behind the flood ({ended_before} turns had ended when it asked): {order:?}"
    );
}

/// Sends one raw HTTP/1.1 request with exactly these headers; returns (status code, body).
fn raw_http(url: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let addr = url.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
    for (k, v) in headers {
        req += &format!("{k}: {v}\r\n");
    }
    write!(stream, "{req}\r\n{body}").unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    let status = reply.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, reply.split_once("\r\n\r\n").map_or(String::new(), |(_, b)| b.to_string()))
}

/// Without a token, HTTP is a local mode that a web page in a browser on the board must not reach
/// (issue #14): a foreign `Host` (DNS rebinding), a foreign `Origin` (CSRF) and a non-JSON adapter write
/// are refused with 403 and change nothing; local clients (curl, the OpenAI clients) are served.
/// Tokenless local HTTP names a loopback client by its uid, from the kernel's socket table, as the
/// socket does from SO_PEERCRED (issue #14): an app cannot change or remove another app's
/// customization over HTTP either, while root (an admin) can; each app owns what it makes; a user the
/// socket would refuse (outside `socket.group`) is refused over HTTP too.
#[test]
fn local_http_names_each_app_by_its_uid_for_ownership() {
    if !common::service::require_root("to run HTTP clients as other users") {
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let pool = common::repo().join("models/tiny-pool");
    // nobody (65534, primary group nogroup) is admitted as a member of socket.group; daemon (uid 1) is not.
    let d = Daemon::start(&tiny_config(Some(&pool), state.path(), "[socket]\ngroup = \"nogroup\"\n"));
    let curl = |uid: Option<u32>, method: &str, path: &str, body: &str| -> (String, String) {
        let mut cmd = std::process::Command::new(if uid.is_some() { "setpriv" } else { "curl" });
        if let Some(u) = uid {
            cmd.args([format!("--reuid={u}"), format!("--regid={u}"), "--clear-groups".into(), "curl".into()]);
        }
        cmd.args(["-s", "-o", "-", "-w", "\n%{http_code}", "-X", method, "-H", "Content-Type: application/json"]);
        if !body.is_empty() {
            cmd.args(["--data", body]);
        }
        let out = cmd.arg(format!("{}{path}", d.url)).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", ""));
        (code.to_string(), body.to_string())
    };
    let ex = |name: &str| format!(r#"{{"name": "{name}", "examples": [{{"input": "2+2?", "output": "4"}}]}}"#);
    let app = Some(65534);
    assert_eq!(curl(app, "POST", "/v1/crayon/adapters", &ex("theirs")).0, "200", "an app customizes for itself");
    assert_eq!(curl(None, "POST", "/v1/crayon/adapters", &ex("roots")).0, "200");
    let (code, body) = curl(app, "DELETE", "/v1/crayon/adapters/roots", "");
    assert_eq!(code, "403", "another app's customization: {body}");
    assert!(body.contains("belongs to") && body.contains("uid:65534"), "{body}");
    let (code, body) = curl(app, "POST", "/v1/crayon/adapters", &ex("roots"));
    assert_eq!(code, "403", "nor replace it: {body}");
    let (code, body) = curl(
        app,
        "POST",
        "/v1/chat/completions",
        r#"{"model": "roots", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}"#,
    );
    assert_eq!(code, "200", "but use it: {body}");
    assert_eq!(curl(app, "DELETE", "/v1/crayon/adapters/theirs", "").0, "200", "its own it may remove");
    assert_eq!(curl(None, "DELETE", "/v1/crayon/adapters/roots", "").0, "200", "root is an admin");
    // As on the socket, a user outside socket.group may not use the service at all.
    let (code, body) = curl(
        Some(1),
        "POST",
        "/v1/chat/completions",
        r#"{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}"#,
    );
    assert_eq!(code, "403", "{body}");
    assert!(body.contains("uid 1 may not use this service"), "{body}");
}

#[test]
fn a_tokenless_http_api_refuses_what_a_web_page_could_send() {
    let state = tempfile::tempdir().unwrap();
    let pool = common::repo().join("models/tiny-pool");
    let d = Daemon::start(&tiny_config(Some(&pool), state.path(), ""));
    let ex = r#"{"name": "mine", "examples": [{"input": "2+2?", "output": "4"}]}"#;
    let json = ("Content-Type", "application/json");
    let local = ("Host", "127.0.0.1");
    let (status, _) = raw_http(&d.url, "POST", "/v1/crayon/adapters", &[local, json], ex);
    assert_eq!(status, 200, "a local client customizes");
    let refused: [(&str, Vec<(&str, &str)>); 4] = [
        ("rebinding", vec![("Host", "evil.example:8090"), json]),
        ("cross-site form", vec![local, ("Origin", "http://evil.example"), ("Content-Type", "text/plain")]),
        ("cross-site fetch", vec![local, ("Origin", "https://10.0.0.9:443"), json]),
        ("text/plain write", vec![local, ("Content-Type", "text/plain")]),
    ];
    for (what, headers) in &refused {
        let (status, body) = raw_http(&d.url, "POST", "/v1/crayon/adapters", headers, ex);
        assert_eq!(status, 403, "{what}: {body}");
        if *what != "text/plain write" {
            let (status, _) = raw_http(&d.url, "DELETE", "/v1/crayon/adapters/mine", headers, "");
            assert_eq!(status, 403, "{what}: a delete is refused too");
        }
    }
    let (status, body) = raw_http(&d.url, "POST", "/v1/chat/completions", &[("Host", "evil.example"), json], "{}");
    assert_eq!(status, 403, "generation through a rebound name: {body}");
    let (status, _) = raw_http(
        &d.url,
        "POST",
        "/v1/chat/completions",
        &[("Host", "localhost:1"), ("Origin", "http://localhost:3000"), json],
        r#"{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}"#,
    );
    assert_eq!(status, 200, "a page on this machine's loopback may call the API");
    assert_eq!(d.get("/v1/crayon/adapters")["data"].as_array().unwrap().len(), 1, "nothing was changed");
}

/// HTTP connections are bounded (issue #14): at most `server.max_connections` are open (one more gets
/// 503 at once), and a client that does not send its request headers within `server.header_timeout_ms`
/// — silent, or one byte at a time — is closed; then others are served again.
#[test]
fn http_connections_are_bounded_and_silent_or_dripping_clients_are_closed() {
    use std::io::{Read, Write};
    let state = tempfile::tempdir().unwrap();
    let d =
        Daemon::start(&tiny_config(None, state.path(), "[server]\nmax_connections = 4\nheader_timeout_ms = 1500\n"));
    let addr = d.url.trim_start_matches("http://").to_string();
    let open = || {
        let s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        s
    };
    let mut held: Vec<std::net::TcpStream> = (0..4).map(|_| open()).collect();
    held[0].write_all(b"GET /hea").unwrap(); // a slow drip: never finishes its headers
    std::thread::sleep(Duration::from_millis(150)); // accepted by now
    let mut extra = open();
    let mut reply = String::new();
    extra.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 503") && reply.contains("server.max_connections"), "{reply}");
    let t0 = std::time::Instant::now();
    for (i, s) in held.iter_mut().enumerate() {
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest); // returns when the daemon closes it
        assert!(t0.elapsed() < PATIENCE, "connection {i} was never closed");
    }
    assert_eq!(d.health()["status"], "ok", "served again once the silent connections are gone");
}

/// Customize-and-calibrate is one request (issue #14): when calibration fails, the customization it
/// made is undone — the previous adapter of that name is back (listed, on disk), or there is none.
/// (Calibration fails here because an example is longer than the model's context: the blend can be
/// made from it, but the model cannot answer it.)
#[test]
fn a_failed_calibration_undoes_its_customization() {
    let state = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tiny_config(Some(&device_pool()), state.path(), ""));
    let before = customize(&d, "quiz")["adapter"]["example_digest"].clone();
    let long = "word ".repeat(9000); // over the 8192-token context
    let examples = json!([{"input": long, "output": "A"}, {"input": "Is it?", "output": "B"}]);
    let body = json!({"name": "quiz", "examples": examples, "calibrate": true, "choices": ["A", "B"]});
    let (status, reply) = d.post("/v1/crayon/adapters", &body);
    assert_eq!(status, 400, "{reply}");
    let listed = d.get("/v1/crayon/adapters")["data"].clone();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["example_digest"], before, "the previous customization is back: {listed}");
    let on_disk: Value =
        serde_json::from_str(&std::fs::read_to_string(state.path().join("adapters/quiz.json")).unwrap()).unwrap();
    assert_eq!(on_disk["example_digest"], before);
    let body = json!({"name": "fresh", "examples": examples, "calibrate": true, "choices": ["A", "B"]});
    assert_eq!(d.post("/v1/crayon/adapters", &body).0, 400);
    assert!(!state.path().join("adapters/fresh.json").exists(), "a new adapter whose calibration failed is not kept");
    assert_eq!(d.get("/v1/crayon/adapters")["data"].as_array().unwrap().len(), 1);
}

/// A body that is malformed (bad chunked encoding) is a 400 saying so; only a body over the limit is
/// a 413 (issue #14: both were 413).
#[test]
fn a_malformed_chunked_body_is_400_and_only_an_oversized_one_413() {
    use std::io::{Read, Write};
    let state = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tiny_config(None, state.path(), "[server]\nmax_body_bytes = 1024\n"));
    let send = |body: &str| {
        let mut s = std::net::TcpStream::connect(d.url.trim_start_matches("http://")).unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        let head = "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n";
        write!(s, "{head}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n{body}").unwrap();
        let mut reply = String::new();
        let _ = s.read_to_string(&mut reply);
        reply
    };
    let reply = send("5\r\n{\"pro\r\nzz\r\nmpt\r\n0\r\n\r\n");
    assert!(reply.starts_with("HTTP/1.1 400") && reply.contains("unreadable"), "{reply}");
    let big = "x".repeat(2000);
    let reply = send(&format!("{:x}\r\n{big}\r\n0\r\n\r\n", big.len()));
    assert!(reply.starts_with("HTTP/1.1 413") && reply.contains("over 1024 bytes (server.max_body_bytes)"), "{reply}");
}

/// `GET /metrics` (issue #15): the exposition parses with the Prometheus project's own OpenMetrics
/// parser (Python `prometheus_client`, in the compat venv that scripts/test sets up) and counts what
/// happened: answered, refused and malformed requests, tokens, latencies, customizations, routes.
#[test]
fn metrics_count_requests_customizations_and_routes_in_openmetrics_text() {
    let Ok(python) = std::env::var("CRAYON_COMPAT_PYTHON") else {
        assert!(
            std::env::var_os("CRAYON_REQUIRE_COMPAT").is_none(),
            "CRAYON_COMPAT_PYTHON is not set: run through scripts/test"
        );
        eprintln!("skipped: the compat venv (prometheus_client) is not set up (scripts/test sets it up)");
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tiny_config(Some(&device_pool()), state.path(), ""));
    customize(&d, "quiz");
    ask(&d, QUERY, json!({}));
    let (status, _) = d.post("/v1/completions", &json!({"prompt": 7}));
    assert_eq!(status, 400);
    let (status, ctype, text) = d.get_text("/metrics");
    assert_eq!(status, 200);
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    let script = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        out.setdefault(s.name, []).append([s.labels, s.value])
print(json.dumps(out))
"#;
    let mut child = std::process::Command::new(python)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the OpenMetrics parser refused the exposition:\n{text}");
    let samples: Value = serde_json::from_slice(&out.stdout).unwrap();
    let value = |name: &str, labels: Value| -> f64 {
        samples[name]
            .as_array()
            .and_then(|v| v.iter().find(|s| labels.as_object().unwrap().iter().all(|(k, x)| &s[0][k] == x)))
            .and_then(|s| s[1].as_f64())
            .unwrap_or_else(|| panic!("no {name} {labels} in:\n{text}"))
    };
    let http = |op: &str, outcome: &str| json!({"interface": "http", "operation": op, "outcome": outcome});
    assert_eq!(value("crayon_requests_total", http("generate", "ok")), 1.0);
    assert_eq!(value("crayon_requests_total", http("generate", "invalid")), 1.0);
    assert_eq!(value("crayon_requests_total", http("customize", "ok")), 1.0);
    assert!(value("crayon_prompt_tokens_total", json!({"interface": "http"})) > 0.0);
    assert!(value("crayon_completion_tokens_total", json!({"interface": "http"})) >= 1.0);
    assert_eq!(value("crayon_time_to_first_token_seconds_count", json!({})), 1.0);
    assert_eq!(value("crayon_queue_wait_seconds_count", json!({})), 1.0);
    let route = json!({"answered_by": "device", "reason": "device_only", "fallback": "false"});
    assert_eq!(value("crayon_routing_decisions_total", route), 1.0);
    assert_eq!(value("crayon_customizations_built_total", json!({})), 1.0);
    assert_eq!(value("crayon_customization_build_seconds_count", json!({})), 1.0);
    assert_eq!(value("crayon_customizations_cached", json!({})), 1.0);
    assert_eq!(value("crayon_adapters_saved", json!({})), 1.0);
    assert_eq!(value("crayon_breaker_open", json!({})), 0.0);
    assert!(value("crayon_resident_memory_bytes", json!({})) > 1e7);
}

/// OpenAI `logprobs` (issue #15): per answer token its log-probability, bytes and the most likely
/// alternatives, in the chat shape and the legacy completions shape; greedy answers are their own
/// most likely token, and the tokens' bytes spell the answer.
#[test]
fn logprobs_report_each_answer_token_with_its_alternatives_in_both_openai_shapes() {
    let state = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tiny_config(None, state.path(), ""));
    let (status, r) = d.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 6, "temperature": 0,
                "logprobs": true, "top_logprobs": 3}),
    );
    assert_eq!(status, 200, "{r}");
    let content = r["choices"][0]["logprobs"]["content"].as_array().unwrap().clone();
    assert!(!content.is_empty() && content.len() <= 6, "{r}");
    let mut bytes = Vec::new();
    for t in &content {
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3, "{t}");
        let lps: Vec<f64> = top.iter().map(|a| a["logprob"].as_f64().unwrap()).collect();
        assert!(lps.windows(2).all(|w| w[0] >= w[1]) && lps[0] <= 0.0, "most likely first: {t}");
        assert_eq!(top[0]["token"], t["token"], "greedy picks the most likely token: {t}");
        assert!((t["logprob"].as_f64().unwrap() - lps[0]).abs() < 1e-5, "{t}");
        bytes.extend(t["bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8));
    }
    let text = r["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(String::from_utf8_lossy(&bytes), text, "the tokens spell the answer");
    // Streamed: each chunk carries its tokens' log-probabilities; together the same as above.
    let mut r = common::daemon::agent()
        .post(&format!("{}/v1/chat/completions", d.url))
        .send_json(json!({"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 6, "temperature": 0,
                          "logprobs": true, "top_logprobs": 3, "stream": true}))
        .unwrap();
    let body = r.body_mut().read_to_string().unwrap();
    let streamed: Vec<Value> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|l| *l != "[DONE]")
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array().cloned())
        .flatten()
        .collect();
    assert_eq!(streamed, content, "streamed log-probabilities: {body}");
    // Not asked: null, as OpenAI answers.
    let (_, plain) =
        d.post("/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 2}));
    assert!(plain["choices"][0]["logprobs"].is_null(), "{plain}");
    // Completions: logprobs = k alternatives, as token -> logprob maps, with text offsets.
    let (status, r) =
        d.post("/v1/completions", &json!({"prompt": "The sky is", "max_tokens": 4, "temperature": 0, "logprobs": 2}));
    assert_eq!(status, 200, "{r}");
    let lp = &r["choices"][0]["logprobs"];
    let tokens: Vec<&str> = lp["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(tokens.concat(), r["choices"][0]["text"].as_str().unwrap(), "{r}");
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), tokens.len());
    assert_eq!(lp["text_offset"][0], 0);
    assert!(lp["top_logprobs"].as_array().unwrap().iter().all(|m| m.as_object().unwrap().len() <= 2), "{lp}");
}

/// A request the server answers carries the server's log-probabilities: the device asks the server
/// for them and passes them through (its own model's would not describe the server's answer).
#[test]
fn logprobs_of_an_offloaded_answer_are_the_servers() {
    let srv = server();
    let dev = device(&srv.url, "server_only", "");
    let body = json!({"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4, "temperature": 0,
                      "logprobs": true, "top_logprobs": 2});
    let (status, via_device) = dev.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{via_device}");
    assert_eq!(route(&via_device), ("server", "server_only"), "{via_device}");
    let (_, direct) = srv.post("/v1/chat/completions", &body);
    let content = |r: &Value| r["choices"][0]["logprobs"]["content"].clone();
    assert!(content(&via_device).as_array().is_some_and(|c| !c.is_empty()), "{via_device}");
    assert_eq!(content(&via_device), content(&direct), "the server's own log-probabilities");
    // Streamed through the device: the server's answer comes whole, its log-probabilities at the end.
    let mut stream_body = body.clone();
    stream_body["stream"] = json!(true);
    let mut r =
        common::daemon::agent().post(&format!("{}/v1/chat/completions", dev.url)).send_json(stream_body).unwrap();
    let text = r.body_mut().read_to_string().unwrap();
    let streamed: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: ").and_then(|l| serde_json::from_str::<Value>(l).ok()))
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array().cloned())
        .flatten()
        .collect();
    assert_eq!(Value::Array(streamed), content(&direct), "{text}");
}

/// The official OpenAI Python client against crayond (issue #15): chat and completions, streamed and
/// not, logprobs, models list/retrieve, and the 400s for fields the server does not implement, as
/// the client surfaces them. Runs in the compat venv that scripts/test sets up.
#[test]
fn the_official_openai_client_works_against_crayond() {
    let Ok(python) = std::env::var("CRAYON_COMPAT_PYTHON") else {
        assert!(
            std::env::var_os("CRAYON_REQUIRE_COMPAT").is_none(),
            "CRAYON_COMPAT_PYTHON is not set: run through scripts/test"
        );
        eprintln!("skipped: the compat venv (openai) is not set up (scripts/test sets it up)");
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tiny_config(None, state.path(), ""));
    let script = common::repo().join("tests/clients/openai_client.py");
    let out = std::process::Command::new(python).arg(script).arg(format!("{}/v1", d.url)).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the client failed:\n{stderr}");
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(seen["stream_text"], seen["chat_text"], "streamed and not, the same greedy answer: {seen}");
    assert_eq!(seen["stream_logprobs"], seen["chat_logprobs"], "streamed log-probabilities: {seen}");
    assert_eq!(seen["completion_stream_text"], seen["completion_text"], "{seen}");
    let lps = seen["chat_logprobs"].as_array().unwrap();
    assert!(!lps.is_empty() && lps.iter().all(|t| t[2].as_array().unwrap().len() == 2), "{seen}");
    let tokens: Vec<&str> = seen["completion_tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(tokens.concat(), seen["completion_text"].as_str().unwrap(), "{seen}");
    assert_eq!(seen["n"], json!([0, 1]), "{seen}");
    assert_eq!(seen["n_stream_texts"], seen["n_texts"], "n = 2 streamed: the same two answers: {seen}");
    assert_eq!(seen["models"][0], "tiny");
    assert_eq!(seen["retrieved"], "tiny");
    assert_eq!(seen["missing_model"], 404);
    assert!(seen["tools"].as_str().unwrap().contains("'tools' is not supported"), "{seen}");
    assert!(seen["response_format"].as_str().unwrap().contains("'response_format'"), "{seen}");
}

/// OpenAI `n` (issue #15): several answers to one request, each sampled on its own (a seeded request
/// gives answer i the seed + i: reproducible, and different from each other); usage counts the prompt
/// once and every answer's tokens.
#[test]
fn n_answers_are_sampled_independently_and_reproducibly() {
    let state = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tiny_config(None, state.path(), ""));
    let body = json!({"prompt": "Once upon a time", "max_tokens": 8, "temperature": 1.0, "seed": 7, "n": 3});
    let (status, r) = d.post("/v1/completions", &body);
    assert_eq!(status, 200, "{r}");
    let choices = r["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3, "{r}");
    let texts: Vec<&str> = choices.iter().map(|c| c["text"].as_str().unwrap()).collect();
    assert!(choices.iter().enumerate().all(|(i, c)| c["index"] == i), "{r}");
    assert!(texts[0] != texts[1] || texts[1] != texts[2], "independent samples: {texts:?}");
    let (_, again) = d.post("/v1/completions", &body);
    let again: Vec<&str> = again["choices"].as_array().unwrap().iter().map(|c| c["text"].as_str().unwrap()).collect();
    assert_eq!(texts, again, "seeded: the same three answers again");
    // Answer i with seed + i is what a single request with that seed gives.
    let (_, second) = d.post(
        "/v1/completions",
        &json!({"prompt": "Once upon a time", "max_tokens": 8, "temperature": 1.0, "seed": 8}),
    );
    assert_eq!(second["choices"][0]["text"], texts[1]);
    let total: u64 = r["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((3..=24).contains(&total), "{r}");
    assert_eq!(r["crayon"]["choices_routes"].as_array().unwrap().len(), 3, "{r}");
}

/// Several prompts in one completions request (OpenAI's batch form): each answered in order, `n`
/// answers each, within server.max_n answers in all; usage counts each prompt once.
#[test]
fn a_completions_request_may_carry_several_prompts() {
    let state = tempfile::tempdir().unwrap();
    let d = Daemon::start(&tiny_config(None, state.path(), ""));
    let one = |p: &str| {
        let (_, r) = d.post("/v1/completions", &json!({"prompt": p, "max_tokens": 3, "temperature": 0}));
        (r["choices"][0]["text"].as_str().unwrap().to_string(), r["usage"]["prompt_tokens"].as_u64().unwrap())
    };
    let (a, pa) = one("The sky is");
    let (b, pb) = one("Two and two make");
    let (status, r) = d.post(
        "/v1/completions",
        &json!({"prompt": ["The sky is", "Two and two make"], "max_tokens": 3, "temperature": 0, "n": 2}),
    );
    assert_eq!(status, 200, "{r}");
    let texts: Vec<&str> = r["choices"].as_array().unwrap().iter().map(|c| c["text"].as_str().unwrap()).collect();
    assert_eq!(texts, vec![a.as_str(), a.as_str(), b.as_str(), b.as_str()], "{r}");
    assert_eq!(r["usage"]["prompt_tokens"].as_u64().unwrap(), pa + pb, "each prompt once: {r}");
    let (status, r) = d.post("/v1/completions", &json!({"prompt": ["a", "b", "c"], "max_tokens": 1, "n": 2}));
    assert_eq!(status, 400, "{r}");
    assert!(r["error"]["message"].as_str().unwrap().contains("3 prompts x n = 2 is 6 answers"), "{r}");
    // Streamed: each chunk names its answer (`index`), each answer ends with its own finish chunk.
    let mut streamed = common::daemon::agent()
        .post(&format!("{}/v1/completions", d.url))
        .send_json(json!({"prompt": ["The sky is", "Two and two make"], "max_tokens": 3, "temperature": 0, "n": 2,
                          "stream": true}))
        .unwrap();
    let body = streamed.body_mut().read_to_string().unwrap();
    let chunks: Vec<Value> =
        body.lines().filter_map(|l| l.strip_prefix("data: ").and_then(|l| serde_json::from_str(l).ok())).collect();
    let mut by_index = vec![String::new(); 4];
    let mut finished = vec![0; 4];
    for c in &chunks {
        let choice = &c["choices"][0];
        let i = choice["index"].as_u64().unwrap() as usize;
        by_index[i] += choice["text"].as_str().unwrap_or("");
        finished[i] += usize::from(choice["finish_reason"].is_string());
    }
    assert_eq!(by_index, vec![a.clone(), a.clone(), b.clone(), b.clone()], "{body}");
    assert_eq!(finished, vec![1; 4], "one finish chunk per answer: {body}");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    let (status, _) = d.post("/v1/completions", &json!({"prompt": [], "max_tokens": 1}));
    assert_eq!(status, 400);
}

/// Requests waiting on a slow server give their admission place back (issue #14): with every place
/// of `server.max_concurrent` taken by requests hanging on the server, a device-only request is
/// still answered at once instead of refused as busy.
#[test]
fn requests_waiting_on_the_server_do_not_keep_device_requests_out() {
    let f = FaultServer::start(Fault::Hang);
    let remote = "connect_timeout_ms = 1000\ntimeout_ms = 8000\nretries = 0\nretry_backoff_ms = 50\nbreaker_failures = 0\n\
                  [server]\nmax_concurrent = 2\nmax_concurrent_per_client = 8\n";
    let dev = std::sync::Arc::new(device(&f.url, "server_only", remote));
    let waiting: Vec<_> = (0..2)
        .map(|_| {
            let dev = dev.clone();
            std::thread::spawn(move || dev.post("/v1/completions", &json!({"prompt": "hi", "max_tokens": 2})))
        })
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while f.connections.load(std::sync::atomic::Ordering::SeqCst) < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(f.connections.load(std::sync::atomic::Ordering::SeqCst), 2, "both wait on the server");
    let (status, out) = dev.post(
        "/v1/completions",
        &json!({"prompt": "hi", "max_tokens": 2, "crayon": {"route": {"mode": "device_only"}}}),
    );
    assert_eq!(status, 200, "a device request is not kept out by requests waiting on the server: {out}");
    assert_eq!(route(&out), ("device", "device_only"), "{out}");
    for w in waiting {
        let (status, out) = w.join().unwrap();
        assert_eq!(status, 200, "{out}");
        assert!(out["crayon"]["fallback"].as_str().unwrap_or_default().contains("timed out"), "{out}");
    }
}

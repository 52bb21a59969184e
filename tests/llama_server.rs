//! The server side on llama.cpp (`[remote] kind = "llama-server"`): a real `llama-server` built from the
//! pinned llama-cpp-python sources, serving a model's GGUF with its pool converted to GGUF LoRA adapters
//! (`scripts/build-llama-server`), against a server `crayond` with the same model and pool. A device's blend
//! must give the same answer on both (greedy, token log-probabilities within float tolerance), and a plain
//! request on llama.cpp must get no adapter even though the server applies them all by default.
//!
//! `scripts/test` builds the fleet and sets CRAYON_REQUIRE_LLAMA_SERVER; without the build the tests say so
//! and are skipped, unless that variable is set (CI).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::daemon::{Daemon, PeerServer, tiny_config};
use serde_json::{Value, json};

fn fleet() -> Option<PathBuf> {
    let dir = common::repo().join("models/llama-server");
    if dir.join("bin/llama-server").is_file() {
        return Some(dir);
    }
    assert!(
        std::env::var_os("CRAYON_REQUIRE_LLAMA_SERVER").is_none(),
        "{} is missing: run scripts/build-llama-server",
        dir.display()
    );
    eprintln!("skipped: no llama-server build (scripts/build-llama-server; scripts/test runs it)");
    None
}

/// `llama-server` on a free loopback port with `gguf` and every adapter in `loras`, listed in reverse
/// order (ids must come from the listing, not from the order of the files) and applied at scale 1 by
/// default (a plain request must switch them off itself).
fn llama_server(fleet: &Path, gguf: &str, loras: &str) -> PeerServer {
    let mut adapters: Vec<PathBuf> = std::fs::read_dir(fleet.join("lora").join(loras))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
        .collect();
    adapters.sort();
    adapters.reverse();
    assert!(adapters.len() >= 2, "no adapters in {loras}: run scripts/build-llama-server");
    let mut cmd = Command::new(fleet.join("bin/llama-server"));
    cmd.arg("-m").arg(fleet.join(gguf));
    for a in &adapters {
        cmd.arg("--lora").arg(a);
    }
    cmd.args(["-c", "2048", "-t", "2", "-np", "1", "--no-webui"]);
    PeerServer::start(cmd, "/health")
}

/// The tokens and their log-probabilities of an answer's `logprobs` (completions shape, as the device
/// passes on the server's).
fn token_logprobs(answer: &Value) -> Vec<(String, f64)> {
    let lp = &answer["choices"][0]["logprobs"];
    let tokens = lp["tokens"].as_array().unwrap_or_else(|| panic!("no logprobs: {answer}"));
    tokens
        .iter()
        .zip(lp["token_logprobs"].as_array().unwrap())
        .map(|(t, l)| (t.as_str().unwrap().to_string(), l.as_f64().unwrap()))
        .collect()
}

/// Largest log-probability difference of two answers that chose the same tokens.
fn same_answer(a: &Value, b: &Value) -> f64 {
    let (x, y) = (token_logprobs(a), token_logprobs(b));
    assert_eq!(
        x.iter().map(|t| &t.0).collect::<Vec<_>>(),
        y.iter().map(|t| &t.0).collect::<Vec<_>>(),
        "different greedy answers:\n{a}\n{b}"
    );
    x.iter().zip(&y).map(|(p, q)| (p.1 - q.1).abs()).fold(0.0, f64::max)
}

#[test]
fn a_devices_blend_on_llama_server_matches_a_crayon_server() {
    let Some(fleet) = fleet() else { return };
    let llama = llama_server(&fleet, "tiny.gguf", "tiny-server-pool");
    let server_state = tempfile::tempdir().unwrap();
    let crayon =
        Daemon::start(&tiny_config(Some(&common::repo().join("models/tiny-server-pool")), server_state.path(), ""));
    // Two devices alike but for their server: the same examples make the same blend on both.
    let device = |url: &str, kind: &str, state: &Path| {
        Daemon::start(&tiny_config(
            Some(&common::repo().join("models/tiny-pool")),
            state,
            &format!("[router]\nmode = \"server_only\"\n[remote]\nurl = \"{url}\"\nkind = \"{kind}\"\n"),
        ))
    };
    let (s1, s2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let on_llama = device(&llama.url, "llama-server", s1.path());
    let on_crayon = device(&crayon.url, "crayon", s2.path());
    let examples = json!([
        {"input": "Question: What do plants need to grow?\nAnswer:", "output": " sunlight and water"},
        {"input": "Question: What gas do animals breathe in?\nAnswer:", "output": " oxygen"},
        {"input": "Question: What is the boiling point of water?\nAnswer:", "output": " 100 degrees Celsius"},
    ]);
    for d in [&on_llama, &on_crayon] {
        let (status, made) = d.post("/v1/crayon/adapters", &json!({"name": "science", "examples": examples}));
        assert_eq!(status, 200, "{made}");
    }

    let ask = |d: &Daemon, model: Option<&str>| {
        let mut body = json!({"prompt": "Question: What do fish breathe with?\nAnswer:", "max_tokens": 12,
                              "temperature": 0, "logprobs": 1});
        if let Some(m) = model {
            body["model"] = json!(m);
        }
        let (status, out) = d.post("/v1/completions", &body);
        assert_eq!(status, 200, "{out}");
        assert_eq!(out["crayon"]["answered_by"], "server", "{out}");
        out
    };
    let blended = (ask(&on_llama, Some("science")), ask(&on_crayon, Some("science")));
    assert_eq!(blended.0["crayon"]["server_blend"], true, "llama-server applied the blend: {}", blended.0);
    assert_eq!(blended.1["crayon"]["server_blend"], true, "{}", blended.1);
    let blend_diff = same_answer(&blended.0, &blended.1);
    let plain = (ask(&on_llama, None), ask(&on_crayon, None));
    assert_eq!(plain.0["crayon"]["server_blend"], false, "{}", plain.0);
    let plain_diff = same_answer(&plain.0, &plain.1);
    // float32 on both sides; the order of summation differs (plain answers are ~2e-3 apart here).
    let tolerance = 1e-2;
    assert!(blend_diff < tolerance && plain_diff < tolerance, "blend {blend_diff}, plain {plain_diff}");
    // The blend matters: its log-probabilities are not the plain model's (nor would be the sum of all
    // adapters at scale 1, which llama-server applies when a request says nothing).
    let moved = token_logprobs(&blended.0)
        .iter()
        .zip(token_logprobs(&plain.0))
        .map(|(a, b)| (a.1 - b.1).abs())
        .fold(0.0, f64::max);
    eprintln!("blend {blend_diff}, plain {plain_diff}, the blend moves log-probabilities by up to {moved}");
    assert!(moved > 10.0 * tolerance, "the blend moves the answer's log-probabilities ({moved})");
}

/// The real server model: Qwen2.5-Coder-0.5B-Instruct as published (GGUF) with its pool converted by
/// llama.cpp's own script, against crayond's float32 export of the same GGUF with the same pool, asked
/// through the device's client for one blend (the pool's reference weights, for the device pool it is
/// paired with).
#[test]
fn the_server_pool_on_llama_server_blends_as_crayond_merges_it() {
    use crayon::config::{GenerationConfig, RemoteConfig, RemoteKind};
    use crayon::generate::{GenerationParams, Prompt};
    use crayon::router::{RemoteClient, RemoteRequest};
    let Some(fleet) = fleet() else { return };
    let model = common::repo().join("models/qwen2.5-coder-0.5b-instruct");
    assert!(model.join("crayon_model.json").is_file(), "run scripts/export-server-model");
    let pool = common::repo().join("pools/qwen2.5-coder-0.5b-instruct");
    let manifest: Value = serde_json::from_str(&std::fs::read_to_string(pool.join("pool.json")).unwrap()).unwrap();
    let device_pool = manifest["paired_with"].as_str().unwrap().to_string();
    let weights = common::pool_reference(&pool).blend_weights;

    let llama = llama_server(&fleet, "qwen2.5-coder-0.5b-instruct.gguf", "qwen2.5-coder-0.5b-instruct");
    let state = tempfile::tempdir().unwrap();
    let crayon = Daemon::start(&format!(
        "[model]\ndir = {model:?}\n[runtime]\nort_library = {:?}\nintra_threads = 2\n[adapters]\nstate_dir = {:?}\n[pool]\ndir = {pool:?}\n",
        common::ort_library(),
        state.path()
    ));
    let mut params = GenerationParams::from_config(&GenerationConfig::default());
    params.max_new_tokens = 16;
    params.sampling.temperature = 0.0;
    params.logprobs = Some(1);
    let ask = |url: &str, kind: RemoteKind, prompt: &Prompt, blend: Option<(String, Vec<f32>)>| {
        let client =
            RemoteClient::new(&RemoteConfig { url: url.into(), kind, timeout_ms: 300_000, ..Default::default() })
                .unwrap();
        client.complete(&RemoteRequest { prompt, params: &params, blend, exemplars: None }).unwrap()
    };
    let blend = Some((device_pool, weights));
    let mut worst = 0.0f32;
    for question in [
        "Question: Which gas do plants take in from the air to make food?\nAnswer:",
        "Question: What is the largest planet in the solar system?\nAnswer:",
    ] {
        let prompt = Prompt::Text(question.into());
        let l = ask(&llama.url, RemoteKind::LlamaServer, &prompt, blend.clone());
        let c = ask(&crayon.url, RemoteKind::Crayon, &prompt, blend.clone());
        assert!(l.server_blend && c.server_blend, "both applied the blend");
        assert_eq!(l.text, c.text, "same greedy answer to {question:?}");
        assert_eq!(l.logprobs.len(), c.logprobs.len());
        let diff = l.logprobs.iter().zip(&c.logprobs).map(|(a, b)| (a.logprob - b.logprob).abs()).fold(0.0, f32::max);
        eprintln!("{question:?}: {:?}, max |logprob diff| {diff}", l.text);
        worst = worst.max(diff);
        let plain = ask(&llama.url, RemoteKind::LlamaServer, &prompt, None);
        assert!(!plain.server_blend);
        let moved =
            plain.logprobs.iter().zip(&l.logprobs).map(|(a, b)| (a.logprob - b.logprob).abs()).fold(0.0, f32::max);
        eprintln!("  plain {:?}: blend moves log-probabilities by up to {moved}", plain.text);
        assert!(moved > 0.4, "the blend changes the answer's log-probabilities ({moved})");
    }
    // llama.cpp computes with the GGUF's quantized blocks and 8-bit activations, crayond with the same
    // weights in float32: a few hundredths of a nat apart (0.08 at most here), far below what the blend
    // moves (about 1 nat).
    assert!(worst < 0.2, "llama-server vs crayond: max |logprob diff| {worst}");
}

/// A server that cannot apply the device's blend — a llama.cpp server without adapters for the device's
/// pool, or any plain OpenAI-compatible server — is steered by exemplars instead: the device puts a few
/// of its pool's public exemplars, drawn by the blend weights (`[pool] exemplars`), in front of the
/// question. A recording proxy shows what each server receives.
#[test]
fn exemplars_steer_a_server_that_cannot_apply_the_blend() {
    use common::daemon::{Fault, FaultServer};
    let Some(fleet) = fleet() else { return };
    let llama = llama_server(&fleet, "tiny.gguf", "tiny-server-pool"); // adapters for tiny-pool only
    let proxy = FaultServer::start(Fault::Record(llama.url.clone()));
    let pool = common::repo().join("models/tiny-task-pool");
    let manifest: Value = serde_json::from_str(&std::fs::read_to_string(pool.join("pool.json")).unwrap()).unwrap();
    let names: Vec<&str> =
        manifest["adapters"].as_array().unwrap().iter().map(|a| a["name"].as_str().unwrap()).collect();
    let dir = tempfile::tempdir().unwrap();
    let bank = dir.path().join("exemplars.json");
    let clusters: Vec<Value> = (0..names.len())
        .map(|k| json!([{"input": format!("Question: What does okapi number {k} eat?\nAnswer:"), "output": " leaves"}]))
        .collect();
    let bank_json = json!({"format": "crayon-exemplars/1", "pool_id": manifest["pool_id"], "adapters": names, "clusters": clusters});
    std::fs::write(&bank, bank_json.to_string()).unwrap();
    let question = "Question: What do fish breathe with?\nAnswer:";
    let last_sent = || -> Value { serde_json::from_str(proxy.requests.lock().unwrap().last().unwrap()).unwrap() };

    for kind in ["llama-server", "openai"] {
        let state = tempfile::tempdir().unwrap();
        let dev = Daemon::start(&tiny_config(
            Some(&pool),
            state.path(),
            &format!(
                "exemplars = {bank:?}\n[router]\nmode = \"server_only\"\n[remote]\nurl = \"{}\"\nkind = \"{kind}\"\n",
                proxy.url
            ),
        ));
        let examples = json!([{"input": "Question: What do birds eat?\nAnswer:", "output": " seeds"},
                              {"input": "Question: What do cows eat?\nAnswer:", "output": " grass"}]);
        let (status, made) = dev.post("/v1/crayon/adapters", &json!({"name": "animals", "examples": examples}));
        assert_eq!(status, 200, "{made}");
        let ask = |model: Option<&str>| {
            let mut body = json!({"prompt": question, "max_tokens": 4, "temperature": 0});
            if let Some(m) = model {
                body["model"] = json!(m);
            }
            let (status, out) = dev.post("/v1/completions", &body);
            assert_eq!(status, 200, "{out}");
            assert_eq!(out["crayon"]["answered_by"], "server", "{out}");
            out
        };
        let steered = ask(Some("animals"));
        assert_eq!(steered["crayon"]["server_blend"], true, "{kind}: steered by exemplars: {steered}");
        let sent = last_sent();
        let prompt = sent["prompt"].as_str().unwrap();
        assert!(prompt.contains("okapi number") && prompt.ends_with(question), "{kind}: {prompt:?}");
        assert!(sent.get("crayon").is_none(), "{kind}: {sent}");
        match kind {
            "llama-server" => {
                let lora = sent["lora"].as_array().unwrap_or_else(|| panic!("{sent}"));
                assert!(
                    !lora.is_empty() && lora.iter().all(|l| l["scale"] == 0.0),
                    "other pools' adapters off: {sent}"
                );
            }
            _ => assert!(sent.get("lora").is_none(), "{sent}"),
        }
        let plain = ask(None);
        assert_eq!(plain["crayon"]["server_blend"], false, "{plain}");
        assert_eq!(last_sent()["prompt"], question, "{kind}: a plain request is sent as it is");
    }
}

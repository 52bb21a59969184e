//! The server side on vLLM (`[remote] kind = "vllm"`). vLLM needs a GPU and cannot run here, so the two
//! halves are checked apart: the blend a device names (`crayon-blend.<pool id>.<weights>`), materialized as
//! one PEFT adapter by Crayon's resolver plugin (onnx-export/crayon_pool/vllm_blend.py) and loaded by PEFT,
//! gives the logits crayond's merged blend gives; and a device asks a (recording, canned) vLLM stand-in for
//! exactly that name, and for the plain model otherwise.

mod common;

use common::daemon::{Daemon, Fault, FaultServer, tiny_config};
use serde_json::{Value, json};

/// Weights from a blend name's hex digits (as the resolver reads them).
fn decode(name: &str) -> Vec<f32> {
    let hex = name.rsplit('.').next().unwrap();
    let raw: Vec<u32> = (0..hex.len()).step_by(4).map(|i| u32::from_str_radix(&hex[i..i + 4], 16).unwrap()).collect();
    let total: u32 = raw.iter().sum();
    raw.iter().map(|r| *r as f32 / total as f32).collect()
}

#[test]
fn a_blend_materialized_for_vllm_gives_crayonds_logits_under_peft() {
    let python = common::repo().join(".venv/bin/python");
    assert!(python.is_file(), "run scripts/setup");
    let pool = common::repo().join("models/tiny-server-pool");
    let model = common::model_dir("tiny");
    let r = common::pool_reference(&pool);
    let cache = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(&python)
        .arg(common::repo().join("tests/clients/vllm_blend_check.py"))
        .args([common::repo(), model.clone(), pool.clone()])
        .arg(serde_json::to_string(&r.blend_weights).unwrap())
        .arg(serde_json::to_string(&r.input_ids).unwrap())
        .arg(cache.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    let name = seen["name"].as_str().unwrap();
    let weights = decode(name);
    let py_weights: Vec<f32> = serde_json::from_value(seen["weights"].clone()).unwrap();
    assert!(weights.iter().zip(&py_weights).all(|(a, b)| (a - b).abs() < 1e-6), "{name}: {weights:?} {py_weights:?}");
    let ranks: usize = serde_json::from_str::<Value>(&std::fs::read_to_string(pool.join("pool.json")).unwrap())
        .unwrap()["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["rank"].as_u64().unwrap() as usize)
        .sum();
    assert_eq!(seen["rank"].as_u64().unwrap() as usize, ranks, "one adapter of rank Σr: {seen}");

    let mut cfg = common::config_for(&model);
    cfg.pool.dir = pool.clone();
    let state = tempfile::tempdir().unwrap();
    cfg.adapters.state_dir = state.path().to_path_buf();
    let mut engine = crayon::Engine::load(&cfg).unwrap();
    let vocab = engine.files().arch.vocab_size;
    engine.customize_weights("mix", &weights).unwrap();
    let merged = engine.logits(Some("mix"), &r.input_ids).unwrap();
    let last = common::last_rows(&merged, vocab, 1);
    let peft: Vec<f32> = serde_json::from_value(seen["logits"].clone()).unwrap();
    let diff = common::max_abs_diff(last, &peft);
    assert!(diff < 1e-3, "PEFT with the materialized adapter vs crayond's merged blend: max |diff| {diff}");
    let base = engine.logits(None, &r.input_ids).unwrap();
    let moved = common::max_abs_diff(common::last_rows(&base, vocab, 1), &peft);
    eprintln!("{name}: PEFT vs crayond max |logit diff| {diff}; the blend moves logits by {moved}");
    assert!(moved > 10.0 * diff, "the blend moves the logits ({moved}) well beyond the tolerance ({diff})");
}

#[test]
fn a_device_asks_vllm_for_its_blend_by_name() {
    let canned = r#"{"id":"x","object":"text_completion","model":"m","choices":[{"index":0,"text":" gills","finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":1}}"#;
    let vllm = FaultServer::start(Fault::Answer(canned.to_string()));
    let state = tempfile::tempdir().unwrap();
    let pool = common::repo().join("models/tiny-pool");
    let dev = Daemon::start(&tiny_config(
        Some(&pool),
        state.path(),
        &format!(
            "[router]\nmode = \"server_only\"\n[remote]\nurl = \"{}\"\nkind = \"vllm\"\nmodel = \"qwen\"\n",
            vllm.url
        ),
    ));
    let examples = json!([{"input": "Question: What do birds eat?\nAnswer:", "output": " seeds"}]);
    let (status, made) = dev.post("/v1/crayon/adapters", &json!({"name": "animals", "examples": examples}));
    assert_eq!(status, 200, "{made}");
    let weights: Vec<f32> =
        serde_json::from_value(made["adapter"]["weights"].clone()).unwrap_or_else(|_| panic!("{made}"));
    let ask = |model: Option<&str>| {
        let mut body = json!({"prompt": "Question: What do fish breathe with?\nAnswer:", "max_tokens": 4});
        if let Some(m) = model {
            body["model"] = json!(m);
        }
        let (status, out) = dev.post("/v1/completions", &body);
        assert_eq!(status, 200, "{out}");
        assert_eq!(out["choices"][0]["text"], " gills", "{out}");
        let sent: Value = serde_json::from_str(vllm.requests.lock().unwrap().last().unwrap()).unwrap();
        (out, sent)
    };
    let (out, sent) = ask(Some("animals"));
    assert_eq!(out["crayon"]["server_blend"], true, "{out}");
    let name = sent["model"].as_str().unwrap();
    let pool_id =
        serde_json::from_str::<Value>(&std::fs::read_to_string(pool.join("pool.json")).unwrap()).unwrap()["pool_id"]
            .as_str()
            .unwrap()
            .to_string();
    assert!(name.starts_with(&format!("crayon-blend.{pool_id}.")), "{sent}");
    let total: f32 = weights.iter().sum();
    for (a, b) in decode(name).iter().zip(&weights) {
        assert!((a - b / total).abs() < 2e-5, "{name} carries the adapter's weights {weights:?}");
    }
    assert!(sent.get("crayon").is_none() && sent.get("lora").is_none(), "nothing else about the blend: {sent}");
    let (out, sent) = ask(None);
    assert_eq!((sent["model"].as_str(), &out["crayon"]["server_blend"]), (Some("qwen"), &json!(false)), "{sent}");
}

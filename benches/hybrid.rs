//! Device–server routing benchmark (issue #4). Prints markdown tables:
//!
//! * `overhead`: what routing adds to a device request (adapter lookup, scope embedding, decision)
//!   against the local generation it precedes;
//! * `roundtrip`: a request offloaded through a device `crayond` to a server `crayond` on loopback,
//!   against the same request sent to the server directly (both real processes);
//! * `accuracy`: on a small QA set (`benches/qa_set.py`: ARC-Easy test questions in scope of a science
//!   customization, Winogrande/PIQA validation questions out of scope), accuracy of the customized
//!   device model alone, the server alone (plain and with the blend) and hybrid routing at several
//!   thresholds, with the share offloaded. Every device and server answer is computed once; the
//!   hybrid rows apply the routing policy to those scores, and a routed run through the real
//!   `Router` on a subset checks that the policy applied here is the one the service applies.
//!
//!     cargo bench --bench hybrid -- [--only overhead,roundtrip,accuracy] [--items N]
//!
//! Needs `scripts/setup` (device model), and for `accuracy` the server model and pool
//! (`scripts/export-server-model`, `pools/qwen2.5-coder-0.5b-instruct`).

use crayon::queue::EngineQueue;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use serde::Deserialize;
use serde_json::json;

mod common;
use common::{Daemon, pct};
use crayon::config::{RemoteConfig, RouteMode, Thresholds};
use crayon::router::{self, RemoteClient, RemoteRequest, RouteOverrides, Router};
use crayon::{CancelToken, Config, Engine, Example, GenerationParams, Prompt};

#[derive(Parser)]
struct Args {
    /// Sections (comma-separated): overhead, roundtrip, accuracy
    #[arg(long, value_delimiter = ',', default_value = "overhead,roundtrip,accuracy")]
    only: Vec<String>,
    /// Requests per latency measurement
    #[arg(long, default_value_t = 40)]
    runs: usize,
    /// Use only the first N questions of the QA set (0: all)
    #[arg(long, default_value_t = 0)]
    items: usize,
    /// Questions re-run through the real router to check the simulated policy
    #[arg(long, default_value_t = 40)]
    check_items: usize,
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Deserialize, Clone)]
struct Item {
    task: String,
    in_scope: bool,
    prompt: String,
    choices: Vec<String>,
    gold: String,
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt().with_env_filter("warn").with_writer(std::io::stderr).init();
    let out = repo().join("benches/out/hybrid");
    let py = std::process::Command::new(repo().join(".venv/bin/python"))
        .args(["benches/qa_set.py", &out.to_string_lossy()])
        .current_dir(repo())
        .status()
        .context("running benches/qa_set.py (run scripts/setup first)")?;
    anyhow::ensure!(py.success(), "benches/qa_set.py failed");
    let mut items: Vec<Item> = read_jsonl(&out.join("qa.jsonl"))?;
    if args.items > 0 {
        // Keep the in-scope / out-of-scope mix when cutting.
        let (ins, outs): (Vec<Item>, Vec<Item>) = items.into_iter().partition(|i| i.in_scope);
        let n_in = args.items * ins.len() / (ins.len() + outs.len());
        items = ins.into_iter().take(n_in).chain(outs.into_iter().take(args.items - n_in)).collect();
    }
    let examples: Vec<Example> = read_jsonl(&out.join("examples.jsonl"))?;
    println!(
        "Machine: x86-64, 2 cores, no GPU; {} intra-op threads per process. Device SmolLM2-135M-Instruct + pools/smollm2-135m-instruct.\n",
        args.threads
    );
    let tmp = tempfile::tempdir()?;
    let device_cfg =
        config(tmp.path(), "device", "smollm2-135m-instruct", "pools/smollm2-135m-instruct", args.threads)?;
    if args.only.iter().any(|s| s == "overhead") {
        overhead(&args, &device_cfg, &examples, &items)?;
    }
    if args.only.iter().any(|s| s == "roundtrip") {
        roundtrip(&args, tmp.path(), &examples, &items)?;
    }
    if args.only.iter().any(|s| s == "accuracy") {
        accuracy(&args, tmp.path(), &device_cfg, &examples, &items)?;
    }
    Ok(())
}

fn read_jsonl<T: for<'a> Deserialize<'a>>(path: &Path) -> anyhow::Result<Vec<T>> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    Ok(text.lines().filter(|l| !l.trim().is_empty()).map(serde_json::from_str).collect::<Result<_, _>>()?)
}

/// A config file for a model folder under models/ and a pool, with its own state directory.
fn config(dir: &Path, name: &str, model: &str, pool: &str, threads: usize) -> anyhow::Result<PathBuf> {
    let model_dir = repo().join("models").join(model);
    anyhow::ensure!(model_dir.join("crayon_model.json").is_file(), "{} is missing", model_dir.display());
    anyhow::ensure!(repo().join(pool).join("pool.json").is_file(), "{pool} is missing (not built yet?)");
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "[model]\ndir = {:?}\n[runtime]\nort_library = {:?}\nintra_threads = {threads}\n[pool]\ndir = {:?}\n[adapters]\nstate_dir = {:?}\n",
            model_dir,
            repo().join("models/lib/libonnxruntime.so.1.31.1"),
            repo().join(pool),
            dir.join(format!("{name}-state")),
        ),
    )?;
    Ok(path)
}

fn params(engine: &Engine, adapter: Option<&str>, choices: &[String]) -> GenerationParams {
    let mut p = engine.default_params();
    p.max_new_tokens = 1;
    p.adapter = adapter.map(str::to_string);
    p.choices = choices.to_vec();
    p
}

fn overhead(args: &Args, cfg: &Path, examples: &[Example], items: &[Item]) -> anyhow::Result<()> {
    let cfg = Config::load(cfg)?;
    let mut engine = Engine::load(&cfg)?;
    engine.customize("science", examples)?;
    let router = Router::new(&cfg)?;
    let engine = EngineQueue::new(engine, 1);
    let (mut routing, mut local) = (Vec::new(), Vec::new());
    for item in items.iter().cycle().take(args.runs + 3) {
        let req = router::Request {
            on_offload: None,
            prompt: Prompt::Text(item.prompt.clone()),
            params: params(&*engine.lock("bench", &CancelToken::new())?, Some("science"), &item.choices),
            overrides: RouteOverrides::default(),
        };
        let a = router.answer(&engine, "bench", &req, &CancelToken::new(), &mut |_| ControlFlow::Continue(()))?;
        routing.push(a.route.latency.routing_ms);
        local.push(a.route.latency.local_ms);
    }
    let (routing, local) = (routing[3..].to_vec(), local[3..].to_vec()); // first calls warm up
    println!(
        "### Routing overhead per request ({} requests, device model in-process, 1 answer token)\n",
        routing.len()
    );
    println!("| | p50 ms | p95 ms |\n|---|---|---|");
    println!(
        "| routing (adapter lookup, scope embedding, decision) | {:.2} | {:.2} |",
        pct(routing.clone(), 0.5),
        pct(routing.clone(), 0.95)
    );
    println!("| local generation it precedes | {:.1} | {:.1} |", pct(local.clone(), 0.5), pct(local.clone(), 0.95));
    println!("| ratio routing / generation | {:.4} | |\n", pct(routing, 0.5) / pct(local, 0.5));
    Ok(())
}

fn roundtrip(args: &Args, dir: &Path, examples: &[Example], items: &[Item]) -> anyhow::Result<()> {
    // The server runs the device model too: this measures transport and routing, not model speed.
    let server_cfg = config(dir, "rt-server", "smollm2-135m-instruct", "pools/smollm2-135m-instruct", args.threads)?;
    let server = Daemon::start(&server_cfg)?;
    let device_cfg = config(dir, "rt-device", "smollm2-135m-instruct", "pools/smollm2-135m-instruct", args.threads)?;
    let mut text = std::fs::read_to_string(&device_cfg)?;
    text += &format!("[router]\nmode = \"server_only\"\n[remote]\nurl = \"{}\"\n", server.url);
    std::fs::write(&device_cfg, text)?;
    let device = Daemon::start(&device_cfg)?;
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let post = |url: &str, body: &serde_json::Value| -> anyhow::Result<(f64, serde_json::Value)> {
        let t = Instant::now();
        let mut r = agent.post(url).send_json(body)?;
        let v: serde_json::Value = serde_json::from_str(&r.body_mut().read_to_string()?)?;
        anyhow::ensure!(r.status() == 200, "{url}: {v}");
        Ok((t.elapsed().as_secs_f64() * 1e3, v))
    };
    let ex: Vec<serde_json::Value> = examples.iter().map(|e| json!({"input": e.input, "output": e.output})).collect();
    let (_, made) = post(&format!("{}/v1/crayon/adapters", device.url), &json!({"name": "science", "examples": ex}))?;
    let blend = json!({"pool_id": made["adapter"]["pool_id"], "weights": made["adapter"]["weights"]});
    let (mut via, mut direct, mut remote_ms) = (Vec::new(), Vec::new(), Vec::new());
    for (i, item) in items.iter().cycle().take(args.runs + 3).enumerate() {
        let prompt = &item.prompt;
        let (d, v) = post(
            &format!("{}/v1/completions", device.url),
            &json!({"model": "science", "prompt": prompt, "max_tokens": 1, "temperature": 0}),
        )?;
        anyhow::ensure!(v["crayon"]["answered_by"] == "server", "not offloaded: {v}");
        let mut body = json!({"prompt": prompt, "max_tokens": 1, "temperature": 0, "crayon": blend.clone()});
        body["crayon"]["route"] = json!({"mode": "device_only"});
        let (s, _) = post(&format!("{}/v1/completions", server.url), &body)?;
        if i >= 3 {
            via.push(d);
            direct.push(s);
            remote_ms.push(v["crayon"]["latency"]["remote_ms"].as_f64().unwrap_or(f64::NAN));
        }
    }
    println!(
        "### Loopback offload round trip ({} requests each, interleaved; server = the same 135M model, 1 answer token)\n",
        via.len()
    );
    println!("| path | p50 ms | p95 ms |\n|---|---|---|");
    println!(
        "| client → server (direct, with the blend) | {:.1} | {:.1} |",
        pct(direct.clone(), 0.5),
        pct(direct.clone(), 0.95)
    );
    println!(
        "| client → device → server → device → client | {:.1} | {:.1} |",
        pct(via.clone(), 0.5),
        pct(via.clone(), 0.95)
    );
    println!(
        "| device's own server call (remote_ms) | {:.1} | {:.1} |",
        pct(remote_ms.clone(), 0.5),
        pct(remote_ms, 0.95)
    );
    println!(
        "| **overhead of going through the device** (p50 difference) | {:.1} | |\n",
        pct(via, 0.5) - pct(direct, 0.5)
    );
    Ok(())
}

/// Per question: what the device and the server answer and how sure the device is.
struct Scored {
    in_scope: bool,
    device_right: bool,
    base_right: bool,
    confidence: f32,
    scope: f32,
    server_blend_right: bool,
    server_plain_right: bool,
}

fn accuracy(args: &Args, dir: &Path, device_cfg: &Path, examples: &[Example], items: &[Item]) -> anyhow::Result<()> {
    let server_cfg =
        config(dir, "qa-server", "qwen2.5-coder-0.5b-instruct", "pools/qwen2.5-coder-0.5b-instruct", args.threads)?;
    let t0 = Instant::now();
    let server = Daemon::start(&server_cfg)?;
    let cfg = Config::load(device_cfg)?;
    let mut engine = Engine::load(&cfg)?;
    engine.customize("science", examples)?;
    let choices_letters = |i: &Item| i.choices.clone();
    let cal = router::calibrate(
        &mut engine,
        cfg.router.thresholds,
        "science",
        examples,
        &["A", "B", "C", "D"].map(String::from),
        &CancelToken::new(),
    )?;
    let adapter = engine.adapter("science")?.clone();
    let remote =
        RemoteClient::new(&RemoteConfig { url: server.url.clone(), timeout_ms: 600_000, ..RemoteConfig::default() })?;
    let mut scored = Vec::with_capacity(items.len());
    let mut device_ms = Vec::new();
    let mut server_ms = Vec::new();
    for (n, item) in items.iter().enumerate() {
        let prompt = Prompt::Text(item.prompt.clone());
        let ch = choices_letters(item);
        let t = Instant::now();
        let g = engine.generate(&prompt, &params(&engine, Some("science"), &ch), &CancelToken::new(), &mut |_| {
            ControlFlow::Continue(())
        })?;
        device_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let base = engine
            .generate(&prompt, &params(&engine, None, &ch), &CancelToken::new(), &mut |_| ControlFlow::Continue(()))?;
        let q = engine.task_embedding(&item.prompt)?.context("no embedding")?;
        let scope = router::scope(&q, &adapter.example_embeddings).unwrap_or(-1.0);
        let confidence = router::confidence(&g).map_or(0.0, |c| c.value);
        let p = params(&engine, Some("science"), &ch);
        let ask = |blend: Option<(String, Vec<f32>)>| -> anyhow::Result<Option<String>> {
            let a = remote.complete(&RemoteRequest { prompt: &prompt, params: &p, blend, exemplars: None })?;
            Ok(a.choice.or_else(|| router::parse_choice(&ch, &a.text)))
        };
        let t = Instant::now();
        let sb = ask(Some((adapter.pool_id.clone(), adapter.weights.clone())))?;
        server_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let sp = ask(None)?;
        let right = |c: Option<String>| c.is_some_and(|c| c == item.gold);
        scored.push(Scored {
            in_scope: item.in_scope,
            device_right: right(router::best_choice(&ch, &g.choice_probs)),
            base_right: right(router::best_choice(&ch, &base.choice_probs)),
            confidence,
            scope,
            server_blend_right: right(sb),
            server_plain_right: right(sp),
        });
        if (n + 1) % 20 == 0 {
            eprintln!(
                "[hybrid bench] {}/{} questions scored ({:.0} s)",
                n + 1,
                items.len(),
                t0.elapsed().as_secs_f64()
            );
        }
    }
    let checked = check_policy(args, &cfg, &server.url, engine, &cal.thresholds, &scored, items)?;
    report(&scored, &cal, items, &device_ms, &server_ms, checked, t0.elapsed().as_secs_f64());
    Ok(())
}

/// What the policy decides for one question: (offloaded, blended on the server).
fn decide(s: &Scored, t: &Thresholds) -> (bool, bool) {
    if s.scope < t.min_scope {
        (true, false)
    } else if s.confidence < t.min_choice_confidence {
        (true, true)
    } else {
        (false, false)
    }
}

fn outcome(s: &Scored, t: &Thresholds) -> (bool, bool) {
    match decide(s, t) {
        (false, _) => (s.device_right, false),
        (true, true) => (s.server_blend_right, true),
        (true, false) => (s.server_plain_right, true),
    }
}

/// Runs the first questions through the real `Router` (hybrid, calibrated thresholds, the same server)
/// and counts how many routing decisions and answers agree with the policy applied by `outcome`.
fn check_policy(
    args: &Args,
    cfg: &Config,
    server: &str,
    engine: Engine,
    t: &Thresholds,
    scored: &[Scored],
    items: &[Item],
) -> anyhow::Result<(usize, usize)> {
    let mut cfg = cfg.clone();
    cfg.router.mode = RouteMode::Hybrid;
    cfg.remote.url = server.to_string();
    cfg.remote.timeout_ms = 600_000;
    let router = Router::new(&cfg)?;
    let engine = EngineQueue::new(engine, 1);
    let mut agree = 0;
    let n = args.check_items.min(items.len());
    for (s, item) in scored.iter().zip(items).take(n) {
        let req = router::Request {
            on_offload: None,
            prompt: Prompt::Text(item.prompt.clone()),
            params: params(&*engine.lock("bench", &CancelToken::new())?, Some("science"), &item.choices),
            overrides: RouteOverrides {
                min_scope: Some(t.min_scope),
                min_choice_confidence: Some(t.min_choice_confidence),
                ..Default::default()
            },
        };
        let a = router.answer(&engine, "bench", &req, &CancelToken::new(), &mut |_| ControlFlow::Continue(()))?;
        let offloaded = a.route.answered_by == router::AnsweredBy::Server;
        let right = a.choice.as_deref() == Some(item.gold.as_str());
        if offloaded == decide(s, t).0 && right == outcome(s, t).0 {
            agree += 1;
        }
    }
    Ok((agree, n))
}

fn report(
    scored: &[Scored],
    cal: &router::Calibration,
    items: &[Item],
    device_ms: &[f64],
    server_ms: &[f64],
    checked: (usize, usize),
    seconds: f64,
) {
    let n = scored.len() as f64;
    let acc = |f: &dyn Fn(&Scored) -> bool| 100.0 * scored.iter().filter(|s| f(s)).count() as f64 / n;
    let n_in = scored.iter().filter(|s| s.in_scope).count();
    let tasks: std::collections::BTreeMap<&str, usize> = items.iter().fold(Default::default(), |mut m, i| {
        *m.entry(i.task.as_str()).or_default() += 1;
        m
    });
    println!(
        "### Accuracy: device, server, hybrid ({} questions: {tasks:?}; {n_in} in scope of the science customization; server Qwen2.5-Coder-0.5B-Instruct + pools/qwen2.5-coder-0.5b-instruct; {seconds:.0} s)\n",
        scored.len()
    );
    println!("| method | accuracy % | offloaded % | in-scope acc. % | out-of-scope acc. % |\n|---|---|---|---|---|");
    let split = |f: &dyn Fn(&Scored) -> bool, scope: bool| {
        let part: Vec<&Scored> = scored.iter().filter(|s| s.in_scope == scope).collect();
        100.0 * part.iter().filter(|s| f(s)).count() as f64 / part.len().max(1) as f64
    };
    let row = |name: &str, f: &dyn Fn(&Scored) -> bool, off: f64| {
        println!("| {name} | {:.1} | {off:.0} | {:.1} | {:.1} |", acc(f), split(f, true), split(f, false));
    };
    row("device base model (no customization)", &|s| s.base_right, 0.0);
    row("device, customized (device only)", &|s| s.device_right, 0.0);
    row("server plain model (server only)", &|s| s.server_plain_right, 100.0);
    row("server with the blend (server only)", &|s| s.server_blend_right, 100.0);
    // The policy's variant that sends unsure in-scope questions to the *plain* server model too.
    for &min_choice_confidence in &[0.05, 0.1, 0.2, 0.3] {
        let t = Thresholds { min_scope: -1.0, min_choice_confidence, ..Thresholds::default() };
        let plain = |s: &Scored| if decide(s, &t).0 { s.server_plain_right } else { s.device_right };
        let off = 100.0 * scored.iter().filter(|s| decide(s, &t).0).count() as f64 / n;
        row(&format!("hybrid, unsure → plain server, min_choice_confidence {min_choice_confidence:.2}"), &plain, off);
    }
    let scopes = [cal.thresholds.min_scope, 0.2, -1.0];
    let margins = [0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.01];
    for &min_scope in &scopes {
        for &min_choice_confidence in &margins {
            let t = Thresholds { min_scope, min_choice_confidence, ..Thresholds::default() };
            let off = 100.0 * scored.iter().filter(|s| decide(s, &t).0).count() as f64 / n;
            row(
                &format!("hybrid, min_scope {min_scope:.2}, min_choice_confidence {min_choice_confidence:.2}"),
                &|s| outcome(s, &t).0,
                off,
            );
        }
    }
    let in_scope_scopes: Vec<f64> = scored.iter().filter(|s| s.in_scope).map(|s| f64::from(s.scope)).collect();
    let out_scopes: Vec<f64> = scored.iter().filter(|s| !s.in_scope).map(|s| f64::from(s.scope)).collect();
    println!(
        "\nCalibrated from the 5 examples: min_scope {:.3}, min_choice_confidence {:.3} (example scopes {:?}, example confidence/right {:?}).",
        cal.thresholds.min_scope, cal.thresholds.min_choice_confidence, cal.example_scopes, cal.example_confidence
    );
    println!(
        "Scope p5/p50/p95: in-scope questions {:.2}/{:.2}/{:.2}, out-of-scope {:.2}/{:.2}/{:.2}.",
        pct(in_scope_scopes.clone(), 0.05),
        pct(in_scope_scopes.clone(), 0.5),
        pct(in_scope_scopes, 0.95),
        pct(out_scopes.clone(), 0.05),
        pct(out_scopes.clone(), 0.5),
        pct(out_scopes, 0.95)
    );
    println!(
        "Per question p50: device {:.0} ms, server with blend {:.0} ms. Policy check through the real router: {}/{} questions routed and answered as above (calibrated thresholds).",
        pct(device_ms.to_vec(), 0.5),
        pct(server_ms.to_vec(), 0.5),
        checked.0,
        checked.1
    );
}

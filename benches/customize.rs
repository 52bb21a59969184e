//! Customization benchmark on the real model and pool (issue #3). Prints markdown tables:
//! blend-to-ready latency for pools of 4/8/16/32 adapters, switch latency between cached blends,
//! prefill/decode speed with a merged blend against the base, resident memory with 0/1/4 cached
//! blends, and the peer: a LoraHub-style gradient-free search of the blend weights (40 steps).
//! `churn` builds more blends than `adapters.cache_mb` holds (from weights, as a server does, so it
//! also runs on a server pool) and prints resident memory after each, with `runtime.share_weights` on
//! and off, each in a fresh process.
//!
//!     cargo bench --bench customize -- --config crayon.dev.toml [--runs 5] [--threads 2]
//!     cargo bench --bench customize -- --config server.toml --only churn [--blends 8]
//!
//! Pools larger than the trained one reuse its adapters under new names (latency depends on count
//! and rank, not on the values).

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Parser;

mod common;
use common::{few_shot_loss, pct, search_weights};
use crayon::cli::CommonArgs;
use crayon::sampler::{Sampler, SamplingParams};
use crayon::{Config, Engine, Example};

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Prompt tokens and new tokens for the speed comparison
    #[arg(long, default_value_t = 367)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 64)]
    new_tokens: usize,
    /// Optimization steps of the LoraHub-style search
    #[arg(long, default_value_t = 40)]
    search_steps: usize,
    /// Sections to run (comma-separated): memory, ready, switch, speed, search, churn, fidelity (a 4-bit
    /// model's merged blends against the float32 model's, needs --float-model)
    #[arg(long, value_delimiter = ',', default_value = "memory,ready,switch,speed,search")]
    only: Vec<String>,
    /// Blends the churn section builds one after the other
    #[arg(long, default_value_t = 8)]
    blends: usize,
    /// The float32 folder the fidelity section compares a 4-bit model (--model / model.dir) against
    #[arg(long)]
    float_model: Option<PathBuf>,
    /// Internal: run one churn variant in this process (share_weights = VALUE) and print JSON lines
    #[arg(long, hide = true)]
    churn_child: Option<bool>,
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    args.common.init_logging("warn");
    let mut cfg = args.common.load_config()?;
    anyhow::ensure!(!cfg.pool.dir.as_os_str().is_empty(), "the config names no [pool] dir");
    let state = tempfile::tempdir()?;
    cfg.adapters.state_dir = state.path().to_path_buf();
    if let Some(share) = args.churn_child {
        cfg.runtime.share_weights = share;
        return churn_child(&cfg, args.blends);
    }
    let examples = task_examples()?;
    println!(
        "Model {}, pool {}, {} examples per customization, {} threads, {} runs; x86-64 2 cores.\n",
        cfg.model.dir.display(),
        cfg.pool.dir.display(),
        examples.len(),
        cfg.runtime.intra_threads,
        args.runs
    );

    let on = |s: &str| args.only.iter().any(|o| o == s);
    let mut summary = serde_json::Map::new();
    summary.insert("model".into(), cfg.model.dir.display().to_string().into());
    summary.insert("pool".into(), cfg.pool.dir.display().to_string().into());
    summary.insert("threads".into(), cfg.runtime.intra_threads.into());
    summary.insert("runs".into(), args.runs.into());
    weight_sizes(&cfg, &mut summary)?;
    if on("churn") {
        churn(&args, &cfg)?;
    }
    if args.only.iter().all(|o| o == "churn") {
        return Ok(());
    }
    if on("memory") {
        memory(&cfg, &examples, &mut summary)?; // first: a fresh process, before other engines take memory
    }
    if on("ready") {
        blend_to_ready(&cfg, &examples, args.runs, &mut summary)?;
    }
    let mut engine = Engine::load(&cfg)?;
    if on("switch") || on("speed") {
        engine.customize("a", &examples)?;
    }
    if on("switch") {
        switch_latency(&mut engine, &examples, args.runs)?;
    }
    if on("speed") {
        speed(&mut engine, args.prompt_tokens, args.new_tokens, args.runs, &mut summary)?;
    }
    if ["memory", "ready", "speed"].iter().all(|s| on(s)) {
        let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/data/customize-benchmark.json");
        std::fs::write(&out, serde_json::to_string_pretty(&summary)? + "\n")?;
        println!("(medians written to {})\n", out.display());
    }
    if on("search") {
        lorahub_search(&mut engine, &examples, args.search_steps)?;
    }
    if on("fidelity") {
        drop(engine);
        let float = args.float_model.as_deref().ok_or_else(|| anyhow::anyhow!("fidelity needs --float-model DIR"))?;
        fidelity(&cfg, float, &examples)?;
    }
    Ok(())
}

/// How much of a blend survives re-quantizing the merged matrices to 4 bits: the same blend weights
/// merged into the float32 model and into the 4-bit one, compared at every position of a text: the
/// science examples followed by the README's prose (512 tokens).
fn fidelity(cfg: &Config, float_model: &Path, examples: &[Example]) -> anyhow::Result<()> {
    let mut fcfg = cfg.clone();
    fcfg.model.dir = float_model.to_path_buf();
    let (mut q, mut f) = (Engine::load(cfg)?, Engine::load(&fcfg)?);
    anyhow::ensure!(
        q.files().manifest.precision == crayon::model::Precision::Q4
            && f.files().manifest.precision == crayon::model::Precision::F32,
        "fidelity compares a 4-bit --model with a float32 --float-model"
    );
    let mut text: String = examples.iter().map(|e| format!("{}{}\n\n", e.input, e.output)).collect();
    text.push_str(&std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))?);
    let mut ids = f.tokenizer().encode(&text)?;
    ids.truncate(512);
    let vocab = f.files().arch.vocab_size;
    let n = f.pool().map_or(0, |p| p.adapters.len());
    let mut blends: Vec<(String, Vec<f32>)> = (0..n.min(4))
        .map(|i| {
            let mut w = vec![0.0; n];
            w[i] = 1.0;
            (format!("adapter {i} alone"), w)
        })
        .collect();
    blends.push(("uniform".into(), vec![1.0 / n as f32; n]));
    let made = f.customize("from-examples", examples)?;
    blends.push(("from examples/science.jsonl".into(), made.customization.weights.clone()));

    let top1 = |l: &[f32]| common::top_tokens(l, vocab);
    let agree = common::agreement;
    let (fb, qb) = (f.logits(None, &ids)?, q.logits(None, &ids)?);
    let (fb1, qb1) = (top1(&fb), top1(&qb));
    println!(
        "## Blends on the 4-bit model (unmerged low-rank path) vs merged into the float32 model ({} positions)\n",
        ids.len()
    );
    println!("Base models: top-1 agreement {:.1}%.\n", 100.0 * agree(&qb1, &fb1));
    println!(
        "| blend | top-1 agreement, 4-bit blend (unmerged) vs merged float32 | float32 blend's top-1 changes kept | correlation of logit changes |"
    );
    println!("|---|---|---|---|");
    let mut rows = Vec::new();
    for (label, w) in &blends {
        f.customize_weights("x", w)?;
        q.customize_weights("x", w)?;
        let (fm, qm) = (f.logits(Some("x"), &ids)?, q.logits(Some("x"), &ids)?);
        let (fm1, qm1) = (top1(&fm), top1(&qm));
        let changed: Vec<usize> = (0..fm1.len()).filter(|&i| fm1[i] != fb1[i]).collect();
        let kept = changed.iter().filter(|&&i| qm1[i] == fm1[i]).count() as f64 / changed.len().max(1) as f64;
        let df: Vec<f32> = fm.iter().zip(&fb).map(|(a, b)| a - b).collect();
        let dq: Vec<f32> = qm.iter().zip(&qb).map(|(a, b)| a - b).collect();
        let corr = correlation(&dq, &df);
        let a = agree(&qm1, &fm1);
        println!("| {label} | {:.1}% | {:.1}% of {} | {corr:.3} |", 100.0 * a, 100.0 * kept, changed.len());
        rows.push(serde_json::json!({"blend": label, "top1_agreement": a, "changes_kept": kept,
            "changes": changed.len(), "delta_correlation": corr}));
    }
    println!();
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/data/quantized-merge-fidelity.json");
    let doc = serde_json::json!({"positions": ids.len(), "base_top1_agreement": agree(&qb1, &fb1),
        "model": cfg.model.dir.display().to_string(), "float_model": float_model.display().to_string(), "blends": rows});
    std::fs::write(&out, serde_json::to_string_pretty(&doc)? + "\n")?;
    println!("(written to {})\n", out.display());
    Ok(())
}

fn correlation(a: &[f32], b: &[f32]) -> f64 {
    let n = a.len() as f64;
    let ma = a.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let mb = b.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let (mut ab, mut aa, mut bb) = (0.0, 0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        let (dx, dy) = (f64::from(x) - ma, f64::from(y) - mb);
        ab += dx * dy;
        aa += dx * dx;
        bb += dy * dy;
    }
    ab / (aa * bb).sqrt().max(1e-30)
}

/// The five examples of `examples/science.jsonl` (ARC-style science questions, the pool's format).
fn task_examples() -> anyhow::Result<Vec<Example>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/science.jsonl");
    let text = std::fs::read_to_string(&path)?;
    Ok(text.lines().filter(|l| !l.trim().is_empty()).map(serde_json::from_str).collect::<Result<_, _>>()?)
}

/// A pool.json listing `n` adapters, cycling over the real pool's adapter folders.
fn scaled_pool(real: &Path, n: usize, into: &Path) -> anyhow::Result<PathBuf> {
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(real.join("pool.json"))?)?;
    let src = v["adapters"].as_array().cloned().unwrap_or_default();
    anyhow::ensure!(!src.is_empty(), "empty pool");
    let adapters: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            let mut a = src[i % src.len()].clone();
            let dir = real.join(a["dir"].as_str().unwrap_or_default());
            a["name"] = format!("b{i:02}").into();
            a["dir"] = dir.display().to_string().into();
            a
        })
        .collect();
    v["adapters"] = adapters.into();
    v["pool_id"] = format!("bench-{n}").into();
    let dir = into.join(format!("pool{n}"));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("pool.json"), v.to_string())?;
    Ok(dir)
}

type Summary = serde_json::Map<String, serde_json::Value>;

/// The model's weight bytes and those of its adapter-targetable matrices, as stored.
fn weight_sizes(cfg: &Config, summary: &mut Summary) -> anyhow::Result<()> {
    let files = crayon::model::ModelFiles::open(&cfg.model.dir)?;
    let weights = crayon::weights::WeightFile::open(&files.path(&files.manifest.weights))?;
    let bytes =
        |name: &str| weights.info(name).map_or(0, |i| i.shape.iter().product::<usize>() * i.dtype.bitsize() / 8);
    let targets: usize =
        files.target_weight_names().iter().flat_map(|w| files.initializer_names(w)).map(|n| bytes(&n)).sum();
    let total = std::fs::metadata(files.path(&files.manifest.weights))?.len() as f64;
    summary.insert("precision".into(), format!("{:?}", files.manifest.precision).to_lowercase().into());
    summary.insert("quantized_weight_mb".into(), (total / MB).into());
    summary.insert("target_matrix_mb".into(), (targets as f64 / MB).into());
    Ok(())
}

const MB: f64 = 1024.0 * 1024.0;

fn blend_to_ready(cfg: &Config, examples: &[Example], runs: usize, summary: &mut Summary) -> anyhow::Result<()> {
    println!("## Blend-to-ready (examples in -> customized model ready to serve) and to its first token\n");
    println!("First token: customize, then the first token of a question (the first example's input).\n");
    println!(
        "| adapters in pool | p50 ms | p95 ms | embed+blend ms (p50) | merge ms (p50) | session ms (p50) | first token ms (p50) |"
    );
    println!("|---|---|---|---|---|---|---|");
    let tmp = tempfile::tempdir()?;
    for n in [4, 8, 16, 32] {
        let mut c = cfg.clone();
        c.pool.dir = scaled_pool(&cfg.pool.dir, n, tmp.path())?;
        c.adapters.cache_mb = 0; // keep one ready model: measure the work, not the memory
        let mut engine = Engine::load(&c)?;
        let question = engine.prompt_ids(&crayon::Prompt::Text(examples[0].input.clone()))?;
        let (mut total, mut embed, mut merge, mut session, mut first) = (vec![], vec![], vec![], vec![], vec![]);
        for r in 0..runs + 1 {
            let t = Instant::now();
            let rep = engine.customize(&format!("t{r}"), examples)?;
            engine.logits(Some(&format!("t{r}")), &question)?;
            let first_ms = t.elapsed().as_secs_f64() * 1e3;
            if r > 0 {
                total.push(rep.total_ms);
                embed.push(rep.embed_ms);
                merge.push(rep.merge_ms);
                session.push(rep.session_ms);
                first.push(first_ms);
            }
        }
        let (ready_p50, first_p50) = (pct(total.clone(), 0.5), pct(first, 0.5));
        println!(
            "| {n} | {ready_p50:.0} | {:.0} | {:.1} | {:.0} | {:.0} | {first_p50:.0} |",
            pct(total, 0.95),
            pct(embed, 0.5),
            pct(merge, 0.5),
            pct(session, 0.5)
        );
        if n == 8 {
            summary.insert("merged_ready_ms_p50".into(), ready_p50.into());
            summary.insert("first_token_ms_p50".into(), first_p50.into());
        } else {
            summary.insert(format!("first_token_ms_p50_{n}_adapters"), first_p50.into());
        }
    }
    println!();
    Ok(())
}

fn switch_latency(engine: &mut Engine, examples: &[Example], runs: usize) -> anyhow::Result<()> {
    engine.customize("b", &examples[..2])?;
    let one = [1u32];
    let mut time = |name: &str| -> anyhow::Result<f64> {
        let t = Instant::now();
        engine.logits(Some(name), &one)?;
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    let (mut same, mut switch) = (vec![], vec![]);
    time("a")?;
    for _ in 0..runs * 4 {
        same.push(time("a")?);
        switch.push(time("b")?);
        switch.push(time("a")?);
    }
    println!("## Switching between two cached blends (one-token forward, ms)\n");
    println!("| request | p50 ms | p95 ms |\n|---|---|---|");
    println!("| same blend as previous request | {:.2} | {:.2} |", pct(same.clone(), 0.5), pct(same, 0.95));
    println!("| other cached blend | {:.2} | {:.2} |\n", pct(switch.clone(), 0.5), pct(switch, 0.95));
    Ok(())
}

fn speed(
    engine: &mut Engine,
    prompt_tokens: usize,
    new_tokens: usize,
    runs: usize,
    summary: &mut Summary,
) -> anyhow::Result<()> {
    let text = "The history of the printing press begins in the fifteenth century, when movable metal type made it possible to reproduce books quickly and cheaply. ";
    let mut ids = Vec::new();
    while ids.len() < prompt_tokens {
        ids.extend(engine.tokenizer().encode(text)?);
    }
    ids.truncate(prompt_tokens);
    println!(
        "## Speed with a merged blend vs the base model ({prompt_tokens}-token prompt, {new_tokens} new tokens)\n"
    );
    println!("| model | prefill tok/s (median) | decode tok/s (median) |\n|---|---|---|");
    let mut decode = Vec::new();
    for adapter in [None, Some("a")] {
        let dec = engine.decoder_for(adapter)?;
        let (mut pre, mut de) = (vec![], vec![]);
        for r in 0..runs + 1 {
            let mut cache = dec.new_cache()?;
            let mut sampler = Sampler::new(SamplingParams::default());
            let t = Instant::now();
            let mut logits = dec.forward(&ids, &mut cache, 1, None)?;
            let p = t.elapsed().as_secs_f64();
            let t = Instant::now();
            for _ in 0..new_tokens {
                let tok = sampler.sample(&logits).token;
                logits = dec.forward(&[tok], &mut cache, 1, None)?;
            }
            if r > 0 {
                pre.push(ids.len() as f64 / p);
                de.push(new_tokens as f64 / t.elapsed().as_secs_f64());
            }
        }
        decode.push(pct(de.clone(), 0.5));
        println!(
            "| {} | {:.0} | {:.1} |",
            adapter.map_or("base".into(), |a| format!("blend '{a}'")),
            pct(pre, 0.5),
            pct(de, 0.5)
        );
    }
    println!();
    summary.insert("merged_vs_base_decode_ratio".into(), (decode[1] / decode[0]).into());
    summary.insert("base_decode_tok_s".into(), decode[0].into());
    Ok(())
}

fn rss_mb() -> f64 {
    common::status_mb("VmRSS").unwrap_or(0.0)
}

fn memory(cfg: &Config, examples: &[Example], summary: &mut Summary) -> anyhow::Result<()> {
    let mut c = cfg.clone();
    c.adapters.cache_mb = 1 << 20;
    let before = rss_mb();
    let mut engine = Engine::load(&c)?;
    engine.logits(None, &[1])?;
    println!("## Resident memory (VmRSS) with cached blends\n");
    println!("| cached blends | RSS MB | per cached blend MB |\n|---|---|---|");
    let base = rss_mb();
    let mb = |f: &str| common::status_mb(f).unwrap_or(f64::NAN);
    println!(
        "| 0 (base model loaded; process before loading: {before:.0}; anonymous {:.0}, file-backed {:.0}) | {base:.0} | |",
        mb("RssAnon"),
        mb("RssFile")
    );
    let mut per_blend = 0.0;
    for i in 0..4 {
        engine.customize(&format!("m{i}"), &examples[..=i])?;
        engine.logits(Some(&format!("m{i}")), &[1])?;
        if i == 0 || i == 3 {
            let now = rss_mb();
            per_blend = (now - base) / (i + 1) as f64;
            println!("| {} | {now:.0} | {per_blend:.0} |", i + 1);
        }
    }
    println!();
    summary.insert("base_rss_mb".into(), base.into());
    summary.insert("mb_per_cached_blend".into(), per_blend.into());
    if engine.files().manifest.precision == crayon::model::Precision::Q4 {
        let counted = engine.ready_bytes("m3").unwrap_or(0) as f64 / MB;
        summary.insert("mb_per_unmerged_blend".into(), counted.into());
    }
    Ok(())
}

/// Runs both churn variants in fresh processes (memory is per process) and prints them side by side.
fn churn(args: &Args, cfg: &Config) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let mut runs = Vec::new();
    for share in [true, false] {
        let mut cmd = std::process::Command::new(&exe);
        cmd.args(std::env::args_os().skip(1)).arg("--churn-child").arg(share.to_string());
        let out = cmd.output()?;
        anyhow::ensure!(out.status.success(), "churn run failed: {}", String::from_utf8_lossy(&out.stderr));
        let rows: Vec<serde_json::Value> =
            String::from_utf8(out.stdout)?.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        runs.push(rows);
    }
    println!(
        "## Memory while building {} blends one after the other (adapters.cache_mb = {}; from weights)\n",
        args.blends, cfg.adapters.cache_mb
    );
    println!("RSS = VmRSS MB (anonymous + file-backed); ready = blends the cache keeps; ms = merge + session.\n");
    println!("| after | shared: RSS (anon + file) | ready | ms | not shared: RSS (anon + file) | ready | ms |");
    println!("|---|---|---|---|---|---|---|");
    let num = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    let cell = |r: &serde_json::Value| {
        format!(
            "{:.0} ({:.0} + {:.0}) | {} | {:.0}",
            num(r, "rss"),
            num(r, "anon"),
            num(r, "file"),
            r["ready"],
            num(r, "ms")
        )
    };
    for (a, b) in runs[0].iter().zip(&runs[1]) {
        println!("| {} | {} | {} |", a["step"].as_str().unwrap_or("?"), cell(a), cell(b));
    }
    // What one ready blend adds, from the last row; the median build time over all blends.
    let per_blend = |rows: &[serde_json::Value]| {
        let (first, last) = (&rows[0], &rows[rows.len() - 1]);
        (num(last, "rss") - num(first, "rss")) / num(last, "ready").max(1.0)
    };
    let build = |rows: &[serde_json::Value]| pct(rows[1..].iter().map(|r| num(r, "ms")).collect(), 0.5);
    let (ps, pn) = (per_blend(&runs[0]), per_blend(&runs[1]));
    let (bs, bn) = (build(&runs[0]), build(&runs[1]));
    println!("\n| | shared | not shared | not shared / shared |\n|---|---|---|---|");
    println!("| MB per ready blend | {ps:.0} | {pn:.0} | {:.2} |", pn / ps);
    println!("| blend build ms (median) | {bs:.0} | {bn:.0} | {:.2} |", bn / bs);
    println!();
    Ok(())
}

fn churn_child(cfg: &Config, blends: usize) -> anyhow::Result<()> {
    let row = |step: String, ready: usize, ms: f64| {
        let mb = |f: &str| common::status_mb(f).unwrap_or(f64::NAN).round();
        let (rss, anon, file) = (mb("VmRSS"), mb("RssAnon"), mb("RssFile"));
        let r = serde_json::json!({"step": step, "rss": rss, "anon": anon, "file": file, "ready": ready, "ms": ms});
        println!("{r}");
    };
    let mut engine = Engine::load(cfg)?;
    engine.logits(None, &[1])?;
    row("base model loaded".into(), 0, f64::NAN);
    let n = engine.pool().map(|p| p.names().len()).ok_or_else(|| anyhow::anyhow!("the config names no pool"))?;
    // Distinct, deterministic weights: blend i leans on adapter i mod n.
    for i in 0..blends {
        let mut w = vec![0.5 / n as f32; n];
        w[i % n] += 0.5;
        w[(i / n) % n] += 0.01 * (i / n) as f32;
        let sum: f32 = w.iter().sum();
        w.iter_mut().for_each(|x| *x /= sum);
        let name = format!("churn{i}");
        let report = engine.customize_weights(&name, &w)?;
        engine.logits(Some(&name), &[1])?;
        row(format!("blend {}", i + 1), engine.ready_adapters().len(), report.merge_ms + report.session_ms);
    }
    Ok(())
}

/// Mean cross-entropy of the examples' outputs given their inputs under `adapter`.
/// LoraHub-style search: gradient-free (1+1) evolution strategy over the blend weights, each step
/// merging the candidate into the model and scoring the few-shot loss (LoraHub uses nevergrad's
/// optimizer with the same budget; the cost per step is what matters here).
fn lorahub_search(engine: &mut Engine, examples: &[Example], steps: usize) -> anyhow::Result<()> {
    let crayon_start = Instant::now();
    engine.customize("crayon", examples)?;
    let crayon_ms = crayon_start.elapsed().as_secs_f64() * 1e3;
    let crayon_loss = few_shot_loss(engine, "crayon", examples)?;
    let start = Instant::now();
    let (_, best_loss, step_ms) = search_weights(engine, examples, steps, 1)?;
    let search_ms = start.elapsed().as_secs_f64() * 1e3;
    println!("## Peer: LoraHub-style search of the blend weights ({steps} steps) vs Crayon's instant blend\n");
    println!("| method | time to customize | few-shot loss on the 5 examples |\n|---|---|---|");
    println!("| Crayon blend (similarity, no search) | {:.0} ms | {crayon_loss:.3} |", crayon_ms);
    println!(
        "| LoraHub-style search, {steps} steps | {:.0} ms ({:.0} ms/step, {:.1}x Crayon) | {best_loss:.3} |",
        search_ms,
        pct(step_ms, 0.5),
        search_ms / crayon_ms
    );
    println!();
    Ok(())
}

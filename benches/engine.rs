//! Prefill and decode speed of the Crayon engine on fixed token ids (the peers in
//! `benches/peers.py` get the same ids). Prints one JSON object; `benches/run` makes the table.
//!
//!     cargo bench --bench engine -- --config crayon.dev.toml --ids ids.json --new-tokens 100 --runs 5

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;

mod common;
use crayon::Engine;
use crayon::cli::CommonArgs;
use crayon::sampler::{Sampler, SamplingParams};

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// JSON array of prompt token ids
    #[arg(long)]
    ids: PathBuf,
    #[arg(long, default_value_t = 100)]
    new_tokens: usize,
    #[arg(long, default_value_t = 5)]
    runs: usize,
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Also report the share of prompt positions whose top token matches this model folder's (the
    /// float32 reference of a 4-bit model), as `top1_agreement`
    #[arg(long)]
    reference_model: Option<PathBuf>,
    /// Write an ONNX Runtime per-operator profile with this path prefix and report its file
    #[arg(long)]
    profile: Option<PathBuf>,
    /// cargo bench passes --bench; accepted and ignored
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    args.common.init_logging("warn");
    let mut cfg = args.common.load_config()?;
    if let Some(p) = &args.profile {
        cfg.runtime.profile = p.clone();
    }
    let ids: Vec<u32> = serde_json::from_str(&std::fs::read_to_string(&args.ids)?)?;
    let t0 = Instant::now();
    let mut engine = Engine::load(&cfg)?;
    let load_s = t0.elapsed().as_secs_f64();
    let provider = engine.provider().to_string();
    let dec = engine.decoder_mut();
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    for run in 0..args.warmup + args.runs {
        let mut cache = dec.new_cache()?;
        let mut sampler = Sampler::new(SamplingParams::default());
        let t = Instant::now();
        let mut logits = dec.forward(&ids, &mut cache, 1, None)?;
        let p = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for _ in 0..args.new_tokens {
            let tok = sampler.sample(&logits).token;
            logits = dec.forward(&[tok], &mut cache, 1, None)?;
        }
        let d = t.elapsed().as_secs_f64();
        if run >= args.warmup {
            prefill.push(ids.len() as f64 / p);
            decode.push(args.new_tokens as f64 / d);
        }
    }
    let profile = if args.profile.is_some() { Some(dec.end_profiling()?) } else { None };
    let peak_rss_mb = common::status_mb("VmHWM"); // before a reference model is loaded
    let top1_agreement = match &args.reference_model {
        Some(dir) => {
            let mut rcfg = cfg.clone();
            rcfg.model.dir = dir.clone();
            rcfg.pool.dir = PathBuf::new();
            let mut reference = Engine::load(&rcfg)?;
            let (got, want) = (engine.logits(None, &ids)?, reference.logits(None, &ids)?);
            let vocab = engine.files().arch.vocab_size;
            let top = |l: &[f32]| -> Vec<usize> {
                l.chunks(vocab)
                    .map(|r| r.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |m| m.0))
                    .collect()
            };
            let (a, b) = (top(&got), top(&want));
            Some(a.iter().zip(&b).filter(|(x, y)| x == y).count() as f64 / a.len().max(1) as f64)
        }
        None => None,
    };
    let json = serde_json::json!({
        "profile": profile,
        "engine": "crayon",
        "provider": provider,
        "threads": cfg.runtime.intra_threads,
        "load_s": load_s,
        "prefill_tok_s": prefill,
        "decode_tok_s": decode,
        "peak_rss_mb": peak_rss_mb,
        "model": cfg.model.dir.display().to_string(),
        "top1_agreement": top1_agreement,
    });
    println!("{json}");
    Ok(())
}

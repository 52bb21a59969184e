//! Shared by the benchmark commands (each uses a part).
#![allow(dead_code)]

/// A memory figure of this process from /proc/self/status (e.g. "VmRSS", "VmHWM"), in MiB.
pub fn status_mb(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// The p-quantile (0..=1) of some samples, by nearest rank.
pub fn pct(mut xs: Vec<f64>, p: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    let i = ((xs.len() as f64 - 1.0) * p).round() as usize;
    xs[i.min(xs.len() - 1)]
}

/// The arg-max token of every `vocab`-wide row of a logits buffer.
pub fn top_tokens(logits: &[f32], vocab: usize) -> Vec<usize> {
    logits.chunks(vocab).map(|r| r.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |m| m.0)).collect()
}

/// Share of positions where two top-token lists agree.
pub fn agreement(a: &[usize], b: &[usize]) -> f64 {
    a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / a.len().max(1) as f64
}

/// A `crayond --listen 127.0.0.1:0` process with `config`; killed on drop.
pub struct Daemon {
    child: std::process::Child,
    pub url: String,
}

impl Daemon {
    pub fn start(config: &std::path::Path) -> anyhow::Result<Daemon> {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_crayond"))
            .args(["--config", &config.to_string_lossy(), "--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        for line in std::io::BufReader::new(stdout).lines() {
            if let Some(rest) = line?.strip_prefix("crayond: serving HTTP on ") {
                let url = rest.split_whitespace().next().unwrap_or("").to_string();
                return Ok(Daemon { child, url });
            }
        }
        anyhow::bail!("crayond exited before serving (config {})", config.display())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Mean negative log-likelihood of the examples' outputs given their inputs, under `adapter`
/// (`Engine::examples_loss`: the quantity `[blend] method = "example_loss"` and LoraHub minimize).
pub fn few_shot_loss(engine: &mut crayon::Engine, adapter: &str, examples: &[crayon::Example]) -> anyhow::Result<f64> {
    Ok(f64::from(engine.examples_loss(Some(adapter), examples)?))
}

/// LoraHub-style search of the blend weights: a gradient-free (1+1) evolution strategy, each step
/// merging the candidate into the model (adapter "search") and scoring the few-shot loss (LoraHub
/// uses nevergrad's optimizer with the same budget). Returns the best weights, their loss, and the
/// time of each step in ms.
pub fn search_weights(
    engine: &mut crayon::Engine,
    examples: &[crayon::Example],
    steps: usize,
    seed: u64,
) -> anyhow::Result<(Vec<f32>, f64, Vec<f64>)> {
    use rand::{Rng, SeedableRng};
    let n = engine.pool().map_or(0, |p| p.adapters.len());
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut best = vec![1.0 / n as f32; n];
    engine.customize_weights("search", &best)?;
    let mut best_loss = few_shot_loss(engine, "search", examples)?;
    let mut step_ms = Vec::new();
    for s in 0..steps {
        let t = std::time::Instant::now();
        let scale = 0.5 * (1.0 - s as f32 / steps as f32) + 0.05;
        let cand: Vec<f32> = best.iter().map(|w| (w + rng.random_range(-scale..=scale)).max(0.0)).collect();
        if cand.iter().sum::<f32>() <= 0.0 {
            continue;
        }
        engine.customize_weights("search", &cand)?;
        let loss = few_shot_loss(engine, "search", examples)?;
        if loss < best_loss {
            best_loss = loss;
            let total: f32 = cand.iter().sum();
            best = cand.iter().map(|w| w / total).collect();
        }
        step_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok((best, best_loss, step_ms))
}

/// A private `dbus-daemon` configured like the system bus (tests/dbus/system-like.conf.in, with the
/// service's own policy), its socket in `dir`; returns the process and the bus address.
pub fn private_bus(dir: &std::path::Path) -> anyhow::Result<(std::process::Child, String)> {
    use anyhow::Context;
    use std::io::BufRead;
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let conf = std::fs::read_to_string(repo.join("tests/dbus/system-like.conf.in"))?
        .replace("@SOCKET@", &dir.join("bus").to_string_lossy())
        .replace("@POLICY@", &repo.join("dbus/org.crayon.Crayon1.conf").to_string_lossy());
    std::fs::write(dir.join("bus.conf"), conf)?;
    let mut bus = std::process::Command::new("dbus-daemon")
        .args(["--nofork", "--print-address", "--config-file"])
        .arg(dir.join("bus.conf"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("dbus-daemon")?;
    // Ready once it has printed its address.
    std::io::BufReader::new(bus.stdout.take().context("bus stdout")?).read_line(&mut String::new())?;
    Ok((bus, format!("unix:path={}", dir.join("bus").display())))
}

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

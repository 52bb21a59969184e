//! Soak (issue #14): one device `crayond` with the real model, served for a long time to mixed
//! clients on every interface — socket, D-Bus, HTTP — while an app keeps customizing and removing
//! adapters and the server it offloads to (a second, real `crayond`) is killed and restarted. Each
//! sample period the device's RSS and open file descriptors are read from /proc; at the end:
//! requests answered, refused (busy) and failed, lost (no reply) and mixed (a device answer that is
//! not the one this client's greedy question always gets) — the last two must be 0 — and whether RSS
//! and fds stayed flat after the warm-up.
//!
//!     cargo bench --bench soak -- [--minutes 30] [--config crayon.dev.toml] [--sample-s 60]
//!
//! Prints a markdown table of the samples and writes `docs/data/soak.json` (or `--out`).

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use crayon::socket::client::Client;
use serde_json::{Value, json};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "crayon.dev.toml")]
    config: PathBuf,
    /// How long to run
    #[arg(long, default_value_t = 30.0)]
    minutes: f64,
    /// Seconds between RSS / fd samples
    #[arg(long, default_value_t = 60)]
    sample_s: u64,
    /// Seconds between kills of the server (it is restarted at once)
    #[arg(long, default_value_t = 20)]
    server_restart_s: u64,
    #[arg(long, default_value = "docs/data/soak.json")]
    out: PathBuf,
    #[arg(long, hide = true)]
    bench: bool,
}

/// What every client thread reports.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    busy: AtomicU64,
    failed: AtomicU64,
    lost: AtomicU64,
    mixed: AtomicU64,
    offloaded: AtomicU64,
    fallbacks: AtomicU64,
}

impl Tally {
    /// Counts one reply: `Ok(answer)` (with who answered it) or an error message.
    fn reply(&self, expected: &mut Option<String>, r: anyhow::Result<(String, String, bool)>) {
        match r {
            Ok((text, by, fallback)) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
                if by == "server" {
                    self.offloaded.fetch_add(1, Ordering::Relaxed);
                }
                if fallback {
                    self.fallbacks.fetch_add(1, Ordering::Relaxed);
                }
                if by == "device" {
                    match expected {
                        Some(e) if *e != text => {
                            self.mixed.fetch_add(1, Ordering::Relaxed);
                        }
                        Some(_) => {}
                        None => *expected = Some(text),
                    }
                }
            }
            Err(e) if e.to_string().contains("busy") || e.to_string().contains("429") => {
                self.busy.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) if e.to_string().contains("timed out") || e.to_string().contains("closed") => {
                self.lost.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn start_daemon(args: &[&str], config: &Path, ready: &str) -> anyhow::Result<(Child, String)> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_crayond"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .spawn()?;
    let mut url = String::new();
    for line in BufReader::new(child.stdout.take().context("stdout")?).lines() {
        let line = line?;
        if let Some(rest) = line.strip_prefix("crayond: serving HTTP on ") {
            url = rest.split_whitespace().next().unwrap_or("").to_string();
        }
        if line.starts_with(ready) {
            break;
        }
    }
    Ok((child, url))
}

fn proc_sample(pid: u32) -> (f64, usize) {
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok()))
        .map_or(0.0, |kb| kb / 1024.0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    (rss, fds)
}

fn answer_of(v: &Value) -> (String, String, bool) {
    let text = v["choices"][0]["message"]["content"].as_str().unwrap_or_default().to_string();
    let by = v["crayon"]["answered_by"].as_str().unwrap_or_default().to_string();
    (text, by, v["crayon"]["fallback"].is_string())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir()?;
    let base = std::fs::read_to_string(&args.config)?;
    let config_dir = args.config.canonicalize()?.parent().map(Path::to_path_buf).unwrap_or_default();

    // The server: the same model as a real crayond on loopback, killed and restarted on a schedule.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let server_cfg = dir.path().join("server.toml");
    let server_state = dir.path().join("server-state");
    std::fs::write(
        &server_cfg,
        absolute(&base, &config_dir).replace("state_dir = \"state\"", &format!("state_dir = {server_state:?}")),
    )?;
    let listen = format!("127.0.0.1:{port}");
    let server =
        Arc::new(std::sync::Mutex::new(start_daemon(&["--listen", &listen], &server_cfg, "crayond: ready")?.0));

    // The device: socket, D-Bus (a private bus configured like the system bus) and HTTP.
    let (mut bus, address) = common::private_bus(dir.path())?;
    let device_cfg = dir.path().join("device.toml");
    let state = dir.path().join("state");
    std::fs::write(
        &device_cfg,
        format!(
            "{}\n[router]\nmode = \"hybrid\"\n[remote]\nurl = \"http://{listen}\"\ntimeout_ms = 5000\nretries = 0\n",
            absolute(&base, &config_dir).replace("state_dir = \"state\"", &format!("state_dir = {state:?}"))
        ),
    )?;
    let socket = dir.path().join("crayon.sock");
    let (mut device, url) = start_daemon(
        &["--socket", &socket.to_string_lossy(), "--dbus", &address, "--listen", "127.0.0.1:0"],
        &device_cfg,
        "crayond: ready",
    )?;
    let pid = device.id();

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut threads = Vec::new();
    // Socket clients: greedy chat, each its own question; every third asks for the server.
    for i in 0..2 {
        let (stop, tally, socket) = (stop.clone(), tally.clone(), socket.clone());
        threads.push(std::thread::spawn(move || {
            let mut expected = None;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let mode = if n % 3 == 0 { "server_only" } else { "device_only" };
                let body = json!({"messages": [{"role": "user", "content": format!("Socket client {i}: name a fruit.")}],
                                  "max_tokens": 12, "temperature": 0, "crayon": {"route": {"mode": mode}}});
                let r = Client::connect(&socket, Duration::from_secs(30))
                    .map_err(anyhow::Error::from)
                    .and_then(|mut c| Ok(c.call(json!({"op": "chat", "body": body}), &mut |_| true)?))
                    .map(|v| answer_of(&v));
                tally.reply(&mut expected, r);
            }
        }));
    }
    // HTTP clients.
    for i in 0..2 {
        let (stop, tally, url) = (stop.clone(), tally.clone(), url.clone());
        threads.push(std::thread::spawn(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .timeout_global(Some(Duration::from_secs(30)))
                .http_status_as_error(false)
                .build()
                .into();
            let mut expected = None;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let mode = if n % 4 == 0 { "server_only" } else { "device_only" };
                let body = json!({"messages": [{"role": "user", "content": format!("HTTP client {i}: name a color.")}],
                                  "max_tokens": 12, "temperature": 0, "crayon": {"route": {"mode": mode}}});
                let r = agent
                    .post(&format!("{url}/v1/chat/completions"))
                    .send_json(&body)
                    .map_err(anyhow::Error::from)
                    .and_then(|mut resp| {
                        let status = resp.status().as_u16();
                        let v: Value = serde_json::from_str(&resp.body_mut().read_to_string()?)?;
                        anyhow::ensure!(status == 200, "HTTP {status}: {v}");
                        Ok(answer_of(&v))
                    });
                tally.reply(&mut expected, r);
            }
        }));
    }
    // A D-Bus client.
    {
        let (stop, tally, address) = (stop.clone(), tally.clone(), address.clone());
        threads.push(std::thread::spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(_) => return,
            };
            let mut expected = None;
            while !stop.load(Ordering::Relaxed) {
                let r = rt.block_on(async {
                    let c = zbus::connection::Builder::address(address.as_str())?.build().await?;
                    let opts: HashMap<&str, &str> = [("max_tokens", "12"), ("temperature", "0")].into();
                    let dest = "org.crayon.Crayon1";
                    let reply = c
                        .call_method(
                            Some(dest),
                            "/org/crayon/Crayon1",
                            Some(dest),
                            "Generate",
                            &("Name an animal.", opts),
                        )
                        .await?;
                    let (text, info): (String, String) = reply.body().deserialize()?;
                    let info: Value = serde_json::from_str(&info).unwrap_or_default();
                    anyhow::Ok((text, info["answered_by"].as_str().unwrap_or("device").to_string(), false))
                });
                tally.reply(&mut expected, r);
            }
        }));
    }
    // Customization churn: an app customizes and removes adapters over the socket.
    let churn = Arc::new(AtomicU64::new(0));
    {
        let (stop, socket, churn) = (stop.clone(), socket.clone(), churn.clone());
        threads.push(std::thread::spawn(move || {
            let text = std::fs::read_to_string(repo.join("examples/science.jsonl")).unwrap_or_default();
            let examples: Vec<Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                k += 1;
                let name = format!("churn{}", k % 6);
                let op = match k % 4 == 0 {
                    true => json!({"op": "remove", "name": name}),
                    false => json!({"op": "customize", "body": {"name": name, "examples": examples}}),
                };
                if let Ok(mut c) = Client::connect(&socket, Duration::from_secs(30)) {
                    if c.call(op, &mut |_| true).is_ok() {
                        churn.fetch_add(1, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }));
    }
    // The flaky server: killed (SIGKILL) and restarted.
    {
        let (stop, server, server_cfg, listen) = (stop.clone(), server.clone(), server_cfg.clone(), listen.clone());
        let every = Duration::from_secs(args.server_restart_s);
        threads.push(std::thread::spawn(move || {
            let mut last = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                if last.elapsed() >= every {
                    let mut s = server.lock().unwrap_or_else(|p| p.into_inner());
                    let _ = s.kill();
                    let _ = s.wait();
                    if let Ok((child, _)) = start_daemon(&["--listen", &listen], &server_cfg, "crayond: ready") {
                        *s = child;
                    }
                    last = Instant::now();
                }
            }
        }));
    }

    let t0 = Instant::now();
    let total = Duration::from_secs_f64(args.minutes * 60.0);
    let mut samples: Vec<Value> = Vec::new();
    while t0.elapsed() < total {
        std::thread::sleep(Duration::from_secs(args.sample_s).min(total.saturating_sub(t0.elapsed())));
        let (rss, fds) = proc_sample(pid);
        let sample = json!({"t_s": t0.elapsed().as_secs_f64().round(), "rss_mb": rss, "fds": fds,
                            "answered": tally.ok.load(Ordering::Relaxed), "customizations": churn.load(Ordering::Relaxed)});
        eprintln!("[soak] {sample}");
        samples.push(sample);
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let alive = device.try_wait()?.is_none();
    let _ = device.kill();
    let _ = bus.kill();
    let _ = server.lock().map(|mut s| s.kill());

    // Flat after warm-up: the first sample is the warm-up; compare the second with the last.
    let get = |s: &Value, k: &str| s[k].as_f64().unwrap_or(0.0);
    let (first, last) = (samples.get(1).or(samples.first()), samples.last());
    let (rss_growth, fd_growth) = match (first, last) {
        (Some(a), Some(b)) => (get(b, "rss_mb") - get(a, "rss_mb"), get(b, "fds") - get(a, "fds")),
        _ => (0.0, 0.0),
    };
    let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let summary = json!({
        "minutes": args.minutes, "machine": "x86-64, 2 cores", "config": args.config,
        "answered": c(&tally.ok), "busy": c(&tally.busy), "failed": c(&tally.failed),
        "lost": c(&tally.lost), "mixed": c(&tally.mixed), "offloaded": c(&tally.offloaded),
        "fallbacks": c(&tally.fallbacks), "customizations_and_removals": c(&churn),
        "rss_mb_growth_after_warmup": rss_growth, "fd_growth_after_warmup": fd_growth,
        "device_alive_at_end": alive, "samples": samples,
    });
    println!("| t (s) | RSS MB | fds | answered | customizations |\n|---|---|---|---|---|");
    for s in summary["samples"].as_array().into_iter().flatten() {
        println!(
            "| {} | {:.0} | {} | {} | {} |",
            s["t_s"],
            get(s, "rss_mb"),
            s["fds"],
            s["answered"],
            s["customizations"]
        );
    }
    println!(
        "\nanswered {}, busy {}, failed {}, lost {}, mixed {}; offloaded {}, fallbacks {}; RSS {:+.0} MB and fds {:+.0} after warm-up; device alive: {alive}",
        summary["answered"],
        summary["busy"],
        summary["failed"],
        summary["lost"],
        summary["mixed"],
        summary["offloaded"],
        summary["fallbacks"],
        rss_growth,
        fd_growth
    );
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&summary)?)?;
    anyhow::ensure!(c(&tally.lost) == 0 && c(&tally.mixed) == 0 && alive, "requests lost or mixed, or the device died");
    Ok(())
}

/// The config text with its relative paths made absolute (it is written elsewhere).
fn absolute(text: &str, dir: &Path) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let fixed = match line.split_once(" = \"") {
            Some((key, rest)) if matches!(key.trim(), "dir" | "ort_library") && !rest.starts_with('/') => {
                format!("{key} = \"{}/{rest}", dir.display())
            }
            _ => line.to_string(),
        };
        out.push_str(&fixed);
        out.push('\n');
    }
    out
}

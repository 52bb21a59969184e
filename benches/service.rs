//! What the service interfaces cost (issue #5): one `crayond` with the real model serving its socket,
//! D-Bus (a private bus configured like the system bus) and HTTP; the same requests through each, and
//! the engine called in-process as the peer. Interleaved, so drift hits every path alike.
//!
//!     cargo bench --bench service -- [--config crayon.dev.toml] [--n 100]
//!
//! Prints a markdown table: p50/p95 of a status round trip and of a one-token generation, and the
//! overhead over the in-process engine.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use crayon::socket::client::Client;
use serde_json::json;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "crayon.dev.toml")]
    config: PathBuf,
    /// Requests per path and measurement
    #[arg(long, default_value_t = 100)]
    n: usize,
    /// Intra-op threads of the daemon and of the in-process peer
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[arg(long, hide = true)]
    bench: bool,
}

const PROMPT: &str = "What is the capital of France?";

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let (mut bus, address) = common::private_bus(dir.path())?;
    let socket = dir.path().join("crayon.sock");
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_crayond"))
        .arg("--config")
        .arg(&args.config)
        .arg("--socket")
        .arg(&socket)
        .args(["--dbus", &address, "--listen", "127.0.0.1:0", "--threads", &args.threads.to_string()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()?;
    let mut url = String::new();
    for line in BufReader::new(daemon.stdout.take().context("stdout")?).lines() {
        let line = line?;
        if let Some(rest) = line.strip_prefix("crayond: serving HTTP on ") {
            url = rest.split_whitespace().next().unwrap_or("").to_string();
        }
        if line == "crayond: ready" {
            break;
        }
    }
    anyhow::ensure!(!url.is_empty(), "crayond did not start");

    // The peer: the same engine in this process.
    let mut cfg = crayon::Config::load(&args.config)?;
    cfg.runtime.intra_threads = args.threads;
    let threads = args.threads;
    let mut engine = crayon::Engine::load(&cfg)?;
    let mut params = engine.default_params();
    params.max_new_tokens = 1;
    params.sampling = Default::default();
    let prompt = crayon::Prompt::Chat(vec![crayon::Message::new("user", PROMPT)]);

    let mut sock = Client::connect(&socket, std::time::Duration::from_secs(60))?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let dbus = rt.block_on(async { zbus::connection::Builder::address(address.as_str())?.build().await })?;
    let http = ureq::Agent::new_with_defaults();
    let chat_body = json!({"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 1, "temperature": 0});
    let opts: HashMap<&str, &str> = [("max_tokens", "1"), ("temperature", "0")].into();
    let dest = "org.crayon.Crayon1";
    let path = "/org/crayon/Crayon1";

    let mut t: HashMap<&str, Vec<f64>> = HashMap::new();
    let mut time = |name: &'static str, f: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<()> {
        // ONNX Runtime's pool threads spin for a while after a run; with two processes on two cores the
        // next path would pay for the previous one's spinning. Let them park first.
        std::thread::sleep(std::time::Duration::from_millis(50));
        let t0 = Instant::now();
        f()?;
        t.entry(name).or_default().push(t0.elapsed().as_secs_f64() * 1e3);
        Ok(())
    };
    for i in 0..args.n + 5 {
        let warm = i < 5;
        let mut run = |name: &'static str, f: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<()> {
            if warm { f() } else { time(name, f) }
        };
        run("status: socket", &mut || {
            sock.call(json!({"op": "status"}), &mut |_| true)?;
            Ok(())
        })?;
        run("status: D-Bus", &mut || {
            rt.block_on(dbus.call_method(Some(dest), path, Some(dest), "StatusJson", &()))?;
            Ok(())
        })?;
        run("status: HTTP", &mut || {
            http.get(&format!("{url}/health")).call()?.body_mut().read_to_string()?;
            Ok(())
        })?;
        run("1 token: in-process engine", &mut || {
            engine.generate(&prompt, &params, &crayon::CancelToken::new(), &mut |_| ControlFlow::Continue(()))?;
            Ok(())
        })?;
        run("1 token: socket", &mut || {
            sock.call(json!({"op": "chat", "body": chat_body}), &mut |_| true)?;
            Ok(())
        })?;
        run("1 token: D-Bus", &mut || {
            rt.block_on(dbus.call_method(Some(dest), path, Some(dest), "Generate", &(PROMPT, opts.clone())))?;
            Ok(())
        })?;
        run("1 token: HTTP", &mut || {
            http.post(&format!("{url}/v1/chat/completions")).send_json(&chat_body)?.body_mut().read_to_string()?;
            Ok(())
        })?;
    }
    let _ = daemon.kill();
    let _ = bus.kill();

    let base = common::pct(t["1 token: in-process engine"].clone(), 0.5);
    println!(
        "\n{} requests per path after 5 warm-up rounds, interleaved; model {}; {} intra-op threads in both processes\n",
        args.n,
        cfg.model.dir.display(),
        threads
    );
    println!("| path | p50 ms | p95 ms | p50 over in-process engine |");
    println!("|---|---:|---:|---:|");
    for name in [
        "status: socket",
        "status: D-Bus",
        "status: HTTP",
        "1 token: in-process engine",
        "1 token: socket",
        "1 token: D-Bus",
        "1 token: HTTP",
    ] {
        let xs = t[name].clone();
        let (p50, p95) = (common::pct(xs.clone(), 0.5), common::pct(xs, 0.95));
        let over = if name.starts_with("1 token") {
            format!("{:+.2} ms ({:.3}x)", p50 - base, p50 / base)
        } else {
            "—".into()
        };
        println!("| {name} | {p50:.2} | {p95:.2} | {over} |");
    }
    Ok(())
}

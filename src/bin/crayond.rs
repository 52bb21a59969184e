//! crayond: the Crayon service. One model in memory, served to every app at once over
//! * the local socket (`--socket` / `[socket] path`, docs/socket.md): libcrayon's path;
//! * D-Bus (`--dbus` / `[dbus] bus`, docs/dbus.md): `org.crayon.Crayon1`, for scripts and apps;
//! * HTTP (`--listen` / `[server] listen`, docs/http.md): the OpenAI-compatible API, also the server
//!   side of device–server routing (docs/routing.md).
//!
//! As a systemd service (Type=notify) it reports READY/STATUS/STOPPING, sends watchdog keep-alives,
//! logs to the journal, drains in-flight requests on SIGTERM and reloads config and model on SIGHUP
//! without dropping requests (docs/service.md). `--check` validates a deployment and exits.

use std::io::Write as _;
use std::ops::ControlFlow;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use crayon::cli::{CommonArgs, exit_code};
use crayon::config::Config;
use crayon::service::Service;
use crayon::{CancelToken, Engine, Message, Prompt};
use tokio::signal::unix::{SignalKind, signal};

/// One status line on stdout, for scripts and tests. A daemon must not die because whoever started
/// it stopped reading (println! panics on EPIPE), so write errors are ignored.
macro_rules! announce {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

#[derive(Parser)]
#[command(name = "crayond", version, about = "The Crayon on-device LLM service.")]
#[command(after_help = "Signals: SIGTERM/SIGINT drain in-flight requests and exit; SIGHUP reloads the config, \
model and pool.\nExit status: 0 success, 1 model/runtime failure, 2 bad config or usage.")]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    /// Validate the config, load the model, generate one token, print a report and exit
    #[arg(long)]
    check: bool,
    /// Serve HTTP on this address, e.g. 127.0.0.1:8090 (port 0: any free port) [overrides server.listen]
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Serve the local socket at this path [overrides socket.path]
    #[arg(long, value_name = "PATH")]
    socket: Option<std::path::PathBuf>,
    /// Serve D-Bus on this bus: system, session or an address like unix:path=/run/x [overrides dbus.bus]
    #[arg(long, value_name = "BUS")]
    dbus: Option<String>,
}

impl Cli {
    fn config(&self) -> crayon::Result<Config> {
        let mut cfg = self.common.load_config()?;
        if let Some(l) = &self.listen {
            cfg.server.listen = l.clone();
        }
        if let Some(p) = &self.socket {
            cfg.socket.path = p.clone();
        }
        if let Some(b) = &self.dbus {
            cfg.dbus.bus = b.clone();
        }
        cfg.validate().map_err(|msg| crayon::Error::Config { path: "(command line)".into(), msg })?;
        Ok(cfg)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.common);
    let result = if cli.check { check(&cli.common) } else { serve(&cli) };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            let _ = writeln!(std::io::stderr(), "crayond: {e}");
            notify(&[sd_notify::NotifyState::Status(&format!("failed: {e}"))]);
            ExitCode::from(exit_code(&e) as u8)
        }
    }
}

/// The journal when systemd started us with it (JOURNAL_STREAM), else stderr.
fn init_logging(common: &CommonArgs) {
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        use tracing_subscriber::prelude::*;
        if let Ok(journal) = tracing_journald::layer() {
            let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new(if common.verbose > 1 { "debug" } else { "info" })
            });
            if tracing_subscriber::registry()
                .with(filter)
                .with(journal.with_syslog_identifier("crayond".into()))
                .try_init()
                .is_ok()
            {
                return;
            }
        }
    }
    common.init_logging("info");
}

/// sd_notify, when systemd asked for it (NOTIFY_SOCKET); a no-op otherwise.
fn notify(state: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(false, state) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

fn serve(cli: &Cli) -> crayon::Result<()> {
    let cfg = cli.config()?;
    if cfg.server.listen.is_empty() && cfg.socket.path.as_os_str().is_empty() && cfg.dbus.bus.is_empty() {
        return Err(crayon::Error::Config {
            path: "socket.path, dbus.bus, server.listen".into(),
            msg: "nothing to serve: give --socket PATH, --dbus BUS or --listen ADDR (or set them in the config), or run --check".into(),
        });
    }
    let http_addr = match cfg.server.listen.as_str() {
        "" => None,
        l => Some(crayon::http::check_listen(l, &cfg)?),
    };
    let t0 = Instant::now();
    let engine = Engine::load(&cfg)?;
    tracing::info!(model = %cfg.model.dir.display(), seconds = t0.elapsed().as_secs_f64(), provider = %engine.provider(), "model loaded");
    let service = Arc::new(Service::new(engine, &cfg)?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| crayon::Error::Io { what: "async runtime", path: "(tokio)".into(), source: e })?;
    let result = runtime.block_on(run(cli, cfg, service, http_addr));
    // Bounded: after a lost bus a runtime thread can be stuck inside zbus for good.
    runtime.shutdown_timeout(Duration::from_secs(2));
    result
}

async fn run(
    cli: &Cli,
    cfg: Config,
    service: Arc<Service>,
    http_addr: Option<std::net::SocketAddr>,
) -> crayon::Result<()> {
    let io = |what: &'static str, e: std::io::Error| crayon::Error::Io { what, path: "(signals)".into(), source: e };
    // Signals first, so that a SIGTERM during start-up is not lost.
    let mut term = signal(SignalKind::terminate()).map_err(|e| io("SIGTERM handler", e))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| io("SIGINT handler", e))?;
    let mut hup = signal(SignalKind::hangup()).map_err(|e| io("SIGHUP handler", e))?;
    let mut status = Vec::new();

    let socket = if cfg.socket.path.as_os_str().is_empty() {
        None
    } else {
        let s = crayon::socket::SocketServer::start(service.clone(), &cfg.socket)?;
        announce!("crayond: serving socket {}", s.path().display());
        status.push(format!("socket {}", s.path().display()));
        Some(s)
    };
    let mut dbus = if cfg.dbus.bus.is_empty() {
        None
    } else {
        let d = crayon::dbus::DbusServer::start(service.clone(), &cfg.dbus).await?;
        announce!("crayond: serving D-Bus {} on the {} bus", cfg.dbus.name, cfg.dbus.bus);
        status.push(format!("D-Bus {}", cfg.dbus.name));
        Some(d)
    };
    let http_stop = Arc::new(tokio::sync::Notify::new());
    let http = match http_addr {
        None => None,
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| crayon::Error::Io {
                what: "HTTP listener",
                path: cfg.server.listen.clone().into(),
                source: e,
            })?;
            let bound = listener.local_addr().map_err(|e| io("HTTP listener", e))?;
            let remote = &cfg.remote.url;
            // One line on stdout, for scripts and tests that start us on port 0.
            announce!(
                "crayond: serving HTTP on http://{bound} (route mode {}{})",
                cfg.router.mode.name(),
                if remote.is_empty() { String::new() } else { format!(", server {remote}") }
            );
            status.push(format!("HTTP {bound}"));
            let stop = http_stop.clone();
            let app = crayon::http::app(service.clone());
            let limits = crayon::http::listen::ConnectionLimits {
                max_connections: cfg.server.max_connections,
                header_timeout: Duration::from_millis(cfg.server.header_timeout_ms),
            };
            // Peer addresses (ConnectInfo) tell HTTP clients apart in the engine queue's round-robin.
            Some(tokio::spawn(crayon::http::listen::serve(listener, app, limits, async move { stop.notified().await })))
        }
    };
    let status = format!("serving {}", status.join(", "));
    announce!("crayond: ready");
    notify(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status(&status)]);
    tracing::info!("{status}");

    // Keep-alives at half the interval systemd expects them (WatchdogSec=); the ping is sent from
    // this loop, so a wedged loop is what systemd notices.
    let mut watchdog_usec = 0;
    let watchdog = sd_notify::watchdog_enabled(false, &mut watchdog_usec);
    let mut tick = tokio::time::interval(if watchdog {
        Duration::from_micros(watchdog_usec / 2).max(Duration::from_millis(100))
    } else {
        Duration::from_secs(3600)
    });
    // Why the daemon stops on its own (then it exits non-zero, so that systemd restarts it).
    let mut failure = None;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => reload(cli, &service, &status).await,
            _ = tick.tick() => if watchdog { notify(&[sd_notify::NotifyState::Watchdog]) },
            why = dbus_lost(&mut dbus) => {
                tracing::error!("{why}: stopping");
                failure = Some(why);
                break;
            }
        }
    }

    let drain = Duration::from_millis(cfg.service.drain_timeout_ms);
    tracing::info!(in_flight = service.in_flight(), "shutting down: finishing in-flight requests");
    notify(&[sd_notify::NotifyState::Stopping, sd_notify::NotifyState::Status("draining in-flight requests")]);
    http_stop.notify_waiters();
    let deadline = Instant::now() + drain;
    if let Some(s) = socket {
        let _ = tokio::task::spawn_blocking(move || s.shutdown(drain)).await;
    }
    if let (Some(d), None) = (&dbus, &failure) {
        // No new calls; the streams already running finish (their signals still go out). Not after a
        // lost bus: calls on that connection never return.
        let release = d.connection.release_name(cfg.dbus.name.as_str());
        let _ = tokio::time::timeout(Duration::from_secs(2), release).await;
    }
    while service.in_flight() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if let Some(h) = http {
        let left = deadline.saturating_duration_since(Instant::now());
        let _ = tokio::time::timeout(left.max(Duration::from_millis(100)), h).await;
    }
    if let (Some(d), None) = (&dbus, &failure) {
        // Let the last signals leave before the connection closes.
        while d.running() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if service.in_flight() > 0 {
        tracing::warn!(
            in_flight = service.in_flight(),
            "drain timeout reached (service.drain_timeout_ms); exiting anyway"
        );
    }
    tracing::info!("stopped");
    announce!("crayond: stopped");
    match failure {
        None => Ok(()),
        Some(why) => Err(crayon::Error::Config { path: "dbus.name".into(), msg: why }),
    }
}

/// Resolves when the D-Bus interface stops being ours (never when D-Bus is not served).
async fn dbus_lost(dbus: &mut Option<crayon::dbus::DbusServer>) -> String {
    match dbus {
        Some(d) => d.lost().await,
        None => std::future::pending().await,
    }
}

/// SIGHUP: reload config, model and pool beside the running ones, then swap between two requests.
/// A bad new config leaves the old one serving.
async fn reload(cli: &Cli, service: &Arc<Service>, serving: &str) {
    notify(&[sd_notify::NotifyState::Reloading, sd_notify::NotifyState::Status("reloading")]);
    tracing::info!("SIGHUP: reloading config, model and pool");
    let cfg = cli.config();
    let service = service.clone();
    let t0 = Instant::now();
    let result = tokio::task::spawn_blocking(move || service.reload(&cfg?)).await;
    let status = match result {
        Ok(Ok(())) => {
            tracing::info!(seconds = t0.elapsed().as_secs_f64(), "reloaded");
            announce!("crayond: reloaded");
            serving.to_string()
        }
        Ok(Err(e)) => {
            tracing::error!("reload failed, still serving the previous config: {e}");
            announce!("crayond: reload failed: {e}");
            format!("{serving} (last reload failed: {e})")
        }
        Err(_) => "reload panicked; still serving the previous config".to_string(),
    };
    notify(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status(&status)]);
}

fn check(common: &CommonArgs) -> crayon::Result<()> {
    let cfg = common.load_config()?;
    let t0 = Instant::now();
    let mut engine = Engine::load(&cfg)?;
    let load = t0.elapsed();
    let mut params = engine.default_params();
    params.max_new_tokens = 1;
    let out = engine.generate(
        &Prompt::Chat(vec![Message::new("user", "ping")]),
        &params,
        &CancelToken::new(),
        &mut |_| ControlFlow::Continue(()),
    )?;
    println!("config ok; model {} loaded in {:.2}s", cfg.model.dir.display(), load.as_secs_f64());
    println!("execution provider: {}", engine.provider());
    let four_bit = engine.files().manifest.precision == crayon::model::Precision::Q4;
    println!("weights: {}", if four_bit { "4-bit (MatMulNBits)" } else { "float32" });
    let context = engine.context_limit();
    let per_token = engine.files().arch.kv_bytes_per_token();
    println!(
        "context: {context} tokens{}; KV cache {:.1} KB per token, up to {:.0} MB for one generation at the full context",
        if cfg.model.max_context == 0 { " (the model's own; model.max_context = 0)" } else { " (model.max_context)" },
        per_token as f64 / 1024.0,
        (per_token * context) as f64 / (1024.0 * 1024.0)
    );
    match engine.pool() {
        Some(pool) => println!(
            "adapter pool: {} ({} adapters), {} saved customizations; blends {}",
            pool.id,
            pool.adapters.len(),
            engine.adapters().len(),
            match (engine.blends_unmerged(), four_bit) {
                (true, _) => "applied unmerged (low-rank factors beside the 4-bit weights)",
                (false, true) => "merged and re-quantized (no lora_onnx in this folder: re-export it)",
                (false, false) => "merged into the float32 weights",
            }
        ),
        None => println!("adapter pool: none configured (customization off)"),
    }
    println!(
        "one-token generation ok ({} prompt tokens in {:.1} ms)",
        out.prompt_tokens,
        out.prefill_time.as_secs_f64() * 1e3
    );
    Ok(())
}

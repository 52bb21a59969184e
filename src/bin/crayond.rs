//! crayond: the Crayon service. Serves the OpenAI-compatible HTTP API (`--listen` or `[server] listen`;
//! see docs/http.md) with device–server routing (docs/routing.md); `--check` validates a deployment.
//! The D-Bus interface and the local socket come next.

use std::ops::ControlFlow;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use crayon::cli::{CommonArgs, exit_code};
use crayon::{CancelToken, Engine, Message, Prompt};

#[derive(Parser)]
#[command(name = "crayond", version, about = "The Crayon on-device LLM service.")]
#[command(after_help = "Exit status: 0 success, 1 model/runtime failure, 2 bad config or usage.")]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    /// Validate the config, load the model, generate one token, print a report and exit
    #[arg(long)]
    check: bool,
    /// Serve HTTP on this address, e.g. 127.0.0.1:8090 (port 0: any free port) [overrides server.listen]
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli.common.init_logging("info");
    let result = if cli.check { check(&cli.common) } else { serve(&cli) };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("crayond: {e}");
            ExitCode::from(exit_code(&e) as u8)
        }
    }
}

fn serve(cli: &Cli) -> crayon::Result<()> {
    let mut cfg = cli.common.load_config()?;
    if let Some(l) = &cli.listen {
        cfg.server.listen = l.clone();
    }
    if cfg.server.listen.is_empty() {
        return Err(crayon::Error::Config {
            path: "server.listen".into(),
            msg: "nothing to serve: give --listen ADDR or set [server] listen (or run --check)".into(),
        });
    }
    let addr = crayon::server::check_listen(&cfg.server.listen, &cfg)?;
    let t0 = Instant::now();
    let engine = Engine::load(&cfg)?;
    tracing::info!(model = %cfg.model.dir.display(), seconds = t0.elapsed().as_secs_f64(), provider = %engine.provider(), "model loaded");
    let service = Arc::new(crayon::server::Service::new(engine, &cfg)?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| crayon::Error::Io { what: "async runtime", path: "(tokio)".into(), source: e })?;
    let mode = cfg.router.mode.name();
    let remote = cfg.remote.url.clone();
    runtime
        .block_on(crayon::server::serve(
            service,
            addr,
            move |bound| {
                // One line on stdout, for scripts and tests that start us on port 0.
                println!(
                    "crayond: serving HTTP on http://{bound} (route mode {mode}{})",
                    if remote.is_empty() { String::new() } else { format!(", server {remote}") }
                );
            },
            shutdown_signal(),
        ))
        .map_err(|e| crayon::Error::Io { what: "HTTP listener", path: cfg.server.listen.clone().into(), source: e })?;
    tracing::info!("stopped");
    Ok(())
}

/// SIGTERM or SIGINT: stop accepting, let in-flight requests finish.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
    tracing::info!("shutting down: finishing in-flight requests");
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
    match engine.pool() {
        Some(pool) => println!(
            "adapter pool: {} ({} adapters), {} saved customizations",
            pool.id,
            pool.adapters.len(),
            engine.adapters().len()
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

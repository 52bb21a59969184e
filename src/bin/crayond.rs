//! crayond: the Crayon service. This build provides `--check`: load the config and the model, run one
//! generation step and report; the serving interfaces (D-Bus, local socket, HTTP) come next.

use std::ops::ControlFlow;
use std::process::ExitCode;
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli.common.init_logging("info");
    if !cli.check {
        eprintln!("crayond: this build has no serving interface yet; run `crayond --check` to validate a deployment");
        return ExitCode::from(2);
    }
    match check(&cli.common) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("crayond: {e}");
            ExitCode::from(exit_code(&e) as u8)
        }
    }
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

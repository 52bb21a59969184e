//! crayonctl: the command-line client. For now it runs the engine in-process.

use std::io::{Read, Write};
use std::ops::ControlFlow;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use crayon::cli::{CommonArgs, exit_code};
use crayon::{CancelToken, Engine, Message, Prompt};

#[derive(Parser)]
#[command(name = "crayonctl", version, about = "Talk to Crayon: generate text with the on-device model.")]
#[command(after_help = "Exit status: 0 success, 1 model/runtime failure, 2 bad config or request.\n\
Example: crayonctl -c config/crayon.toml generate \"What is the capital of France?\"")]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Stream the model's answer to a prompt
    Generate(GenerateArgs),
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// The prompt; "-" or nothing reads it from standard input
    prompt: Option<String>,
    /// Send the prompt as raw text, without the chat template
    #[arg(long)]
    raw: bool,
    /// System message for the chat (default: generation.system_prompt, else the model's own)
    #[arg(long)]
    system: Option<String>,
    /// Tokens to generate at most [default: generation.max_new_tokens]
    #[arg(long, short = 'n')]
    max_tokens: Option<usize>,
    /// Sampling temperature, 0 for greedy [default: generation.temperature]
    #[arg(long, short = 't')]
    temperature: Option<f32>,
    /// Sample from the k most likely tokens only, 0 for all [default: generation.top_k]
    #[arg(long)]
    top_k: Option<usize>,
    /// Nucleus sampling threshold in (0, 1] [default: generation.top_p]
    #[arg(long)]
    top_p: Option<f32>,
    /// Random seed for reproducible sampling [default: generation.seed, else random]
    #[arg(long)]
    seed: Option<u64>,
    /// Stop when this string appears (repeatable; adds to generation.stop)
    #[arg(long)]
    stop: Vec<String>,
    /// Print the whole result as JSON (text, tokens with log-probabilities, timings) instead of streaming
    #[arg(long)]
    json: bool,
    /// Print prompt/decode speed to standard error at the end
    #[arg(long)]
    stats: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli.common.init_logging("warn");
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("crayonctl: {e}");
            ExitCode::from(exit_code(&e) as u8)
        }
    }
}

fn run(cli: &Cli) -> crayon::Result<()> {
    let Command::Generate(args) = &cli.cmd;
    let cfg = cli.common.load_config()?;
    let prompt_text = read_prompt(args.prompt.as_deref())?;
    let mut engine = Engine::load(&cfg)?;
    let prompt = if args.raw {
        Prompt::Text(prompt_text)
    } else {
        let mut messages = Vec::new();
        if let Some(s) = &args.system {
            messages.push(Message::new("system", s.clone()));
        }
        messages.push(Message::new("user", prompt_text));
        Prompt::Chat(messages)
    };
    let mut params = engine.default_params();
    if let Some(n) = args.max_tokens {
        params.max_new_tokens = n;
    }
    let s = &mut params.sampling;
    s.temperature = args.temperature.unwrap_or(s.temperature);
    s.top_k = args.top_k.unwrap_or(s.top_k);
    s.top_p = args.top_p.unwrap_or(s.top_p);
    s.seed = args.seed.or(s.seed);
    params.stop.extend(args.stop.iter().cloned());

    let cancel = CancelToken::new();
    let on_signal = cancel.clone();
    // Ctrl-C stops generation cleanly (the partial answer is kept); a second one kills the process.
    let _ = ctrlc::set_handler(move || {
        if on_signal.is_cancelled() {
            std::process::exit(130);
        }
        on_signal.cancel();
    });
    let stream = !args.json;
    let mut stdout = std::io::stdout().lock();
    let result = engine.generate(&prompt, &params, &cancel, &mut |text| {
        if stream && (stdout.write_all(text.as_bytes()).is_err() || stdout.flush().is_err()) {
            return ControlFlow::Break(()); // stdout closed (e.g. piped into `head`): stop working
        }
        ControlFlow::Continue(())
    })?;
    if args.json {
        let json = serde_json::to_string_pretty(&result).map_err(|e| crayon::Error::InvalidRequest(e.to_string()))?;
        let _ = writeln!(stdout, "{json}");
    } else {
        let _ = writeln!(stdout);
    }
    if args.stats {
        eprintln!(
            "[{} prompt tokens at {:.1} tok/s, {} generated at {:.1} tok/s, finish: {:?}, provider: {}]",
            result.prompt_tokens,
            result.prefill_tokens_per_s(),
            result.tokens.len(),
            result.decode_tokens_per_s(),
            result.finish_reason,
            engine.provider()
        );
    }
    Ok(())
}

fn read_prompt(arg: Option<&str>) -> crayon::Result<String> {
    match arg {
        Some(p) if p != "-" => Ok(p.to_string()),
        _ => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s).map_err(|e| {
                crayon::Error::InvalidRequest(format!("cannot read the prompt from standard input: {e}"))
            })?;
            if s.trim().is_empty() {
                return Err(crayon::Error::InvalidRequest("the prompt is empty".into()));
            }
            Ok(s)
        }
    }
}

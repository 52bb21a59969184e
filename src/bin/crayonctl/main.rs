//! crayonctl: the command-line client. With `--socket` it talks to a running `crayond` (its model,
//! adapters and queue, shared with every app on the machine); without, it runs the engine in-process.

mod remote;

use std::io::{Read, Write};
use std::ops::ControlFlow;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use crayon::cli::{CommonArgs, exit_code};
use crayon::{CancelToken, Engine, Message, Prompt};

#[derive(Parser)]
#[command(
    name = "crayonctl",
    version,
    about = "Talk to Crayon: generate text with the on-device model, customize it per task."
)]
#[command(
    after_help = "Exit status: 0 success, 1 model/runtime/daemon failure, 2 bad config or request or no such adapter, \
130 cancelled (Ctrl-C).\n\
Examples:\n  crayonctl -c config/crayon.toml generate \"What is the capital of France?\"   (model in this process)\n  \
crayonctl --socket generate \"What is the capital of France?\"   (the crayond service, $CRAYON_SOCKET or \
/run/crayon/crayon.sock)"
)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    /// Use the crayond service (--socket, or --socket=PATH) instead of loading the model here [default path:
    /// $CRAYON_SOCKET, else /run/crayon/crayon.sock]; --config and the model options are then unused
    #[arg(long, global = true, num_args = 0..=1, require_equals = true, default_missing_value = "", value_name = "PATH")]
    socket: Option<String>,
    /// With --socket: longest wait, in seconds, for the next reply from the daemon
    #[arg(long, global = true, default_value_t = 300)]
    socket_timeout: u64,
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Stream the model's answer to a prompt
    Generate(GenerateArgs),
    /// Customize the model for a task from a few examples (no training): prints the blend weights
    Customize(CustomizeArgs),
    /// List the customized adapters
    Adapters {
        /// Print JSON (the daemon's adapter objects, with or without --socket)
        #[arg(long)]
        json: bool,
    },
    /// Remove a customized adapter
    Remove {
        /// Adapter name
        name: String,
    },
    /// The service's status: model, provider, routing, counters (needs --socket)
    Status {
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// The service's metrics in OpenMetrics / Prometheus text, as HTTP `GET /metrics` serves them
    /// (needs --socket; e.g. for node_exporter's textfile collector)
    Metrics,
}

#[derive(clap::Args)]
struct CustomizeArgs {
    /// Name of the new adapter (1-64 of A-Z a-z 0-9 . _ -); an existing one is replaced
    name: String,
    /// JSON Lines file of examples, one {"input": "...", "output": "..."} per line ("-": standard input)
    #[arg(long, short = 'e')]
    examples: std::path::PathBuf,
    /// Print the result as JSON (the daemon's customize reply, with or without --socket)
    #[arg(long)]
    json: bool,
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
    /// Print the whole answer as JSON instead of streaming: the OpenAI response with the `crayon` object
    /// (route, scores, latency), the same schema with or without --socket
    #[arg(long)]
    json: bool,
    /// Print prompt/decode speed to standard error at the end
    #[arg(long)]
    stats: bool,
    /// Answer with this customized adapter (see `crayonctl adapters`)
    #[arg(long, short = 'a')]
    adapter: Option<String>,
    /// A choice question: an answer option (repeat for each, 2 to 26). The answer is the option whose
    /// text the model finds most likely after the prompt; --stats prints every option's score
    #[arg(long = "choice", value_name = "TEXT")]
    choices: Vec<String>,
    /// How option log-likelihoods are compared [default: choices.normalization]
    #[arg(long, value_enum)]
    normalization: Option<NormalizationArg>,
    /// Divide out each option's prior after a content-free prompt [default: choices.calibration]
    #[arg(long, value_enum)]
    calibration: Option<CalibrationArg>,
    /// How sure the answer is, for routing: the chosen option's mean probability over the six scorings,
    /// or the margin to the runner-up [default: choices.confidence]
    #[arg(long, value_enum)]
    confidence: Option<ConfidenceArg>,
    /// What to do with a prompt longer than the context (or --pot-tokens): refuse it, cut its middle,
    /// or read it in a fixed cache compressed as it fills (window, infinipot) [default: context.policy]
    #[arg(long, value_enum)]
    context: Option<ContextArg>,
    /// Most KV-cache entries the request holds [default: context.pot_tokens]
    #[arg(long, value_name = "N")]
    pot_tokens: Option<usize>,
    /// Entries a compression keeps [default: context.keep_tokens, else half the pot]
    #[arg(long, value_name = "N")]
    keep_tokens: Option<usize>,
}

/// `--context` values (see `[context]` in docs/config.md and docs/long-context.md).
#[derive(Clone, Copy, clap::ValueEnum)]
enum ContextArg {
    Refuse,
    Truncate,
    Window,
    Infinipot,
}

/// `--normalization` values (see `[choices]` in docs/config.md).
#[derive(Clone, Copy, clap::ValueEnum)]
enum NormalizationArg {
    Sum,
    Mean,
    Bytes,
}

/// `--calibration` values.
#[derive(Clone, Copy, clap::ValueEnum)]
enum CalibrationArg {
    None,
    ContentFree,
}

/// `--confidence` values.
#[derive(Clone, Copy, clap::ValueEnum)]
enum ConfidenceArg {
    Consensus,
    Margin,
}

impl GenerateArgs {
    /// The `[context]` overrides the flags ask for.
    fn context(&self) -> crayon::context::ContextOverrides {
        use crayon::context::ContextPolicy;
        crayon::context::ContextOverrides {
            policy: self.context.map(|c| match c {
                ContextArg::Refuse => ContextPolicy::Refuse,
                ContextArg::Truncate => ContextPolicy::Truncate,
                ContextArg::Window => ContextPolicy::Window,
                ContextArg::Infinipot => ContextPolicy::Infinipot,
            }),
            pot_tokens: self.pot_tokens,
            keep_tokens: self.keep_tokens,
            nuc_share: None,
        }
    }

    /// The scoring overrides the flags ask for.
    fn choice_scoring(&self) -> crayon::choices::ScoringOverrides {
        use crayon::choices::{Calibration, ConfidenceMeasure, Normalization};
        crayon::choices::ScoringOverrides {
            normalization: self.normalization.map(|n| match n {
                NormalizationArg::Sum => Normalization::Sum,
                NormalizationArg::Mean => Normalization::Mean,
                NormalizationArg::Bytes => Normalization::Bytes,
            }),
            calibration: self.calibration.map(|c| match c {
                CalibrationArg::None => Calibration::None,
                CalibrationArg::ContentFree => Calibration::ContentFree,
            }),
            confidence: self.confidence.map(|c| match c {
                ConfidenceArg::Consensus => ConfidenceMeasure::Consensus,
                ConfidenceArg::Margin => ConfidenceMeasure::Margin,
            }),
        }
    }
}

/// Every option's score, best first, to standard error (`--stats` with `--choice`).
fn print_choice_scores(scores: &[crayon::choices::OptionScore], probs: &[f32]) {
    let mut rows: Vec<(&crayon::choices::OptionScore, f32)> =
        scores.iter().zip(probs.iter().copied().chain(std::iter::repeat(f32::NAN))).collect();
    rows.sort_by(|a, b| b.0.score.total_cmp(&a.0.score));
    eprintln!("{:>8} {:>9} {:>9} {:>6} {:>6}  option", "prob", "score", "logprob", "mean", "tokens");
    for (o, p) in rows {
        eprintln!("{p:>8.4} {:>9.4} {:>9.3} {:>6.3} {:>6}  {}", o.score, o.logprob, o.mean_logprob, o.tokens, o.text);
    }
}

fn main() -> ExitCode {
    // Like every Unix filter: a closed output pipe (`crayonctl ... | head`) ends the process quietly
    // instead of a panic in println! (Rust ignores SIGPIPE by default).
    // SAFETY: restoring the default disposition of a signal, before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    cli.common.init_logging("warn");
    let outcome = match &cli.socket {
        Some(path) => run_remote(&cli, path).map_err(|e| (e.to_string(), e.exit_code())),
        None => run(&cli).map_err(|e| (e.to_string(), exit_code(&e))),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err((msg, code)) => {
            eprintln!("crayonctl: {msg}");
            ExitCode::from(code as u8)
        }
    }
}

fn run(cli: &Cli) -> crayon::Result<()> {
    let cfg = cli.common.load_config()?;
    match &cli.cmd {
        Command::Generate(args) => generate(cfg, args),
        Command::Customize(args) => customize(cfg, args),
        Command::Adapters { json } => list_adapters(cfg, *json),
        Command::Remove { name } => {
            Engine::load(&cfg)?.remove_adapter(name)?;
            println!("removed adapter '{name}'");
            Ok(())
        }
        Command::Status { .. } | Command::Metrics => Err(crayon::Error::InvalidRequest(
            "`status` and `metrics` report on the crayond service: add --socket[=PATH]".into(),
        )),
    }
}

fn run_remote(cli: &Cli, path: &str) -> Result<(), remote::RemoteError> {
    let path = match path.is_empty() {
        true => crayon_client::default_path(),
        false => std::path::PathBuf::from(path),
    };
    let mut daemon = remote::Remote::connect(&path, std::time::Duration::from_secs(cli.socket_timeout.max(1)))?;
    match &cli.cmd {
        Command::Generate(args) => daemon.generate(args),
        Command::Customize(args) => daemon.customize(args),
        Command::Adapters { json } => daemon.adapters(*json),
        Command::Remove { name } => daemon.remove(name),
        Command::Status { json } => daemon.status(*json),
        Command::Metrics => daemon.metrics(),
    }
}

fn customize(cfg: crayon::Config, args: &CustomizeArgs) -> crayon::Result<()> {
    let examples = read_examples(&args.examples, local_limit(&cfg))?;
    let mut engine = Engine::load(&cfg)?;
    let report = engine.customize(&args.name, &examples)?;
    if args.json {
        // The daemon's reply schema (`crayonctl --socket customize --json` prints the same).
        println!("{}", pretty(&crayon::service::customize_reply(&report.customization, &report, None)));
        return Ok(());
    }
    let c = &report.customization;
    println!(
        "adapter '{}' from {} examples (pool {}, examples digest {})",
        c.name,
        c.example_count,
        c.pool_id,
        &c.example_digest[..16]
    );
    println!("{:<8} {:>8} {:>10}", "base", "weight", "similarity");
    for ((name, w), s) in c.adapters.iter().zip(&c.weights).zip(&c.similarities) {
        println!("{name:<8} {w:>8.4} {s:>10.4}");
    }
    println!(
        "ready in {:.0} ms (embed {:.1} ms, merge {:.0} ms, session {:.0} ms)",
        report.total_ms, report.embed_ms, report.merge_ms, report.session_ms
    );
    Ok(())
}

fn list_adapters(cfg: crayon::Config, json: bool) -> crayon::Result<()> {
    let engine = Engine::load(&cfg)?;
    let list = engine.adapters();
    if json {
        let shown: Vec<_> = list.iter().map(|c| crayon::service::adapter_json(c)).collect();
        println!("{}", pretty(&serde_json::Value::Array(shown)));
        return Ok(());
    }
    if list.is_empty() {
        println!("no customized adapters (make one with `crayonctl customize NAME --examples FILE`)");
    }
    for c in list {
        print_adapter_line(&c.name, c.example_count, &c.pool_id, &c.adapters, &c.weights);
    }
    Ok(())
}

/// One line of `crayonctl adapters`: name, examples, pool and the heaviest base adapter.
fn print_adapter_line(name: &str, examples: usize, pool: &str, adapters: &[String], weights: &[f32]) {
    let top = adapters
        .iter()
        .zip(weights)
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(n, w)| format!("{n} {w:.2}"))
        .unwrap_or_default();
    println!("{name:<24} {examples:>3} examples  pool {pool}  top {top}");
}

/// In-process commands read their input within the same budget the daemon would apply.
fn local_limit(cfg: &crayon::Config) -> Limit {
    Limit(cfg.server.max_body_bytes, "server.max_body_bytes")
}

/// Reads the examples (a JSON-lines file, `-` for standard input), at most `limit` bytes: a huge file
/// or `/dev/zero` is refused after `limit` bytes, not read into memory.
fn read_examples(path: &std::path::Path, limit: Limit) -> crayon::Result<Vec<crayon::Example>> {
    let io = |source| crayon::Error::Io { what: "examples", path: path.to_path_buf(), source };
    let text = if path.as_os_str() == "-" {
        read_bounded(std::io::stdin().lock(), limit, "the examples are").map_err(io)?
    } else {
        read_bounded(std::fs::File::open(path).map_err(io)?, limit, "the examples are").map_err(io)?
    }
    .map_err(crayon::Error::InvalidRequest)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let ex: crayon::Example = serde_json::from_str(line).map_err(|e| {
            crayon::Error::InvalidRequest(format!(
                "{} line {}: expected {{\"input\": \"...\", \"output\": \"...\"}}: {e}",
                path.display(),
                i + 1
            ))
        })?;
        out.push(ex);
    }
    Ok(out)
}

fn generate(cfg: crayon::Config, args: &GenerateArgs) -> crayon::Result<()> {
    let prompt_text = read_prompt(args.prompt.as_deref(), local_limit(&cfg))?;
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
    params.adapter = args.adapter.clone();
    params.choices = args.choices.clone();
    params.choice_scoring = args.choice_scoring();
    params.context = args.context();

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
    let started = std::time::Instant::now();
    let result = engine.generate(&prompt, &params, &cancel, &mut |text| {
        if stream && (stdout.write_all(text.as_bytes()).is_err() || stdout.flush().is_err()) {
            return ControlFlow::Break(()); // stdout closed (e.g. piped into `head`): stop working
        }
        ControlFlow::Continue(())
    })?;
    if args.json {
        let reply = in_process_reply(&cfg, &engine, args, &params, result.clone(), started);
        let _ = writeln!(stdout, "{}", pretty(&crayon::openai::full_response(&reply)));
    } else {
        let _ = writeln!(stdout);
    }
    if let (true, Some(c)) = (args.stats, &result.context) {
        eprintln!(
            "[context {}: pot {} entries, {} compressions, {} tokens dropped]",
            c.policy.name(),
            c.pot_tokens,
            c.compressions,
            c.dropped_tokens
        );
    }
    if args.stats && !result.choice_scores.is_empty() {
        print_choice_scores(&result.choice_scores, &result.choice_probs);
    }
    if args.stats {
        // Decode speed needs at least two tokens (the first one comes out of the prefill); a choice
        // question decodes nothing: it scores its options.
        let decode = match result.tokens.len() {
            _ if !result.choice_scores.is_empty() => format!(
                ", {} options ({} tokens) scored in {:.0} ms, confidence {:.3}",
                result.choice_scores.len(),
                result.choice_scores.iter().map(|s| s.tokens).sum::<usize>(),
                result.decode_time.as_secs_f64() * 1e3,
                result.choice_confidence.unwrap_or(f32::NAN)
            ),
            0 | 1 => String::new(),
            n => format!(", {} generated at {:.1} tok/s", n, result.decode_tokens_per_s()),
        };
        eprintln!(
            "[{} prompt tokens at {:.1} tok/s{decode}, finish: {:?}, provider: {}]",
            result.prompt_tokens,
            result.prefill_tokens_per_s(),
            result.finish_reason,
            engine.provider()
        );
    }
    if cancel.is_cancelled() {
        return Err(crayon::Error::Cancelled); // exit 130, as documented: the partial answer is above
    }
    Ok(())
}

/// An in-process answer as the daemon would reply: `--json` prints one schema whether crayonctl runs
/// the model itself or asks crayond (`--socket`): the OpenAI response with the `crayon` object.
fn in_process_reply(
    cfg: &crayon::Config,
    engine: &Engine,
    args: &GenerateArgs,
    params: &crayon::GenerationParams,
    g: crayon::Generation,
    started: std::time::Instant,
) -> crayon::service::Reply {
    use crayon::router::{Answer, Latency, Route, confidence};
    let ms = started.elapsed().as_secs_f64() * 1e3;
    let latency = Latency { local_ms: ms, total_ms: ms, ..Latency::default() };
    let route = Route::device_only(confidence(&g), latency);
    let answer = Answer::from_device(g, &params.choices, route);
    crayon::service::Reply {
        endpoint: if args.raw { crayon::service::Endpoint::Completion } else { crayon::service::Endpoint::Chat },
        model: params.adapter.clone().unwrap_or_else(|| crayon::service::model_id(engine, cfg)),
        n: 1,
        answers: vec![crayon::service::Answered {
            answer,
            adapter: params.adapter.clone(),
            blend: None,
            blend_error: None,
        }],
    }
}

fn pretty(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

fn read_prompt(arg: Option<&str>, limit: Limit) -> crayon::Result<String> {
    let s = match arg {
        Some(p) if p != "-" => p.to_string(),
        _ => read_bounded(std::io::stdin().lock(), limit, "the prompt is")
            .map_err(|e| crayon::Error::InvalidRequest(format!("cannot read the prompt from standard input: {e}")))?
            .map_err(crayon::Error::InvalidRequest)?,
    };
    if s.len() > limit.0 {
        return Err(crayon::Error::InvalidRequest(format!("the prompt is over {} bytes ({})", limit.0, limit.1)));
    }
    if s.trim().is_empty() {
        return Err(crayon::Error::InvalidRequest("the prompt is empty".into()));
    }
    Ok(s)
}

/// The input budget a command's files and standard input are read within: bytes, and the setting
/// that sets it (the daemon's, or in-process `server.max_body_bytes`).
#[derive(Clone, Copy)]
pub struct Limit(pub usize, pub &'static str);

/// All of `r` as UTF-8 text, refused (the inner error) once it passes `limit` bytes, never holding
/// more than that; the outer error is the read's own.
fn read_bounded(r: impl Read, limit: Limit, what: &str) -> std::io::Result<Result<String, String>> {
    let mut buf = Vec::new();
    r.take(limit.0 as u64 + 1).read_to_end(&mut buf)?;
    if buf.len() > limit.0 {
        return Ok(Err(format!("{what} over {} bytes ({})", limit.0, limit.1)));
    }
    Ok(String::from_utf8(buf).map_err(|_| format!("{what} not UTF-8 text")))
}

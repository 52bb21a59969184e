//! crayonctl's commands answered by a running `crayond` over its local socket (docs/socket.md):
//! the daemon's model, adapters and queue, shared with every other app on the machine.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use crayon_client::Code;
use crayon_client::{Client, ClientError};
use serde_json::{Value, json};

use super::{CustomizeArgs, GenerateArgs, Limit, pretty, print_adapter_line, read_examples, read_prompt};

/// What can go wrong talking to the daemon: its own error replies keep their code.
pub enum RemoteError {
    /// Bad input found before anything was sent (unreadable examples, empty prompt).
    Local(crayon::Error),
    Client {
        path: String,
        err: ClientError,
    },
}

impl RemoteError {
    pub fn exit_code(&self) -> i32 {
        match self {
            RemoteError::Local(e) => crayon::cli::exit_code(e),
            // The daemon's code carries the failure's kind: the same exit status as in-process.
            RemoteError::Client { err, .. } => err.code().map(Code::kind).map_or(1, crayon::cli::exit_code_of),
        }
    }
}

impl std::fmt::Display for RemoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RemoteError::Local(e) => write!(f, "{e}"),
            RemoteError::Client { path, err: err @ ClientError::Connect { .. } } => write!(
                f,
                "{err} (is crayond running and serving its socket there? start it, or pass --socket=PATH; \
                 without --socket crayonctl runs the model itself) [{path}]"
            ),
            RemoteError::Client { path, err } => write!(f, "{err} [crayond at {path}]"),
        }
    }
}

impl From<crayon::Error> for RemoteError {
    fn from(e: crayon::Error) -> Self {
        RemoteError::Local(e)
    }
}

type Result<T> = std::result::Result<T, RemoteError>;

/// A connection to the daemon at `path`, errors labelled with it.
pub struct Remote {
    client: Client,
    path: String,
}

impl Remote {
    pub fn connect(path: &Path, timeout: Duration) -> Result<Remote> {
        let label = path.display().to_string();
        let client = Client::connect(path, timeout).map_err(|err| RemoteError::Client { path: label.clone(), err })?;
        Ok(Remote { client, path: label })
    }

    /// Input is read within the daemon's frame limit (what it would refuse anyway).
    fn limit(&self) -> Limit {
        Limit(self.client.max_frame(), "the daemon's socket.max_frame_bytes")
    }

    fn call(&mut self, op: Value, on_token: &mut dyn FnMut(&str) -> bool) -> Result<Value> {
        self.client.call(op, on_token).map_err(|err| RemoteError::Client { path: self.path.clone(), err })
    }

    fn call_quiet(&mut self, op: Value) -> Result<Value> {
        self.call(op, &mut |_| true)
    }

    pub fn generate(&mut self, args: &GenerateArgs) -> Result<()> {
        let prompt = read_prompt(args.prompt.as_deref(), self.limit())?;
        let mut body = json!({"max_tokens": args.max_tokens, "temperature": args.temperature, "top_k": args.top_k,
                              "top_p": args.top_p, "seed": args.seed});
        if !args.stop.is_empty() {
            body["stop"] = json!(args.stop);
        }
        if let Some(a) = &args.adapter {
            body["model"] = json!(a);
        }
        if !args.choices.is_empty() {
            body["crayon"] = json!({"choices": args.choices, "choice_scoring": args.choice_scoring()});
        }
        if !args.context().is_empty() {
            body["crayon"]["context"] = json!(args.context());
        }
        let op = if args.raw {
            body["prompt"] = json!(prompt);
            "complete"
        } else {
            let mut messages = Vec::new();
            if let Some(s) = &args.system {
                messages.push(json!({"role": "system", "content": s}));
            }
            messages.push(json!({"role": "user", "content": prompt}));
            body["messages"] = json!(messages);
            "chat"
        };
        // Unset options are left out: the daemon's [generation] defaults apply.
        if let Some(o) = body.as_object_mut() {
            o.retain(|_, v| !v.is_null());
        }
        let stream = !args.json;
        // Ctrl-C cancels the request in the daemon (the partial answer stays printed); a second one exits.
        let canceller = self.client.canceller();
        let asked = std::sync::atomic::AtomicBool::new(false);
        let _ = ctrlc::set_handler(move || {
            if asked.swap(true, std::sync::atomic::Ordering::SeqCst) || canceller.cancel().is_err() {
                std::process::exit(130);
            }
        });
        let mut stdout = std::io::stdout().lock();
        let result = self.call(json!({"op": op, "stream": stream, "body": body}), &mut |text| {
            stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()).is_ok()
        })?;
        if args.json {
            let _ = writeln!(stdout, "{}", pretty(&result));
        } else {
            let _ = writeln!(stdout);
        }
        if args.stats {
            let c = &result["crayon"];
            if let Ok(scores) = serde_json::from_value::<Vec<crayon::choices::OptionScore>>(c["choice_scores"].clone())
            {
                let probs: Vec<f32> = serde_json::from_value(c["choice_probs"].clone()).unwrap_or_default();
                if !scores.is_empty() {
                    super::print_choice_scores(&scores, &probs);
                }
            }
            eprintln!(
                "[{} prompt tokens, {} generated, finish: {}, answered by {} ({}), {:.0} ms in crayond]",
                result["usage"]["prompt_tokens"],
                result["usage"]["completion_tokens"],
                result["choices"][0]["finish_reason"].as_str().unwrap_or("?"),
                c["answered_by"].as_str().unwrap_or("?"),
                c["reason"].as_str().unwrap_or("?"),
                c["latency"]["total_ms"].as_f64().unwrap_or(f64::NAN)
            );
        }
        Ok(())
    }

    pub fn customize(&mut self, args: &CustomizeArgs) -> Result<()> {
        let examples = read_examples(&args.examples, self.limit())?;
        let r = self.call_quiet(json!({"op": "customize", "body": {"name": args.name, "examples": examples}}))?;
        if args.json {
            println!("{}", pretty(&r));
            return Ok(());
        }
        let a = &r["adapter"];
        println!(
            "adapter '{}' from {} examples (pool {}, in crayond at {})",
            a["name"].as_str().unwrap_or("?"),
            a["example_count"],
            a["pool_id"].as_str().unwrap_or("?"),
            self.path
        );
        println!("{:<8} {:>8} {:>10}", "base", "weight", "similarity");
        let names = a["adapters"].as_array().cloned().unwrap_or_default();
        let weights = a["weights"].as_array().cloned().unwrap_or_default();
        let sims = a["similarities"].as_array().cloned().unwrap_or_default();
        for ((n, w), s) in names.iter().zip(&weights).zip(&sims) {
            let (w, s) = (w.as_f64().unwrap_or(f64::NAN), s.as_f64().unwrap_or(f64::NAN));
            println!("{:<8} {w:>8.4} {s:>10.4}", n.as_str().unwrap_or("?"));
        }
        println!(
            "ready in {:.0} ms (embed {:.1} ms, merge {:.0} ms, session {:.0} ms)",
            r["total_ms"].as_f64().unwrap_or(f64::NAN),
            r["embed_ms"].as_f64().unwrap_or(f64::NAN),
            r["merge_ms"].as_f64().unwrap_or(f64::NAN),
            r["session_ms"].as_f64().unwrap_or(f64::NAN)
        );
        Ok(())
    }

    pub fn adapters(&mut self, json: bool) -> Result<()> {
        let r = self.call_quiet(json!({"op": "adapters"}))?;
        let list = r["data"].as_array().cloned().unwrap_or_default();
        if json {
            println!("{}", pretty(&Value::Array(list)));
            return Ok(());
        }
        if list.is_empty() {
            println!("no customized adapters (make one with `crayonctl --socket customize NAME --examples FILE`)");
        }
        for a in &list {
            let names: Vec<String> =
                a["adapters"].as_array().into_iter().flatten().map(|n| n.as_str().unwrap_or("?").to_string()).collect();
            let weights: Vec<f32> =
                a["weights"].as_array().into_iter().flatten().map(|w| w.as_f64().unwrap_or(0.0) as f32).collect();
            print_adapter_line(
                a["name"].as_str().unwrap_or("?"),
                a["example_count"].as_u64().unwrap_or(0) as usize,
                a["pool_id"].as_str().unwrap_or("?"),
                &names,
                &weights,
            );
        }
        Ok(())
    }

    pub fn remove(&mut self, name: &str) -> Result<()> {
        self.call_quiet(json!({"op": "remove", "name": name}))?;
        println!("removed adapter '{name}' (in crayond at {})", self.path);
        Ok(())
    }

    pub fn metrics(&mut self) -> Result<()> {
        let r = self.call_quiet(json!({"op": "metrics"}))?;
        print!("{}", r["text"].as_str().unwrap_or_default());
        Ok(())
    }

    pub fn status(&mut self, json: bool) -> Result<()> {
        let r = self.call_quiet(json!({"op": "status"}))?;
        if json {
            println!("{}", pretty(&r));
            return Ok(());
        }
        let s = |k: &str| match &r[k] {
            Value::String(v) => v.clone(),
            Value::Null => "-".into(),
            v => v.to_string(),
        };
        println!("crayond {} at {}: {}", s("version"), self.path, s("status"));
        println!("model {} on {}, pool {}, routing {}", s("model"), s("provider"), s("pool_id"), s("route_mode"));
        println!(
            "requests {} (offloaded {}, fallbacks {}, failed {}, cancelled {}, busy {}), in flight {}/{}, queued {}",
            s("requests"),
            s("offloaded"),
            s("fallbacks"),
            s("failed"),
            s("cancelled"),
            s("rejected_busy"),
            s("in_flight"),
            s("max_concurrent"),
            s("queued")
        );
        Ok(())
    }
}

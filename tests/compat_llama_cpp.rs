//! The device client against a plain OpenAI-compatible server that knows nothing of Crayon:
//! llama-cpp-python's server (a real process on loopback) serving SmolLM2's GGUF. The device offloads
//! chat and text prompts to it, sends its `crayon` extension (which such a server ignores), and flags
//! the answer as not blended. `scripts/test` installs the server into `.venv-compat` and sets
//! CRAYON_COMPAT_PYTHON / CRAYON_COMPAT_GGUF; without them the test says so and is skipped, unless
//! CRAYON_REQUIRE_COMPAT is set (CI).

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::daemon::{Daemon, PATIENCE, tiny_config};
use serde_json::json;

struct LlamaServer {
    child: Child,
    url: String,
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn llama_server() -> Option<LlamaServer> {
    let (python, gguf) = match (std::env::var("CRAYON_COMPAT_PYTHON"), std::env::var("CRAYON_COMPAT_GGUF")) {
        (Ok(p), Ok(g)) => (p, g),
        _ => {
            assert!(
                std::env::var_os("CRAYON_REQUIRE_COMPAT").is_none(),
                "CRAYON_COMPAT_PYTHON / CRAYON_COMPAT_GGUF are not set: run through scripts/test"
            );
            eprintln!("skipped: llama-cpp-python server not set up (scripts/test sets it up)");
            return None;
        }
    };
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = Command::new(&python)
        .args(["-m", "llama_cpp.server", "--model", &gguf, "--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--n_threads", "1", "--n_ctx", "2048"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {python} -m llama_cpp.server: {e}"));
    let url = format!("http://127.0.0.1:{port}");
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || for _ in BufReader::new(stderr).lines() {}); // keep the pipe drained
    let t0 = Instant::now();
    let agent = common::daemon::agent();
    while agent.get(&format!("{url}/v1/models")).call().map(|r| r.status().as_u16()).ok() != Some(200) {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("llama_cpp.server exited with {status}");
        }
        assert!(t0.elapsed() < PATIENCE, "llama_cpp.server did not come up on {url}");
        std::thread::sleep(Duration::from_millis(200));
    }
    Some(LlamaServer { child, url })
}

#[test]
fn device_offloads_to_llama_cpp_python_server() {
    let Some(server) = llama_server() else { return };
    let state = tempfile::tempdir().unwrap();
    let pool = common::repo().join("models/tiny-pool");
    let cfg = format!("[router]\nmode = \"server_only\"\n[remote]\nurl = \"{}/v1\"\ntimeout_ms = 60000\n", server.url);
    let dev = Daemon::start(&tiny_config(Some(&pool), state.path(), &cfg));

    let (status, chat) = dev.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "What is 2+2?"}], "max_tokens": 8}),
    );
    assert_eq!(status, 200, "{chat}");
    let c = &chat["crayon"];
    assert_eq!((c["answered_by"].as_str(), c["fallback"].as_str()), (Some("server"), None), "{chat}");
    assert_eq!(c["server_blend"], false, "a plain server cannot apply a blend: {chat}");
    assert!(!chat["choices"][0]["message"]["content"].as_str().unwrap().is_empty(), "{chat}");
    assert!(chat["usage"]["completion_tokens"].as_u64().unwrap() > 0, "{chat}");

    // A customized request: the extension travels along and is ignored; text prompts use /v1/completions.
    let examples = json!([{"input": "Question: 1+1?\n A. 2\n B. 3\nAnswer:", "output": " A"}]);
    let (status, made) = dev.post("/v1/crayon/adapters", &json!({"name": "math", "examples": examples}));
    assert_eq!(status, 200, "{made}");
    let (status, text) = dev.post(
        "/v1/completions",
        &json!({"model": "math", "prompt": "Question: 2+2?\n A. 4\n B. 5\nAnswer:", "max_tokens": 3,
                "crayon": {"choices": ["A", "B"]}}),
    );
    assert_eq!(status, 200, "{text}");
    assert_eq!(text["crayon"]["answered_by"], "server", "{text}");
    assert_eq!(text["crayon"]["server_blend"], false, "{text}");
}

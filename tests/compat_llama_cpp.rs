//! The device client against a plain OpenAI-compatible server that knows nothing of Crayon:
//! llama-cpp-python's server (a real process on loopback) serving SmolLM2's GGUF. The device offloads
//! chat and text prompts to it, sends its `crayon` extension (which such a server ignores), and flags
//! the answer as not blended. `scripts/test` installs the server into `.venv-compat` and sets
//! CRAYON_COMPAT_PYTHON / CRAYON_COMPAT_GGUF; without them the test says so and is skipped, unless
//! CRAYON_REQUIRE_COMPAT is set (CI).

mod common;

use std::process::Command;

use common::daemon::{Daemon, PeerServer, tiny_config};
use serde_json::json;

fn llama_server() -> Option<PeerServer> {
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
    let mut cmd = Command::new(&python);
    cmd.args(["-m", "llama_cpp.server", "--model", &gguf, "--n_threads", "1", "--n_ctx", "2048"]);
    Some(PeerServer::start(cmd, "/v1/models"))
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

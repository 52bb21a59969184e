//! The command-line tools as a user runs them: real processes, exit codes and messages.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use common::*;

fn crayonctl(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_crayonctl"))
        .args(args)
        .env_remove("CRAYON_CONFIG")
        .env_remove("ORT_DYLIB_PATH")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    // A child that stops reading early (input over its budget) closes the pipe: not this test's error.
    let _ = input.write_all(stdin.unwrap_or("").as_bytes());
    drop(input);
    child.wait_with_output().unwrap()
}

fn tiny_args() -> Vec<String> {
    let model = model_dir("tiny");
    vec!["--model".into(), model.display().to_string(), "--ort-library".into(), ort_library().display().to_string()]
}

fn run_tiny(extra: &[&str], stdin: Option<&str>) -> Output {
    let base = tiny_args();
    let mut args: Vec<&str> = base.iter().map(String::as_str).collect();
    args.extend_from_slice(extra);
    crayonctl(&args, stdin)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn help_documents_every_option() {
    let o = crayonctl(&["generate", "--help"], None);
    assert!(o.status.success());
    let help = String::from_utf8_lossy(&o.stdout);
    for opt in
        ["--raw", "--system", "--max-tokens", "--temperature", "--top-k", "--top-p", "--seed", "--stop", "--json"]
    {
        assert!(help.contains(opt), "generate --help lacks {opt}");
    }
    let o = crayonctl(&["--help"], None);
    assert!(String::from_utf8_lossy(&o.stdout).contains("Exit status"));
}

#[test]
fn generate_streams_text_and_json_is_the_daemons_reply() {
    let o = run_tiny(&["generate", "-n", "5", "Hello"], None);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!o.stdout.is_empty());

    let o = run_tiny(&["generate", "-n", "5", "--json", "--seed", "3", "-t", "0.8", "Hello"], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON output");
    // The schema crayond replies with (tests/service.rs compares the two modes).
    assert_eq!(v["object"], "chat.completion", "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 5, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
    assert_eq!(v["crayon"]["answered_by"], "device", "{v}");
    assert!(v["crayon"]["latency"]["total_ms"].as_f64().unwrap() > 0.0, "{v}");
}

#[test]
fn prompt_can_come_from_stdin() {
    let o = run_tiny(&["generate", "-n", "2", "--raw"], Some("Once upon a time"));
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run_tiny(&["generate", "-n", "2"], Some("  \n"));
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("prompt is empty"), "{}", stderr(&o));
}

#[test]
fn bad_requests_exit_2_with_the_reason() {
    let o = run_tiny(&["generate", "--top-p", "1.5", "hi"], None);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("top_p"), "{}", stderr(&o));
}

#[test]
fn bad_config_exits_2_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("crayon.toml");
    std::fs::write(&cfg, "[generation]\nmax_new_tokens = \"many\"\n").unwrap();
    let o = crayonctl(&["-c", cfg.to_str().unwrap(), "generate", "hi"], None);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(e.contains("crayon.toml") && e.contains("line 2") && e.contains("max_new_tokens"), "{e}");

    let o = crayonctl(&["-c", "/nonexistent/crayon.toml", "generate", "hi"], None);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("/nonexistent/crayon.toml"));
}

#[test]
fn missing_or_wrong_runtime_library_exits_1_naming_it() {
    let model = model_dir("tiny");
    let m = model.to_str().unwrap();
    let o = crayonctl(&["--model", m, "--ort-library", "/nonexistent/libonnxruntime.so", "generate", "hi"], None);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("/nonexistent/libonnxruntime.so") && stderr(&o).contains("not found"),
        "{}",
        stderr(&o)
    );

    let not_a_library = model.join("config.json");
    let o = crayonctl(&["--model", m, "--ort-library", not_a_library.to_str().unwrap(), "generate", "hi"], None);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("config.json") && stderr(&o).contains("ONNX Runtime"), "{}", stderr(&o));
}

#[test]
fn missing_model_exits_1_naming_it() {
    let o = crayonctl(
        &["--model", "/nonexistent/model", "--ort-library", ort_library().to_str().unwrap(), "generate", "hi"],
        None,
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("/nonexistent/model"), "{}", stderr(&o));
}

#[test]
fn crayond_check_reports_provider() {
    let base = tiny_args();
    let mut args: Vec<&str> = base.iter().map(String::as_str).collect();
    args.push("--check");
    let o = Command::new(env!("CARGO_BIN_EXE_crayond")).args(&args).env_remove("CRAYON_CONFIG").output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("execution provider: cpu"), "{out}");
    assert!(stderr(&o).contains("decoder session ready"), "the provider in use is logged: {}", stderr(&o));
}

#[test]
fn customize_list_generate_with_adapter_and_remove() {
    let state = tempfile::tempdir().unwrap();
    let cfg_file = state.path().join("crayon.toml");
    std::fs::write(
        &cfg_file,
        format!(
            "[model]\ndir = {:?}\n[runtime]\nort_library = {:?}\n[pool]\ndir = {:?}\n[adapters]\nstate_dir = {:?}\n",
            model_dir("tiny"),
            ort_library(),
            repo().join("models/tiny-pool"),
            state.path()
        ),
    )
    .unwrap();
    let c = cfg_file.to_str().unwrap();
    let examples = repo().join("examples/science.jsonl");

    let o = crayonctl(&["-c", c, "customize", "science", "--examples", examples.to_str().unwrap()], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("adapter 'science' from 5 examples") && out.contains("c00") && out.contains("ready in"),
        "{out}"
    );

    let o = crayonctl(&["-c", c, "adapters", "--json"], None);
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(list[0]["name"], "science");
    let sum: f64 = list[0]["weights"].as_array().unwrap().iter().map(|w| w.as_f64().unwrap()).sum();
    assert!((sum - 1.0).abs() < 1e-4);

    let o = crayonctl(&["-c", c, "generate", "--adapter", "science", "-n", "3", "--raw", "Question:"], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = crayonctl(&["-c", c, "generate", "--adapter", "nope", "-n", "3", "hi"], None);
    assert_eq!(o.status.code(), Some(2), "a missing adapter exits 2, in-process as over the socket");
    assert!(stderr(&o).contains("adapter 'nope': no such adapter"), "{}", stderr(&o));

    let o = crayonctl(&["-c", c, "remove", "science"], None);
    assert!(o.status.success());
    let o = crayonctl(&["-c", c, "adapters"], None);
    assert!(String::from_utf8_lossy(&o.stdout).contains("no customized adapters"));
}

#[test]
fn malformed_examples_file_names_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"input\": \"a\", \"output\": \"b\"}\n{\"question\": \"x\"}\n").unwrap();
    let pool = repo().join("models/tiny-pool");
    let args = tiny_args();
    let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
    let state = dir.path().display().to_string();
    let cfg_text = format!("[pool]\ndir = {pool:?}\n[adapters]\nstate_dir = {state:?}\n");
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, cfg_text).unwrap();
    let cfg_s = cfg.display().to_string();
    let bad_s = bad.display().to_string();
    a.extend(["-c", &cfg_s, "customize", "x", "--examples", &bad_s]);
    let o = crayonctl(&a, None);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("bad.jsonl line 2"), "{}", stderr(&o));
}

/// Input is read within the input budget (`server.max_body_bytes`): an endless examples file or
/// prompt (`/dev/zero`) is refused after that many bytes, exit 2, instead of filling memory.
#[test]
fn endless_input_is_refused_at_the_input_budget() {
    let o = run_tiny(&["customize", "x", "--examples", "/dev/zero"], None);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("the examples are over 1048576 bytes (server.max_body_bytes)"), "{}", stderr(&o));
    let big = "a".repeat(1_100_000);
    let o = run_tiny(&["generate", "-"], Some(&big));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("the prompt is over 1048576 bytes"), "{}", stderr(&o));
}

/// `crayonctl generate | head -c 1`: a closed output pipe ends crayonctl quietly (SIGPIPE, as any
/// Unix filter), not with a Rust panic (exit 101).
#[test]
fn a_closed_output_pipe_is_not_a_panic() {
    use std::os::unix::process::ExitStatusExt;
    let base = tiny_args();
    let mut child = Command::new(env!("CARGO_BIN_EXE_crayonctl"))
        .args(&base)
        .args(["generate", "-n", "400", "--json", "Once upon a time"])
        .env_remove("CRAYON_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader is gone before anything is printed
    let o = child.wait_with_output().unwrap();
    assert_ne!(o.status.code(), Some(101), "panicked: {}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    assert!(o.status.success() || o.status.signal() == Some(libc::SIGPIPE), "{:?}", o.status);
}

/// Ctrl-C during a local generation stops it, keeps the partial answer and exits 130 (documented in
/// `--help`), not 0.
#[test]
fn ctrl_c_stops_a_local_generation_with_exit_130() {
    use std::io::Read;
    let base = tiny_args();
    let mut child = Command::new(env!("CARGO_BIN_EXE_crayonctl"))
        .args(&base)
        .args(["generate", "--raw", "--temperature", "0", "-n", "2000", "Once upon a time"])
        .env_remove("CRAYON_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 1];
    child.stdout.as_mut().unwrap().read_exact(&mut first).unwrap(); // generating
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
}

/// An examples line without `output` is refused naming the line (issue #14), not taken as empty.
#[test]
fn an_example_without_its_output_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ex = dir.path().join("ex.jsonl");
    std::fs::write(&ex, "{\"input\": \"a\", \"output\": \"b\"}\n{\"input\": \"c\"}\n").unwrap();
    let ex_s = ex.display().to_string();
    let o = run_tiny(&["customize", "x", "--examples", &ex_s], None);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("ex.jsonl line 2") && stderr(&o).contains("output"), "{}", stderr(&o));
}

//! Real processes and sockets for the service tests: `crayond` started on a free loopback port, a
//! small HTTP client, and a misbehaving HTTP server (refuses, 500s, lies, truncates, drips, hangs, or
//! records and forwards) standing in for a broken network path.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use serde_json::Value;

/// Longest a test waits for a daemon to come up or answer: a bound so a bug fails the test
/// instead of hanging it (not a performance assertion).
pub const PATIENCE: Duration = Duration::from_secs(120);

pub struct Daemon {
    pub child: Child,
    pub url: String,
    pub dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts `crayond --listen 127.0.0.1:0` with `config` (TOML) written to a fresh folder, which also
    /// holds the state directory unless the config names one.
    pub fn start(config: &str) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crayon.toml");
        std::fs::write(&path, config).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_crayond"))
            .args(["--config", path.to_str().unwrap(), "--listen", "127.0.0.1:0"])
            .env_remove("CRAYON_CONFIG")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("crayond: serving HTTP on ") {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_string());
                }
            }
        });
        match rx.recv_timeout(PATIENCE) {
            Ok(url) => Daemon { child, url, dir },
            Err(_) => {
                let _ = child.kill();
                let mut err = String::new();
                child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
                panic!("crayond did not start:\n{err}");
            }
        }
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        http_post(&format!("{}{path}", self.url), body, None)
    }

    pub fn get(&self, path: &str) -> Value {
        let mut r = agent().get(&format!("{}{path}", self.url)).call().unwrap();
        serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap()
    }

    /// A GET's status, content type and body text.
    pub fn get_text(&self, path: &str) -> (u16, String, String) {
        let mut r = agent().get(&format!("{}{path}", self.url)).call().unwrap();
        let ctype = r.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        (r.status().as_u16(), ctype, r.body_mut().read_to_string().unwrap())
    }

    pub fn health(&self) -> Value {
        self.get("/health")
    }

    /// Sends `body` to `path` of `device` from another thread, kills this daemon (the server) as soon
    /// as it is working on a request, and returns the device's reply.
    pub fn kill_while_serving(&mut self, device: &Daemon, path: &str, body: Value) -> (u16, Value) {
        let url = format!("{}{path}", device.url);
        let asking = std::thread::spawn(move || http_post(&url, &body, None));
        let t0 = std::time::Instant::now();
        while self.health()["in_flight"] != 1 {
            assert!(t0.elapsed() < PATIENCE, "the request never reached the server");
            std::thread::sleep(Duration::from_millis(5));
        }
        self.child.kill().unwrap();
        asking.join().unwrap()
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().timeout_global(Some(PATIENCE)).http_status_as_error(false).build().into()
}

pub fn http_post(url: &str, body: &Value, token: Option<&str>) -> (u16, Value) {
    let mut req = agent().post(url);
    if let Some(t) = token {
        req = req.header("Authorization", format!("Bearer {t}"));
    }
    let mut r = req.send_json(body).unwrap();
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// Config text for the tiny model (optionally with its pool and a server to route to).
pub fn tiny_config(pool: Option<&Path>, state: &Path, extra: &str) -> String {
    let model = super::model_dir("tiny");
    let mut s = format!(
        "[model]\ndir = {:?}\n[runtime]\nort_library = {:?}\nintra_threads = 1\n[adapters]\nstate_dir = {:?}\n",
        model,
        super::ort_library(),
        state
    );
    if let Some(p) = pool {
        s += &format!("[pool]\ndir = {p:?}\n");
    }
    s + extra
}

/// How a [`FaultServer`] misbehaves.
#[derive(Clone)]
pub enum Fault {
    /// Answers every request with HTTP 500.
    Status500,
    /// HTTP 200 with a body that is not a completion.
    Malformed,
    /// Announces a longer body than it sends, then closes.
    Truncated,
    /// Sends the headers, then one byte every 200 ms, forever.
    SlowDrip,
    /// Accepts the connection and never answers.
    Hang,
    /// Records each request body and forwards it to this base URL.
    Record(String),
    /// Records each request body and answers 200 with this JSON (a stand-in for a server that cannot
    /// run here).
    Answer(String),
}

pub struct FaultServer {
    pub url: String,
    pub requests: Arc<Mutex<Vec<String>>>,
    pub connections: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    addr: SocketAddr,
}

impl FaultServer {
    pub fn start(fault: Fault) -> FaultServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, c, st) = (requests.clone(), connections.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                c.fetch_add(1, Ordering::SeqCst);
                let (fault, r, st) = (fault.clone(), r.clone(), st.clone());
                std::thread::spawn(move || serve_one(conn, fault, r, st));
            }
        });
        FaultServer { url: format!("http://{addr}"), requests, connections, stop, addr }
    }

    /// A URL where nothing listens (connection refused).
    pub fn refused_url() -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        drop(l);
        url
    }
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr); // wake the accept loop
    }
}

fn read_request(conn: &mut TcpStream) -> Option<(String, String)> {
    let mut reader = BufReader::new(conn.try_clone().ok()?);
    let mut head = String::new();
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().ok()?;
        }
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).ok()?;
    Some((head, String::from_utf8_lossy(&body).into_owned()))
}

fn serve_one(mut conn: TcpStream, fault: Fault, requests: Arc<Mutex<Vec<String>>>, stop: Arc<AtomicBool>) {
    let Some((head, body)) = read_request(&mut conn) else { return };
    let reply = |conn: &mut TcpStream, status: &str, body: &str| {
        let _ = write!(
            conn,
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    };
    match fault {
        Fault::Status500 => reply(&mut conn, "500 Internal Server Error", r#"{"error":{"message":"boom"}}"#),
        Fault::Malformed => reply(&mut conn, "200 OK", r#"{"id":"x","choices":[{"message":{"content":null}}]}"#),
        Fault::Truncated => {
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{{\"choices\":[{{\"mess"
            );
        }
        Fault::SlowDrip => {
            let _ = write!(conn, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n");
            while !stop.load(Ordering::SeqCst) && conn.write_all(b" ").is_ok() {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        Fault::Hang => {
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Fault::Answer(json) => {
            requests.lock().unwrap().push(body.clone());
            reply(&mut conn, "200 OK", &json);
        }
        Fault::Record(target) => {
            // Request bodies are recorded; GETs (a llama.cpp server's adapter listing) only forwarded.
            let get = head.starts_with("GET ");
            if !get {
                requests.lock().unwrap().push(body.clone());
            }
            let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
            let auth = head
                .lines()
                .find_map(|l| l.strip_prefix("Authorization: ").or_else(|| l.strip_prefix("authorization: ")))
                .map(|s| s.trim().to_string());
            let url = format!("{target}{path}");
            let sent = match (get, auth) {
                (true, None) => agent().get(&url).call(),
                (true, Some(a)) => agent().get(&url).header("Authorization", a).call(),
                (false, auth) => {
                    let mut req = agent().post(&url).header("Content-Type", "application/json");
                    if let Some(a) = auth {
                        req = req.header("Authorization", a);
                    }
                    req.send(body.as_bytes())
                }
            };
            match sent {
                Ok(mut r) => {
                    let status = r.status().as_u16();
                    let text = r.body_mut().read_to_string().unwrap_or_default();
                    reply(&mut conn, &format!("{status} X"), &text);
                }
                Err(_) => reply(&mut conn, "502 Bad Gateway", "{}"),
            }
        }
    }
}

/// A peer server (llama.cpp's, llama-cpp-python's) run as a real process on a free loopback port,
/// killed when dropped.
pub struct PeerServer {
    pub child: Child,
    pub url: String,
}

impl PeerServer {
    /// Starts `cmd` with `--host 127.0.0.1 --port <free port>` appended and waits until `GET ready_path`
    /// answers 200 (within [`PATIENCE`]; fails if the process exits first).
    pub fn start(mut cmd: Command, ready_path: &str) -> PeerServer {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let what = format!("{cmd:?}");
        let mut child = cmd
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || for _ in BufReader::new(stderr).lines() {}); // keep the pipe drained
        let url = format!("http://127.0.0.1:{port}");
        let t0 = std::time::Instant::now();
        let agent = agent();
        while agent.get(&format!("{url}{ready_path}")).call().map(|r| r.status().as_u16()).ok() != Some(200) {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("{what} exited with {status}");
            }
            assert!(t0.elapsed() < PATIENCE, "{what} did not come up on {url}");
            std::thread::sleep(Duration::from_millis(200));
        }
        PeerServer { child, url }
    }
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

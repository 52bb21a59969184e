//! A blocking client of the local socket (docs/socket.md): what libcrayon, `crayonctl --socket` and the
//! tests use.
//!
//! One call at a time per [`Client`]; [`Canceller`] (cloneable, any thread) stops the call in progress.
//! Every read waits at most the client's timeout for the next frame, so a daemon that stops
//! answering is reported, never waited on forever.

use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use crate::proto::{self, Code, PROTOCOL_VERSION, Split, frame, split_frame};

/// Where clients look when given no path: `$CRAYON_SOCKET`, else the service's usual place.
pub const DEFAULT_PATH: &str = "/run/crayon/crayon.sock";

pub fn default_path() -> PathBuf {
    std::env::var_os("CRAYON_SOCKET").map_or_else(|| PathBuf::from(DEFAULT_PATH), PathBuf::from)
}

/// Default wait for the next frame from the daemon (a queued or long request still streams or ends
/// within this; raise it for very long non-streamed answers).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("connection to the daemon: {0}")]
    Io(#[from] io::Error),
    #[error("no reply from the daemon within {0:?}")]
    Timeout(Duration),
    #[error("daemon broke the protocol: {0}")]
    Protocol(String),
    /// The daemon answered with an error event.
    #[error("{message}")]
    Service { code: Code, message: String },
}

impl ClientError {
    pub fn code(&self) -> Option<Code> {
        match self {
            ClientError::Service { code, .. } => Some(*code),
            _ => None,
        }
    }
}

type Result<T> = std::result::Result<T, ClientError>;

pub struct Client {
    stream: UnixStream,
    input: Vec<u8>,
    max_frame: usize,
    timeout: Duration,
    next_id: u64,
    canceller: Canceller,
    /// The daemon's handshake reply.
    pub hello: Value,
}

/// Cancels the call in progress on its [`Client`], from any thread.
#[derive(Clone)]
pub struct Canceller {
    writer: Arc<Mutex<UnixStream>>,
    /// Id of the call in progress; 0 when none.
    current: Arc<AtomicU64>,
}

impl Canceller {
    /// Asks the daemon to cancel the call in progress (if any). The call then returns
    /// `Service { code: Cancelled }` (or its result, if it finished first).
    pub fn cancel(&self) -> io::Result<()> {
        let id = self.current.load(Ordering::SeqCst);
        if id == 0 {
            return Ok(());
        }
        let f = frame(&json!({"id": u64::MAX - id, "op": "cancel", "target": id}));
        send_all(&self.writer.lock().unwrap_or_else(|p| p.into_inner()), &f)
    }
}

/// Writes everything with MSG_NOSIGNAL: a daemon that went away must give an error, not a SIGPIPE
/// that kills the C program using libcrayon.
fn send_all(stream: &UnixStream, mut buf: &[u8]) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    while !buf.is_empty() {
        let n = unsafe { libc::send(stream.as_raw_fd(), buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

impl Client {
    /// The largest frame the daemon accepts (from its handshake).
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Connects and performs the handshake.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Client> {
        let stream =
            UnixStream::connect(path).map_err(|source| ClientError::Connect { path: path.to_path_buf(), source })?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let writer = Arc::new(Mutex::new(stream.try_clone()?));
        let mut c = Client {
            stream,
            input: Vec::new(),
            max_frame: proto::DEFAULT_MAX_FRAME,
            timeout,
            next_id: 1,
            canceller: Canceller { writer, current: Arc::new(AtomicU64::new(0)) },
            hello: Value::Null,
        };
        // A daemon that refuses us says why in a frame and closes: read it even if our write failed.
        let sent = c.write(&json!({"crayon": PROTOCOL_VERSION}));
        let hello = match (c.read_frame(), sent) {
            (Ok(v), _) => v,
            (Err(_), Err(e)) => return Err(e),
            (Err(e), Ok(())) => return Err(e),
        };
        if let Some(err) = as_error(&hello) {
            return Err(err);
        }
        if hello.get("crayon").and_then(Value::as_u64) != Some(PROTOCOL_VERSION as u64) {
            return Err(ClientError::Protocol(format!("unexpected handshake reply {hello}")));
        }
        if let Some(m) = hello.get("max_frame_bytes").and_then(Value::as_u64) {
            c.max_frame = m as usize;
        }
        c.hello = hello;
        Ok(c)
    }

    pub fn canceller(&self) -> Canceller {
        self.canceller.clone()
    }

    pub fn set_timeout(&mut self, timeout: Duration) -> Result<()> {
        self.stream.set_read_timeout(Some(timeout))?;
        self.timeout = timeout;
        Ok(())
    }

    /// Sends one request (`{"op": ..., ...}` without the id) and waits for its end; `on_token`
    /// receives streamed text (return `false` to cancel). Returns the `done` event's result.
    pub fn call(&mut self, mut op: Value, on_token: &mut dyn FnMut(&str) -> bool) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        op["id"] = json!(id);
        if frame(&op).len() > self.max_frame + proto::HEADER {
            return Err(ClientError::Service {
                code: Code::FrameTooLarge,
                message: format!(
                    "request of {} bytes is over the daemon's frame limit {}",
                    frame(&op).len(),
                    self.max_frame
                ),
            });
        }
        self.canceller.current.store(id, Ordering::SeqCst);
        let result = self.call_inner(id, &op, on_token);
        self.canceller.current.store(0, Ordering::SeqCst);
        result
    }

    fn call_inner(&mut self, id: u64, op: &Value, on_token: &mut dyn FnMut(&str) -> bool) -> Result<Value> {
        self.write(op)?;
        let mut stopped = false;
        loop {
            let ev = self.read_frame()?;
            let ev_id = ev.get("id").and_then(Value::as_u64);
            if ev_id != Some(id) {
                // Replies to our own cancel frames, or an error about no request in particular.
                if ev_id.is_none() {
                    if let Some(err) = as_error(&ev) {
                        return Err(err);
                    }
                }
                continue;
            }
            match ev.get("event").and_then(Value::as_str) {
                Some("token") => {
                    let text = ev.get("text").and_then(Value::as_str).unwrap_or("");
                    if !stopped && !on_token(text) {
                        stopped = true;
                        self.canceller.cancel()?;
                    }
                }
                Some("done") => return Ok(ev.get("result").cloned().unwrap_or(Value::Null)),
                Some("error") => return Err(as_error(&ev).unwrap_or_else(|| ClientError::Protocol(ev.to_string()))),
                _ => return Err(ClientError::Protocol(format!("unknown event {ev}"))),
            }
        }
    }

    fn write(&mut self, v: &Value) -> Result<()> {
        let f = frame(v);
        send_all(&self.canceller.writer.lock().unwrap_or_else(|p| p.into_inner()), &f)?;
        Ok(())
    }

    fn read_frame(&mut self) -> Result<Value> {
        let mut buf = [0u8; 64 << 10];
        loop {
            match split_frame(&self.input, self.max_frame) {
                Split::Frame(len) => {
                    let payload: Vec<u8> = self.input.drain(..proto::HEADER + len).skip(proto::HEADER).collect();
                    return serde_json::from_slice(&payload)
                        .map_err(|e| ClientError::Protocol(format!("reply is not JSON: {e}")));
                }
                Split::Oversized(len) => {
                    return Err(ClientError::Protocol(format!("reply frame of {len} bytes over the limit")));
                }
                Split::Incomplete => {}
            }
            match self.stream.read(&mut buf) {
                Ok(0) => return Err(ClientError::Protocol("the daemon closed the connection".into())),
                Ok(n) => self.input.extend_from_slice(&buf[..n]),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    return Err(ClientError::Timeout(self.timeout));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

fn as_error(ev: &Value) -> Option<ClientError> {
    if ev.get("event").and_then(Value::as_str) != Some("error") {
        return None;
    }
    let code = ev.get("code").cloned().and_then(|c| serde_json::from_value(c).ok()).unwrap_or(Code::Internal);
    let message = ev.get("message").and_then(Value::as_str).unwrap_or("error without a message").to_string();
    Some(ClientError::Service { code, message })
}

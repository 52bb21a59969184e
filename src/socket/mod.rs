//! The local socket (docs/socket.md): libcrayon's fast path to the daemon.
//!
//! One event-loop thread (mio) accepts connections, checks each peer's credentials, reads frames
//! and writes replies; every request runs on its own worker thread, which takes its turn in the
//! engine queue and hands events back through a channel and a waker. The loop therefore never
//! blocks on the model, and the model never blocks on a slow reader: a connection whose unsent
//! replies pass [`MAX_PENDING_OUTPUT`] is cancelled and closed. A connection that goes away cancels
//! its requests (waiting ones leave the queue, running ones stop at the next token).

/// The protocol and the blocking client live in the `crayon-client` crate (what libcrayon links);
/// re-exported here so the daemon and its clients name them the same way.
pub use crayon_client::{proto, socket as client};

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::ops::ControlFlow;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mio::net::{UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Token, Waker};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::generate::CancelToken;
use crate::metrics::{Interface, Operation};
use crate::openai;
use crate::service::{CustomizeRequest, Endpoint, Service};
use proto::{Code, Op, PROTOCOL_VERSION, Split, error_event, frame, split_frame};

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const FIRST_CONN: usize = 2;

/// Unsent output a connection may accumulate before it is dropped as too slow.
pub const MAX_PENDING_OUTPUT: usize = 16 << 20;

/// The running socket server: stop it with [`SocketServer::shutdown`].
pub struct SocketServer {
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    thread: Option<std::thread::JoinHandle<()>>,
    path: PathBuf,
}

impl SocketServer {
    /// Binds `config.path` (replacing a stale socket file, refusing anything else there) and starts
    /// the event loop.
    pub fn start(service: Arc<Service>, config: &SocketConfig) -> Result<SocketServer> {
        let path = config.path.clone();
        let listener = bind(&path, &config.group)?;
        let poll = Poll::new().map_err(|e| io_err("socket event loop", &path, e))?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(|e| io_err("socket event loop", &path, e))?);
        let stop = Arc::new(AtomicBool::new(false));
        let mut lp = Loop {
            poll,
            listener: Some(listener),
            conns: HashMap::new(),
            next: FIRST_CONN,
            service,
            limits: config.clone(),
            allowed_gid: group_gid(&config.group),
            own_uid: unsafe { libc::geteuid() },
            events: mpsc::channel(),
            waker: waker.clone(),
            stop: stop.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("crayon-socket".into())
            .spawn(move || lp.run())
            .map_err(|e| io_err("socket thread", &path, e))?;
        Ok(SocketServer { stop, waker, thread: Some(thread), path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting, lets requests in flight finish (up to `drain`), then closes everything and
    /// removes the socket file.
    pub fn shutdown(mut self, drain: Duration) {
        self.stop_and_join(drain);
    }

    fn stop_and_join(&mut self, drain: Duration) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
        if let Some(t) = self.thread.take() {
            let t0 = Instant::now();
            while !t.is_finished() && t0.elapsed() < drain {
                std::thread::sleep(Duration::from_millis(20));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                tracing::warn!(seconds = drain.as_secs_f64(), "socket: requests still running after the drain timeout");
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for SocketServer {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop_and_join(Duration::from_secs(5));
        }
    }
}

fn io_err(what: &'static str, path: &Path, source: io::Error) -> Error {
    Error::Io { what, path: path.to_path_buf(), source }
}

/// Binds the socket: a leftover socket file from a previous run is replaced, any other file is not.
fn bind(path: &Path, group: &str) -> Result<UnixListener> {
    if path.as_os_str().is_empty() {
        return Err(Error::Config { path: "socket.path".into(), msg: "empty".into() });
    }
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            // Someone still answering there means another daemon: do not steal its socket.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(Error::Config {
                    path: "socket.path".into(),
                    msg: format!("{} is in use by another running service", path.display()),
                });
            }
            std::fs::remove_file(path).map_err(|e| io_err("stale socket", path, e))?;
        }
        Ok(_) => {
            return Err(Error::Config {
                path: "socket.path".into(),
                msg: format!("{} exists and is not a socket; refusing to replace it", path.display()),
            });
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(|e| io_err("socket", path, e))?;
    // 0660 and the service group: the file system is the first gate, peer credentials the second.
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660));
    if let Some(gid) = group_gid(group) {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap_or_default();
        // Fails without privilege when we are not in the group: then only root and we may connect.
        unsafe { libc::chown(c.as_ptr(), u32::MAX, gid) };
    }
    Ok(listener)
}

/// The gid of a group name, if it exists.
pub fn group_gid(name: &str) -> Option<u32> {
    if name.is_empty() {
        return None;
    }
    let c = std::ffi::CString::new(name).ok()?;
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    let mut out: *mut libc::group = std::ptr::null_mut();
    let rc = unsafe { libc::getgrnam_r(c.as_ptr(), &mut grp, buf.as_mut_ptr(), buf.len(), &mut out) };
    (rc == 0 && !out.is_null()).then_some(grp.gr_gid)
}

/// A connected peer, as the kernel reports it (SO_PEERCRED).
#[derive(Debug, Clone)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (SO_PEERGROUPS): no /proc access needed, so it works under
    /// `ProtectProc=invisible`.
    pub groups: Vec<u32>,
}

fn peer_credentials(stream: &UnixStream) -> io::Result<Peer> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Peer { pid: cred.pid, uid: cred.uid, gid: cred.gid, groups: peer_groups(stream) })
}

fn peer_groups(stream: &UnixStream) -> Vec<u32> {
    let mut groups = vec![0u32; 64];
    loop {
        let mut len = (groups.len() * 4) as libc::socklen_t;
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if rc == 0 {
            groups.truncate(len as usize / 4);
            return groups;
        }
        // ERANGE: `len` now holds the size needed.
        if io::Error::last_os_error().raw_os_error() == Some(libc::ERANGE) && (len as usize / 4) > groups.len() {
            groups.resize(len as usize / 4, 0);
            continue;
        }
        return Vec::new();
    }
}

/// Whether a peer may use the service ([`crate::access::may_use`], the rule D-Bus applies too).
pub fn peer_allowed(peer: &Peer, own_uid: u32, allowed_gid: Option<u32>) -> bool {
    let mut groups = peer.groups.clone();
    groups.push(peer.gid);
    crate::access::may_use(peer.uid, &groups, own_uid, allowed_gid)
}

/// What worker threads send back to the loop.
enum Event {
    /// A frame to queue on connection `conn`.
    Reply(usize, Vec<u8>),
    /// Request `id` on `conn` is over (its frame, if any, was sent before).
    Finished(usize, u64),
}

struct Conn {
    stream: UnixStream,
    peer: Peer,
    /// When it connected (the handshake is due within `socket.handshake_timeout_ms`).
    opened: Instant,
    /// Since when `input` has held a partial frame (it must complete within the same time).
    partial_since: Option<Instant>,
    input: Vec<u8>,
    output: Vec<u8>,
    greeted: bool,
    /// Requests in flight, by the client's id.
    running: HashMap<u64, CancelToken>,
    /// Close once `output` is flushed (after a fatal error reply).
    closing: bool,
}

struct Loop {
    poll: Poll,
    listener: Option<UnixListener>,
    conns: HashMap<usize, Conn>,
    next: usize,
    service: Arc<Service>,
    limits: SocketConfig,
    allowed_gid: Option<u32>,
    own_uid: u32,
    events: (mpsc::Sender<Event>, mpsc::Receiver<Event>),
    waker: Arc<Waker>,
    stop: Arc<AtomicBool>,
}

impl Loop {
    fn run(&mut self) {
        if let Some(l) = self.listener.as_mut() {
            if let Err(e) = self.poll.registry().register(l, LISTENER, Interest::READABLE) {
                tracing::error!(error = %e, "socket: cannot watch the listener");
                return;
            }
        }
        let mut events = Events::with_capacity(256);
        loop {
            if let Err(e) = self.poll.poll(&mut events, Some(Duration::from_millis(500))) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!(error = %e, "socket: poll failed; socket server stops");
                    return;
                }
            }
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(),
                    WAKER => {}
                    Token(id) => {
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            self.read(id);
                        }
                        if ev.is_writable() {
                            self.flush(id);
                        }
                    }
                }
            }
            self.drain_events();
            self.close_stalled();
            if self.stop.load(Ordering::SeqCst) {
                if let Some(mut l) = self.listener.take() {
                    let _ = self.poll.registry().deregister(&mut l);
                }
                let busy = self.conns.values().any(|c| !c.running.is_empty() || !c.output.is_empty());
                if !busy {
                    return;
                }
            }
        }
    }

    fn accept(&mut self) {
        loop {
            let Some(listener) = self.listener.as_ref() else { return };
            let (mut stream, _) = match listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!(error = %e, "socket: accept failed");
                    return;
                }
            };
            let peer = match peer_credentials(&stream) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "socket: no peer credentials; connection dropped");
                    continue;
                }
            };
            let refuse = if !peer_allowed(&peer, self.own_uid, self.allowed_gid) {
                tracing::warn!(uid = peer.uid, pid = peer.pid, "socket: peer not allowed (socket.group)");
                Some((Code::PermissionDenied, format!("uid {} may not use this service (socket.group)", peer.uid)))
            } else if self.conns.len() >= self.limits.max_connections {
                Some((Code::Busy, format!("{} connections open (socket.max_connections)", self.conns.len())))
            } else if self.conns.values().filter(|c| c.peer.uid == peer.uid).count()
                >= self.limits.max_connections_per_uid
            {
                let n = self.limits.max_connections_per_uid;
                Some((
                    Code::Busy,
                    format!("uid {} has {n} connections open (socket.max_connections_per_uid)", peer.uid),
                ))
            } else {
                None
            };
            if let Some((code, msg)) = refuse {
                // Best effort: a refused peer gets one frame and a closed socket.
                let _ = stream.write(&frame(&error_event(None, code, &msg)));
                continue;
            }
            let id = self.next;
            self.next += 1;
            if let Err(e) = self.poll.registry().register(&mut stream, Token(id), Interest::READABLE) {
                tracing::warn!(error = %e, "socket: cannot watch a connection");
                continue;
            }
            tracing::debug!(conn = id, uid = peer.uid, pid = peer.pid, "socket: connected");
            self.conns.insert(
                id,
                Conn {
                    stream,
                    peer,
                    opened: Instant::now(),
                    partial_since: None,
                    input: Vec::new(),
                    output: Vec::new(),
                    greeted: false,
                    running: HashMap::new(),
                    closing: false,
                },
            );
        }
    }

    fn read(&mut self, id: usize) {
        let Some(conn) = self.conns.get_mut(&id) else { return };
        let mut buf = [0u8; 64 << 10];
        let mut closed = false;
        loop {
            match conn.stream.read(&mut buf) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => {
                    conn.input.extend_from_slice(&buf[..n]);
                    // Never buffer more than one frame's worth of unparsed input.
                    if conn.input.len() > self.limits.max_frame_bytes + proto::HEADER + buf.len() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    closed = true;
                    break;
                }
            }
        }
        self.handle_frames(id);
        if closed {
            self.close(id, "peer closed the connection");
        }
    }

    /// Closes connections that hold a place without talking: no handshake, or a frame started and not
    /// finished, within `socket.handshake_timeout_ms` (the poll wakes at least every 500 ms).
    fn close_stalled(&mut self) {
        let limit = Duration::from_millis(self.limits.handshake_timeout_ms);
        let stalled: Vec<(usize, &'static str)> = self
            .conns
            .iter()
            .filter(|(_, c)| !c.closing)
            .filter_map(|(&id, c)| match (c.greeted, c.partial_since) {
                (false, _) if c.opened.elapsed() > limit => Some((id, "no handshake")),
                (true, Some(t)) if t.elapsed() > limit => Some((id, "a frame left unfinished")),
                _ => None,
            })
            .collect();
        for (id, what) in stalled {
            let msg = format!("{what} within {} ms (socket.handshake_timeout_ms); closing", limit.as_millis());
            tracing::debug!(conn = id, "socket: {msg}");
            self.fatal(id, None, Code::Malformed, &msg);
        }
    }

    fn handle_frames(&mut self, id: usize) {
        loop {
            let Some(conn) = self.conns.get_mut(&id) else { return };
            if conn.closing {
                conn.input.clear();
                return;
            }
            match split_frame(&conn.input, self.limits.max_frame_bytes) {
                Split::Incomplete => {
                    conn.partial_since = match conn.input.is_empty() {
                        true => None,
                        false => conn.partial_since.or(Some(Instant::now())),
                    };
                    return;
                }
                Split::Oversized(len) => {
                    let msg = format!(
                        "frame of {len} bytes refused (socket.max_frame_bytes = {}); closing",
                        self.limits.max_frame_bytes
                    );
                    self.fatal(id, None, Code::FrameTooLarge, &msg);
                    return;
                }
                Split::Frame(len) => {
                    conn.partial_since = None;
                    let payload: Vec<u8> = conn.input.drain(..proto::HEADER + len).skip(proto::HEADER).collect();
                    self.handle_frame(id, &payload);
                }
            }
        }
    }

    fn handle_frame(&mut self, id: usize, payload: &[u8]) {
        let Some(conn) = self.conns.get_mut(&id) else { return };
        let value: Value = match serde_json::from_slice(payload) {
            Ok(v) => v,
            Err(e) => {
                let reply = error_event(None, Code::Malformed, &format!("frame is not JSON: {e}"));
                self.send(id, &reply);
                return;
            }
        };
        if !conn.greeted {
            match value.get("crayon").and_then(Value::as_u64) {
                Some(v) if v == PROTOCOL_VERSION as u64 => {
                    conn.greeted = true;
                    let status = self.service.status();
                    self.send(
                        id,
                        &json!({"crayon": PROTOCOL_VERSION, "server": format!("crayond {}", crate::VERSION),
                                "model": status.model, "max_frame_bytes": self.limits.max_frame_bytes}),
                    );
                }
                other => {
                    let msg = match other {
                        Some(v) => format!("protocol version {v} asked for; this daemon speaks {PROTOCOL_VERSION}"),
                        None => format!("first frame must be the handshake {{\"crayon\": {PROTOCOL_VERSION}}}"),
                    };
                    self.fatal(id, None, Code::Version, &msg);
                }
            }
            return;
        }
        let req_id = value.get("id").and_then(Value::as_u64);
        let req: proto::Request = match serde_json::from_value(value) {
            Ok(r) => r,
            Err(e) => {
                self.send(id, &error_event(req_id, Code::Malformed, &format!("not a request: {e}")));
                return;
            }
        };
        self.dispatch(id, req, payload.len());
    }

    /// Starts request `req` of connection `id`, whose frame had `size` bytes.
    fn dispatch(&mut self, id: usize, req: proto::Request, size: usize) {
        let Some(conn) = self.conns.get_mut(&id) else { return };
        let rid = req.id;
        // Answered here, at once: no model involved.
        match &req.op {
            Op::Cancel { target } => {
                if let Some(t) = conn.running.get(target) {
                    t.cancel();
                }
                self.send(id, &json!({"id": rid, "event": "done", "result": {"cancelled": target}}));
                return;
            }
            Op::Status => {
                let status = self.service.status();
                self.send(id, &json!({"id": rid, "event": "done", "result": status}));
                return;
            }
            Op::Metrics => {
                let text = self.service.metrics_text();
                self.send(id, &json!({"id": rid, "event": "done", "result": {"text": text}}));
                return;
            }
            Op::Adapters => {
                let list = self.service.catalog();
                self.send(id, &json!({"id": rid, "event": "done", "result": {"data": list}}));
                return;
            }
            _ => {}
        }
        if self.stop.load(Ordering::SeqCst) {
            self.send(id, &error_event(Some(rid), Code::ShuttingDown, "the service is stopping"));
            return;
        }
        if conn.running.contains_key(&rid) {
            self.send(id, &error_event(Some(rid), Code::Malformed, &format!("request id {rid} is already in flight")));
            return;
        }
        if conn.running.len() >= self.limits.max_requests_per_connection {
            let msg = format!(
                "{} requests in flight on this connection (socket.max_requests_per_connection)",
                conn.running.len()
            );
            self.send(id, &error_event(Some(rid), Code::Busy, &msg));
            return;
        }
        // Places are shared per uid (an app), whichever of its connections asks.
        let permit = match self.service.try_slot(Interface::socket, &format!("uid:{}", conn.peer.uid)) {
            Ok(p) => p,
            Err(e) => {
                self.send(id, &error_event(Some(rid), Code::Busy, &e.to_string()));
                return;
            }
        };
        let cancel = CancelToken::new();
        conn.running.insert(rid, cancel.clone());
        let client = format!("socket:{id}:uid{}", conn.peer.uid);
        let identity = crate::adapters::Identity::of_uid(conn.peer.uid, self.own_uid);
        let service = self.service.clone();
        let tx = self.events.0.clone();
        let waker = self.waker.clone();
        let spawned = std::thread::Builder::new().name(format!("crayon-req-{id}-{rid}")).spawn(move || {
            let reply = |ev: Event| {
                let _ = tx.send(ev);
                let _ = waker.wake();
            };
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let caller = Caller { identity: &identity, slot: &permit, client: &client };
                run_request(&service, &caller, rid, req.op, size, &cancel, &|v| reply(Event::Reply(id, frame(&v))))
            }))
            .unwrap_or_else(|_| Err(Error::Internal("the request handler panicked".into())));
            let last = match result {
                Ok(v) => json!({"id": rid, "event": "done", "result": v}),
                Err(e) => error_event(Some(rid), code_of(&e), &e.to_string()),
            };
            // Free the slot before the client can see the end, so that its next request finds it.
            drop(permit);
            reply(Event::Reply(id, frame(&last)));
            reply(Event::Finished(id, rid));
        });
        if let Err(e) = spawned {
            if let Some(c) = self.conns.get_mut(&id) {
                c.running.remove(&rid);
            }
            self.send(id, &error_event(Some(rid), Code::Internal, &format!("cannot start a worker thread: {e}")));
        }
    }

    fn drain_events(&mut self) {
        while let Ok(ev) = self.events.1.try_recv() {
            match ev {
                Event::Reply(id, bytes) => self.queue_output(id, bytes),
                Event::Finished(id, rid) => {
                    if let Some(c) = self.conns.get_mut(&id) {
                        c.running.remove(&rid);
                    }
                }
            }
        }
    }

    fn send(&mut self, id: usize, v: &Value) {
        self.queue_output(id, frame(v));
    }

    /// Sends an error and closes the connection once it is written.
    fn fatal(&mut self, id: usize, rid: Option<u64>, code: Code, msg: &str) {
        self.send(id, &error_event(rid, code, msg));
        if let Some(c) = self.conns.get_mut(&id) {
            c.closing = true;
            for t in c.running.values() {
                t.cancel();
            }
        }
        self.flush(id);
    }

    fn queue_output(&mut self, id: usize, bytes: Vec<u8>) {
        let Some(conn) = self.conns.get_mut(&id) else { return }; // gone: its requests were cancelled
        conn.output.extend_from_slice(&bytes);
        if conn.output.len() > MAX_PENDING_OUTPUT {
            self.close(id, "client does not read its replies");
            return;
        }
        self.flush(id);
    }

    fn flush(&mut self, id: usize) {
        let Some(conn) = self.conns.get_mut(&id) else { return };
        while !conn.output.is_empty() {
            match conn.stream.write(&conn.output) {
                Ok(0) => break,
                Ok(n) => {
                    conn.output.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.close(id, "write failed");
                    return;
                }
            }
        }
        let interest =
            if conn.output.is_empty() { Interest::READABLE } else { Interest::READABLE | Interest::WRITABLE };
        let _ = self.poll.registry().reregister(&mut conn.stream, Token(id), interest);
        if conn.output.is_empty() && conn.closing {
            self.close(id, "closed after a fatal error");
        }
    }

    /// Drops a connection and cancels whatever it still had running or waiting.
    fn close(&mut self, id: usize, why: &str) {
        if let Some(mut c) = self.conns.remove(&id) {
            for t in c.running.values() {
                t.cancel();
            }
            let _ = self.poll.registry().deregister(&mut c.stream);
            tracing::debug!(conn = id, uid = c.peer.uid, requests = c.running.len(), why, "socket: closed");
        }
    }
}

/// Runs one model request on a worker thread. `emit` sends an intermediate event (streamed text).
/// Who a request is for: its identity (ownership), its admission place and its queue key.
struct Caller<'a> {
    identity: &'a crate::adapters::Identity,
    slot: &'a crate::service::Slot,
    client: &'a str,
}

fn run_request(
    service: &Service,
    caller: &Caller,
    rid: u64,
    op: Op,
    size: usize,
    cancel: &CancelToken,
    emit: &dyn Fn(Value),
) -> Result<Value> {
    // The frame's OpenAI or customize body becomes the service's typed request here, at the edge;
    // what is refused here is counted as the service counts its own refusals.
    let refused = |operation: Operation, e: Error| {
        service.refused(Interface::socket, operation, e.kind());
        e
    };
    let (endpoint, body, stream) = match op {
        Op::Chat { body, stream } => (Endpoint::Chat, body, stream),
        Op::Complete { body, stream } => (Endpoint::Completion, body, stream),
        Op::Customize { body } => {
            service.check_size(Interface::socket, Operation::customize, size)?;
            let req = CustomizeRequest::from_json(body).map_err(|e| refused(Operation::customize, e))?;
            return service
                .customize(Interface::socket, caller.identity, caller.client, req, cancel)
                .map(|d| d.to_json());
        }
        Op::Remove { name } => return service.remove(Interface::socket, caller.identity, caller.client, &name, cancel),
        Op::Status | Op::Metrics | Op::Adapters | Op::Cancel { .. } => {
            return Err(Error::Internal("answered by the event loop".into()));
        }
    };
    service.check_size(Interface::socket, Operation::generate, size)?;
    let (request, _) = openai::parse_request(endpoint, openai::Body::Json(body), service.defaults())
        .map_err(|e| refused(Operation::generate, e))?;
    let admitted = service.admit(Interface::socket, request)?;
    let mut on_text = |_: usize, t: &str| {
        // Empty texts end an answer (HTTP's streamed `n` needs the marker); the socket does not.
        if stream && !t.is_empty() {
            emit(json!({"id": rid, "event": "token", "text": t}));
        }
        if cancel.is_cancelled() { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
    };
    let reply = service.answer(caller.slot, caller.client, admitted, cancel, &mut on_text)?;
    if cancel.is_cancelled() {
        return Err(Error::Cancelled);
    }
    Ok(openai::full_response(&reply))
}

/// The socket code of a failure, from its [`crate::ErrorKind`] (the one classification).
pub fn code_of(e: &Error) -> Code {
    Code::from_kind(e.kind())
}

/// The local socket libcrayon talks to (`docs/socket.md`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SocketConfig {
    /// Unix socket path, e.g. "/run/crayon/crayon.sock"; empty: no socket (`crayond --socket` overrides).
    pub path: PathBuf,
    /// Group allowed to connect besides root and the service's own user (socket file group, mode
    /// 0660, and a peer-credential check on every connection); empty or absent group: nobody else.
    pub group: String,
    /// Largest frame, in bytes, either way.
    pub max_frame_bytes: usize,
    /// Connections served at once; more are refused.
    pub max_connections: usize,
    /// Connections one uid may hold at once (so one app cannot take all of `max_connections`).
    pub max_connections_per_uid: usize,
    /// A connection must complete its handshake, and a started frame must arrive whole, within this
    /// many ms; then it is closed (clients that connect and say nothing cannot hold places).
    pub handshake_timeout_ms: u64,
    /// Requests one connection may have in flight.
    pub max_requests_per_connection: usize,
}

impl Default for SocketConfig {
    fn default() -> Self {
        SocketConfig {
            path: PathBuf::new(),
            group: "crayon".into(),
            max_frame_bytes: crate::socket::proto::DEFAULT_MAX_FRAME,
            max_connections: 64,
            max_connections_per_uid: 16,
            handshake_timeout_ms: 5000,
            max_requests_per_connection: 8,
        }
    }
}

impl SocketConfig {
    /// Checks the section on its own (the config file reports the first problem).
    pub fn validate(&self) -> std::result::Result<(), String> {
        let k = self;
        if k.max_frame_bytes < 64 || k.max_frame_bytes > u32::MAX as usize {
            return Err(format!("socket.max_frame_bytes must be in 64..=4294967295, got {}", k.max_frame_bytes));
        }
        if k.max_connections == 0 || k.max_requests_per_connection == 0 || k.max_connections_per_uid == 0 {
            return Err(
                "socket.max_connections, max_connections_per_uid and max_requests_per_connection must be positive"
                    .into(),
            );
        }
        if k.handshake_timeout_ms == 0 {
            return Err("socket.handshake_timeout_ms must be positive".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    /// One classification (issue #13): each failure's socket code reports the same kind the CLI's
    /// exit status, HTTP status and D-Bus error name derive from.
    #[test]
    fn socket_codes_carry_the_error_kind() {
        let cases = [
            (Error::InvalidRequest("x".into()), ErrorKind::Invalid, 2),
            (Error::Template("bad role".into()), ErrorKind::Invalid, 2),
            (Error::Adapter { name: "a".into(), msg: "no such adapter".into() }, ErrorKind::NotFound, 2),
            (Error::Busy("full".into()), ErrorKind::Busy, 1),
            (Error::Cancelled, ErrorKind::Cancelled, 130),
            (Error::Internal("bug".into()), ErrorKind::Internal, 1),
        ];
        for (e, kind, exit) in cases {
            assert_eq!(e.kind(), kind, "{e}");
            assert_eq!(code_of(&e).kind(), kind, "{e}");
            assert_eq!(crate::cli::exit_code(&e), exit, "{e}");
        }
        let missing = Error::Model { path: "/m".into(), msg: "missing".into() };
        assert_eq!(missing.kind(), ErrorKind::Unavailable);
        assert_eq!(code_of(&missing), Code::Internal);
    }
}

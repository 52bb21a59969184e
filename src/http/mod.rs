//! HTTP server mode of `crayond` (`docs/http.md`): OpenAI-compatible `/v1/chat/completions` and
//! `/v1/completions` (with server-sent events when `stream` is set), `/v1/models`, `/health`, and the
//! `crayon` extension (adapter, blend weights from a device, choices, routing overrides).
//!
//! The engine is synchronous and CPU-bound: each request runs on a blocking thread and takes the
//! engine lock only while the model works (a routed request's server call runs unlocked). Admission
//! is bounded (`server.max_concurrent`, then HTTP 429), bodies are bounded (`server.max_body_bytes`,
//! then 413), a configured bearer token is required on `/v1/*`, and a client that goes away cancels
//! its generation at the next token.

pub mod listen;
mod peer;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::sync::Arc;

use axum::Router as HttpRouter;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::adapters::Identity;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::generate::CancelToken;
use crate::metrics::{Interface, Operation};
use crate::openai::{self, error_body};
use crate::service::{Admitted, Answered, CustomizeRequest, Endpoint, Reply, Service, Slot};

/// HTTP 429 with `Retry-After` for a refused slot ([`Service::try_slot`] counted it).
fn busy(e: &Error) -> Response {
    let mut r = fail(StatusCode::TOO_MANY_REQUESTS, &e.to_string(), "rate_limit_error");
    r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    r
}

/// Reads a request body within `server.max_body_bytes` and [`BODY_TIMEOUT`].
async fn read_body(s: &Service, body: Body) -> std::result::Result<axum::body::Bytes, Response> {
    let limit = s.max_body_bytes();
    match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(b)) => Ok(b),
        Ok(Err(e)) if over_limit(&e) => {
            Err(fail(StatusCode::PAYLOAD_TOO_LARGE, &crate::service::body_too_large(limit), "invalid_request_error"))
        }
        Ok(Err(e)) => Err(fail(
            StatusCode::BAD_REQUEST,
            &format!("request body unreadable (malformed chunked encoding, or the connection closed): {e}"),
            "invalid_request_error",
        )),
        Err(_) => Err(fail(
            StatusCode::REQUEST_TIMEOUT,
            &format!("request body not received within {} s", BODY_TIMEOUT.as_secs()),
            "invalid_request_error",
        )),
    }
}

/// The identity of an HTTP client for ownership: the token holder is an admin (a server's operator);
/// without a token (local mode) a loopback client is its uid, as on the socket and D-Bus (root and the
/// service's own user are admins), and one the kernel does not name is `http:local`.
fn identity(s: &Service, client: &HttpClient) -> Identity {
    match (s.token(), client.uid) {
        (Some(_), _) => Identity::Admin,
        (None, Some(uid)) => Identity::of_uid(uid, unsafe { libc::geteuid() }),
        (None, None) => Identity::Client("http:local".into()),
    }
}

/// Whether reading a body failed because it passed the limit (not because it was malformed).
fn over_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// Who is asking over HTTP, for admission shares and the queue's round-robin: the peer's IP address
/// (every connection of one device is one client, so a device flooding the server waits its turn
/// behind the others) and, for a loopback client, its uid (two apps on the board take turns, rather
/// than sharing one). `"http"` when the server was not started with peer addresses (an embedding
/// app's own router).
struct HttpClient {
    key: String,
    uid: Option<u32>,
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for HttpClient {
    type Rejection = Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> std::result::Result<Self, Infallible> {
        let uid = parts.extensions.get::<listen::PeerUid>().and_then(|p| p.0);
        let peer = parts.extensions.get::<axum::extract::ConnectInfo<SocketAddr>>();
        let key = match (peer, uid) {
            (Some(c), Some(uid)) => format!("http:{}:uid{uid}", c.0.ip()),
            (Some(c), None) => format!("http:{}", c.0.ip()),
            (None, _) => "http".into(),
        };
        Ok(HttpClient { key, uid })
    }
}

/// How long a client may take to send its request body (a slow upload holds no model slot, but a
/// connection).
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Checks that `listen` is safe to serve on with this config.
pub fn check_listen(listen: &str, config: &Config) -> Result<SocketAddr> {
    let addr: SocketAddr = listen.parse().map_err(|e| Error::Config {
        path: "server.listen".into(),
        msg: format!("'{listen}' is not an address like 127.0.0.1:8090: {e}"),
    })?;
    if !addr.ip().is_loopback()
        && config.server.token_file.as_os_str().is_empty()
        && !config.server.allow_unauthenticated_remote
    {
        return Err(Error::Config {
            path: "server.listen".into(),
            msg: format!(
                "{addr} is reachable from other machines but no server.token_file is set: set one (or allow_unauthenticated_remote = true)"
            ),
        });
    }
    Ok(addr)
}

/// The HTTP routes (crayond binds the listener and runs them with graceful shutdown).
pub fn app(service: Arc<Service>) -> HttpRouter {
    HttpRouter::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/crayon/adapters", get(list_adapters).post(customize))
        .route("/v1/crayon/adapters/{name}", axum::routing::delete(remove_adapter))
        .fallback(|| async {
            fail(StatusCode::NOT_FOUND, "no such endpoint (see docs/http.md)", "invalid_request_error")
        })
        .layer(axum::middleware::from_fn_with_state(service.clone(), local_guard))
        .with_state(service)
}

/// Without a token HTTP is a *local* mode, and the one local client it cannot trust is a web page in
/// a browser on the board: a cross-site form or `fetch` (CSRF), or a page whose domain re-resolves to
/// 127.0.0.1 (DNS rebinding). Such requests are refused with 403 before anything else happens:
/// `Host` must be `localhost` or an IP address, an `Origin` (browsers send it on every cross-site
/// write) must be a page on this machine's loopback, and writes to the adapters must say
/// `Content-Type: application/json` (which a page cannot send cross-site without a CORS preflight,
/// and this server answers none). A loopback client's user must also be one the socket admits (root,
/// the service's user, members of `socket.group`). With a token, the token is the protection (browsers
/// do not attach it cross-site).
async fn local_guard(
    State(s): State<Arc<Service>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if s.token().is_none() {
        if let Some(why) = browser_refusal(req.method(), req.uri().path(), req.headers()) {
            tracing::warn!(reason = %why, "http: request refused");
            return fail(StatusCode::FORBIDDEN, &why, "invalid_request_error");
        }
        if let Some(why) = local_caller_refusal(&s, &req) {
            tracing::warn!(reason = %why, "http: local caller refused");
            return fail(StatusCode::FORBIDDEN, &why, "permission_error");
        }
    }
    next.run(req).await
}

/// Why a loopback client may not use the service, if it may not: held to the socket's rule by its uid
/// (root, the service's user, members of `socket.group`); one whose uid the kernel's table does not
/// show (e.g. it closed the connection already) is refused rather than guessed. `/health` and
/// `/metrics` (counts, no content) stay open.
fn local_caller_refusal(s: &Service, req: &axum::extract::Request) -> Option<String> {
    if matches!(req.uri().path(), "/health" | "/metrics") {
        return None;
    }
    let peer = req.extensions().get::<axum::extract::ConnectInfo<SocketAddr>>()?.0;
    if !peer::is_loopback(peer) {
        return None;
    }
    match req.extensions().get::<listen::PeerUid>().and_then(|p| p.0) {
        Some(uid) if s.local_caller_allowed(uid) => None,
        Some(uid) => Some(format!(
            "uid {uid} may not use this service: root, its own user or members of socket.group only (or set server.token_file)"
        )),
        None => Some(
            "cannot tell which user this loopback connection belongs to (the kernel's socket table does not show it established); use the socket, or set server.token_file"
                .into(),
        ),
    }
}

/// Why a tokenless request looks like a browser's cross-site one, if it does.
fn browser_refusal(method: &axum::http::Method, path: &str, headers: &HeaderMap) -> Option<String> {
    let text =
        |name| headers.get(name).map(|v: &header::HeaderValue| String::from_utf8_lossy(v.as_bytes()).into_owned());
    if let Some(host) = text(header::HOST) {
        if !host_is_address_or_localhost(&host) {
            return Some(format!(
                "Host '{host}' refused: without server.token_file only localhost or an IP address is served (a web page's domain could point here)"
            ));
        }
    }
    if let Some(origin) = text(header::ORIGIN) {
        let host = origin.split_once("://").map(|(_, h)| h).unwrap_or("");
        if !host_is_loopback(host) {
            return Some(format!(
                "cross-origin request from '{origin}' refused: without server.token_file only pages on this machine's loopback may call this API"
            ));
        }
    }
    let writes_adapters = path.starts_with("/v1/crayon/adapters") && method != axum::http::Method::GET;
    let json = text(header::CONTENT_TYPE)
        .is_some_and(|t| t.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("application/json"));
    if writes_adapters && method == axum::http::Method::POST && !json {
        return Some("adapter changes need Content-Type: application/json".into());
    }
    None
}

/// `host[:port]` without the port, brackets of an IPv6 literal removed.
fn host_name(host: &str) -> &str {
    match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    }
}

/// An IP address or `localhost` (a DNS name an attacker controls could re-resolve; these cannot).
fn host_is_address_or_localhost(host: &str) -> bool {
    let name = host_name(host);
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok()
}

fn host_is_loopback(host: &str) -> bool {
    let name = host_name(host);
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn fail(status: StatusCode, message: &str, kind: &str) -> Response {
    (status, axum::Json(error_body(message, kind, None))).into_response()
}

/// The HTTP reply to a failure, from its [`crate::ErrorKind`] (the one classification).
fn error_response(e: &Error) -> Response {
    use crate::ErrorKind as K;
    let (status, kind) = match e.kind() {
        K::Invalid => (StatusCode::BAD_REQUEST, "invalid_request_error"),
        K::NotFound => (StatusCode::NOT_FOUND, "invalid_request_error"),
        K::Busy => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error"),
        K::Forbidden => (StatusCode::FORBIDDEN, "permission_error"),
        // Only its own client could see this, and it has gone.
        K::Cancelled => (StatusCode::REQUEST_TIMEOUT, "cancelled"),
        K::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "server_error"),
        K::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
    };
    fail(status, &e.to_string(), kind)
}

async fn health(State(s): State<Arc<Service>>) -> Response {
    axum::Json(s.status()).into_response()
}

/// Prometheus / OpenMetrics text (`crate::metrics`). Like `/health`, no token: it carries counts and
/// timings, never prompts, answers or adapter names.
async fn metrics(State(s): State<Arc<Service>>) -> Response {
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], s.metrics_text()).into_response()
}

async fn models(State(s): State<Arc<Service>>, headers: HeaderMap) -> Response {
    if let Some(r) = unauthorized(&s, &headers) {
        return r;
    }
    axum::Json(json!({"object": "list", "data": s.model_objects()})).into_response()
}

/// `GET /v1/models/{id}`: the base model or a saved adapter, as OpenAI's `models.retrieve` expects.
async fn model(
    State(s): State<Arc<Service>>,
    headers: HeaderMap,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    if let Some(r) = unauthorized(&s, &headers) {
        return r;
    }
    match s.model_objects().into_iter().find(|m| m["id"] == id.as_str()) {
        Some(m) => axum::Json(m).into_response(),
        None => {
            let body = error_body(
                &format!("no model '{id}' (see GET /v1/models)"),
                "invalid_request_error",
                Some("model_not_found"),
            );
            (StatusCode::NOT_FOUND, axum::Json(body)).into_response()
        }
    }
}

async fn list_adapters(State(s): State<Arc<Service>>, headers: HeaderMap) -> Response {
    if let Some(r) = unauthorized(&s, &headers) {
        return r;
    }
    axum::Json(json!({"object": "list", "data": s.catalog()})).into_response()
}

async fn customize(State(s): State<Arc<Service>>, client: HttpClient, headers: HeaderMap, body: Body) -> Response {
    if let Some(r) = unauthorized(&s, &headers) {
        return r;
    }
    let bytes = match read_body(&s, body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let parsed = serde_json::from_slice(&bytes)
        .map_err(|e| Error::InvalidRequest(format!("malformed customize request: {e}")))
        .and_then(CustomizeRequest::from_json);
    let req = match parsed {
        Ok(r) => r,
        Err(e) => {
            s.refused(Interface::http, Operation::customize, e.kind());
            return error_response(&e);
        }
    };
    // Validation (calibration included) happens once, in `Service::customize`, as for every interface.
    let permit = match s.try_slot(Interface::http, &client.key) {
        Ok(p) => p,
        Err(e) => return busy(&e),
    };
    let worker = s.clone();
    let cancel = CancelToken::new();
    let _guard = CancelOnDrop(cancel.clone());
    let joined = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        worker.customize(Interface::http, &identity(&worker, &client), &client.key, req, &cancel)
    })
    .await;
    match joined {
        Ok(Ok(done)) => axum::Json(done.to_json()).into_response(),
        Ok(Err(e)) => error_response(&e),
        Err(_) => fail(StatusCode::INTERNAL_SERVER_ERROR, "internal error while customizing", "server_error"),
    }
}

async fn remove_adapter(
    State(s): State<Arc<Service>>,
    client: HttpClient,
    headers: HeaderMap,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Response {
    if let Some(r) = unauthorized(&s, &headers) {
        return r;
    }
    let permit = match s.try_slot(Interface::http, &client.key) {
        Ok(p) => p,
        Err(e) => return busy(&e),
    };
    let worker = s.clone();
    let removed = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        worker.remove(Interface::http, &identity(&worker, &client), &client.key, &name, &CancelToken::new())
    });
    match removed.await {
        Ok(Ok(v)) => axum::Json(v).into_response(),
        Ok(Err(e)) => error_response(&e),
        Err(_) => fail(StatusCode::INTERNAL_SERVER_ERROR, "internal error while removing", "server_error"),
    }
}

/// The 401 reply when a token is configured and the request lacks it.
fn unauthorized(s: &Service, headers: &HeaderMap) -> Option<Response> {
    let token = s.token()?;
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim());
    match given {
        Some(g) if constant_time_eq(g.as_bytes(), token.as_bytes()) => None,
        _ => {
            let mut r = fail(StatusCode::UNAUTHORIZED, "missing or wrong bearer token", "authentication_error");
            r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            Some(r)
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn chat_completions(
    State(s): State<Arc<Service>>,
    client: HttpClient,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle(s, client, headers, body, Endpoint::Chat).await
}

async fn completions(State(s): State<Arc<Service>>, client: HttpClient, headers: HeaderMap, body: Body) -> Response {
    handle(s, client, headers, body, Endpoint::Completion).await
}

/// What a blocking generation reports back to the async side: text, then every answer (one unless
/// the request asked for `n`).
enum Msg {
    /// Streamed text of answer `.0` (the choice index), with the log-probabilities of the tokens
    /// sampled since the last one (when asked).
    Text(usize, String, Vec<crate::generate::TokenLogprob>),
    /// A streamed answer has ended (its finish reason, usage and `crayon` go in its last chunk).
    Finished(usize, Box<Answered>),
    /// Every answer, for a response that is not streamed.
    Done(Reply),
    Failed(Error),
}

async fn handle(s: Arc<Service>, client: HttpClient, headers: HeaderMap, body: Body, endpoint: Endpoint) -> Response {
    if let Some(r) = unauthorized(&s, &headers) {
        return r;
    }
    // The body first: a slow upload must not hold a model slot.
    let bytes = match read_body(&s, body).await {
        Ok(b) => b,
        Err(r) => {
            s.refused(Interface::http, Operation::generate, crate::ErrorKind::Invalid);
            return r;
        }
    };
    // OpenAI JSON becomes the service's typed request here, at the edge.
    let (request, stream) = match openai::parse_request(endpoint, openai::Body::Bytes(&bytes), s.defaults()) {
        Ok(r) => r,
        Err(e) => {
            s.refused(Interface::http, Operation::generate, e.kind());
            return error_response(&e);
        }
    };
    // Checked before taking a place: a bad request is a 400 even when the service is busy.
    let admitted = match s.admit(Interface::http, request) {
        Ok(a) => a,
        Err(e) => return error_response(&e),
    };
    let permit = match s.try_slot(Interface::http, &client.key) {
        Ok(p) => p,
        Err(e) => return busy(&e),
    };
    run_request(s, client, admitted, stream, permit).await
}

/// Cancels the generation when the HTTP side goes away (client disconnect drops the handler).
struct CancelOnDrop(CancelToken);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

async fn run_request(s: Arc<Service>, client: HttpClient, admitted: Admitted, stream: bool, permit: Slot) -> Response {
    // Unbounded (the text is bounded by max_tokens): the generating thread holds the engine and must
    // never wait on a slow reader.
    let (tx, mut rx) = mpsc::unbounded_channel::<Msg>();
    let cancel = CancelToken::new();
    let guard = CancelOnDrop(cancel.clone());
    let worker = s.clone();
    let r = admitted.request();
    let endpoint = r.endpoint;
    let model = admitted.model().to_string();
    let answers = r.n.saturating_mul(r.prompts.len());
    // Streamed log-probabilities travel with the text they belong to (or just before it, while the
    // text of a token is held back: an incomplete character, a possible stop string).
    let sink = (stream && r.params.logprobs.is_some()).then(crate::generate::LogprobSink::default);
    let mut admitted = admitted;
    admitted.set_logprob_sink(sink.clone());
    tokio::task::spawn_blocking(move || {
        let tx2 = tx.clone();
        let drain = || sink.as_ref().map(|s| std::mem::take(&mut *s.lock().unwrap_or_else(|p| p.into_inner())));
        // Which answers had log-probabilities streamed (a server's answer has them only at its end).
        let mut streamed_logprobs = vec![false; answers];
        let mut on_text = |index: usize, t: &str| {
            if !stream {
                return ControlFlow::Continue(());
            }
            let lps = drain().unwrap_or_default();
            if t.is_empty() && lps.is_empty() {
                return ControlFlow::Continue(());
            }
            if let Some(sent) = streamed_logprobs.get_mut(index) {
                *sent |= !lps.is_empty();
            }
            match tx2.send(Msg::Text(index, t.to_string(), lps)) {
                Ok(()) => ControlFlow::Continue(()),
                Err(_) => ControlFlow::Break(()), // the client is gone
            }
        };
        let result = worker.answer(&permit, &client.key, admitted, &cancel, &mut on_text);
        drop(permit); // free the slot before the client can see the end of its request
        match result {
            Ok(reply) if stream => {
                for (i, d) in reply.answers.into_iter().enumerate() {
                    if sink.is_some() && !streamed_logprobs.get(i).copied().unwrap_or(true) {
                        let _ = tx.send(Msg::Text(i, String::new(), d.answer.logprobs.clone()));
                    }
                    let _ = tx.send(Msg::Finished(i, Box::new(d)));
                }
            }
            Ok(reply) => {
                let _ = tx.send(Msg::Done(reply));
            }
            Err(e) => {
                let _ = tx.send(Msg::Failed(e));
            }
        }
    });

    if !stream {
        let _guard = guard;
        loop {
            match rx.recv().await {
                Some(Msg::Text(..) | Msg::Finished(..)) => continue,
                Some(Msg::Done(reply)) => return axum::Json(openai::full_response(&reply)).into_response(),
                Some(Msg::Failed(e)) => return error_response(&e),
                None => return fail(StatusCode::INTERNAL_SERVER_ERROR, "the request was dropped", "server_error"),
            }
        }
    }
    // Streaming: wait for the first message so that an early failure is still a proper HTTP error.
    let first = match rx.recv().await {
        Some(Msg::Failed(e)) => return error_response(&e),
        None => return fail(StatusCode::INTERNAL_SERVER_ERROR, "the request was dropped", "server_error"),
        Some(m) => m,
    };
    let id = openai::completion_id();
    let created = openai::now_unix();
    let head = openai::chunk(endpoint, &id, created, &model, Some(""), None, true);
    let mut introduced = 1; // the head chunk opens answer 0; each further answer opens with its first chunk
    let events = futures_stream(first, rx, guard, move |m: Msg| match m {
        Msg::Text(index, t, lps) => {
            let mut c = openai::chunk(endpoint, &id, created, &model, Some(&t), None, index >= introduced);
            introduced = introduced.max(index + 1);
            c["choices"][0]["index"] = json!(index);
            if !lps.is_empty() {
                c["choices"][0]["logprobs"] = openai::logprobs_json(endpoint == Endpoint::Chat, &lps);
            }
            c
        }
        Msg::Finished(index, d) => {
            let finish = openai::finish_reason(d.answer.finish_reason);
            let mut last = openai::chunk(endpoint, &id, created, &model, None, Some(finish), false);
            last["choices"][0]["index"] = json!(index);
            last["usage"] = openai::usage(&d.answer);
            last["crayon"] = openai::extension(&d);
            last
        }
        Msg::Done(_) => json!({"error": {"message": "no streamed answer", "type": "server_error"}}),
        Msg::Failed(e) => json!({"error": {"message": e.to_string(), "type": "server_error"}}),
    });
    let head_event = Event::default().data(head.to_string());
    let stream = tokio_stream::StreamExt::chain(
        tokio_stream::iter([Ok::<Event, Infallible>(head_event)]),
        tokio_stream::StreamExt::chain(events, tokio_stream::iter([Ok(Event::default().data("[DONE]"))])),
    );
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

/// The SSE body: the first message, then the rest of the channel, each turned into events. Holds the
/// cancel guard, so a client that disconnects (the body is dropped) stops the generation.
fn futures_stream(
    first: Msg,
    rx: mpsc::UnboundedReceiver<Msg>,
    guard: CancelOnDrop,
    mut to_json: impl FnMut(Msg) -> Value + Send + 'static,
) -> impl tokio_stream::Stream<Item = std::result::Result<Event, Infallible>> + Send + 'static {
    let rest = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
    let all = tokio_stream::StreamExt::chain(tokio_stream::iter([first]), rest);
    tokio_stream::StreamExt::map(all, move |m| {
        let _ = &guard;
        Ok(Event::default().data(to_json(m).to_string()))
    })
}

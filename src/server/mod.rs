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
pub mod openai;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Router as HttpRouter;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::adapters::Identity;
use crate::config::{Config, RouteMode};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::generate::{CancelToken, GenerationParams, Prompt};
use crate::metrics::{AnswerTiming, Interface, Metrics, Operation, Outcome};
use crate::queue::EngineQueue;
use crate::router::{self, Answer, AnsweredBy, Latency, Reason, Route, RouteOverrides, Router};
use openai::{ChatRequest, Common, CompletionRequest, ResponseExtension, error_body};

/// Everything a request needs, whichever interface it came through (HTTP here, the local socket,
/// D-Bus): the engine behind its fair queue, the router, limits and counters.
pub struct Service {
    queue: EngineQueue,
    /// Model id, start-time facts and the router: swapped as a whole by [`Service::reload`], so that
    /// `/health` and request parsing never wait for the engine.
    shared: RwLock<Arc<Shared>>,
    token: Option<String>,
    max_body_bytes: usize,
    max_tokens_limit: usize,
    max_n: usize,
    /// Whether devices' blends (`crayon.pool_id` + `weights`) are served: only when this daemon serves
    /// HTTP (`server.listen`), i.e. is someone's server. A device daemon refuses them, so that a local
    /// client cannot make it build one customization per weight vector.
    accepts_blends: bool,
    slots: Arc<Semaphore>,
    max_concurrent: usize,
    /// Places held per owner ([`Service::try_slot`]), at most `max_per_client` each.
    owners: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    max_per_client: usize,
    /// `adapters.owner_only`: customizations change only by their owner or an admin.
    owner_only: bool,
    counters: Counters,
    metrics: Arc<Metrics>,
    started: Instant,
    /// Saved adapters as the API shows them, refreshed after each change: listing never waits for
    /// the engine.
    catalog: RwLock<Vec<Value>>,
}

struct Shared {
    model_id: String,
    provider: String,
    pool_id: Option<String>,
    paired_with: Option<String>,
    defaults: GenerationParams,
    router: Router,
}

impl Shared {
    fn new(engine: &Engine, config: &Config) -> Result<Shared> {
        let model_id = match config.server.model_id.as_str() {
            "" => engine.files().dir.file_name().map_or("crayon".into(), |n| n.to_string_lossy().into_owned()),
            id => id.to_string(),
        };
        let pool = engine.pool();
        Ok(Shared {
            model_id,
            provider: engine.provider().to_string(),
            pool_id: pool.map(|p| p.id.clone()),
            paired_with: pool.and_then(|p| p.paired_with.clone()),
            defaults: engine.default_params(),
            router: Router::new(config)?,
        })
    }
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    offloaded: AtomicU64,
    fallbacks: AtomicU64,
    rejected_busy: AtomicU64,
    failed: AtomicU64,
    cancelled: AtomicU64,
    reloads: AtomicU64,
}

impl Service {
    pub fn new(mut engine: Engine, config: &Config) -> Result<Service> {
        let token = crate::config::read_token(&config.server.token_file, "server.token_file")?;
        let metrics = Arc::new(Metrics::new());
        engine.set_metrics(Arc::clone(&metrics));
        let shared = Shared::new(&engine, config)?;
        let catalog = RwLock::new(engine.adapters().into_iter().map(adapter_json).collect());
        Ok(Service {
            catalog,
            shared: RwLock::new(Arc::new(shared)),
            queue: EngineQueue::new(engine, config.server.max_concurrent),
            token,
            max_body_bytes: config.server.max_body_bytes,
            max_tokens_limit: config.server.max_tokens_limit,
            max_n: config.server.max_n,
            accepts_blends: !config.server.listen.is_empty(),
            slots: Arc::new(Semaphore::new(config.server.max_concurrent)),
            max_concurrent: config.server.max_concurrent,
            owners: Arc::default(),
            max_per_client: config.server.max_concurrent_per_client,
            owner_only: config.adapters.owner_only,
            counters: Counters::default(),
            metrics,
            started: Instant::now(),
        })
    }

    fn shared(&self) -> Arc<Shared> {
        self.shared.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reloads the model, pool and routing settings from `config` (SIGHUP). The new engine is loaded
    /// beside the old one and swapped in between two requests: nothing in flight or queued is dropped.
    /// On error the old engine keeps serving. Listen addresses, limits and tokens need a restart.
    pub fn reload(&self, config: &Config) -> Result<()> {
        let mut engine = Engine::load(config)?;
        engine.set_metrics(Arc::clone(&self.metrics));
        let shared = Shared::new(&engine, config)?;
        let list = engine.adapters().into_iter().map(adapter_json).collect();
        let old = self.queue.replace(engine);
        *self.shared.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(shared);
        *self.catalog.write().unwrap_or_else(|p| p.into_inner()) = list;
        drop(old);
        crate::runtime::release_freed_memory(); // the old model's sessions and weights
        self.counters.reloads.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// A place among the requests in flight for `owner` (an app: a socket peer's uid, a D-Bus
    /// connection, an HTTP peer address), or [`Error::Busy`] (counted). One owner holds at most
    /// `server.max_concurrent_per_client` places, so one busy app cannot take them all.
    pub fn try_slot(&self, interface: Interface, owner: &str) -> Result<Slot> {
        let busy = |msg: String| {
            self.counters.rejected_busy.fetch_add(1, Ordering::Relaxed);
            self.metrics.refused(interface);
            Error::Busy(msg)
        };
        let mut owners = self.owners.lock().unwrap_or_else(|p| p.into_inner());
        let held = owners.get(owner).copied().unwrap_or(0);
        if held >= self.max_per_client {
            return Err(busy(format!("{held} requests of this client in flight (server.max_concurrent_per_client)")));
        }
        let permit = self
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| busy(format!("{} requests in flight (server.max_concurrent)", self.max_concurrent)))?;
        *owners.entry(owner.to_string()).or_insert(0) += 1;
        Ok(Slot {
            permit: Arc::new(std::sync::Mutex::new(Some(permit))),
            owners: Arc::clone(&self.owners),
            owner: owner.to_string(),
            interface,
        })
    }

    /// Requests in flight (admitted, not finished).
    pub fn in_flight(&self) -> usize {
        self.max_concurrent - self.slots.available_permits()
    }

    fn refresh_catalog(&self, engine: &Engine) {
        let list = engine.adapters().into_iter().map(adapter_json).collect();
        *self.catalog.write().unwrap_or_else(|p| p.into_inner()) = list;
    }

    /// Saved adapters, as every interface shows them.
    pub fn catalog(&self) -> Vec<Value> {
        self.catalog.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Service status: model, provider, routing, queue and counters.
    pub fn status(&self) -> Value {
        let c = &self.counters;
        let sh = self.shared();
        let q = self.queue.stats();
        json!({
            "status": "ok",
            "version": crate::VERSION,
            "model": sh.model_id,
            "provider": sh.provider,
            "pool_id": sh.pool_id,
            "paired_with": sh.paired_with,
            "route_mode": sh.router.mode().name(),
            "server": sh.router.remote().map(|r| r.url()),
            "breaker_open": sh.router.remote().is_some_and(|r| r.breaker_open()),
            "in_flight": self.in_flight(),
            "max_concurrent": self.max_concurrent,
            "queued": q.waiting,
            "requests": c.requests.load(Ordering::Relaxed),
            "offloaded": c.offloaded.load(Ordering::Relaxed),
            "fallbacks": c.fallbacks.load(Ordering::Relaxed),
            "rejected_busy": c.rejected_busy.load(Ordering::Relaxed),
            "failed": c.failed.load(Ordering::Relaxed),
            "cancelled": c.cancelled.load(Ordering::Relaxed),
            "reloads": c.reloads.load(Ordering::Relaxed),
            "adapters": self.catalog.read().unwrap_or_else(|p| p.into_inner()).len(),
            "uptime_s": self.started.elapsed().as_secs(),
        })
    }

    /// Answers an OpenAI request body of `endpoint`'s kind (with the `crayon` extension) on the
    /// calling thread, for `client`'s turn in the queue; streams text to `on_text` and returns the
    /// full `chat.completion` / `text_completion` object. The caller holds `slot` ([`Service::try_slot`]);
    /// its place among `server.max_concurrent` is given back if the request goes to the server.
    pub fn answer_blocking(
        &self,
        slot: &Slot,
        endpoint: Endpoint,
        client: &str,
        body: &[u8],
        cancel: &CancelToken,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Value> {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let interface = slot.interface;
        let job = self
            .check_body_size(body.len())
            .and_then(|()| parse_job(self, body, endpoint).map_err(Error::InvalidRequest))
            .inspect_err(|e| self.metrics.request(interface, Operation::generate, e.kind().into()))?;
        let mut job = job;
        job.on_offload = Some(slot.releaser());
        // Empty texts mark the end of an answer (for HTTP's streamed `n`); these interfaces need no marker.
        let mut text_only = |_, t: &str| if t.is_empty() { ControlFlow::Continue(()) } else { on_text(t) };
        let done = self.execute_all(interface, client, &job, cancel, &mut text_only)?;
        Ok(full_response(endpoint, &job.model, job.n, &done))
    }

    /// Customizes an adapter from a customize request body (`{"name", "examples", "calibrate",
    /// "choices"}`, as `POST /v1/crayon/adapters`), for `client`'s turn in the queue.
    pub fn customize_blocking(
        &self,
        interface: Interface,
        identity: &Identity,
        client: &str,
        body: &[u8],
        cancel: &CancelToken,
    ) -> Result<Value> {
        let parsed = self.check_body_size(body.len()).and_then(|()| {
            serde_json::from_slice::<CustomizeRequest>(body)
                .map_err(|e| Error::InvalidRequest(format!("malformed customize request: {e}")))
        });
        match parsed {
            Ok(req) => self.customize_request(interface, identity, client, req, cancel),
            Err(e) => {
                self.metrics.request(interface, Operation::customize, e.kind().into());
                Err(e)
            }
        }
    }

    fn customize_request(
        &self,
        interface: Interface,
        identity: &Identity,
        client: &str,
        req: CustomizeRequest,
        cancel: &CancelToken,
    ) -> Result<Value> {
        let result = self.customize_unrecorded(identity, client, req, cancel);
        self.metrics.request(interface, Operation::customize, outcome(&result));
        result
    }

    fn customize_unrecorded(
        &self,
        identity: &Identity,
        client: &str,
        req: CustomizeRequest,
        cancel: &CancelToken,
    ) -> Result<Value> {
        if req.calibrate {
            router::check_calibration(&req.examples, &req.choices)?;
        }
        let base = self.shared().router.thresholds();
        let mut engine = self.queue.lock(client, cancel)?;
        let previous = engine.adapter(&req.name).ok().cloned();
        if let Some(p) = &previous {
            self.check_may_change(identity, p)?;
        }
        let report = engine.customize_as(&req.name, &req.examples, identity.owner());
        self.refresh_catalog(&engine);
        let report = report?;
        let calibration = if req.calibrate {
            let c = router::calibrate(&mut engine, base, &req.name, &req.examples, &req.choices, cancel);
            if c.is_err() {
                // Customize and calibrate are one request: a failed calibration undoes the customization.
                if let Err(e) = engine.restore_adapter(&req.name, previous) {
                    tracing::error!(adapter = %req.name, error = %e, "could not restore the adapter after a failed calibration");
                }
            }
            self.refresh_catalog(&engine);
            Some(c?)
        } else {
            None
        };
        let c = engine.adapter(&req.name)?.clone();
        Ok(json!({
            "adapter": adapter_json(&c),
            "embed_ms": report.embed_ms,
            "merge_ms": report.merge_ms,
            "session_ms": report.session_ms,
            "total_ms": report.total_ms,
            "calibration": calibration,
        }))
    }

    /// The one input budget of every interface: a request (its prompt, system text, examples and
    /// options as the body the service parses) of at most `server.max_body_bytes`, refused before it is
    /// parsed or tokenized. HTTP enforces it while reading the body (413); the socket's frames and
    /// D-Bus's messages arrive whole and are checked here, with the same wording.
    pub fn check_body_size(&self, len: usize) -> Result<()> {
        match len > self.max_body_bytes {
            true => Err(Error::InvalidRequest(body_too_large(self.max_body_bytes))),
            false => Ok(()),
        }
    }

    /// Removes a saved adapter, for `client`'s turn in the queue.
    pub fn remove_blocking(
        &self,
        interface: Interface,
        identity: &Identity,
        client: &str,
        name: &str,
        cancel: &CancelToken,
    ) -> Result<Value> {
        let result = self.queue.lock(client, cancel).and_then(|mut engine| {
            self.check_may_change(identity, engine.adapter(name)?)?;
            let r = engine.remove_adapter(name);
            self.refresh_catalog(&engine);
            Ok(json!({"removed": adapter_json(&r?)}))
        });
        self.metrics.request(interface, Operation::remove, outcome(&result));
        result
    }

    /// Whether `identity` may replace or remove `c` (`adapters.owner_only`).
    fn check_may_change(&self, identity: &Identity, c: &crate::adapters::Customization) -> Result<()> {
        match self.owner_only {
            true => identity.check_may_change(c),
            false => Ok(()),
        }
    }

    /// The identity of an HTTP client for ownership: the token holder is an admin (a server's
    /// operator); without a token (local mode) every local process is the same `http:local`.
    fn http_identity(&self) -> Identity {
        match self.token {
            Some(_) => Identity::Admin,
            None => Identity::Client("http:local".into()),
        }
    }

    /// The metrics exposition (`GET /metrics`), with the state gauges read now (never waits for the
    /// engine).
    pub fn metrics_text(&self) -> String {
        let q = self.queue.stats();
        let sh = self.shared();
        self.metrics.encode(crate::metrics::State {
            queue_waiting: q.waiting,
            in_flight: self.in_flight(),
            adapters_saved: self.catalog.read().unwrap_or_else(|p| p.into_inner()).len(),
            breaker_open: sh.router.remote().is_some_and(|r| r.breaker_open()),
            uptime_s: self.started.elapsed().as_secs_f64(),
        })
    }

    /// Every answer the job asks for (`n` per prompt), one after another, each in its own turn; a
    /// seeded request gives answer `i` of a prompt the seed `seed + i`, so they differ yet stay
    /// reproducible.
    fn execute_all(
        &self,
        interface: Interface,
        client: &str,
        job: &Job,
        cancel: &CancelToken,
        on_text: &mut dyn FnMut(usize, &str) -> ControlFlow<()>,
    ) -> Result<Vec<Done>> {
        let prompts = std::iter::once(&job.prompt).chain(&job.more_prompts);
        let mut all = Vec::with_capacity(job.n * (1 + job.more_prompts.len()));
        for prompt in prompts {
            for i in 0..job.n {
                let mut one = job.clone();
                one.prompt = prompt.clone();
                one.more_prompts.clear();
                one.params.sampling.seed = job.params.sampling.seed.map(|s| s.wrapping_add(i as u64));
                let index = all.len();
                all.push(self.execute_counted(interface, client, &one, cancel, &mut |t| on_text(index, t))?);
                // An empty text ends answer `index` (its held-back log-probabilities can be sent).
                let _ = on_text(index, "");
            }
        }
        Ok(all)
    }

    fn execute_counted(
        &self,
        interface: Interface,
        client: &str,
        job: &Job,
        cancel: &CancelToken,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Done> {
        let started = Instant::now();
        let mut first_text: Option<f64> = None;
        let mut timed = |t: &str| {
            if first_text.is_none() && !t.is_empty() {
                first_text = Some(started.elapsed().as_secs_f64());
            }
            on_text(t)
        };
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| execute(self, client, job, cancel, &mut timed)))
                .unwrap_or_else(|_| Err(Error::Internal("the request handler panicked".into())));
        self.metrics.request(interface, Operation::generate, outcome(&result));
        if let Ok(done) = &result {
            let a = &done.answer;
            // A non-streamed answer's text arrives all at once at the end.
            let first_text_s = first_text.or((!a.text.is_empty()).then(|| started.elapsed().as_secs_f64()));
            let timing = AnswerTiming {
                prompt_tokens: a.prompt_tokens,
                completion_tokens: a.completion_tokens,
                first_text_s,
                total_s: started.elapsed().as_secs_f64(),
            };
            self.metrics.answered(interface, &timing, &a.route);
        }
        let c = &self.counters;
        match &result {
            Ok(done) => {
                if done.answer.finish_reason == crate::generate::FinishReason::Cancelled {
                    c.cancelled.fetch_add(1, Ordering::Relaxed);
                }
                if done.answer.route.answered_by == AnsweredBy::Server {
                    c.offloaded.fetch_add(1, Ordering::Relaxed);
                }
                if done.answer.route.fallback.is_some() {
                    c.fallbacks.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(Error::Cancelled) => {
                c.cancelled.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                c.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        result
    }

    /// HTTP 429 with `Retry-After` for a refused slot ([`Service::try_slot`] counted it).
    fn busy(e: &Error) -> Response {
        let mut r = fail(StatusCode::TOO_MANY_REQUESTS, &e.to_string(), "rate_limit_error");
        r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        r
    }

    /// Reads a request body within `max_body_bytes` and [`BODY_TIMEOUT`].
    async fn read_body(&self, body: Body) -> std::result::Result<axum::body::Bytes, Response> {
        match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, self.max_body_bytes)).await {
            Ok(Ok(b)) => Ok(b),
            Ok(Err(e)) if over_limit(&e) => {
                Err(fail(StatusCode::PAYLOAD_TOO_LARGE, &body_too_large(self.max_body_bytes), "invalid_request_error"))
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

/// The wording of the input budget's refusal, the same on every interface.
fn body_too_large(limit: usize) -> String {
    format!("request over {limit} bytes (server.max_body_bytes)")
}

/// A finished request's outcome label.
fn outcome<T>(r: &Result<T>) -> Outcome {
    match r {
        Ok(_) => Outcome::ok,
        Err(e) => e.kind().into(),
    }
}

/// A place among the requests in flight ([`Service::try_slot`]); freed when dropped.
pub struct Slot {
    /// The place among `server.max_concurrent`; given back early when the request goes to the
    /// server ([`Slot::releaser`]).
    permit: Arc<std::sync::Mutex<Option<OwnedSemaphorePermit>>>,
    owners: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    owner: String,
    /// The interface the request came through.
    interface: Interface,
}

impl Slot {
    /// Gives the place among `server.max_concurrent` back (once; the client's own share,
    /// `max_concurrent_per_client`, stays held until the request ends).
    pub fn releaser(&self) -> router::OnOffload {
        let permit = Arc::clone(&self.permit);
        Arc::new(move || drop(permit.lock().unwrap_or_else(|p| p.into_inner()).take()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut owners = self.owners.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = owners.get_mut(&self.owner) {
            *n -= 1;
            if *n == 0 {
                owners.remove(&self.owner);
            }
        }
    }
}

/// Who is asking over HTTP, for the queue's round-robin: the peer's IP address (every connection of
/// one device is one client, so a device flooding the server waits its turn behind the others).
/// `"http"` when the server was not started with peer addresses (an embedding app's own router).
struct HttpClient(String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for HttpClient {
    type Rejection = Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> std::result::Result<Self, Infallible> {
        let peer = parts.extensions.get::<axum::extract::ConnectInfo<SocketAddr>>();
        Ok(HttpClient(peer.map_or_else(|| "http".into(), |c| format!("http:{}", c.0.ip()))))
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
/// and this server answers none). With a token, the token is the protection (browsers do not attach
/// it cross-site).
async fn local_guard(
    State(s): State<Arc<Service>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if s.token.is_none() {
        if let Some(why) = browser_refusal(req.method(), req.uri().path(), req.headers()) {
            tracing::warn!(reason = %why, "http: request refused");
            return fail(StatusCode::FORBIDDEN, &why, "invalid_request_error");
        }
    }
    next.run(req).await
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

impl Service {
    /// The base model and every saved adapter as OpenAI model objects.
    fn model_objects(&self) -> Vec<Value> {
        let model_id = self.shared().model_id.clone();
        let mut data = vec![json!({"id": model_id, "object": "model", "created": 0, "owned_by": "crayon"})];
        data.extend(self.catalog().into_iter().map(|a| {
            json!({"id": a["name"], "object": "model", "created": a["created"], "owned_by": "crayon", "parent": model_id})
        }));
        data
    }
}

/// What the API shows of a customization (not the example embeddings).
fn adapter_json(c: &crate::adapters::Customization) -> Value {
    json!({
        "name": c.name,
        "pool_id": c.pool_id,
        "adapters": c.adapters,
        "weights": c.weights,
        "similarities": c.similarities,
        "example_count": c.example_count,
        "example_digest": c.example_digest,
        "created": c.created_unix,
        "calibrated": c.calibrated,
    })
}

async fn list_adapters(State(s): State<Arc<Service>>, headers: HeaderMap) -> Response {
    if let Some(r) = unauthorized(&s, &headers) {
        return r;
    }
    axum::Json(json!({"object": "list", "data": s.catalog()})).into_response()
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CustomizeRequest {
    name: String,
    examples: Vec<crate::adapters::Example>,
    /// Also calibrate the routing thresholds from the examples (runs the customized model on them).
    #[serde(default)]
    calibrate: bool,
    #[serde(default)]
    choices: Vec<String>,
}

async fn customize(State(s): State<Arc<Service>>, client: HttpClient, headers: HeaderMap, body: Body) -> Response {
    if let Some(r) = unauthorized(&s, &headers) {
        return r;
    }
    let bytes = match s.read_body(body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let req: CustomizeRequest = match serde_json::from_slice(&bytes) {
        Ok(r) => r,
        Err(e) => {
            return fail(
                StatusCode::BAD_REQUEST,
                &format!("malformed customize request: {e}"),
                "invalid_request_error",
            );
        }
    };
    // Validation (calibration included) happens once, in `Service::customize_request`, as for every interface.
    let permit = match s.try_slot(Interface::http, &client.0) {
        Ok(p) => p,
        Err(e) => return Service::busy(&e),
    };
    let worker = s.clone();
    let cancel = CancelToken::new();
    let _guard = CancelOnDrop(cancel.clone());
    let joined = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        worker.customize_request(Interface::http, &worker.http_identity(), &client.0, req, &cancel)
    })
    .await;
    match joined {
        Ok(Ok(v)) => axum::Json(v).into_response(),
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
    let permit = match s.try_slot(Interface::http, &client.0) {
        Ok(p) => p,
        Err(e) => return Service::busy(&e),
    };
    let worker = s.clone();
    let removed = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        worker.remove_blocking(Interface::http, &worker.http_identity(), &client.0, &name, &CancelToken::new())
    });
    match removed.await {
        Ok(Ok(v)) => axum::Json(v).into_response(),
        Ok(Err(e)) => error_response(&e),
        Err(_) => fail(StatusCode::INTERNAL_SERVER_ERROR, "internal error while removing", "server_error"),
    }
}

/// The 401 reply when a token is configured and the request lacks it.
fn unauthorized(s: &Service, headers: &HeaderMap) -> Option<Response> {
    let Some(token) = &s.token else { return None };
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

/// Which OpenAI request a body is: a chat (messages, chat template) or a text completion (prompt).
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Endpoint {
    Chat,
    Completion,
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

/// A parsed request, ready for a blocking thread.
#[derive(Clone)]
struct Job {
    endpoint: Endpoint,
    prompt: Prompt,
    params: GenerationParams,
    overrides: RouteOverrides,
    /// Device pool id and weights to blend with, when a device sent them.
    blend: Option<(String, Vec<f32>)>,
    stream: bool,
    model: String,
    /// Answers asked for per prompt (OpenAI `n`), generated one after another.
    n: usize,
    /// Gives the request's admission place back when it goes to the server.
    on_offload: Option<router::OnOffload>,
    /// Further prompts of a batch completions request, answered after `prompt`, in order.
    more_prompts: Vec<Prompt>,
}

/// What a blocking generation reports back to the async side: text, then every answer (one unless
/// the request asked for `n`).
enum Msg {
    /// Streamed text of answer `.0` (the choice index), with the log-probabilities of the tokens
    /// sampled since the last one (when asked).
    Text(usize, String, Vec<crate::generate::TokenLogprob>),
    /// A streamed answer has ended (its finish reason, usage and `crayon` go in its last chunk).
    Finished(usize, Box<Done>),
    /// Every answer, for a response that is not streamed.
    Done(Vec<Done>),
    Failed(Error),
}

struct Done {
    answer: Answer,
    adapter: Option<String>,
    blend: Option<String>,
    /// Why a device's blend could not be applied (the plain model answered instead).
    blend_error: Option<String>,
}

async fn handle(s: Arc<Service>, client: HttpClient, headers: HeaderMap, body: Body, endpoint: Endpoint) -> Response {
    if let Some(r) = unauthorized(&s, &headers) {
        return r;
    }
    s.counters.requests.fetch_add(1, Ordering::Relaxed);
    // The body first: a slow upload must not hold a model slot.
    let bytes = match s.read_body(body).await {
        Ok(b) => b,
        Err(r) => {
            s.metrics.request(Interface::http, Operation::generate, Outcome::invalid);
            return r;
        }
    };
    let job = match parse_job(&s, &bytes, endpoint) {
        Ok(j) => j,
        Err(msg) => {
            s.metrics.request(Interface::http, Operation::generate, Outcome::invalid);
            return fail(StatusCode::BAD_REQUEST, &msg, "invalid_request_error");
        }
    };
    let permit = match s.try_slot(Interface::http, &client.0) {
        Ok(p) => p,
        Err(e) => return Service::busy(&e),
    };
    let mut job = job;
    job.on_offload = Some(permit.releaser());
    run_job(s, client, job, permit).await
}

fn parse_job(s: &Service, bytes: &[u8], endpoint: Endpoint) -> std::result::Result<Job, String> {
    let mut more_prompts = Vec::new();
    let (model, prompt, common): (String, Prompt, Common) = match endpoint {
        Endpoint::Chat => {
            let r: ChatRequest = serde_json::from_slice(bytes).map_err(|e| format!("malformed JSON body: {e}"))?;
            let p = r.prompt()?;
            (r.model, p, r.common)
        }
        Endpoint::Completion => {
            let r: CompletionRequest =
                serde_json::from_slice(bytes).map_err(|e| format!("malformed JSON body: {e}"))?;
            let mut prompts = r.prompts()?;
            more_prompts = prompts.split_off(1);
            let p = prompts.pop().ok_or("prompt must not be empty")?;
            (r.model, p, r.common)
        }
    };
    let sh = s.shared();
    let n = common.n(1 + more_prompts.len(), s.max_n)?;
    let mut params = common.params(sh.defaults.clone(), s.max_tokens_limit)?;
    let ext = common.crayon.unwrap_or_default();
    let mut overrides = ext.route.unwrap_or_default();
    let blend = match (ext.pool_id, ext.weights) {
        (Some(_), Some(_)) if !s.accepts_blends => {
            return Err("crayon.pool_id + weights (a device's blend) are served only by a server crayond \
                        (server.listen set); customize an adapter here instead"
                .into());
        }
        (Some(p), Some(w)) => {
            // A blend from a device is answered here: never routed on (no second hop).
            overrides.mode = Some(RouteMode::DeviceOnly);
            Some((p, w))
        }
        (None, None) => None,
        _ => return Err("crayon.pool_id and crayon.weights go together".into()),
    };
    let is_base = model.is_empty() || model == sh.model_id || model == "default";
    params.adapter = match (ext.adapter, is_base) {
        (Some(a), _) => Some(a),
        (None, true) => None,
        (None, false) => Some(model.clone()),
    };
    if blend.is_some() && params.adapter.is_some() {
        return Err("give either an adapter or a blend (crayon.pool_id + weights), not both".into());
    }
    params.validate().map_err(|e| match e {
        Error::InvalidRequest(msg) => msg, // wrapped again by the caller: say "invalid request" once
        other => other.to_string(),
    })?;
    let model = if is_base { sh.model_id.clone() } else { model };
    Ok(Job {
        endpoint,
        prompt,
        params,
        overrides,
        blend,
        stream: common.stream,
        model,
        n,
        more_prompts,
        on_offload: None,
    })
}

/// Cancels the generation when the HTTP side goes away (client disconnect drops the handler).
struct CancelOnDrop(CancelToken);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

async fn run_job(s: Arc<Service>, client: HttpClient, job: Job, permit: Slot) -> Response {
    // Unbounded (the text is bounded by max_tokens): the generating thread holds the engine and must
    // never wait on a slow reader.
    let (tx, mut rx) = mpsc::unbounded_channel::<Msg>();
    let cancel = CancelToken::new();
    let guard = CancelOnDrop(cancel.clone());
    let stream = job.stream;
    let worker = s.clone();
    let endpoint = job.endpoint;
    let model = job.model.clone();
    let n = job.n;
    let mut job = job;
    // Streamed log-probabilities travel with the text they belong to (or just before it, while the
    // text of a token is held back: an incomplete character, a possible stop string).
    let sink = (stream && job.params.logprobs.is_some()).then(crate::generate::LogprobSink::default);
    job.params.logprob_sink = sink.clone();
    tokio::task::spawn_blocking(move || {
        let tx2 = tx.clone();
        let drain = || sink.as_ref().map(|s| std::mem::take(&mut *s.lock().unwrap_or_else(|p| p.into_inner())));
        // Which answers had log-probabilities streamed (a server's answer has them only at its end).
        let mut streamed_logprobs = vec![false; n * (1 + job.more_prompts.len())];
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
        let result = worker.execute_all(Interface::http, &client.0, &job, &cancel, &mut on_text);
        drop(permit); // free the slot before the client can see the end of its request
        match result {
            Ok(done) if stream => {
                for (i, d) in done.into_iter().enumerate() {
                    if sink.is_some() && !streamed_logprobs.get(i).copied().unwrap_or(true) {
                        let _ = tx.send(Msg::Text(i, String::new(), d.answer.logprobs.clone()));
                    }
                    let _ = tx.send(Msg::Finished(i, Box::new(d)));
                }
            }
            Ok(done) => {
                let _ = tx.send(Msg::Done(done));
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
                Some(Msg::Done(d)) => return axum::Json(full_response(endpoint, &model, n, &d)).into_response(),
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
    let id = completion_id();
    let created = now_unix();
    let head = chunk(endpoint, &id, created, &model, Some(""), None, true);
    let mut introduced = 1; // the head chunk opens answer 0; each further answer opens with its first chunk
    let events = futures_stream(first, rx, guard, move |m: Msg| match m {
        Msg::Text(index, t, lps) => {
            let mut c = chunk(endpoint, &id, created, &model, Some(&t), None, index >= introduced);
            introduced = introduced.max(index + 1);
            c["choices"][0]["index"] = json!(index);
            if !lps.is_empty() {
                c["choices"][0]["logprobs"] = openai::logprobs_json(endpoint == Endpoint::Chat, &lps);
            }
            c
        }
        Msg::Finished(index, d) => {
            let finish = openai::finish_reason(d.answer.finish_reason);
            let mut last = chunk(endpoint, &id, created, &model, None, Some(finish), false);
            last["choices"][0]["index"] = json!(index);
            last["usage"] = openai::usage(&d.answer);
            last["crayon"] = extension(&d);
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

/// Runs one job on the calling (blocking) thread.
fn execute(
    s: &Service,
    client: &str,
    job: &Job,
    cancel: &CancelToken,
    on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
) -> Result<Done> {
    if let Some((pool_id, weights)) = &job.blend {
        // A device's blend: make it ready (cached) and answer here, holding the engine throughout
        // so that no other request evicts it in between.
        let t0 = Instant::now();
        let mut engine = s.queue.lock(client, cancel)?;
        let queue_ms = t0.elapsed().as_secs_f64() * 1e3;
        let t_route = Instant::now();
        // A blend this server cannot merge may still be served from its exemplar bank for that pool;
        // one it cannot apply at all (no pool, another pool, bad weights) still gets an answer from
        // the plain model, flagged, rather than an error: the device asked for help.
        let mut params = job.params.clone();
        params.adapter = None;
        let mut prompt = None;
        let (name, blend_error) = match engine.prepare_blend(pool_id, weights) {
            Ok(n) => {
                params.adapter = Some(n.clone());
                (Some(n), None)
            }
            Err(e) => match engine.exemplar_prompt(pool_id, weights, &job.prompt) {
                Some(Ok((p, label))) => {
                    prompt = Some(p);
                    (Some(label), None)
                }
                other => {
                    let msg = match other {
                        Some(Err(x)) => x.to_string(),
                        _ => e.to_string(),
                    };
                    tracing::warn!(error = %msg, "blend not applied; answering with the plain model");
                    (None, Some(msg))
                }
            },
        };
        let routing_ms = t_route.elapsed().as_secs_f64() * 1e3;
        let t1 = Instant::now();
        let g = engine.generate(prompt.as_ref().unwrap_or(&job.prompt), &params, cancel, on_text)?;
        let local_ms = t1.elapsed().as_secs_f64() * 1e3;
        let route = Route {
            answered_by: AnsweredBy::Device,
            reason: Reason::DeviceOnly,
            mode: RouteMode::DeviceOnly,
            scope: None,
            confidence: router::confidence(&g),
            thresholds: Default::default(),
            fallback: None,
            server_blend: false,
            server_model: None,
            latency: Latency {
                queue_ms,
                routing_ms,
                local_ms,
                remote_ms: 0.0,
                total_ms: t0.elapsed().as_secs_f64() * 1e3,
            },
        };
        let answer = Answer {
            choice: router::best_choice(&params.choices, &g.choice_probs),
            text: g.text,
            finish_reason: g.finish_reason,
            choice_probs: g.choice_probs,
            choice_scores: g.choice_scores,
            prompt_tokens: g.prompt_tokens,
            completion_tokens: g.tokens.len(),
            logprobs: g.logprobs,
            context: g.context,
            route,
        };
        return Ok(Done { answer, adapter: None, blend: name, blend_error });
    }
    let req = router::Request {
        prompt: job.prompt.clone(),
        params: job.params.clone(),
        overrides: job.overrides.clone(),
        on_offload: job.on_offload.clone(),
    };
    let answer = s.shared().router.answer(&s.queue, client, &req, cancel, on_text)?;
    Ok(Done { answer, adapter: job.params.adapter.clone(), blend: None, blend_error: None })
}

fn extension(d: &Done) -> Value {
    let a = &d.answer;
    serde_json::to_value(ResponseExtension {
        route: &a.route,
        adapter: d.adapter.as_deref(),
        blend: d.blend.as_deref(),
        blend_error: d.blend_error.as_deref(),
        choice: a.choice.as_deref(),
        choice_probs: &a.choice_probs,
        choice_scores: &a.choice_scores,
        context: a.context,
    })
    .unwrap_or(Value::Null)
}

/// The OpenAI response for every answer of a request (`choices[i]`); usage counts the prompt once and
/// every answer's tokens; the `crayon` object describes the first answer (each answer's own route is
/// in `crayon.choices_routes` when there are several).
fn full_response(endpoint: Endpoint, model: &str, n: usize, all: &[Done]) -> Value {
    let choices: Vec<Value> = all
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let a = &d.answer;
            let finish = openai::finish_reason(a.finish_reason);
            let logprobs = match a.logprobs.is_empty() {
                true => Value::Null,
                false => openai::logprobs_json(endpoint == Endpoint::Chat, &a.logprobs),
            };
            match endpoint {
                Endpoint::Chat => json!({"index": i, "message": {"role": "assistant", "content": a.text},
                                         "finish_reason": finish, "logprobs": logprobs}),
                Endpoint::Completion => {
                    json!({"index": i, "text": a.text, "finish_reason": finish, "logprobs": logprobs})
                }
            }
        })
        .collect();
    let Some(first) = all.first() else {
        return error_body("no answer", "server_error", None);
    };
    let mut usage = openai::usage(&first.answer);
    if all.len() > 1 {
        // Each prompt counts once, however many answers it got.
        let prompt: usize = all.iter().step_by(n.max(1)).map(|d| d.answer.prompt_tokens).sum();
        let completion: usize = all.iter().map(|d| d.answer.completion_tokens).sum();
        usage["prompt_tokens"] = json!(prompt);
        usage["completion_tokens"] = json!(completion);
        usage["total_tokens"] = json!(prompt.saturating_add(completion));
    }
    let mut ext = extension(first);
    if all.len() > 1 {
        ext["choices_routes"] = json!(all.iter().map(extension).collect::<Vec<_>>());
    }
    json!({
        "id": completion_id(),
        "object": if endpoint == Endpoint::Chat { "chat.completion" } else { "text_completion" },
        "created": now_unix(),
        "model": model,
        "choices": choices,
        "usage": usage,
        "crayon": ext,
    })
}

fn chunk(
    endpoint: Endpoint,
    id: &str,
    created: u64,
    model: &str,
    text: Option<&str>,
    finish: Option<&str>,
    first: bool,
) -> Value {
    let choice = match endpoint {
        Endpoint::Chat => {
            let mut delta = json!({});
            if first {
                delta["role"] = json!("assistant");
            }
            if let Some(t) = text {
                delta["content"] = json!(t);
            }
            json!({"index": 0, "delta": delta, "finish_reason": finish})
        }
        Endpoint::Completion => json!({"index": 0, "text": text.unwrap_or(""), "finish_reason": finish}),
    };
    json!({
        "id": id,
        "object": if endpoint == Endpoint::Chat { "chat.completion.chunk" } else { "text_completion" },
        "created": created,
        "model": model,
        "choices": [choice],
    })
}

fn completion_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("crayon-{:x}-{}", now_unix(), NEXT.fetch_add(1, Ordering::Relaxed))
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

//! The service core: one typed entry point behind every interface. HTTP (`crate::http`), the local
//! socket (`crate::socket`), D-Bus (`crate::dbus`) and `crayonctl` translate their wire formats into a
//! [`Request`] / [`CustomizeRequest`] at their edge and call [`Service::answer`] /
//! [`Service::customize`] / [`Service::remove`]; the service checks the request once
//! ([`Service::admit`]), takes the client's turn in the engine's fair queue, answers through the
//! router, and counts what happened (status, metrics) the same way for all of them.

mod request;

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::adapters::{Customization, Identity};
use crate::config::{Config, RouteMode};
use crate::engine::{CustomizeReport, Engine};
use crate::error::{Error, Result};
use crate::generate::{CancelToken, GenerationParams, Prompt};
use crate::metrics::{AnswerTiming, Interface, Metrics, Operation, Outcome};
use crate::queue::EngineQueue;
use crate::router::{self, AnsweredBy, Router};
pub use request::{Answered, CustomizeRequest, Endpoint, Reply, Request};

/// Everything a request needs, whichever interface it came through (HTTP, the local socket, D-Bus,
/// in-process): the engine behind its fair queue, the router, limits and counters.
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
    /// The gid of `socket.group`: local callers must be root, the service's user or its members.
    local_group: Option<u32>,
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
    /// Whether a requested model name means the base model: empty, `"default"` or its id.
    fn is_base(&self, requested: &str) -> bool {
        requested.is_empty() || requested == self.model_id || requested == "default"
    }

    fn new(engine: &Engine, config: &Config) -> Result<Shared> {
        let pool = engine.pool();
        Ok(Shared {
            model_id: model_id(engine, config),
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
            local_group: crate::socket::group_gid(&config.socket.group),
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

    /// Service status: model, provider, routing, queue and counters — what `/health`, the socket's
    /// `status`, D-Bus's properties and `StatusJson()` all report.
    pub fn status(&self) -> Status {
        let c = &self.counters;
        let sh = self.shared();
        let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
        Status {
            status: "ok",
            version: crate::VERSION,
            model: sh.model_id.clone(),
            provider: sh.provider.clone(),
            pool_id: sh.pool_id.clone(),
            paired_with: sh.paired_with.clone(),
            route_mode: sh.router.mode().name(),
            server: sh.router.remote().map(|r| r.url().to_string()),
            breaker_open: sh.router.remote().is_some_and(|r| r.breaker_open()),
            in_flight: self.in_flight(),
            max_concurrent: self.max_concurrent,
            queued: self.queue.stats().waiting,
            requests: load(&c.requests),
            offloaded: load(&c.offloaded),
            fallbacks: load(&c.fallbacks),
            rejected_busy: load(&c.rejected_busy),
            failed: load(&c.failed),
            cancelled: load(&c.cancelled),
            reloads: load(&c.reloads),
            adapters: self.catalog.read().unwrap_or_else(|p| p.into_inner()).len(),
            uptime_s: self.started.elapsed().as_secs(),
        }
    }

    /// The generation parameters a request starts from (`[generation]`), before its own values.
    pub fn defaults(&self) -> GenerationParams {
        self.shared().defaults.clone()
    }

    /// Checks `request` as every interface's requests are checked ([`Service::check`]) and makes it
    /// answerable; a refusal is counted (requests, metrics) for `interface`. Interfaces admit at their
    /// edge, before taking an admission place, so a bad request is refused as bad even when the
    /// service is busy.
    pub fn admit(&self, interface: Interface, request: Request) -> Result<Admitted> {
        let mut request = request;
        match self.check(&mut request) {
            Ok(model) => Ok(Admitted { request, model }),
            Err(e) => {
                self.refused(interface, Operation::generate, e.kind());
                Err(e)
            }
        }
    }

    /// Answers an admitted request on the calling thread, for `client`'s turn in the queue: every
    /// interface's one entry point. Text streams to `on_text(answer index, text)`, an empty text
    /// ending each answer. The caller holds `slot` ([`Service::try_slot`]); its place among
    /// `server.max_concurrent` is given back if the request goes to the server.
    pub fn answer(
        &self,
        slot: &Slot,
        client: &str,
        admitted: Admitted,
        cancel: &CancelToken,
        on_text: &mut dyn FnMut(usize, &str) -> ControlFlow<()>,
    ) -> Result<Reply> {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let Admitted { request, model } = admitted;
        let large = job_input_bytes(&request) >= LARGE_INPUT_BYTES;
        let job = Job { request, on_offload: Some(slot.releaser()) };
        let answers = self.execute_all(slot.interface, client, &job, cancel, on_text);
        if large {
            // Tokenizing and reading a long input leaves its buffers freed but resident (~117 MB after
            // five 900 KB prompts on the real model): give them back, so memory returns after a peak.
            crate::runtime::release_freed_memory();
        }
        Ok(Reply { endpoint: job.request.endpoint, model, n: job.request.n, answers: answers? })
    }

    /// A request refused at an interface's edge, before it became a [`Request`] (malformed JSON or
    /// options, over the size budget): counted like one refused here.
    pub fn refused(&self, interface: Interface, operation: Operation, kind: crate::ErrorKind) {
        if operation == Operation::generate {
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
        }
        self.metrics.request(interface, operation, kind.into());
    }

    /// The input budget every interface applies (`server.max_body_bytes`).
    pub fn max_body_bytes(&self) -> usize {
        self.max_body_bytes
    }

    /// The checks every request passes before any work, whichever interface it came through:
    /// prompts present, `n` within `server.max_n`, `max_tokens` capped at `server.max_tokens_limit`,
    /// the model name resolved to the base model or an adapter, a device's blend only on a server
    /// crayond and never with an adapter, and the parameters' own rules
    /// ([`GenerationParams::validate`]). Returns the model id the reply names.
    fn check(&self, r: &mut Request) -> Result<String> {
        let invalid = |msg: String| Error::InvalidRequest(msg);
        if r.prompts.is_empty() {
            return Err(invalid("prompt must not be empty".into()));
        }
        let answers = r.n.saturating_mul(r.prompts.len());
        match r.n {
            0 => return Err(invalid("n must be at least 1".into())),
            n if answers > self.max_n && r.prompts.len() > 1 => {
                return Err(invalid(format!(
                    "{} prompts x n = {n} is {answers} answers; the limit is {} (server.max_n)",
                    r.prompts.len(),
                    self.max_n
                )));
            }
            n if answers > self.max_n => {
                return Err(invalid(format!("n = {n} is over the limit of {} (server.max_n)", self.max_n)));
            }
            _ => {}
        }
        if r.params.max_new_tokens == 0 {
            return Err(invalid("max_tokens must be at least 1".into()));
        }
        // Capped, not refused: OpenAI clients often ask for more than any model has.
        r.params.max_new_tokens = r.params.max_new_tokens.min(self.max_tokens_limit);
        let sh = self.shared();
        let is_base = sh.is_base(&r.model);
        if r.params.adapter.is_none() && !is_base {
            r.params.adapter = Some(r.model.clone());
        }
        if r.blend.is_some() {
            if !self.accepts_blends {
                return Err(invalid(
                    "crayon.pool_id + weights (a device's blend) are served only by a server crayond \
                     (server.listen set); customize an adapter here instead"
                        .into(),
                ));
            }
            if r.params.adapter.is_some() {
                return Err(invalid("give either an adapter or a blend (crayon.pool_id + weights), not both".into()));
            }
            // A blend from a device is answered here: never routed on (no second hop).
            r.overrides.mode = Some(RouteMode::DeviceOnly);
        }
        r.params.validate()?;
        Ok(if is_base { sh.model_id.clone() } else { r.model.clone() })
    }

    /// Customizes an adapter (`POST /v1/crayon/adapters`, the socket's and D-Bus's `customize`), for
    /// `client`'s turn in the queue; `identity` must be allowed to replace an existing one.
    pub fn customize(
        &self,
        interface: Interface,
        identity: &Identity,
        client: &str,
        req: CustomizeRequest,
        cancel: &CancelToken,
    ) -> Result<Customized> {
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
    ) -> Result<Customized> {
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
        let customization = engine.adapter(&req.name)?.clone();
        Ok(Customized { customization, report, calibration })
    }

    /// The one input budget of every interface: a request (its prompt, system text, examples and
    /// options as the interface received them) of at most `server.max_body_bytes`, refused before it
    /// is parsed or tokenized (and counted as refused). HTTP enforces it while reading the body (413);
    /// the socket checks each request frame, D-Bus the bytes of a call's arguments — with the same
    /// wording.
    pub fn check_size(&self, interface: Interface, operation: Operation, len: usize) -> Result<()> {
        if len <= self.max_body_bytes {
            return Ok(());
        }
        let e = Error::InvalidRequest(body_too_large(self.max_body_bytes));
        self.refused(interface, operation, e.kind());
        Err(e)
    }

    /// Removes a saved adapter, for `client`'s turn in the queue.
    pub fn remove(
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

    /// Whether a local caller with `uid` may use the service: root, the service's own user, members of
    /// `socket.group` ([`crate::access::may_use`], the socket's and D-Bus's rule).
    pub fn local_caller_allowed(&self, uid: u32) -> bool {
        crate::access::may_use_by_uid(uid, unsafe { libc::geteuid() }, self.local_group)
    }

    /// The bearer token HTTP requires on `/v1/*` (`server.token_file`), if any.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
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

    /// Every answer the request asks for (`n` per prompt), one after another, each in its own turn; a
    /// seeded request gives answer `i` of a prompt the seed `seed + i`, so they differ yet stay
    /// reproducible.
    fn execute_all(
        &self,
        interface: Interface,
        client: &str,
        job: &Job,
        cancel: &CancelToken,
        on_text: &mut dyn FnMut(usize, &str) -> ControlFlow<()>,
    ) -> Result<Vec<Answered>> {
        let r = &job.request;
        let mut all = Vec::with_capacity(r.n * r.prompts.len());
        for prompt in &r.prompts {
            for i in 0..r.n {
                let mut params = r.params.clone();
                params.sampling.seed = r.params.sampling.seed.map(|s| s.wrapping_add(i as u64));
                let index = all.len();
                let one = One { prompt, params: &params, job };
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
        one: &One,
        cancel: &CancelToken,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Answered> {
        let started = Instant::now();
        let mut first_text: Option<f64> = None;
        let mut timed = |t: &str| {
            if first_text.is_none() && !t.is_empty() {
                first_text = Some(started.elapsed().as_secs_f64());
            }
            on_text(t)
        };
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.execute(client, one, cancel, &mut timed)))
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

    /// Answers one prompt once, on the calling (blocking) thread: a device's blend is served here
    /// ([`router::answer_served_blend`]); everything else goes through the router.
    fn execute(
        &self,
        client: &str,
        one: &One,
        cancel: &CancelToken,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Answered> {
        if let Some((pool_id, weights)) = &one.job.request.blend {
            let served = router::answer_served_blend(
                &self.queue,
                client,
                pool_id,
                weights,
                one.prompt,
                one.params,
                cancel,
                on_text,
            )?;
            return Ok(Answered {
                answer: served.answer,
                adapter: None,
                blend: served.applied,
                blend_error: served.error,
            });
        }
        let req = router::Request {
            prompt: one.prompt.clone(),
            params: one.params.clone(),
            overrides: one.job.request.overrides.clone(),
            on_offload: one.job.on_offload.clone(),
        };
        let answer = self.shared().router.answer(&self.queue, client, &req, cancel, on_text)?;
        Ok(Answered { answer, adapter: one.params.adapter.clone(), blend: None, blend_error: None })
    }
}

/// A request the service has checked ([`Service::admit`]): the only kind [`Service::answer`] takes, so
/// no interface can skip the checks or run them twice.
pub struct Admitted {
    request: Request,
    /// The model id the reply names.
    model: String,
}

impl Admitted {
    /// The model id the reply will name.
    pub fn model(&self) -> &str {
        &self.model
    }

    pub fn request(&self) -> &Request {
        &self.request
    }

    /// Where each token's log-probability also goes as it is sampled (a streaming interface's
    /// concern, not a checked parameter).
    pub fn set_logprob_sink(&mut self, sink: Option<crate::generate::LogprobSink>) {
        self.request.params.logprob_sink = sink;
    }
}

/// Inputs from this size on are followed by returning freed memory to the system ([`Service::answer`]).
const LARGE_INPUT_BYTES: usize = 64 << 10;

/// The bytes of a request's prompt text (what tokenizing and reading it scale with).
fn job_input_bytes(r: &Request) -> usize {
    r.prompts
        .iter()
        .map(|p| match p {
            Prompt::Chat(messages) => messages.iter().map(|m| m.content.len()).sum(),
            Prompt::Text(t) => t.len(),
            Prompt::Tokens(ids) => ids.len() * 4,
        })
        .sum()
}

/// A request being answered: what was asked, and how to give its admission place back when it goes
/// to the server.
struct Job {
    request: Request,
    on_offload: Option<router::OnOffload>,
}

/// One answer of a job: one of its prompts, with the parameters of this answer (its seed).
struct One<'a> {
    prompt: &'a Prompt,
    params: &'a GenerationParams,
    job: &'a Job,
}

/// The service's state and counters ([`Service::status`]), one typed record for every interface.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    pub status: &'static str,
    pub version: &'static str,
    /// The base model's id ([`model_id`]).
    pub model: String,
    /// The execution provider the engine runs on.
    pub provider: String,
    pub pool_id: Option<String>,
    /// A server pool's device pool.
    pub paired_with: Option<String>,
    pub route_mode: &'static str,
    /// The server this device routes to, if any.
    pub server: Option<String>,
    /// Whether the circuit breaker currently sends everything to the device.
    pub breaker_open: bool,
    pub in_flight: usize,
    pub max_concurrent: usize,
    /// Requests waiting for the model.
    pub queued: usize,
    pub requests: u64,
    pub offloaded: u64,
    /// Requests the server failed and the device answered itself.
    pub fallbacks: u64,
    pub rejected_busy: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub reloads: u64,
    /// Saved customizations.
    pub adapters: usize,
    pub uptime_s: u64,
}

/// The wording of the input budget's refusal, the same on every interface.
pub fn body_too_large(limit: usize) -> String {
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

impl Service {
    /// The base model and every saved adapter as OpenAI model objects.
    pub fn model_objects(&self) -> Vec<Value> {
        let model_id = self.shared().model_id.clone();
        let mut data = vec![json!({"id": model_id, "object": "model", "created": 0, "owned_by": "crayon"})];
        data.extend(self.catalog().into_iter().map(|a| {
            json!({"id": a["name"], "object": "model", "created": a["created"], "owned_by": "crayon", "parent": model_id})
        }));
        data
    }
}

/// The model id replies and `/v1/models` name the base model by: `server.model_id`, else the model
/// folder's name.
pub fn model_id(engine: &Engine, config: &Config) -> String {
    match config.server.model_id.as_str() {
        "" => engine.files().dir.file_name().map_or("crayon".into(), |n| n.to_string_lossy().into_owned()),
        id => id.to_string(),
    }
}

/// A finished customization: the adapter as saved (with its calibration, if asked for), and the time
/// each step took.
pub struct Customized {
    pub customization: Customization,
    pub report: CustomizeReport,
    pub calibration: Option<router::Calibration>,
}

impl Customized {
    /// As every interface shows it ([`customize_reply`]).
    pub fn to_json(&self) -> Value {
        customize_reply(&self.customization, &self.report, self.calibration.as_ref())
    }
}

/// What every interface (and `crayonctl --json`) shows of a finished customization: the adapter, the
/// time each step took, the calibration when one was asked for.
pub fn customize_reply(
    c: &Customization,
    report: &CustomizeReport,
    calibration: Option<&router::Calibration>,
) -> Value {
    json!({
        "adapter": adapter_json(c),
        "embed_ms": report.embed_ms,
        "merge_ms": report.merge_ms,
        "session_ms": report.session_ms,
        "total_ms": report.total_ms,
        "calibration": calibration,
    })
}

/// What the API shows of a customization (not the example embeddings).
pub fn adapter_json(c: &Customization) -> Value {
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

/// `crayond`'s HTTP endpoint (OpenAI-compatible, `docs/http.md`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to serve HTTP on, e.g. "127.0.0.1:8090"; empty: no HTTP (`crayond --listen` overrides).
    pub listen: String,
    /// File holding the bearer token clients must send; empty: no authentication (loopback only).
    pub token_file: PathBuf,
    /// Allow a non-loopback `listen` without a token (not recommended).
    pub allow_unauthenticated_remote: bool,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Requests admitted at once (running + waiting for the model); more get HTTP 429.
    pub max_concurrent: usize,
    /// Requests one client (a socket uid, a D-Bus connection, an HTTP peer address) may have in flight
    /// of the `max_concurrent`, so that one busy app cannot take every place.
    pub max_concurrent_per_client: usize,
    /// Largest `max_tokens` a request may ask for.
    pub max_tokens_limit: usize,
    /// Largest OpenAI `n` (answers per request, generated one after another in the request's turns).
    pub max_n: usize,
    /// HTTP connections open at once; one more gets 503 and is closed.
    pub max_connections: usize,
    /// A client must send its request headers within this many ms of connecting (and between
    /// keep-alive requests); then the connection is closed.
    pub header_timeout_ms: u64,
    /// Name reported in `/v1/models` and responses; empty: the model folder's name.
    pub model_id: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: String::new(),
            token_file: PathBuf::new(),
            allow_unauthenticated_remote: false,
            max_body_bytes: 1 << 20,
            max_concurrent: 16,
            max_tokens_limit: 2048,
            max_n: 4,
            max_concurrent_per_client: 8,
            max_connections: 256,
            header_timeout_ms: 10_000,
            model_id: String::new(),
        }
    }
}

impl ServerConfig {
    /// Checks the section on its own (the config file reports the first problem).
    pub fn validate(&self) -> std::result::Result<(), String> {
        let s = self;
        if s.max_concurrent == 0
            || s.max_body_bytes == 0
            || s.max_tokens_limit == 0
            || s.max_connections == 0
            || s.header_timeout_ms == 0
            || s.max_concurrent_per_client == 0
            || s.max_n == 0
        {
            return Err(
                "server.max_concurrent, max_concurrent_per_client, max_body_bytes, max_tokens_limit, max_n, max_connections and header_timeout_ms must be positive"
                    .into(),
            );
        }
        Ok(())
    }
}

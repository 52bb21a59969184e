//! The D-Bus interface `org.crayon.Crayon1` at `/org/crayon/Crayon1` (docs/dbus.md).
//!
//! Every method takes only basic types, strings and string arrays/dicts, so that `dbus-send` and
//! `busctl` can call all of them. Work runs on blocking threads through the same service (and fair
//! queue) as the socket and HTTP; the bus connection never waits on the model. Streamed tokens are
//! *unicast* signals to the caller only, so one app never sees another's text. State-changing
//! methods check the caller's credentials (root, the service user, or `dbus.group`) on top of the
//! bus policy.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use zbus::message::Header;
use zbus::names::{BusName, UniqueName};
use zbus::object_server::SignalEmitter;
use zbus::{Connection, fdo, interface};

use crate::adapters::{Example, Identity};
use crate::chat::Message;
use crate::error::{Error, Result};
use crate::generate::{CancelToken, GenerationParams, Prompt};
use crate::metrics::{Interface, Operation};
use crate::openai;
use crate::service::{Admitted, CustomizeRequest, Endpoint, Reply, Request, Service, Slot};
use serde::{Deserialize, Serialize};

pub const OBJECT_PATH: &str = "/org/crayon/Crayon1";
pub const INTERFACE: &str = "org.crayon.Crayon1";

/// Errors as scripts see them: `org.crayon.Crayon1.Error.<Name>` with a readable message.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.crayon.Crayon1.Error")]
pub enum DbusError {
    #[zbus(error)]
    ZBus(zbus::Error),
    InvalidRequest(String),
    NotFound(String),
    Busy(String),
    Cancelled(String),
    AccessDenied(String),
    Failed(String),
}

impl From<Error> for DbusError {
    /// The error name from the failure's [`crate::ErrorKind`] (the one classification).
    fn from(e: Error) -> Self {
        use crate::ErrorKind as K;
        let msg = e.to_string();
        match e.kind() {
            K::Invalid => DbusError::InvalidRequest(msg),
            K::NotFound => DbusError::NotFound(msg),
            K::Busy => DbusError::Busy(msg),
            K::Forbidden => DbusError::AccessDenied(msg),
            K::Cancelled => DbusError::Cancelled(msg),
            K::Unavailable | K::Internal => DbusError::Failed(msg),
        }
    }
}

type DResult<T> = std::result::Result<T, DbusError>;

impl From<fdo::Error> for DbusError {
    fn from(e: fdo::Error) -> Self {
        DbusError::ZBus(e.into())
    }
}

/// A streamed request: who started it (only they may cancel it) and how to stop it.
struct Running {
    sender: String,
    cancel: CancelToken,
}

pub struct Crayon1 {
    service: Arc<Service>,
    group_gid: Option<u32>,
    own_uid: u32,
    next_id: AtomicU64,
    running: Arc<Mutex<HashMap<u64, Running>>>,
}

impl Crayon1 {
    /// Root, the service user, or a member of `dbus.group` (by the bus's own view of the caller);
    /// returns who it is, for ownership of customizations.
    async fn authorize(&self, conn: &Connection, hdr: &Header<'_>, what: &str) -> DResult<Identity> {
        let sender = hdr.sender().ok_or_else(|| DbusError::AccessDenied("message without a sender".into()))?;
        let proxy = fdo::DBusProxy::new(conn).await?;
        let creds = proxy.get_connection_credentials(BusName::Unique(sender.clone())).await?;
        let uid = creds.unix_user_id();
        let groups = creds.unix_group_ids().cloned().unwrap_or_default();
        let ok = uid.is_some_and(|u| crate::access::may_use(u, &groups, self.own_uid, self.group_gid));
        if let (true, Some(uid)) = (ok, uid) {
            Ok(Identity::of_uid(uid, self.own_uid))
        } else {
            let uid = uid.map_or_else(|| "unknown".to_string(), |u| u.to_string());
            tracing::warn!(%uid, sender = %sender, what, "dbus: caller not allowed");
            Err(DbusError::AccessDenied(format!(
                "{what} needs root, the service user or membership of the service group (caller uid {uid})"
            )))
        }
    }

    /// The typed, admitted request of a `Generate` call, within the input budget; a refusal is counted
    /// as the service counts its own.
    fn typed_request(&self, prompt: &str, options: &HashMap<String, String>) -> DResult<Admitted> {
        self.service.check_size(Interface::dbus, Operation::generate, prompt.len() + option_bytes(options))?;
        let r = request_from_options(prompt, options, self.service.defaults());
        let r = r.inspect_err(|e| self.service.refused(Interface::dbus, Operation::generate, e.kind()))?;
        Ok(self.service.admit(Interface::dbus, r)?)
    }

    /// Runs `f(service, slot, client)` on a blocking thread with a slot of `client` (the caller's bus
    /// connection, [`client_key`]); a panic becomes an error.
    async fn blocking<T: Send + 'static>(
        &self,
        client: String,
        f: impl FnOnce(&Service, &Slot, &str) -> Result<T> + Send + 'static,
    ) -> DResult<T> {
        let permit = self.service.try_slot(Interface::dbus, &client)?;
        let service = self.service.clone();
        let joined = tokio::task::spawn_blocking(move || f(&service, &permit, &client)).await;
        match joined {
            Ok(r) => r.map_err(DbusError::from),
            Err(_) => Err(DbusError::Failed("internal error: the request handler panicked".into())),
        }
    }
}

/// The option keys of `Generate` and `GenerateStreamed` (docs/dbus.md).
const OPTION_KEYS: &str = "system, max_tokens, temperature, top_p, top_k, seed, adapter, choices, normalization, \
                           calibration, confidence, route, context, pot_tokens, keep_tokens";

/// The typed request of a `Generate` / `GenerateStreamed` call: the prompt as one user message and
/// the `a{ss}` options straight into the parameters, over `defaults`. The service checks the result
/// as it checks every interface's requests.
pub fn request_from_options(
    prompt: &str,
    options: &HashMap<String, String>,
    defaults: GenerationParams,
) -> Result<Request> {
    let mut messages = Vec::new();
    if let Some(system) = options.get("system") {
        messages.push(Message::new("system", system.as_str()));
    }
    messages.push(Message::new("user", prompt));
    let mut r = Request::new(Endpoint::Chat, Prompt::Chat(messages), defaults);
    for (k, v) in options {
        let bad = |what: &str| Error::InvalidRequest(format!("option {k}='{v}': {what}"));
        let count = || v.parse::<u64>().map_err(|_| bad("not a non-negative integer"));
        let size = || count().map(|n| usize::try_from(n).unwrap_or(usize::MAX));
        let number = || v.parse::<f32>().ok().filter(|x| x.is_finite()).ok_or_else(|| bad("not a finite number"));
        let p = &mut r.params;
        match k.as_str() {
            "system" => {}
            "max_tokens" => p.max_new_tokens = size()?,
            "top_k" => p.sampling.top_k = size()?,
            "seed" => p.sampling.seed = Some(count()?),
            "temperature" => p.sampling.temperature = number()?,
            "top_p" => p.sampling.top_p = number()?,
            "adapter" => p.adapter = Some(v.clone()),
            // A JSON array of strings for options that contain '|', else '|'-separated.
            "choices" => {
                p.choices = match v.trim_start().starts_with('[') {
                    true => serde_json::from_str(v).map_err(|_| bad("not a JSON array of strings"))?,
                    false => v.split('|').map(|c| c.trim().to_string()).collect(),
                }
            }
            "normalization" => p.choice_scoring.normalization = Some(named(v).map_err(|e| bad(&e))?),
            "calibration" => p.choice_scoring.calibration = Some(named(v).map_err(|e| bad(&e))?),
            "confidence" => p.choice_scoring.confidence = Some(named(v).map_err(|e| bad(&e))?),
            "context" => p.context.policy = Some(named(v).map_err(|e| bad(&e))?),
            "pot_tokens" => p.context.pot_tokens = Some(size()?),
            "keep_tokens" => p.context.keep_tokens = Some(size()?),
            "route" => r.overrides.mode = Some(named(v).map_err(|e| bad(&e))?),
            _ => return Err(Error::InvalidRequest(format!("unknown option '{k}' (known: {OPTION_KEYS})"))),
        }
    }
    Ok(r)
}

/// One of a setting's names (`"mean"`, `"device_only"`...), as the config and the HTTP API spell them.
fn named<T: serde::de::DeserializeOwned>(v: &str) -> std::result::Result<T, String> {
    serde_json::from_value(Value::String(v.to_string())).map_err(|e| e.to_string())
}

/// The bytes a call's arguments hold (the input budget, [`Service::check_size`]).
fn option_bytes(options: &HashMap<String, String>) -> usize {
    options.iter().map(|(k, v)| k.len() + v.len()).sum()
}

/// What a streamed request sends its caller, in order: the signals `Token`, then `Finished` or `Failed`.
enum Streamed {
    Token(String),
    Finished(Box<Reply>),
    Failed { name: String, message: String },
}

/// The pieces of an answer a D-Bus caller gets: the text, and everything else as JSON (finish reason,
/// usage, the `crayon` object, the model).
fn split_reply(reply: &Reply) -> (String, String) {
    let Some(first) = reply.first() else { return (String::new(), "{}".into()) };
    let a = &first.answer;
    let info = json!({
        "finish_reason": openai::finish_reason(a.finish_reason),
        "usage": openai::usage(a),
        "crayon": openai::extension(first),
        "model": reply.model,
    });
    (a.text.clone(), info.to_string())
}

#[interface(name = "org.crayon.Crayon1")]
impl Crayon1 {
    /// Generate(prompt, options a{ss}) -> (text, info JSON). Blocks until the answer is complete.
    async fn generate(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        prompt: String,
        options: HashMap<String, String>,
    ) -> std::result::Result<(String, String), DbusError> {
        let request = self.typed_request(&prompt, &options)?;
        let client = client_key(&hdr);
        let reply = self
            .blocking(client, move |s, slot, client| {
                s.answer(slot, client, request, &CancelToken::new(), &mut |_, _| ControlFlow::Continue(()))
            })
            .await?;
        Ok(split_reply(&reply))
    }

    /// GenerateStreamed(prompt, options a{ss}) -> request id. The answer arrives as `Token(id, text)`
    /// signals, then `Finished(id, text, info)` or `Failed(id, error_name, message)`, sent to the caller
    /// only. Cancel(id) stops it; so does the caller leaving the bus.
    async fn generate_streamed(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        prompt: String,
        options: HashMap<String, String>,
    ) -> std::result::Result<u64, DbusError> {
        let request = self.typed_request(&prompt, &options)?;
        let sender = hdr.sender().map(|s| s.to_string()).ok_or_else(|| DbusError::Failed("no sender".into()))?;
        // Signals go out in order from one task, unicast to the caller through the interface's
        // generated signal methods; the model thread never waits on the bus.
        let emitter = SignalEmitter::new(conn, OBJECT_PATH)
            .map_err(|e| DbusError::Failed(e.to_string()))?
            .set_destination(BusName::try_from(sender.clone()).map_err(|e| DbusError::Failed(e.to_string()))?)
            .to_owned();
        let permit = self.service.try_slot(Interface::dbus, &client_key(&hdr))?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let cancel = CancelToken::new();
        lock(&self.running).insert(id, Running { sender: sender.clone(), cancel: cancel.clone() });
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Streamed>();
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                let r = match event {
                    Streamed::Token(text) => Crayon1::token(&emitter, id, &text).await,
                    Streamed::Finished(reply) => {
                        let (text, info) = split_reply(&reply);
                        Crayon1::finished(&emitter, id, &text, &info).await
                    }
                    Streamed::Failed { name, message } => Crayon1::failed(&emitter, id, &name, &message).await,
                };
                if let Err(e) = r {
                    tracing::debug!(error = %e, "dbus: signal not sent");
                }
            }
        });
        let service = self.service.clone();
        let running = self.running.clone();
        let client = client_key(&hdr);
        tokio::task::spawn_blocking(move || {
            let mut on_text = |_: usize, t: &str| {
                if !t.is_empty() {
                    let _ = tx.send(Streamed::Token(t.to_string()));
                }
                ControlFlow::Continue(())
            };
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                service.answer(&permit, &client, request, &cancel, &mut on_text)
            }))
            .unwrap_or_else(|_| Err(Error::Internal("the request handler panicked".into())));
            let r = match r {
                Ok(_) if cancel.is_cancelled() => Err(Error::Cancelled),
                other => other,
            };
            lock(&running).remove(&id);
            drop(permit); // free the slot before the caller can see the end
            let _ = match r {
                Ok(reply) => tx.send(Streamed::Finished(Box::new(reply))),
                Err(e) => {
                    let message = e.to_string();
                    tx.send(Streamed::Failed { name: error_name(&DbusError::from(e)), message })
                }
            };
        });
        Ok(id)
    }

    /// Cancel(id): stops a streamed request the caller started. Unknown or finished ids are ignored.
    async fn cancel(&self, #[zbus(header)] hdr: Header<'_>, id: u64) -> std::result::Result<(), DbusError> {
        let sender = hdr.sender().map(|s| s.to_string()).unwrap_or_default();
        match lock(&self.running).get(&id) {
            Some(r) if r.sender == sender => r.cancel.cancel(),
            Some(_) => return Err(DbusError::AccessDenied(format!("request {id} belongs to another caller"))),
            None => {}
        }
        Ok(())
    }

    /// Chat(request JSON) -> response JSON: the full OpenAI chat-completions body with the `crayon`
    /// extension (docs/http.md), for callers that need every option.
    async fn chat(&self, #[zbus(header)] hdr: Header<'_>, request: String) -> std::result::Result<String, DbusError> {
        // The OpenAI body becomes the service's typed request here, as HTTP's does.
        self.service.check_size(Interface::dbus, Operation::generate, request.len())?;
        let parsed =
            openai::parse_request(Endpoint::Chat, openai::Body::Bytes(request.as_bytes()), self.service.defaults());
        let (typed, _) =
            parsed.inspect_err(|e| self.service.refused(Interface::dbus, Operation::generate, e.kind()))?;
        let typed = self.service.admit(Interface::dbus, typed)?;
        let client = client_key(&hdr);
        let reply = self
            .blocking(client, move |s, slot, client| {
                s.answer(slot, client, typed, &CancelToken::new(), &mut |_, _| ControlFlow::Continue(()))
            })
            .await?;
        Ok(openai::full_response(&reply).to_string())
    }

    /// Customize(name, inputs as, outputs as) -> (adapter name, weights a{sd} by pool adapter).
    /// The examples stay on this device; only their embeddings are kept.
    async fn customize(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        name: String,
        inputs: Vec<String>,
        outputs: Vec<String>,
    ) -> std::result::Result<(String, HashMap<String, f64>), DbusError> {
        let identity = self.authorize(conn, &hdr, "Customize").await?;
        if inputs.len() != outputs.len() {
            return Err(DbusError::InvalidRequest(format!(
                "{} inputs but {} outputs: give one output per input",
                inputs.len(),
                outputs.len()
            )));
        }
        let size = name.len() + inputs.iter().chain(&outputs).map(String::len).sum::<usize>();
        self.service.check_size(Interface::dbus, Operation::customize, size)?;
        let examples = inputs.into_iter().zip(outputs).map(|(input, output)| Example { input, output }).collect();
        let request = CustomizeRequest { name, examples, calibrate: false, choices: Vec::new() };
        let client = client_key(&hdr);
        let done = self
            .blocking(client, move |s, _, client| {
                s.customize(Interface::dbus, &identity, client, request, &CancelToken::new())
            })
            .await?;
        let c = done.customization;
        let weights = c.adapters.into_iter().zip(c.weights.iter().map(|&w| f64::from(w))).collect();
        Ok((c.name, weights))
    }

    /// ListAdapters() -> names of the saved adapters.
    async fn list_adapters(&self) -> Vec<String> {
        self.service.catalog().iter().filter_map(|a| a["name"].as_str().map(String::from)).collect()
    }

    /// AdaptersJson() -> the saved adapters with their pool, weights and calibration, as JSON.
    async fn adapters_json(&self) -> String {
        Value::Array(self.service.catalog()).to_string()
    }

    /// RemoveAdapter(name).
    async fn remove_adapter(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        name: String,
    ) -> std::result::Result<(), DbusError> {
        let identity = self.authorize(conn, &hdr, "RemoveAdapter").await?;
        let client = client_key(&hdr);
        self.blocking(client, move |s, _, client| {
            s.remove(Interface::dbus, &identity, client, &name, &CancelToken::new())
        })
        .await?;
        Ok(())
    }

    /// StatusJson() -> everything `Status` properties hold and more, as JSON.
    async fn status_json(&self) -> String {
        serde_json::to_string(&self.service.status()).unwrap_or_default()
    }

    /// Metrics() -> the OpenMetrics exposition, as HTTP `GET /metrics` serves it.
    async fn metrics(&self) -> String {
        self.service.metrics_text()
    }

    // Properties: the version never changes while the daemon runs ("const"); the model, provider,
    // pool and route mode change on a reload (SIGHUP) and the counters with every request, all read
    // on demand, so they announce no change signal ("false") and caching clients such as GDBus fetch
    // them instead of showing stale values.
    #[zbus(property(emits_changed_signal = "const"))]
    async fn version(&self) -> String {
        crate::VERSION.to_string()
    }

    #[zbus(property(emits_changed_signal = "false"))]
    async fn model(&self) -> String {
        self.service.status().model
    }

    #[zbus(property(emits_changed_signal = "false"))]
    async fn execution_provider(&self) -> String {
        self.service.status().provider
    }

    #[zbus(property(emits_changed_signal = "false"))]
    async fn pool_id(&self) -> String {
        self.service.status().pool_id.unwrap_or_default()
    }

    #[zbus(property(emits_changed_signal = "false"))]
    async fn route_mode(&self) -> String {
        self.service.status().route_mode.to_string()
    }

    #[zbus(property(emits_changed_signal = "false"))]
    async fn requests(&self) -> u64 {
        self.service.status().requests
    }

    #[zbus(property(emits_changed_signal = "false"))]
    async fn offloaded(&self) -> u64 {
        self.service.status().offloaded
    }

    #[zbus(property(emits_changed_signal = "false"))]
    async fn in_flight(&self) -> u64 {
        self.service.in_flight() as u64
    }

    #[zbus(property(emits_changed_signal = "false"))]
    async fn rejected_busy(&self) -> u64 {
        self.service.status().rejected_busy
    }

    /// Requests the server failed and the device answered itself.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn fallbacks(&self) -> u64 {
        self.service.status().fallbacks
    }

    /// Requests that ended in an error (the `Failed` signal is per request).
    #[zbus(property(emits_changed_signal = "false"))]
    async fn failed_requests(&self) -> u64 {
        self.service.status().failed
    }

    #[zbus(property(emits_changed_signal = "false"))]
    async fn cancelled_requests(&self) -> u64 {
        self.service.status().cancelled
    }

    /// Requests waiting for the model.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn queued(&self) -> u64 {
        self.service.status().queued as u64
    }

    /// Whether the circuit breaker currently sends everything to the device.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn breaker_open(&self) -> bool {
        self.service.status().breaker_open
    }

    /// The daemon's resident memory, in bytes (0 where /proc is not available).
    #[zbus(property(emits_changed_signal = "false"))]
    async fn resident_bytes(&self) -> u64 {
        crate::metrics::resident_bytes().map_or(0, |b| b as u64)
    }

    #[zbus(signal)]
    async fn token(emitter: &SignalEmitter<'_>, id: u64, text: &str) -> zbus::Result<()>;

    #[zbus(signal)]
    async fn finished(emitter: &SignalEmitter<'_>, id: u64, text: &str, info: &str) -> zbus::Result<()>;

    #[zbus(signal)]
    async fn failed(emitter: &SignalEmitter<'_>, id: u64, error: &str, message: &str) -> zbus::Result<()>;
}

fn error_name(e: &DbusError) -> String {
    let n = match e {
        DbusError::ZBus(_) | DbusError::Failed(_) => "Failed",
        DbusError::InvalidRequest(_) => "InvalidRequest",
        DbusError::NotFound(_) => "NotFound",
        DbusError::Busy(_) => "Busy",
        DbusError::Cancelled(_) => "Cancelled",
        DbusError::AccessDenied(_) => "AccessDenied",
    };
    format!("{INTERFACE}.Error.{n}")
}

/// Queue fairness per bus connection.
fn client_key(hdr: &Header<'_>) -> String {
    format!("dbus:{}", hdr.sender().map(UniqueName::as_str).unwrap_or("?"))
}

/// The start-up error when another connection owns the name: who it is, so that the operator can
/// find the other instance.
async fn name_taken(proxy: &fdo::DBusProxy<'_>, config: &DbusConfig) -> Error {
    let owner = match BusName::try_from(config.name.as_str()) {
        Ok(name) => proxy.get_name_owner(name).await.ok(),
        Err(_) => None,
    };
    let who = match owner {
        Some(unique) => {
            let pid = proxy.get_connection_unix_process_id(BusName::Unique(unique.clone().into())).await.ok();
            match pid {
                Some(pid) => format!("{unique} (pid {pid})"),
                None => unique.to_string(),
            }
        }
        None => "another connection".into(),
    };
    Error::Config {
        path: "dbus.name".into(),
        msg: format!(
            "{} is already owned on bus '{}' by {who}: another crayond is running (stop it first, or give this one another dbus.name)",
            config.name, config.bus
        ),
    }
}

/// How often the daemon checks that its bus still accepts connections.
const BUS_CHECK: std::time::Duration = std::time::Duration::from_secs(2);

/// Forwards a `NameLost` for `name`, or the end of the signal stream, as the reason the daemon no
/// longer serves.
fn watch_name_loss(mut stream: fdo::NameLostStream, name: String, tx: tokio::sync::mpsc::Sender<String>) {
    tokio::spawn(async move {
        use tokio_stream::StreamExt;
        let why = loop {
            match stream.next().await {
                Some(sig) => match sig.args() {
                    Ok(args) if args.name().as_str() == name => break format!("lost the D-Bus name {name}"),
                    _ => continue,
                },
                None => break "the D-Bus connection closed".to_string(),
            }
        };
        let _ = tx.try_send(why);
    });
}

/// Watches, from a thread of its own, that the bus at a `unix:path=` address still accepts
/// connections. When a bus daemon dies, zbus leaves the connection's streams and calls pending (and
/// can block the runtime thread that polls them), so the loss is checked outside zbus: a plain
/// connect to the bus socket, dropped at once, every [`BUS_CHECK`].
fn watch_bus_socket(bus: &str, tx: tokio::sync::mpsc::Sender<String>) {
    let Some(path) = bus_socket(bus) else { return };
    let spawned = std::thread::Builder::new().name("crayon-dbus-watch".into()).spawn(move || {
        while !tx.is_closed() {
            std::thread::sleep(BUS_CHECK);
            if let Err(e) = std::os::unix::net::UnixStream::connect(&path) {
                let _ = tx.try_send(format!("the D-Bus bus at {} is gone ({e})", path.display()));
                return;
            }
        }
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "dbus: cannot start the bus watcher");
    }
}

/// The socket file of a bus address (`system`, `session` or an address), when it is a `unix:path=`.
fn bus_socket(bus: &str) -> Option<std::path::PathBuf> {
    let address = match bus {
        "system" => {
            std::env::var("DBUS_SYSTEM_BUS_ADDRESS").unwrap_or_else(|_| "unix:path=/run/dbus/system_bus_socket".into())
        }
        "session" => std::env::var("DBUS_SESSION_BUS_ADDRESS").ok()?,
        a => a.to_string(),
    };
    let first = address.split(';').next()?;
    let params = first.strip_prefix("unix:")?;
    params.split(',').find_map(|kv| kv.strip_prefix("path=")).map(std::path::PathBuf::from)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The served interface: keep it alive for as long as the name should be owned.
pub struct DbusServer {
    pub connection: Connection,
    running: Arc<Mutex<HashMap<u64, Running>>>,
    /// Says why when the name is lost or the bus goes away ([`DbusServer::lost`]).
    lost: tokio::sync::mpsc::Receiver<String>,
}

impl DbusServer {
    /// Connects to `config.bus`, serves the interface and owns `config.name`. Must run inside the
    /// tokio runtime.
    pub async fn start(service: Arc<Service>, config: &DbusConfig) -> Result<DbusServer> {
        let iface = Crayon1 {
            service,
            group_gid: crate::socket::group_gid(&config.group),
            own_uid: unsafe { libc::geteuid() },
            next_id: AtomicU64::new(0),
            running: Arc::new(Mutex::new(HashMap::new())),
        };
        let running = iface.running.clone();
        let bus_err = |e: zbus::Error| Error::Config {
            path: "dbus.bus".into(),
            msg: format!("cannot use bus '{}' as {}: {e}", config.bus, config.name),
        };
        let builder = match config.bus.as_str() {
            "system" => zbus::connection::Builder::system(),
            "session" => zbus::connection::Builder::session(),
            addr => zbus::connection::Builder::address(addr),
        }
        .map_err(bus_err)?;
        let connection = builder.serve_at(OBJECT_PATH, iface).map_err(bus_err)?.build().await.map_err(bus_err)?;
        let proxy = fdo::DBusProxy::new(&connection).await.map_err(bus_err)?;
        // Watched before the name is requested, so that no loss can slip between the two.
        let lost_stream = proxy.receive_name_lost().await.map_err(bus_err)?;
        // One instance per name: never take the name from a running crayond (zbus's default flags
        // would, leaving it serving nothing), and never let another take it from us.
        match connection.request_name_with_flags(config.name.as_str(), fdo::RequestNameFlags::DoNotQueue.into()).await {
            Ok(_) => {}
            Err(zbus::Error::NameTaken) => return Err(name_taken(&proxy, config).await),
            Err(e) => return Err(bus_err(e)),
        }
        let (tx, lost) = tokio::sync::mpsc::channel(2);
        watch_name_loss(lost_stream, config.name.clone(), tx.clone());
        watch_bus_socket(&config.bus, tx);
        let server = DbusServer { connection, running, lost };
        server.watch_departures().await;
        Ok(server)
    }

    /// Resolves, with the reason, when this daemon no longer owns its name (the bus took it back,
    /// the connection closed, the bus died): the daemon must then exit with an error, so that systemd
    /// restarts it. Its D-Bus connection may then be wedged: do not call on it any more.
    pub async fn lost(&mut self) -> String {
        match self.lost.recv().await {
            Some(why) => why,
            None => std::future::pending().await, // no watcher left: nothing more to report
        }
    }

    /// Cancels a caller's streamed requests when it leaves the bus.
    async fn watch_departures(&self) {
        let Ok(proxy) = fdo::DBusProxy::new(&self.connection).await else { return };
        let Ok(mut changes) = proxy.receive_name_owner_changed().await else { return };
        let running = self.running.clone();
        tokio::spawn(async move {
            use tokio_stream::StreamExt;
            while let Some(sig) = changes.next().await {
                let Ok(args) = sig.args() else { continue };
                if args.new_owner().is_none() {
                    let gone = args.name().to_string();
                    for r in lock(&running).values().filter(|r| r.sender == gone) {
                        r.cancel.cancel();
                    }
                }
            }
        });
    }

    /// Streamed requests still running.
    pub fn running(&self) -> usize {
        lock(&self.running).len()
    }
}

/// The D-Bus interface `org.crayon.Crayon1` (`docs/dbus.md`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DbusConfig {
    /// "system", "session", a bus address ("unix:path=..."), or empty: no D-Bus (`crayond --dbus`).
    pub bus: String,
    /// Well-known name to own.
    pub name: String,
    /// Group whose members may call state-changing methods (Customize, RemoveAdapter) besides root
    /// and the service's own user. The bus policy is the first gate; this check is the second.
    pub group: String,
}

impl Default for DbusConfig {
    fn default() -> Self {
        DbusConfig { bus: String::new(), name: "org.crayon.Crayon1".into(), group: "crayon".into() }
    }
}

impl DbusConfig {
    /// Checks the section on its own (the config file reports the first problem).
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !self.bus.is_empty() && zbus::names::WellKnownName::try_from(self.name.as_str()).is_err() {
            return Err(format!("dbus.name '{}' is not a valid well-known bus name", self.name));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn request(pairs: &[(&str, &str)]) -> Result<Request> {
        let defaults = GenerationParams::from_config(&crate::config::GenerationConfig::default());
        request_from_options("hi", &options(pairs), defaults)
    }

    /// `a{ss}` options go straight into the typed request's parameters (no JSON body in between).
    #[test]
    fn options_become_the_requests_parameters() {
        use crate::context::ContextPolicy;
        let r = request(&[("context", "infinipot"), ("pot_tokens", "1024"), ("keep_tokens", "512")]).unwrap();
        assert_eq!(r.params.context.policy, Some(ContextPolicy::Infinipot));
        assert_eq!((r.params.context.pot_tokens, r.params.context.keep_tokens), (Some(1024), Some(512)));
        let r = request(&[("max_tokens", "7"), ("temperature", "0"), ("choices", "A|B"), ("route", "device_only")])
            .unwrap();
        assert_eq!(r.params.max_new_tokens, 7);
        assert_eq!(r.params.sampling.temperature, 0.0);
        assert_eq!(r.params.choices, ["A", "B"]);
        assert_eq!(r.overrides.mode, Some(crate::config::RouteMode::DeviceOnly));
        let r = request(&[("system", "Be brief."), ("normalization", "mean")]).unwrap();
        assert!(matches!(&r.prompts[0], Prompt::Chat(m) if m.len() == 2));
        for (k, v, says) in [
            ("pot_tokens", "lots", "pot_tokens='lots'"),
            ("temperature", "NaN", "not a finite number"),
            ("route", "sideways", "route='sideways'"),
            ("colour", "red", "unknown option 'colour'"),
        ] {
            let err = request(&[(k, v)]).err().unwrap_or_else(|| panic!("{k}={v} accepted"));
            assert!(err.to_string().contains(says), "{err}");
        }
    }
}

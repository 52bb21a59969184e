//! Configuration: `/etc/crayon/crayon.toml` (or `--config`), every key optional with a documented
//! default (see `docs/config.md` and `config/crayon.toml`). Unknown keys are rejected so that a typo
//! never silently falls back to a default. Relative paths are resolved against the config file's folder.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
// Subsystems own their sections; this module composes them.
pub use crate::runtime::RuntimeConfig;

/// Where the service looks when no `--config` / `CRAYON_CONFIG` is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/crayon/crayon.toml";

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub model: ModelConfig,
    pub runtime: RuntimeConfig,
    pub generation: GenerationConfig,
    pub choices: crate::choices::ChoicesConfig,
    pub context: crate::context::ContextConfig,
    pub pool: PoolConfig,
    pub blend: crate::pool::blend::BlendConfig,
    pub adapters: AdaptersConfig,
    pub router: RouterConfig,
    pub remote: RemoteConfig,
    pub server: ServerConfig,
    pub socket: SocketConfig,
    pub dbus: DbusConfig,
    pub service: ServiceConfig,
}

/// How a request chooses between the device model and the server (`docs/routing.md`).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum RouteMode {
    /// Never leave the device (the default: nothing is sent anywhere unless asked for).
    #[default]
    DeviceOnly,
    /// Scope and confidence decide (needs `[remote] url`).
    Hybrid,
    /// Always ask the server; the device answers only when the server fails.
    ServerOnly,
}

/// Routing thresholds (each overridable per request, and calibratable per adapter from its examples).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Thresholds {
    /// Scope below this (cosine of the query to its nearest example, in [-1, 1]): out of scope.
    pub min_scope: f32,
    /// Choice questions: a confidence (`[choices] confidence`: consensus probability of the chosen
    /// option by default, or the probability margin) below this is low confidence. `min_margin` is
    /// read as an alias (configurations and stored adapters before the consensus measure).
    #[serde(alias = "min_margin")]
    pub min_choice_confidence: f32,
    /// Free text: a geometric-mean token probability below this is low confidence.
    pub min_token_prob: f32,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds { min_scope: 0.2, min_choice_confidence: 0.3, min_token_prob: 0.5 }
    }
}

impl Thresholds {
    pub fn validate(&self, section: &str) -> std::result::Result<(), String> {
        let in_range = |v: f32, lo: f32| v.is_finite() && (lo..=1.0).contains(&v);
        if !in_range(self.min_scope, -1.0) {
            return Err(format!("{section}.min_scope must be in [-1, 1], got {}", self.min_scope));
        }
        if !in_range(self.min_choice_confidence, 0.0) || !in_range(self.min_token_prob, 0.0) {
            return Err(format!(
                "{section}.min_choice_confidence and min_token_prob must be in [0, 1], got {} and {}",
                self.min_choice_confidence, self.min_token_prob
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RouterConfig {
    pub mode: RouteMode,
    #[serde(flatten)]
    pub thresholds: Thresholds,
    /// Use an adapter's thresholds calibrated from its examples (`customize --calibrate`) when it has them.
    pub use_calibrated: bool,
}

/// What kind of server a device offloads to, which decides how a customized request's blend travels
/// (`docs/routing.md`).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RemoteKind {
    /// A server `crayond`: the `crayon` extension carries pool id, blend weights and answer options.
    #[default]
    Crayon,
    /// Any OpenAI-compatible server: plain requests, no blend.
    Openai,
    /// llama.cpp's `llama-server` with the server pool loaded as GGUF LoRA adapters
    /// (`scripts/build-llama-server`): the blend travels as per-request adapter scales.
    LlamaServer,
    /// vLLM with Crayon's LoRA resolver plugin (`onnx-export/crayon_pool/vllm_blend.py`): the blend is
    /// named in `model` (`crayon-blend.<pool id>.<weights>`) and materialized on the vLLM host.
    Vllm,
}

/// The server a device offloads to: any OpenAI-compatible `/v1/chat/completions` endpoint; a Crayon
/// server also understands the `crayon` extension (pool id and blend weights), a llama.cpp server
/// per-request LoRA scales.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RemoteConfig {
    /// Base URL, e.g. "https://llm.example.com" or "http://127.0.0.1:8090"; empty: no server.
    pub url: String,
    /// The server's kind: "crayon" (default), "openai", "llama-server" or "vllm".
    pub kind: RemoteKind,
    /// File holding the bearer token (first line); empty: no Authorization header.
    pub token_file: PathBuf,
    /// PEM file of the CA(s) to trust for an https:// server instead of the built-in web roots.
    pub ca_file: PathBuf,
    /// `model` sent to the server; empty: "default".
    pub model: String,
    /// Send the blend for customized requests (as the kind says); off: every request asks the plain model.
    pub send_blend: bool,
    pub connect_timeout_ms: u64,
    /// Hard limit on the whole request, retries included, from connecting to the last byte of the
    /// body (a slow drip ends here); past it the device answers itself.
    pub timeout_ms: u64,
    /// Further attempts after a failed one (connection errors, timeouts, 5xx, bad bodies).
    pub retries: u32,
    pub retry_backoff_ms: u64,
    /// Consecutive failed requests that open the circuit breaker (0: never open).
    pub breaker_failures: u32,
    /// How long an open breaker sends everything to the device before trying the server again.
    pub breaker_cooldown_ms: u64,
    /// Largest response body accepted.
    pub max_response_bytes: u64,
}

impl Default for RemoteConfig {
    fn default() -> Self {
        RemoteConfig {
            url: String::new(),
            kind: RemoteKind::Crayon,
            token_file: PathBuf::new(),
            ca_file: PathBuf::new(),
            model: String::new(),
            send_blend: true,
            connect_timeout_ms: 2000,
            timeout_ms: 60_000,
            retries: 1,
            retry_backoff_ms: 200,
            breaker_failures: 3,
            breaker_cooldown_ms: 30_000,
            max_response_bytes: 4 << 20,
        }
    }
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

/// How the daemon starts and stops.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceConfig {
    /// On SIGTERM, how long in-flight requests may take to finish before the daemon exits anyway.
    pub drain_timeout_ms: u64,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig { drain_timeout_ms: 30_000 }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Adapter pool folder written by `crayon_pool` (holds `pool.json`); empty: customization is off.
    pub dir: PathBuf,
    /// A server's exemplar bank for a device pool it cannot merge (`crayon_pool exemplars`): devices'
    /// blends for that pool are answered with exemplars drawn by the blend weights in front of the
    /// question (docs/routing.md). On a device, its own pool's bank: the device does the same for a
    /// server that cannot apply the blend (`remote.kind` openai, or llama-server without the adapters).
    /// Empty: none.
    pub exemplars: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdaptersConfig {
    /// Where customized adapters are persisted (`<state_dir>/adapters/<name>.json`).
    pub state_dir: PathBuf,
    /// Memory for customized models kept ready, in MiB (each is counted as 3x its merged weights:
    /// ~1.2 GiB for SmolLM2-135M); the least recently used is dropped beyond it (the newest is
    /// always kept).
    pub cache_mb: usize,
    /// Also store the examples themselves in the state directory (off: only their SHA-256).
    pub store_examples: bool,
    /// Threads computing merged weights; 0: all available cores.
    pub merge_threads: usize,
    /// A customization can be replaced or removed only by the client identity that made it (its uid,
    /// or tokenless local HTTP) or an admin (root, the service user, an HTTP token holder); others
    /// see it read-only. `false`: every allowed client may change every customization.
    pub owner_only: bool,
}

impl Default for AdaptersConfig {
    fn default() -> Self {
        AdaptersConfig {
            state_dir: PathBuf::from("/var/lib/crayon"),
            cache_mb: 4096,
            store_examples: false,
            merge_threads: 0,
            owner_only: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Model folder written by `crayon-export` (holds `crayon_model.json`).
    pub dir: PathBuf,
    /// Longest sequence (prompt + generated tokens) a request may use; 0 = the model's own context
    /// (`max_position_embeddings`). The KV cache grows with each request's length, so a long limit
    /// costs memory only while a long request runs (`crayond --check` prints the cost).
    pub max_context: usize,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig { dir: PathBuf::from("/usr/share/crayon/models/smollm2-135m-instruct-q4"), max_context: 0 }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GenerationConfig {
    /// Tokens generated at most when a request does not say.
    pub max_new_tokens: usize,
    /// 0 means greedy decoding.
    pub temperature: f32,
    /// Keep only the k most likely tokens before sampling; 0 disables.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p; 1.0 disables.
    pub top_p: f32,
    /// Seed for sampling; absent: a fresh random seed per request.
    pub seed: Option<u64>,
    /// Strings that end generation (not included in the answer).
    pub stop: Vec<String>,
    /// System prompt for chat requests that bring none; empty: the model's template default.
    pub system_prompt: String,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            max_new_tokens: 256,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: None,
            stop: Vec::new(),
            system_prompt: String::new(),
        }
    }
}

/// A bearer token from the first line of `path` (`key` names the setting in errors); `None` when no
/// file is configured. An unreadable or empty file is a configuration error.
pub fn read_token(path: &Path, key: &str) -> Result<Option<String>> {
    if path.as_os_str().is_empty() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Config { path: path.to_path_buf(), msg: format!("{key} cannot be read: {e}") })?;
    let token = text.lines().next().unwrap_or("").trim();
    if token.is_empty() {
        return Err(Error::Config { path: path.to_path_buf(), msg: format!("{key} is empty") });
    }
    Ok(Some(token.to_string()))
}

impl RouteMode {
    pub fn name(self) -> &'static str {
        match self {
            RouteMode::DeviceOnly => "device_only",
            RouteMode::Hybrid => "hybrid",
            RouteMode::ServerOnly => "server_only",
        }
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config { path: path.to_path_buf(), msg: format!("cannot read it: {e}") })?;
        // Absolute, so that paths stay valid whatever the working directory of later users.
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let base = std::path::absolute(parent).unwrap_or_else(|_| parent.to_path_buf());
        Config::parse(&text, &base).map_err(|msg| Error::Config { path: path.to_path_buf(), msg })
    }

    /// Parses TOML text; relative paths are taken relative to `base`.
    pub fn parse(text: &str, base: &Path) -> std::result::Result<Config, String> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())?;
        cfg.resolve_paths(base);
        cfg.validate()?;
        Ok(cfg)
    }

    /// The file to read: an explicit path, else `$CRAYON_CONFIG`, else the system path if it exists.
    pub fn locate(explicit: Option<&Path>) -> Option<PathBuf> {
        if let Some(p) = explicit {
            return Some(p.to_path_buf());
        }
        if let Some(p) = std::env::var_os("CRAYON_CONFIG").filter(|p| !p.is_empty()) {
            return Some(PathBuf::from(p));
        }
        let system = Path::new(DEFAULT_CONFIG_PATH);
        system.exists().then(|| system.to_path_buf())
    }

    fn resolve_paths(&mut self, base: &Path) {
        for p in [
            &mut self.model.dir,
            &mut self.runtime.ort_library,
            &mut self.runtime.profile,
            &mut self.pool.dir,
            &mut self.pool.exemplars,
            &mut self.adapters.state_dir,
            &mut self.remote.token_file,
            &mut self.remote.ca_file,
            &mut self.server.token_file,
            &mut self.socket.path,
        ] {
            if !p.as_os_str().is_empty() && p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        self.choices.validate()?;
        self.context.validate()?;
        let g = &self.generation;
        if !(g.temperature.is_finite() && g.temperature >= 0.0) {
            return Err(format!("generation.temperature must be >= 0, got {}", g.temperature));
        }
        if !(g.top_p > 0.0 && g.top_p <= 1.0) {
            return Err(format!("generation.top_p must be in (0, 1], got {}", g.top_p));
        }
        if g.max_new_tokens == 0 {
            return Err("generation.max_new_tokens must be at least 1".into());
        }
        if self.model.max_context == 1 {
            return Err("model.max_context must be 0 (the model's own context) or at least 2, got 1".into());
        }
        if g.stop.iter().any(String::is_empty) {
            return Err("generation.stop must not contain empty strings".into());
        }
        self.blend.validate()?;
        self.router.thresholds.validate("router")?;
        let r = &self.remote;
        if !(r.url.is_empty() || r.url.starts_with("http://") || r.url.starts_with("https://")) {
            return Err(format!("remote.url must start with http:// or https://, got '{}'", r.url));
        }
        if self.router.mode != RouteMode::DeviceOnly && r.url.is_empty() {
            return Err(format!("router.mode = \"{}\" needs remote.url", self.router.mode.name()));
        }
        if r.connect_timeout_ms == 0 || r.timeout_ms == 0 || r.max_response_bytes == 0 {
            return Err("remote.connect_timeout_ms, timeout_ms and max_response_bytes must be positive".into());
        }
        let s = &self.server;
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
        let k = &self.socket;
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
        if !self.dbus.bus.is_empty() && zbus::names::WellKnownName::try_from(self.dbus.name.as_str()).is_err() {
            return Err(format!("dbus.name '{}' is not a valid well-known bus name", self.dbus.name));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(Config::parse("", Path::new("/x")).unwrap(), Config::default());
    }

    #[test]
    fn shipped_example_config_is_exactly_the_defaults() {
        let text = include_str!("../config/crayon.toml");
        assert_eq!(Config::parse(text, Path::new("/etc/crayon")).unwrap(), Config::default());
    }

    #[test]
    fn relative_paths_resolve_against_the_config_folder() {
        let cfg = Config::parse(
            "[model]\ndir = \"models/m\"\n[runtime]\nort_library = \"/abs/lib.so\"\n[pool]\nexemplars = \"bank.json\"",
            Path::new("/etc/crayon"),
        )
        .unwrap();
        assert_eq!(cfg.model.dir, PathBuf::from("/etc/crayon/models/m"));
        assert_eq!(cfg.pool.exemplars, PathBuf::from("/etc/crayon/bank.json"));
        assert_eq!(cfg.runtime.ort_library, PathBuf::from("/abs/lib.so"));
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = Config::parse("[generation]\ntempreature = 0.5", Path::new(".")).unwrap_err();
        assert!(err.contains("tempreature"), "{err}");
    }

    #[test]
    fn wrong_types_and_ranges_are_rejected() {
        assert!(Config::parse("[generation]\ntop_p = \"high\"", Path::new(".")).unwrap_err().contains("top_p"));
        assert!(Config::parse("[generation]\ntop_p = 1.5", Path::new(".")).unwrap_err().contains("top_p"));
        assert!(Config::parse("[generation]\ntemperature = -1", Path::new(".")).unwrap_err().contains("temperature"));
        assert!(Config::parse("[runtime]\nproviders = [\"tpu\"]", Path::new(".")).unwrap_err().contains("tpu"));
        assert!(Config::parse("[runtime]\noptimization = \"max\"", Path::new(".")).unwrap_err().contains("max"));
        assert!(Config::parse("[generation]\nstop = [\"\"]", Path::new(".")).unwrap_err().contains("stop"));
        assert!(Config::parse("[router]\nmin_scope = 2", Path::new(".")).unwrap_err().contains("min_scope"));
        assert!(Config::parse("[router]\nmode = \"hybrid\"", Path::new(".")).unwrap_err().contains("remote.url"));
        assert!(Config::parse("[router]\nmode = \"cloud\"", Path::new(".")).unwrap_err().contains("cloud"));
        assert!(Config::parse("[remote]\nurl = \"ftp://x\"", Path::new(".")).unwrap_err().contains("remote.url"));
        assert!(Config::parse("[server]\nmax_concurrent = 0", Path::new(".")).unwrap_err().contains("max_concurrent"));
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let err = Config::parse("[model]\ndir = \n", Path::new(".")).unwrap_err();
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn missing_file_is_a_config_error_naming_the_path() {
        let err = Config::load(Path::new("/nonexistent/crayon.toml")).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/crayon.toml") && err.contains("cannot read"), "{err}");
    }
}

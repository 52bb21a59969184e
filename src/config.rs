//! Configuration: `/etc/crayon/crayon.toml` (or `--config`), every key optional with a documented
//! default (see `docs/config.md` and `config/crayon.toml`). Unknown keys are rejected so that a typo
//! never silently falls back to a default. Relative paths are resolved against the config file's folder.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
// Subsystems own their sections; this module composes them.
// Each subsystem owns its section (type, defaults, validation); this file composes them into the
// config file, resolves relative paths and checks what spans sections.
pub use crate::dbus::DbusConfig;
pub use crate::router::remote::{RemoteConfig, RemoteKind};
pub use crate::router::{RouteMode, RouterConfig, Thresholds};
pub use crate::runtime::RuntimeConfig;
pub use crate::service::ServerConfig;
pub use crate::socket::SocketConfig;

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
        if g.stop.len() > crate::generate::MAX_STOP_STRINGS {
            // Every request starts from these and is held to the same bound (GenerationParams::validate).
            return Err(format!(
                "generation.stop has {} strings; at most {}",
                g.stop.len(),
                crate::generate::MAX_STOP_STRINGS
            ));
        }
        self.blend.validate()?;
        self.router.validate()?;
        self.remote.validate()?;
        // Across sections: routing anywhere but the device needs a server.
        if self.router.mode != RouteMode::DeviceOnly && self.remote.url.is_empty() {
            return Err(format!("router.mode = \"{}\" needs remote.url", self.router.mode.name()));
        }
        self.server.validate()?;
        self.socket.validate()?;
        self.dbus.validate()?;
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
        let stops = format!("[generation]\nstop = [{}]", vec!["\"x\""; 17].join(", "));
        assert!(Config::parse(&stops, Path::new(".")).unwrap_err().contains("at most 16"));
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

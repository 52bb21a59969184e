//! ONNX Runtime: loading the shared library once per process, and building sessions on the
//! configured execution providers (in order, CPU last) with a log line naming the one in use.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use ort::environment::Environment;
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// `[runtime]`: the ONNX Runtime library and how sessions are built.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Path of `libonnxruntime.so`. Empty: `$ORT_DYLIB_PATH`, then `libonnxruntime.so.1` on the loader path.
    pub ort_library: PathBuf,
    /// Execution providers, tried in order; CPU is always the last resort. An unknown name is refused
    /// when the config is read (serde lists the known ones).
    pub providers: Vec<Provider>,
    /// Threads inside one operator. 0: ONNX Runtime's default (one per physical core).
    pub intra_threads: usize,
    /// Graph optimization level.
    pub optimization: Optimization,
    /// Path prefix for an ONNX Runtime per-operator profile (JSON); empty: off. For diagnosis only.
    pub profile: PathBuf,
    /// One copy of the model's weights (mapped from the file) and of their packed form for the base
    /// model and every ready blend; off: each session holds its own (docs/benchmarks.md, "Memory").
    pub share_weights: bool,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            ort_library: PathBuf::new(),
            providers: vec![Provider::Cpu],
            intra_threads: 0,
            optimization: Optimization::All,
            profile: PathBuf::new(),
            share_weights: true,
        }
    }
}

/// ONNX Runtime's graph optimization levels, by their names in the config.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Optimization {
    Disable,
    Basic,
    Extended,
    #[default]
    All,
}

impl Optimization {
    fn level(self) -> GraphOptimizationLevel {
        match self {
            Optimization::Disable => GraphOptimizationLevel::Disable,
            Optimization::Basic => GraphOptimizationLevel::Level1,
            Optimization::Extended => GraphOptimizationLevel::Level2,
            Optimization::All => GraphOptimizationLevel::All,
        }
    }
}

/// The ONNX Runtime library loaded into this process. ONNX Runtime allows one environment per
/// process, so there is exactly one `Runtime`, created on first use.
pub struct Runtime {
    env: Environment,
    library: PathBuf,
}

static RUNTIME: OnceLock<Arc<Runtime>> = OnceLock::new();
static INIT_LOCK: Mutex<()> = Mutex::new(());

impl Runtime {
    /// Loads the library named by the config (or `$ORT_DYLIB_PATH`, or the loader's search path).
    /// Later calls return the already-loaded runtime.
    pub fn get(cfg: &RuntimeConfig) -> Result<Arc<Runtime>> {
        if let Some(rt) = RUNTIME.get() {
            return Ok(rt.clone());
        }
        let _guard = INIT_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rt) = RUNTIME.get() {
            return Ok(rt.clone());
        }
        let library = library_path(cfg);
        if library.components().count() > 1 && !library.exists() {
            return Err(Error::RuntimeLibrary {
                path: library,
                msg: "file not found (set runtime.ort_library in the config or ORT_DYLIB_PATH)".into(),
            });
        }
        let builder = ort::init_from(&library).map_err(|e| Error::RuntimeLibrary {
            path: library.clone(),
            msg: format!("{e} (it must be an ONNX Runtime 1.31 or newer shared library built for this machine)"),
        })?;
        let env = builder
            .with_name("crayon")
            .build()
            .map_err(|e| Error::RuntimeLibrary { path: library.clone(), msg: e.to_string() })?;
        tracing::info!(library = %library.display(), "ONNX Runtime loaded");
        let rt = Arc::new(Runtime { env, library });
        let _ = RUNTIME.set(rt.clone());
        Ok(rt)
    }

    pub fn library(&self) -> &Path {
        &self.library
    }

    /// A session builder with threads, optimization level and execution providers applied.
    /// Returns the builder and the provider that will run the graph.
    pub fn session_builder(&self, cfg: &RuntimeConfig) -> Result<(SessionBuilder, Provider)> {
        let mut b = ort::session::Session::builder(&self.env).map_err(Error::ort("creating a session builder"))?;
        b = b
            .with_optimization_level(cfg.optimization.level())
            .map_err(Error::ort("setting the optimization level"))?;
        if !cfg.profile.as_os_str().is_empty() {
            b = b.with_profiling(&cfg.profile).map_err(Error::ort("enabling profiling"))?;
        }
        if cfg.intra_threads > 0 {
            b = b.with_intra_threads(cfg.intra_threads).map_err(Error::ort("setting intra-op threads"))?;
        }
        let mut chosen = Provider::Cpu;
        for &p in &cfg.providers {
            if p == Provider::Cpu {
                break;
            }
            let (next, registered) = p.try_register(b);
            b = next;
            match registered {
                Ok(()) => {
                    chosen = p;
                    break;
                }
                Err(why) => {
                    tracing::warn!(provider = p.name(), "execution provider not used: {why}")
                }
            }
        }
        Ok((b, chosen))
    }
}

fn library_path(cfg: &RuntimeConfig) -> PathBuf {
    if !cfg.ort_library.as_os_str().is_empty() {
        return cfg.ort_library.clone();
    }
    match std::env::var_os("ORT_DYLIB_PATH") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from("libonnxruntime.so.1"),
    }
}

/// An execution provider Crayon knows how to register, by its name in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    TensorRt,
    Cuda,
    Qnn,
    OpenVino,
    Xnnpack,
    Cpu,
}

impl Provider {
    pub const NAMES: [&'static str; 6] = ["tensorrt", "cuda", "qnn", "openvino", "xnnpack", "cpu"];

    pub fn name(self) -> &'static str {
        Provider::NAMES[self as usize]
    }

    /// Registers the provider strictly (no silent fallback inside ort), so we know which one runs.
    /// Returns the builder back in every case, with the reason when the provider was not registered.
    fn try_register(self, b: SessionBuilder) -> (SessionBuilder, std::result::Result<(), String>) {
        macro_rules! strict {
            ($feature:literal, $ep:ty) => {{
                #[cfg(feature = $feature)]
                {
                    match <$ep as ort::ep::ExecutionProvider>::is_available() {
                        Ok(true) => {}
                        Ok(false) => return (b, Err("not available in the loaded ONNX Runtime library".into())),
                        Err(e) => return (b, Err(e.to_string())),
                    }
                    match b.with_execution_providers([<$ep>::default().build().error_on_failure()]) {
                        Ok(b) => (b, Ok(())),
                        Err(e) => {
                            let msg = e.to_string();
                            (e.recover(), Err(msg))
                        }
                    }
                }
                #[cfg(not(feature = $feature))]
                {
                    (b, Err(concat!("crayon was built without the `", $feature, "` feature").to_string()))
                }
            }};
        }
        match self {
            Provider::TensorRt => strict!("tensorrt", ort::ep::TensorRT),
            Provider::Cuda => strict!("cuda", ort::ep::CUDA),
            Provider::Qnn => strict!("qnn", ort::ep::QNN),
            Provider::OpenVino => strict!("openvino", ort::ep::OpenVINO),
            Provider::Xnnpack => strict!("xnnpack", ort::ep::XNNPACK),
            Provider::Cpu => (b, Ok(())),
        }
    }
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Hands memory freed inside the allocator's heaps back to the system. glibc keeps freed blocks for
/// reuse, and after dropping a blend (hundreds of MB of weights and ONNX Runtime buffers, freed by
/// several threads into several arenas) much of it stays resident: a server building one blend after
/// another grew to 11 GB with a 4 GB cache budget. Called after a blend is dropped, a rare event; the
/// alternative, a fixed 1 MiB mmap threshold, bounded memory as well but made every session build
/// ~15% slower (fresh pages to fault in). Measured in docs/benchmarks.md ("Memory").
pub(crate) fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages to the system; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

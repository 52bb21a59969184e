//! Pieces shared by the `crayonctl` and `crayond` binaries: config loading with command-line
//! overrides, logging set-up and exit codes.

use std::path::PathBuf;

use clap::Args;

use crate::config::Config;
use crate::error::{Error, ErrorKind};

/// Options every binary takes to find its config, model and ONNX Runtime.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Config file [default: $CRAYON_CONFIG, else /etc/crayon/crayon.toml if present, else built-in defaults]
    #[arg(long, short = 'c', global = true)]
    pub config: Option<PathBuf>,
    /// Model folder written by crayon-export (overrides model.dir)
    #[arg(long, global = true)]
    pub model: Option<PathBuf>,
    /// Path of libonnxruntime.so (overrides runtime.ort_library)
    #[arg(long, global = true)]
    pub ort_library: Option<PathBuf>,
    /// Intra-op threads, 0 for ONNX Runtime's default (overrides runtime.intra_threads)
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    /// Log more (-v info, -vv debug); RUST_LOG overrides
    #[arg(long, short = 'v', action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
}

impl CommonArgs {
    pub fn load_config(&self) -> Result<Config, Error> {
        let mut cfg = match Config::locate(self.config.as_deref()) {
            Some(path) => Config::load(&path)?,
            None => Config::default(),
        };
        if let Some(m) = &self.model {
            cfg.model.dir = m.clone();
        }
        if let Some(l) = &self.ort_library {
            cfg.runtime.ort_library = l.clone();
        }
        if let Some(t) = self.threads {
            cfg.runtime.intra_threads = t;
        }
        Ok(cfg)
    }

    pub fn init_logging(&self, default_level: &str) {
        let level = match self.verbose {
            0 => default_level,
            1 => "info",
            _ => "debug",
        };
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
        // Colour codes only on a terminal: logs redirected to a file or a pipe stay plain text.
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let _ =
            tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).try_init();
    }
}

/// Exit status for an error, from its [`ErrorKind`]: 2 for a bad configuration or request or a
/// missing adapter, 130 when cancelled (Ctrl-C, as a shell reports SIGINT), 1 for everything else.
pub fn exit_code(e: &Error) -> i32 {
    exit_code_of(e.kind())
}

pub fn exit_code_of(kind: ErrorKind) -> i32 {
    match kind {
        ErrorKind::Invalid | ErrorKind::NotFound => 2,
        ErrorKind::Cancelled => 130,
        ErrorKind::Busy | ErrorKind::Forbidden | ErrorKind::Unavailable | ErrorKind::Internal => 1,
    }
}

//! Crayon: an on-device LLM service. Data flows through the modules in this order:
//! `config` -> `runtime` / `model` -> `tokenizer` / `chat` / `sampler` -> `generate`.

pub mod chat;
pub mod cli;
pub mod config;
pub mod error;
pub mod generate;
pub mod model;
pub mod runtime;
pub mod sampler;
pub mod tokenizer;

pub use chat::Message;
pub use config::Config;
pub use error::{Error, Result};
pub use generate::{CancelToken, Engine, FinishReason, Generation, GenerationParams, Prompt};

/// Crate version, also reported by the CLI and the service.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

//! Crayon: an on-device LLM service. Data flows through the modules in this order:
//! `config` -> `runtime` / `model` -> `tokenizer` / `chat` / `sampler` -> `pool` (embed, blend,
//! merge) / `adapters` (customizations) -> `generate` (the engine) -> `router` (device or server) ->
//! `service` (the typed core every interface calls) -> the interfaces, each translating its wire
//! format at its edge: `http` (OpenAI, via `openai`), `socket`, `dbus`, `cli`, and libcrayon (C).

pub mod access;
pub mod adapters;
pub mod chat;
pub mod choices;
pub mod cli;
pub mod config;
pub mod context;
pub mod dbus;
pub mod engine;
pub mod error;
pub mod generate;
pub mod http;
pub mod metrics;
pub mod model;
pub mod openai;
pub mod pool;
pub mod queue;
pub mod router;
pub mod runtime;
pub mod sampler;
pub mod service;
pub mod socket;
pub mod tokenizer;
pub mod weights;

pub use adapters::{Customization, Example};
pub use chat::Message;
pub use config::Config;
pub use engine::Engine;
pub use error::{Error, ErrorKind, Result};
pub use generate::{CancelToken, FinishReason, Generation, GenerationParams, Prompt};

/// Crate version, also reported by the CLI and the service.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

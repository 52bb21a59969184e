//! The library's error type. Every variant says *what* failed, *where* (file or field) and *why*.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration file is missing, unreadable or invalid.
    #[error("config {path}: {msg}")]
    Config { path: PathBuf, msg: String },

    /// A file could not be read.
    #[error("cannot read {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A file could not be written (or removed): a full disk, permissions.
    #[error("cannot write {what} {path}: {source}")]
    Write {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A model folder is missing, incomplete or inconsistent.
    #[error("model {path}: {msg}")]
    Model { path: PathBuf, msg: String },

    /// The ONNX Runtime shared library could not be loaded.
    #[error("ONNX Runtime library {path}: {msg}")]
    RuntimeLibrary { path: PathBuf, msg: String },

    /// An adapter pool is missing, incomplete, or built for another model.
    #[error("adapter pool {path}: {msg}")]
    Pool { path: PathBuf, msg: String },

    /// A customized adapter does not exist, or the state directory cannot be used.
    #[error("adapter '{name}': {msg}")]
    Adapter { name: String, msg: String },

    /// ONNX Runtime reported an error while doing `context`.
    #[error("ONNX Runtime error while {context}: {msg}")]
    Ort { context: String, msg: String },

    /// The tokenizer could not be loaded or failed on an input.
    #[error("tokenizer {path}: {msg}")]
    Tokenizer { path: PathBuf, msg: String },

    /// The chat template could not be compiled or rendered.
    #[error("chat template: {0}")]
    Template(String),

    /// A request is malformed or exceeds a limit.
    #[error("invalid request: {0}")]
    InvalidRequest(String),

    /// The service is at its admission limit (queue full); try again later.
    #[error("busy: {0}")]
    Busy(String),

    /// The caller may not do this (e.g. change another app's customization).
    #[error("not allowed: {0}")]
    Forbidden(String),

    /// The request was cancelled (its client went away or asked to stop) before it finished.
    #[error("cancelled")]
    Cancelled,

    /// A bug: something that should not happen did (e.g. a handler panicked); the service goes on.
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The one classification of failures (defined with the socket protocol, which carries it to clients).
pub use crayon_client::ErrorKind;

impl Error {
    /// How this failure is reported on every interface.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidRequest(_) | Error::Config { .. } | Error::Pool { .. } | Error::Template(_) => {
                ErrorKind::Invalid
            }
            Error::Adapter { .. } => ErrorKind::NotFound,
            Error::Busy(_) => ErrorKind::Busy,
            Error::Forbidden(_) => ErrorKind::Forbidden,
            Error::Cancelled => ErrorKind::Cancelled,
            Error::Io { .. }
            | Error::Write { .. }
            | Error::Model { .. }
            | Error::RuntimeLibrary { .. }
            | Error::Tokenizer { .. } => ErrorKind::Unavailable,
            Error::Ort { .. } | Error::Internal(_) => ErrorKind::Internal,
        }
    }

    pub(crate) fn ort<R>(context: impl Into<String>) -> impl FnOnce(ort::Error<R>) -> Error {
        let context = context.into();
        move |e| Error::Ort { context, msg: e.to_string() }
    }

    pub(crate) fn model(path: impl Into<PathBuf>, msg: impl Into<String>) -> Error {
        Error::Model { path: path.into(), msg: msg.into() }
    }
}

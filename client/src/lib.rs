//! crayon-client: the local socket's protocol (docs/socket.md) and a blocking client for it.
//!
//! This is all an app-side program needs to talk to `crayond`: libcrayon (the C ABI) and
//! `crayonctl --socket` are built on it, and the daemon uses the same protocol types, so both ends
//! agree by construction. It depends on serde, serde_json, thiserror and libc only — never on the
//! engine, ONNX Runtime, HTTP or D-Bus stacks — which keeps `libcrayon.a` small.

pub mod proto;
pub mod socket;

pub use proto::{Code, PROTOCOL_VERSION};
pub use socket::{Canceller, Client, ClientError, DEFAULT_PATH, DEFAULT_TIMEOUT, default_path};

/// Limits the service enforces on every interface that a client can check before sending.
pub mod limits {
    /// Upper bound on the options of one choice question.
    pub const MAX_CHOICES: usize = 26;
    /// Upper bound on one option's text (bytes): options are answers, not documents.
    pub const MAX_CHOICE_BYTES: usize = 2048;
}

/// The one classification of failures: every interface derives what it reports from it (HTTP status,
/// socket code, D-Bus error name, CLI exit status), so the same failure gives the same answer
/// everywhere. The service maps its errors here (`crayon::Error::kind`); a socket client maps the
/// codes it receives back with [`Code::kind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request or the configuration is wrong; fix it (HTTP 400, `invalid_request`,
    /// `Error.InvalidRequest`, exit 2).
    Invalid,
    /// No such adapter, or one that cannot be used any more (404, `not_found`, `Error.NotFound`, exit 2).
    NotFound,
    /// At an admission limit; retry later (429, `busy`, `Error.Busy`, exit 1).
    Busy,
    /// Not this caller's to change (403, `permission_denied`, `Error.AccessDenied`, exit 1).
    Forbidden,
    /// Stopped by its client (408, `cancelled`, `Error.Cancelled`, exit 130).
    Cancelled,
    /// Something the service needs is missing or broken: model, runtime library, tokenizer, a file
    /// (503, `internal`, `Error.Failed`, exit 1).
    Unavailable,
    /// A failure inside the service (500, `internal`, `Error.Failed`, exit 1).
    Internal,
}

//! The local socket's wire format (docs/socket.md), shared by the daemon and its clients.
//!
//! A frame is a 4-byte big-endian payload length followed by that many bytes of one UTF-8 JSON
//! object. Both sides refuse frames over their limit. The first frame each way is the handshake
//! (`{"crayon": PROTOCOL_VERSION}`), then requests carry an `id` chosen by the client and every event
//! answering them repeats it, so that requests on one connection may overlap.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ErrorKind;

/// Version of this protocol; the handshake refuses any other.
pub const PROTOCOL_VERSION: u32 = 1;

/// Default frame limit (both directions), `socket.max_frame_bytes`.
pub const DEFAULT_MAX_FRAME: usize = 1 << 20;

/// Bytes of the length prefix.
pub const HEADER: usize = 4;

/// Prepends the length to a JSON payload.
pub fn frame(payload: &Value) -> Vec<u8> {
    let body = serde_json::to_vec(payload).unwrap_or_else(|_| b"{}".to_vec());
    let mut out = Vec::with_capacity(HEADER + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// What [`split_frame`] found at the front of a buffer.
#[derive(Debug, PartialEq)]
pub enum Split {
    /// Not a whole frame yet.
    Incomplete,
    /// A frame whose payload is `buf[HEADER..HEADER + len]`.
    Frame(usize),
    /// The prefix announces more than the limit (or nothing): the stream cannot be trusted further.
    Oversized(usize),
}

pub fn split_frame(buf: &[u8], max: usize) -> Split {
    if buf.len() < HEADER {
        return Split::Incomplete;
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len == 0 || len > max {
        return Split::Oversized(len);
    }
    if buf.len() < HEADER + len { Split::Incomplete } else { Split::Frame(len) }
}

/// A client request (after the handshake).
#[derive(Debug, Deserialize, Serialize)]
pub struct Request {
    pub id: u64,
    #[serde(flatten)]
    pub op: Op,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// An OpenAI chat-completions body (with the `crayon` extension, docs/http.md). With `stream`,
    /// `token` events come before `done`.
    Chat {
        body: Value,
        #[serde(default)]
        stream: bool,
    },
    /// An OpenAI completions body (`prompt` as raw text, no chat template), otherwise as `Chat`.
    Complete {
        body: Value,
        #[serde(default)]
        stream: bool,
    },
    /// A customize body: `{"name", "examples": [{"input", "output"}], "calibrate", "choices"}`.
    Customize { body: Value },
    /// Saved adapters.
    Adapters,
    /// Removes a saved adapter.
    Remove { name: String },
    /// Service status and counters.
    Status,
    /// The metrics exposition (OpenMetrics text, as `GET /metrics`): `{"text": ...}`.
    Metrics,
    /// Cancels this connection's request `target` (answered by that request's `cancelled` error).
    Cancel { target: u64 },
}

/// Error codes of `error` events (stable: clients switch on them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Code {
    /// The frame was not a request this version understands (bad JSON, unknown op, missing id).
    Malformed,
    /// A frame over the limit; the connection is closed after this reply.
    FrameTooLarge,
    /// The handshake asked for another protocol version; the connection is closed.
    Version,
    /// The peer's credentials are not allowed to use the service (the connection is then closed), or
    /// not to change this customization (another app's).
    PermissionDenied,
    /// The request is well-formed but invalid (bad parameter, unknown adapter name in a body...).
    InvalidRequest,
    /// No such adapter.
    NotFound,
    /// Too many requests in flight (service-wide or on this connection): retry later.
    Busy,
    /// Cancelled by the client.
    Cancelled,
    /// The service is stopping and takes no new requests.
    ShuttingDown,
    /// The model or the service failed; the message says how.
    Internal,
}

impl Code {
    /// The code reporting a failure of this kind (the one classification, [`ErrorKind`]).
    pub fn from_kind(kind: ErrorKind) -> Code {
        use ErrorKind as K;
        match kind {
            K::Invalid => Code::InvalidRequest,
            K::NotFound => Code::NotFound,
            K::Busy => Code::Busy,
            K::Forbidden => Code::PermissionDenied,
            K::Cancelled => Code::Cancelled,
            K::Unavailable | K::Internal => Code::Internal,
        }
    }

    /// The kind of failure a code reports (what a client's exit status derives from).
    pub fn kind(self) -> ErrorKind {
        use ErrorKind as K;
        match self {
            Code::Malformed | Code::FrameTooLarge | Code::Version | Code::InvalidRequest => K::Invalid,
            Code::NotFound => K::NotFound,
            Code::Busy => K::Busy,
            Code::Cancelled => K::Cancelled,
            Code::PermissionDenied => K::Forbidden,
            Code::ShuttingDown => K::Unavailable,
            Code::Internal => K::Internal,
        }
    }
}

pub fn error_event(id: Option<u64>, code: Code, message: &str) -> Value {
    serde_json::json!({"id": id, "event": "error", "code": code, "message": message})
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn frames_round_trip_and_split() {
        let f = frame(&json!({"a": 1}));
        assert_eq!(split_frame(&f[..3], 100), Split::Incomplete);
        assert_eq!(split_frame(&f[..f.len() - 1], 100), Split::Incomplete);
        let Split::Frame(n) = split_frame(&f, 100) else { panic!() };
        let v: Value = serde_json::from_slice(&f[HEADER..HEADER + n]).unwrap();
        assert_eq!(v, json!({"a": 1}));
        assert_eq!(split_frame(&f, 3), Split::Oversized(7));
        assert_eq!(split_frame(&[0, 0, 0, 0], 100), Split::Oversized(0));
    }

    #[test]
    fn requests_parse_strictly() {
        let r: Request = serde_json::from_value(json!({"id": 3, "op": "remove", "name": "x"})).unwrap();
        assert!(matches!(r.op, Op::Remove { ref name } if name == "x"));
        let r: Request = serde_json::from_value(json!({"id": 4, "op": "chat", "body": {}})).unwrap();
        assert!(matches!(r.op, Op::Chat { stream: false, .. }));
        let r: Request =
            serde_json::from_value(json!({"id": 5, "op": "complete", "stream": true, "body": {}})).unwrap();
        assert!(matches!(r.op, Op::Complete { stream: true, .. }));
        assert!(serde_json::from_value::<Request>(json!({"op": "status"})).is_err());
        assert!(serde_json::from_value::<Request>(json!({"id": 1, "op": "reboot"})).is_err());
    }

    #[test]
    fn codes_and_kinds_round_trip() {
        use ErrorKind as K;
        for kind in [K::Invalid, K::NotFound, K::Busy, K::Forbidden, K::Cancelled, K::Internal] {
            assert_eq!(Code::from_kind(kind).kind(), kind);
        }
        assert_eq!(Code::from_kind(K::Unavailable), Code::Internal);
    }
}

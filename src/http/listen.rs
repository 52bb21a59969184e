//! The HTTP connection loop: axum's routes served by hyper with the bounds `axum::serve` leaves out.
//!
//! A client that opens a connection and sends its request headers one byte at a time, or not at all,
//! holds a file descriptor and a task for as long as it likes under `axum::serve` (hyper's header
//! timeout needs a timer axum does not set), and nothing bounds how many connections are open: 1,100
//! idle connections made the socket and HTTP unreachable under `ulimit -n 1024`. Here every
//! connection must send its request headers within `server.header_timeout_ms` (also between
//! keep-alive requests), at most `server.max_connections` are open (one more gets a short 503 and is
//! closed), and shutdown lets the requests in flight finish.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tower::ServiceExt;

/// The uid of a loopback client's process ([`super::peer::loopback_peer_uid`]), on every request of
/// its connection; `None` for a remote client or a loopback one the kernel's table does not name.
#[derive(Debug, Clone, Copy)]
pub struct PeerUid(pub Option<u32>);

/// What every HTTP connection is held to.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
}

/// Serves `app` on `listener` until `stop` resolves, then waits for the connections still open (the
/// caller bounds that wait). Peer addresses reach the routes as [`ConnectInfo`], as with
/// `into_make_service_with_connect_info`.
pub async fn serve(listener: TcpListener, app: axum::Router, limits: ConnectionLimits, stop: impl Future<Output = ()>) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let open = Arc::new(Semaphore::new(limits.max_connections));
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: wait for descriptors to come back rather than spin.
                    tracing::warn!(error = %e, "http: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            tokio::spawn(refuse(stream, limits.max_connections));
            continue;
        };
        let app = app.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            // A loopback client's uid, looked up once per connection off the accept loop (the
            // kernel's table grows with the connections open).
            let local = stream.local_addr().ok();
            let uid = match (local, super::peer::is_loopback(peer)) {
                (Some(local), true) => tokio::task::spawn_blocking(move || super::peer::loopback_peer_uid(peer, local))
                    .await
                    .ok()
                    .flatten(),
                _ => None,
            };
            let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                req.extensions_mut().insert(PeerUid(uid));
                app.clone().oneshot(req)
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
            if let Err(e) = watcher.watch(builder.serve_connection(TokioIo::new(stream), service)).await {
                tracing::debug!(error = %e, %peer, "http: connection ended");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// The reply to a connection over `server.max_connections`: written without reading the request,
/// then closed.
async fn refuse(mut stream: TcpStream, max: usize) {
    let body = format!(
        "{{\"error\": {{\"message\": \"busy: {max} connections open (server.max_connections)\", \"type\": \"rate_limit_error\", \"param\": null, \"code\": null}}}}"
    );
    let reply = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(reply.as_bytes())).await;
}

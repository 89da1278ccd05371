//! The API's side of a hand-over restart ([`crate::handoff`]): once the new
//! process has the listener, calls that still arrive on this process's open
//! keep-alive connections are forwarded to it, answered with
//! `Connection: close` so the client's next call opens a connection to the
//! new process. Calls served here are counted, so the hand-over can wait for
//! them before closing the store.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::RwLock;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::ApiError;

/// How long a forwarded call may take, connection included: the new
/// process may still be opening the store when it arrives.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(60);

/// Headers that belong to one connection, not to the call.
const HOP_BY_HOP: [header::HeaderName; 6] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
];

/// Whether calls are served here or forwarded, and how many are served here.
#[derive(Debug, Default)]
pub struct Forwarding {
    on: AtomicBool,
    to: RwLock<Option<SocketAddr>>,
    local: AtomicUsize,
    idle: Notify,
}

/// A call being served here; dropping it ends the call.
pub struct LocalCall<'a>(&'a Forwarding);

impl Drop for LocalCall<'_> {
    fn drop(&mut self) {
        if self.0.local.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Forwarding {
    /// From now on, forward every new call to `to`.
    pub fn start(&self, to: SocketAddr) {
        *self.to.write().unwrap_or_else(|e| e.into_inner()) = Some(to);
        self.on.store(true, Ordering::SeqCst);
    }

    /// Serve calls here again (the hand-over was abandoned).
    pub fn stop(&self) {
        self.on.store(false, Ordering::SeqCst);
    }

    /// Where calls go, or `None` (and a count of the call) to serve it here.
    /// Counting before looking means [`Forwarding::local_calls_done`], called
    /// after `start`, sees every call that will be served here.
    pub fn enter(&self) -> Result<LocalCall<'_>, SocketAddr> {
        self.local.fetch_add(1, Ordering::SeqCst);
        let call = LocalCall(self);
        if self.on.load(Ordering::SeqCst) {
            if let Some(to) = *self.to.read().unwrap_or_else(|e| e.into_inner()) {
                return Err(to);
            }
        }
        Ok(call)
    }

    /// Calls being served here now.
    pub fn local_calls(&self) -> usize {
        self.local.load(Ordering::SeqCst)
    }

    /// Waits until no call is served here, at most `limit`; false if some
    /// still were.
    pub async fn local_calls_done(&self, limit: Duration) -> bool {
        let wait = async {
            loop {
                let idle = self.idle.notified();
                if self.local_calls() == 0 {
                    return;
                }
                idle.await;
            }
        };
        tokio::time::timeout(limit, wait).await.is_ok()
    }
}

/// Forwards `req` to the API at `to` and returns its answer with
/// `Connection: close`. If the new process cannot be reached the caller gets
/// 503 `draining` with `Retry-After`: nothing was done, retry.
pub async fn forward(to: SocketAddr, req: Request) -> Response {
    let mut response = match tokio::time::timeout(FORWARD_TIMEOUT, send(to, req)).await {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => {
            tracing::warn!(%to, error = %e, "forwarding an API call to the new process failed");
            ApiError::draining().into_response()
        }
        Err(_) => {
            tracing::warn!(%to, "forwarding an API call to the new process timed out");
            ApiError::draining().into_response()
        }
    };
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

async fn send(
    to: SocketAddr,
    req: Request,
) -> Result<Response, Box<dyn std::error::Error + Send + Sync>> {
    let (mut parts, body) = req.into_parts();
    for name in &HOP_BY_HOP {
        parts.headers.remove(name);
    }
    parts
        .headers
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    let stream = TcpStream::connect(to).await?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "forwarded API connection ended");
        }
    });
    let response = sender
        .send_request(Request::from_parts(parts, body))
        .await?;
    Ok(response.map(Body::new))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn calls_are_counted_until_forwarding_starts() {
        let f = Forwarding::default();
        let to: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        let call = f.enter().expect("served here");
        assert_eq!(f.local_calls(), 1);
        f.start(to);
        assert_eq!(f.enter().err(), Some(to));
        assert_eq!(f.local_calls(), 1, "a forwarded call is not counted");
        assert!(!f.local_calls_done(Duration::from_millis(20)).await);
        let waiter = async { f.local_calls_done(Duration::from_secs(5)).await };
        let (done, ()) = tokio::join!(waiter, async { drop(call) });
        assert!(done);
        f.stop();
        assert!(f.enter().is_ok());
    }
}

//! The backend HTTP API of PROTOCOL.md ("Backend API", "Operations"):
//! authentication, parsing and error mapping around the [`Dispatcher`],
//! which keeps every promise an answer makes.
//!
//! Every refusal, including unknown routes, wrong methods and bad paths, is
//! an [`ApiError`] with a JSON body: no axum extractor whose rejection is
//! plain text is used (bodies are read by [`read_json_body`], paths by
//! [`Caller`]).

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::path::ErrorKind;
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde_json::Value;

use crate::auth::Auth;
use crate::config::MessagesConfig;
use crate::dispatch::Dispatcher;
use crate::shutdown::Drain;

pub mod error;
pub mod forward;
pub mod messages;
#[cfg(test)]
mod tests;

pub use error::{ApiError, ErrorCode};

/// What the API handlers share.
pub struct ApiState {
    pub dispatcher: Arc<Dispatcher>,
    pub auth: Arc<Auth>,
    pub drain: Arc<Drain>,
    pub messages: MessagesConfig,
    /// App ids in config order: `app_ids[i]` is app number `i`.
    pub app_ids: Vec<Arc<str>>,
    /// Set during a hand-over restart: calls go to the new process.
    pub forwarding: Arc<forward::Forwarding>,
}

/// How long a client may take to send a request's head, and how long a
/// keep-alive connection may sit idle between requests, before it is closed
/// (bounds a slowloris on the API the way `handshake_timeout` does on the
/// device side).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a request's body may take to arrive once its head is read.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stop waits for API calls in flight.
const STOP_GRACE: Duration = Duration::from_secs(30);

/// Serves `router` on `listener` (HTTP/1.1) until `stop` turns true, then
/// lets the calls in flight finish (at most [`STOP_GRACE`]).
///
/// Like `axum::serve`, plus what it lacks: a timer, so that
/// `header_timeout` ([`HEADER_TIMEOUT`] in the gateway) bounds slow request
/// heads and idle keep-alive connections.
pub async fn serve(
    mut listener: crate::net::GatedListener,
    router: Router,
    mut stop: tokio::sync::watch::Receiver<bool>,
    header_timeout: Duration,
) {
    use axum::serve::Listener;
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;

    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    loop {
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|s| *s) => break,
        };
        // The router takes hyper's body type as it is.
        let service = TowerToHyperService::new(router.clone());
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "API connection ended");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(STOP_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("API calls still running after {STOP_GRACE:?}; stopping anyway");
    }
}

/// Runs the API server on a thread of its own with its own one-thread
/// runtime. On the device runtime, a call's task waited in the same run
/// queues as the thousands of connection tasks a commit or a broadcast
/// wakes at once, and its sockets' readiness on the same driver; on its own
/// thread it gets its share of a core from the kernel's scheduler instead.
/// `make` runs here, inside the new runtime, so the sockets it registers
/// belong to that runtime's I/O driver, and its error is the caller's.
/// Everything the handlers touch (the dispatcher, the hub, the store's
/// writer channel) is shared across threads. The returned handle finishes
/// when the server has stopped.
pub fn spawn_on_own_thread<Fut>(
    make: impl FnOnce() -> std::io::Result<Fut>,
) -> std::io::Result<tokio::task::JoinHandle<()>>
where
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("pushgate-api")
        .build()?;
    let serve = {
        let _in = rt.enter();
        make()?
    };
    let (done, finished) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("pushgate-api".into())
        .spawn(move || {
            rt.block_on(serve);
            // Connection tasks still running after the grace period end
            // with the runtime.
            rt.shutdown_background();
            let _ = done.send(());
        })?;
    Ok(tokio::spawn(async move {
        let _ = finished.await;
    }))
}

/// The API's routes, ready to serve (or to test with `oneshot`).
pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/v1/apps/{app}/messages", post(messages::send))
        .route("/v1/apps/{app}/messages/batch", post(messages::batch))
        .route("/v1/apps/{app}/devices/{device}", get(device_info))
        .route("/v1/apps/{app}/devices/{device}/connection", delete(kick))
        .route("/v1/apps/{app}/devices/{device}/messages", delete(purge))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        // Must follow the routes: it is installed on those already added.
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), gate))
        .with_state(state)
}

/// Before anything else is looked at: after a hand-over every call is
/// forwarded to the new process; while draining, every `/v1/…` call is
/// refused with 503 `draining`. Calls already past this point finish.
async fn gate(State(state): State<Arc<ApiState>>, req: Request, next: Next) -> Response {
    let _served_here = match state.forwarding.enter() {
        Ok(call) => call,
        Err(to) => return forward::forward(to, req).await,
    };
    let path = req.uri().path();
    if state.drain.is_draining() && (path == "/v1" || path.starts_with("/v1/")) {
        return ApiError::draining().into_response();
    }
    next.run(req).await
}

/// An authenticated caller of `/v1/apps/{app}/…`: the key is resolved first
/// (401), then compared with `{app}` (403), so an answer never tells whether
/// an app exists.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The app number (config order).
    pub app: usize,
    /// The `{device}` path segment, if the route has one (not yet validated).
    device: Option<String>,
}

impl Caller {
    /// The `{device}` of the path, checked to be a valid device id (400
    /// `invalid` naming `device` otherwise).
    pub fn device(&self) -> Result<&str, ApiError> {
        let device = self
            .device
            .as_deref()
            .ok_or_else(|| ApiError::invalid("device: missing from the path"))?;
        messages::path_device_id(device)?;
        Ok(device)
    }
}

impl FromRequestParts<Arc<ApiState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<ApiState>,
    ) -> Result<Caller, ApiError> {
        let key = bearer_key(&parts.headers)?;
        let app = state
            .auth
            .api_key_app(key)
            .ok_or_else(|| ApiError::unauthorized("unknown API key"))?;
        let params = match Path::<Vec<(String, String)>>::from_request_parts(parts, state).await {
            Ok(Path(params)) => params,
            Err(PathRejection::FailedToDeserializePathParams(e)) => {
                return Err(match e.kind() {
                    // An app id that is not UTF-8 is no app's: the key's app
                    // is not the one named.
                    ErrorKind::InvalidUtf8InPathParam { key } if key == "app" => {
                        ApiError::forbidden()
                    }
                    ErrorKind::InvalidUtf8InPathParam { key } => {
                        ApiError::invalid(format!("{key}: not valid UTF-8 once percent-decoded"))
                    }
                    _ => ApiError::invalid(format!("path: {}", e.body_text())),
                });
            }
            Err(e) => return Err(ApiError::invalid(format!("path: {}", e.body_text()))),
        };
        let mut named_app = None;
        let mut device = None;
        for (name, value) in params {
            match name.as_str() {
                "app" => named_app = Some(value),
                "device" => device = Some(value),
                _ => {}
            }
        }
        let owns = state
            .app_ids
            .get(app)
            .is_some_and(|id| named_app.as_deref() == Some(&**id));
        if !owns {
            return Err(ApiError::forbidden());
        }
        Ok(Caller { app, device })
    }
}

/// The key of `Authorization: Bearer <key>` (scheme case-insensitive).
fn bearer_key(headers: &HeaderMap) -> Result<&str, ApiError> {
    let value = headers.get(header::AUTHORIZATION).ok_or_else(|| {
        ApiError::unauthorized("Authorization: missing; send `Authorization: Bearer <api key>`")
    })?;
    let malformed = || ApiError::unauthorized("Authorization: expected `Bearer <api key>`");
    let value = value.to_str().map_err(|_| malformed())?;
    let (scheme, key) = value.trim().split_once(' ').ok_or_else(malformed)?;
    let key = key.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || key.is_empty() {
        return Err(malformed());
    }
    Ok(key)
}

/// Check that the body is declared JSON (415 otherwise), read it up to
/// `limit` bytes (413 past it) and parse it (400 if it is not JSON).
pub async fn read_json_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Value, ApiError> {
    let bytes = read_json_bytes(headers, body, limit).await?;
    parse_json(&bytes)
}

/// The body of a JSON request, unparsed (for a typed parse first; see
/// `messages`): the same checks as [`read_json_body`] before parsing.
pub async fn read_json_bytes(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Bytes, ApiError> {
    require_json(headers)?;
    read_body(headers, body, limit).await
}

/// A body as a JSON value, or the refusal [`read_json_body`] gives.
pub fn parse_json(bytes: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::invalid(format!("body: not valid JSON: {e}")))
}

/// `Content-Type` must be `application/json`; parameters (`charset=utf-8`)
/// are allowed.
fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let refuse = |got: &str| {
        ApiError::new(
            ErrorCode::UnsupportedMediaType,
            format!("Content-Type: must be application/json, got {got}"),
        )
    };
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Err(refuse("none"));
    };
    let value = value.to_str().map_err(|_| refuse("a non-ASCII value"))?;
    let essence = value.split(';').next().unwrap_or_default().trim();
    if essence.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        Err(refuse(&format!(
            "`{}`",
            value.chars().take(64).collect::<String>()
        )))
    }
}

/// Read a body of at most `limit` bytes. A declared `Content-Length` over
/// the limit is refused before reading anything.
async fn read_body(headers: &HeaderMap, mut body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let too_large = || ApiError::too_large(format!("body: over the limit of {limit} bytes"));
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) || body.size_hint().lower() > limit as u64 {
        return Err(too_large());
    }
    let read = async {
        let mut buf = Vec::with_capacity(declared.map_or(0, |n| n as usize));
        while let Some(frame) =
            std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
        {
            let frame =
                frame.map_err(|e| ApiError::invalid(format!("body: could not be read: {e}")))?;
            if let Ok(data) = frame.into_data() {
                if buf.len() + data.len() > limit {
                    return Err(too_large());
                }
                buf.extend_from_slice(&data);
            }
        }
        Ok(Bytes::from(buf))
    };
    tokio::time::timeout(BODY_TIMEOUT, read)
        .await
        .unwrap_or_else(|_| {
            Err(ApiError::invalid(format!(
                "body: not received within {} s",
                BODY_TIMEOUT.as_secs()
            )))
        })
}

/// `GET /v1/apps/{app}/devices/{device}`.
async fn device_info(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
) -> Result<Response, ApiError> {
    let device = caller.device()?;
    let Some(info) = state.dispatcher.device_info(caller.app, device).await? else {
        return Err(ApiError::not_found(format!(
            "device: {device:?} was never seen and has nothing pending"
        )));
    };
    Ok(Json(serde_json::json!({
        "device": device,
        "online": info.online,
        "first_seen": info.record.first_seen_ms,
        "last_seen": info.record.last_seen_ms,
        "sessions": info.record.sessions,
        "pending": info.record.pending,
        "topics": info.topics,
    }))
    .into_response())
}

/// `DELETE /v1/apps/{app}/devices/{device}/connection`: 204 after `bye kicked`.
async fn kick(State(state): State<Arc<ApiState>>, caller: Caller) -> Result<Response, ApiError> {
    let device = caller.device()?;
    if state.dispatcher.kick(caller.app, device) {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::not_found(format!(
            "device: {device:?} is not connected"
        )))
    }
}

/// `DELETE /v1/apps/{app}/devices/{device}/messages`: 200 `{"purged": n}`.
async fn purge(State(state): State<Arc<ApiState>>, caller: Caller) -> Result<Response, ApiError> {
    let device = caller.device()?;
    let purged = state.dispatcher.purge(caller.app, device).await?;
    Ok(Json(serde_json::json!({"purged": purged})).into_response())
}

/// `GET /healthz`: 200 while the process serves, draining or not.
async fn healthz() -> Response {
    Json(serde_json::json!({"status": "ok"})).into_response()
}

/// `GET /readyz`: 200, or 503 `draining` once the drain started.
async fn readyz(State(state): State<Arc<ApiState>>) -> Response {
    if state.drain.is_draining() {
        return ApiError::draining().into_response();
    }
    Json(serde_json::json!({"status": "ready"})).into_response()
}

/// `GET /metrics`: the Prometheus text format.
async fn metrics(State(state): State<Arc<ApiState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        state.dispatcher.render_metrics(),
    )
        .into_response()
}

/// Any path that is not a route: 404 `not_found`.
async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!("no route for {method} {}", uri.path()))
}

/// A route asked with a method it does not serve: 405 with the code
/// `method_not_allowed` (PROTOCOL.md has none for this); axum adds `Allow`.
async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        format!("method {method} is not allowed on {}", uri.path()),
    )
}

//! The one error type of the backend API: every refusal is
//! `{"error": "<code>", "message": "<human text naming the field>"}` with the
//! status and headers PROTOCOL.md ties to its code.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::dispatch::DispatchError;

/// `Retry-After` (seconds) on 503 `draining`: long enough for a restart to
/// come up or a load balancer to notice; PROTOCOL.md leaves the value open.
pub const DRAIN_RETRY_AFTER_SECS: u64 = 5;

/// `Retry-After` (seconds) on 429 `queue_full` and 503 `store_unavailable`.
pub const BUSY_RETRY_AFTER_SECS: u64 = 1;

/// The error codes of the backend API, one per kind of refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// 400: the request breaks a rule; the message names the field.
    Invalid,
    /// 401: missing or unknown API key.
    Unauthorized,
    /// 403: an API key of another app.
    Forbidden,
    /// 404: unknown device or route.
    NotFound,
    /// 405: a known route with a method it does not serve. PROTOCOL.md has
    /// no code for this; `method_not_allowed` is ours (the `Allow` header
    /// lists the methods the route serves).
    MethodNotAllowed,
    /// 413: the body, or a message's `data`, is over its limit.
    TooLarge,
    /// 415: the body is not declared `application/json`.
    UnsupportedMediaType,
    /// 429: the app's `max_messages_per_sec` is reached.
    RateLimited,
    /// 429: the fan-out queue is full.
    QueueFull,
    /// 503: the gateway is shutting down.
    Draining,
    /// 503: the durable store cannot write; nothing was accepted.
    StoreUnavailable,
}

impl ErrorCode {
    /// The wire code.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Invalid => "invalid",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::QueueFull => "queue_full",
            ErrorCode::Draining => "draining",
            ErrorCode::StoreUnavailable => "store_unavailable",
        }
    }

    /// The HTTP status that goes with the code.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::Invalid => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::RateLimited | ErrorCode::QueueFull => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::Draining | ErrorCode::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// A refusal: code, human message and, where the code asks for one,
/// `Retry-After` in seconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    pub retry_after_secs: Option<u64>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
            retry_after_secs: None,
        }
    }

    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::Invalid, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::Unauthorized, message)
    }

    pub fn forbidden() -> ApiError {
        ApiError::new(
            ErrorCode::Forbidden,
            "this API key belongs to another app than the one in the path",
        )
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::NotFound, message)
    }

    pub fn too_large(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::TooLarge, message)
    }

    pub fn draining() -> ApiError {
        ApiError::new(
            ErrorCode::Draining,
            "the gateway is shutting down; retry later",
        )
        .retry_after(DRAIN_RETRY_AFTER_SECS)
    }

    pub fn retry_after(mut self, secs: u64) -> ApiError {
        self.retry_after_secs = Some(secs);
        self
    }

    /// The `{"code", "message"}` object a batch result carries.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({"code": self.code.as_str(), "message": self.message})
    }
}

impl From<DispatchError> for ApiError {
    fn from(e: DispatchError) -> ApiError {
        match e {
            DispatchError::RateLimited { retry_after_secs } => ApiError::new(
                ErrorCode::RateLimited,
                format!("the app's max_messages_per_sec is reached; retry in {retry_after_secs} s"),
            )
            .retry_after(retry_after_secs),
            DispatchError::QueueFull => ApiError::new(
                ErrorCode::QueueFull,
                "the fan-out queue is full; nothing was accepted, retry shortly",
            )
            .retry_after(BUSY_RETRY_AFTER_SECS),
            DispatchError::StoreUnavailable(cause) => {
                // The cause (a path, an I/O error) is for the operator's log,
                // not for the client.
                tracing::warn!(%cause, "store unavailable: refusing an API call");
                ApiError::new(
                    ErrorCode::StoreUnavailable,
                    "the durable store cannot write; nothing was accepted, retry later",
                )
                .retry_after(BUSY_RETRY_AFTER_SECS)
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": self.code.as_str(), "message": self.message});
        let mut response = (self.code.status(), Json(body)).into_response();
        let headers = response.headers_mut();
        if let Some(secs) = self.retry_after_secs {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.code == ErrorCode::Unauthorized {
            // RFC 9110 §15.5.2: a 401 carries the scheme to use.
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

//! The WebSocket upgrade, parsed here rather than inside tungstenite so that
//! every refusal of PROTOCOL.md is a real HTTP response with its JSON body,
//! sent before the upgrade, and so that nothing of the handshake (buffers,
//! header maps) outlives it.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::hub::{Conn, ConnHandle, RegisterError};
use crate::limit::retry_after_secs;

use super::ticker::unix_secs;
use super::DeviceCtx;

/// The largest request head accepted (request line and headers).
const MAX_HEAD: usize = 8 * 1024;
const MAX_HEADERS: usize = 32;

/// A refusal, answered as `{"error": code, "message": …}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    pub retry_after: Option<u64>,
    /// The metric label (`pushgate_handshake_failures_total{reason}`).
    pub reason: &'static str,
}

impl Refusal {
    fn new(status: u16, code: &'static str, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            code,
            message: message.into(),
            retry_after: None,
            reason: code,
        }
    }

    fn bad(message: impl Into<String>) -> Refusal {
        Refusal::new(400, "bad_request", message)
    }

    /// The HTTP response bytes.
    pub fn response(&self) -> Vec<u8> {
        let body = serde_json::json!({"error": self.code, "message": self.message}).to_string();
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status,
            reason_phrase(self.status),
            body.len()
        );
        if self.status == 426 {
            head.push_str("Sec-WebSocket-Version: 13\r\n");
        }
        if let Some(secs) = self.retry_after {
            head.push_str(&format!("Retry-After: {secs}\r\n"));
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(body.as_bytes());
        out
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// A device admitted and registered in the hub.
#[derive(Debug)]
pub struct Admitted {
    pub conn: ConnHandle,
    /// The token's `topics` claim.
    pub allowed: Box<[String]>,
    /// The token's `exp`, unix seconds.
    pub exp: u64,
    /// Bytes the device sent after the request head (early frames).
    pub leftover: Vec<u8>,
}

/// How the handshake ended badly.
#[derive(Debug)]
pub enum HandshakeError {
    /// Refused with an HTTP response (already written).
    Refused(Refusal),
    /// The peer went away or sent garbage we could not answer.
    Io(std::io::Error),
}

/// What the request asked for, borrowed from the head buffer.
struct Request<'a> {
    method: &'a str,
    path: &'a str,
    query: Option<&'a str>,
    version: u8,
    upgrade: Option<&'a [u8]>,
    connection: Option<&'a [u8]>,
    key: Option<&'a [u8]>,
    ws_version: Option<&'a [u8]>,
    authorization: Option<&'a [u8]>,
}

/// Read the request head; returns the buffer and the head's length.
async fn read_head<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<(Vec<u8>, usize), HandshakeError> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        if buf.len() >= MAX_HEAD {
            return Err(HandshakeError::Refused(Refusal::bad(
                "request head larger than 8 KiB",
            )));
        }
        let mut chunk = [0u8; 1024];
        let want = (MAX_HEAD - buf.len()).min(chunk.len());
        let n = stream
            .read(&mut chunk[..want])
            .await
            .map_err(HandshakeError::Io)?;
        if n == 0 {
            return Err(HandshakeError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => return Ok((buf, len)),
            Ok(httparse::Status::Partial) => continue,
            Err(e) => {
                return Err(HandshakeError::Refused(Refusal::bad(format!(
                    "malformed HTTP request: {e}"
                ))))
            }
        }
    }
}

fn parse_request<'a>(
    head: &'a [u8],
    headers: &'a mut [httparse::Header<'a>; MAX_HEADERS],
) -> Result<Request<'a>, Refusal> {
    let mut req = httparse::Request::new(headers);
    req.parse(head)
        .map_err(|e| Refusal::bad(format!("malformed HTTP request: {e}")))?;
    let target = req.path.unwrap_or("/");
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let mut r = Request {
        method: req.method.unwrap_or(""),
        path,
        query,
        version: req.version.unwrap_or(0),
        upgrade: None,
        connection: None,
        key: None,
        ws_version: None,
        authorization: None,
    };
    for h in req.headers.iter() {
        let slot = if h.name.eq_ignore_ascii_case("upgrade") {
            &mut r.upgrade
        } else if h.name.eq_ignore_ascii_case("connection") {
            &mut r.connection
        } else if h.name.eq_ignore_ascii_case("sec-websocket-key") {
            &mut r.key
        } else if h.name.eq_ignore_ascii_case("sec-websocket-version") {
            &mut r.ws_version
        } else if h.name.eq_ignore_ascii_case("authorization") {
            &mut r.authorization
        } else {
            continue;
        };
        *slot = Some(h.value);
    }
    Ok(r)
}

fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Check the upgrade itself (RFC 6455 §4.2.1); returns the accept key.
fn check_upgrade(r: &Request<'_>) -> Result<String, Refusal> {
    if r.path != "/v1/connect" {
        return Err(Refusal::new(
            404,
            "not_found",
            format!("no endpoint at {}", r.path),
        ));
    }
    if r.method != "GET" {
        return Err(Refusal::bad("the upgrade must be a GET"));
    }
    if r.version != 1 {
        return Err(Refusal::bad("the upgrade needs HTTP/1.1"));
    }
    if !r.upgrade.is_some_and(|v| has_token(v, "websocket")) {
        return Err(Refusal::bad("missing `Upgrade: websocket`"));
    }
    if !r.connection.is_some_and(|v| has_token(v, "upgrade")) {
        return Err(Refusal::bad("missing `Connection: Upgrade`"));
    }
    let key = r
        .key
        .filter(|k| k.trim_ascii().len() == 24)
        .ok_or_else(|| Refusal::bad("missing or malformed Sec-WebSocket-Key"))?;
    match r.ws_version.map(<[u8]>::trim_ascii) {
        Some(b"13") => {}
        Some(_) => {
            let mut r = Refusal::new(
                426,
                "bad_request",
                "unsupported Sec-WebSocket-Version; this server speaks 13",
            );
            r.reason = "unsupported_version";
            return Err(r);
        }
        None => return Err(Refusal::bad("missing Sec-WebSocket-Version")),
    }
    Ok(derive_accept_key(key.trim_ascii()))
}

/// The token from `Authorization: Bearer` or `?token=`.
fn token<'a>(r: &Request<'a>) -> Option<std::borrow::Cow<'a, str>> {
    if let Some(v) = r.authorization {
        let v = std::str::from_utf8(v).ok()?.trim();
        let (scheme, rest) = v.split_once(' ')?;
        if scheme.eq_ignore_ascii_case("bearer") {
            return Some(std::borrow::Cow::Borrowed(rest.trim()));
        }
        return None;
    }
    let q = r.query?;
    q.split('&')
        .find_map(|kv| kv.strip_prefix("token="))
        .map(percent_decode)
}

fn percent_decode(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.contains('%') && !s.contains('+') {
        return std::borrow::Cow::Borrowed(s);
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    std::borrow::Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

/// Run the server side of the upgrade on `stream`. On success the device is
/// registered in the hub (replacing an older connection of the same device)
/// and the 101 response is written.
pub async fn handshake<S>(ctx: &Arc<DeviceCtx>, stream: &mut S) -> Result<Admitted, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (buf, head_len) = match read_head(stream).await {
        Ok(v) => v,
        Err(HandshakeError::Refused(r)) => return Err(refuse(stream, r).await),
        Err(e) => return Err(e),
    };
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let decided = decide(ctx, &buf[..head_len], &mut headers);
    match decided {
        Ok((conn, allowed, exp, accept)) => {
            // Registered from here on: if the write fails, or the handshake
            // timeout drops this future mid-write, the guard unregisters.
            let guard = Registered {
                hub: &ctx.hub,
                conn,
                kept: false,
            };
            let response = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
            );
            stream
                .write_all(response.as_bytes())
                .await
                .map_err(HandshakeError::Io)?;
            Ok(Admitted {
                conn: guard.keep(),
                allowed,
                exp,
                leftover: buf[head_len..].to_vec(),
            })
        }
        Err(r) => Err(refuse(stream, r).await),
    }
}

/// Unregisters a connection from the hub unless kept.
struct Registered<'a> {
    hub: &'a crate::hub::Hub,
    conn: ConnHandle,
    kept: bool,
}

impl Registered<'_> {
    fn keep(mut self) -> ConnHandle {
        self.kept = true;
        self.conn.clone()
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.hub.unregister(&self.conn);
        }
    }
}

async fn refuse<S: AsyncWrite + Unpin>(stream: &mut S, r: Refusal) -> HandshakeError {
    // Best effort: the peer may already be gone.
    let _ = stream.write_all(&r.response()).await;
    let _ = stream.shutdown().await;
    HandshakeError::Refused(r)
}

type Decision = (ConnHandle, Box<[String]>, u64, String);

/// Every check, cheapest first: the upgrade itself, drain, admission rate
/// (before any token work), the token, the app's connection limit.
fn decide<'a>(
    ctx: &Arc<DeviceCtx>,
    head: &'a [u8],
    headers: &'a mut [httparse::Header<'a>; MAX_HEADERS],
) -> Result<Decision, Refusal> {
    let req = parse_request(head, headers)?;
    let accept = check_upgrade(&req)?;
    if ctx.drain.is_draining() {
        let mut r = Refusal::new(
            503,
            "draining",
            "the gateway is shutting down; reconnect later",
        );
        r.retry_after = Some(jitter_secs(1, 5));
        return Err(r);
    }
    if let Err(wait) = ctx.handshake_limit.try_take() {
        let mut r = Refusal::new(
            503,
            "overloaded",
            "too many handshakes right now; retry later",
        );
        r.retry_after = Some(retry_after_secs(wait) + jitter_secs(0, 4));
        return Err(r);
    }
    let token = token(&req).ok_or_else(|| {
        Refusal::new(
            401,
            "unauthorized",
            "missing token: send `Authorization: Bearer <token>` or `?token=`",
        )
    })?;
    let (app, claims) = ctx
        .auth
        .verify_device_token(&token, unix_secs())
        .map_err(|e| Refusal::new(401, "unauthorized", e.to_string()))?;
    let conn = Conn::new(ctx.hub.next_conn_id(), app, Arc::from(claims.sub.as_str()));
    match ctx.hub.register(&conn) {
        Ok(_replaced) => {}
        Err(RegisterError::TooManyConnections) => {
            let mut r = Refusal::new(
                429,
                "too_many_connections",
                format!("app {} has reached its max_connections", claims.app),
            );
            r.retry_after = Some(jitter_secs(5, 30));
            return Err(r);
        }
    }
    Ok((conn, claims.topics.into_boxed_slice(), claims.exp, accept))
}

/// A random number of seconds in `lo..=hi`, so refused devices do not all
/// come back in the same second.
fn jitter_secs(lo: u64, hi: u64) -> u64 {
    rand::random_range(lo..=hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(text: &str) -> Result<String, Refusal> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let r = parse_request(text.as_bytes(), &mut headers)?;
        check_upgrade(&r)
    }

    const GOOD: &str = "GET /v1/connect?token=abc HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

    #[test]
    fn accepts_a_valid_upgrade() {
        // RFC 6455's own example key and answer.
        assert_eq!(req(GOOD).unwrap(), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn refusals() {
        let r = req(&GOOD.replace("/v1/connect", "/v2/connect")).unwrap_err();
        assert_eq!((r.status, r.code), (404, "not_found"));
        let r = req(&GOOD.replace("Version: 13", "Version: 8")).unwrap_err();
        assert_eq!((r.status, r.reason), (426, "unsupported_version"));
        assert!(String::from_utf8(r.response())
            .unwrap()
            .contains("Sec-WebSocket-Version: 13\r\n"));
        let r = req(&GOOD.replace("Upgrade: websocket\r\n", "")).unwrap_err();
        assert_eq!(r.status, 400);
        let r = req(&GOOD.replace("GET", "POST")).unwrap_err();
        assert_eq!(r.status, 400);
        let r = req(&GOOD.replace("dGhlIHNhbXBsZSBub25jZQ==", "short")).unwrap_err();
        assert_eq!(r.status, 400);
    }

    #[test]
    fn token_from_header_or_query() {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let r = parse_request(GOOD.as_bytes(), &mut headers).unwrap();
        assert_eq!(token(&r).unwrap(), "abc");
        let text = GOOD.replace("Host: x", "Authorization: Bearer xyz");
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let r = parse_request(text.as_bytes(), &mut headers).unwrap();
        assert_eq!(token(&r).unwrap(), "xyz");
        assert_eq!(percent_decode("a%2Eb%zz+"), "a.b%zz ");
        assert_eq!(percent_decode("abc%4"), "abc%4");
    }

    #[test]
    fn response_carries_json_and_retry_after() {
        let mut r = Refusal::new(503, "draining", "bye");
        r.retry_after = Some(3);
        let text = String::from_utf8(r.response()).unwrap();
        assert!(text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
        assert!(text.contains("Retry-After: 3\r\n"));
        assert!(text.ends_with(r#"{"error":"draining","message":"bye"}"#));
    }
}

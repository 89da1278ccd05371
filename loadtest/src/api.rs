//! A small HTTP/1.1 client for the backend API: keep-alive connections in a
//! pool, JSON bodies, bounded reads. Enough for POST /messages, /healthz and
//! /metrics; no TLS (the API listener is plaintext on loopback).

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufStream};
use tokio::net::TcpStream;

use crate::target::Endpoint;

/// Largest response body accepted (a /metrics page of a big gateway fits).
const MAX_BODY: usize = 16 << 20;
/// Longest status or header line accepted.
const MAX_LINE: u64 = 16 << 10;
/// Most headers in one response.
const MAX_HEADERS: usize = 200;
/// Pooled connections idle longer than this are dropped rather than reused,
/// so a server's idle timeout never races a request.
const MAX_IDLE: Duration = Duration::from_secs(5);

/// An HTTP response, body read in full.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// The `error` code of a JSON error body, if any.
    pub fn error_code(&self) -> Option<String> {
        self.json()?.get("error")?.as_str().map(str::to_string)
    }
}

struct Conn {
    s: BufStream<TcpStream>,
    idle_since: Instant,
}

/// A pool of keep-alive connections to one API listener.
pub struct Api {
    addr: SocketAddr,
    authority: String,
    key: Option<String>,
    pool: Mutex<Vec<Conn>>,
    timeout: Duration,
}

impl Api {
    pub fn new(ep: &Endpoint, key: Option<String>, timeout: Duration) -> Api {
        Api {
            addr: ep.addr,
            authority: ep.authority(),
            key,
            pool: Mutex::new(Vec::new()),
            timeout,
        }
    }

    fn take(&self) -> Option<Conn> {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(c) = pool.pop() {
            if c.idle_since.elapsed() < MAX_IDLE {
                return Some(c);
            }
        }
        None
    }

    fn put(&self, mut c: Conn) {
        c.idle_since = Instant::now();
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).push(c);
    }

    /// One request; the API key is sent as a bearer token when set.
    pub async fn call(&self, method: &str, path: &str, body: Option<&[u8]>) -> Result<Response> {
        let reused = self.take();
        let was_reused = reused.is_some();
        let mut conn = match reused {
            Some(c) => c,
            None => self.connect().await?,
        };
        let r =
            tokio::time::timeout(self.timeout, self.exchange(&mut conn, method, path, body)).await;
        match r {
            Ok(Ok((resp, keep))) => {
                if keep {
                    self.put(conn);
                }
                Ok(resp)
            }
            // A reused connection the server closed meanwhile: GET is safe to
            // repeat once on a fresh connection (POST is not retried).
            Ok(Err(_)) if was_reused && method == "GET" => {
                let mut conn = self.connect().await?;
                let (resp, keep) = tokio::time::timeout(
                    self.timeout,
                    self.exchange(&mut conn, method, path, body),
                )
                .await
                .with_context(|| {
                    format!("{method} {path}: no answer within {:?}", self.timeout)
                })??;
                if keep {
                    self.put(conn);
                }
                Ok(resp)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => bail!("{method} {path}: no answer within {:?}", self.timeout),
        }
    }

    pub async fn get(&self, path: &str) -> Result<Response> {
        self.call("GET", path, None).await
    }

    pub async fn post_json(&self, path: &str, body: &serde_json::Value) -> Result<Response> {
        let bytes = serde_json::to_vec(body)?;
        self.post(path, &bytes).await
    }

    /// POST a body that is already JSON text.
    pub async fn post(&self, path: &str, body: &[u8]) -> Result<Response> {
        self.call("POST", path, Some(body)).await
    }

    async fn connect(&self) -> Result<Conn> {
        let tcp = tokio::time::timeout(self.timeout, TcpStream::connect(self.addr))
            .await
            .with_context(|| format!("connecting to the API at {}: timeout", self.addr))?
            .with_context(|| format!("connecting to the API at {}", self.addr))?;
        let _ = tcp.set_nodelay(true);
        Ok(Conn {
            s: BufStream::new(tcp),
            idle_since: Instant::now(),
        })
    }

    async fn exchange(
        &self,
        conn: &mut Conn,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<(Response, bool)> {
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAccept: application/json\r\nUser-Agent: pushgate-loadtest\r\n",
            self.authority
        );
        if let Some(k) = &self.key {
            head.push_str(&format!("Authorization: Bearer {k}\r\n"));
        }
        if let Some(b) = body {
            head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        head.push_str("\r\n");
        conn.s.write_all(head.as_bytes()).await?;
        if let Some(b) = body {
            conn.s.write_all(b).await?;
        }
        conn.s.flush().await?;
        read_response(&mut conn.s, method == "HEAD").await
    }
}

async fn read_line(s: &mut BufStream<TcpStream>) -> Result<String> {
    let mut line = String::new();
    let n = (&mut *s).take(MAX_LINE).read_line(&mut line).await?;
    if n == 0 {
        bail!("connection closed by the server");
    }
    if !line.ends_with('\n') {
        bail!("response line too long or cut");
    }
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

/// Reads one response; the bool says whether the connection can be reused.
async fn read_response(s: &mut BufStream<TcpStream>, head_only: bool) -> Result<(Response, bool)> {
    let status_line = read_line(s).await?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let status: u16 = parts
        .next()
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    if !version.starts_with("HTTP/1.") {
        bail!("bad status line {status_line:?}");
    }
    let mut headers = Vec::new();
    // Bounded by MAX_HEADERS.
    loop {
        let line = read_line(s).await?;
        if line.is_empty() {
            break;
        }
        if headers.len() >= MAX_HEADERS {
            bail!("more than {MAX_HEADERS} response headers");
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let find = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let mut keep = !find("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"))
        && version == "HTTP/1.1";
    let chunked =
        find("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let length = find("content-length").and_then(|v| v.parse::<usize>().ok());
    let no_body = head_only || status == 204 || status == 304 || (100..200).contains(&status);
    let mut body = Vec::new();
    if no_body {
    } else if chunked {
        // Bounded by MAX_BODY.
        loop {
            let size_line = read_line(s).await?;
            let size_hex = size_line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size_hex, 16)
                .with_context(|| format!("bad chunk size {size_line:?}"))?;
            if size == 0 {
                // Trailers, then the empty line.
                while !read_line(s).await?.is_empty() {}
                break;
            }
            if body.len() + size > MAX_BODY {
                bail!("response body over {MAX_BODY} bytes");
            }
            let start = body.len();
            body.resize(start + size, 0);
            s.read_exact(&mut body[start..]).await?;
            let _ = read_line(s).await?;
        }
    } else if let Some(len) = length {
        if len > MAX_BODY {
            bail!("response body over {MAX_BODY} bytes");
        }
        body.resize(len, 0);
        s.read_exact(&mut body).await?;
    } else {
        (&mut *s)
            .take(MAX_BODY as u64)
            .read_to_end(&mut body)
            .await?;
        keep = false;
    }
    Ok((
        Response {
            status,
            headers,
            body,
        },
        keep,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn serve_once(answer: &'static [u8]) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let mut buf = vec![0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(answer).await;
        });
        addr
    }

    fn ep(addr: SocketAddr) -> Endpoint {
        Endpoint {
            scheme: "http".into(),
            host: "127.0.0.1".into(),
            port: addr.port(),
            path: "/".into(),
            addr,
        }
    }

    #[tokio::test]
    async fn reads_length_and_chunked_bodies() {
        let addr =
            serve_once(b"HTTP/1.1 202 Accepted\r\nContent-Length: 12\r\n\r\n{\"online\":1}").await;
        let api = Api::new(&ep(addr), Some("k".into()), Duration::from_secs(5));
        let r = api
            .post_json("/x", &serde_json::json!({}))
            .await
            .expect("answer");
        assert_eq!(r.status, 202);
        assert_eq!(r.json().expect("json")["online"], 1);

        let addr = serve_once(
            b"HTTP/1.1 429 Too Many\r\nTransfer-Encoding: chunked\r\nRetry-After: 1\r\n\r\n5\r\n{\"err\r\n11\r\nor\":\"queue_full\"}\r\n0\r\n\r\n",
        )
        .await;
        let api = Api::new(&ep(addr), None, Duration::from_secs(5));
        let r = api.get("/y").await.expect("answer");
        assert_eq!(r.status, 429);
        assert_eq!(r.header("retry-after"), Some("1"));
        assert_eq!(r.error_code().as_deref(), Some("queue_full"));
    }
}

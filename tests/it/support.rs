//! Test harness: a gateway started in-process on 127.0.0.1:0, a WebSocket
//! device client, a raw HTTP client, and tokens. Every wait is bounded.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use pushgate::config::Config;
use pushgate::node::Node;

/// Long enough for a loaded 2-core machine; only reached when a test fails.
pub const WAIT: Duration = Duration::from_secs(15);

pub const SECRET: &str = "demo-secret-0123456789";
pub const KEY: &str = "demo-key";
pub const OTHER_SECRET: &str = "other-secret-0123456789";
pub const OTHER_KEY: &str = "other-key";

/// The base config of every test: two apps, memory store, ephemeral ports.
pub fn base_toml() -> String {
    format!(
        r#"
[device]
listen = "127.0.0.1:0"
heartbeat_secs = 30

[api]
listen = "127.0.0.1:0"

[store]
kind = "memory"

[shutdown]
drain_secs = 1

[[app]]
id = "demo"
device_secret = "{SECRET}"
api_keys = ["{KEY}"]

[[app]]
id = "other"
device_secret = "{OTHER_SECRET}"
api_keys = ["{OTHER_KEY}"]
"#
    )
}

pub fn config(toml: &str) -> Config {
    pushgate::config::parse(toml).unwrap_or_else(|e| panic!("test config: {e}"))
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A device token of app `demo`.
pub fn token(device: &str, topics: &[&str]) -> String {
    token_for("demo", SECRET, device, now_secs() + 3600, topics)
}

pub fn token_for(app: &str, secret: &str, device: &str, exp: u64, topics: &[&str]) -> String {
    let topics: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
    pushgate::auth::issue_device_token(secret, app, device, exp, &topics).unwrap()
}

/// A running in-process gateway.
pub struct Gateway {
    pub node: Option<Node>,
    pub device: SocketAddr,
    pub api: SocketAddr,
}

impl Gateway {
    pub async fn start() -> Gateway {
        Gateway::with_toml(&base_toml()).await
    }

    /// Start with the base config with `edit` applied to its text.
    pub async fn with(edit: impl FnOnce(String) -> String) -> Gateway {
        Gateway::with_toml(&edit(base_toml())).await
    }

    pub async fn with_toml(toml: &str) -> Gateway {
        Gateway::with_config(config(toml)).await
    }

    pub async fn with_config(cfg: Config) -> Gateway {
        let node = Node::start(cfg, Default::default())
            .await
            .expect("gateway starts");
        Gateway {
            device: node.device_addr,
            api: node.api_addr,
            node: Some(node),
        }
    }

    pub fn node(&self) -> &Node {
        self.node.as_ref().unwrap()
    }

    pub async fn connect(&self, device: &str) -> Device {
        self.connect_token(&token(device, &["*"])).await
    }

    pub async fn connect_token(&self, token: &str) -> Device {
        let url = format!("ws://{}/v1/connect?token={token}", self.device);
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect in time")
            .expect("upgrade accepted");
        let mut d = Device { ws };
        let hello = d.recv().await;
        assert_eq!(hello["t"], "hello", "{hello}");
        d
    }

    /// An API call with the demo key.
    pub async fn api(&self, method: &str, path: &str, body: Option<Value>) -> Resp {
        http(
            self.api,
            method,
            path,
            Some(KEY),
            body.map(|b| b.to_string()).as_deref(),
            "application/json",
        )
        .await
    }

    /// `POST /v1/apps/demo/messages` and expect 202.
    pub async fn push(&self, body: Value) -> Value {
        let r = self.api("POST", "/v1/apps/demo/messages", Some(body)).await;
        assert_eq!(r.status, 202, "{}", r.body);
        r.json()
    }

    pub async fn metrics(&self) -> String {
        http(self.api, "GET", "/metrics", None, None, "").await.body
    }

    /// Wait until `cond` holds on the gateway's node (polling, bounded).
    pub async fn until(&self, what: &str, cond: impl Fn(&Node) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !cond(self.node()) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A metric's value from the text exposition (the first sample whose name
/// and labels start with `prefix`).
pub fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| {
            l.strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {prefix}"))
}

/// A device's WebSocket.
pub struct Device {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// What the gateway did to a device's socket.
#[derive(Debug, PartialEq)]
pub enum Event {
    Frame(Value),
    Closed(Option<u16>),
}

impl Device {
    /// The next gateway frame (pings are answered by tungstenite).
    pub async fn recv(&mut self) -> Value {
        match self.next_event().await {
            Event::Frame(v) => v,
            Event::Closed(code) => panic!("expected a frame, the connection closed ({code:?})"),
        }
    }

    pub async fn next_event(&mut self) -> Event {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a frame in time");
            match msg {
                Some(Ok(Message::Text(t))) => {
                    return Event::Frame(serde_json::from_str(&t).expect("gateway frames are JSON"))
                }
                Some(Ok(Message::Close(frame))) => {
                    return Event::Closed(frame.map(|f| u16::from(f.code)))
                }
                Some(Ok(Message::Binary(_))) => panic!("gateway sent a binary frame"),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Event::Closed(None),
            }
        }
    }

    /// Expect the close code after an optional `bye`.
    pub async fn expect_close(&mut self, bye: Option<&str>, code: u16) -> Option<Value> {
        let mut bye_frame = None;
        if let Some(reason) = bye {
            let f = self.recv().await;
            assert_eq!(f["t"], "bye", "{f}");
            assert_eq!(f["reason"], reason, "{f}");
            bye_frame = Some(f);
        }
        match self.next_event().await {
            Event::Closed(c) => assert_eq!(c, Some(code)),
            Event::Frame(f) => panic!("expected close {code}, got {f}"),
        }
        bye_frame
    }

    /// Assert nothing arrives for `d` (only for "nothing more" checks).
    pub async fn expect_silence(&mut self, d: Duration) {
        if let Ok(Some(Ok(Message::Text(t)))) = tokio::time::timeout(d, self.ws.next()).await {
            panic!("unexpected frame {t}");
        }
    }

    pub async fn send(&mut self, v: Value) {
        self.ws
            .send(Message::Text(v.to_string().into()))
            .await
            .unwrap();
    }

    pub async fn send_raw(&mut self, m: Message) {
        self.ws.send(m).await.unwrap();
    }

    pub async fn ack(&mut self, seq: u64) {
        self.send(serde_json::json!({"t": "ack", "seq": seq})).await;
    }

    pub async fn close(mut self) {
        let _ = self
            .ws
            .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            }))
            .await;
        let _ = tokio::time::timeout(WAIT, async { while self.ws.next().await.is_some() {} }).await;
    }
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The error code of a JSON error answer.
    pub fn code(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

/// A minimal HTTP/1.1 client: one request per connection.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&str>,
    content_type: &str,
) -> Resp {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(k) = key {
        req.push_str(&format!("Authorization: Bearer {k}\r\n"));
    }
    if let Some(b) = body {
        if !content_type.is_empty() {
            req.push_str(&format!("Content-Type: {content_type}\r\n"));
        }
        req.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    req.push_str("\r\n");
    if let Some(b) = body {
        req.push_str(b);
    }
    raw_http(addr, req.as_bytes()).await
}

/// Like [`http`], but `None` instead of a panic when there is no complete
/// answer (refused, reset, cut short): for peers that may die mid-request.
pub async fn try_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&str>,
) -> Option<Resp> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(k) = key {
        req.push_str(&format!("Authorization: Bearer {k}\r\n"));
    }
    if let Some(b) = body {
        req.push_str("Content-Type: application/json\r\n");
        req.push_str(&format!("Content-Length: {}\r\n\r\n{b}", b.len()));
    } else {
        req.push_str("\r\n");
    }
    let exchange = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            let n = s.read(&mut chunk).await.ok()?;
            if n == 0 {
                return parse_resp(&buf);
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(resp) = parse_resp(&buf) {
                return Some(resp);
            }
        }
    };
    tokio::time::timeout(WAIT, exchange).await.ok().flatten()
}

/// Send raw bytes, read the whole answer (the server closes), parse it.
pub async fn raw_http(addr: SocketAddr, request: &[u8]) -> Resp {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    let read = async {
        // Read until the head is in and then Content-Length bytes of body.
        let mut chunk = [0u8; 8192];
        loop {
            let n = s.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(resp) = parse_resp(&buf) {
                return Some(resp);
            }
        }
        parse_resp(&buf)
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("answer in time")
        .unwrap_or_else(|| {
            panic!(
                "no complete HTTP answer: {:?}",
                String::from_utf8_lossy(&buf)
            )
        })
}

fn parse_resp(buf: &[u8]) -> Option<Resp> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut r = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(head) = r.parse(buf).ok()? else {
        return None;
    };
    let headers: Vec<(String, String)> = r
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_string(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let status = r.code?;
    let len = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok());
    let body = &buf[head..];
    match len {
        Some(n) if body.len() >= n => Some(Resp {
            status,
            headers,
            body: String::from_utf8_lossy(&body[..n]).into_owned(),
        }),
        Some(_) => None,
        None if status == 101 || status == 204 => Some(Resp {
            status,
            headers,
            body: String::new(),
        }),
        None => None,
    }
}

/// An upgrade request with the given token and extra header lines.
pub fn upgrade_request(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

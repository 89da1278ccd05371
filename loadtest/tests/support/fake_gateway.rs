//! A tiny stand-in for pushgate, written from PROTOCOL.md, so the load
//! tester's client side (auth, hello, sub, acks, fan-out, device seqs,
//! storms, refusals) is tested without the real gateway. It keeps nothing
//! durable and implements only what the load tester uses.

// tungstenite's handshake callback returns its (large) ErrorResponse by value.
#![allow(clippy::result_large_err)]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::Message;

pub const APP: &str = "fake";
pub const SECRET: &str = "fake-secret";
pub const API_KEY: &str = "fake-key";

#[derive(Debug, Clone, Deserialize)]
struct Claims {
    app: String,
    sub: String,
    #[serde(default)]
    topics: Vec<String>,
}

struct Conn {
    id: u64,
    tx: mpsc::UnboundedSender<Message>,
    topics: Arc<Mutex<HashSet<String>>>,
}

#[derive(Default)]
struct State {
    conns: Mutex<HashMap<String, Conn>>,
    seqs: Mutex<HashMap<String, u64>>,
    next_id: AtomicU64,
    /// Upgrades refused with 503 until this many have been refused (to test retries).
    refuse_next: AtomicU64,
}

/// The fake's two listeners.
pub struct Fake {
    pub device: SocketAddr,
    pub api: SocketAddr,
    state: Arc<State>,
}

impl Fake {
    pub async fn start() -> Fake {
        let dl = TcpListener::bind("127.0.0.1:0").await.expect("bind device");
        let al = TcpListener::bind("127.0.0.1:0").await.expect("bind api");
        let state = Arc::new(State::default());
        let fake = Fake {
            device: dl.local_addr().expect("addr"),
            api: al.local_addr().expect("addr"),
            state: state.clone(),
        };
        let s = state.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = dl.accept().await {
                tokio::spawn(device_conn(s.clone(), tcp));
            }
        });
        tokio::spawn(async move {
            while let Ok((tcp, _)) = al.accept().await {
                tokio::spawn(api_conn(state.clone(), tcp));
            }
        });
        fake
    }

    /// Refuse the next `n` upgrades with 503 overloaded.
    pub fn refuse_next(&self, n: u64) {
        self.state.refuse_next.store(n, Ordering::SeqCst);
    }

    pub fn connected(&self) -> usize {
        self.state.conns.lock().expect("lock").len()
    }
}

fn refusal(status: u16, code: &str) -> ErrorResponse {
    let mut r = ErrorResponse::new(Some(json!({"error": code, "message": code}).to_string()));
    *r.status_mut() =
        tokio_tungstenite::tungstenite::http::StatusCode::from_u16(status).expect("status");
    if status == 503 {
        r.headers_mut()
            .insert("retry-after", "1".parse().expect("header"));
    }
    r
}

fn verify(req: &Request) -> Result<Claims, ErrorResponse> {
    if req.uri().path() != "/v1/connect" {
        return Err(refusal(404, "not_found"));
    }
    let from_header = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let from_query = req.uri().query().and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("token=").map(str::to_string))
    });
    let token = from_header
        .or(from_query)
        .ok_or_else(|| refusal(401, "unauthorized"))?;
    let data = jsonwebtoken::decode::<Claims>(
        &token,
        &DecodingKey::from_secret(SECRET.as_bytes()),
        &Validation::new(Algorithm::HS256),
    )
    .map_err(|_| refusal(401, "unauthorized"))?;
    if data.claims.app != APP {
        return Err(refusal(401, "unauthorized"));
    }
    Ok(data.claims)
}

async fn device_conn(state: Arc<State>, tcp: TcpStream) {
    let claims = Arc::new(Mutex::new(None));
    let c2 = claims.clone();
    let st = state.clone();
    let cb = move |req: &Request, resp: Response| {
        // One atomic step: two handshakes at once must not both take the
        // last refusal (that refused 21 of 20 now and then).
        let refused = st
            .refuse_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if refused {
            return Err(refusal(503, "overloaded"));
        }
        let c = verify(req)?;
        *c2.lock().expect("lock") = Some(c);
        Ok(resp)
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, cb).await else {
        return;
    };
    let Some(claims) = claims.lock().expect("lock").take() else {
        return;
    };
    let device = claims.sub.clone();
    let hello = json!({"t": "hello", "device": device, "heartbeat": 30}).to_string();
    if ws.send(Message::text(hello)).await.is_err() {
        return;
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let id = state.next_id.fetch_add(1, Ordering::SeqCst);
    let topics = Arc::new(Mutex::new(HashSet::new()));
    let old = state.conns.lock().expect("lock").insert(
        device.clone(),
        Conn {
            id,
            tx,
            topics: topics.clone(),
        },
    );
    if let Some(old) = old {
        let _ = old.tx.send(Message::text(
            json!({"t": "bye", "reason": "replaced"}).to_string(),
        ));
        let _ = old.tx.send(Message::Close(None));
    }
    loop {
        tokio::select! {
            out = rx.recv() => match out {
                Some(Message::Close(_)) | None => {
                    let _ = ws.close(None).await;
                    break;
                }
                Some(m) => if ws.send(m).await.is_err() { break },
            },
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap_or_default();
                    match v.get("t").and_then(|t| t.as_str()) {
                        Some("sub") => {
                            let topic = v["topic"].as_str().unwrap_or_default().to_string();
                            let allowed = claims.topics.iter().any(|p| match p.strip_suffix('*') {
                                Some(prefix) => topic.starts_with(prefix),
                                None => *p == topic,
                            });
                            let answer = if allowed {
                                topics.lock().expect("lock").insert(topic.clone());
                                json!({"t": "subscribed", "topic": topic})
                            } else {
                                json!({"t": "error", "code": "forbidden", "message": "topic not in token"})
                            };
                            if ws.send(Message::text(answer.to_string())).await.is_err() { break }
                        }
                        Some("ack") => {}
                        _ => {
                            let e = json!({"t": "error", "code": "unknown_type", "message": "?"});
                            if ws.send(Message::text(e.to_string())).await.is_err() { break }
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
        }
    }
    let mut conns = state.conns.lock().expect("lock");
    if conns.get(&device).is_some_and(|c| c.id == id) {
        conns.remove(&device);
    }
}

/// Hands one message to its targets; returns (online, stored).
fn deliver(state: &State, msg: &Value) -> Result<(u64, u64), String> {
    let to = msg.get("to").ok_or("to missing")?;
    let data = msg.get("data").cloned().unwrap_or(Value::Null);
    let id = state.next_id.fetch_add(1, Ordering::SeqCst).to_string();
    let conns = state.conns.lock().expect("lock");
    if to.get("broadcast").is_some() {
        let frame = json!({"t": "msg", "id": id, "data": data}).to_string();
        for c in conns.values() {
            let _ = c.tx.send(Message::text(frame.clone()));
        }
        return Ok((conns.len() as u64, 0));
    }
    if let Some(topic) = to.get("topic").and_then(|t| t.as_str()) {
        let frame = json!({"t": "msg", "id": id, "topic": topic, "data": data}).to_string();
        let mut n = 0;
        for c in conns.values() {
            if c.topics.lock().expect("lock").contains(topic) {
                let _ = c.tx.send(Message::text(frame.clone()));
                n += 1;
            }
        }
        return Ok((n, 0));
    }
    if let Some(device) = to.get("device").and_then(|t| t.as_str()) {
        let ttl = msg.get("ttl").and_then(|t| t.as_u64()).unwrap_or(3600);
        let online = conns.get(device);
        if ttl == 0 {
            let frame = json!({"t": "msg", "id": id, "data": data}).to_string();
            return Ok(match online {
                Some(c) => (u64::from(c.tx.send(Message::text(frame)).is_ok()), 0),
                None => (0, 0),
            });
        }
        let mut seqs = state.seqs.lock().expect("lock");
        let seq = seqs.entry(device.to_string()).or_insert(0);
        *seq += 1;
        let frame = json!({"t": "msg", "id": id, "seq": *seq, "data": data}).to_string();
        let online = match online {
            Some(c) => u64::from(c.tx.send(Message::text(frame)).is_ok()),
            None => 0,
        };
        return Ok((online, 1));
    }
    Err("bad to".into())
}

async fn api_conn(state: Arc<State>, tcp: TcpStream) {
    let mut r = BufReader::new(tcp);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, path) = (
            parts.next().unwrap_or_default().to_string(),
            parts.next().unwrap_or_default().to_string(),
        );
        let mut len = 0usize;
        let mut auth = String::new();
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).await.unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                match k.to_ascii_lowercase().as_str() {
                    "content-length" => len = v.trim().parse().unwrap_or(0),
                    "authorization" => auth = v.trim().to_string(),
                    _ => {}
                }
            }
        }
        let mut body = vec![0u8; len];
        if r.read_exact(&mut body).await.is_err() {
            return;
        }
        let (status, answer) = route(&state, &method, &path, &auth, &body);
        let text = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}",
            answer.len()
        );
        if r.get_mut().write_all(text.as_bytes()).await.is_err() {
            return;
        }
    }
}

fn route(state: &State, method: &str, path: &str, auth: &str, body: &[u8]) -> (u16, String) {
    match (method, path) {
        ("GET", "/healthz") => return (200, "{}".into()),
        ("GET", "/metrics") => {
            let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
            let kb: u64 = status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            return (
                200,
                format!(
                    "process_resident_memory_bytes {}\nprocess_cpu_seconds_total 0\n",
                    kb * 1024
                ),
            );
        }
        _ => {}
    }
    let prefix = format!("/v1/apps/{APP}/messages");
    if !path.starts_with(&prefix) || method != "POST" {
        return (
            404,
            json!({"error": "not_found", "message": path}).to_string(),
        );
    }
    if auth != format!("Bearer {API_KEY}") {
        return (
            401,
            json!({"error": "unauthorized", "message": "key"}).to_string(),
        );
    }
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return (
            400,
            json!({"error": "invalid", "message": "json"}).to_string(),
        );
    };
    if path == prefix {
        match deliver(state, &v) {
            Ok((online, stored)) => (
                202,
                json!({"id": "x", "online": online, "stored": stored}).to_string(),
            ),
            Err(e) => (400, json!({"error": "invalid", "message": e}).to_string()),
        }
    } else if path == format!("{prefix}/batch") {
        let results: Vec<Value> = v["messages"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|m| match deliver(state, m) {
                Ok((online, stored)) => json!({"id": "x", "online": online, "stored": stored}),
                Err(e) => json!({"error": {"code": "invalid", "message": e}}),
            })
            .collect();
        (200, json!({"results": results}).to_string())
    } else {
        (
            404,
            json!({"error": "not_found", "message": path}).to_string(),
        )
    }
}

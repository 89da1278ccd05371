//! A small device client for trying pushgate by hand: connects, prints
//! every frame, acks device-directed messages, and can subscribe to topics.
//!
//! ```text
//! cargo run --example device -- --url ws://127.0.0.1:8080/v1/connect --token <TOKEN> [--sub news]
//! ```

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

fn usage() -> ! {
    eprintln!(
        "usage: device --url ws://HOST:PORT/v1/connect --token TOKEN [--sub TOPIC]... [--no-ack]"
    );
    std::process::exit(2)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut url = None;
    let mut token = None;
    let mut subs = Vec::new();
    let mut ack = true;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--url" => url = args.next(),
            "--token" => token = args.next(),
            "--sub" => subs.extend(args.next()),
            "--no-ack" => ack = false,
            _ => usage(),
        }
    }
    let (Some(url), Some(token)) = (url, token) else {
        usage()
    };
    let sep = if url.contains('?') { '&' } else { '?' };
    let full = format!("{url}{sep}token={token}");
    let (mut ws, _) = match tokio_tungstenite::connect_async(&full).await {
        Ok(v) => v,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            eprintln!("refused: HTTP {} {body}", resp.status());
            std::process::exit(1)
        }
        Err(e) => {
            eprintln!("cannot connect to {url}: {e}");
            std::process::exit(1)
        }
    };
    for topic in subs {
        let frame = serde_json::json!({"t": "sub", "topic": topic}).to_string();
        if ws.send(Message::Text(frame.into())).await.is_err() {
            std::process::exit(1)
        }
    }
    while let Some(msg) = ws.next().await {
        match msg {
            Ok(Message::Text(text)) => {
                println!("{text}");
                let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                if let (true, Some(seq)) = (ack, v.get("seq").and_then(|s| s.as_u64())) {
                    let frame = serde_json::json!({"t": "ack", "seq": seq}).to_string();
                    let _ = ws.send(Message::Text(frame.into())).await;
                }
                if v["t"] == "bye" {
                    let retry = v["retry_ms"].as_u64().unwrap_or(0);
                    eprintln!(
                        "gateway said bye ({}); a real device reconnects after {retry} ms",
                        v["reason"]
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            Ok(Message::Close(frame)) => {
                eprintln!("closed: {frame:?}");
                break;
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("connection error: {e}");
                break;
            }
        }
    }
}

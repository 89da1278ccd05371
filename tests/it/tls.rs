//! wss:// with a certificate from the config.

use std::sync::Arc;

use futures_util::StreamExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

#[tokio::test]
async fn wss_connect_and_deliver() {
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, certified.cert.pem()).unwrap();
    std::fs::write(&key_path, certified.signing_key.serialize_pem()).unwrap();
    let gw = Gateway::with(|t| {
        t.replace(
            "heartbeat_secs = 30",
            &format!(
                "heartbeat_secs = 30\ntls_cert = {:?}\ntls_key = {:?}",
                cert_path.display().to_string(),
                key_path.display().to_string()
            ),
        )
    })
    .await;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(certified.cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let tcp = tokio::net::TcpStream::connect(gw.device).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.expect("TLS handshake");
    let url = format!("wss://localhost/v1/connect?token={}", token("tls-1", &[]));
    let (mut ws, _) = tokio_tungstenite::client_async(url, tls)
        .await
        .expect("upgrade over TLS");
    let next = |m: Option<Result<Message, _>>| -> serde_json::Value {
        match m {
            Some(Ok(Message::Text(t))) => serde_json::from_str(&t).unwrap(),
            other => panic!("{other:?}"),
        }
    };
    let hello = next(tokio::time::timeout(WAIT, ws.next()).await.unwrap());
    assert_eq!(hello["t"], "hello");
    gw.push(json!({"to": {"device": "tls-1"}, "data": "secure"}))
        .await;
    let m = next(tokio::time::timeout(WAIT, ws.next()).await.unwrap());
    assert_eq!(m["data"], "secure");

    // Plain HTTP to the TLS port is not an upgrade: it fails the handshake.
    let plain = tokio::net::TcpStream::connect(gw.device).await.unwrap();
    drop(plain);
}

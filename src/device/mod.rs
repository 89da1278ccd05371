//! The device side: the listener (accept, TLS, admission, the upgrade) and
//! one task per connection.

pub mod conn;
pub mod handshake;
pub mod ticker;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::auth::Auth;
use crate::config::DeviceConfig;
use crate::hub::Hub;
use crate::limit::RateLimiter;
use crate::metrics::Metrics;
use crate::shutdown::Drain;
use crate::store::Store;

use handshake::HandshakeError;
use ticker::Ticker;

/// What every device connection shares.
pub struct DeviceCtx {
    pub hub: Arc<Hub>,
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    pub auth: Arc<Auth>,
    pub drain: Arc<Drain>,
    pub cfg: DeviceConfig,
    pub handshake_limit: RateLimiter,
    pub ticker: Arc<Ticker>,
    pub ws_config: WebSocketConfig,
}

impl DeviceCtx {
    pub fn new(
        hub: Arc<Hub>,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        auth: Arc<Auth>,
        drain: Arc<Drain>,
        cfg: DeviceConfig,
    ) -> DeviceCtx {
        DeviceCtx {
            handshake_limit: RateLimiter::new(cfg.max_handshakes_per_sec),
            ticker: Arc::new(Ticker::new(Duration::from_secs(cfg.heartbeat_secs))),
            ws_config: ws_config(&cfg),
            hub,
            store,
            metrics,
            auth,
            drain,
            cfg,
        }
    }
}

/// tungstenite's buffers sized for millions of idle sockets, not for
/// throughput: its defaults allocate 128 KiB per connection.
pub fn ws_config(cfg: &DeviceConfig) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(256)
        .write_buffer_size(0)
        .max_write_buffer_size(256 * 1024)
        .max_message_size(Some(cfg.max_frame_bytes))
        .max_frame_size(Some(cfg.max_frame_bytes))
}

/// Build the TLS acceptor from PEM files.
pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: cannot read certificate: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in the file", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("{}: cannot read private key: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("TLS certificate and key do not fit: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Accept device connections forever. A permit of `max_pending_handshakes`
/// is taken before `accept()`, so a handshake flood pushes back into the
/// kernel's backlog instead of piling up here; `accept()` errors such as
/// EMFILE back off instead of spinning.
pub async fn serve(listener: TcpListener, ctx: Arc<DeviceCtx>, tls: Option<TlsAcceptor>) {
    let permits = Arc::new(Semaphore::new(ctx.cfg.max_pending_handshakes));
    let mut backoff = crate::net::AcceptBackoff::new();
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return; // never closed
        };
        let (tcp, peer) = match listener.accept().await {
            Ok(v) => {
                backoff.reset();
                v
            }
            Err(e) => {
                backoff.on_error(&e).await;
                continue;
            }
        };
        crate::net::tune_accepted(&tcp);
        let ctx = ctx.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => connection(ctx, tcp, peer, permit).await,
                Some(acceptor) => tls_connection(ctx, tcp, peer, acceptor, permit).await,
            }
        });
    }
}

async fn tls_connection(
    ctx: Arc<DeviceCtx>,
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    permit: OwnedSemaphorePermit,
) {
    let timeout = Duration::from_secs(ctx.cfg.handshake_timeout_secs);
    let deadline = tokio::time::Instant::now() + timeout;
    // Boxed: the TLS handshake future is ~10 KB and must not stay inline
    // in a task that lives for days.
    let tls = Box::pin(tokio::time::timeout_at(deadline, acceptor.accept(tcp))).await;
    match tls {
        Ok(Ok(stream)) => upgrade(ctx, stream, peer, permit, deadline).await,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            ctx.metrics.handshake_failed("tls");
        }
        Err(_) => ctx.metrics.handshake_failed("timeout"),
    }
}

async fn connection(
    ctx: Arc<DeviceCtx>,
    tcp: TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
) {
    let deadline =
        tokio::time::Instant::now() + Duration::from_secs(ctx.cfg.handshake_timeout_secs);
    upgrade(ctx, tcp, peer, permit, deadline).await
}

/// The upgrade under the handshake deadline, then the connection.
async fn upgrade<S>(
    ctx: Arc<DeviceCtx>,
    mut stream: S,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
    deadline: tokio::time::Instant,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let hs = Box::pin(tokio::time::timeout_at(
        deadline,
        handshake::handshake(&ctx, &mut stream),
    ))
    .await;
    drop(permit);
    match hs {
        Ok(Ok(admitted)) => conn::run(ctx, stream, admitted).await,
        Ok(Err(HandshakeError::Refused(r))) => {
            tracing::debug!(%peer, status = r.status, code = r.code, message = %r.message, "upgrade refused");
            ctx.metrics.handshake_failed(r.reason);
        }
        Ok(Err(HandshakeError::Io(e))) => {
            tracing::debug!(%peer, error = %e, "handshake I/O failed");
            ctx.metrics.handshake_failed("io");
        }
        // Closed without a response, as PROTOCOL.md says.
        Err(_) => ctx.metrics.handshake_failed("timeout"),
    }
}

/// Drive one already-upgraded in-memory or other stream through the real
/// handshake and connection code (used by the scale bench and tests).
pub async fn serve_stream<S>(ctx: Arc<DeviceCtx>, stream: S)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (permit_src, peer) = (
        Arc::new(Semaphore::new(1)),
        SocketAddr::from(([0, 0, 0, 0], 0)),
    );
    let Ok(permit) = permit_src.acquire_owned().await else {
        return;
    };
    let deadline =
        tokio::time::Instant::now() + Duration::from_secs(ctx.cfg.handshake_timeout_secs);
    upgrade(ctx, stream, peer, permit, deadline).await
}

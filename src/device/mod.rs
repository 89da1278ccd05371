//! The device side: the listener (accept, TLS, admission, the upgrade) and
//! one task per connection.

pub mod conn;
pub mod handshake;
pub mod ticker;
mod tls;
mod ws;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::auth::Auth;
use crate::config::DeviceConfig;
use crate::hub::Hub;
use crate::limit::RateLimiter;
use crate::metrics::Metrics;
use crate::shutdown::Drain;
use crate::store::Store;

use conn::Connection;
use handshake::HandshakeError;
use ticker::Ticker;
use tls::TlsStream;

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

/// Bytes of tungstenite's read buffer per connection (see [`ws_config`]).
pub const READ_BUFFER: usize = 64;

/// tungstenite's buffers sized for millions of idle sockets, not for
/// throughput: its defaults allocate 128 KiB per connection.
///
/// The read buffer is allocated at the upgrade and kept for the
/// connection's life, so its size is paid by every idle socket: 64 bytes
/// hold what devices send (a pong is 6 bytes, an ack about 40); a longer
/// frame grows the buffer to its length (tungstenite reserves the whole
/// frame once its header is read), it is just read 64 bytes per call.
/// Nothing is written through tungstenite's own out buffer except control
/// frames (see `conn`), hence `write_buffer_size` 0.
pub fn ws_config(cfg: &DeviceConfig) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_write_buffer_size(256 * 1024)
        .max_message_size(Some(cfg.max_frame_bytes))
        .max_frame_size(Some(cfg.max_frame_bytes))
}

/// Build the TLS server configuration from PEM files.
pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, String> {
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
    // The rest stays rustls's defaults: none of its knobs changes what an
    // idle connection keeps (measured, BENCHMARKS.md "Where an idle wss
    // connection's bytes go"). `send_tls13_tickets = 0` saves 13 bytes per
    // connection (the shared 256-entry session cache), the cipher suite
    // does not matter (ring's key type is one enum, 560 bytes for every
    // AEAD), and the 640-byte handshake span list rustls keeps has no
    // setting. The 4 KiB read buffer of its buffered API is avoided by
    // `tls::TlsStream`.
    Ok(Arc::new(config))
}

/// Accept device connections forever. A permit of `max_pending_handshakes`
/// is taken before `accept()`, so a handshake flood pushes back into the
/// kernel's backlog instead of piling up here; `accept()` errors such as
/// EMFILE back off instead of spinning.
///
/// While `accepting` is false (a new process is taking the listener over)
/// nothing is accepted: connections wait in the kernel's backlog, which the
/// new process shares.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<DeviceCtx>,
    tls: Option<Arc<ServerConfig>>,
    mut accepting: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(ctx.cfg.max_pending_handshakes));
    let mut backoff = crate::net::AcceptBackoff::new();
    loop {
        if accepting.wait_for(|on| *on).await.is_err() {
            return; // the node is gone
        }
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return; // never closed
        };
        let (tcp, peer) = tokio::select! {
            accepted = crate::net::accept_tuned(&listener, &mut backoff) => accepted,
            _ = accepting.wait_for(|on| !*on) => continue,
        };
        let incoming = Incoming::new(ctx.clone(), tcp, peer, permit);
        // Two task types rather than one matching on `tls`: a task is as
        // large as its largest state, and plaintext connections must not
        // pay for the TLS stream's.
        match &tls {
            None => tokio::spawn(drive(Box::pin(upgrade(incoming)))),
            Some(config) => tokio::spawn(drive(Box::pin(accept_tls(incoming, config.clone())))),
        };
    }
}

/// A connection between `accept()` and the end of its upgrade.
struct Incoming<S> {
    ctx: Arc<DeviceCtx>,
    stream: S,
    peer: SocketAddr,
    /// Held until the upgrade ends: bounds handshakes in progress.
    permit: OwnedSemaphorePermit,
    deadline: tokio::time::Instant,
}

impl<S> Incoming<S> {
    /// Accepted now: the whole upgrade (TLS included) must end within
    /// `handshake_timeout_secs` from here.
    fn new(ctx: Arc<DeviceCtx>, stream: S, peer: SocketAddr, permit: OwnedSemaphorePermit) -> Self {
        let deadline =
            tokio::time::Instant::now() + Duration::from_secs(ctx.cfg.handshake_timeout_secs);
        Incoming {
            ctx,
            stream,
            peer,
            permit,
            deadline,
        }
    }
}

type Accepting<S> = Pin<Box<dyn Future<Output = Option<Connection<S>>> + Send>>;

/// The task of one connection. The accepting phase is boxed and freed when
/// it ends, and an async fn's arguments get a slot in its future for its
/// whole life, so the only argument here is that box: the task at rest
/// holds the `Connection` and the small futures of its select loop.
async fn drive<S>(accepting: Accepting<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Not `if let`: its scrutinee would stay alive, a second copy of the
    // connection, for the whole block.
    let mut conn = match accepting.await {
        Some(conn) => conn,
        None => return,
    };
    conn.run().await;
}

async fn accept_tls(
    incoming: Incoming<TcpStream>,
    config: Arc<ServerConfig>,
) -> Option<Connection<TlsStream<TcpStream>>> {
    let Incoming {
        ctx,
        stream,
        peer,
        permit,
        deadline,
    } = incoming;
    match tokio::time::timeout_at(deadline, TlsStream::accept(config, stream)).await {
        Ok(Ok(stream)) => {
            upgrade(Incoming {
                ctx,
                stream,
                peer,
                permit,
                deadline,
            })
            .await
        }
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            ctx.metrics.handshake_failed("tls");
            None
        }
        Err(_) => {
            ctx.metrics.handshake_failed("timeout");
            None
        }
    }
}

/// The upgrade under the handshake deadline; on success, the connection.
async fn upgrade<S>(incoming: Incoming<S>) -> Option<Connection<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Incoming {
        ctx,
        mut stream,
        peer,
        permit,
        deadline,
    } = incoming;
    let hs = tokio::time::timeout_at(deadline, handshake::handshake(&ctx, &mut stream)).await;
    drop(permit);
    match hs {
        Ok(Ok(admitted)) => Some(Connection::open(ctx, stream, admitted).await),
        Ok(Err(HandshakeError::Refused(r))) => {
            tracing::debug!(%peer, status = r.status, code = r.code, message = %r.message, "upgrade refused");
            ctx.metrics.handshake_failed(r.reason);
            None
        }
        Ok(Err(HandshakeError::Io(e))) => {
            tracing::debug!(%peer, error = %e, "handshake I/O failed");
            ctx.metrics.handshake_failed("io");
            None
        }
        // Closed without a response, as PROTOCOL.md says.
        Err(_) => {
            ctx.metrics.handshake_failed("timeout");
            None
        }
    }
}

/// Drive any stream through the real handshake and connection code (the
/// in-memory scale bench uses this with duplex pipes).
pub async fn serve_stream<S>(ctx: Arc<DeviceCtx>, stream: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Ok(permit) = Arc::new(Semaphore::new(1)).acquire_owned().await else {
        return;
    };
    let incoming = Incoming::new(ctx, stream, SocketAddr::from(([0, 0, 0, 0], 0)), permit);
    drive(Box::pin(upgrade(incoming))).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    fn ctx() -> Arc<DeviceCtx> {
        let cfg = crate::config::parse(
            "[[app]]\nid = \"demo\"\ndevice_secret = \"s\"\napi_keys = [\"k\"]\n",
        )
        .expect("valid config");
        let hub = Arc::new(Hub::new([("demo".to_string(), 10)]));
        let metrics = Arc::new(Metrics::new(&["demo"]).expect("metrics"));
        Arc::new(DeviceCtx::new(
            hub,
            Arc::new(MemoryStore::new()),
            metrics,
            Arc::new(Auth::new(&cfg)),
            Arc::new(Drain::new()),
            cfg.device.clone(),
        ))
    }

    /// A connection just accepted over loopback, and its client end.
    async fn accepted() -> (Incoming<TcpStream>, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (tcp, peer) = listener.accept().await.expect("accept");
        let permit = Arc::new(Semaphore::new(1))
            .acquire_owned()
            .await
            .expect("permit");
        let incoming = Incoming {
            ctx: ctx(),
            stream: tcp,
            peer,
            permit,
            deadline: tokio::time::Instant::now(),
        };
        (incoming, client)
    }

    /// The future of a plaintext connection's task lives (inline in the
    /// task) as long as the connection: a bound on it, so a change that
    /// bloats it fails here rather than in a memory benchmark.
    #[tokio::test]
    async fn connection_task_future_is_small() {
        let (incoming, _client) = accepted().await;
        let fut = drive(Box::pin(upgrade(incoming)));
        let size = std::mem::size_of_val(&fut);
        println!("plaintext connection task future: {size} bytes");
        // Measured 760 bytes (tokio 1.54, tungstenite 0.30). tokio
        // allocates a task as a 128-byte aligned cell of the future plus
        // about 104 bytes: up to 792 bytes that is an 896-byte cell, above
        // it a 1024-byte one.
        assert!(size <= 792, "connection task future is {size} bytes");
    }

    /// The same for a TLS connection, whose task holds `tls::TlsStream`
    /// inline: rustls's `UnbufferedServerConnection` alone is 1088 bytes.
    #[tokio::test]
    async fn tls_connection_task_future_is_bounded() {
        let (incoming, _client) = accepted().await;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(rustls::server::ResolvesServerCertUsingSni::new()));
        let fut = drive(Box::pin(accept_tls(incoming, Arc::new(config))));
        let size = std::mem::size_of_val(&fut);
        println!("TLS connection task future: {size} bytes");
        // Measured 1944 bytes (rustls 0.23.46; the same with tokio-rustls's
        // stream): with tokio's ~104 bytes a 2048-byte cell, exactly full
        // (heaptrack).
        assert!(size <= 1944, "TLS connection task future is {size} bytes");
    }
}

//! Server-side TLS for device connections over rustls's unbuffered API,
//! with the buffers owned here and released whenever they empty.
//!
//! tokio-rustls wraps rustls's buffered `ServerConnection`, which keeps a
//! zero-filled 4 KiB read buffer for the connection's whole life: at 15k
//! idle wss connections it was 4096 of the 9.4 KB each one cost (heaptrack,
//! BENCHMARKS.md). Here ciphertext is read into a buffer that is freed as
//! soon as every complete record in it is processed, decrypted bytes wait
//! in one that is freed once read, and ciphertext to send in one that is
//! freed once written, so an idle connection keeps none of them. The TLS
//! itself (versions, suites, keys, alerts) is rustls's, from the same
//! `ServerConfig`.

use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 4096;
/// Most bytes of a vectored write encrypted together: one full record.
const GATHER_MAX: usize = 16 * 1024;
/// Most ciphertext held at once: a 64 KiB handshake message (rustls's own
/// limit) plus a record. rustls rejects larger records and handshake
/// messages itself; this only bounds what a peer can make us buffer first.
const MAX_INCOMING: usize = 0xffff + 16 * 1024 + 256 + 5;

/// A TLS connection over `S`, as a byte stream.
pub struct TlsStream<S> {
    io: S,
    conn: UnbufferedServerConnection,
    /// Ciphertext read and not yet processed (an incomplete record).
    incoming: Vec<u8>,
    /// Decrypted bytes not yet read, from `plain_pos` on.
    plain: Vec<u8>,
    plain_pos: usize,
    /// Ciphertext to write, from `out_pos` on.
    outgoing: Vec<u8>,
    out_pos: usize,
    /// The peer sent close_notify or closed the socket.
    read_closed: bool,
    close_queued: bool,
}

/// What rustls needs next.
#[derive(PartialEq, Eq)]
enum Next {
    /// More ciphertext: the handshake or a record is incomplete.
    Input,
    /// Nothing until the application reads or writes more.
    Traffic,
    /// Both sides have closed.
    Closed,
}

/// What to do in the traffic state, once reached.
enum Op<'a> {
    None,
    Send(&'a [u8]),
    Close,
}

fn tls_error(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// Free `buf`'s memory once it is empty (an idle connection keeps none).
fn release(buf: &mut Vec<u8>, pos: &mut usize) {
    if *pos >= buf.len() {
        *buf = Vec::new();
        *pos = 0;
    }
}

impl<S> TlsStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// Run the server side of the handshake on `io`.
    pub async fn accept(config: Arc<ServerConfig>, io: S) -> io::Result<TlsStream<S>> {
        let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
        let mut tls = TlsStream {
            io,
            conn,
            incoming: Vec::new(),
            plain: Vec::new(),
            plain_pos: 0,
            outgoing: Vec::new(),
            out_pos: 0,
            read_closed: false,
            close_queued: false,
        };
        poll_fn(|cx| tls.poll_handshake(cx)).await?;
        Ok(tls)
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let next = self.process_or_alert(cx, Op::None)?;
            // Each flight is sent before waiting for the peer's.
            ready!(self.poll_write_out(cx))?;
            match next {
                Next::Traffic => return Poll::Ready(Ok(())),
                Next::Closed => return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
                Next::Input => {
                    if ready!(self.poll_fill(cx))? == 0 {
                        return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                    }
                }
            }
        }
    }

    /// Let rustls process what has been read, collecting the plaintext it
    /// yields and the ciphertext it wants sent, until it needs more input
    /// or reaches the traffic state (where `op` is done).
    fn process(&mut self, mut op: Op<'_>) -> io::Result<Next> {
        loop {
            let UnbufferedStatus { mut discard, state } =
                self.conn.process_tls_records(&mut self.incoming);
            let next = match state.map_err(tls_error)? {
                ConnectionState::ReadTraffic(mut records) => {
                    while let Some(record) = records.next_record() {
                        let record = record.map_err(tls_error)?;
                        discard += record.discard;
                        self.plain.extend_from_slice(record.payload);
                    }
                    None
                }
                ConnectionState::EncodeTlsData(mut encode) => {
                    let start = self.outgoing.len();
                    let n = match encode.encode(&mut []) {
                        Ok(n) => n,
                        Err(EncodeError::InsufficientSize(need)) => {
                            self.outgoing.resize(start + need.required_size, 0);
                            encode
                                .encode(&mut self.outgoing[start..])
                                .map_err(tls_error)?
                        }
                        Err(e) => return Err(tls_error(e)),
                    };
                    self.outgoing.truncate(start + n);
                    None
                }
                // Sent in order with everything else by `poll_write_out`.
                ConnectionState::TransmitTlsData(transmit) => {
                    transmit.done();
                    None
                }
                ConnectionState::BlockedHandshake => Some(Next::Input),
                ConnectionState::PeerClosed => {
                    self.read_closed = true;
                    None
                }
                ConnectionState::Closed => Some(Next::Closed),
                ConnectionState::WriteTraffic(mut traffic) => {
                    match std::mem::replace(&mut op, Op::None) {
                        Op::None => {}
                        Op::Send(data) => {
                            let start = self.outgoing.len();
                            // Record overhead: 5 header + 1 type + 16 tag per
                            // 16 KiB fragment; retried with rustls's figure.
                            let guess = data.len() + 22 * (data.len() / 16384 + 1);
                            self.outgoing.resize(start + guess, 0);
                            let n = match traffic.encrypt(data, &mut self.outgoing[start..]) {
                                Ok(n) => n,
                                Err(EncryptError::InsufficientSize(need)) => {
                                    self.outgoing.resize(start + need.required_size, 0);
                                    traffic
                                        .encrypt(data, &mut self.outgoing[start..])
                                        .map_err(tls_error)?
                                }
                                Err(e) => return Err(tls_error(e)),
                            };
                            self.outgoing.truncate(start + n);
                        }
                        Op::Close => {
                            let start = self.outgoing.len();
                            self.outgoing.resize(start + 64, 0);
                            let n = traffic
                                .queue_close_notify(&mut self.outgoing[start..])
                                .map_err(tls_error)?;
                            self.outgoing.truncate(start + n);
                        }
                    }
                    Some(Next::Traffic)
                }
                ConnectionState::ReadEarlyData(_) => {
                    // `max_early_data_size` is 0: rustls never offers it.
                    return Err(tls_error("unexpected early data"));
                }
                _ => return Err(tls_error("unexpected TLS state")),
            };
            self.incoming.drain(..discard);
            if let Some(next) = next {
                let mut none = 0;
                release(&mut self.incoming, &mut none);
                return Ok(next);
            }
        }
    }

    /// `process`, and on a TLS error the fatal alert rustls queued with it
    /// is sent if the socket takes it at once, so the peer learns why.
    fn process_or_alert(&mut self, cx: &mut Context<'_>, op: Op<'_>) -> io::Result<Next> {
        let e = match self.process(op) {
            Ok(next) => return Ok(next),
            Err(e) => e,
        };
        // The alert comes out of the next call as data to encode, before
        // anything is read. The input is passed as rustls last saw it (no
        // discard was applied on the error path): its handshake deframer
        // holds offsets into it.
        let status = self.conn.process_tls_records(&mut self.incoming);
        if let Ok(ConnectionState::EncodeTlsData(mut encode)) = status.state {
            let start = self.outgoing.len();
            self.outgoing.resize(start + 64, 0);
            match encode.encode(&mut self.outgoing[start..]) {
                Ok(n) => self.outgoing.truncate(start + n),
                Err(_) => self.outgoing.truncate(start),
            }
        }
        let _ = self.poll_write_out(cx);
        Err(e)
    }

    /// Write the pending ciphertext; its buffer is freed once written.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_pos < self.outgoing.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.outgoing[self.out_pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_pos += n;
        }
        release(&mut self.outgoing, &mut self.out_pos);
        Poll::Ready(Ok(()))
    }

    /// Read more ciphertext; 0 at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let start = self.incoming.len();
        if start >= MAX_INCOMING {
            return Poll::Ready(Err(tls_error("TLS input over its limit")));
        }
        self.incoming.resize(start + READ_CHUNK, 0);
        let mut buf = ReadBuf::new(&mut self.incoming[start..]);
        let r = Pin::new(&mut self.io).poll_read(cx, &mut buf);
        let n = match r {
            Poll::Ready(Ok(())) => buf.filled().len(),
            _ => 0,
        };
        self.incoming.truncate(start + n);
        let mut none = 0;
        release(&mut self.incoming, &mut none);
        match r {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(n)),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S> AsyncRead for TlsStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.plain_pos < this.plain.len() {
                let n = buf.remaining().min(this.plain.len() - this.plain_pos);
                buf.put_slice(&this.plain[this.plain_pos..this.plain_pos + n]);
                this.plain_pos += n;
                release(&mut this.plain, &mut this.plain_pos);
                return Poll::Ready(Ok(()));
            }
            if this.read_closed {
                return Poll::Ready(Ok(()));
            }
            let next = this.process_or_alert(cx, Op::None)?;
            // Anything rustls answered while reading (a key update) goes
            // out now if the socket takes it, else with the next write.
            if let Poll::Ready(Err(e)) = this.poll_write_out(cx) {
                return Poll::Ready(Err(e));
            }
            if next == Next::Closed {
                this.read_closed = true;
            }
            if this.plain_pos < this.plain.len() || this.read_closed {
                continue;
            }
            if ready!(this.poll_fill(cx))? == 0 {
                this.read_closed = true;
            }
        }
    }
}

impl<S> AsyncWrite for TlsStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// Encrypts all of `data` once the previous write's ciphertext is on
    /// the socket, so at most one write's worth waits here.
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_write_out(cx))?;
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        match this.process_or_alert(cx, Op::Send(data))? {
            Next::Traffic => {}
            Next::Closed | Next::Input => {
                return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
            }
        }
        if let Poll::Ready(Err(e)) = this.poll_write_out(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(data.len()))
    }

    /// A frame's header and payload in one TLS record, not two (22 bytes
    /// and an encryption less per frame, as tokio-rustls wrote them):
    /// rustls's unbuffered `encrypt` takes one slice, so up to one record's
    /// worth is gathered first.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut parts = bufs.iter().filter(|b| !b.is_empty());
        let (Some(first), None) = (parts.next(), parts.next()) else {
            let mut gathered = Vec::new();
            for b in bufs {
                let room = GATHER_MAX.saturating_sub(gathered.len());
                if room == 0 {
                    break;
                }
                gathered.extend_from_slice(&b[..b.len().min(room)]);
            }
            return self.poll_write(cx, &gathered);
        };
        self.poll_write(cx, first)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_out(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_queued {
            this.close_queued = true;
            this.process(Op::Close)?;
        }
        ready!(this.poll_write_out(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};

    type Client = tokio_rustls::client::TlsStream<DuplexStream>;

    fn configs(
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> (Arc<ServerConfig>, tokio_rustls::TlsConnector) {
        let certified =
            rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
        let cert = CertificateDer::from(certified.cert.der().to_vec());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            certified.signing_key.serialize_der(),
        ));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .expect("server config");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).expect("root");
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        (
            Arc::new(server),
            tokio_rustls::TlsConnector::from(Arc::new(client)),
        )
    }

    /// A handshake over a pipe of `pipe` bytes, so records arrive in pieces.
    async fn pair(
        versions: &[&'static rustls::SupportedProtocolVersion],
        pipe: usize,
    ) -> (TlsStream<DuplexStream>, Client) {
        let (server_config, connector) = configs(versions);
        let (a, b) = duplex(pipe);
        let name = ServerName::try_from("localhost").expect("name");
        let (server, client) = tokio::join!(
            TlsStream::accept(server_config, a),
            connector.connect(name, b)
        );
        (
            server.expect("server handshake"),
            client.expect("client handshake"),
        )
    }

    fn idle_holds_nothing(s: &TlsStream<DuplexStream>) {
        assert_eq!(
            (
                s.incoming.capacity(),
                s.plain.capacity(),
                s.outgoing.capacity()
            ),
            (0, 0, 0),
            "buffers kept at rest"
        );
    }

    #[tokio::test]
    async fn data_both_ways_in_pieces_and_nothing_kept_at_rest() {
        for versions in [
            &[&rustls::version::TLS13][..],
            &[&rustls::version::TLS12][..],
        ] {
            let (mut server, mut client) = pair(versions, 1000).await;
            // Several records, each split over many pipe reads.
            let sent: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
            let to_server = sent.clone();
            let writer = tokio::spawn(async move {
                client.write_all(&to_server).await.expect("client write");
                client.flush().await.expect("client flush");
                let mut back = vec![0u8; to_server.len()];
                client.read_exact(&mut back).await.expect("client read");
                (client, back)
            });
            let mut got = vec![0u8; sent.len()];
            // Small reads, like tungstenite's 64-byte ones.
            let mut filled = 0;
            while filled < got.len() {
                let end = (filled + 64).min(got.len());
                let n = server
                    .read(&mut got[filled..end])
                    .await
                    .expect("server read");
                assert!(n > 0, "early end after {filled} bytes");
                filled += n;
            }
            assert_eq!(got, sent);
            server.write_all(&got).await.expect("server write");
            server.flush().await.expect("server flush");
            let (mut client, back) = writer.await.expect("client task");
            assert_eq!(back, sent);

            // At rest, with a read pending: no buffer held.
            let mut one = [0u8; 1];
            let pending =
                tokio::time::timeout(Duration::from_millis(20), server.read(&mut one)).await;
            assert!(pending.is_err(), "read should wait");
            idle_holds_nothing(&server);

            // The client's close_notify reads as the end of the stream, and
            // ours reaches the client as a clean end (not a truncation).
            client.shutdown().await.expect("client close");
            assert_eq!(server.read(&mut one).await.expect("server eof"), 0);
            server.shutdown().await.expect("server close");
            let mut rest = Vec::new();
            client.read_to_end(&mut rest).await.expect("clean end");
            assert!(rest.is_empty());
        }
    }

    #[tokio::test]
    async fn garbage_fails_the_handshake_with_an_alert() {
        let (server_config, _) = configs(&[&rustls::version::TLS13]);
        let (a, mut b) = duplex(4096);
        b.write_all(&[
            0x16, 0x03, 0x01, 0x00, 0x08, 0x01, 0x00, 0x00, 0x04, 0x03, 0x03, 0x00, 0x00,
        ])
        .await
        .expect("write");
        let r = TlsStream::accept(server_config, a).await;
        assert!(r.is_err(), "garbage accepted as a ClientHello");
        drop(r);
        let mut answer = Vec::new();
        b.read_to_end(&mut answer).await.expect("read");
        assert_eq!(answer.first(), Some(&0x15), "no alert record: {answer:?}");
    }

    /// A vectored write (a frame's header and payload) is one record: the
    /// client's side of the pipe gets exactly one record's bytes.
    #[tokio::test]
    async fn a_vectored_write_is_one_record() {
        let (mut server, client) = pair(&[&rustls::version::TLS13], 64 * 1024).await;
        let (mut raw, _client_conn) = client.into_inner();
        // The session tickets sent after the handshake, not read yet.
        let mut got = vec![0u8; 1024];
        while let Ok(n) = tokio::time::timeout(Duration::from_millis(50), raw.read(&mut got)).await
        {
            assert!(n.expect("read tickets") > 0);
        }
        let bufs = [IoSlice::new(b"\x81\x05"), IoSlice::new(b"hello")];
        let n = server.write_vectored(&bufs).await.expect("write");
        assert_eq!(n, 7);
        server.flush().await.expect("flush");
        let len = raw.read(&mut got).await.expect("read");
        // TLS 1.3 record: 5-byte header, 7 bytes + content type + 16-byte tag.
        assert_eq!(len, 5 + 7 + 1 + 16, "{:?}", &got[..len]);
    }

    #[tokio::test]
    async fn plain_http_fails_the_handshake() {
        let (server_config, _) = configs(&[&rustls::version::TLS13]);
        let (a, mut b) = duplex(4096);
        b.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let r = TlsStream::accept(server_config, a).await;
        assert!(r.is_err(), "plain HTTP accepted as TLS");
    }

    #[tokio::test]
    async fn a_peer_gone_mid_handshake_is_an_error() {
        let (server_config, _) = configs(&[&rustls::version::TLS13]);
        let (a, b) = duplex(4096);
        drop(b);
        assert!(TlsStream::accept(server_config, a).await.is_err());
    }

    use std::time::Duration;
}

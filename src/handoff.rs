//! Restart without dropping the fleet: a new process takes the listening
//! sockets and the durable store over from the running one, which then
//! closes its devices spread over the drain window and exits 0.
//!
//! The two talk over a Unix socket in the store directory
//! ([`SOCKET_FILE`]), one line per step:
//!
//! ```text
//! new → old   hello pushgate-handoff 1
//! old → new   listeners device api       + both listening sockets (SCM_RIGHTS)
//! new → old   take
//!             the old process stops accepting (new connections wait in the
//!             backlog both now share), forwards calls arriving on its open
//!             API connections to the new process, lets its own calls
//!             finish, then commits and closes the store
//! old → new   released
//!             the new process opens the store and starts accepting
//! new → old   ready
//! ```
//!
//! After `ready` the connection stays open as a relay, new → old:
//!
//! ```text
//! new → old   fanout APP broadcast LEN\n<LEN bytes: the msg frame>
//! new → old   fanout APP topic:NAME LEN\n<LEN bytes>
//! ```
//!
//! so that devices still connected to the old process during its drain get
//! the topic and broadcast messages accepted by the new one (they are
//! live-only: without the relay those devices would miss them). It ends
//! when the old process exits.
//!
//! Nothing is refused in between: a connection made during the hand-over
//! waits in the kernel's backlog for the new process (tens of
//! milliseconds), a call on an old keep-alive connection is forwarded. If
//! the new process goes away before `ready` (bad config, cannot open the
//! store), the old one takes the store back and accepts again, so a failed
//! deploy leaves the old process serving.
//!
//! Only the `redb` store has a directory of its own (held under a lock),
//! so only it gets a control socket; with the `memory` store there is no
//! hand-over.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::net::TcpListener;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use socket2::SockRef;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::config::{Config, StoreKind};
use crate::net::ActivatedListeners;

/// The control socket's name inside the store directory.
pub const SOCKET_FILE: &str = "handoff.sock";
/// First line of every hand-over; the number changes with the steps.
pub const HELLO: &str = "hello pushgate-handoff 1";
/// Longest control line either side accepts.
const MAX_LINE: usize = 1024;
/// How long a step may take when it does no real work.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the new process waits for the old one to release the store: it
/// first lets its own API calls finish (each waits for a commit at most).
pub const RELEASE_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the control socket of `config`'s gateway lives, if it has one.
pub fn socket_path(config: &Config) -> Option<PathBuf> {
    (config.store.kind == StoreKind::Redb).then(|| config.store.path.join(SOCKET_FILE))
}

/// A hand-over went wrong; the message says at which step.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("hand-over: {0}")]
    Io(#[from] io::Error),
    #[error("hand-over: {0}")]
    Protocol(String),
    #[error("hand-over: the other process refused: {0}")]
    Refused(String),
    #[error("hand-over: no answer within {secs} s while waiting for {what}")]
    Timeout { what: &'static str, secs: u64 },
    #[error("hand-over: the other process went away while waiting for {0}")]
    Gone(&'static str),
}

/// One end of the control connection: short lines, and once the sockets.
pub struct Ctl {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl Ctl {
    fn new(stream: UnixStream) -> Ctl {
        Ctl {
            stream,
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, line: &str) -> io::Result<()> {
        let mut out = Vec::with_capacity(line.len() + 1);
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
        self.stream.write_all(&out).await
    }

    /// The next line, `None` at end of stream.
    pub async fn recv(&mut self) -> io::Result<Option<String>> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                return String::from_utf8(line[..end].to_vec())
                    .map(Some)
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8"));
            }
            if self.buf.len() > MAX_LINE {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
            }
            let mut chunk = [0u8; 256];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(None);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// [`Ctl::recv`] within `limit`; end of stream is [`HandoffError::Gone`].
    pub async fn expect(
        &mut self,
        what: &'static str,
        limit: Duration,
    ) -> Result<String, HandoffError> {
        match tokio::time::timeout(limit, self.recv()).await {
            Err(_) => Err(HandoffError::Timeout {
                what,
                secs: limit.as_secs(),
            }),
            Ok(Err(e)) => Err(e.into()),
            Ok(Ok(None)) => Err(HandoffError::Gone(what)),
            Ok(Ok(Some(line))) => match line.strip_prefix("error ") {
                Some(why) => Err(HandoffError::Refused(why.to_string())),
                None => Ok(line),
            },
        }
    }

    /// Sends `line` followed by `bytes` (a relayed frame).
    pub async fn send_frame(&mut self, line: &str, bytes: &[u8]) -> io::Result<()> {
        let mut out = Vec::with_capacity(line.len() + 1 + bytes.len());
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
        out.extend_from_slice(bytes);
        self.stream.write_all(&out).await
    }

    /// Exactly `len` bytes (after a line that announced them).
    pub async fn recv_bytes(&mut self, len: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < len {
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
        Ok(self.buf.drain(..len).collect())
    }

    /// Sends `line` with `fds` attached (one `sendmsg`).
    pub async fn send_with_fds(&mut self, line: &str, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let mut data = line.as_bytes().to_vec();
        data.push(b'\n');
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
        loop {
            self.stream.writable().await?;
            let sent = self.stream.try_io(Interest::WRITABLE, || {
                let mut control = SendAncillaryBuffer::new(&mut space);
                if !control.push(SendAncillaryMessage::ScmRights(fds)) {
                    return Err(io::Error::other("too many descriptors for one message"));
                }
                rustix::net::sendmsg(
                    &self.stream,
                    &[IoSlice::new(&data)],
                    &mut control,
                    SendFlags::NOSIGNAL,
                )
                .map_err(io::Error::from)
            });
            match sent {
                Ok(n) if n == data.len() => return Ok(()),
                Ok(_) => return Err(io::Error::other("control message sent in part")),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Receives one line sent by [`Ctl::send_with_fds`] and its descriptors
    /// (close-on-exec). The other side sends nothing after it until we
    /// answer, so the line arrives whole in one `recvmsg`.
    pub async fn recv_with_fds(&mut self) -> io::Result<(String, Vec<OwnedFd>)> {
        let mut data = [0u8; MAX_LINE];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
        loop {
            self.stream.readable().await?;
            let mut fds = Vec::new();
            let got = self.stream.try_io(Interest::READABLE, || {
                let mut control = RecvAncillaryBuffer::new(&mut space);
                let msg = rustix::net::recvmsg(
                    &self.stream,
                    &mut [IoSliceMut::new(&mut data)],
                    &mut control,
                    RecvFlags::CMSG_CLOEXEC,
                )
                .map_err(io::Error::from)?;
                for message in control.drain() {
                    if let RecvAncillaryMessage::ScmRights(passed) = message {
                        fds.extend(passed);
                    }
                }
                Ok(msg.bytes)
            });
            let n = match got {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before sending the listeners",
                ));
            }
            let Some(end) = data[..n].iter().position(|&b| b == b'\n') else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "listeners line cut short",
                ));
            };
            let line = String::from_utf8(data[..end].to_vec())
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8"))?;
            // Anything after the line is the next one.
            self.buf.extend_from_slice(&data[end + 1..n]);
            return Ok((line, fds));
        }
    }
}

// ---------------------------------------------------------------------------
// The running (old) process

/// The control socket a running gateway listens on for its successor.
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
    /// The socket file's inode: removed on drop only if it is still ours (a
    /// successor binds its own at the same path).
    ino: u64,
}

impl ControlSocket {
    /// Binds `path`, replacing a stale socket left by a crashed process.
    /// Fails if a live process answers there, unless `replace` (we have just
    /// taken over from that process: its socket is of no use any more).
    pub fn bind(path: &Path, replace: bool) -> io::Result<ControlSocket> {
        if path.exists() {
            if !replace && std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{}: another process answers there", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        // Owner only: whoever connects can take the node over.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let ino = std::fs::metadata(path)?.ino();
        Ok(ControlSocket {
            listener,
            path: path.to_path_buf(),
            ino,
        })
    }

    /// The next successor to connect.
    pub async fn accept(&self) -> io::Result<Ctl> {
        let (stream, _) = self.listener.accept().await?;
        Ok(Ctl::new(stream))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Closes the socket after a hand-over without touching the path: it
    /// belongs to the successor now, which replaces the file when it binds.
    /// (Removing it by inode alone could remove the successor's file if the
    /// file system gave the new file the old one's inode number.)
    pub fn handed_over(mut self) {
        self.ino = 0;
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        // Inode 0 is never a file's: see `handed_over`.
        if self.ino != 0 && std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Sends the hello-answer: every listener, named.
pub async fn send_listeners(
    ctl: &mut Ctl,
    listeners: &[(&str, BorrowedFd<'_>)],
) -> Result<(), HandoffError> {
    let mut line = String::from("listeners");
    for (name, _) in listeners {
        line.push(' ');
        line.push_str(name);
    }
    let fds: Vec<BorrowedFd<'_>> = listeners.iter().map(|(_, fd)| *fd).collect();
    ctl.send_with_fds(&line, &fds).await?;
    Ok(())
}

// ---------------------------------------------------------------------------
// The new process

/// A hand-over in progress, seen from the new process.
pub struct Takeover {
    ctl: Ctl,
}

impl Takeover {
    /// Connects to the running gateway's control socket; `None` when no
    /// process answers there (nothing to take over).
    pub async fn connect(path: &Path) -> io::Result<Option<Takeover>> {
        match UnixStream::connect(path).await {
            Ok(stream) => Ok(Some(Takeover {
                ctl: Ctl::new(stream),
            })),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Says hello and receives the old process's listening sockets.
    pub async fn listeners(&mut self) -> Result<ActivatedListeners, HandoffError> {
        self.ctl.send(HELLO).await?;
        let (line, fds) = tokio::time::timeout(STEP_TIMEOUT, self.ctl.recv_with_fds())
            .await
            .map_err(|_| HandoffError::Timeout {
                what: "the listeners",
                secs: STEP_TIMEOUT.as_secs(),
            })??;
        if let Some(why) = line.strip_prefix("error ") {
            return Err(HandoffError::Refused(why.to_string()));
        }
        let names: Vec<&str> = match line.strip_prefix("listeners") {
            Some(rest) => rest.split_whitespace().collect(),
            None => return Err(HandoffError::Protocol(format!("unexpected {line:?}"))),
        };
        if names.len() != fds.len() {
            return Err(HandoffError::Protocol(format!(
                "{} names for {} sockets",
                names.len(),
                fds.len()
            )));
        }
        let mut out = ActivatedListeners::default();
        for (name, fd) in names.into_iter().zip(fds) {
            let listener = adopt_listener(fd).map_err(|e| {
                HandoffError::Protocol(format!("the {name} socket passed over: {e}"))
            })?;
            match name {
                "device" => out.device = Some(listener),
                "api" => out.api = Some(listener),
                // A newer old process may pass more: not ours to use.
                _ => {}
            }
        }
        Ok(out)
    }

    /// Asks for the store and waits until the old process has released it.
    pub async fn take_store(&mut self) -> Result<(), HandoffError> {
        self.ctl.send("take").await?;
        match self.ctl.expect("the store", RELEASE_TIMEOUT).await? {
            line if line == "released" => Ok(()),
            line => Err(HandoffError::Protocol(format!("unexpected {line:?}"))),
        }
    }

    /// Tells the old process we serve: it drains and exits. The connection
    /// then carries what was queued on the [`Relay`] of `feed`, from the
    /// start (frames accepted before `ready` wait in the queue).
    pub async fn ready(mut self, feed: RelayFeed) -> Result<(), HandoffError> {
        self.ctl.send("ready").await?;
        feed.spawn(self.ctl);
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// The relay: live fan-out from the new process to the devices still on the
// old one

/// Longest relayed frame either side accepts.
const MAX_RELAYED: usize = 16 << 20;
/// Relayed frames waiting to be written; past it they are dropped (the old
/// process is draining, the new one must never wait for it).
const RELAY_QUEUE: usize = 4096;

/// Where a relayed fan-out goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayTarget {
    Broadcast,
    Topic(Arc<str>),
}

/// One topic or broadcast frame for the old process's devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relayed {
    pub app: Arc<str>,
    pub target: RelayTarget,
    pub frame: Utf8Bytes,
}

/// The new process's end: queues frames for a task that writes them.
#[derive(Debug)]
pub struct Relay {
    tx: mpsc::Sender<Relayed>,
}

/// The frames queued on a [`Relay`], until [`Takeover::ready`] writes them.
#[derive(Debug)]
pub struct RelayFeed {
    rx: mpsc::Receiver<Relayed>,
}

/// A relay whose frames wait until the feed is connected: set it up before
/// accepting anything, so no frame the old process's devices need is missed.
pub fn relay_channel() -> (Relay, RelayFeed) {
    let (tx, rx) = mpsc::channel::<Relayed>(RELAY_QUEUE);
    (Relay { tx }, RelayFeed { rx })
}

impl RelayFeed {
    /// Writes the queued frames, and those to come, to `ctl` until the old
    /// process goes away.
    fn spawn(self, mut ctl: Ctl) {
        let mut rx = self.rx;
        tokio::spawn(async move {
            while let Some(r) = rx.recv().await {
                let target = match &r.target {
                    RelayTarget::Broadcast => "broadcast".to_string(),
                    RelayTarget::Topic(t) => format!("topic:{t}"),
                };
                let line = format!("fanout {} {target} {}", r.app, r.frame.len());
                if ctl.send_frame(&line, r.frame.as_bytes()).await.is_err() {
                    // The old process has drained and exited.
                    break;
                }
            }
            tracing::debug!("relay to the old process ended");
        });
    }
}

impl Relay {
    /// Queue a frame for the old process's devices; dropped if the old
    /// process is gone or too slow.
    pub fn send(&self, relayed: Relayed) {
        let _ = self.tx.try_send(relayed);
    }
}

/// The old process's end: the next relayed frame, `None` when the new
/// process closed the connection.
pub async fn recv_relayed(ctl: &mut Ctl) -> Result<Option<Relayed>, HandoffError> {
    let Some(line) = ctl.recv().await? else {
        return Ok(None);
    };
    let mut words = line.split(' ');
    let (Some("fanout"), Some(app), Some(target), Some(len), None) = (
        words.next(),
        words.next(),
        words.next(),
        words.next(),
        words.next(),
    ) else {
        return Err(HandoffError::Protocol(format!("unexpected {line:?}")));
    };
    let len: usize = len
        .parse()
        .ok()
        .filter(|&n| n <= MAX_RELAYED)
        .ok_or_else(|| HandoffError::Protocol(format!("bad length in {line:?}")))?;
    let target = match target.strip_prefix("topic:") {
        Some(topic) => RelayTarget::Topic(Arc::from(topic)),
        None if target == "broadcast" => RelayTarget::Broadcast,
        None => return Err(HandoffError::Protocol(format!("bad target in {line:?}"))),
    };
    let bytes = ctl.recv_bytes(len).await?;
    let frame = String::from_utf8(bytes)
        .map_err(|_| HandoffError::Protocol("relayed frame is not UTF-8".into()))?;
    Ok(Some(Relayed {
        app: Arc::from(app),
        target,
        frame: Utf8Bytes::from(frame),
    }))
}

/// A passed descriptor as a listener, after checking it is one.
fn adopt_listener(fd: OwnedFd) -> io::Result<TcpListener> {
    let listener = TcpListener::from(fd);
    let sock = SockRef::from(&listener);
    if sock.r#type()? != socket2::Type::STREAM || !sock.is_listener()? {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a listening TCP socket",
        ));
    }
    listener.set_nonblocking(true)?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::os::fd::AsFd;

    #[tokio::test]
    async fn listeners_pass_over_the_control_socket_and_still_accept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SOCKET_FILE);
        let control = ControlSocket::bind(&path, false).unwrap();
        let device = crate::net::bind_listener("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let api = crate::net::bind_listener("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let (device_addr, api_addr) = (device.local_addr().unwrap(), api.local_addr().unwrap());

        let old = tokio::spawn(async move {
            let mut ctl = control.accept().await.unwrap();
            assert_eq!(ctl.recv().await.unwrap().as_deref(), Some(HELLO));
            send_listeners(
                &mut ctl,
                &[("device", device.as_fd()), ("api", api.as_fd())],
            )
            .await
            .unwrap();
            assert_eq!(ctl.recv().await.unwrap().as_deref(), Some("take"));
            ctl.send("released").await.unwrap();
            assert_eq!(ctl.recv().await.unwrap().as_deref(), Some("ready"));
            // Dropping ours leaves the passed copies open.
            drop((device, api));
            control
        });

        let mut takeover = Takeover::connect(&path).await.unwrap().unwrap();
        let got = takeover.listeners().await.unwrap();
        takeover.take_store().await.unwrap();
        takeover.ready(relay_channel().1).await.unwrap();
        let control = old.await.unwrap();

        let device = tokio::net::TcpListener::from_std(got.device.unwrap()).unwrap();
        let api = got.api.unwrap();
        assert_eq!(device.local_addr().unwrap(), device_addr);
        assert_eq!(api.local_addr().unwrap(), api_addr);
        let client = tokio::net::TcpStream::connect(device_addr);
        let (accepted, client) = tokio::join!(device.accept(), client);
        assert_eq!(
            accepted.unwrap().0.peer_addr().unwrap(),
            client.unwrap().local_addr().unwrap()
        );

        // The socket file goes with the control socket, not before.
        assert!(path.exists());
        drop(control);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn nothing_to_take_over_without_a_live_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SOCKET_FILE);
        assert!(Takeover::connect(&path).await.unwrap().is_none());
        // A stale file from a crashed process: refused, and replaced by bind.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        assert!(Takeover::connect(&path).await.unwrap().is_none());
        let old = ControlSocket::bind(&path, false).unwrap();
        assert!(Takeover::connect(&path).await.unwrap().is_some());
        // A live one is not replaced, unless we took over from it.
        assert!(ControlSocket::bind(&path, false).is_err());
        let new = ControlSocket::bind(&path, true).unwrap();
        drop(old);
        assert!(path.exists(), "the old one leaves the new one's file alone");
        drop(new);
        assert!(!path.exists());

        // After a hand-over the old process leaves the path alone even
        // while the file is still its own (the successor has not bound yet).
        let old = ControlSocket::bind(&path, false).unwrap();
        old.handed_over();
        assert!(path.exists(), "left for the successor to replace");
        assert!(
            Takeover::connect(&path).await.unwrap().is_none(),
            "but closed"
        );
        let new = ControlSocket::bind(&path, false).unwrap();
        drop(new);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn relayed_frames_arrive_whole_and_in_order() {
        let (a, b) = UnixStream::pair().unwrap();
        let (relay, feed) = relay_channel();
        // Queued before the connection is there: kept, not dropped.
        let early = Relayed {
            app: Arc::from("demo"),
            target: RelayTarget::Broadcast,
            frame: Utf8Bytes::from("{}"),
        };
        relay.send(early.clone());
        feed.spawn(Ctl::new(a));
        let mut old = Ctl::new(b);
        assert_eq!(recv_relayed(&mut old).await.unwrap(), Some(early));
        let sent = [
            Relayed {
                app: Arc::from("demo"),
                target: RelayTarget::Broadcast,
                frame: Utf8Bytes::from(r#"{"t":"msg","data":"é\n"}"#),
            },
            Relayed {
                app: Arc::from("demo"),
                target: RelayTarget::Topic(Arc::from("news.eu")),
                frame: Utf8Bytes::from("x".repeat(10_000)),
            },
        ];
        for r in &sent {
            relay.send(r.clone());
        }
        for r in &sent {
            assert_eq!(recv_relayed(&mut old).await.unwrap().as_ref(), Some(r));
        }
        drop(relay);
        assert_eq!(recv_relayed(&mut old).await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_refusal_and_a_vanished_peer_are_told_apart() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut a, mut b) = (Ctl::new(a), Ctl::new(b));
        a.send("error busy").await.unwrap();
        assert!(matches!(
            b.expect("x", STEP_TIMEOUT).await,
            Err(HandoffError::Refused(why)) if why == "busy"
        ));
        drop(a);
        assert!(matches!(
            b.expect("y", STEP_TIMEOUT).await,
            Err(HandoffError::Gone("y"))
        ));
    }
}

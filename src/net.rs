//! Sockets, in one place: binding listeners (or taking them over from systemd
//! socket activation), tuning each accepted connection, and backing the accept
//! loop off when the process runs out of descriptors or memory instead of
//! spinning on the error.
//!
//! Linux only, like the rest of the gateway's deployment (systemd, bare metal).

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tracing::{debug, error, info, warn};

/// Listen backlog when the config names none. The kernel silently caps it at
/// `net.core.somaxconn` (4096 by default since Linux 5.4).
pub const DEFAULT_BACKLOG: i32 = 4096;

/// TCP keepalive on accepted connections: first probe after this much idle
/// time. A backstop under the WebSocket heartbeat, which closes dead devices
/// itself; keepalive also covers sockets that never reach the upgrade.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
/// TCP keepalive: time between unanswered probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// TCP keepalive: unanswered probes before the kernel drops the connection.
pub const KEEPALIVE_PROBES: u32 = 5;

/// Binds a nonblocking TCP listener on `addr` with `listen(backlog)`.
///
/// `SO_REUSEADDR` lets a restarted process bind while old connections of the
/// previous one linger in TIME_WAIT; `SO_REUSEPORT` lets a new process bind
/// beside an old one that still listens (the kernel then spreads new
/// connections over both; it allows this only between sockets of the same
/// effective uid). For `[::]` the socket is dual-stack (`IPV6_V6ONLY` off),
/// so one listener takes IPv4 and IPv6.
///
/// The error is the system's (`AddrInUse`, `PermissionDenied`, …); the
/// caller adds which listener and address.
pub fn bind_listener(addr: SocketAddr, backlog: i32) -> io::Result<TcpListener> {
    // socket2 creates it with SOCK_CLOEXEC.
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        // Linux defaults to dual-stack (net.ipv6.bindv6only=0) but a host may
        // have changed that; `[::]` in the config means "everything".
        socket.set_only_v6(false)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(socket.into())
}

/// Sets the options every accepted connection gets: `TCP_NODELAY` (frames are
/// small and already coalesced by the connection task, so Nagle only adds
/// latency) and TCP keepalive ([`KEEPALIVE_IDLE`], [`KEEPALIVE_INTERVAL`],
/// [`KEEPALIVE_PROBES`]). Failures are logged at debug and otherwise ignored:
/// a connection without them still works.
pub fn tune_accepted(stream: &tokio::net::TcpStream) {
    let sock = SockRef::from(stream);
    if let Err(e) = sock.set_tcp_nodelay(true) {
        debug!(error = %e, "setting TCP_NODELAY failed");
    }
    let keepalive = TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    if let Err(e) = sock.set_tcp_keepalive(&keepalive) {
        debug!(error = %e, "setting TCP keepalive failed");
    }
}

// ---------------------------------------------------------------------------
// systemd socket activation

/// First descriptor systemd passes (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

/// The listeners pushgate takes from socket activation, by the name each
/// `.socket` unit gives with `FileDescriptorName=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerName {
    /// `FileDescriptorName=device`: the WebSocket listener.
    Device,
    /// `FileDescriptorName=api`: the backend HTTP listener.
    Api,
}

impl ListenerName {
    /// The name as written in `FileDescriptorName=`.
    pub fn as_str(self) -> &'static str {
        match self {
            ListenerName::Device => "device",
            ListenerName::Api => "api",
        }
    }

    fn from_fd_name(name: &str) -> Option<Self> {
        match name {
            "device" => Some(ListenerName::Device),
            "api" => Some(ListenerName::Api),
            _ => None,
        }
    }
}

impl std::fmt::Display for ListenerName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What is wrong with the `LISTEN_*` environment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListenEnvError {
    /// `LISTEN_PID` is unset or another process's: the descriptors were
    /// meant for a parent, not for us. Not a failure: sd_listen_fds(3)
    /// answers "none" in that case, and so does [`take_activated_listeners`].
    #[error("LISTEN_FDS is meant for process {listen_pid}, this is {pid}: ignored")]
    NotForUs { listen_pid: String, pid: u32 },
    /// `LISTEN_PID` is not a number.
    #[error("LISTEN_PID={0:?} is not a process id")]
    BadPid(String),
    /// `LISTEN_FDS` is not a number, or an absurd one.
    #[error("LISTEN_FDS={0:?} is not a number of descriptors")]
    BadCount(String),
    /// Descriptors without names: pushgate cannot tell device from api.
    #[error(
        "LISTEN_FDS={count} but LISTEN_FDNAMES is unset: give each .socket unit \
         FileDescriptorName=device or FileDescriptorName=api"
    )]
    MissingNames { count: usize },
    /// Not one name per descriptor.
    #[error("LISTEN_FDNAMES has {names} names for LISTEN_FDS={count} descriptors")]
    NameCount { count: usize, names: usize },
    /// A name other than `device` or `api`.
    #[error(
        "descriptor {fd} is named {name:?}; pushgate takes only \"device\" and \"api\" \
         (FileDescriptorName= in the .socket unit)"
    )]
    UnknownName { fd: RawFd, name: String },
    /// Two descriptors with one name.
    #[error(
        "descriptors {first} and {second} are both named {name:?}; pushgate takes one \
         socket per name (a .socket unit with several ListenStream= gives them all its one name)"
    )]
    DuplicateName {
        name: &'static str,
        first: RawFd,
        second: RawFd,
    },
}

/// Reads the socket activation variables as sd_listen_fds_with_names(3) does,
/// without touching the process: `pid` is ours, the rest are the values of
/// `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` (`None` when unset).
///
/// Returns each passed descriptor (3, 4, …) with its name; empty when
/// `LISTEN_FDS` is unset or 0. Every descriptor must be named `device` or
/// `api`, each name at most once: an unnamed or unknown descriptor is a
/// deployment mistake worth refusing to start over, not something to guess.
pub fn parse_listen_env(
    pid: u32,
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    listen_fdnames: Option<&str>,
) -> Result<Vec<(RawFd, ListenerName)>, ListenEnvError> {
    let Some(listen_fds) = listen_fds else {
        return Ok(Vec::new());
    };
    let Some(listen_pid) = listen_pid else {
        return Err(ListenEnvError::NotForUs {
            listen_pid: "(LISTEN_PID unset)".to_owned(),
            pid,
        });
    };
    let for_pid: u32 = listen_pid
        .trim()
        .parse()
        .map_err(|_| ListenEnvError::BadPid(listen_pid.to_owned()))?;
    if for_pid != pid {
        return Err(ListenEnvError::NotForUs {
            listen_pid: listen_pid.to_owned(),
            pid,
        });
    }
    let count: usize = listen_fds
        .trim()
        .parse()
        .map_err(|_| ListenEnvError::BadCount(listen_fds.to_owned()))?;
    // Past this the descriptor numbers would overflow; nobody passes that many.
    if count > (RawFd::MAX - LISTEN_FDS_START) as usize {
        return Err(ListenEnvError::BadCount(listen_fds.to_owned()));
    }
    if count == 0 {
        return Ok(Vec::new());
    }
    let Some(listen_fdnames) = listen_fdnames else {
        return Err(ListenEnvError::MissingNames { count });
    };
    let names: Vec<&str> = listen_fdnames.split(':').collect();
    if names.len() != count {
        return Err(ListenEnvError::NameCount {
            count,
            names: names.len(),
        });
    }
    let mut out: Vec<(RawFd, ListenerName)> = Vec::with_capacity(count);
    for (fd, name) in (LISTEN_FDS_START..).zip(names) {
        let Some(known) = ListenerName::from_fd_name(name) else {
            return Err(ListenEnvError::UnknownName {
                fd,
                name: name.to_owned(),
            });
        };
        if let Some(&(first, _)) = out.iter().find(|(_, n)| *n == known) {
            return Err(ListenEnvError::DuplicateName {
                name: known.as_str(),
                first,
                second: fd,
            });
        }
        out.push((fd, known));
    }
    Ok(out)
}

/// The listeners systemd passed; `None` for a name it did not pass (the
/// gateway then binds that one itself from the config).
#[derive(Debug, Default)]
pub struct ActivatedListeners {
    /// `FileDescriptorName=device`.
    pub device: Option<TcpListener>,
    /// `FileDescriptorName=api`.
    pub api: Option<TcpListener>,
}

impl ActivatedListeners {
    /// True when nothing was passed (not socket-activated).
    pub fn is_empty(&self) -> bool {
        self.device.is_none() && self.api.is_none()
    }
}

/// Takes the listening sockets systemd passed (`LISTEN_PID`, `LISTEN_FDS`,
/// `LISTEN_FDNAMES`; see [`parse_listen_env`]), checks each is a listening
/// TCP socket, makes it nonblocking and close-on-exec, and unsets the three
/// variables so no child inherits them. Without `LISTEN_FDS`, or with one
/// meant for another process, the answer is empty.
///
/// Call it once, early in `main`, before the tokio runtime starts threads:
/// it changes the environment, which is only sound while no other thread
/// reads it. The returned listeners go to `tokio::net::TcpListener::from_std`
/// inside the runtime.
pub fn take_activated_listeners() -> io::Result<ActivatedListeners> {
    let var = |key: &str| std::env::var_os(key).map(|v| v.to_string_lossy().into_owned());
    let parsed = parse_listen_env(
        std::process::id(),
        var("LISTEN_PID").as_deref(),
        var("LISTEN_FDS").as_deref(),
        var("LISTEN_FDNAMES").as_deref(),
    );
    let result = match parsed {
        Ok(fds) if fds.is_empty() => Ok(ActivatedListeners::default()),
        Ok(fds) => adopt(fds),
        Err(e @ ListenEnvError::NotForUs { .. }) => {
            warn!("socket activation: {e}");
            Ok(ActivatedListeners::default())
        }
        Err(e) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket activation: {e}"),
        )),
    };
    for key in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(key);
    }
    result
}

/// Turns the checked descriptor numbers into listeners.
///
/// The workspace forbids `unsafe`, and making an owned socket out of a bare
/// descriptor number cannot be done without it; the `listenfd` crate does
/// that one step (after checking the descriptor is a TCP socket, and marking
/// it close-on-exec). It reads `LISTEN_FDS`/`LISTEN_PID` itself, which we
/// have already checked are ours.
fn adopt(fds: Vec<(RawFd, ListenerName)>) -> io::Result<ActivatedListeners> {
    // listenfd counts from LISTEN_FDS_FIRST_FD when set (an extension of its
    // own); systemd always starts at 3, which is what `fds` assumed.
    std::env::remove_var("LISTEN_FDS_FIRST_FD");
    let mut passed = listenfd::ListenFd::from_env();
    let mut out = ActivatedListeners::default();
    for (fd, name) in fds {
        let what =
            |e: &dyn std::fmt::Display| format!("socket activation: descriptor {fd} ({name}): {e}");
        let index = (fd - LISTEN_FDS_START) as usize;
        let listener = passed
            .take_tcp_listener(index)
            .map_err(|e| io::Error::new(e.kind(), what(&e)))?
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, what(&"not passed")))?;
        let sock = SockRef::from(&listener);
        let listening = sock.r#type()? == Type::STREAM && sock.is_listener()?;
        if !listening {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                what(
                    &"not a listening socket (the .socket unit needs ListenStream= and Accept=no)",
                ),
            ));
        }
        listener
            .set_nonblocking(true)
            .map_err(|e| io::Error::new(e.kind(), what(&e)))?;
        match listener.local_addr() {
            Ok(addr) => info!(%name, fd, %addr, "socket activation: listener taken"),
            Err(_) => info!(%name, fd, "socket activation: listener taken"),
        }
        match name {
            ListenerName::Device => out.device = Some(listener),
            ListenerName::Api => out.api = Some(listener),
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// accept() errors

/// What an `accept()` error means for the accept loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptErrorClass {
    /// One connection went wrong before we took it (aborted, reset, refused
    /// by a firewall rule, a network error): accept the next one at once.
    Connection,
    /// The process or the host is out of descriptors or memory (`EMFILE`,
    /// `ENFILE`, `ENOBUFS`, `ENOMEM`): retrying at once would spin. Wait for
    /// connections to close.
    ResourceExhausted,
    /// Anything else (`EBADF`, `EINVAL`, …): the listener itself is unwell.
    /// Backed off like exhaustion so the loop cannot spin; the caller may
    /// decide to stop.
    Other,
}

/// Sorts an `accept()` error; see [`AcceptErrorClass`].
pub fn classify_accept_error(err: &io::Error) -> AcceptErrorClass {
    match err.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
            AcceptErrorClass::ResourceExhausted
        }
        // accept(2): "Linux accept() passes already-pending network errors on
        // the new socket as an error code ... should be treated like EAGAIN".
        Some(
            libc::ECONNABORTED
            | libc::ECONNRESET
            | libc::EPROTO
            | libc::EPERM
            | libc::EINTR
            | libc::EAGAIN
            | libc::ETIMEDOUT
            | libc::ENETDOWN
            | libc::ENETUNREACH
            | libc::EHOSTDOWN
            | libc::EHOSTUNREACH
            | libc::ENONET
            | libc::ENOPROTOOPT
            | libc::EOPNOTSUPP,
        ) => AcceptErrorClass::Connection,
        Some(_) => AcceptErrorClass::Other,
        None => match err.kind() {
            io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::TimedOut => AcceptErrorClass::Connection,
            io::ErrorKind::OutOfMemory => AcceptErrorClass::ResourceExhausted,
            _ => AcceptErrorClass::Other,
        },
    }
}

/// True for `EMFILE`, `ENFILE`, `ENOBUFS`, `ENOMEM`.
pub fn is_resource_exhausted(err: &io::Error) -> bool {
    classify_accept_error(err) == AcceptErrorClass::ResourceExhausted
}

/// Backoff state of one accept loop: after an exhaustion error the loop
/// sleeps 5 ms, then 10, 20, … up to 1 s, until an accept succeeds
/// ([`AcceptBackoff::reset`]). Warnings are logged at most once a second,
/// with the number of errors not logged since, so a descriptor shortage
/// under a reconnect storm does not flood the log.
#[derive(Debug, Clone)]
pub struct AcceptBackoff {
    initial: Duration,
    max: Duration,
    next: Duration,
    last_log: Option<Instant>,
    unlogged: u64,
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        Self::new()
    }
}

impl AcceptBackoff {
    /// First sleep after an exhaustion error.
    pub const INITIAL: Duration = Duration::from_millis(5);
    /// Longest sleep.
    pub const MAX: Duration = Duration::from_secs(1);
    /// Shortest time between two warnings.
    pub const LOG_EVERY: Duration = Duration::from_secs(1);

    /// 5 ms doubling to 1 s.
    pub fn new() -> Self {
        Self::with_limits(Self::INITIAL, Self::MAX)
    }

    /// Custom first and longest sleep.
    pub fn with_limits(initial: Duration, max: Duration) -> Self {
        AcceptBackoff {
            initial,
            max,
            next: initial,
            last_log: None,
            unlogged: 0,
        }
    }

    /// How long to wait before the next `accept()` after `err`: `None` for a
    /// per-connection error (accept again now), otherwise the current delay,
    /// which then doubles up to the maximum.
    pub fn delay_for(&mut self, err: &io::Error) -> Option<Duration> {
        match classify_accept_error(err) {
            AcceptErrorClass::Connection => None,
            AcceptErrorClass::ResourceExhausted | AcceptErrorClass::Other => {
                let delay = self.next;
                self.next = self.next.saturating_mul(2).min(self.max);
                Some(delay)
            }
        }
    }

    /// Deals with one `accept()` error: logs it (rate-limited) and sleeps as
    /// [`AcceptBackoff::delay_for`] says. Cancel-safe: dropping the future
    /// only cuts the sleep short.
    pub async fn on_error(&mut self, err: &io::Error) {
        let Some(delay) = self.delay_for(err) else {
            debug!(error = %err, "accept failed for one connection");
            return;
        };
        if let Some(unlogged) = self.may_log(Instant::now()) {
            match classify_accept_error(err) {
                AcceptErrorClass::ResourceExhausted => warn!(
                    error = %err,
                    backoff_ms = delay.as_millis() as u64,
                    not_logged = unlogged,
                    "accept: out of descriptors or memory, backing off"
                ),
                _ => error!(
                    error = %err,
                    backoff_ms = delay.as_millis() as u64,
                    not_logged = unlogged,
                    "accept failed, backing off"
                ),
            }
        }
        tokio::time::sleep(delay).await;
    }

    /// After a successful accept: the next error starts from the first delay.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }

    /// `Some(errors not logged since the last log)` when a log line is due at
    /// `now`, else counts this one as not logged.
    fn may_log(&mut self, now: Instant) -> Option<u64> {
        let due = self
            .last_log
            .is_none_or(|last| now.saturating_duration_since(last) >= Self::LOG_EVERY);
        if due {
            self.last_log = Some(now);
            Some(std::mem::take(&mut self.unlogged))
        } else {
            self.unlogged += 1;
            None
        }
    }
}

/// Accepts the next connection, backing off on errors, and tunes it with
/// [`tune_accepted`]. Cancel-safe, so it can sit in a `select!` beside a
/// shutdown signal.
pub async fn accept_tuned(
    listener: &tokio::net::TcpListener,
    backoff: &mut AcceptBackoff,
) -> (tokio::net::TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                backoff.reset();
                tune_accepted(&stream);
                return (stream, peer);
            }
            Err(e) => backoff.on_error(&e).await,
        }
    }
}

/// The API's listener for `axum::serve`: accepts like [`accept_tuned`]
/// while `accepting` is true, and leaves connections in the backlog while it
/// is false (a new process is taking the listener over).
pub struct GatedListener {
    inner: tokio::net::TcpListener,
    accepting: tokio::sync::watch::Receiver<bool>,
    backoff: AcceptBackoff,
}

impl GatedListener {
    pub fn new(
        inner: tokio::net::TcpListener,
        accepting: tokio::sync::watch::Receiver<bool>,
    ) -> GatedListener {
        GatedListener {
            inner,
            accepting,
            backoff: AcceptBackoff::new(),
        }
    }
}

impl axum::serve::Listener for GatedListener {
    type Io = tokio::net::TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let GatedListener {
            inner,
            accepting,
            backoff,
        } = self;
        loop {
            if accepting.wait_for(|on| *on).await.is_err() {
                // The node is gone: nothing more to accept.
                std::future::pending::<()>().await;
            }
            tokio::select! {
                accepted = accept_tuned(inner, backoff) => return accepted,
                _ = accepting.wait_for(|on| !*on) => {}
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn localhost0() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

    #[test]
    fn bind_twice_on_one_port_with_reuseport() {
        let first = bind_listener(localhost0(), DEFAULT_BACKLOG).unwrap();
        let addr = first.local_addr().unwrap();
        let second = bind_listener(addr, DEFAULT_BACKLOG).unwrap();
        assert_eq!(second.local_addr().unwrap(), addr);
        // Without SO_REUSEPORT the same bind is refused: the option is what
        // made the second bind work.
        let plain = std::net::TcpListener::bind(addr).unwrap_err();
        assert_eq!(plain.kind(), io::ErrorKind::AddrInUse);
    }

    #[test]
    fn bound_listener_is_nonblocking_and_listening() {
        let listener = bind_listener(localhost0(), 16).unwrap();
        assert_eq!(
            listener.accept().unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        assert!(SockRef::from(&listener).is_listener().unwrap());
    }

    #[test]
    fn bind_beside_a_plain_listener_is_refused() {
        // SO_REUSEPORT only shares a port among sockets that all set it: a
        // port held by anything else is still "port taken".
        let taken = std::net::TcpListener::bind(localhost0()).unwrap();
        let addr = taken.local_addr().unwrap();
        let err = bind_listener(addr, 16).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    }

    #[test]
    fn unspecified_ipv6_is_dual_stack() {
        let listener = match bind_listener("[::]:0".parse().unwrap(), 16) {
            Ok(l) => l,
            // A host without IPv6 cannot run this check.
            Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => return,
            Err(e) => panic!("{e}"),
        };
        assert!(!SockRef::from(&listener).only_v6().unwrap());
        let port = listener.local_addr().unwrap().port();
        std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    }

    #[tokio::test]
    async fn tune_accepted_sets_nodelay_and_keepalive() {
        let listener =
            tokio::net::TcpListener::from_std(bind_listener(localhost0(), 16).unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let sock = SockRef::from(&stream);
        assert!(!sock.tcp_nodelay().unwrap());
        assert!(!sock.keepalive().unwrap());

        tune_accepted(&stream);
        assert!(sock.tcp_nodelay().unwrap());
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
        assert_eq!(sock.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        assert_eq!(sock.tcp_keepalive_retries().unwrap(), KEEPALIVE_PROBES);
    }

    #[tokio::test]
    async fn accept_tuned_returns_a_tuned_connection() {
        let listener =
            tokio::net::TcpListener::from_std(bind_listener(localhost0(), 16).unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut backoff = AcceptBackoff::new();
        backoff.delay_for(&io::Error::from_raw_os_error(libc::EMFILE));
        let (stream, peer) = accept_tuned(&listener, &mut backoff).await;
        assert_eq!(peer, client.local_addr().unwrap());
        assert!(SockRef::from(&stream).tcp_nodelay().unwrap());
        // A success resets the backoff.
        assert_eq!(
            backoff.delay_for(&io::Error::from_raw_os_error(libc::EMFILE)),
            Some(AcceptBackoff::INITIAL)
        );
    }

    const PID: u32 = 4242;

    fn parse(
        pid: Option<&str>,
        fds: Option<&str>,
        names: Option<&str>,
    ) -> Result<Vec<(RawFd, ListenerName)>, ListenEnvError> {
        parse_listen_env(PID, pid, fds, names)
    }

    #[test]
    fn listen_env_unset_or_zero_is_empty() {
        assert_eq!(parse(None, None, None), Ok(vec![]));
        assert_eq!(parse(Some("4242"), None, Some("device")), Ok(vec![]));
        assert_eq!(parse(Some("4242"), Some("0"), None), Ok(vec![]));
    }

    #[test]
    fn listen_env_maps_names_to_descriptors_from_3() {
        assert_eq!(
            parse(Some("4242"), Some("2"), Some("device:api")),
            Ok(vec![(3, ListenerName::Device), (4, ListenerName::Api)])
        );
        assert_eq!(
            parse(Some("4242"), Some("2"), Some("api:device")),
            Ok(vec![(3, ListenerName::Api), (4, ListenerName::Device)])
        );
        assert_eq!(
            parse(Some("4242"), Some("1"), Some("api")),
            Ok(vec![(3, ListenerName::Api)])
        );
    }

    #[test]
    fn listen_env_of_another_process_is_not_ours() {
        assert!(matches!(
            parse(Some("4243"), Some("1"), Some("device")),
            Err(ListenEnvError::NotForUs { pid: PID, .. })
        ));
        assert!(matches!(
            parse(None, Some("1"), Some("device")),
            Err(ListenEnvError::NotForUs { pid: PID, .. })
        ));
    }

    #[test]
    fn listen_env_refuses_garbage() {
        assert_eq!(
            parse(Some("x"), Some("1"), Some("device")),
            Err(ListenEnvError::BadPid("x".into()))
        );
        assert_eq!(
            parse(Some("4242"), Some("-1"), Some("device")),
            Err(ListenEnvError::BadCount("-1".into()))
        );
        assert_eq!(
            parse(Some("4242"), Some("99999999999"), Some("device")),
            Err(ListenEnvError::BadCount("99999999999".into()))
        );
        assert_eq!(
            parse(Some("4242"), Some("1"), None),
            Err(ListenEnvError::MissingNames { count: 1 })
        );
        assert_eq!(
            parse(Some("4242"), Some("2"), Some("device")),
            Err(ListenEnvError::NameCount { count: 2, names: 1 })
        );
        assert_eq!(
            parse(Some("4242"), Some("2"), Some("device:pushgate.socket")),
            Err(ListenEnvError::UnknownName {
                fd: 4,
                name: "pushgate.socket".into()
            })
        );
        assert_eq!(
            parse(Some("4242"), Some("3"), Some("api:device:device")),
            Err(ListenEnvError::DuplicateName {
                name: "device",
                first: 4,
                second: 5
            })
        );
    }

    #[test]
    fn not_activated_gives_no_listeners() {
        // cargo test does not set LISTEN_FDS; if it ever did, this checks nothing.
        if std::env::var_os("LISTEN_FDS").is_none() {
            assert!(take_activated_listeners().unwrap().is_empty());
        }
    }

    #[test]
    fn accept_errors_are_classified() {
        let class = |errno| classify_accept_error(&io::Error::from_raw_os_error(errno));
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert_eq!(class(errno), AcceptErrorClass::ResourceExhausted, "{errno}");
            assert!(is_resource_exhausted(&io::Error::from_raw_os_error(errno)));
        }
        for errno in [libc::ECONNABORTED, libc::EPROTO, libc::EPERM, libc::EINTR] {
            assert_eq!(class(errno), AcceptErrorClass::Connection, "{errno}");
        }
        assert_eq!(class(libc::EBADF), AcceptErrorClass::Other);
        assert_eq!(
            classify_accept_error(&io::Error::from(io::ErrorKind::ConnectionAborted)),
            AcceptErrorClass::Connection
        );
    }

    #[test]
    fn backoff_doubles_to_one_second_and_resets() {
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        let mut backoff = AcceptBackoff::new();
        let delays: Vec<u64> = (0..10)
            .map(|_| backoff.delay_for(&emfile).unwrap().as_millis() as u64)
            .collect();
        assert_eq!(delays, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);

        // A per-connection error neither sleeps nor moves the backoff.
        let aborted = io::Error::from_raw_os_error(libc::ECONNABORTED);
        assert_eq!(backoff.delay_for(&aborted), None);
        assert_eq!(backoff.delay_for(&emfile), Some(Duration::from_secs(1)));

        backoff.reset();
        assert_eq!(backoff.delay_for(&emfile), Some(Duration::from_millis(5)));
    }

    #[test]
    fn backoff_logs_at_most_once_a_second() {
        let mut backoff = AcceptBackoff::new();
        let t0 = Instant::now();
        assert_eq!(backoff.may_log(t0), Some(0));
        assert_eq!(backoff.may_log(t0 + Duration::from_millis(10)), None);
        assert_eq!(backoff.may_log(t0 + Duration::from_millis(999)), None);
        assert_eq!(backoff.may_log(t0 + Duration::from_millis(1000)), Some(2));
        assert_eq!(backoff.may_log(t0 + Duration::from_millis(1500)), None);
        assert_eq!(backoff.may_log(t0 + Duration::from_millis(2100)), Some(1));
    }

    #[tokio::test]
    async fn on_error_returns_at_once_for_a_connection_error() {
        let mut backoff = AcceptBackoff::with_limits(Duration::from_secs(3600), Duration::MAX);
        // Would hang for an hour if it slept.
        backoff
            .on_error(&io::Error::from_raw_os_error(libc::ECONNABORTED))
            .await;
    }
}

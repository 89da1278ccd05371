//! Tells systemd how the service is doing, without libsystemd: readiness,
//! stopping, a status line and watchdog pings, as sd_notify(3) datagrams to
//! `$NOTIFY_SOCKET`. Every call is a no-op when that variable is unset (not
//! run by systemd, or a unit without `Type=notify`), so callers need no checks.

use std::ffi::OsStr;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use tracing::{debug, warn};

/// How long a notification may wait for room in systemd's socket buffer.
/// systemd reads its notify socket promptly; this only bounds a wedged
/// manager, so the caller (possibly a runtime worker) is never stuck.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// `READY=1`: listeners are bound and the store is open. With `Type=notify`,
/// systemd considers the service started (and starts units ordered after it)
/// only now.
pub fn notify_ready() {
    send_logged("READY=1");
}

/// `MAINPID=…`: after a hand-over restart this process, not the one systemd
/// started, is the service (the unit needs `NotifyAccess=all` for systemd
/// to take it from us).
pub fn notify_main_pid() {
    send_logged(&format!("MAINPID={}", std::process::id()));
}

/// `STOPPING=1`: the drain has begun. `systemctl status` shows "deactivating".
pub fn notify_stopping() {
    send_logged("STOPPING=1");
}

/// `STATUS=…`: one line for `systemctl status` (e.g. "draining 12034
/// connections"). Line breaks would end the field, so they become spaces.
pub fn notify_status(status: &str) {
    let line: String = status
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect();
    send_logged(&format!("STATUS={line}"));
}

/// `WATCHDOG=1`: proof of life, due every [`watchdog_interval`].
pub fn notify_watchdog() {
    send_logged("WATCHDOG=1");
}

/// How often to call [`notify_watchdog`] when the unit sets `WatchdogSec=`:
/// half the watchdog timeout, as sd_watchdog_enabled(3) advises. `None`
/// when there is no watchdog, or it is meant for another process.
pub fn watchdog_interval() -> Option<Duration> {
    let var = |key: &str| std::env::var_os(key).map(|v| v.to_string_lossy().into_owned());
    parse_watchdog(
        std::process::id(),
        var("WATCHDOG_USEC").as_deref(),
        var("WATCHDOG_PID").as_deref(),
    )
}

/// Starts a task that pings the watchdog every [`watchdog_interval`], until
/// the process exits or the handle is aborted; `None` without a watchdog.
/// Keep it running through the drain: a stopping service is still watched.
/// Must be called inside a tokio runtime.
pub fn spawn_watchdog() -> Option<tokio::task::JoinHandle<()>> {
    let every = watchdog_interval()?;
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            notify_watchdog();
        }
    }))
}

/// The watchdog rule of sd_watchdog_enabled(3) on given values: `usec` and
/// `pid` are `WATCHDOG_USEC` and `WATCHDOG_PID` (`None` when unset), `our_pid`
/// is ours. Returns half the timeout.
pub fn parse_watchdog(our_pid: u32, usec: Option<&str>, pid: Option<&str>) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok()? != our_pid {
            return None;
        }
    }
    Some(Duration::from_micros(usec) / 2)
}

/// Sends one raw notification (`KEY=value` lines) to `$NOTIFY_SOCKET`.
/// `Ok(false)` when the variable is unset, `Ok(true)` when sent.
pub fn notify(state: &str) -> io::Result<bool> {
    match std::env::var_os("NOTIFY_SOCKET") {
        None => Ok(false),
        Some(socket) => send_to(&socket, state.as_bytes()).map(|()| true),
    }
}

fn send_logged(state: &str) {
    match notify(state) {
        Ok(true) => debug!(state, "sd_notify sent"),
        Ok(false) => {}
        Err(e) => warn!(error = %e, state, "sd_notify failed"),
    }
}

/// Sends `msg` as one datagram to the notify socket named `socket`: a path,
/// or `@name` for a Linux abstract socket (as systemd's own sd_notify reads it).
fn send_to(socket: &OsStr, msg: &[u8]) -> io::Result<()> {
    let addr = notify_addr(socket)?;
    let sock = UnixDatagram::unbound()?;
    sock.set_write_timeout(Some(SEND_TIMEOUT))?;
    let sent = sock.send_to_addr(msg, &addr)?;
    if sent != msg.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "notification cut short",
        ));
    }
    Ok(())
}

fn notify_addr(socket: &OsStr) -> io::Result<SocketAddr> {
    match socket.as_bytes() {
        [b'@', name @ ..] => SocketAddr::from_abstract_name(name),
        [b'/', ..] => SocketAddr::from_pathname(socket),
        _ => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "NOTIFY_SOCKET={}: only a path or an @abstract name is supported",
                socket.to_string_lossy()
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn recv(sock: &UnixDatagram) -> String {
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    // The only test that touches NOTIFY_SOCKET, so tests running in parallel
    // never see each other's value.
    #[test]
    fn ready_reaches_the_notify_socket_and_unset_is_a_no_op() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let systemd = UnixDatagram::bind(&path).unwrap();

        std::env::set_var("NOTIFY_SOCKET", &path);
        notify_ready();
        assert_eq!(recv(&systemd), "READY=1");
        notify_status("draining\n3 connections");
        assert_eq!(recv(&systemd), "STATUS=draining 3 connections");
        notify_stopping();
        assert_eq!(recv(&systemd), "STOPPING=1");
        notify_watchdog();
        assert_eq!(recv(&systemd), "WATCHDOG=1");

        std::env::remove_var("NOTIFY_SOCKET");
        assert!(!notify("READY=1").unwrap());
        notify_ready();
        systemd.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(
            systemd.recv(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }

    #[test]
    fn abstract_socket_names_start_with_at() {
        let name = format!("pushgate-test-notify-{}", std::process::id());
        let systemd =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        send_to(OsStr::new(&format!("@{name}")), b"READY=1").unwrap();
        assert_eq!(recv(&systemd), "READY=1");
    }

    #[test]
    fn unsupported_or_absent_sockets_are_errors() {
        let err = send_to(OsStr::new("vsock:2:1234"), b"READY=1").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::Unsupported);
        let dir = tempfile::tempdir().unwrap();
        assert!(send_to(dir.path().join("none").as_os_str(), b"READY=1").is_err());
    }

    #[test]
    fn watchdog_is_half_the_timeout_and_only_ours() {
        let us = 77;
        assert_eq!(
            parse_watchdog(us, Some("30000000"), None),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            parse_watchdog(us, Some("30000000"), Some("77")),
            Some(Duration::from_secs(15))
        );
        assert_eq!(parse_watchdog(us, Some("30000000"), Some("78")), None);
        assert_eq!(parse_watchdog(us, Some("30000000"), Some("x")), None);
        assert_eq!(parse_watchdog(us, Some("0"), None), None);
        assert_eq!(parse_watchdog(us, Some("soon"), None), None);
        assert_eq!(parse_watchdog(us, None, Some("77")), None);
    }
}

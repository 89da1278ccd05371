//! Socket activation without systemd as PID 1: `systemd-socket-activate`
//! (Debian's systemd package; `.ci/run` installs it if missing) binds both
//! listeners, starts pushgate on the first connection with `LISTEN_FDS` and
//! `LISTEN_FDNAMES=device:api`, and pushgate serves on those sockets. A
//! SIGHUP then hands the very same sockets to a successor.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::process::{Proc, BIN};

use crate::support::*;

/// Two ports free right now (bound to learn them, then let go).
fn free_ports() -> (u16, u16) {
    let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_on_sockets_passed_by_systemd_socket_activate_and_hands_them_over() {
    let dir = tempfile::tempdir().unwrap();
    let (device_port, api_port) = free_ports();
    let store = dir.path().join("store").display().to_string();
    // The config's addresses are not bound: the passed sockets are used.
    let toml = base_toml().replace(
        "kind = \"memory\"",
        &format!("kind = \"redb\"\npath = \"{store}\""),
    );
    let config = dir.path().join("pushgate.toml");
    std::fs::write(&config, toml).unwrap();

    let mut child = Command::new("systemd-socket-activate")
        .arg(format!("--listen=127.0.0.1:{device_port}"))
        .arg(format!("--listen=127.0.0.1:{api_port}"))
        .arg("--fdname=device:api")
        .arg(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("systemd-socket-activate (Debian package systemd) is installed");
    let log = crate::process::read_lines(child.stderr.take().unwrap());
    let gw = Gateway {
        node: None,
        device: format!("127.0.0.1:{device_port}").parse().unwrap(),
        api: format!("127.0.0.1:{api_port}").parse().unwrap(),
    };

    // The first connection starts the gateway (systemd-socket-activate
    // waits for one, then execs it with the sockets); it is then served.
    let connect = tokio::time::timeout(WAIT, async {
        loop {
            let url = format!("ws://{}/v1/connect?token={}", gw.device, token("a1", &[]));
            if let Ok((ws, _)) = tokio_tungstenite::connect_async(url).await {
                return Device { ws };
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let mut d = connect
        .await
        .expect("the gateway started on the first connection");
    assert_eq!(d.recv().await["t"], "hello");
    let pushed = gw
        .push(json!({"to": {"device": "a1"}, "data": {"n": 1}}))
        .await;
    assert_eq!(d.recv().await["id"], pushed["id"]);
    let lines = crate::process::lines_until(&log, "pushgate serving");
    let taken = lines
        .iter()
        .filter(|l| l.contains("socket activation: listener taken"))
        .count();
    assert_eq!(
        taken,
        2,
        "both listeners came from LISTEN_FDS:\n{}",
        lines.join("\n")
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&format!("device=127.0.0.1:{device_port}"))),
        "{}",
        lines.join("\n")
    );

    // A reload hands the passed sockets on: the successor serves on them.
    let hup = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let bye = d.recv().await;
    assert_eq!(bye["reason"], "draining", "{bye}");
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the old process did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
    let lines = crate::process::lines_until(&log, "pushgate serving");
    let successor: u32 = lines
        .iter()
        .rev()
        .find_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("pid=")))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no successor pid in:\n{}", lines.join("\n")));
    let mut d = gw.connect("a1").await;
    let second = gw
        .push(json!({"to": {"device": "a1"}, "data": {"n": 2}}))
        .await;
    loop {
        // The first one comes again first if its ack did not make it.
        let m = d.recv().await;
        if m["id"] == second["id"] {
            break;
        }
        assert_eq!(m["id"], pushed["id"], "{m}");
    }
    Proc::stop_pid(successor);
}

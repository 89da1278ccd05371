//! The `pushgate` binary as a process: exit codes, signals and drain, the
//! `check` and `token` commands, a startup failure.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::json;

use crate::support::*;

pub const BIN: &str = env!("CARGO_BIN_EXE_pushgate");

/// A gateway process on ephemeral ports; its addresses read from its log.
pub struct Proc {
    pub child: Child,
    pub device: SocketAddr,
    pub api: SocketAddr,
    pub dir: tempfile::TempDir,
    log: std::sync::mpsc::Receiver<String>,
}

impl Proc {
    /// Start `pushgate serve` with the base config (edited) written to a file.
    pub fn start(edit: impl FnOnce(String) -> String) -> Proc {
        let dir = tempfile::tempdir().unwrap();
        Proc::start_in(dir, edit)
    }

    pub fn start_in(dir: tempfile::TempDir, edit: impl FnOnce(String) -> String) -> Proc {
        let path = dir.path().join("pushgate.toml");
        std::fs::write(&path, edit(base_toml())).unwrap();
        Proc::spawn(dir, &[])
    }

    /// Start `pushgate serve` on the config file already in `dir`, with
    /// `extra` arguments (e.g. `--takeover`).
    pub fn spawn(dir: tempfile::TempDir, extra: &[&str]) -> Proc {
        let path = dir.path().join("pushgate.toml");
        Proc::spawn_config(&path, extra, dir)
    }

    /// Start `pushgate serve --config PATH EXTRA…`; `dir` is kept (and
    /// removed) with the process.
    pub fn spawn_config(path: &std::path::Path, extra: &[&str], dir: tempfile::TempDir) -> Proc {
        let mut child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(path)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let rx = read_lines(child.stderr.take().unwrap());
        let mut device = None;
        let mut api = None;
        let mut seen = Vec::new();
        while device.is_none() || api.is_none() {
            // Twice the usual wait: a `--takeover` start first waits for the
            // old process to finish its calls and close the store, on a
            // loaded 2-core machine running the other tests beside it.
            let line = rx.recv_timeout(WAIT * 2).unwrap_or_else(|_| {
                panic!(
                    "gateway did not report its addresses; it said:\n{}",
                    seen.join("\n")
                )
            });
            seen.push(line.clone());
            let field = |name: &str| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(name))
                    .and_then(|v| v.trim_matches('"').parse::<SocketAddr>().ok())
            };
            device = device.or(field("device="));
            api = api.or(field("api="));
        }
        Proc {
            child,
            device: device.unwrap(),
            api: api.unwrap(),
            dir,
            log: rx,
        }
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    }

    /// Wait for the exit code (bounded).
    pub fn wait(&mut self) -> i32 {
        let deadline = std::time::Instant::now() + WAIT * 2;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the gateway did not exit"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything logged so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.try_iter().collect()
    }

    /// Kill the process (if still running) and keep its directory, to
    /// start another one on the same files.
    pub fn into_dir(mut self) -> tempfile::TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap())
    }

    pub fn gateway(&self) -> Gateway {
        Gateway {
            node: None,
            device: self.device,
            api: self.api,
        }
    }
}

impl Proc {
    /// SIGTERM a gateway that is nobody's child here (a successor started
    /// by SIGHUP) and wait until it is gone.
    pub fn stop_pid(pid: u32) {
        let ok = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM {pid}");
        let deadline = std::time::Instant::now() + WAIT;
        let gone = || match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            // A zombie waiting for its new parent to reap it has exited too.
            Ok(stat) => stat
                .rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        };
        while !gone() {
            assert!(
                std::time::Instant::now() < deadline,
                "pid {pid} did not exit"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The lines a process writes to `stream`, as they come.
pub fn read_lines(
    stream: impl std::io::Read + Send + 'static,
) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Lines from `log` up to and including the first containing `needle`
/// (bounded wait).
pub fn lines_until(log: &std::sync::mpsc::Receiver<String>, needle: &str) -> Vec<String> {
    let mut lines = Vec::new();
    loop {
        match log.recv_timeout(WAIT) {
            Ok(line) => {
                let found = line.contains(needle);
                lines.push(line);
                if found {
                    return lines;
                }
            }
            Err(_) => panic!("no line with {needle:?}; got:\n{}", lines.join("\n")),
        }
    }
}

/// [`lines_until`] on a gateway process's log.
pub fn lines_until_in(p: &Proc, needle: &str) -> Vec<String> {
    lines_until(&p.log, needle)
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn sigterm_drains_then_exits_zero() {
    let mut p = Proc::start(|t| t.replace("drain_secs = 1", "drain_secs = 2"));
    let gw = p.gateway();
    let mut devices = Vec::new();
    for i in 0..4 {
        devices.push(gw.connect(&format!("d{i}")).await);
    }
    assert_eq!(
        http(p.api, "GET", "/readyz", None, None, "").await.status,
        200
    );
    let started = tokio::time::Instant::now();
    p.signal("-TERM");
    // Draining: readyz 503, new upgrades 503 draining, API 503 draining,
    // healthz still 200.
    let deadline = tokio::time::Instant::now() + WAIT;
    while http(p.api, "GET", "/readyz", None, None, "").await.status != 503 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        http(p.api, "GET", "/healthz", None, None, "").await.status,
        200
    );
    let r = gw
        .api(
            "POST",
            "/v1/apps/demo/messages",
            Some(json!({"to": {"broadcast": true}, "data": 1})),
        )
        .await;
    assert_eq!((r.status, r.code().as_str()), (503, "draining"));
    assert!(r.header("Retry-After").is_some());
    let req = upgrade_request(&format!("/v1/connect?token={}", token("late", &[])), "");
    let r = raw_http(p.device, req.as_bytes()).await;
    assert_eq!((r.status, r.code().as_str()), (503, "draining"));
    assert!(r.header("Retry-After").is_some());

    let mut closed_at = Vec::new();
    for d in &mut devices {
        let bye = d.expect_close(Some("draining"), 1001).await.unwrap();
        let retry = bye["retry_ms"].as_u64().unwrap();
        assert!(retry <= 5000, "{bye}");
        closed_at.push(started.elapsed());
    }
    assert_eq!(p.wait(), 0);
    // Spread over the 2 s window rather than all at once.
    let last = closed_at.iter().max().unwrap();
    assert!(*last >= Duration::from_millis(1000), "{closed_at:?}");
}

#[tokio::test]
async fn second_signal_exits_at_once_with_one() {
    let mut p = Proc::start(|t| t.replace("drain_secs = 1", "drain_secs = 60"));
    let gw = p.gateway();
    let _d = gw.connect("d1").await;
    let _d2 = gw.connect("d2").await;
    p.signal("-TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    p.signal("-INT");
    assert_eq!(p.wait(), 1);
}

#[tokio::test]
async fn port_taken_exits_one_with_a_line() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        base_toml().replacen(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"{addr}\""),
            1,
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&addr.to_string()), "{err}");
}

#[test]
fn check_reports_line_and_field_and_exits_two() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, base_toml()).unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        base_toml().replace("heartbeat_secs = 30", "heartbeat_secs = 30\nbogus_key = 1"),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("bogus_key"), "{text}");
    assert!(text.contains(":5"), "no line number in {text}");

    let bad_app = dir.path().join("bad_app.toml");
    std::fs::write(
        &bad_app,
        base_toml().replace("id = \"other\"", "id = \"Other App\""),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&bad_app)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("app[1].id"), "{text}");
}

#[tokio::test]
async fn token_command_signs_a_working_token() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, base_toml()).unwrap();
    let out = Command::new(BIN)
        .args(["token", "--config"])
        .arg(&path)
        .args([
            "--app",
            "demo",
            "--device",
            "cli-1",
            "--ttl",
            "60",
            "--topics",
            "news,sport.*",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let gw = Gateway::with_toml(&base_toml()).await;
    let mut d = gw.connect_token(&token).await;
    d.send(json!({"t": "sub", "topic": "sport.golf"})).await;
    assert_eq!(d.recv().await["t"], "subscribed");

    let out = Command::new(BIN)
        .args(["token", "--config"])
        .arg(&path)
        .args(["--app", "nope", "--device", "d"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

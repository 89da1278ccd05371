//! Resource use of a process from /proc (Linux): RSS, CPU time, open fds.
//! Used for the gateway (`--gateway-pid`) and for the load client itself.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Clock ticks per second of /proc/PID/stat's utime and stime. USER_HZ is
/// 100 on every Linux architecture's userspace ABI, so it is not read from
/// sysconf (which would need libc).
const USER_HZ: f64 = 100.0;

/// One reading of a process.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Sample {
    /// Resident set size, bytes.
    pub rss_bytes: u64,
    /// Peak resident set size (VmHWM), bytes; 0 when not known.
    pub hwm_bytes: u64,
    /// User + system CPU time, ms.
    pub cpu_ms: f64,
    /// Open file descriptors; 0 when not known.
    pub fds: u64,
    /// Bytes the process has caused to be written to storage (page-cache
    /// pages dirtied: `write_bytes` of /proc/PID/io); 0 when not known.
    #[serde(default)]
    pub write_bytes: u64,
}

/// Reads /proc/`pid` (`"self"` for this process).
pub fn read(pid: &str) -> Result<Sample> {
    let base = Path::new("/proc").join(pid);
    let status = std::fs::read_to_string(base.join("status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let rss_bytes = status_kb(&status, "VmRSS:")
        .with_context(|| format!("/proc/{pid}/status has no VmRSS"))?
        * 1024;
    let hwm_bytes = status_kb(&status, "VmHWM:").unwrap_or(0) * 1024;
    let stat = std::fs::read_to_string(base.join("stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let cpu_ms = parse_stat_cpu_ms(&stat).with_context(|| format!("parsing /proc/{pid}/stat"))?;
    // Another user's process hides its fd table; report 0 rather than fail.
    let fds = std::fs::read_dir(base.join("fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    // Readable only for our own processes (or as root).
    let write_bytes = std::fs::read_to_string(base.join("io"))
        .ok()
        .and_then(|io| io_field(&io, "write_bytes:"))
        .unwrap_or(0);
    Ok(Sample {
        rss_bytes,
        hwm_bytes,
        cpu_ms,
        fds,
        write_bytes,
    })
}

/// A `name: value` line of /proc/PID/io.
fn io_field(io: &str, name: &str) -> Option<u64> {
    io.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().parse().ok())
}

/// This process's CPU time in ms (0 if /proc is unreadable).
pub fn self_cpu_ms() -> f64 {
    read("self").map(|s| s.cpu_ms).unwrap_or(0.0)
}

/// This process's CPU time (all threads), ms, from getrusage: µs precision,
/// unlike /proc's 10 ms ticks.
pub fn own_cpu_ms() -> Result<f64> {
    use nix::sys::resource::{getrusage, UsageWho};
    let u = getrusage(UsageWho::RUSAGE_SELF).context("getrusage")?;
    let ms = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 * 1000.0 + t.tv_usec() as f64 / 1000.0;
    Ok(ms(u.user_time()) + ms(u.system_time()))
}

/// CPU time of every thread of `pid`, ms, from schedstat (ns): precise
/// where /proc/PID/stat counts 10 ms ticks.
pub fn threads_cpu_ms(pid: u32) -> Result<f64> {
    let dir = format!("/proc/{pid}/task");
    let mut ns = 0u64;
    for t in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let path = t?.path().join("schedstat");
        // A thread that exits between the listing and the read is skipped.
        if let Ok(text) = std::fs::read_to_string(&path) {
            ns += text
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .with_context(|| format!("parsing {}", path.display()))?;
        }
    }
    Ok(ns as f64 / 1e6)
}

fn status_kb(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

/// utime + stime (fields 14 and 15) in ms. The command name (field 2) may
/// contain spaces and parentheses, so fields are counted after its last `)`.
fn parse_stat_cpu_ms(stat: &str) -> Result<f64> {
    let Some(close) = stat.rfind(')') else {
        bail!("no ) in stat line");
    };
    // After ")": field 3 (state) is index 0, so utime (14) is index 11.
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    let (Some(u), Some(s)) = (fields.get(11), fields.get(12)) else {
        bail!("stat line too short");
    };
    let ticks: u64 = u.parse::<u64>().context("utime")? + s.parse::<u64>().context("stime")?;
    Ok(ticks as f64 * 1000.0 / USER_HZ)
}

/// The process metrics of a Prometheus text page (`process_*` gauges, as
/// the prometheus crate's process collector names them).
pub fn from_metrics(text: &str) -> Option<Sample> {
    let mut rss = None;
    let mut cpu = None;
    let mut fds = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let mut it = line.split_whitespace();
        let (Some(name), Some(value)) = (it.next(), it.next()) else {
            continue;
        };
        let Ok(v) = value.parse::<f64>() else {
            continue;
        };
        match name {
            "process_resident_memory_bytes" => rss = Some(v as u64),
            "process_cpu_seconds_total" => cpu = Some(v * 1000.0),
            "process_open_fds" => fds = Some(v as u64),
            _ => {}
        }
    }
    Some(Sample {
        rss_bytes: rss?,
        hwm_bytes: 0,
        cpu_ms: cpu.unwrap_or(0.0),
        fds: fds.unwrap_or(0),
        write_bytes: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_self() {
        let s = read("self").expect("/proc/self is readable on Linux");
        assert!(s.rss_bytes > 0);
        assert!(s.fds > 0);
    }

    #[test]
    fn reads_io_fields() {
        let io = "rchar: 10\nwchar: 20\nsyscr: 1\nsyscw: 2\nread_bytes: 0\nwrite_bytes: 8192\n";
        assert_eq!(io_field(io, "write_bytes:"), Some(8192));
        assert_eq!(io_field(io, "wchar:"), Some(20));
        assert_eq!(io_field(io, "cancelled_write_bytes:"), None);
    }

    #[test]
    fn parses_stat_with_odd_names() {
        let stat = "1234 (a b) c) S 1 1 1 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 10 0 0";
        assert_eq!(parse_stat_cpu_ms(stat).expect("valid"), 3000.0);
        assert!(parse_stat_cpu_ms("1234 (x) S 1").is_err());
    }

    #[test]
    fn parses_metrics() {
        let text = "# HELP x\nprocess_resident_memory_bytes 1.2e7\nprocess_cpu_seconds_total 1.5\n\
                    process_open_fds 42\npushgate_connections{app=\"a\"} 3\n";
        let s = from_metrics(text).expect("has rss");
        assert_eq!(s.rss_bytes, 12_000_000);
        assert_eq!(s.cpu_ms, 1500.0);
        assert_eq!(s.fds, 42);
        assert!(from_metrics("nothing 1\n").is_none());
    }
}

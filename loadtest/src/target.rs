//! Where the traffic goes and where it comes from: URL parsing, the
//! loopback-only rule, and the source address ranges clients bind to.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{bail, Context, Result};

/// Most source addresses a `--source` list may expand to; a typo like
/// `127.0.0.2-127.255.255.255` should fail, not allocate 16M entries.
const MAX_SOURCES: usize = 65_536;

/// A parsed `ws://`, `wss://` or `http://` URL, resolved to one address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `ws`, `wss` or `http`.
    pub scheme: String,
    /// Host as written (for `Host:` and TLS server name).
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
    pub addr: SocketAddr,
}

impl Endpoint {
    /// `host:port` as it goes into a `Host:` header.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    pub fn is_tls(&self) -> bool {
        self.scheme == "wss"
    }
}

/// Splits a URL into scheme, host, port and path, without resolving.
pub fn split_url(url: &str, schemes: &[&str]) -> Result<(String, String, u16, String)> {
    let (scheme, rest) = url
        .split_once("://")
        .with_context(|| format!("{url}: no scheme (expected {})", schemes.join(", ")))?;
    let scheme = scheme.to_ascii_lowercase();
    if !schemes.contains(&scheme.as_str()) {
        bail!(
            "{url}: scheme {scheme} not supported here (expected {})",
            schemes.join(", ")
        );
    }
    let (hostport, path) = match rest.find(['/', '?']) {
        Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_string()),
        Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
        None => (rest, "/".to_string()),
    };
    if hostport.contains('@') {
        bail!("{url}: user info in URLs is not supported");
    }
    let default_port = match scheme.as_str() {
        "wss" | "https" => 443,
        _ => 80,
    };
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .with_context(|| format!("{url}: unclosed [ in host"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().with_context(|| format!("{url}: bad port {p}"))?,
            None if after.is_empty() => default_port,
            None => bail!("{url}: junk after ]"),
        };
        (h.to_string(), port)
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (
                h.to_string(),
                p.parse().with_context(|| format!("{url}: bad port {p}"))?,
            ),
            None => (hostport.to_string(), default_port),
        }
    };
    if host.is_empty() {
        bail!("{url}: empty host");
    }
    Ok((scheme, host, port, path))
}

/// Parses and resolves `url`; refuses non-loopback addresses unless
/// `allow_remote`.
pub async fn resolve(url: &str, schemes: &[&str], allow_remote: bool) -> Result<Endpoint> {
    let (scheme, host, port, path) = split_url(url, schemes)?;
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
        .await
        .with_context(|| format!("{url}: cannot resolve {host}"))?
        .collect();
    let Some(&addr) = addrs.first() else {
        bail!("{url}: {host} resolves to no address");
    };
    if !allow_remote {
        if let Some(bad) = addrs.iter().find(|a| !a.ip().is_loopback()) {
            bail!(
                "{url}: {host} resolves to {}, outside loopback; this tool only loads \
                 127.0.0.0/8 and ::1 unless --allow-remote is given (for real metal)",
                bad.ip()
            );
        }
    }
    Ok(Endpoint {
        scheme,
        host,
        port,
        path,
        addr,
    })
}

/// Expands a `--source` value: `none`, or a comma list of addresses and
/// inclusive IPv4 ranges `a-b`.
pub fn parse_sources(spec: &str, allow_remote: bool) -> Result<Vec<IpAddr>> {
    let spec = spec.trim();
    if spec.eq_ignore_ascii_case("none") || spec.is_empty() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((a, b)) = part.split_once('-') {
            let a: Ipv4Addr = a
                .trim()
                .parse()
                .with_context(|| format!("--source {part}: {a} is not an IPv4 address"))?;
            let b: Ipv4Addr = b
                .trim()
                .parse()
                .with_context(|| format!("--source {part}: {b} is not an IPv4 address"))?;
            let (a, b) = (u32::from(a), u32::from(b));
            if b < a {
                bail!("--source {part}: range end before start");
            }
            if (b - a) as usize >= MAX_SOURCES {
                bail!("--source {part}: more than {MAX_SOURCES} addresses");
            }
            out.extend((a..=b).map(|v| IpAddr::V4(Ipv4Addr::from(v))));
        } else {
            let ip: IpAddr = part
                .parse()
                .with_context(|| format!("--source {part}: not an IP address"))?;
            out.push(ip);
        }
        if out.len() > MAX_SOURCES {
            bail!("--source: more than {MAX_SOURCES} addresses");
        }
    }
    if !allow_remote {
        if let Some(bad) = out.iter().find(|ip| !ip.is_loopback()) {
            bail!("--source: {bad} is not a loopback address (give --allow-remote on real metal)");
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_urls() {
        let (s, h, p, path) =
            split_url("ws://127.0.0.1:8080/v1/connect", &["ws", "wss"]).expect("valid");
        assert_eq!(
            (s.as_str(), h.as_str(), p, path.as_str()),
            ("ws", "127.0.0.1", 8080, "/v1/connect")
        );
        let (s, h, p, path) = split_url("WSS://[::1]/x?y=1", &["ws", "wss"]).expect("valid");
        assert_eq!(
            (s.as_str(), h.as_str(), p, path.as_str()),
            ("wss", "::1", 443, "/x?y=1")
        );
        let (_, h, p, path) = split_url("http://localhost:8081", &["http"]).expect("valid");
        assert_eq!((h.as_str(), p, path.as_str()), ("localhost", 8081, "/"));
        assert!(split_url("https://x", &["http"]).is_err());
        assert!(split_url("ws://:80/", &["ws"]).is_err());
        assert!(split_url("127.0.0.1:80", &["ws"]).is_err());
    }

    #[tokio::test]
    async fn refuses_remote_targets() {
        assert!(resolve("ws://127.0.0.1:1/", &["ws"], false).await.is_ok());
        assert!(resolve("ws://127.3.2.1:1/", &["ws"], false).await.is_ok());
        assert!(resolve("ws://[::1]:1/", &["ws"], false).await.is_ok());
        let err = resolve("ws://10.0.0.1:1/", &["ws"], false)
            .await
            .expect_err("remote refused");
        assert!(err.to_string().contains("--allow-remote"), "{err}");
        assert!(resolve("ws://192.168.1.1:1/", &["ws"], true).await.is_ok());
    }

    #[test]
    fn expands_sources() {
        let v = parse_sources("127.0.0.2-127.0.0.4,127.0.0.9", false).expect("valid");
        assert_eq!(v.len(), 4);
        assert_eq!(v[0], IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
        assert_eq!(v[3], IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9)));
        assert_eq!(
            parse_sources("127.0.0.2-127.0.0.250", false)
                .expect("valid")
                .len(),
            249
        );
        assert!(parse_sources("none", false).expect("valid").is_empty());
        assert!(parse_sources("10.0.0.1", false).is_err());
        assert!(parse_sources("10.0.0.1", true).is_ok());
        assert!(parse_sources("127.0.0.9-127.0.0.2", false).is_err());
        assert!(parse_sources("127.0.0.0-127.255.255.255", false).is_err());
    }
}

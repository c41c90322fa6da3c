//! `adclick <role> --check`: everything start-up would find wrong, found without starting.
//! The config has been read and validated by then (`serve.rs`); this adds what depends on the
//! machine: key files (readable, parseable, not readable by group or others), the data dir
//! (writable), the listen ports (free), the open-file limit against the connection caps, the
//! disk against the spool budget, and prints the effective config with secrets redacted.
//!
//! The key-file checks also run at every start ([`key_files`]): a server refuses to start on a
//! key file others can read. It never changes anything on disk (no directory is created, the
//! probe file in the data dir is removed at once).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::Result;
use serde::Serialize;

/// The findings of a check, in order.
#[derive(Debug, Default)]
pub struct Report {
    lines: Vec<(Level, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    Ok,
    Warning,
    Problem,
}

impl Report {
    pub fn ok(&mut self, s: impl Into<String>) {
        self.lines.push((Level::Ok, s.into()));
    }
    fn warning(&mut self, s: impl Into<String>) {
        self.lines.push((Level::Warning, s.into()));
    }
    pub fn problem(&mut self, s: impl Into<String>) {
        self.lines.push((Level::Problem, s.into()));
    }

    /// The problems found (warnings do not stop a start).
    pub fn problems(&self) -> Vec<&str> {
        self.lines
            .iter()
            .filter(|(l, _)| *l == Level::Problem)
            .map(|(_, s)| s.as_str())
            .collect()
    }

    /// Every finding, one per line: `ok`, `warning` or `problem`, then what.
    pub fn render(&self) -> String {
        let mut s = String::new();
        for (l, m) in &self.lines {
            let tag = match l {
                Level::Ok => "ok     ",
                Level::Warning => "warning",
                Level::Problem => "problem",
            };
            let _ = writeln!(s, "{tag}  {m}");
        }
        s
    }

    /// `Err` naming every problem, for a start that must not go on.
    pub fn into_result(self) -> Result<()> {
        let p = self.problems();
        if p.is_empty() {
            Ok(())
        } else {
            anyhow::bail!("{}", p.join("; "))
        }
    }
}

/// The mode bits of a file that hold a secret must give nothing to group and others.
#[cfg(unix)]
fn private_mode(path: &Path, what: &str) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|e| format!("{what} {}: {e}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(format!(
            "{what} {} has mode {:04o}: it holds secrets and must not be readable or writable by \
             group or others; run `chmod 600 {}` (owner only)",
            path.display(),
            mode & 0o7777,
            path.display()
        ));
    }
    Ok(())
}

#[cfg(not(unix))]
fn private_mode(_: &Path, _: &str) -> Result<(), String> {
    Ok(())
}

/// A secret file: mode first (a readable secret is a problem even if it parses), then
/// readable, then `parse` on its text.
fn secret_file(
    r: &mut Report,
    path: &Path,
    what: &str,
    parse: impl FnOnce(&str) -> Result<String, String>,
) {
    if let Err(e) = private_mode(path, what) {
        r.problem(e);
        return;
    }
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            r.problem(format!("{what} {}: cannot read: {e}", path.display()));
            return;
        }
    };
    match parse(&text) {
        Ok(m) => r.ok(format!("{what} {}: {m}, mode 0600", path.display())),
        Err(e) => r.problem(format!("{what} {}: {e}", path.display())),
    }
}

/// The collector's key files: `keys_file` (token keys) and, if set, `tls_key_file` with its
/// certificate (parsed the way the QUIC listener will). Run at every start too.
pub fn key_files(cfg: &adclick_collector::CollectorConfig) -> Report {
    let mut r = Report::default();
    secret_file(&mut r, &cfg.keys_file, "keys_file", |t| {
        adclick_proto::keyfile::KeyFile::parse(t)
            .map(|k| {
                let ids: Vec<String> = k.keyring.keys().map(|k| k.id().to_string()).collect();
                format!("key ids {} (the first signs)", ids.join(", "))
            })
            .map_err(|e| format!("not a key file: {e}"))
    });
    if let Some(key) = &cfg.tls_key_file {
        secret_file(&mut r, key, "tls_key_file", |_| {
            adclick_collector::quic::load_tls(cfg)
                .map(|_| "certificate and key load".to_string())
                .map_err(|e| e.to_string())
        });
    }
    r
}

/// The data dir exists and takes a file, or can be created (its nearest existing ancestor
/// is a writable directory).
fn data_dir(r: &mut Report, dir: &Path) {
    if dir.is_dir() {
        let probe = dir.join(format!(".adclick-check-{}", std::process::id()));
        match std::fs::File::create(&probe) {
            Ok(_) => {
                let _ = std::fs::remove_file(&probe);
                r.ok(format!("data_dir {}: writable", dir.display()));
            }
            Err(e) => r.problem(format!("data_dir {}: not writable: {e}", dir.display())),
        }
        return;
    }
    if dir.exists() {
        r.problem(format!("data_dir {}: not a directory", dir.display()));
        return;
    }
    let mut up = dir.parent();
    while let Some(p) = up {
        if p.as_os_str().is_empty() {
            break;
        }
        if p.exists() {
            let writable = p.is_dir() && writable_dir(p);
            if writable {
                r.ok(format!(
                    "data_dir {}: does not exist yet; will be created under {}",
                    dir.display(),
                    p.display()
                ));
            } else {
                r.problem(format!(
                    "data_dir {}: does not exist and {} is not a writable directory",
                    dir.display(),
                    p.display()
                ));
            }
            return;
        }
        up = p.parent();
    }
    r.problem(format!("data_dir {}: no existing parent", dir.display()));
}

fn writable_dir(p: &Path) -> bool {
    let probe = p.join(format!(".adclick-check-{}", std::process::id()));
    match std::fs::File::create(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            true
        }
        Err(_) => false,
    }
}

/// A TCP listen address can be bound now (port 0: any free port, nothing to check).
fn tcp_port(r: &mut Report, what: &str, addr: SocketAddr) {
    if addr.port() == 0 {
        r.ok(format!("{what} {addr}: an OS-assigned port"));
        return;
    }
    match std::net::TcpListener::bind(addr) {
        Ok(_) => r.ok(format!("{what} {addr}: free")),
        Err(e) => r.problem(format!("{what} {addr}: cannot listen: {e}")),
    }
}

/// The same for a UDP (QUIC) address.
fn udp_port(r: &mut Report, what: &str, addr: SocketAddr) {
    if addr.port() == 0 {
        r.ok(format!("{what} {addr}: an OS-assigned port"));
        return;
    }
    match std::net::UdpSocket::bind(addr) {
        Ok(_) => r.ok(format!("{what} udp/{addr}: free")),
        Err(e) => r.problem(format!("{what} udp/{addr}: cannot bind: {e}")),
    }
}

/// The open-file limit against the connections the config allows: past it, accepts fail
/// with EMFILE under load (a warning: the start itself succeeds).
fn open_files(r: &mut Report, connections: u64, what: &str) {
    let lim = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let Some(soft) = lim.current else {
        r.ok(format!("open files: unlimited ({what}: {connections})"));
        return;
    };
    // Spool segments, the store, sockets to peers, the runtime: a few hundred.
    let needed = connections + 256;
    if soft < needed {
        r.warning(format!(
            "open files: the limit is {soft} but {what} allow {connections} connections (+256 for \
             files and peers): raise it (systemd LimitNOFILE=, `ulimit -n`) or lower the caps"
        ));
    } else {
        r.ok(format!(
            "open files: limit {soft} >= {needed} ({what}: {connections} + 256)"
        ));
    }
}

/// Free space on the filesystem of `dir` (or its nearest existing ancestor).
fn free_bytes(dir: &Path) -> Option<u64> {
    let mut p = Some(dir);
    while let Some(d) = p {
        if d.exists() {
            let s = rustix::fs::statvfs(d).ok()?;
            return Some(s.f_bavail.saturating_mul(s.f_frsize));
        }
        p = d.parent();
    }
    None
}

/// `adclick collector --check`.
pub fn collector(cfg: &adclick_collector::CollectorConfig) -> Report {
    let mut r = key_files(cfg);
    data_dir(&mut r, &cfg.data_dir);
    tcp_port(&mut r, "listen_http", cfg.listen_http);
    if let Some(q) = cfg.listen_quic {
        udp_port(&mut r, "listen_quic", q);
    }
    let listeners = 1 + u64::from(cfg.listen_quic.is_some());
    open_files(
        &mut r,
        cfg.limits.max_connections as u64 * listeners,
        "limits.max_connections per listener",
    );
    if let Some(free) = free_bytes(&cfg.data_dir) {
        let want = cfg.spool.max_bytes.saturating_add(cfg.spool.min_free_bytes);
        if free < want {
            r.warning(format!(
                "disk: {} MiB free under {}, less than spool.max_bytes + spool.min_free_bytes \
                 ({} MiB): ingest will answer 503 before the spool budget is reached",
                free >> 20,
                cfg.data_dir.display(),
                want >> 20
            ));
        } else {
            r.ok(format!(
                "disk: {} MiB free, spool budget {} MiB",
                free >> 20,
                cfg.spool.max_bytes >> 20
            ));
        }
    }
    match adclick_collector::useragent::UaClassifier::from_config(&cfg.user_agent) {
        Ok(ua) if !ua.enabled() => {
            r.ok("user_agent: classification off (clicks forwarded as unspecified)")
        }
        Ok(ua) => {
            r.ok(format!(
                "user_agent: {} patterns from {}",
                ua.patterns(),
                ua.origin()
            ));
            if !ua.unsupported().is_empty() {
                r.warning(format!(
                    "user_agent: {} patterns skipped (not supported by the regex crate, or matching every User-Agent): {}",
                    ua.unsupported().len(),
                    ua.unsupported()
                        .iter()
                        .map(|u| u.pattern.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        Err(e) => r.problem(e.to_string()),
    }
    match cfg.forward.sink {
        adclick_collector::config::SinkKind::Grpc => {
            if cfg.aggregator_key.is_none() {
                r.warning(
                    "aggregator_key is not set: aggregators refuse ingest without it (clicks stay \
                     in the spool, refusals are logged at ERROR)",
                );
            }
            r.ok(format!(
                "aggregators: {} (not contacted by --check)",
                cfg.aggregators.join(", ")
            ));
        }
        adclick_collector::config::SinkKind::Jetstream => r.ok(format!(
            "jetstream: {} stream {} (not contacted by --check)",
            cfg.forward.jetstream.servers.join(", "),
            cfg.forward.jetstream.stream
        )),
    }
    r
}

/// `adclick aggregator --check` (the store's integrity is checked by `serve.rs`).
pub fn aggregator(cfg: &adclick_aggregator::AggregatorConfig) -> Report {
    let mut r = Report::default();
    data_dir(&mut r, &cfg.data_dir);
    tcp_port(&mut r, "listen_grpc", cfg.listen_grpc);
    tcp_port(&mut r, "listen_http", cfg.listen_http);
    open_files(
        &mut r,
        cfg.connections.max_connections as u64 * 2,
        "connections.max_connections (gRPC and HTTP)",
    );
    r.ok(format!(
        "keys: {} ingest key(s), {} API key(s){}",
        cfg.ingest_keys.len(),
        cfg.api_keys.len(),
        if cfg.query.allow_unauthenticated {
            ", queries WITHOUT a key allowed (query.allow_unauthenticated)"
        } else {
            ""
        }
    ));
    // The invalid-traffic rules: their version, and the CIDR file read as a start reads it.
    match adclick_aggregator::rules::Rules::new(&cfg.rules) {
        Ok(rules) if cfg.rules.enabled => r.ok(format!(
            "invalid-traffic rules: on, version {}{}",
            rules.version(),
            match &cfg.rules.datacenter_ip.cidr_file {
                Some(p) => format!(", data-center ranges from {}", p.display()),
                None => String::new(),
            }
        )),
        Ok(_) => r.ok("invalid-traffic rules: off ([rules] enabled = false)"),
        Err(e) => r.problem(e.to_string()),
    }
    r
}

/// `adclick query-front --check`.
pub fn query_front(cfg: &adclick_aggregator::front::FrontConfig) -> Report {
    let mut r = Report::default();
    tcp_port(&mut r, "listen_grpc", cfg.listen_grpc);
    tcp_port(&mut r, "listen_http", cfg.listen_http);
    open_files(
        &mut r,
        cfg.connections.max_connections as u64 * 2,
        "connections.max_connections (gRPC and HTTP)",
    );
    for s in &cfg.shards {
        r.ok(format!(
            "shard {} {} partitions {} (not contacted by --check)",
            s.name, s.grpc, s.partitions
        ));
    }
    r
}

/// A config file that holds secrets (inline keys) should be private too: a warning, since
/// config management often owns it (e.g. root:adclick 0640).
pub fn config_file_mode(r: &mut Report, path: &Path, holds_secrets: bool) {
    if !holds_secrets {
        return;
    }
    if let Err(e) = private_mode(path, "config file") {
        r.warning(e);
    }
}

/// The placeholder for a secret in the printed config.
fn redacted(s: &str) -> toml::Value {
    toml::Value::String(format!("<redacted, {} characters>", s.chars().count()))
}

/// Redacts `path` (dotted keys; `[]` applies to every element of an array) in `v`.
fn redact(v: &mut toml::Value, path: &[&str]) {
    let Some((head, rest)) = path.split_first() else {
        if let toml::Value::String(s) = v {
            *v = redacted(s);
        }
        return;
    };
    match (*head, v) {
        ("[]", toml::Value::Array(a)) => {
            for e in a {
                redact(e, rest);
            }
        }
        (k, toml::Value::Table(t)) => {
            if let Some(e) = t.get_mut(k) {
                redact(e, rest);
            }
        }
        _ => {}
    }
}

/// The effective config (defaults, file and environment overrides together) as TOML, each
/// secret replaced by `<redacted, N characters>`. `secrets` are dotted paths (`api_keys.[].key`).
pub fn effective<T: Serialize>(cfg: &T, secrets: &[&str]) -> Result<String> {
    let mut v = toml::Value::try_from(cfg)?;
    for s in secrets {
        let path: Vec<&str> = s.split('.').collect();
        redact(&mut v, &path);
    }
    Ok(toml::to_string(&v)?)
}

/// The query front's effective config: built from its fields (its schema type has no
/// `Serialize`; it lives with the query API).
pub fn front_effective(cfg: &adclick_aggregator::front::FrontConfig) -> Result<String> {
    #[derive(Serialize)]
    struct Shard<'a> {
        name: &'a str,
        grpc: &'a str,
        partitions: &'a str,
    }
    #[derive(Serialize)]
    struct Front<'a> {
        listen_grpc: SocketAddr,
        listen_http: SocketAddr,
        partitions: u32,
        shard_timeout_ms: u64,
        health_interval_ms: u64,
        shards: Vec<Shard<'a>>,
        connections: &'a adclick_aggregator::config::ConnectionConfig,
        query: &'a adclick_aggregator::config::QueryConfig,
        api_keys: &'a [adclick_aggregator::config::ApiKey],
    }
    let f = Front {
        listen_grpc: cfg.listen_grpc,
        listen_http: cfg.listen_http,
        partitions: cfg.partitions,
        shard_timeout_ms: cfg.shard_timeout_ms,
        health_interval_ms: cfg.health_interval_ms,
        shards: cfg
            .shards
            .iter()
            .map(|s| Shard {
                name: &s.name,
                grpc: &s.grpc,
                partitions: &s.partitions,
            })
            .collect(),
        connections: &cfg.connections,
        query: &cfg.query,
        api_keys: &cfg.api_keys,
    };
    effective(&f, &["api_keys.[].key"])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_wherever_they_sit() {
        let mut cfg = adclick_aggregator::AggregatorConfig {
            ingest_keys: vec!["ingest-secret-0123456789".into()],
            ..Default::default()
        };
        cfg.api_keys.push(adclick_aggregator::config::ApiKey {
            key: "admin-secret-0123456789".into(),
            role: adclick_aggregator::config::Role::Admin,
            advertiser_id: None,
        });
        let text = effective(&cfg, &["ingest_keys.[]", "api_keys.[].key"]).unwrap();
        assert!(!text.contains("secret"), "{text}");
        assert!(text.contains("<redacted, 24 characters>"), "{text}");
        assert!(text.contains("<redacted, 23 characters>"), "{text}");
        // Every section is there, defaults included.
        let back: adclick_aggregator::AggregatorConfig = toml::from_str(&text).unwrap();
        assert_eq!(
            back.windows.retention_minutes,
            cfg.windows.retention_minutes
        );
        assert_eq!(
            back.api_keys[0].role,
            adclick_aggregator::config::Role::Admin
        );
    }
}

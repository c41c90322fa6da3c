//! `adclick top --endpoints URL,...`: the live view of `adclick dev` for any running
//! deployment, read from its HTTP endpoints only: each endpoint's `/metrics` (the role is
//! recognised from the metric names: collector, aggregator or query front) and the query
//! API's `GET /v1/ads/top` (on the query front if one is listed, else on every aggregator,
//! merged). Rates are differences between two scrapes. It writes nothing anywhere.
//!
//! On a terminal it redraws a ratatui screen every `--interval` until `q`, Esc or Ctrl-C (or
//! `--duration`); `--once` (or no terminal) prints the view as text instead, one snapshot
//! taken `--interval` after the first scrape so the rate means something.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyModifiers};

use crate::bench::pipeline::{metric, metric_f64, scrape};
use crate::view::{REJECT_REASONS, View};

/// `adclick top`
#[derive(Debug, Args)]
pub struct TopArgs {
    /// HTTP base URLs of the servers to watch, any roles, comma-separated or repeated:
    /// collectors (their listen_http), aggregators and query fronts (their listen_http).
    #[arg(long, value_delimiter = ',', required = true)]
    endpoints: Vec<String>,
    /// API key for the top-ads query (default: $ADCLICK_API_KEY, else
    /// .adclick-dev/admin.key); without one the view shows no top ads.
    #[arg(long, env = "ADCLICK_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Refresh interval.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    interval: Duration,
    /// Print one snapshot as text and exit (the default when stdout is not a terminal is
    /// one text line per refresh).
    #[arg(long)]
    once: bool,
    /// Stop after this long (e.g. 30s); default: until q or Ctrl-C.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
}

/// What an endpoint turned out to be, from its metric names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `adclick_collector_*`.
    Collector,
    /// `adclick_aggregator_*` without the front's.
    Aggregator,
    /// `adclick_aggregator_front_*`.
    Front,
}

fn role_of(page: &str) -> Option<Role> {
    if page.contains("\nadclick_aggregator_front_") || page.starts_with("adclick_aggregator_front_")
    {
        Some(Role::Front)
    } else if page.contains("adclick_collector_") {
        Some(Role::Collector)
    } else if page.contains("adclick_aggregator_") {
        Some(Role::Aggregator)
    } else {
        None
    }
}

/// The sum over every sample of `name` whose labels contain `label` (e.g. `reason="x"`),
/// by the value of `by` (a label name): `queries_refused_total` by reason, say.
fn by_label(page: &str, name: &str, by: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let head = format!("{name}{{");
    for l in page.lines().filter(|l| l.starts_with(&head)) {
        let Some((labels, value)) = l[head.len()..].split_once("} ") else {
            continue;
        };
        let Some(v) = value.trim().parse::<f64>().ok() else {
            continue;
        };
        let key = labels
            .split(',')
            .find_map(|kv| kv.strip_prefix(&format!("{by}=\"")))
            .map(|v| v.trim_end_matches('"').to_string())
            .unwrap_or_default();
        *out.entry(key).or_insert(0) += v as u64;
    }
    out
}

/// Everything one scrape of the endpoints gives.
#[derive(Debug, Default, Clone)]
pub struct Scrape {
    /// (endpoint, role, /metrics text); role None = unreachable or not adclick.
    pub pages: Vec<(String, Option<Role>, String)>,
    /// Top ads merged over the endpoints answering the query API.
    pub top: Vec<(u64, u64)>,
    /// Why the top ads are missing, if they are.
    pub top_problem: Option<String>,
}

/// Scrapes every endpoint once.
pub async fn scrape_all(http: &reqwest::Client, endpoints: &[String], key: Option<&str>) -> Scrape {
    let mut s = Scrape::default();
    for e in endpoints {
        let base = e.trim_end_matches('/').to_string();
        let page = scrape(http, &format!("{base}/metrics")).await;
        let role = role_of(&page);
        s.pages.push((base, role, page));
    }
    let fronts: Vec<&str> = s
        .pages
        .iter()
        .filter(|(_, r, _)| *r == Some(Role::Front))
        .map(|(e, _, _)| e.as_str())
        .collect();
    let query_at: Vec<&str> = if fronts.is_empty() {
        s.pages
            .iter()
            .filter(|(_, r, _)| *r == Some(Role::Aggregator))
            .map(|(e, _, _)| e.as_str())
            .collect()
    } else {
        fronts[..1].to_vec()
    };
    let Some(key) = key else {
        s.top_problem = Some("no API key: top ads not shown (--api-key or ADCLICK_API_KEY)".into());
        return s;
    };
    let mut merged: BTreeMap<u64, u64> = BTreeMap::new();
    for base in query_at {
        let url = format!("{base}/v1/ads/top?n=10&last_minutes=5");
        let r = http.get(&url).bearer_auth(key).send().await;
        let body = match r {
            Ok(r) if r.status().is_success() => r
                .bytes()
                .await
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok()),
            Ok(r) => {
                s.top_problem = Some(format!("{url}: HTTP {}", r.status().as_u16()));
                None
            }
            Err(e) => {
                s.top_problem = Some(format!("{url}: {e}"));
                None
            }
        };
        let ads = body
            .as_ref()
            .and_then(|b| b["ads"].as_array().cloned())
            .unwrap_or_default();
        for a in ads {
            if let (Some(ad), Some(c)) = (a["ad_id"].as_u64(), a["clicks"].as_u64()) {
                *merged.entry(ad).or_insert(0) += c;
            }
        }
    }
    let mut top: Vec<(u64, u64)> = merged.into_iter().collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    top.truncate(10);
    s.top = top;
    s
}

impl Scrape {
    fn pages_of(&self, role: Role) -> impl Iterator<Item = &str> {
        self.pages
            .iter()
            .filter(move |(_, r, _)| *r == Some(role))
            .map(|(_, _, p)| p.as_str())
    }

    fn sum(&self, role: Role, name: &str) -> u64 {
        self.pages_of(role).map(|p| metric(p, name)).sum()
    }

    /// Collector clicks with `outcome`, summed.
    pub fn collector_clicks(&self, outcome: &str) -> u64 {
        self.sum(
            Role::Collector,
            &format!("adclick_collector_clicks_total{{outcome=\"{outcome}\"}}"),
        )
    }

    /// The view of this scrape; `prev` (an earlier scrape and how long ago) gives the rate.
    pub fn view(&self, prev: Option<(&Scrape, Duration)>, uptime: Duration) -> View {
        let agg = |o: &str| -> u64 {
            let name = format!("adclick_aggregator_clicks_total{{outcome=\"{o}\"}}");
            self.sum(Role::Aggregator, &name)
        };
        let accepted = self.collector_clicks("accepted");
        let rate = prev.map_or(0.0, |(p, dt)| {
            accepted.saturating_sub(p.collector_clicks("accepted")) as f64
                / dt.as_secs_f64().max(0.001)
        });
        let collectors = self.pages_of(Role::Collector).count();
        let aggregators = self.pages_of(Role::Aggregator).count();
        let fronts = self.pages_of(Role::Front).count();
        let mut notes: Vec<String> = self
            .pages
            .iter()
            .filter(|(_, r, _)| r.is_none())
            .map(|(e, _, _)| format!("{e}: no adclick metrics (unreachable?)"))
            .collect();
        notes.extend(self.top_problem.clone());
        let mut errors: BTreeMap<String, u64> = BTreeMap::new();
        let mut add = |k: &str, v: u64| {
            if v > 0 {
                *errors.entry(k.to_string()).or_insert(0) += v;
            }
        };
        for (k, m) in [
            ("forward", "adclick_collector_forward_errors_total"),
            ("rate_limited", "adclick_collector_rate_limited_total"),
            (
                "spool_corrupt",
                "adclick_collector_spool_corrupt_records_total",
            ),
            (
                "quarantine_dropped",
                "adclick_collector_quarantine_dropped_total",
            ),
        ] {
            add(k, self.sum(Role::Collector, m));
        }
        for (k, m) in [
            ("wal", "adclick_aggregator_wal_errors_total"),
            ("checkpoint", "adclick_aggregator_checkpoint_errors_total"),
            ("dedup", "adclick_aggregator_dedup_errors_total"),
            (
                "quarantine_dropped",
                "adclick_aggregator_quarantine_dropped_total",
            ),
        ] {
            add(k, self.sum(Role::Aggregator, m));
        }
        for role in [Role::Aggregator, Role::Front] {
            for p in self.pages_of(role) {
                for (reason, n) in by_label(p, "adclick_aggregator_queries_refused_total", "reason")
                {
                    add(&format!("query_{reason}"), n);
                }
            }
        }
        for p in self.pages_of(Role::Front) {
            for (shard, n) in by_label(
                p,
                "adclick_aggregator_front_shard_unavailable_total",
                "shard",
            ) {
                add(&format!("shard_unavailable {shard}"), n);
            }
        }
        let watermark = self
            .pages_of(Role::Aggregator)
            .map(|p| (metric_f64(p, "adclick_aggregator_watermark_seconds") * 1000.0) as i64)
            .filter(|w| *w > 0)
            .min()
            .unwrap_or(0);
        View {
            uptime,
            rate,
            accepted,
            duplicate: self.collector_clicks("duplicate"),
            rejected: REJECT_REASONS
                .iter()
                .map(|r| (r.to_string(), self.collector_clicks(r)))
                .filter(|(_, n)| *n > 0)
                .collect(),
            user_agents: crate::view::user_agent_classes(|c| {
                self.sum(
                    Role::Collector,
                    &format!("adclick_collector_user_agent_clicks_total{{class=\"{c}\"}}"),
                )
            }),
            counted: agg("applied"),
            late: agg("late"),
            agg_duplicate: agg("duplicate"),
            invalid: {
                let mut by: BTreeMap<String, u64> = BTreeMap::new();
                for p in self.pages_of(Role::Aggregator) {
                    for (reason, n) in
                        by_label(p, "adclick_aggregator_invalid_clicks_total", "reason")
                    {
                        *by.entry(reason).or_insert(0) += n;
                    }
                }
                by.into_iter().filter(|(_, n)| *n > 0).collect()
            },
            watermark,
            top: self.top.clone(),
            queued: None,
            forward_lag: (collectors > 0)
                .then(|| self.sum(Role::Collector, "adclick_collector_forward_lag_records")),
            errors: errors.into_iter().collect(),
            title: format!(
                "adclick top ({collectors} collector(s), {aggregators} aggregator(s), {fronts} query front(s))"
            ),
            notes,
        }
    }
}

fn api_key(a: &TopArgs) -> Option<String> {
    a.api_key.clone().or_else(|| {
        std::fs::read_to_string(".adclick-dev/admin.key")
            .ok()
            .map(|k| k.trim().to_string())
    })
}

pub fn run(a: TopArgs) -> Result<()> {
    if a.endpoints.is_empty() {
        bail!("--endpoints: list at least one server's HTTP URL");
    }
    let key = api_key(&a);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    adclick_sdk::HttpTransport::install_crypto_provider();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .context("HTTP client")?;
    let started = Instant::now();
    let mut prev = rt.block_on(scrape_all(&http, &a.endpoints, key.as_deref()));
    let mut prev_at = Instant::now();
    if prev.pages.iter().all(|(_, r, _)| r.is_none()) {
        bail!(
            "none of {} answers /metrics as an adclick server",
            a.endpoints.join(", ")
        );
    }
    let tty = std::io::stdout().is_terminal();
    if a.once || !tty {
        loop {
            std::thread::sleep(a.interval);
            let now = rt.block_on(scrape_all(&http, &a.endpoints, key.as_deref()));
            let view = now.view(Some((&prev, prev_at.elapsed())), started.elapsed());
            if a.once {
                print!("{}", view.render());
                return Ok(());
            }
            println!("{}", view.line());
            (prev, prev_at) = (now, Instant::now());
            if a.duration.is_some_and(|d| started.elapsed() >= d) {
                return Ok(());
            }
        }
    }
    let mut terminal = ratatui::init();
    let result = (|| -> Result<()> {
        let mut view = prev.view(None, started.elapsed());
        let mut next = Instant::now() + a.interval;
        loop {
            terminal.draw(|f| view.draw(f, "q: quit"))?;
            let wait = next.saturating_duration_since(Instant::now());
            if event::poll(wait)? {
                if let Event::Key(k) = event::read()? {
                    let ctrl_c =
                        k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
                    if ctrl_c || matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) {
                        return Ok(());
                    }
                }
                continue;
            }
            let now = rt.block_on(scrape_all(&http, &a.endpoints, key.as_deref()));
            view = now.view(Some((&prev, prev_at.elapsed())), started.elapsed());
            (prev, prev_at) = (now, Instant::now());
            next = Instant::now() + a.interval;
            if a.duration.is_some_and(|d| started.elapsed() >= d) {
                return Ok(());
            }
        }
    })();
    ratatui::restore();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use adclick_aggregator::config::{ApiKey, Role as KeyRole};
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;

    fn screen(view: &View) -> String {
        let mut t = Terminal::new(TestBackend::new(100, 30)).unwrap();
        t.draw(|f| view.draw(f, "q: quit")).unwrap();
        let buf = t.backend().buffer().clone();
        let mut s = String::new();
        for y in 0..buf.area.height {
            for x in 0..buf.area.width {
                s += buf[(x, y)].symbol();
            }
            s.push('\n');
        }
        s
    }

    /// Real servers (an aggregator and a collector in-process, as `adclick dev` runs them),
    /// real clicks through their HTTP API, scraped over HTTP and drawn on a TestBackend: the
    /// screen shows the counts the servers report and the ranking their query API gives.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn draws_what_real_servers_report() {
        let dir = tempfile::tempdir().unwrap();
        let local = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        let admin = "top-test-admin-key-0123456789".to_string();
        let ingest = "top-test-ingest-key-0123456789".to_string();
        let mut acfg = adclick_aggregator::AggregatorConfig {
            listen_grpc: local,
            listen_http: local,
            data_dir: dir.path().join("agg"),
            api_keys: vec![ApiKey {
                key: admin.clone(),
                role: KeyRole::Admin,
                advertiser_id: None,
            }],
            ingest_keys: vec![ingest.clone()],
            ..Default::default()
        };
        acfg.windows.allowed_delay_ms = 0;
        let agg = adclick_aggregator::start(acfg).await.unwrap();
        let secret = [7u8; 32];
        let ring = adclick_proto::token::Keyring::new(
            adclick_proto::token::SigningKey::new(1, &secret).unwrap(),
        );
        crate::keys::write_key_file(
            &dir.path().join("keys.toml"),
            &adclick_proto::keyfile::KeyFile {
                keyring: ring.clone(),
                created: vec![(1, 0)],
            },
        )
        .unwrap();
        let ccfg = adclick_collector::CollectorConfig {
            listen_http: local,
            data_dir: dir.path().join("col"),
            keys_file: dir.path().join("keys.toml"),
            aggregators: vec![format!("http://{}", agg.grpc_addr())],
            aggregator_key: Some(ingest),
            ..Default::default()
        };
        let col = adclick_collector::start(ccfg).await.unwrap();
        let curl = format!("http://{}", col.http_addr());
        let aurl = format!("http://{}", agg.http_addr());

        // Ad 42 clicked 3 times, ad 7 twice, one forged click, one repeat of a click.
        let signer = adclick_sdk::ImpressionSigner::new(ring);
        let forger = adclick_sdk::ImpressionSigner::new(adclick_proto::token::Keyring::new(
            adclick_proto::token::SigningKey::new(1, &[9u8; 32]).unwrap(),
        ));
        let mut tokens = Vec::new();
        for ad in [42, 42, 42, 7, 7] {
            tokens.push(signer.mint(&crate::traffic::placement(ad)).unwrap().token);
        }
        tokens.push(tokens[0].clone());
        tokens.push(forger.mint(&crate::traffic::placement(5)).unwrap().token);
        adclick_sdk::HttpTransport::install_crypto_provider();
        let http = reqwest::Client::new();
        let clicks: Vec<serde_json::Value> = tokens
            .iter()
            .map(|t| serde_json::json!({"token": t}))
            .collect();
        let r = http
            .post(format!("{curl}/v1/clicks"))
            .header("content-type", "application/json")
            .body(serde_json::json!({"clicks": clicks}).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 202, "{}", r.text().await.unwrap());

        let endpoints = vec![curl.clone(), aurl.clone(), "http://127.0.0.1:1".to_string()];
        let first = scrape_all(&http, &endpoints, Some(&admin)).await;
        // Wait until the aggregator counted the five and ranks them, and the collector has
        // the ack (its forward lag back to 0).
        let deadline = Instant::now() + Duration::from_secs(30);
        let now = loop {
            let s = scrape_all(&http, &endpoints, Some(&admin)).await;
            let lag = s.sum(Role::Collector, "adclick_collector_forward_lag_records");
            if s.top == [(42, 3), (7, 2)] && lag == 0 {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "top never ranked: {:?}, lag {lag}",
                s.top
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let view = now.view(
            Some((&first, Duration::from_secs(1))),
            Duration::from_secs(5),
        );
        assert_eq!(view.accepted, 5);
        assert_eq!(view.duplicate, 1);
        assert_eq!(view.rejected, [("bad_signature".to_string(), 1)]);
        assert_eq!(view.counted, 5);
        assert_eq!(view.forward_lag, Some(0));
        let s = screen(&view);
        for want in [
            "adclick top (1 collector(s), 1 aggregator(s), 0 query front(s)) — up 5s",
            "!! http://127.0.0.1:1: no adclick metrics (unreachable?)",
            "accepted              5   duplicate        1",
            "rejected     bad_signature 1",
            "counted               5   late corrections      0   dedup at aggregator      0",
            "forward lag           0 spool records not yet acked",
            "     1        42          3",
            "     2         7          2",
            "q: quit",
        ] {
            assert!(s.contains(want), "{want:?} not on screen:\n{s}");
        }
        // A wrong key: the view says why the top ads are missing.
        let bad = scrape_all(&http, &endpoints, Some("wrong-key-0123456789")).await;
        let s = screen(&bad.view(None, Duration::ZERO));
        assert!(
            s.contains("/v1/ads/top?n=10&last_minutes=5: HTTP 401"),
            "{s}"
        );
        col.shutdown().await;
        agg.shutdown().await;
    }

    #[test]
    fn labels_are_summed_by_the_asked_label() {
        let page = "adclick_aggregator_queries_refused_total{rpc=\"TopAds\",reason=\"rate_limited\"} 6\n\
                    adclick_aggregator_queries_refused_total{rpc=\"GetTotals\",reason=\"rate_limited\"} 1\n\
                    adclick_aggregator_queries_refused_total{rpc=\"TopAds\",reason=\"malformed\"} 2\n";
        let m = by_label(page, "adclick_aggregator_queries_refused_total", "reason");
        assert_eq!(
            m,
            BTreeMap::from([("malformed".into(), 2), ("rate_limited".into(), 7)])
        );
        assert_eq!(role_of(page), Some(Role::Aggregator));
        assert_eq!(role_of("adclick_collector_x 1\n"), Some(Role::Collector));
        assert_eq!(
            role_of("# HELP\nadclick_aggregator_front_shard_up 1\n"),
            Some(Role::Front)
        );
        assert_eq!(role_of(""), None);
    }
}

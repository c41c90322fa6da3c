//! Clients from outside Rust, against a real aggregator with known clicks (issue 14 item
//! 6): the Python example (`examples/python/top_ads.py`, grpcio + stubs generated from the
//! proto), the curl commands of `docs/api.md` run verbatim against the HTTP mirror, and
//! grpcurl's when it is installed (it is not packaged in Debian bookworm: the test says so
//! loudly and checks the rest).
//!
//! Python comes from the project's `.venv/`, filled by `scripts/setup-python.sh` (run here
//! every time: it is idempotent and quick when grpcio is there; a failed install fails the
//! test with the script's output). The commands are taken from `docs/api.md` between
//! `<!-- tested: NAME -->` and the end of the next fenced block, and run with `bash` in the
//! repository root with `ADCLICK_GRPC`, `ADCLICK_HTTP` and `ADCLICK_KEY` set.

use std::collections::{BTreeMap, HashMap};

use std::process::Command;

use adclick_aggregator::config::{ApiKey, Role};
use adclick_proto::v1::ingest_service_client::IngestServiceClient;
use adclick_proto::v1::{IngestBatch, IngestClick};
use adclick_test_support::aggregator::{ADMIN, INGEST};
use adclick_test_support::common::{MIN, authed, minute_of, now_ms, repo_root, setup_script};

/// Clicks per ad in the test's traffic (ad id = index + 1).
const PER_AD: [u64; 6] = [37, 23, 51, 8, 15, 29];
/// The key of advertiser 2, who owns the even ads.
const ADV2: &str = "advertiser-2-key-0123";

/// The known clicks: ad `a` gets `PER_AD[a-1]` clicks spread over the 7 minutes before the
/// current one (inside any "last 60 minutes" however the minute turns during the test);
/// odd ads belong to advertiser 1, even ones to advertiser 2.
fn known_clicks(now: i64) -> Vec<IngestClick> {
    let base = minute_of(now);
    let mut out = Vec::new();
    for (i, &n) in PER_AD.iter().enumerate() {
        let ad = i as u64 + 1;
        for k in 0..n {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&ad.to_le_bytes());
            id[8..].copy_from_slice(&k.to_le_bytes());
            out.push(IngestClick {
                impression_id: id.to_vec(),
                ad_id: ad,
                advertiser_id: 2 - ad % 2,
                campaign_id: 100 + ad,
                token_expires_at_ms: now + 3_600_000,
                event_time_ms: base - (1 + (k as i64 % 7)) * MIN + (k as i64 * 997) % MIN,
                received_at_ms: now,
                country: "US".into(),
                device: 1,
                os: "ios".into(),
                site: "news.example".into(),
                user_id: format!("u{}", k % 13),
                ..Default::default()
            });
        }
    }
    out
}

/// (ad, clicks), most clicked first, ties by smaller ad id: the oracle of TopAds.
fn top(clicks: &[IngestClick], n: usize, keep: impl Fn(&IngestClick) -> bool) -> Vec<(u64, u64)> {
    let mut m: HashMap<u64, u64> = HashMap::new();
    for c in clicks.iter().filter(|c| keep(c)) {
        *m.entry(c.ad_id).or_default() += 1;
    }
    let mut v: Vec<_> = m.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v.truncate(n);
    v
}

/// Minute start -> clicks of `ad`.
fn series(clicks: &[IngestClick], ad: u64) -> BTreeMap<i64, u64> {
    let mut m = BTreeMap::new();
    for c in clicks.iter().filter(|c| c.ad_id == ad) {
        *m.entry(minute_of(c.event_time_ms)).or_default() += 1;
    }
    m
}

/// The command documented in docs/api.md under `<!-- tested: name -->`.
fn documented(name: &str) -> String {
    let doc = std::fs::read_to_string(repo_root().join("docs/api.md")).unwrap();
    let marker = format!("<!-- tested: {name} -->");
    let after = doc
        .split_once(&marker)
        .unwrap_or_else(|| panic!("docs/api.md has no {marker}"))
        .1;
    let block = after.split_once("```sh\n").unwrap().1;
    block.split_once("```").unwrap().0.trim().to_string()
}

/// Runs a documented command with bash in the repository root; its stdout, or a panic
/// with everything it said.
fn run(cmd: &str, env: &[(&str, String)]) -> String {
    let out = Command::new("bash")
        .arg("-c")
        .arg(cmd)
        .current_dir(repo_root())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "`{cmd}` failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// `key=value` fields of the lines starting with `tag` in the Python script's output.
fn lines<'a>(out: &'a str, tag: &str) -> Vec<HashMap<&'a str, &'a str>> {
    out.lines()
        .filter_map(|l| l.strip_prefix(tag)?.strip_prefix(' '))
        .map(|l| l.split(' ').filter_map(|kv| kv.split_once('=')).collect())
        .collect()
}

fn num(m: &HashMap<&str, &str>, k: &str) -> u64 {
    m.get(k)
        .unwrap_or_else(|| panic!("no {k} in {m:?}"))
        .parse()
        .unwrap()
}

/// Checks the Python script's output against the oracle: the top list, and the per-minute
/// series of the first ad (empty buckets, if the server sends them, must be 0).
fn check_python(out: &str, want_top: &[(u64, u64)], clicks: &[IngestClick]) {
    let got: Vec<(u64, u64)> = lines(out, "top")
        .iter()
        .map(|m| (num(m, "ad"), num(m, "clicks")))
        .collect();
    assert_eq!(got, want_top, "top ads printed by top_ads.py:\n{out}");
    let ad = want_top[0].0;
    let want = series(clicks, ad);
    let mut nonzero = BTreeMap::new();
    for m in lines(out, "minute") {
        let c = num(&m, "clicks");
        if c > 0 {
            nonzero.insert(num(&m, "start_ms") as i64, c);
        }
    }
    assert_eq!(
        nonzero, want,
        "series of ad {ad} printed by top_ads.py:\n{out}"
    );
    let total = lines(out, "total");
    assert_eq!(total.len(), 1, "{out}");
    assert_eq!(num(&total[0], "ad"), ad);
    assert_eq!(num(&total[0], "clicks"), want.values().sum::<u64>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_curl_and_grpcurl_read_the_known_counts() {
    // The interpreter first: a failed install fails here, loudly, with the script's output.
    setup_script("setup-python.sh");

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = adclick_test_support::aggregator::config(dir.path());
    cfg.api_keys.push(ApiKey {
        key: ADV2.into(),
        role: Role::Advertiser,
        advertiser_id: Some(2),
    });
    let a = adclick_aggregator::start(cfg).await.unwrap();
    let ch = adclick_test_support::aggregator::connect(&a).await;
    let clicks = known_clicks(now_ms());
    let ack = IngestServiceClient::new(ch)
        .ingest(authed(
            IngestBatch {
                collector_id: "clients-test".into(),
                seq: 1,
                clicks: clicks.clone(),
                ..Default::default()
            },
            INGEST,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.accepted as usize, clicks.len(), "{ack:?}");

    let env = |key: &str| {
        vec![
            ("ADCLICK_GRPC", a.grpc_addr().to_string()),
            ("ADCLICK_HTTP", a.http_addr().to_string()),
            ("ADCLICK_KEY", key.to_string()),
        ]
    };

    // Python, admin key: the top 3 of all ads (3: 51, 1: 37, 6: 29) and ad 3's minutes.
    let want = top(&clicks, 3, |_| true);
    assert_eq!(want, [(3, 51), (1, 37), (6, 29)], "the oracle itself");
    let out = run(&documented("python-top"), &env(ADMIN));
    check_python(&out, &want, &clicks);
    // The same script with advertiser 2's key sees only even ads.
    let out = run(&documented("python-top"), &env(ADV2));
    let want2 = top(&clicks, 3, |c| c.advertiser_id == 2);
    assert_eq!(want2, [(6, 29), (2, 23), (4, 8)]);
    check_python(&out, &want2, &clicks);

    // curl against the HTTP mirror.
    let out = run(&documented("curl-top"), &env(ADMIN));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let got: Vec<(u64, u64)> = v["ads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["ad_id"].as_u64().unwrap(), a["clicks"].as_u64().unwrap()))
        .collect();
    assert_eq!(got, want, "{out}");
    let out = run(&documented("curl-series"), &env(ADMIN));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ad_id"], 3);
    assert_eq!(v["total_clicks"], 51);
    let got: BTreeMap<i64, u64> = v["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["start_ms"].as_i64().unwrap(),
                b["clicks"].as_u64().unwrap(),
            )
        })
        .filter(|(_, c)| *c > 0)
        .collect();
    assert_eq!(got, series(&clicks, 3), "{out}");

    // The CLI: `adclick query totals` (campaign 103 is ad 3's) and a watched top.
    let bin = adclick_test_support::child::adclick_bin();
    let endpoint = format!("http://{}", a.grpc_addr());
    let cli = |args: &[&str]| {
        let mut c = Command::new(&bin);
        c.args([
            "query",
            "--endpoint",
            &endpoint,
            "--api-key",
            ADMIN,
            "--json",
        ])
        .args(args);
        c
    };
    let out = cli(&[
        "totals",
        "campaign",
        "103",
        "--last",
        "1h",
        "--granularity",
        "minute",
    ])
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["total_clicks"], 51, "{v}");
    assert_eq!(v["ads"], 1, "{v}");
    let got: BTreeMap<i64, u64> = v["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["start_ms"].as_i64().unwrap(),
                b["clicks"].as_u64().unwrap(),
            )
        })
        .filter(|(_, c)| *c > 0)
        .collect();
    assert_eq!(got, series(&clicks, 3), "{v}");
    let mut watch = cli(&["top", "--n", "3", "--last", "60m", "--watch", "200ms"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(watch.stdout.take().unwrap()),
        &mut first,
    )
    .unwrap();
    let _ = watch.kill();
    let _ = watch.wait();
    let v: serde_json::Value = serde_json::from_str(&first).unwrap();
    let got: Vec<(u64, u64)> = v["ads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["ad_id"].as_u64().unwrap(), a["clicks"].as_u64().unwrap()))
        .collect();
    assert_eq!(got, want, "adclick query top --watch: {first}");

    // grpcurl, when installed.
    let have_grpcurl = Command::new("grpcurl")
        .arg("-version")
        .output()
        .is_ok_and(|o| o.status.success());
    if have_grpcurl {
        let out = run(&documented("grpcurl-top"), &env(ADMIN));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        // grpcurl prints uint64 as strings (the proto3 JSON mapping).
        let got: Vec<(u64, u64)> = v["ads"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["adId"].as_str().unwrap().parse().unwrap(),
                    a["clicks"].as_str().unwrap().parse().unwrap(),
                )
            })
            .collect();
        assert_eq!(got, want, "{out}");
    } else {
        eprintln!(
            "\n**************************************************************************\n\
             * grpcurl NOT TESTED: no `grpcurl` on PATH. Debian bookworm has no grpcurl *\n\
             * package (apt-cache policy grpcurl: no candidate). Install a release from  *\n\
             * https://github.com/fullstorydev/grpcurl/releases to run the documented   *\n\
             * grpcurl command here. (Reflection itself, what grpcurl relies on, is      *\n\
             * tested in the aggregator's tests: clients::reflection_v1_and_v1alpha_*.) *\n\
             **************************************************************************\n"
        );
    }
    a.shutdown().await;
}

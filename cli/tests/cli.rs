//! Runs the real `adclick` binary: keys new/rotate, impression mint/verify, and the exact
//! error for each kind of bad token.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: failing loudly is the point

use std::path::Path;
use std::process::{Command, Output};

fn adclick(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_adclick"))
        .args(args)
        .output()
        .expect("adclick runs")
}

fn ok(args: &[&str]) -> String {
    let out = adclick(args);
    assert!(
        out.status.success(),
        "adclick {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(args: &[&str]) -> String {
    let out = adclick(args);
    assert!(!out.status.success(), "adclick {args:?} should fail");
    assert!(out.stdout.is_empty(), "nothing on stdout when failing");
    String::from_utf8(out.stderr).unwrap()
}

fn mint(keys: &str, ad: &str, ttl: &str, count: &str) -> Vec<serde_json::Value> {
    let out = ok(&[
        "impression",
        "mint",
        "--keys",
        keys,
        "--ad",
        ad,
        "--advertiser",
        "7",
        "--campaign",
        "1",
        "--landing-url",
        "https://example.com/x",
        "--ttl",
        ttl,
        "--count",
        count,
        "--format",
        "jsonl",
    ]);
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn key_path(dir: &Path) -> String {
    dir.join("keys.toml").to_str().unwrap().to_string()
}

#[test]
fn keys_new_writes_a_private_file_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let keys = key_path(dir.path());
    let out = ok(&["keys", "new", "--out", &keys]);
    assert!(out.contains("key id 1"), "{out}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&keys).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    let text = std::fs::read_to_string(&keys).unwrap();
    let secret = text.lines().find(|l| l.starts_with("secret")).unwrap();
    assert_eq!(
        secret.len(),
        "secret = \"\"".len() + 64,
        "32-byte key in hex: {secret}"
    );
    let err = fails(&["keys", "new", "--out", &keys]);
    assert!(err.contains("already exists"), "{err}");
}

#[test]
fn mint_then_verify_and_every_rejection_reason() {
    let dir = tempfile::tempdir().unwrap();
    let keys = key_path(dir.path());
    ok(&["keys", "new", "--out", &keys]);
    let tokens = mint(&keys, "42", "1h", "3");
    assert_eq!(tokens.len(), 3);
    let ids: std::collections::HashSet<_> = tokens
        .iter()
        .map(|t| t["impression_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 3, "each token has its own impression id");

    let tok = tokens[0]["token"].as_str().unwrap();
    let out = ok(&[
        "impression",
        "verify",
        "--keys",
        &keys,
        "--format",
        "jsonl",
        tok,
    ]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["ad_id"], 42);
    assert_eq!(v["advertiser_id"], 7);
    assert_eq!(v["campaign_id"], 1);
    assert_eq!(v["landing_url"], "https://example.com/x");
    assert_eq!(v["impression_id"], tokens[0]["impression_id"]);
    assert_eq!(v["expires_at_ms"], tokens[0]["expires_at_ms"]);
    let text = ok(&["impression", "verify", "--keys", &keys, tok]);
    assert!(
        text.starts_with("valid token") && text.contains("ad_id          42"),
        "{text}"
    );

    // Tampered: change one character of the signed payload.
    let mut bytes = tok.as_bytes().to_vec();
    bytes[30] = if bytes[30] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(bytes).unwrap();
    let err = fails(&["impression", "verify", "--keys", &keys, &tampered]);
    assert!(
        err.contains("bad_signature") || err.contains("malformed"),
        "{err}"
    );
    // Tampered tag only: always a bad signature.
    let mut bytes = tok.as_bytes().to_vec();
    let last = bytes.len() - 3;
    bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
    let err = fails(&[
        "impression",
        "verify",
        "--keys",
        &keys,
        &String::from_utf8(bytes).unwrap(),
    ]);
    assert!(err.contains("token rejected (bad_signature)"), "{err}");
    // Not base64 at all.
    let err = fails(&["impression", "verify", "--keys", &keys, "not a token!"]);
    assert!(err.contains("token rejected (malformed)"), "{err}");
    // Expired: verify as of one second after expiry plus the 30 s default skew.
    let exp = tokens[0]["expires_at_ms"].as_i64().unwrap();
    let later = (exp + 31_000).to_string();
    let err = fails(&[
        "impression",
        "verify",
        "--keys",
        &keys,
        "--now-ms",
        &later,
        tok,
    ]);
    assert!(err.contains("token rejected (expired)"), "{err}");
    // Signed by someone else's key with the same id.
    let other = dir.path().join("other.toml").to_str().unwrap().to_string();
    ok(&["keys", "new", "--out", &other]);
    let err = fails(&["impression", "verify", "--keys", &other, tok]);
    assert!(err.contains("token rejected (bad_signature)"), "{err}");
}

#[test]
fn rotation_accepts_previous_key_until_it_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let keys = key_path(dir.path());
    ok(&["keys", "new", "--out", &keys]);
    let old = mint(&keys, "1", "1h", "1")[0]["token"]
        .as_str()
        .unwrap()
        .to_string();
    let out = ok(&["keys", "rotate", "--keys", &keys]);
    assert!(
        out.contains("current key is now 2; still accepted: 1"),
        "{out}"
    );
    let new = mint(&keys, "1", "1h", "1")[0]["token"]
        .as_str()
        .unwrap()
        .to_string();
    let v = ok(&[
        "impression",
        "verify",
        "--keys",
        &keys,
        "--format",
        "jsonl",
        &new,
    ]);
    assert!(v.contains("\"key_id\":2"), "{v}");
    let v = ok(&[
        "impression",
        "verify",
        "--keys",
        &keys,
        "--format",
        "jsonl",
        &old,
    ]);
    assert!(v.contains("\"key_id\":1"), "{v}");
    let out = ok(&["keys", "rotate", "--keys", &keys]);
    assert!(out.contains("dropped key(s) 1"), "{out}");
    let err = fails(&["impression", "verify", "--keys", &keys, &old]);
    assert!(
        err.contains("token rejected (unknown_key): unknown signing key id 1"),
        "{err}"
    );
    let list = ok(&["keys", "list", "--keys", &keys]);
    assert!(
        list.contains("3  current") && list.contains("2  previous"),
        "{list}"
    );
    assert!(!list.contains("secret"));
}

#[test]
fn bad_arguments_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let keys = key_path(dir.path());
    let err = fails(&[
        "impression",
        "mint",
        "--keys",
        &keys,
        "--ad",
        "1",
        "--advertiser",
        "1",
        "--campaign",
        "1",
        "--landing-url",
        "https://e.com",
    ]);
    assert!(
        err.contains("cannot read key file") && err.contains("adclick keys new"),
        "{err}"
    );
    ok(&["keys", "new", "--out", &keys]);
    let err = fails(&[
        "impression",
        "mint",
        "--keys",
        &keys,
        "--ad",
        "1",
        "--advertiser",
        "1",
        "--campaign",
        "1",
        "--landing-url",
        "javascript:alert(1)",
    ]);
    assert!(err.contains("landing URL is not an http(s) URL"), "{err}");
    let err = fails(&[
        "impression",
        "mint",
        "--keys",
        &keys,
        "--ad",
        "1",
        "--advertiser",
        "1",
        "--campaign",
        "1",
        "--landing-url",
        "https://e.com",
        "--ttl",
        "90d",
    ]);
    assert!(err.contains("ttl must be between"), "{err}");
    std::fs::write(&keys, "current = 1\n").unwrap();
    let err = fails(&["keys", "list", "--keys", &keys]);
    assert!(
        err.contains("invalid key file") && err.contains("keys.toml"),
        "{err}"
    );
}

/// `adclick keys ingest new` prints a fresh key as both config lines; an aggregator config
/// without ingest keys (or without API keys, unless explicitly opened) is refused with the
/// way out; the shipped config is refused until real keys are added (as the README does).
#[test]
fn ingest_keys_are_generated_and_required() {
    let dir = tempfile::tempdir().unwrap();
    let key_of = |out: &str| -> String {
        let line = out
            .lines()
            .find(|l| l.starts_with("ingest_keys = "))
            .unwrap();
        let key = line
            .trim_start_matches("ingest_keys = [\"")
            .trim_end_matches("\"]")
            .to_string();
        assert_eq!(key.len(), 64, "32 random bytes in hex: {line}");
        assert!(key.bytes().all(|b| b.is_ascii_hexdigit()), "{line}");
        assert!(
            out.lines()
                .any(|l| l == format!("aggregator_key = \"{key}\"")),
            "{out}"
        );
        key
    };
    let k1 = key_of(&ok(&["keys", "ingest", "new"]));
    let k2 = key_of(&ok(&["keys", "ingest", "new"]));
    assert_ne!(k1, k2);
    let file = dir.path().join("ingest.key");
    let file_s = file.to_str().unwrap();
    let k3 = key_of(&ok(&["keys", "ingest", "new", "--out", file_s]));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), format!("{k3}\n"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    let err = fails(&["keys", "ingest", "new", "--out", file_s]);
    assert!(err.contains("already exists"), "{err}");

    let check = |toml: &str| {
        let path = dir.path().join("aggregator.toml");
        std::fs::write(&path, toml).unwrap();
        Command::new(env!("CARGO_BIN_EXE_adclick"))
            .args(["aggregator", "--check", "--config", path.to_str().unwrap()])
            .env("ADCLICK_AGGREGATOR__DATA_DIR", dir.path().join("agg"))
            .output()
            .unwrap()
    };
    let api = "[[api_keys]]\nkey = \"admin-key-0123456789\"\nrole = \"admin\"\n";
    let out = check(api);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("ingest_keys") && err.contains("adclick keys ingest new"),
        "{err}"
    );
    let ingest = format!("ingest_keys = [\"{k1}\"]\n");
    let out = check(&ingest);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("api_keys") && err.contains("query.allow_unauthenticated"),
        "{err}"
    );
    let open = format!("{ingest}[query]\nallow_unauthenticated = true\n");
    assert!(check(&open).status.success());
    assert!(check(&format!("{ingest}{api}")).status.success());
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../config/aggregator.toml"
    ))
    .unwrap();
    // The shipped config carries no usable secret: it is refused with the way out...
    let out = check(&shipped);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("adclick keys ingest new"), "{err}");
    // ...and so are its commented-out example keys, uncommented...
    let examples = format!("ingest_keys = [\"change-me-collector-ingest-key\"]\n{shipped}{api}");
    let err = String::from_utf8_lossy(&check(&examples).stderr).to_string();
    assert!(err.contains("example value"), "{err}");
    let example_api = format!(
        "{ingest}{shipped}[[api_keys]]\nkey = \"change-me-admin-key-0001\"\nrole = \"admin\"\n"
    );
    let err = String::from_utf8_lossy(&check(&example_api).stderr).to_string();
    assert!(
        err.contains("api_keys[0].key is the example value"),
        "{err}"
    );
    // ...while the README's recipe (a real key before it, an API key after it) passes.
    let out = check(&format!("{ingest}{shipped}\n{api}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `RESULT bench=<name> key=value ...` line of a benchmark's output: exactly one.
fn result_line(out: &str, bench: &str) -> std::collections::HashMap<String, String> {
    let lines: Vec<&str> = out.lines().filter(|l| l.starts_with("RESULT ")).collect();
    assert_eq!(lines.len(), 1, "one RESULT line expected:\n{out}");
    let kv: std::collections::HashMap<String, String> = lines[0]["RESULT ".len()..]
        .split(' ')
        .map(|p| {
            let (k, v) = p.split_once('=').expect("key=value");
            (k.to_string(), v.to_string())
        })
        .collect();
    assert_eq!(kv["bench"], bench, "{out}");
    kv
}

fn num(kv: &std::collections::HashMap<String, String>, key: &str) -> f64 {
    kv.get(key)
        .unwrap_or_else(|| panic!("RESULT has no {key}: {kv:?}"))
        .parse()
        .unwrap_or_else(|_| panic!("{key} is not a number: {kv:?}"))
}

/// `adclick bench aggregator` runs the click mix through the state path and reports it in
/// its table and one parsable line; every click is either counted or a duplicate.
#[test]
fn bench_aggregator_prints_a_result_line() {
    let out = ok(&["bench", "aggregator", "--clicks", "20000", "--ads", "1000"]);
    assert!(out.contains("| metric | value |"), "{out}");
    let r = result_line(&out, "aggregator");
    assert_eq!(num(&r, "clicks"), 20000.0);
    assert_eq!(num(&r, "ads"), 1000.0);
    assert_eq!(r["decode"], "true");
    assert_eq!(num(&r, "applied") + num(&r, "duplicates"), 20000.0);
    // 2% re-sent impressions and 1% late clicks by default: some of each.
    assert!(
        num(&r, "duplicates") > 0.0 && num(&r, "late") > 0.0,
        "{r:?}"
    );
    for key in [
        "clicks_per_sec",
        "clicks_per_cpu_sec",
        "ns_per_click",
        "minute_cells",
        "bytes_per_cell",
        "dedup_entries",
        "dedup_bytes_per_entry",
        "top100_p50_ms",
        "top100_p99_ms",
    ] {
        assert!(num(&r, key) >= 0.0, "{key}: {r:?}");
    }
    assert_eq!(num(&r, "dedup_entries"), num(&r, "applied"));

    let out = ok(&[
        "bench",
        "aggregator",
        "--clicks",
        "5000",
        "--ads",
        "100",
        "--no-memory",
        "--no-decode",
        "--dup-pct",
        "0",
    ]);
    let r = result_line(&out, "aggregator");
    assert_eq!(r["decode"], "false");
    assert_eq!(num(&r, "applied"), 5000.0);
    assert!(
        !r.contains_key("bytes_per_cell"),
        "no memory figures: {r:?}"
    );
}

/// `adclick bench topads` builds a state with the asked number of distinct ads and times
/// unfiltered and one-country TopAds through the query code.
#[test]
fn bench_topads_prints_a_result_line() {
    let out = ok(&[
        "bench", "topads", "--ads", "2000", "--runs", "5", "--budget", "1s",
    ]);
    let r = result_line(&out, "topads");
    assert_eq!(num(&r, "ads"), 2000.0);
    assert_eq!(
        num(&r, "clicks"),
        4000.0,
        "one click per ad + as many Zipf clicks"
    );
    assert!(num(&r, "minute_cells") >= 2000.0, "{r:?}");
    for key in ["p50_ms", "p99_ms", "filtered_p50_ms", "filtered_p99_ms"] {
        assert!(num(&r, key) >= 0.0, "{key}: {r:?}");
    }
    assert_eq!(num(&r, "runs"), 5.0);
}

/// `adclick bench` without a subcommand is `pipeline` (the form that predates the
/// subcommands), so both reach the same argument checks (before anything is started).
#[test]
fn bench_without_subcommand_is_the_pipeline() {
    let err = fails(&["bench", "--collectors", "0"]);
    assert!(
        err.contains("--collectors and --rate must be positive"),
        "{err}"
    );
    let err = fails(&["bench", "pipeline", "--rate", "0"]);
    assert!(
        err.contains("--collectors and --rate must be positive"),
        "{err}"
    );
    let err = fails(&["bench", "aggregator", "--clicks", "0"]);
    assert!(err.contains("must be at least 1"), "{err}");
    let help = ok(&["bench", "--help"]);
    for sub in ["pipeline", "aggregator", "topads"] {
        assert!(help.contains(sub), "{help}");
    }
}

/// A short whole-pipeline run with the real binaries: everything the collectors acked is
/// counted, or refused by the aggregator's exact dedup as a repeat, once the drain is over
/// (undelivered = 0), and the line has every figure.
#[test]
fn bench_pipeline_counts_everything_acked() {
    let out = ok(&[
        "bench",
        "pipeline",
        "--rate",
        "2000",
        "--duration",
        "2s",
        "--ads",
        "1000",
        "--drain",
        "60s",
    ]);
    let r = result_line(&out, "pipeline");
    assert_eq!(num(&r, "collectors"), 2.0);
    assert!(num(&r, "acked") > 0.0, "{r:?}");
    assert_eq!(num(&r, "undelivered"), 0.0, "{out}");
    assert_eq!(num(&r, "acked"), num(&r, "counted") + num(&r, "refused"));
    for key in [
        "offered_per_sec",
        "acked_per_sec",
        "counted_per_sec",
        "cpu_aggregator",
        "cpu_collectors",
        "cpu_loadgen",
        "rss_aggregator_mib",
        "rss_collector_max_mib",
        "topads_queries",
        "probes",
    ] {
        assert!(num(&r, key) >= 0.0, "{key}: {r:?}");
    }
}

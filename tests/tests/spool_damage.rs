//! One damaged byte in a collector's spool, tried as an operator would: with the aggregator
//! down, the real `adclick collector` acks 1,000 clicks in 40 requests; it is SIGKILLed;
//! one byte is flipped at 25% of its only spool segment and a torn, half-written record is
//! left at its end (what an interrupted write leaves); `adclick spool verify` must report
//! the damage; then collector and aggregator come back. Every click outside the damaged
//! record is counted exactly once, the loss is logged with its seq range and counted in
//! `adclick_collector_spool_corrupt_records_total`, and the torn tail costs nothing and
//! says nothing.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use adclick_proto::v1::{self, ClickBatch, ClickBatchResult};
use prost::Message;

use crate::support::*;

const REQUESTS: usize = 40;
const PER_REQUEST: usize = 25;
const ADVERTISER: u64 = 42;

fn ad_of(request: usize) -> u64 {
    7_000 + request as u64
}

/// Record boundaries of a spool segment, read from its framing
/// (`len: u32 LE | crc | seq | synced | payload`, 24-byte header), independently of the
/// spool's own recovery code: (start, end) of each record.
fn record_spans(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + 24 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap()) as usize;
        out.push((off, off + 24 + len));
        off += 24 + len;
    }
    out
}

/// The log without terminal colour codes (`ESC [ ... m`).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn only_segment(spool: &Path) -> std::path::PathBuf {
    let segs: Vec<_> = std::fs::read_dir(spool)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    assert_eq!(segs.len(), 1, "{segs:?}");
    segs[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_spool_byte_costs_only_its_record_and_is_reported() {
    tokio::task::spawn_blocking(adclick_bin).await.unwrap();
    within(Duration::from_secs(90), scenario()).await;
}

async fn scenario() {
    let dir = tempfile::tempdir().unwrap();
    let keys_file = dir.path().join("keys.toml");
    let ring = keyring(1, 33);
    write_keys(&keys_file, &ring);
    // The aggregator's address, taken now; nothing listens there until the end.
    let grpc = free_addr();
    let listen = free_addr();
    let data = dir.path().join("collector");
    let config = dir.path().join("collector.toml");
    let toml = collector_toml("edge-damage", listen, &data, &keys_file, grpc)
        .replace("segment_bytes = 65536", "segment_bytes = 67108864");
    std::fs::write(&config, toml).unwrap();
    let log = dir.path().join("collector.log");
    let base = format!("http://{listen}");
    let child = ChildServer::spawn("collector", &config, &log);
    assert!(
        wait_healthy(&base, Duration::from_secs(20)).await,
        "collector did not start; log:\n{}",
        child.log_text()
    );

    // 40 requests, one after another: each is one group commit, so one spool record.
    let signer = signer(&ring);
    let http = http_client();
    for r in 0..REQUESTS {
        let now = now_ms();
        let batch = ClickBatch {
            sdk_name: "e2e".into(),
            sdk_version: "0".into(),
            sent_at_ms: now,
            clicks: (0..PER_REQUEST)
                .map(|j| v1::Click {
                    token: signer
                        .mint(&placement(ad_of(r), ADVERTISER, 1))
                        .unwrap()
                        .token,
                    occurred_at_ms: now,
                    sent_at_ms: now,
                    user_id: format!("u{j}"),
                    ..Default::default()
                })
                .collect(),
        };
        let resp = http
            .post(format!("{base}/v1/clicks"))
            .header("content-type", "application/x-protobuf")
            .body(batch.encode_to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 202, "request {r}");
        let res = ClickBatchResult::decode(resp.bytes().await.unwrap()).unwrap();
        assert_eq!(res.accepted as usize, PER_REQUEST, "{res:?}");
    }
    child.kill();

    // Damage: one flipped byte at 25% of the only segment, plus a torn record at its end.
    let spool = data.join("spool");
    let seg = only_segment(&spool);
    let mut bytes = std::fs::read(&seg).unwrap();
    let spans = record_spans(&bytes);
    assert_eq!(spans.len(), REQUESTS, "one record per request");
    assert_eq!(spans.last().unwrap().1, bytes.len());
    let at = bytes.len() / 4;
    let hit = spans.iter().position(|&(s, e)| s <= at && at < e).unwrap();
    bytes[at] ^= 0x01;
    // A torn write: the first 40 bytes of a copy of the last record, as if the process
    // died in the middle of writing one more.
    let (ls, _) = spans[REQUESTS - 1];
    let torn = bytes[ls..ls + 40].to_vec();
    std::fs::write(&seg, &bytes).unwrap();
    std::fs::OpenOptions::new()
        .append(true)
        .open(&seg)
        .unwrap()
        .write_all(&torn)
        .unwrap();

    // The offline check sees exactly that record as lost and exits non-zero.
    let out = std::process::Command::new(adclick_bin())
        .args(["spool", "verify"])
        .arg(&spool)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "verify must fail on damage:\n{text}");
    let lost_seq = hit as u64 + 1;
    assert!(
        text.contains(&format!("LOST seqs {lost_seq}..={lost_seq} (1 records)")),
        "{text}"
    );

    // Both come back: collector first (it forwards once the aggregator is up).
    let child = ChildServer::spawn("collector", &config, &log);
    assert!(
        wait_healthy(&base, Duration::from_secs(20)).await,
        "collector did not restart; log:\n{}",
        child.log_text()
    );
    let agg = adclick_aggregator::start(aggregator_config(&dir.path().join("aggregator"), grpc))
        .await
        .unwrap();

    let range = (now_ms() - 10 * MIN, now_ms() + 5 * MIN);
    let want: BTreeMap<u64, u64> = (0..REQUESTS)
        .filter(|&r| r != hit)
        .map(|r| (ad_of(r), PER_REQUEST as u64))
        .collect();
    let counts = poll_counts(grpc, range, Duration::from_secs(30), |c| *c == want).await;
    assert_eq!(counts, want, "every click outside the damaged record, once");
    // Nothing more shows up later.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let counts: BTreeMap<u64, u64> = top_ads(grpc, ADMIN, 1000, range, None)
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(counts, want);
    assert_eq!(
        counts.values().sum::<u64>(),
        ((REQUESTS - 1) * PER_REQUEST) as u64
    );

    // The loss is visible: a metric and an ERROR line with the seq range; the torn tail
    // is not reported as damage.
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l == "adclick_collector_spool_corrupt_records_total 1"),
        "{metrics}"
    );
    let logged = strip_ansi(&child.log_text());
    let errors: Vec<&str> = logged.lines().filter(|l| l.contains("ERROR")).collect();
    assert!(
        errors
            .iter()
            .any(|l| l.contains("records lost") && l.contains(&format!("first_seq={lost_seq}"))),
        "{logged}"
    );
    assert_eq!(
        errors.iter().filter(|l| l.contains("spool damage")).count(),
        2,
        "one damaged range and one lost seq range, nothing for the torn tail:\n{logged}"
    );
    // The damaged bytes are kept for inspection.
    assert!(spool.join("corrupt").join("report.log").exists());
    drop(child);
    agg.shutdown().await;
}

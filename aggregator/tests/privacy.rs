//! `[privacy] ip_storage` (issue 16): the same clicks, from known IPv4 and IPv6 addresses,
//! ingested over gRPC by a real aggregator in each mode; the raw archive's `client_ip`
//! column and the `ip` filter (served by the click index) must hold what the mode says —
//! the address (full), its /24 or /48 (truncated), a value of 100::/64 that is the same for
//! one client on one day and differs between clients, with the salt kept in the data dir
//! (hashed). Expected values are computed here from the addresses sent.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;

use adclick_aggregator::privacy::IpStorage;
use adclick_archive::Destination;
use adclick_proto::v1::{Filter, Granularity, IngestClick};
use adclick_test_support::aggregator::{ADMIN, T0, start_retrying};
use arrow_array::Array;
use arrow_array::cast::AsArray;
use arrow_array::types::UInt32Type;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::util::*;

/// Click i comes from ADDRS[i % 4]: two neighbours in one /24, one in another, one IPv6.
const ADDRS: [&str; 4] = [
    "203.0.113.7",
    "203.0.113.8",
    "198.51.100.9",
    "2001:db8:abcd:12::1",
];
const N: usize = 40;
const AD: u64 = 3;

fn sent() -> Vec<IngestClick> {
    (0..N)
        .map(|i| {
            let ip: IpAddr = ADDRS[i % 4].parse().unwrap();
            let mut id = [0u8; 16];
            id[0] = 0x77;
            id[8..].copy_from_slice(&(i as u64).to_le_bytes());
            IngestClick {
                impression_id: id.to_vec(),
                ad_id: AD,
                advertiser_id: 1,
                campaign_id: 1,
                token_expires_at_ms: T0 + 3 * 3_600_000,
                // All in one event day, over ten minutes.
                event_time_ms: T0 + (i as i64 % 10) * 60_000,
                received_at_ms: T0,
                user_id: format!("u{i}"),
                client_ip: match ip {
                    IpAddr::V4(a) => a.octets().to_vec(),
                    IpAddr::V6(a) => a.octets().to_vec(),
                },
                ..Default::default()
            }
        })
        .collect()
}

/// click_index -> client_ip of every archived row.
fn archived_ips(dir: &Path) -> BTreeMap<u32, Option<String>> {
    let files = Destination::Local {
        dir: dir.to_path_buf(),
    }
    .list("")
    .unwrap();
    let mut out = BTreeMap::new();
    for f in &files {
        let r = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(dir.join(f)).unwrap())
            .unwrap()
            .build()
            .unwrap();
        for b in r {
            let b = b.unwrap();
            let idx = b.column_by_name("click_index").unwrap().clone();
            let idx = idx.as_primitive::<UInt32Type>();
            let ip = b.column_by_name("client_ip").unwrap().clone();
            let ip = ip.as_string::<i32>();
            for i in 0..b.num_rows() {
                let v = (!ip.is_null(i)).then(|| ip.value(i).to_string());
                assert!(out.insert(idx.value(i), v).is_none(), "row twice");
            }
        }
    }
    out
}

/// What a `filter.ip` of 203.0.113.0/24 answers: its clicks, or the gRPC code.
type RangeAnswer = Result<u64, (tonic::Code, String)>;

/// Runs the clicks through an aggregator in `mode`; returns the archived IPs, the clicks
/// the `ip` filter finds for each of ADDRS, and what a range filter answers.
fn run(mode: IpStorage, dir: &Path) -> (BTreeMap<u32, Option<String>>, Vec<u64>, RangeAnswer) {
    let mut c = config(&dir.join("data"));
    c.archive.enabled = true;
    c.archive.dir = dir.join("archive");
    c.archive.roll_interval_secs = 1;
    c.privacy.ip_storage = mode;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let a = rt.block_on(start_retrying(c, None));
    let found = rt.block_on(async {
        let (mut ing, mut q) = clients(&a).await;
        send(&mut ing, "c", 1, sent()).await;
        let mut found = Vec::new();
        for ip in ADDRS {
            let f = Filter {
                ip: ip.into(),
                ..Default::default()
            };
            let r = ad_clicks(&mut q, ADMIN, AD, Granularity::Day, Some(f)).await;
            found.push(r.total_clicks);
        }
        let range = q
            .get_ad_clicks(adclick_test_support::common::authed(
                adclick_proto::v1::GetAdClicksRequest {
                    ad_id: AD,
                    from_ms: T0,
                    to_ms: T0 + 2 * 86_400_000,
                    granularity: Granularity::Day as i32,
                    filter: Some(Filter {
                        ip: "203.0.113.0/24".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                ADMIN,
            ))
            .await
            .map(|r| r.into_inner().total_clicks)
            .map_err(|s| (s.code(), s.message().to_string()));
        (found, range)
    });
    rt.block_on(a.shutdown());
    let (found, range) = found;
    (archived_ips(&dir.join("archive")), found, range)
}

#[test]
fn archive_rows_and_ip_filters_follow_ip_storage() {
    let per_addr = (N / 4) as u64;
    // full: the addresses themselves; each filter finds its own clicks.
    let dir = tempfile::tempdir().unwrap();
    let (rows, found, range) = run(IpStorage::Full, dir.path());
    let want: BTreeMap<u32, Option<String>> = (0..N)
        .map(|i| {
            (
                i as u32,
                Some(ADDRS[i % 4].parse::<IpAddr>().unwrap().to_string()),
            )
        })
        .collect();
    assert_eq!(rows, want);
    assert_eq!(found, [per_addr; 4]);
    assert_eq!(range, Ok(2 * per_addr));
    assert!(!dir.path().join("data/privacy").exists());

    // truncated: /24 and /48; a filter on one address finds its network's clicks.
    let dir = tempfile::tempdir().unwrap();
    let (rows, found, range) = run(IpStorage::Truncated, dir.path());
    let net = [
        "203.0.113.0",
        "203.0.113.0",
        "198.51.100.0",
        "2001:db8:abcd::",
    ];
    let want: BTreeMap<u32, Option<String>> = (0..N)
        .map(|i| (i as u32, Some(net[i % 4].to_string())))
        .collect();
    assert_eq!(rows, want);
    assert_eq!(found, [2 * per_addr, 2 * per_addr, per_addr, per_addr]);
    assert_eq!(range, Ok(2 * per_addr));

    // hashed: one stable 100::/64 value per address (same day), four distinct values, none
    // of them an address sent; the filter finds each address's own clicks; the day's salt
    // is in the data dir.
    let dir = tempfile::tempdir().unwrap();
    let (rows, found, range) = run(IpStorage::Hashed, dir.path());
    assert_eq!(rows.len(), N);
    let mut by_addr: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for (i, v) in &rows {
        let v = v.clone().expect("a hashed value, not unknown");
        let a: IpAddr = v.parse().unwrap();
        match a {
            IpAddr::V6(a) => assert_eq!(a.segments()[..4], [0x100, 0, 0, 0], "{v}"),
            IpAddr::V4(_) => panic!("{v}"),
        }
        by_addr.entry(ADDRS[*i as usize % 4]).or_default().insert(v);
    }
    assert!(by_addr.values().all(|s| s.len() == 1), "{by_addr:?}");
    let distinct: BTreeSet<&String> = by_addr.values().flatten().collect();
    assert_eq!(distinct.len(), 4);
    assert_eq!(found, [per_addr; 4]);
    // A range cannot be matched against hashes: the caller's mistake, named (400), not
    // an outage (503).
    let (code, msg) = range.unwrap_err();
    assert_eq!(code, tonic::Code::InvalidArgument, "{msg}");
    assert!(msg.contains("filter.ip") && msg.contains("hashed"), "{msg}");
    let day = T0.div_euclid(86_400_000);
    let salt = dir.path().join(format!("data/privacy/ip-salt-{day}"));
    assert_eq!(
        std::fs::read(&salt).unwrap().len(),
        32,
        "{}",
        salt.display()
    );
}

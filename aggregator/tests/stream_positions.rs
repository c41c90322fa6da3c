//! The engine's contract with the JetStream source, without a NATS server: a stream batch
//! is admitted only if it chains onto its partition's last applied stream sequence; the
//! same `(collector_id, seq)` on two partitions is two batches (admission is keyed by
//! collector and partition), on one partition a replay; and the last applied position of
//! each partition is committed with the WAL entries it covers, so a restart resumes after
//! exactly what the state holds.

use std::sync::Arc;

use adclick_aggregator::Metrics;
use adclick_aggregator::decode::RawBatch;
use adclick_aggregator::engine::{self, IngestError, StreamOrigin};
use adclick_aggregator::store::{RedbStore, Store};
use adclick_proto::v1::{IngestBatch, IngestClick};
use adclick_test_support::common::{HOUR, now_ms};
use prost::Message;

fn batch(seq: u64, first_id: u64, n: u64) -> RawBatch {
    let now = now_ms();
    let clicks = (first_id..first_id + n)
        .map(|i| {
            let mut id = [7u8; 16];
            id[..8].copy_from_slice(&i.to_le_bytes());
            IngestClick {
                impression_id: id.to_vec(),
                ad_id: 40 + i % 3,
                advertiser_id: 1,
                campaign_id: 1,
                token_expires_at_ms: now + HOUR,
                event_time_ms: now,
                received_at_ms: now,
                country: "US".into(),
                ..Default::default()
            }
        })
        .collect();
    let b = IngestBatch {
        collector_id: "edge-js-1".into(),
        seq,
        clicks,
        acked_floor: seq,
    };
    RawBatch::parse(b.encode_to_vec().into()).unwrap()
}

fn at(partition: u32, stream_seq: u64, prev: u64) -> StreamOrigin {
    StreamOrigin {
        partition,
        stream_seq,
        prev,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_batches_chain_commit_their_position_and_resume_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = crate::util::config(dir.path());
    let (eng, _view, threads) = engine::start(
        RedbStore::open(dir.path()).unwrap(),
        cfg.clone(),
        Arc::new(Metrics::new()),
    )
    .unwrap();
    let send = |b: RawBatch, o: StreamOrigin| {
        let eng = eng.clone();
        async move { eng.submit_from_stream(b, o).await.unwrap().await.unwrap() }
    };
    assert_eq!(eng.stream_position(3), 0);
    // Seq 1 of partition 3 at stream seq 5, the first after the start.
    let ack = send(batch(1, 0, 4), at(3, 5, 0)).await.unwrap();
    assert_eq!((ack.accepted, ack.already_acked), (4, false));
    assert_eq!(eng.stream_position(3), 5);
    // A message that does not follow the last applied one is refused, nothing moves.
    let e = send(batch(2, 100, 4), at(3, 9, 4)).await.unwrap_err();
    assert!(
        matches!(&e, IngestError::Unavailable(m) if m.contains("last applied is 5")),
        "{e}"
    );
    assert_eq!(eng.stream_position(3), 5);
    // Seq 1 again on partition 3 (a republish stored under another message id): a
    // replay, acked without being applied; the position passes it.
    let ack = send(batch(1, 0, 4), at(3, 9, 5)).await.unwrap();
    assert_eq!((ack.accepted, ack.already_acked), (0, true));
    assert_eq!(eng.stream_position(3), 9);
    // Seq 1 on partition 4 is another batch of the same record: new.
    let ack = send(batch(1, 10, 2), at(4, 6, 0)).await.unwrap();
    assert_eq!((ack.accepted, ack.already_acked), (2, false));
    // And seq 2 on partition 3 chains on.
    let ack = send(batch(2, 20, 3), at(3, 12, 9)).await.unwrap();
    assert_eq!(ack.accepted, 3);
    drop(eng);
    threads.writer.join().unwrap();

    // Durable: the positions of the commits (the replay at 9 needed none, and 12 is
    // committed past it).
    let store = RedbStore::open(dir.path()).unwrap();
    let pos = store.stream_positions().unwrap();
    assert_eq!(
        pos,
        [(3, 12), (4, 6)].into_iter().collect(),
        "stream_pos after restart"
    );
    let (eng, _view, threads) = engine::start(store, cfg, Arc::new(Metrics::new())).unwrap();
    assert_eq!((eng.stream_position(3), eng.stream_position(4)), (12, 6));
    // A consumer restarted after 12 gets 13 on; one that restarted from scratch is refused.
    let e = send2(&eng, batch(3, 30, 1), at(3, 13, 0))
        .await
        .unwrap_err();
    assert!(matches!(e, IngestError::Unavailable(_)), "{e}");
    let ack = send2(&eng, batch(3, 30, 1), at(3, 13, 12)).await.unwrap();
    assert_eq!(ack.accepted, 1);
    drop(eng);
    threads.writer.join().unwrap();
}

async fn send2(
    eng: &engine::Engine,
    b: RawBatch,
    o: StreamOrigin,
) -> Result<adclick_proto::v1::IngestAck, IngestError> {
    eng.submit_from_stream(b, o).await.unwrap().await.unwrap()
}

#[test]
fn positions_commit_with_the_wal_entries() {
    use adclick_aggregator::store::WalEntry;
    let dir = tempfile::tempdir().unwrap();
    let mut s = RedbStore::open(dir.path()).unwrap();
    let entry = |pos| WalEntry {
        pos,
        collector_id: engine::stream_key("c", 1),
        seq: pos,
        acked_floor: pos,
        batch: vec![],
    };
    s.append_at(&[entry(1)], &[(1, 40)]).unwrap();
    s.append_at(&[entry(2)], &[(1, 44), (2, 41)]).unwrap();
    drop(s);
    let s = RedbStore::open(dir.path()).unwrap();
    assert_eq!(
        s.stream_positions().unwrap(),
        [(1, 44), (2, 41)].into_iter().collect()
    );
    assert_eq!(s.last_wal_pos().unwrap(), 2);
    let d = s.delivery_states().unwrap();
    assert_eq!(d["c#p1"].floor(), 3);
}

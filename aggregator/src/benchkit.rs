//! Benchmark kit for the aggregator's state, shared by `adclick bench aggregator`,
//! `adclick bench topads` and `benches/state.rs`, so the CLI and the bench measure the
//! same thing the same way:
//!
//! - [`MixGen`]: a deterministic generator of the realistic click mix (issue 13): Zipf
//!   ads, five dimensions (country, device, os, site, user id), a share of re-sent
//!   impression ids (duplicates) and of late clicks (event time minutes behind the
//!   watermark). It produces wire `IngestClick`s; [`MixBatches`] encodes them into
//!   `IngestBatch` bytes, which is what the engine receives from collectors.
//! - [`apply_mix`]: single-threaded apply throughput of the per-click path as the engine
//!   runs it (decode from the batch bytes, window operator, one shard, minute seals), with
//!   every batch generated and encoded before the clock starts; plus RSS per active minute
//!   cell and per dedup entry, each measured in its own pass.
//! - [`topads_index`]: TopAds latency (unfiltered and one-country) through the real query
//!   code over a state holding many distinct ads.
//!
//! Everything that touches the state API is in the `adapter` section at the end of this
//! file ([`StatePath`], `IndexPath`, `DedupOnly`): a change of that API changes those few
//! lines, never the generator or the measurements. Not used by the server; it measures and
//! never asserts (figures go to BENCHMARKS.md).

use std::sync::atomic::{AtomicBool, AtomicI64};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use adclick_proto::v1::{self, IngestClick};

/// Event time of the first generated click (2026-01-01T00:00Z).
pub const T0_MS: i64 = 1_767_225_600_000;

const COUNTRIES: [&str; 5] = ["US", "DE", "FR", "GB", "BR"];
const OSES: [&str; 2] = ["ios", "android"];
const SITES: usize = 50;
/// Re-sent impressions are drawn from this many recent clicks.
const RECENT: usize = 4096;

/// xorshift64: fast, deterministic, no dependencies (load shapes, not secrets).
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn pct(&mut self, p: f64) -> bool {
        self.unit() * 100.0 < p
    }
}

/// Bijective scramble, so that popular ads are not simply the small ids.
fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Resident set size of this process, bytes (0 where /proc is missing).
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// CPU time (user + system) of the calling thread, seconds, from `/proc/thread-self/stat`;
/// 0 where /proc is missing. On a shared machine, clicks per CPU-second is the figure that
/// other load does not change much.
pub fn thread_cpu_seconds() -> f64 {
    proc_cpu_seconds("/proc/thread-self/stat")
}

/// User + system CPU seconds from a `/proc/<pid>[/task/<tid>]/stat` file (clock ticks of
/// 1/100 s, Linux's `USER_HZ`); 0 where it cannot be read.
pub fn proc_cpu_seconds(stat_path: &str) -> f64 {
    let stat = std::fs::read_to_string(stat_path).unwrap_or_default();
    // After the command name (which may hold spaces), utime and stime are fields 12 and 13.
    let f: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / 100.0
}

/// Memory the kernel says can still be allocated (`MemAvailable`), bytes.
pub fn mem_available_bytes() -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("MemAvailable:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    })
}

/// Why a benchmark stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BenchError {
    /// A file or directory of the benchmark could not be used.
    #[error("{0}")]
    Io(String),
    /// Building the data set would leave less than the configured free memory.
    #[error(
        "stopped building after {clicks} of {wanted} clicks ({used_mib} MiB): only {available_mib} MiB \
         of memory left; use fewer ads"
    )]
    OutOfMemory {
        /// Clicks applied when it stopped.
        clicks: u64,
        /// Clicks it was asked for.
        wanted: u64,
        /// RSS growth so far, MiB.
        used_mib: u64,
        /// `MemAvailable` at that point, MiB.
        available_mib: u64,
    },
}

/// Latency percentiles of a repeated operation.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Latency {
    /// Runs measured.
    pub runs: usize,
    /// Median, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Slowest, ms.
    pub max_ms: f64,
}

/// Times `f` up to `runs` times, stopping early once `budget` is spent (at least 3 runs).
pub fn time_runs(runs: usize, budget: Duration, mut f: impl FnMut()) -> Latency {
    let started = Instant::now();
    let mut v: Vec<f64> = Vec::with_capacity(runs);
    while v.len() < runs.max(1) && (v.len() < 3 || started.elapsed() < budget) {
        let t = Instant::now();
        f();
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[(((v.len() - 1) as f64) * q).round() as usize];
    Latency {
        runs: v.len(),
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        max_ms: at(1.0),
    }
}

// ---------------------------------------------------------------------------------------
// The click mix
// ---------------------------------------------------------------------------------------

/// Shape of the click mix and what to measure.
#[derive(Debug, Clone)]
pub struct MixConfig {
    /// Clicks generated (duplicates and late clicks included).
    pub clicks: u64,
    /// Distinct ads (ids 1..=ads), Zipf(s = 1) popularity.
    pub ads: u64,
    /// Minutes of event time the clicks are spread over.
    pub minutes: i64,
    /// Percent of clicks that re-send a recent impression (same id, same record).
    pub duplicate_pct: f64,
    /// Percent of clicks whose event time is 2-5 minutes behind the watermark.
    pub late_pct: f64,
    /// Distinct user ids.
    pub users: u64,
    /// Generator seed.
    pub seed: u64,
    /// Also measure RSS per minute cell and per dedup entry (two extra untimed passes).
    pub measure_memory: bool,
    /// Time the engine's input: clicks decoded from encoded `IngestBatch` bytes (zero
    /// copy). `false`: already-decoded `IngestClick`s, so the state path alone.
    pub decode: bool,
    /// Clicks per encoded batch (collectors send up to 20k per spool record).
    pub batch: usize,
    /// RAM budget of the exact-dedup set (`dedup.memory_bytes`; the production default
    /// spills to the disk tier, the production run files in a temporary directory here,
    /// every ~2.1M new ids).
    pub dedup_memory_bytes: usize,
    /// Fields with per-value top-N indexes (`shards.top_index_fields`).
    pub top_index_fields: Vec<IndexField>,
    /// Feed the click index (`clickindex`, the `ip`/`user_id` filters) as the engine does,
    /// flushing a segment every [`CLICK_INDEX_FLUSH_CLICKS`] clicks (a 30 s checkpoint at
    /// 80k clicks/s) into a temporary directory.
    pub click_index: bool,
    /// Run the invalid-traffic rules stage on every counted click ([`bench_rules`]).
    pub rules: bool,
}

/// The rules the benchmark runs with `MixConfig::rules`: every rule on at its defaults
/// (IP and user rate 100 per minute, too_fast 1 s, impossible_time), 10 trap ads, and a
/// data-center list of 4,096 /24s spread over the mix's 10.0.0.0/8 client addresses (so a
/// share of the clicks take the invalid path, and the CIDR lookup searches a real-sized
/// list).
pub fn bench_rules() -> crate::rules::Rules {
    let cfg = crate::rules::RulesConfig {
        enabled: true,
        honeypot: crate::rules::config::HoneypotRule {
            ad_ids: (1..=10).map(|i| i * 97_003).collect(),
            ..Default::default()
        },
        ..Default::default()
    };
    let text: String = (0..4096u32)
        .map(|i| {
            let net = (10u32 << 24) | (i.wrapping_mul(2_654_435_761) & 0x00FF_FF00);
            format!("{}/24\n", std::net::Ipv4Addr::from(net))
        })
        .collect();
    let cidrs = crate::rules::cidr::CidrSet::parse(&text).unwrap_or_default();
    crate::rules::Rules::with_data(&cfg, cidrs, text.as_bytes())
}

/// Clicks between two click-index flushes in [`apply_mix`]: the default checkpoint
/// interval (30 s) at 80k clicks/s.
pub const CLICK_INDEX_FLUSH_CLICKS: u64 = 2_400_000;

impl Default for MixConfig {
    /// The issue-13 mix: 5M clicks over 1M ads in 60 minutes, 2% duplicates, 1% late.
    fn default() -> Self {
        MixConfig {
            clicks: 5_000_000,
            ads: 1_000_000,
            minutes: 60,
            duplicate_pct: 2.0,
            late_pct: 1.0,
            users: 200_000,
            seed: 0x9E37_79B9_7F4A_7C15,
            measure_memory: true,
            decode: true,
            batch: 5_000,
            dedup_memory_bytes: crate::state::windows::DEFAULT_DEDUP_MEMORY_BYTES,
            top_index_fields: IndexField::DEFAULT.to_vec(),
            click_index: true,
            rules: false,
        }
    }
}

/// The click stream of a [`MixConfig`]: deterministic, so separate passes (timed, memory)
/// see exactly the same clicks.
#[derive(Debug)]
pub struct MixGen {
    cfg: MixConfig,
    rng: Rng,
    i: u64,
    /// Recent fresh clicks (a re-sent impression is an exact copy of one).
    recent: Vec<IngestClick>,
    /// Duplicates generated so far.
    pub duplicates: u64,
    /// Late clicks generated so far.
    pub late: u64,
}

impl MixGen {
    /// A generator at the start of the stream.
    pub fn new(cfg: &MixConfig) -> Self {
        MixGen {
            cfg: cfg.clone(),
            rng: Rng::new(cfg.seed),
            i: 0,
            recent: Vec::with_capacity(RECENT),
            duplicates: 0,
            late: 0,
        }
    }

    /// Zipf(s = 1)-like ad choice: floor(ads^u) for uniform u, scrambled over 1..=ads.
    fn ad(&mut self) -> u64 {
        let ads = self.cfg.ads.max(1);
        let rank = ((ads as f64).powf(self.rng.unit()) as u64).clamp(1, ads);
        // A fixed permutation of 1..=ads would cost a table; an offset keeps ids in range
        // and hot ads away from id 1.
        (rank - 1 + splitmix(self.cfg.seed) % ads) % ads + 1
    }

    fn fresh(&mut self) -> IngestClick {
        let span = self.cfg.minutes.max(1) * 60_000;
        let n = self.cfg.clicks.max(1);
        let now = T0_MS + (i128::from(self.i) * i128::from(span) / i128::from(n)) as i64;
        let r = &mut self.rng;
        let late = r.pct(self.cfg.late_pct);
        // In-order clicks arrive up to 2 s out of order (within the allowed delay); late
        // ones happened 2-5 minutes before the newest (an app that was offline).
        let event_time_ms = if late {
            now - 120_000 - (r.next() % 180_000) as i64
        } else {
            now - (r.next() % 2_000) as i64
        };
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&r.next().to_le_bytes());
        id[8..].copy_from_slice(&self.i.to_le_bytes());
        let country = COUNTRIES[(r.next() % COUNTRIES.len() as u64) as usize];
        let device = (1 + r.next() % 3) as i32;
        let os = OSES[(r.next() % OSES.len() as u64) as usize];
        let site = format!("site{}", r.next() % SITES as u64);
        let user_id = format!("u{}", r.next() % self.cfg.users.max(1));
        let client_ip = ((r.next() % (1 << 24)) as u32 | 10 << 24)
            .to_be_bytes()
            .to_vec();
        let ad = self.ad();
        self.late += u64::from(late);
        IngestClick {
            impression_id: id.to_vec(),
            ad_id: ad,
            advertiser_id: 1 + ad % 7,
            campaign_id: 100 + ad % 23,
            token_expires_at_ms: event_time_ms + 3_600_000,
            event_time_ms,
            received_at_ms: now,
            country: country.into(),
            device,
            os: os.into(),
            site,
            user_id,
            client_ip,
            ..Default::default()
        }
    }
}

impl Iterator for MixGen {
    type Item = IngestClick;

    fn next(&mut self) -> Option<IngestClick> {
        if self.i >= self.cfg.clicks {
            return None;
        }
        let c = if !self.recent.is_empty() && self.rng.pct(self.cfg.duplicate_pct) {
            self.duplicates += 1;
            let k = (self.rng.next() % self.recent.len() as u64) as usize;
            self.recent[k].clone()
        } else {
            let c = self.fresh();
            if self.recent.len() < RECENT {
                self.recent.push(c.clone());
            } else {
                let k = (self.i % RECENT as u64) as usize;
                self.recent[k] = c.clone();
            }
            c
        };
        self.i += 1;
        Some(c)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = usize::try_from(self.cfg.clicks - self.i).unwrap_or(usize::MAX);
        (left, Some(left))
    }
}

/// The stream of a [`MixGen`] as encoded `IngestBatch`es of `cfg.batch` clicks.
#[derive(Debug)]
pub struct MixBatches {
    /// The click generator (its counters say what was generated).
    pub clicks: MixGen,
    batch: usize,
    seq: u64,
}

impl MixBatches {
    /// Batches of the whole stream.
    pub fn new(cfg: &MixConfig) -> Self {
        MixBatches {
            clicks: MixGen::new(cfg),
            batch: cfg.batch.max(1),
            seq: 0,
        }
    }
}

impl Iterator for MixBatches {
    type Item = Vec<u8>;

    fn next(&mut self) -> Option<Vec<u8>> {
        use prost::Message as _;
        let clicks: Vec<IngestClick> = self.clicks.by_ref().take(self.batch).collect();
        if clicks.is_empty() {
            return None;
        }
        self.seq += 1;
        Some(
            v1::IngestBatch {
                collector_id: "bench".into(),
                seq: self.seq,
                clicks,
                ..Default::default()
            }
            .encode_to_vec(),
        )
    }
}

/// Memory figures of [`apply_mix`] (RSS deltas, so they include allocator overhead).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MixMemory {
    /// RSS growth of the counting state (window operator + shard) minus the dedup set.
    pub state_bytes: u64,
    /// `state_bytes` per active (ad, minute) cell: its hour and day rollups, dimension
    /// combinations, unique-user sketches, top-N entry and ad metadata included.
    pub bytes_per_cell: f64,
    /// The shard's own estimate (`heap_bytes`) per minute cell.
    pub heap_estimate_per_cell: f64,
    /// Impression ids the dedup set holds (RAM tier + spilled tier; the spilled tier is
    /// run files, outside RSS but for their fence indexes).
    pub dedup_entries: u64,
    /// RSS growth of a dedup set alone fed the same ids.
    pub dedup_bytes: u64,
    /// `dedup_bytes` per entry.
    pub dedup_bytes_per_entry: f64,
}

/// What [`apply_mix`] measured.
#[derive(Debug, Clone, PartialEq)]
pub struct MixReport {
    /// The configuration measured.
    pub clicks: u64,
    /// Whether the invalid-traffic rules ran.
    pub rules: bool,
    /// Clicks they classified invalid (moved ones included).
    pub invalid: u64,
    /// Whether the click index was fed.
    pub click_index: bool,
    /// Fields with per-value top-N indexes.
    pub top_index_fields: Vec<IndexField>,
    /// Distinct ads configured.
    pub ads: u64,
    /// Minutes of event time.
    pub minutes: i64,
    /// Whether the timed loop decoded the clicks from batch bytes.
    pub decode: bool,
    /// The dedup RAM budget, MiB.
    pub dedup_mib: usize,
    /// Clicks counted.
    pub applied: u64,
    /// Clicks dropped as duplicates by the state path.
    pub duplicates: u64,
    /// Clicks counted as late corrections of an already-final minute.
    pub late: u64,
    /// Re-sent impressions the generator produced.
    pub generated_duplicates: u64,
    /// Late clicks the generator produced.
    pub generated_late: u64,
    /// Wall time of the timed loop, seconds.
    pub seconds: f64,
    /// CPU time of the timed loop (this thread), seconds: below `seconds` when other
    /// processes took the core.
    pub cpu_seconds: f64,
    /// Clicks per CPU-second of the timed loop.
    pub clicks_per_cpu_sec: f64,
    /// All clicks pushed per second (duplicates and late included), one core.
    pub clicks_per_sec: f64,
    /// Nanoseconds per click pushed.
    pub ns_per_click: f64,
    /// Active (ad, minute) cells at the end.
    pub minute_cells: u64,
    /// Unfiltered TopAds(n=100) over the mix's minutes, in process (shard index only).
    pub top100: Latency,
    /// Unfiltered TopAds(n=10) over its last 5 minutes.
    pub top10_last5: Latency,
    /// Memory, when measured.
    pub memory: Option<MixMemory>,
}

/// Runs the click mix through the per-click state path on this thread, as the engine's
/// writer and one shard thread do it (decode, window operator, apply, seal each minute the
/// watermark passes). The timed loop only reads batches encoded beforehand (or, without
/// `decode`, borrows pre-generated clicks: nothing is cloned per click); generation, memory
/// passes and TopAds are outside it. With `measure_memory`, two untimed passes come first,
/// streamed so that no freed input is reused by the state: the whole path, then a dedup set
/// alone fed the same ids.
pub fn apply_mix(cfg: &MixConfig) -> MixReport {
    let memory = cfg.measure_memory.then(|| {
        let rss0 = rss_bytes();
        let mut path = StatePath::with_dedup_memory(cfg.dedup_memory_bytes, &cfg.top_index_fields);
        if cfg.click_index {
            path = path
                .with_click_index()
                .unwrap_or_else(|e| panic!("click index: {e}"));
        }
        for b in MixBatches::new(cfg) {
            path.push_batch(&b);
        }
        let rss1 = rss_bytes();
        let cells = path.minute_cells().max(1);
        let heap = path.heap_bytes();
        let rss_d0 = rss_bytes();
        let mut dedup = DedupOnly::new();
        for c in MixGen::new(cfg) {
            dedup.push(&c);
        }
        let rss_d1 = rss_bytes();
        let entries = dedup.len().max(1);
        let dedup_bytes = rss_d1.saturating_sub(rss_d0);
        let state_bytes = rss1.saturating_sub(rss0).saturating_sub(dedup_bytes);
        drop(dedup);
        drop(path);
        MixMemory {
            state_bytes,
            bytes_per_cell: state_bytes as f64 / cells as f64,
            heap_estimate_per_cell: heap as f64 / cells as f64,
            dedup_entries: entries,
            dedup_bytes,
            dedup_bytes_per_entry: dedup_bytes as f64 / entries as f64,
        }
    });

    let mut path = StatePath::with_dedup_memory(cfg.dedup_memory_bytes, &cfg.top_index_fields);
    if cfg.click_index {
        path = path
            .with_click_index()
            .unwrap_or_else(|e| panic!("click index: {e}"));
    }
    if cfg.rules {
        path.rules = Some((bench_rules(), Vec::new()));
    }
    let (n, times, generated) = if cfg.decode {
        let mut gen_ = MixBatches::new(cfg);
        let batches: Vec<Vec<u8>> = gen_.by_ref().collect();
        let (t, cpu) = (Instant::now(), thread_cpu_seconds());
        let proc0 = proc_cpu_seconds("/proc/self/stat");
        for b in &batches {
            path.push_batch(b);
        }
        let times = (t.elapsed().as_secs_f64(), thread_cpu_seconds() - cpu);
        path.finish_click_index();
        let proc_cpu = proc_cpu_seconds("/proc/self/stat") - proc0;
        if cfg.click_index {
            eprintln!(
                "process CPU while applying (applying thread + click-index flusher): {proc_cpu:.2} s"
            );
        }
        (gen_.clicks.i, times, gen_.clicks)
    } else {
        let mut gen_ = MixGen::new(cfg);
        let clicks: Vec<IngestClick> = gen_.by_ref().collect();
        let (t, cpu) = (Instant::now(), thread_cpu_seconds());
        for chunk in clicks.chunks(cfg.batch.max(1)) {
            path.push_clicks(chunk);
        }
        let times = (t.elapsed().as_secs_f64(), thread_cpu_seconds() - cpu);
        (gen_.i, times, gen_)
    };
    // The queue is empty: the last clicks are published (outside the timed loop).
    path.publish();
    let seconds = times.0.max(1e-9);
    let cpu_seconds = times.1.max(0.0);
    let counts = path.counts();

    let m0 = T0_MS / 60_000;
    let m1 = m0 + cfg.minutes.max(1);
    let budget = Duration::from_secs(5);
    let top100 = time_runs(200, budget, || {
        std::hint::black_box(path.top(100, m0, m1));
    });
    let top10_last5 = time_runs(200, budget, || {
        std::hint::black_box(path.top(10, m1 - 5, m1));
    });
    let invalid = path
        .rules
        .as_ref()
        .map_or(0, |(r, _)| r.counters.invalid.iter().sum());
    MixReport {
        rules: cfg.rules,
        invalid,
        click_index: cfg.click_index,
        top_index_fields: cfg.top_index_fields.clone(),
        clicks: n,
        ads: cfg.ads,
        minutes: cfg.minutes,
        decode: cfg.decode,
        dedup_mib: cfg.dedup_memory_bytes >> 20,
        applied: counts.applied,
        duplicates: counts.duplicates,
        late: counts.late,
        generated_duplicates: generated.duplicates,
        generated_late: generated.late,
        seconds,
        cpu_seconds,
        clicks_per_cpu_sec: n as f64 / cpu_seconds.max(0.01),
        clicks_per_sec: n as f64 / seconds,
        ns_per_click: seconds * 1e9 / n.max(1) as f64,
        minute_cells: path.minute_cells(),
        top100,
        top10_last5,
        memory,
    }
}

impl MixReport {
    /// The human table (markdown).
    pub fn table(&self) -> String {
        let mut t = String::from("| metric | value |\n|---|---|\n");
        t += &format!(
            "| clicks / distinct ads (Zipf s=1) / minutes | {} / {} / {} |\n",
            self.clicks, self.ads, self.minutes
        );
        t += &format!(
            "| generated re-sent impressions / late clicks | {} / {} |\n",
            self.generated_duplicates, self.generated_late
        );
        t += &format!(
            "| counted / dropped as duplicates / of the counted, late corrections | {} / {} / {} |\n",
            self.applied, self.duplicates, self.late
        );
        t += &format!(
            "| **per-click path, one core** ({}window operator, shard apply, seals; all clicks) | **{:.0} clicks/s** ({:.0} ns/click, {:.2} s) |\n",
            if self.decode {
                "decode from batch bytes, "
            } else {
                ""
            },
            self.clicks_per_sec,
            self.ns_per_click,
            self.seconds
        );
        t += &format!(
            "| the same per CPU-second of the loop (CPU {:.2} s in {:.2} s of wall time; 10 ms ticks) | {:.0} clicks/s |\n",
            self.cpu_seconds, self.seconds, self.clicks_per_cpu_sec
        );
        t += &format!(
            "| invalid-traffic rules / clicks classified invalid | {} / {} |\n",
            if self.rules { "all on" } else { "off" },
            self.invalid
        );
        t += &format!("| active (ad, minute) cells | {} |\n", self.minute_cells);
        if let Some(m) = &self.memory {
            t += &format!(
                "| RSS per active minute cell, counting state without dedup (rollups, combos, HLLs, top-N) | {:.0} bytes ({:.0} MiB in all; heap estimate {:.0} bytes) |\n",
                m.bytes_per_cell,
                m.state_bytes as f64 / 1048576.0,
                m.heap_estimate_per_cell
            );
            t += &format!(
                "| dedup: entries / RSS per entry | {} / {:.0} bytes |\n",
                m.dedup_entries, m.dedup_bytes_per_entry
            );
        }
        t += &format!(
            "| TopAds n=100 over all minutes, in process: p50 / p99 | {:.3} / {:.3} ms |\n",
            self.top100.p50_ms, self.top100.p99_ms
        );
        t += &format!(
            "| TopAds n=10 over the last 5 minutes: p50 / p99 | {:.3} / {:.3} ms |\n",
            self.top10_last5.p50_ms, self.top10_last5.p99_ms
        );
        t
    }

    /// One machine-parsable line: `RESULT bench=aggregator key=value ...`.
    pub fn result_line(&self) -> String {
        let mut l = format!(
            "RESULT bench=aggregator click_index={} top_index_fields={} clicks={} ads={} minutes={} decode={} dedup_mib={} applied={} duplicates={} late={} seconds={:.3} cpu_seconds={:.2} clicks_per_sec={:.0} clicks_per_cpu_sec={:.0} ns_per_click={:.1} minute_cells={} top100_p50_ms={:.3} top100_p99_ms={:.3}",
            self.click_index,
            fields_str(&self.top_index_fields),
            self.clicks,
            self.ads,
            self.minutes,
            self.decode,
            self.dedup_mib,
            self.applied,
            self.duplicates,
            self.late,
            self.seconds,
            self.cpu_seconds,
            self.clicks_per_sec,
            self.clicks_per_cpu_sec,
            self.ns_per_click,
            self.minute_cells,
            self.top100.p50_ms,
            self.top100.p99_ms
        );
        l += &format!(" rules={} invalid={}", self.rules, self.invalid);
        if let Some(m) = &self.memory {
            l += &format!(
                " bytes_per_cell={:.0} dedup_entries={} dedup_bytes_per_entry={:.1}",
                m.bytes_per_cell, m.dedup_entries, m.dedup_bytes_per_entry
            );
        }
        l
    }
}

// ---------------------------------------------------------------------------------------
// TopAds over a large index
// ---------------------------------------------------------------------------------------

/// Shape of the TopAds benchmark.
#[derive(Debug, Clone)]
pub struct TopadsConfig {
    /// Distinct ads in the window (each clicked at least once).
    pub ads: u64,
    /// Extra clicks on Zipf(s = 1.1)-distributed ads on top of one per ad.
    pub zipf_clicks: u64,
    /// Minutes the clicks are spread over (the query asks for the last 60).
    pub minutes: i64,
    /// Most timed runs per query kind.
    pub runs: usize,
    /// Time budget per query kind (at least 3 runs are made).
    pub budget: Duration,
    /// Country of the filtered query.
    pub country: String,
    /// Generator seed.
    pub seed: u64,
    /// Stop building (with [`BenchError::OutOfMemory`]) when less memory than this is left.
    pub min_available_bytes: u64,
    /// Fields with per-value top-N indexes (`shards.top_index_fields`).
    pub top_index_fields: Vec<IndexField>,
}

impl Default for TopadsConfig {
    /// 10M distinct ads plus 10M Zipf clicks over 60 minutes; 300 runs or 20 s per query.
    fn default() -> Self {
        TopadsConfig {
            ads: 10_000_000,
            zipf_clicks: 10_000_000,
            minutes: 60,
            runs: 300,
            budget: Duration::from_secs(20),
            country: "US".into(),
            seed: 0x5EED_1234_ABCD_0001,
            min_available_bytes: 2 << 30,
            top_index_fields: IndexField::DEFAULT.to_vec(),
        }
    }
}

/// What [`topads_index`] measured.
#[derive(Debug, Clone, PartialEq)]
pub struct TopadsReport {
    /// Fields with per-value top-N indexes.
    pub top_index_fields: Vec<IndexField>,
    /// Distinct ads in the window.
    pub ads: u64,
    /// Clicks applied to build the state.
    pub clicks: u64,
    /// Active (ad, minute) cells.
    pub minute_cells: u64,
    /// Build time, seconds.
    pub build_seconds: f64,
    /// RSS growth while building, bytes.
    pub rss_bytes: u64,
    /// Unfiltered TopAds(n=100, last 60 min) through the query code.
    pub unfiltered: Latency,
    /// TopAds(n=100, last 60 min) filtered to one country.
    pub filtered: Latency,
    /// TopAds(n=100, last 60 min) as advertiser 1's key asks it (scoped to its ads).
    pub advertiser: Latency,
    /// TopAds(n=100, last 60 min) filtered to one country and one device (two per-click
    /// fields: exact counts come from the minute cells).
    pub two_fields: Latency,
    /// Country of the filtered query.
    pub country: String,
    /// Whether the filtered answer was non-empty (a sanity check of the set-up).
    pub filtered_hits: usize,
}

/// `advertiser,country` (`none` for none), as `--top-index-fields` takes it.
fn fields_str(fields: &[IndexField]) -> String {
    if fields.is_empty() {
        return "none".into();
    }
    let names: Vec<String> = fields
        .iter()
        .map(|f| format!("{f:?}").to_lowercase())
        .collect();
    names.join(",")
}

/// Continuous inverse-CDF approximation of Zipf(s) over ranks 0..n.
struct Zipf {
    a: f64,
    s: f64,
    n: u64,
}

impl Zipf {
    fn new(n: u64, s: f64) -> Self {
        Zipf {
            a: (n as f64).powf(1.0 - s) - 1.0,
            s,
            n: n.max(1),
        }
    }
    fn sample(&self, rng: &mut Rng) -> u64 {
        let r = (self.a * rng.unit() + 1.0).powf(1.0 / (1.0 - self.s));
        (r as u64).saturating_sub(1).min(self.n - 1)
    }
}

/// Builds a state holding `cfg.ads` distinct ads in the last `cfg.minutes` minutes (every
/// ad clicked once, then `zipf_clicks` more on Zipf-popular ads, all with dimensions and
/// user ids) and times TopAds(n=100, last 60 min) through the query code as gRPC runs it
/// (minus the network), unfiltered and filtered to one country. Checks the memory left
/// while building and stops early rather than make the machine swap or kill.
pub fn topads_index(cfg: &TopadsConfig) -> Result<TopadsReport, BenchError> {
    let span = cfg.minutes.max(1);
    // The data ends inside the current minute of `now`, as under live load.
    let base_minute = T0_MS / 60_000;
    let now_ms = (base_minute + span) * 60_000 - 1;
    let mut rng = Rng::new(cfg.seed);
    let zipf = Zipf::new(cfg.ads.max(1), 1.1);
    let mut index = IndexPath::new();
    let rss0 = rss_bytes();
    let t = Instant::now();
    let mut add = |rank: u64, rng: &mut Rng| {
        let ad = (splitmix(rank) >> 1) + 1;
        let minute = base_minute + (rng.next() % span as u64) as i64;
        let t_ms = minute * 60_000 + (rng.next() % 60_000) as i64;
        let dims = IndexDims {
            country: COUNTRIES[(rng.next() % COUNTRIES.len() as u64) as usize],
            device: (1 + rng.next() % 3) as u8,
            os: (1 + rng.next() % OSES.len() as u64) as u32,
            site: (1 + OSES.len() as u64 + rng.next() % SITES as u64) as u32,
            user: splitmix(rng.next() % 1_000_000),
        };
        index.add(ad, t_ms, dims);
    };
    let wanted = cfg.ads + cfg.zipf_clicks;
    for i in 0..wanted {
        // Every ad once, then the Zipf-popular ones.
        let rank = if i < cfg.ads {
            i
        } else {
            zipf.sample(&mut rng)
        };
        add(rank, &mut rng);
        if i % (1 << 18) == 0
            && let Some(avail) = mem_available_bytes()
            && avail < cfg.min_available_bytes
        {
            return Err(BenchError::OutOfMemory {
                clicks: i,
                wanted,
                used_mib: rss_bytes().saturating_sub(rss0) >> 20,
                available_mib: avail >> 20,
            });
        }
    }
    let build_seconds = t.elapsed().as_secs_f64();
    let rss_bytes = rss_bytes().saturating_sub(rss0);
    let minute_cells = index.minute_cells();
    // The watermark trails the newest click by the default allowed delay (10 s).
    let view = index.into_view(now_ms - 10_000, &cfg.top_index_fields);

    let request = |filter: Option<v1::Filter>| v1::TopAdsRequest {
        n: 100,
        window: Some(v1::top_ads_request::Window::LastMinutes(60)),
        filter,
        ..Default::default()
    };
    let unfiltered_req = request(None);
    let filtered_req = request(Some(v1::Filter {
        country: vec![cfg.country.clone()],
        ..Default::default()
    }));
    let unfiltered = time_runs(cfg.runs, cfg.budget, || {
        std::hint::black_box(view.top_ads(&unfiltered_req, now_ms));
    });
    let filtered_hits = view.top_ads(&filtered_req, now_ms);
    let filtered = time_runs(cfg.runs, cfg.budget, || {
        std::hint::black_box(view.top_ads(&filtered_req, now_ms));
    });
    let advertiser = time_runs(cfg.runs, cfg.budget, || {
        std::hint::black_box(view.top_ads_as(
            crate::query::Caller::Advertiser(1),
            &unfiltered_req,
            now_ms,
        ));
    });
    let two_req = request(Some(v1::Filter {
        country: vec![cfg.country.clone()],
        device: vec![2],
        ..Default::default()
    }));
    let two_fields = time_runs(cfg.runs, cfg.budget, || {
        std::hint::black_box(view.top_ads(&two_req, now_ms));
    });
    Ok(TopadsReport {
        top_index_fields: cfg.top_index_fields.clone(),
        ads: cfg.ads,
        clicks: wanted,
        minute_cells,
        build_seconds,
        rss_bytes,
        unfiltered,
        filtered,
        advertiser,
        two_fields,
        country: cfg.country.clone(),
        filtered_hits,
    })
}

impl TopadsReport {
    /// The human table (markdown).
    pub fn table(&self) -> String {
        let mut t = String::from("| metric | value |\n|---|---|\n");
        t += &format!(
            "| distinct ads in the window / clicks / active minute cells | {} / {} / {} |\n",
            self.ads, self.clicks, self.minute_cells
        );
        t += &format!(
            "| build (one core, shard apply only) / RSS growth | {:.1} s ({:.0} clicks/s) / {:.0} MiB |\n",
            self.build_seconds,
            self.clicks as f64 / self.build_seconds.max(1e-9),
            self.rss_bytes as f64 / 1048576.0
        );
        t += &format!(
            "| **TopAds(n=100, last 60 min)**, query code in process: p50 / p99 / max ({} runs) | **{:.3} / {:.3}** / {:.3} ms |\n",
            self.unfiltered.runs,
            self.unfiltered.p50_ms,
            self.unfiltered.p99_ms,
            self.unfiltered.max_ms
        );
        t += &format!(
            "| TopAds(n=100, last 60 min, country={}): p50 / p99 / max ({} runs) | {:.3} / {:.3} / {:.3} ms |\n",
            self.country,
            self.filtered.runs,
            self.filtered.p50_ms,
            self.filtered.p99_ms,
            self.filtered.max_ms
        );
        for (what, l) in [
            ("advertiser 1's key (its ads only)", &self.advertiser),
            (
                &*format!("country={} and device=2", self.country),
                &self.two_fields,
            ),
        ] {
            t += &format!(
                "| TopAds(n=100, last 60 min, {what}): p50 / p99 / max ({} runs) | {:.3} / {:.3} / {:.3} ms |\n",
                l.runs, l.p50_ms, l.p99_ms, l.max_ms
            );
        }
        t
    }

    /// One machine-parsable line: `RESULT bench=topads key=value ...`.
    pub fn result_line(&self) -> String {
        format!(
            "RESULT bench=topads top_index_fields={} ads={} clicks={} minute_cells={} build_seconds={:.1} rss_mib={:.0} p50_ms={:.3} p99_ms={:.3} max_ms={:.3} runs={} filtered_p50_ms={:.3} filtered_p99_ms={:.3} filtered_runs={} advertiser_p50_ms={:.3} advertiser_p99_ms={:.3} two_fields_p50_ms={:.3} two_fields_p99_ms={:.3}",
            fields_str(&self.top_index_fields),
            self.ads,
            self.clicks,
            self.minute_cells,
            self.build_seconds,
            self.rss_bytes as f64 / 1048576.0,
            self.unfiltered.p50_ms,
            self.unfiltered.p99_ms,
            self.unfiltered.max_ms,
            self.unfiltered.runs,
            self.filtered.p50_ms,
            self.filtered.p99_ms,
            self.filtered.runs,
            self.advertiser.p50_ms,
            self.advertiser.p99_ms,
            self.two_fields.p50_ms,
            self.two_fields.p99_ms
        )
    }
}

/// Dimensions of one click of the TopAds data set (`os`/`site` are interned ids).
#[derive(Debug, Clone, Copy)]
struct IndexDims {
    country: &'static str,
    device: u8,
    os: u32,
    site: u32,
    user: u64,
}

// ---------------------------------------------------------------------------------------
// Adapter: the only code here that calls the state API. Adapt these when it changes.
// ---------------------------------------------------------------------------------------

use crate::config::{QueryConfig, ShardConfig, WindowConfig};
use crate::decode::{ClickChunks, click_from_wire};
use crate::sketch::hll::Hll;
use crate::state::click::ClickIn;
use crate::state::dedup::{Dedup, Entry, Ordinal};
use crate::state::dims::{ComboTable, DimKey, country_code};
use crate::state::published::{TopOp, TopWriter};
use crate::state::shard::{Applied, LEVEL_MS, ShardState};
use crate::state::topset::{ClickKeys, IndexField, TopSet};
use crate::state::windows::{ClickWindows, DEFAULT_DEDUP_MEMORY_BYTES, Routed};
use crate::view::{QueryMeta, View};
use arc_swap::ArcSwap;

/// Counters of a [`StatePath`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PathCounts {
    /// Clicks counted.
    pub applied: u64,
    /// Duplicates dropped.
    pub duplicates: u64,
    /// Late corrections among the counted.
    pub late: u64,
}

/// The per-click path of the engine with one shard, on one thread: the writer's decode and
/// window operator (dedup, watermark, interning, hot keys, routing), the shard thread's
/// apply and its top-N index updates published read-copy-update style once per batch, and
/// the minute seals the writer sends when the watermark passes a minute (`engine.rs`).
#[derive(Debug)]
pub struct StatePath {
    windows: ClickWindows,
    shard: ShardState,
    top: TopWriter,
    published: ArcSwap<TopSet>,
    last_seal: i64,
    /// The click index and its directory, when fed.
    index: Option<(crate::clickindex::IndexWriter, tempfile_dir::Dir)>,
    indexed: u64,
    wal_pos: u64,
    /// The invalid-traffic rules and their moves buffer, when run.
    rules: Option<(crate::rules::Rules, Vec<crate::rules::Moved>)>,
    /// Routed clicks not applied yet: applied a chunk at a time, as the engine's shard
    /// thread applies a batch (`ShardState::apply_all`).
    pending: Vec<Applied>,
    /// Clicks applied since the top-N index was last published.
    unpublished: usize,
    /// The dedup disk tier's run files (declared after `windows`: dropped after it).
    _dedup_dir: tempfile_dir::Dir,
}

/// The production dedup disk tier (`store::runs`) in a fresh temporary directory, removed
/// when the returned guard drops.
fn bench_dedup(memory_bytes: usize) -> (Dedup, tempfile_dir::Dir) {
    let dir =
        tempfile_dir::Dir::named("dedup").unwrap_or_else(|e| panic!("dedup run directory: {e}"));
    let runs = crate::store::runs::RunDedup::open(&dir.0)
        .unwrap_or_else(|e| panic!("dedup run directory: {e}"));
    (Dedup::new(memory_bytes, Box::new(runs)), dir)
}

/// A temporary directory removed on drop (the bench's click-index segments).
mod tempfile_dir {
    /// The directory.
    #[derive(Debug)]
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        /// A fresh directory under the system's temporary directory.
        pub fn new() -> std::io::Result<Self> {
            Self::named("clickindex")
        }
        /// The same, `what` in its name.
        pub fn named(what: &str) -> std::io::Result<Self> {
            static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let p = std::env::temp_dir()
                .join(format!("adclick-bench-{what}-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&p)?;
            Ok(Dir(p))
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Default for StatePath {
    fn default() -> Self {
        Self::new()
    }
}

impl StatePath {
    /// One shard, default window configuration, the production dedup disk tier (run files
    /// in a temporary directory).
    pub fn new() -> Self {
        Self::with_dedup_memory(
            crate::state::windows::DEFAULT_DEDUP_MEMORY_BYTES,
            &IndexField::DEFAULT,
        )
    }

    /// The same with a dedup RAM tier of `memory_bytes` and value indexes for `fields`.
    pub fn with_dedup_memory(memory_bytes: usize, fields: &[IndexField]) -> Self {
        let shards = ShardConfig {
            count: 1,
            ..Default::default()
        };
        let shard = ShardState::default();
        let (top, published) = TopWriter::new(TopSet::with_fields(fields));
        let (dedup, dedup_dir) = bench_dedup(memory_bytes);
        StatePath {
            _dedup_dir: dedup_dir,
            windows: ClickWindows::with_dedup(WindowConfig::default(), &shards, dedup),
            shard,
            top,
            published,
            last_seal: i64::MIN,
            index: None,
            indexed: 0,
            wal_pos: 0,
            rules: None,
            pending: Vec::with_capacity(crate::state::shard::APPLY_CHUNK),
            unpublished: 0,
        }
    }

    /// Waits for a click-index flush still being written.
    pub fn finish_click_index(&mut self) {
        if let Some((w, _)) = &mut self.index {
            let _ = w.finish_flush(true);
        }
    }

    /// Also feeds a click index (in a temporary directory), as the engine does.
    pub fn with_click_index(mut self) -> Result<Self, BenchError> {
        let dir = tempfile_dir::Dir::new().map_err(|e| BenchError::Io(e.to_string()))?;
        let (w, _) = crate::clickindex::IndexWriter::open(&dir.0, 0)
            .map_err(|e| BenchError::Io(e.to_string()))?;
        self.index = Some((w, dir));
        Ok(self)
    }

    /// One encoded `IngestBatch`, as the engine applies a WAL entry.
    pub fn push_batch(&mut self, batch: &[u8]) {
        // As the engine: decode a chunk, warm the window operator's lookups, apply.
        let mut chunks = ClickChunks::new(batch);
        while let Some(chunk) = chunks.next_chunk() {
            self.windows.warm(chunk);
            for c in chunk {
                self.push(c);
            }
        }
        self.end_batch();
    }

    /// Already-decoded clicks as one batch.
    pub fn push_clicks(&mut self, clicks: &[IngestClick]) {
        for c in clicks {
            self.push(&click_from_wire(c));
        }
        self.end_batch();
    }

    #[inline]
    fn push(&mut self, c: &ClickIn<'_>) {
        let (ip, user) = (c.client_ip, c.user_id);
        if let Routed::Apply(_, a) = self.windows.process(c) {
            if let Some((w, _)) = &mut self.index {
                w.push(a.ad, a.event_time_ms, a.combo, ip, user);
            }
            // As the engine's writer and shard thread: classify, count invalid apart,
            // apply the moves.
            if let Some((rules, moved)) = &mut self.rules {
                if let Some(r) = rules.judge(c, crate::rules::Origin::default(), 0, &a, moved) {
                    self.shard.apply_invalid(r.index(), &a);
                }
                for m in moved.drain(..) {
                    let mut click = m.click;
                    click.late = true;
                    self.shard.apply_invalid(m.reason.index(), &click);
                }
            }
            self.pending.push(a);
            self.unpublished += 1;
            if self.pending.len() == crate::state::shard::APPLY_CHUNK {
                self.apply_pending();
            }
            self.top.push(TopOp::Add {
                ad: a.ad,
                minute: a.event_time_ms.div_euclid(LEVEL_MS[0]),
                by: 1,
                keys: ClickKeys {
                    dims: a.dims,
                    advertiser: a.advertiser,
                    campaign: a.campaign,
                },
            });
        }
    }

    /// Applies the pending clicks, as the shard thread does (`ShardState::apply_all`).
    fn apply_pending(&mut self) {
        self.shard.apply_all(&self.pending);
        self.pending.clear();
    }

    /// What the engine does after each batch: seal the minutes the watermark passed
    /// (`evict_if_due`; eviction is past the 48 h retention, never within a bench), and
    /// publish the top-N index after a seal or once [`crate::engine::PUBLISH_EVERY_CLICKS`]
    /// clicks are applied since the last time, as a saturated shard thread does. (Its run
    /// is at most its share of one writer group, up to 64 WAL batches: the writer waits for
    /// the group's confirmations before the next one. With 2 shards that reaches the cap
    /// once the forwarded batches hold 625 clicks or more; the collectors forward spool
    /// records of up to 20,000. Smaller batches publish more often than modelled here.)
    fn end_batch(&mut self) {
        self.apply_pending();
        let wm = self.windows.watermark_ms();
        let seal = wm.div_euclid(LEVEL_MS[0]) * LEVEL_MS[0];
        let sealed = wm != i64::MIN && seal > self.last_seal;
        if sealed {
            self.last_seal = seal;
            self.shard.seal(seal);
            self.top.push(TopOp::Seal(seal.div_euclid(LEVEL_MS[0])));
        }
        // A seal is a message of its own to the shard thread, published after it.
        if sealed || self.unpublished >= crate::engine::PUBLISH_EVERY_CLICKS {
            self.publish();
        }
        if let Some((rules, _)) = &mut self.rules {
            rules.expire(wm);
        }
        self.wal_pos += 1;
        if let Some((w, _)) = &mut self.index {
            w.end_batch();
            let applied = self.windows.counters.applied;
            if applied - self.indexed >= CLICK_INDEX_FLUSH_CLICKS {
                self.indexed = applied;
                // As the engine: the segment is written by the flusher thread.
                if let Some(Err(e)) = w.finish_flush(true) {
                    tracing::error!(error = %e, "bench: click index flush failed");
                }
                w.start_flush(self.wal_pos);
            }
        }
    }

    /// Counters so far.
    pub fn counts(&self) -> PathCounts {
        let c = &self.windows.counters;
        PathCounts {
            applied: c.applied,
            duplicates: c.duplicate,
            late: c.late,
        }
    }

    /// Active (ad, minute) cells.
    pub fn minute_cells(&self) -> u64 {
        self.shard.minute_cells() as u64
    }

    /// The shard's own heap estimate.
    pub fn heap_bytes(&self) -> u64 {
        self.shard.heap_bytes() as u64
    }

    /// Publishes the top-N index (as a shard thread does when its queue is empty).
    pub fn publish(&mut self) {
        self.top.publish(&self.published);
        self.unpublished = 0;
    }

    /// Unfiltered top `n` over minutes [from, to) (minute indices), from the published
    /// index as a query reads it.
    pub fn top(&self, n: usize, from_minute: i64, to_minute: i64) -> Vec<(u64, u64)> {
        self.published.load().all.top(n, from_minute, to_minute)
    }
}

/// A dedup set alone, fed the same impression ids (to split its memory from the state's).
struct DedupOnly {
    dedup: Dedup,
    next: u32,
    _dir: tempfile_dir::Dir,
}

impl DedupOnly {
    fn new() -> Self {
        let (dedup, dir) = bench_dedup(DEFAULT_DEDUP_MEMORY_BYTES);
        DedupOnly {
            dedup,
            next: 0,
            _dir: dir,
        }
    }

    fn push(&mut self, c: &IngestClick) {
        let Ok(id) = <[u8; 16]>::try_from(c.impression_id.as_slice()) else {
            return;
        };
        let ordinal = Ordinal {
            pos: 0,
            idx: self.next,
        };
        self.next = self.next.saturating_add(1);
        let _ = self.dedup.check_insert(
            id,
            Entry {
                keep_until: c.token_expires_at_ms + 60_000,
                ordinal,
            },
        );
    }

    fn len(&self) -> u64 {
        self.dedup.ram_len() as u64 + self.dedup.disk_len().unwrap_or(0)
    }
}

/// A shard filled directly (no window operator: the TopAds data set has no duplicates and
/// its dedup set would only cost memory), then sealed and published as the query side's
/// [`View`], with the owners and dimension combinations the window operator would publish.
struct IndexPath {
    shard: ShardState,
    combos: ComboTable,
    owners: crate::state::FastMap<u64, (u64, u64)>,
}

impl IndexPath {
    fn new() -> Self {
        IndexPath {
            shard: ShardState::default(),
            combos: ComboTable::default(),
            owners: Default::default(),
        }
    }

    fn add(&mut self, ad: u64, event_time_ms: i64, d: IndexDims) {
        let (advertiser, campaign) = (1 + ad % 7, 100 + ad % 23);
        self.owners.entry(ad).or_insert((advertiser, campaign));
        let dims = DimKey {
            country: country_code(d.country),
            device: d.device,
            os: d.os,
            site: d.site,
        };
        let combo = self.combos.intern(dims);
        self.shard.apply(&Applied {
            ad,
            advertiser,
            campaign,
            event_time_ms,
            combo,
            dims,
            user: Hll::entry_of_hash(d.user),
            late: false,
        });
    }

    fn minute_cells(&self) -> u64 {
        self.shard.minute_cells() as u64
    }

    /// Seals what the watermark (`watermark_ms`) has passed and publishes the view.
    fn into_view(mut self, watermark_ms: i64, fields: &[IndexField]) -> IndexView {
        self.shard
            .seal(watermark_ms.div_euclid(LEVEL_MS[0]) * LEVEL_MS[0]);
        let mut names = std::collections::HashMap::new();
        for (i, os) in OSES.iter().enumerate() {
            names.insert((*os).to_string(), i as u32 + 1);
        }
        for s in 0..SITES {
            names.insert(format!("site{s}"), (1 + OSES.len() + s) as u32);
        }
        IndexView {
            view: Arc::new(View {
                invalid_clicks: Default::default(),
                click_index_since_ms: i64::MIN,
                // Published as the engine publishes a restored shard's index (frozen).
                tops: vec![
                    TopWriter::new(self.shard.top_set(self.combos.keys(), &self.owners, fields)).1,
                ],
                shards: vec![RwLock::new(self.shard)],
                watermark_ms: AtomicI64::new(watermark_ms),
                meta: ArcSwap::from_pointee(QueryMeta {
                    names,
                    combos: self.combos.keys().to_vec(),
                }),
                owners: RwLock::new(self.owners),
                killed: AtomicBool::new(false),
                ready: Default::default(),
                clicks: Default::default(),
            }),
            cfg: QueryConfig::default(),
        }
    }
}

/// The query side over an [`IndexPath`].
struct IndexView {
    view: Arc<View>,
    cfg: QueryConfig,
}

impl IndexView {
    /// Runs TopAds as an admin through the query code; the number of ads answered.
    fn top_ads(&self, req: &v1::TopAdsRequest, now_ms: i64) -> usize {
        self.top_ads_as(crate::query::Caller::Admin, req, now_ms)
    }

    /// The same as `caller`.
    fn top_ads_as(
        &self,
        caller: crate::query::Caller,
        req: &v1::TopAdsRequest,
        now_ms: i64,
    ) -> usize {
        crate::query::top_ads(&self.view, caller, req, &self.cfg, now_ms).map_or(0, |r| r.ads.len())
    }
}

// ---------------------------------------------------------------------------------------
// Click index (issue 14 item 2: `ip` and `user_id` filters)
// ---------------------------------------------------------------------------------------

/// What [`click_index_queries`] builds and measures.
#[derive(Debug, Clone)]
pub struct ClickIndexBench {
    /// Ingest rate, clicks per second of event time (and of wall time while querying).
    pub rate: u64,
    /// Minutes of clicks in the index before queries start.
    pub minutes: i64,
    /// Seconds of clicks per segment (the checkpoint interval; 30 s by default in the
    /// server).
    pub flush_secs: u64,
    /// Distinct client IPs (10.0.0.0/8, uniform) and users (uniform).
    pub ips: u64,
    /// Distinct users.
    pub users: u64,
    /// Distinct ads (Zipf).
    pub ads: u64,
    /// Percent of clicks from one heavy IP (a NAT or a bot).
    pub heavy_pct: f64,
    /// Most timed runs per query, and the time budget of each.
    pub runs: usize,
    /// Time budget per query.
    pub budget: Duration,
    /// Where the segments go (a temporary directory under it, removed at the end).
    pub dir: std::path::PathBuf,
}

/// The heavy IP of [`ClickIndexBench::heavy_pct`].
const HEAVY_IP: [u8; 4] = [10, 255, 255, 254];

/// Figures of [`click_index_queries`].
#[derive(Debug, Clone)]
pub struct ClickIndexReport {
    /// The configuration.
    pub cfg: ClickIndexBench,
    /// Clicks indexed before the queries.
    pub fill_clicks: u64,
    /// Writer CPU per click for `push` + `end_batch` (batches of 1,000), ns.
    pub push_ns_per_click: f64,
    /// Mean and slowest segment flush, ms.
    pub flush_ms: (f64, f64),
    /// Segments and their bytes on disk when the queries started.
    pub segments: usize,
    /// Bytes on disk.
    pub disk_bytes: u64,
    /// Ingest achieved while querying, clicks/s (wall).
    pub live_rate: f64,
    /// GetAdClicks(one ad, last 60 min, minute buckets) by one IP.
    pub get_ip: Latency,
    /// The same by one user.
    pub get_user: Latency,
    /// TopAds(n=100, last 60 min) by one IP.
    pub top_ip: Latency,
    /// The same by one user.
    pub top_user: Latency,
    /// The same by a /24.
    pub top_cidr24: Latency,
    /// The same by the heavy IP.
    pub top_heavy: Latency,
}

struct ClickGen {
    rng: Rng,
    i: u64,
    cfg: ClickIndexBench,
    user: String,
}

impl ClickGen {
    /// (ad, event time, combo, ip) of the next click; the user id is in `self.user`.
    fn next(&mut self) -> (u64, i64, u32, [u8; 4]) {
        use std::fmt::Write;
        let r = &mut self.rng;
        let t = T0_MS + (u128::from(self.i) * 1000 / u128::from(self.cfg.rate.max(1))) as i64;
        self.i += 1;
        let ads = self.cfg.ads.max(1);
        let ad = ((ads as f64).powf(r.unit()) as u64).clamp(1, ads);
        let ip = if r.pct(self.cfg.heavy_pct) {
            HEAVY_IP
        } else {
            let n = (r.next() % self.cfg.ips.max(1)) as u32 & 0x00ff_ffff;
            (n | 10 << 24).to_be_bytes()
        };
        self.user.clear();
        let _ = write!(self.user, "user-{}", r.next() % self.cfg.users.max(1));
        (
            ad,
            t - (r.next() % 2000) as i64,
            1 + (r.next() % 50) as u32,
            ip,
        )
    }
}

/// Click-index query latency (GetAdClicks and TopAds over the last 60 minutes, filtered
/// by one IP, one user, a /24 and a heavy IP) through the real query code, while another
/// thread keeps indexing at `rate` clicks/s with a segment every `flush_secs`.
pub fn click_index_queries(cfg: &ClickIndexBench) -> Result<ClickIndexReport, BenchError> {
    use crate::clickindex::IndexWriter;
    use crate::query::{self, Caller};
    let io = |e: &dyn std::fmt::Display| BenchError::Io(e.to_string());
    let dir = cfg
        .dir
        .join(format!("adclick-bench-clickindex-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let _cleanup = tempfile_dir::Dir(dir.clone());
    let (mut w, shared) = IndexWriter::open(&dir, 0).map_err(|e| io(&e))?;
    let mut g = ClickGen {
        rng: Rng::new(0x5EED),
        i: 0,
        cfg: cfg.clone(),
        user: String::new(),
    };
    let per_flush = cfg.rate * cfg.flush_secs.max(1);
    let fill = cfg.rate * 60 * cfg.minutes.max(1) as u64;
    let (mut push_cpu, mut flushes, mut flush_max, mut pos) = (0.0, Vec::new(), 0f64, 0u64);
    let mut since_flush = 0;
    while g.i < fill {
        let cpu = thread_cpu_seconds();
        for _ in 0..1000 {
            let (ad, t, combo, ip) = g.next();
            w.push(ad, t, combo, &ip, g.user.as_bytes());
        }
        w.end_batch();
        push_cpu += thread_cpu_seconds() - cpu;
        pos += 1;
        since_flush += 1000;
        if since_flush >= per_flush {
            since_flush = 0;
            let t = Instant::now();
            w.flush(pos).map_err(|e| io(&e))?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            flush_max = flush_max.max(ms);
            flushes.push(ms);
        }
    }
    let segments = shared.load().segment_count();
    let disk_bytes = w.disk_bytes();
    let owners: crate::state::FastMap<u64, (u64, u64)> = (1..=cfg.ads)
        .map(|ad| (ad, (1 + ad % 7, 100 + ad % 23)))
        .collect();
    let rate = cfg.rate.max(1);
    let end = move |i: u64| T0_MS + (u128::from(i) * 1000 / u128::from(rate)) as i64;
    let view = Arc::new(View {
        click_index_since_ms: i64::MIN,
        shards: vec![RwLock::new(ShardState::default())],
        tops: vec![ArcSwap::from_pointee(TopSet::with_fields(&[]))],
        watermark_ms: AtomicI64::new(end(g.i)),
        meta: ArcSwap::from_pointee(QueryMeta::default()),
        owners: RwLock::new(owners),
        killed: AtomicBool::new(false),
        ready: Default::default(),
        clicks: shared,
        invalid_clicks: Default::default(),
    });
    // Live ingest at `rate`, paced by the wall clock, in its own thread.
    let stop = Arc::new(AtomicBool::new(false));
    let ingest = {
        let (stop, view) = (stop.clone(), view.clone());
        std::thread::spawn(move || -> Result<(u64, f64), String> {
            let started = Instant::now();
            let first = g.i;
            let mut since_flush = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let due =
                    started + Duration::from_secs_f64((g.i - first) as f64 / g.cfg.rate as f64);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                for _ in 0..1000 {
                    let (ad, t, combo, ip) = g.next();
                    w.push(ad, t, combo, &ip, g.user.as_bytes());
                }
                w.end_batch();
                view.watermark_ms
                    .store(end(g.i) - 10_000, std::sync::atomic::Ordering::Release);
                pos += 1;
                since_flush += 1000;
                if since_flush >= per_flush {
                    since_flush = 0;
                    w.flush(pos).map_err(|e| e.to_string())?;
                }
            }
            Ok((g.i - first, started.elapsed().as_secs_f64()))
        })
    };
    let limits = crate::validate::Limits::default();
    let qcfg = QueryConfig::default();
    let mut rng = Rng::new(77);
    let ip_text = |n: u64| {
        let n = (n % cfg.ips.max(1)) as u32 & 0x00ff_ffff;
        std::net::Ipv4Addr::from(n | 10 << 24).to_string()
    };
    let range = |v: &View| {
        let wm = v.watermark_ms.load(std::sync::atomic::Ordering::Acquire);
        (wm - 60 * 60_000, wm)
    };
    let filter = |ip: String, user: String| v1::Filter {
        ip,
        user_id: user,
        ..Default::default()
    };
    let mut get = |f: &dyn Fn(&mut Rng) -> v1::Filter| {
        time_runs(cfg.runs, cfg.budget, || {
            let (from, to) = range(&view);
            let req = v1::GetAdClicksRequest {
                ad_id: 1,
                from_ms: from,
                to_ms: to,
                granularity: v1::Granularity::Minute as i32,
                filter: Some(f(&mut rng)),
                fill_empty: Some(true),
                ..Default::default()
            };
            let r = query::get_ad_clicks(&view, Caller::Admin, &req, &limits);
            std::hint::black_box(r.map(|r| r.total_clicks).unwrap_or_else(|e| panic!("{e}")));
        })
    };
    let get_ip = get(&|r| filter(ip_text(r.next()), String::new()));
    let get_user = get(&|r| {
        filter(
            String::new(),
            format!("user-{}", r.next() % cfg.users.max(1)),
        )
    });
    let mut rng = Rng::new(78);
    let mut top = |f: &dyn Fn(&mut Rng) -> v1::Filter| {
        time_runs(cfg.runs, cfg.budget, || {
            let (from, to) = range(&view);
            let req = v1::TopAdsRequest {
                n: 100,
                window: Some(v1::top_ads_request::Window::Range(v1::TimeRange {
                    from_ms: from,
                    to_ms: to,
                })),
                filter: Some(f(&mut rng)),
                ..Default::default()
            };
            let r = query::top_ads(&view, Caller::Admin, &req, &qcfg, to);
            std::hint::black_box(r.map(|r| r.ads.len()).unwrap_or_else(|e| panic!("{e}")));
        })
    };
    let top_ip = top(&|r| filter(ip_text(r.next()), String::new()));
    let top_user = top(&|r| {
        filter(
            String::new(),
            format!("user-{}", r.next() % cfg.users.max(1)),
        )
    });
    let top_cidr24 = top(&|r| {
        let n = (r.next() % cfg.ips.max(1)) as u32 & 0x00ff_ff00;
        filter(
            format!("{}/24", std::net::Ipv4Addr::from(n | 10 << 24)),
            String::new(),
        )
    });
    let top_heavy = top(&|_| filter("10.255.255.254".into(), String::new()));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (live, secs) = ingest
        .join()
        .map_err(|_| BenchError::Io("ingest thread panicked".into()))?
        .map_err(BenchError::Io)?;
    Ok(ClickIndexReport {
        cfg: cfg.clone(),
        fill_clicks: fill,
        push_ns_per_click: push_cpu * 1e9 / fill.max(1) as f64,
        flush_ms: (
            flushes.iter().sum::<f64>() / flushes.len().max(1) as f64,
            flush_max,
        ),
        segments,
        disk_bytes,
        live_rate: live as f64 / secs.max(1e-9),
        get_ip,
        get_user,
        top_ip,
        top_user,
        top_cidr24,
        top_heavy,
    })
}

impl ClickIndexReport {
    /// The human table (markdown).
    pub fn table(&self) -> String {
        let c = &self.cfg;
        let mut t = format!(
            "click index: {} min at {} clicks/s indexed ({} clicks, {} ips, {} users, {} ads, {}% from one heavy IP), a segment every {} s: {} segments, {:.1} MiB ({:.1} B/click); push {:.0} ns/click (writer CPU), flush mean {:.0} ms, max {:.0} ms; live ingest while querying {:.0} clicks/s\n\n| query (last 60 min) | runs | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|\n",
            c.minutes,
            c.rate,
            self.fill_clicks,
            c.ips,
            c.users,
            c.ads,
            c.heavy_pct,
            c.flush_secs,
            self.segments,
            self.disk_bytes as f64 / (1 << 20) as f64,
            self.disk_bytes as f64 / self.fill_clicks.max(1) as f64,
            self.push_ns_per_click,
            self.flush_ms.0,
            self.flush_ms.1,
            self.live_rate
        );
        for (name, l) in [
            ("GetAdClicks(ad, minute) ip=one address", &self.get_ip),
            ("GetAdClicks(ad, minute) user_id=one user", &self.get_user),
            ("TopAds(n=100) ip=one address", &self.top_ip),
            ("TopAds(n=100) user_id=one user", &self.top_user),
            ("TopAds(n=100) ip=a /24", &self.top_cidr24),
            ("TopAds(n=100) ip=the heavy IP", &self.top_heavy),
        ] {
            t += &format!(
                "| {name} | {} | {:.2} | {:.2} | {:.2} |\n",
                l.runs, l.p50_ms, l.p99_ms, l.max_ms
            );
        }
        t
    }

    /// One parsable line.
    pub fn result_line(&self) -> String {
        format!(
            "RESULT bench=clickindex rate={} minutes={} flush_secs={} segments={} bytes_per_click={:.1} push_ns={:.0} flush_ms_max={:.0} live_rate={:.0} get_ip_p99_ms={:.2} get_user_p99_ms={:.2} top_ip_p99_ms={:.2} top_user_p99_ms={:.2} top_cidr24_p99_ms={:.2} top_heavy_p99_ms={:.2}",
            self.cfg.rate,
            self.cfg.minutes,
            self.cfg.flush_secs,
            self.segments,
            self.disk_bytes as f64 / self.fill_clicks.max(1) as f64,
            self.push_ns_per_click,
            self.flush_ms.1,
            self.live_rate,
            self.get_ip.p99_ms,
            self.get_user.p99_ms,
            self.top_ip.p99_ms,
            self.top_user.p99_ms,
            self.top_cidr24.p99_ms,
            self.top_heavy.p99_ms
        )
    }
}

//! The Prometheus exposition every adclick server shares (feature `metrics`): each server
//! declares its metrics in its own `prometheus-client` registry (`adclick_<role>_*`) and
//! serves `GET /metrics` with [`Exposition::render`], which adds what every process has
//! (`adclick_build_info`, the standard `process_*` metrics) and speaks both formats:
//!
//! - **OpenMetrics 1.0** (`application/openmetrics-text; version=1.0.0`) when the scraper's
//!   `Accept` asks for it (Prometheus does by default), as `prometheus-client` encodes it;
//! - **Prometheus text 0.0.4** (`text/plain; version=0.0.4`) otherwise (curl, older
//!   scrapers): the same samples, with what 0.0.4 names differently rewritten — a
//!   counter's `# TYPE`/`# HELP` carry its `_total` name, an info metric is a gauge
//!   `*_info`, no `# UNIT` or `# EOF` lines. Serving OpenMetrics under the 0.0.4 content
//!   type (what the servers did before) leaves counters without help text for a 0.0.4
//!   parser (`promtool check metrics` said so).
//!
//! Both outputs are checked with real parsers in the tests (`promtool check metrics` and
//! the strict OpenMetrics parser of the Python `prometheus-client`).

use std::fmt::Write as _;

/// The `prometheus-client` this module is built on, for the [`metrics!`](crate::metrics!)
/// macro's expansion.
pub use prometheus_client;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

/// Content type of the OpenMetrics answer.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of the Prometheus text 0.0.4 answer.
pub const TEXT_004: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether an `Accept` header value asks for OpenMetrics (any listed type
/// `application/openmetrics-text`, whatever its parameters, unless given `q=0`).
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| {
        a.split(',').any(|part| {
            let mut it = part.split(';').map(str::trim);
            it.next()
                .is_some_and(|t| t.eq_ignore_ascii_case("application/openmetrics-text"))
                && !it.any(|p| {
                    p.strip_prefix("q=")
                        .and_then(|q| q.parse::<f32>().ok())
                        .is_some_and(|q| q == 0.0)
                })
        })
    })
}

/// The metrics of one server process: its own registry plus the shared ones.
#[derive(Debug)]
pub struct Exposition {
    common: Registry,
}

impl Exposition {
    /// `adclick_build_info{component, version}` and the `process_*` metrics for
    /// `component` (`collector`, `aggregator`, `query_front`).
    pub fn new(component: &'static str) -> Self {
        let mut common = Registry::default();
        common.register(
            "adclick_build",
            "The adclick build: component and version (always 1)",
            Info::new(vec![
                ("component", component.to_string()),
                ("version", env!("CARGO_PKG_VERSION").to_string()),
            ]),
        );
        common.register_collector(Box::new(Process));
        Exposition { common }
    }

    /// `registries` (the server's own) and the shared metrics, as the scraper's `Accept`
    /// asks: `(content type, body)`.
    pub fn render(&self, registries: &[&Registry], accept: Option<&str>) -> (&'static str, String) {
        let mut om = String::new();
        for r in registries.iter().copied().chain([&self.common]) {
            // Writing to a String cannot fail.
            let _ = prometheus_client::encoding::text::encode_registry(&mut om, r);
        }
        if wants_openmetrics(accept) {
            let _ = prometheus_client::encoding::text::encode_eof(&mut om);
            (OPENMETRICS, om)
        } else {
            (TEXT_004, to_text_004(&om))
        }
    }
}

/// OpenMetrics text (without `# EOF`) as Prometheus text 0.0.4: the metadata lines of
/// counters and infos renamed to their sample names, `unknown` as `untyped`, `# UNIT`
/// dropped. Samples are the same in both formats for the types used here (no exemplars,
/// no `_created`).
pub fn to_text_004(om: &str) -> String {
    // Metric name -> the suffix its samples carry in 0.0.4 (from the `# TYPE` lines, which
    // come before the `# HELP` line in neither order we can rely on: collect first).
    let mut suffix: std::collections::HashMap<&str, &str> = std::collections::HashMap::new();
    for line in om.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some((name, kind)) = rest.rsplit_once(' ')
        {
            match kind {
                "counter" => suffix.insert(name, "_total"),
                "info" => suffix.insert(name, "_info"),
                _ => None,
            };
        }
    }
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let meta = line
            .strip_prefix("# TYPE ")
            .map(|r| ("# TYPE ", r))
            .or_else(|| line.strip_prefix("# HELP ").map(|r| ("# HELP ", r)));
        match meta {
            Some((tag, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let add = suffix.get(name).copied().unwrap_or("");
                let tail = match (tag, tail) {
                    ("# TYPE ", "info") => "gauge",
                    ("# TYPE ", "unknown") => "untyped",
                    _ => tail,
                };
                let _ = writeln!(out, "{tag}{name}{add} {tail}");
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// The standard process metrics, read from `/proc/self` at each scrape (Linux; elsewhere
/// they are simply absent): CPU seconds, resident and virtual memory, open and maximum
/// file descriptors, start time.
#[derive(Debug)]
struct Process;

/// Clock ticks per second of `/proc/<pid>/stat`'s times (USER_HZ: 100 on every Linux
/// architecture adclick runs on).
const TICKS_PER_SECOND: f64 = 100.0;
/// Page size for `/proc/self/statm` (4 KiB on x86-64 and arm64 defaults).
const PAGE_BYTES: f64 = 4096.0;

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

impl Process {
    /// (cpu seconds, start time since boot in seconds) from `/proc/self/stat`.
    fn stat() -> Option<(f64, f64)> {
        let stat = read("/proc/self/stat")?;
        // Fields after the command name, which is in parentheses and may hold spaces.
        let after = stat.rsplit_once(')')?.1;
        let f: Vec<&str> = after.split_whitespace().collect();
        // f[0] is field 3 (state): utime is field 14, stime 15, starttime 22.
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
        Some((
            (num(11)? + num(12)?) / TICKS_PER_SECOND,
            num(19)? / TICKS_PER_SECOND,
        ))
    }

    fn boot_time() -> Option<f64> {
        read("/proc/stat")?
            .lines()
            .find_map(|l| l.strip_prefix("btime "))?
            .trim()
            .parse()
            .ok()
    }

    fn max_fds() -> Option<f64> {
        read("/proc/self/limits")?
            .lines()
            .find(|l| l.starts_with("Max open files"))?
            .split_whitespace()
            .nth(3)?
            .parse()
            .ok()
    }
}

impl Collector for Process {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let mut gauge = |name: &str, help: &str, unit: Option<Unit>, v: f64| {
            let g = ConstGauge::new(v);
            let m = encoder.encode_descriptor(name, help, unit.as_ref(), g.metric_type())?;
            g.encode(m)
        };
        if let Some(statm) = read("/proc/self/statm") {
            let mut it = statm
                .split_whitespace()
                .filter_map(|v| v.parse::<f64>().ok());
            if let (Some(size), Some(resident)) = (it.next(), it.next()) {
                gauge(
                    "process_virtual_memory",
                    "Virtual memory size",
                    Some(Unit::Bytes),
                    size * PAGE_BYTES,
                )?;
                gauge(
                    "process_resident_memory",
                    "Resident memory size",
                    Some(Unit::Bytes),
                    resident * PAGE_BYTES,
                )?;
            }
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            gauge(
                "process_open_fds",
                "Open file descriptors",
                None,
                dir.count() as f64,
            )?;
        }
        if let Some(max) = Self::max_fds() {
            gauge(
                "process_max_fds",
                "Most open file descriptors allowed",
                None,
                max,
            )?;
        }
        let stat = Self::stat();
        if let (Some((_, start)), Some(boot)) = (stat, Self::boot_time()) {
            gauge(
                "process_start_time",
                "Start time of the process since the Unix epoch",
                Some(Unit::Seconds),
                boot + start,
            )?;
        }
        if let Some((cpu, _)) = stat {
            let c = ConstCounter::new(cpu);
            let m = encoder.encode_descriptor(
                "process_cpu",
                "User and system CPU time spent",
                Some(&Unit::Seconds),
                c.metric_type(),
            )?;
            c.encode(m)?;
        }
        Ok(())
    }
}

/// The doc lines of a metric's field as its help text: trimmed, joined by spaces, without
/// a final period (`prometheus-client` adds one).
pub fn help(lines: &[&str]) -> String {
    let text = lines
        .iter()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    text.trim_end_matches('.').to_string()
}

/// Declares a server's metrics once: each field is a metric whose name is the field's
/// (under the registry prefix), whose help is its doc comment, and whose initial value is
/// the expression after `=`; the generated `declare()` builds the struct and registers
/// every metric, so none can be declared and forgotten (the aggregator's watermark lag
/// was, before). Fields in the leading `extra { .. }` block are plain fields (not
/// metrics), initialised the same way. The struct also gets a private `registry` field.
/// The form `struct Name under "sub" { .. }` declares a group that another registry takes
/// under a sub-prefix (`Default` builds it, `register(&mut Registry)` adds it).
///
/// ```ignore
/// adclick_proto::metrics! {
///     /// Every collector metric.
///     pub struct Metrics("adclick_collector") {
///         extra { exposition: Exposition = Exposition::new("collector"), }
///         /// Clicks by outcome.
///         pub clicks: Family<OutcomeLabel, Counter> = Family::default();
///     }
/// }
/// ```
#[macro_export]
macro_rules! metrics {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident($prefix:literal) {
            extra {
                $( $(#[$xmeta:meta])* $xvis:vis $xfield:ident : $xty:ty = $xinit:expr, )*
            }
            $(
                $(#[doc = $help:literal])+
                $fvis:vis $field:ident : $ty:ty = $init:expr;
            )*
        }
    ) => {
        $(#[$meta])*
        $vis struct $name {
            registry: $crate::metrics::prometheus_client::registry::Registry,
            $( $(#[$xmeta])* $xvis $xfield: $xty, )*
            $( $(#[doc = $help])+ $fvis $field: $ty, )*
        }

        impl $name {
            /// Every metric at its initial value, registered under the prefix.
            fn declare() -> Self {
                Self::declare_only(|_| true)
            }

            /// Every metric at its initial value; only those whose field name `keep`
            /// accepts are registered (exposed), for a process that serves a subset.
            #[allow(dead_code)]
            fn declare_only(keep: impl Fn(&str) -> bool) -> Self {
                let mut registry = $crate::metrics::prometheus_client::registry::Registry::with_prefix($prefix);
                $( let $field: $ty = $init; )*
                $(
                    if keep(stringify!($field)) {
                        registry.register(
                            stringify!($field),
                            $crate::metrics::help(&[$($help),+]),
                            $field.clone(),
                        );
                    }
                )*
                $name {
                    registry,
                    $( $xfield: $xinit, )*
                    $( $field, )*
                }
            }
        }
    };
    // A group of metrics registered into another registry under a sub-prefix (the
    // aggregator's `source_*` and `front_*`): `Default` builds it, `register` adds it.
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident under $sub:literal {
            $(
                $(#[doc = $help:literal])+
                $fvis:vis $field:ident : $ty:ty = $init:expr;
            )*
        }
    ) => {
        $(#[$meta])*
        $vis struct $name {
            $( $(#[doc = $help])+ $fvis $field: $ty, )*
        }

        impl Default for $name {
            fn default() -> Self {
                $name { $( $field: $init, )* }
            }
        }

        impl $name {
            #[doc = concat!("Registers every metric under `", $sub, "_`.")]
            pub fn register(
                &self,
                registry: &mut $crate::metrics::prometheus_client::registry::Registry,
            ) {
                let r = registry.sub_registry_with_prefix($sub);
                $(
                    r.register(
                        stringify!($field),
                        $crate::metrics::help(&[$($help),+]),
                        self.$field.clone(),
                    );
                )*
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[test]
    fn accept_selects_the_format() {
        assert!(wants_openmetrics(Some(
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        )));
        assert!(!wants_openmetrics(None));
        assert!(!wants_openmetrics(Some("text/plain")));
        assert!(!wants_openmetrics(Some(
            "application/openmetrics-text; q=0"
        )));
    }

    #[test]
    fn text_004_names_counters_and_infos_by_their_samples() {
        let mut r = Registry::with_prefix("adclick_test");
        let c: Counter = Counter::default();
        c.inc();
        r.register("things", "Things seen", c);
        let e = Exposition::new("test");
        let (ct, body) = e.render(&[&r], None);
        assert_eq!(ct, TEXT_004);
        assert!(
            body.contains("# HELP adclick_test_things_total Things seen.\n"),
            "{body}"
        );
        assert!(
            body.contains("# TYPE adclick_test_things_total counter\n"),
            "{body}"
        );
        assert!(body.contains("adclick_test_things_total 1\n"), "{body}");
        assert!(body.contains("# TYPE adclick_build_info gauge\n"), "{body}");
        assert!(
            !body.contains("# EOF") && !body.contains("# UNIT"),
            "{body}"
        );
        let (ct, body) = e.render(&[&r], Some("application/openmetrics-text"));
        assert_eq!(ct, OPENMETRICS);
        assert!(
            body.contains("# TYPE adclick_test_things counter\n"),
            "{body}"
        );
        assert!(body.ends_with("# EOF\n"), "{body}");
    }
}

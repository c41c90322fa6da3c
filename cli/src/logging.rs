//! Logging for every subcommand: `--log-format json|text` (or `ADCLICK_LOG_FORMAT`), JSON by
//! default when stderr (where logs go) is not a terminal, colours only on a terminal, and
//! `RUST_LOG`-style filtering. It knows nothing about what the servers log, only how a line
//! looks.
//!
//! A JSON line is one event: `timestamp` (RFC 3339, UTC), `level` (`ERROR`..`TRACE`),
//! `target` (the Rust module, or the `log` target of a library using `log`), `message`, then
//! the process's context fields (`role`, and `collector_id` on a collector), the fields of
//! the spans the event is in (outermost first) and the event's own fields, all at the top
//! level. An event field named like a fixed one (`level`, ...) is written as `field.<name>`.
//!
//! The start and stop lines of the servers ("listening on", "shutting down") use the
//! [`LIFECYCLE`] target, which is on at INFO whatever `RUST_LOG` says unless `RUST_LOG` names
//! it (`RUST_LOG=warn,adclick::lifecycle=off` silences them).

use std::fmt;
use std::io::IsTerminal;
use std::sync::RwLock;

use serde_json::Value;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

/// Target of the servers' start and stop lines (see the module doc).
pub const LIFECYCLE: &str = "adclick::lifecycle";

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line (the default when stderr is not a terminal).
    Json,
    /// Human-readable lines; colours only when stderr is a terminal and NO_COLOR is unset.
    Text,
}

/// The format used: the one asked for, else JSON unless stderr is a terminal.
pub fn resolve(asked: Option<LogFormat>) -> LogFormat {
    asked.unwrap_or(if std::io::stderr().is_terminal() {
        LogFormat::Text
    } else {
        LogFormat::Json
    })
}

/// Fields written on every JSON line of this process (`role`, `collector_id`).
static CONTEXT: RwLock<Vec<(&'static str, String)>> = RwLock::new(Vec::new());

/// Adds a field to every later JSON line of this process (e.g. the collector's id, known
/// once its config is read).
pub fn set_context(key: &'static str, value: impl Into<String>) {
    if let Ok(mut c) = CONTEXT.write() {
        c.retain(|(k, _)| *k != key);
        c.push((key, value.into()));
    }
}

/// The filter: `RUST_LOG` if set (else `default`), plus [`LIFECYCLE`] at INFO unless
/// `RUST_LOG` names it. An invalid `RUST_LOG` falls back to `default` and says so.
fn filter(env: Option<String>, default: &str) -> (EnvFilter, Option<String>) {
    let env = env.filter(|s| !s.trim().is_empty());
    let base = env.clone().unwrap_or_else(|| default.to_string());
    let with_lifecycle = |b: &str| {
        if b.contains(LIFECYCLE) {
            b.to_string()
        } else {
            format!("{b},{LIFECYCLE}=info")
        }
    };
    match EnvFilter::try_new(with_lifecycle(&base)) {
        Ok(f) => (f, None),
        Err(e) => (
            EnvFilter::new(with_lifecycle(default)),
            Some(format!(
                "RUST_LOG={:?} is not a valid filter ({e}); using {default:?}",
                env.unwrap_or_default()
            )),
        ),
    }
}

/// Installs the process's subscriber, writing to stderr. `default` is the filter when
/// `RUST_LOG` is unset (`info` for servers, `warn` for tools). Returns the format used.
pub fn init(asked: Option<LogFormat>, default: &str) -> LogFormat {
    let format = resolve(asked);
    let (filter, problem) = filter(std::env::var("RUST_LOG").ok(), default);
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .event_format(JsonLines)
                    .fmt_fields(JsonFields::new())
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Text => {
            let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            registry
                .with(
                    tracing_subscriber::fmt::layer()
                        .with_ansi(ansi)
                        .with_writer(std::io::stderr),
                )
                .try_init()
        }
    };
    if let Some(p) = problem {
        tracing::warn!(target: LIFECYCLE, "{p}");
    }
    format
}

/// Names the JSON line writes itself; event fields with these names become `field.<name>`.
const FIXED: [&str; 4] = ["timestamp", "level", "target", "message"];

/// The JSON event format (see the module doc).
#[derive(Debug)]
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut fields = EventFields::default();
        event.record(&mut fields);
        let mut ts = String::new();
        SystemTime.format_time(&mut Writer::new(&mut ts))?;
        let target = fields
            .log_target
            .take()
            .unwrap_or_else(|| meta.target().to_string());
        // The fixed fields first, in this order, then the rest as they come: a person
        // reading the file sees when, how bad, where and what before the details.
        let mut line: Vec<(String, Value)> = vec![
            ("timestamp".into(), Value::String(ts)),
            ("level".into(), Value::String(meta.level().to_string())),
            ("target".into(), Value::String(target)),
            (
                "message".into(),
                Value::String(fields.message.take().unwrap_or_default()),
            ),
        ];
        if let Ok(c) = CONTEXT.read() {
            for (k, v) in c.iter() {
                insert_field(&mut line, (*k).to_string(), Value::String(v.clone()));
            }
        }
        // Span fields, outermost first (an inner span's field wins over an outer one's).
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let ext = span.extensions();
                let Some(f) = ext.get::<FormattedFields<N>>() else {
                    continue;
                };
                if let Ok(Value::Object(m)) = serde_json::from_str::<Value>(f) {
                    for (k, v) in m {
                        insert_field(&mut line, k, v);
                    }
                }
            }
        }
        for (k, v) in fields.rest {
            insert_field(&mut line, k, v);
        }
        let mut text = String::from("{");
        for (i, (k, v)) in line.iter().enumerate() {
            if i > 0 {
                text.push(',');
            }
            text += &serde_json::to_string(k).map_err(|_| fmt::Error)?;
            text.push(':');
            text += &serde_json::to_string(v).map_err(|_| fmt::Error)?;
        }
        text.push('}');
        writeln!(writer, "{text}")
    }
}

/// Adds or replaces `k` (a later value wins: the event's own field over a span's over the
/// process context's).
fn insert_field(line: &mut Vec<(String, Value)>, k: String, v: Value) {
    let k = if FIXED.contains(&k.as_str()) {
        format!("field.{k}")
    } else {
        k
    };
    match line.iter_mut().find(|(name, _)| *name == k) {
        Some(slot) => slot.1 = v,
        None => line.push((k, v)),
    }
}

/// An event's fields: its message, the real target of a `log` record, the rest by name.
#[derive(Debug, Default)]
struct EventFields {
    message: Option<String>,
    log_target: Option<String>,
    rest: Vec<(String, Value)>,
}

impl EventFields {
    fn put(&mut self, field: &Field, v: Value) {
        match field.name() {
            "message" => {
                self.message = Some(match v {
                    Value::String(s) => s,
                    other => other.to_string(),
                })
            }
            "log.target" => {
                if let Value::String(s) = v {
                    self.log_target = Some(s);
                }
            }
            // The rest of a `log` record's metadata: where in the library, not what happened.
            n if n.starts_with("log.") => {}
            n => self.rest.push((n.to_string(), v)),
        }
    }
}

impl Visit for EventFields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, Value::String(format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::String(value.to_string()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::from(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        // The error's own text once; its causes follow only if it does not already say
        // them (anyhow-style "a: b" chains would otherwise repeat).
        let mut text = value.to_string();
        let mut source = value.source();
        while let Some(s) = source {
            let s_text = s.to_string();
            if !text.contains(&s_text) {
                text = format!("{text}: {s_text}");
            }
            source = s.source();
        }
        self.put(field, Value::String(text));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_keeps_lifecycle_on_unless_named() {
        let (f, problem) = filter(None, "warn");
        assert!(problem.is_none());
        assert_eq!(f.to_string(), "adclick::lifecycle=info,warn");
        let (f, _) = filter(Some("debug,adclick::lifecycle=off".into()), "warn");
        assert_eq!(f.to_string(), "adclick::lifecycle=off,debug");
        let (f, problem) = filter(Some("foo=notalevel".into()), "warn");
        assert_eq!(f.to_string(), "adclick::lifecycle=info,warn");
        assert!(problem.unwrap().contains("not a valid filter"));
    }
}

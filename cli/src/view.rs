//! The live view of a running pipeline, shared by `adclick dev` (both modes) and
//! `adclick top`: what the numbers are ([`View`]) and how they look, as text lines
//! ([`View::lines`], printed by `dev`), one summary line off a terminal ([`View::line`]), and
//! a ratatui frame ([`View::draw`], `top`) made of the same lines. It fetches nothing.

use std::time::Duration;

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Text};
use ratatui::widgets::{Block, Paragraph};

use crate::keys::{format_ms, now_ms};

/// The collector's per-click rejection reasons (`adclick_collector_clicks_total{outcome}`).
pub const REJECT_REASONS: [&str; 6] = [
    "bad_signature",
    "expired",
    "malformed",
    "unknown_key",
    "not_yet_valid",
    "invalid_dimension",
];

/// One refresh of the live view.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct View {
    /// Since the view started.
    pub uptime: Duration,
    /// Clicks accepted per second at the collectors since the previous refresh.
    pub rate: f64,
    /// Clicks accepted by the collectors.
    pub accepted: u64,
    /// Duplicates the collectors dropped.
    pub duplicate: u64,
    /// Rejected clicks by reason (only reasons with clicks).
    pub rejected: Vec<(String, u64)>,
    /// Accepted clicks by User-Agent class at the collectors (bot, client, none; only
    /// classes with clicks): the edge's half of the invalid-traffic picture.
    pub user_agents: Vec<(String, u64)>,
    /// Clicks the aggregators counted.
    pub counted: u64,
    /// Late corrections at the aggregators.
    pub late: u64,
    /// Duplicates the aggregators dropped.
    pub agg_duplicate: u64,
    /// Counted clicks the aggregators' rules classified invalid traffic, by reason (only
    /// reasons with clicks; not billed, kept apart in queries with `traffic`).
    pub invalid: Vec<(String, u64)>,
    /// The (slowest) watermark, ms since the epoch; 0 = none yet.
    pub watermark: i64,
    /// Top ads (ad, clicks), last 5 minutes.
    pub top: Vec<(u64, u64)>,
    /// Clicks queued in the SDK of the built-in traffic (`dev` only).
    pub queued: Option<usize>,
    /// Spool records not yet acknowledged by the aggregators (collectors' forward lag).
    pub forward_lag: Option<u64>,
    /// Errors and refusals by reason (only those above zero), e.g. `forward 3`.
    pub errors: Vec<(String, u64)>,
    /// "adclick dev", "adclick dev --cluster (...)", "adclick top (...)".
    pub title: String,
    /// Lines shown under the title (processes that exited, endpoints unreachable).
    pub notes: Vec<String>,
}

/// The `user_agents` line's entries from a getter of
/// `adclick_collector_user_agent_clicks_total{class}` (only classes with clicks).
pub fn user_agent_classes(get: impl Fn(&'static str) -> u64) -> Vec<(String, u64)> {
    [
        ("bot", "bot"),
        ("client", "client"),
        ("none", "unspecified"),
    ]
    .into_iter()
    .map(|(name, class)| (name.to_string(), get(class)))
    .filter(|(_, n)| *n > 0)
    .collect()
}

fn list(v: &[(String, u64)]) -> String {
    if v.is_empty() {
        return "0".into();
    }
    let parts: Vec<String> = v.iter().map(|(r, n)| format!("{r} {n}")).collect();
    parts.join(", ")
}

impl View {
    /// The watermark and how far behind now it is.
    fn watermark_text(&self) -> String {
        if self.watermark > 0 {
            format!(
                "{} ({:.1}s behind)",
                format_ms(self.watermark),
                (now_ms() - self.watermark) as f64 / 1000.0
            )
        } else {
            "-".into()
        }
    }

    /// The view as text lines (the numbers; the top-ads table last).
    pub fn lines(&self) -> Vec<String> {
        let mut s = vec![format!("{} — up {}s", self.title, self.uptime.as_secs())];
        s.extend(self.notes.iter().map(|n| format!("!! {n}")));
        s.push(String::new());
        s.push(format!("ingest       {:>10.0} clicks/s", self.rate));
        let queued = self
            .queued
            .map(|q| format!("   queued in SDK {q:>6}"))
            .unwrap_or_default();
        s.push(format!(
            "accepted     {:>10}   duplicate {:>8}{queued}",
            self.accepted, self.duplicate
        ));
        s.push(format!("rejected     {}", list(&self.rejected)));
        if !self.user_agents.is_empty() {
            s.push(format!("user agents  {}", list(&self.user_agents)));
        }
        s.push(format!(
            "counted      {:>10}   late corrections {:>6}   dedup at aggregator {:>6}",
            self.counted, self.late, self.agg_duplicate
        ));
        let invalid: u64 = self.invalid.iter().map(|(_, n)| n).sum();
        s.push(format!(
            "valid        {:>10}   invalid {:>10}   ({})",
            self.counted.saturating_sub(invalid),
            invalid,
            if self.invalid.is_empty() {
                "no rule tripped".to_string()
            } else {
                list(&self.invalid)
            }
        ));
        if let Some(l) = self.forward_lag {
            s.push(format!("forward lag  {l:>10} spool records not yet acked"));
        }
        if !self.errors.is_empty() || self.forward_lag.is_some() {
            s.push(format!("errors       {}", list(&self.errors)));
        }
        s.push(format!("watermark    {}", self.watermark_text()));
        s.push(String::new());
        s.push("top 10 ads, last 5 minutes".into());
        s.push("  rank        ad     clicks".into());
        for (i, (ad, c)) in self.top.iter().enumerate() {
            s.push(format!("  {:>4}  {:>8}  {:>9}", i + 1, ad, c));
        }
        s
    }

    /// The whole view as one text block (what `adclick dev` redraws on a terminal).
    pub fn render(&self) -> String {
        let mut s = self.lines().join("\n");
        s.push('\n');
        s
    }

    /// One line per refresh, for logs and pipes.
    pub fn line(&self) -> String {
        let top: Vec<String> = self
            .top
            .iter()
            .take(3)
            .map(|(a, c)| format!("{a}:{c}"))
            .collect();
        let notes = if self.notes.is_empty() {
            String::new()
        } else {
            format!("  !! {}", self.notes.join("; "))
        };
        format!(
            "up {:>4}s  {:>7.0}/s  accepted {}  duplicate {}  rejected {}  counted {}  late {}  top {}{notes}",
            self.uptime.as_secs(),
            self.rate,
            self.accepted,
            self.duplicate,
            self.rejected.iter().map(|(_, n)| n).sum::<u64>(),
            self.counted,
            self.late,
            top.join(" ")
        )
    }

    /// The view in a ratatui frame: the same lines in a titled box, a key hint below.
    pub fn draw(&self, frame: &mut Frame<'_>, hint: &str) {
        let [main, foot] =
            Layout::vertical([Constraint::Min(1), Constraint::Length(1)]).areas(frame.area());
        let mut lines = self.lines();
        let title = lines.remove(0);
        let text: Text<'_> = lines
            .into_iter()
            .map(|l| {
                if l.starts_with("!! ") || l.starts_with("top 10") {
                    Line::styled(l, Style::default().add_modifier(Modifier::BOLD))
                } else {
                    Line::raw(l)
                }
            })
            .collect();
        frame.render_widget(
            Paragraph::new(text).block(Block::bordered().title(title)),
            main,
        );
        frame.render_widget(Paragraph::new(hint.to_string()), foot);
    }
}

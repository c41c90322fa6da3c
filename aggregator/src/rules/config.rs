//! The `[rules]` section of `aggregator.toml`: one switch per invalid-traffic rule and its
//! thresholds, with validation. Reading the CIDR file is `super::cidr`'s job; this only
//! holds its path (resolved against the config file's directory by the CLI).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `[rules]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RulesConfig {
    /// Master switch. Off by default: an existing deployment's counts do not change under
    /// it on upgrade; `enabled = true` turns on every rule whose own switch is on (all by
    /// default).
    pub enabled: bool,
    /// Invalid when the collector classified the User-Agent as a bot (`ua_class = BOT`).
    pub bot_user_agent: Switch,
    /// Invalid when the client IP is in one of the operator's data-center CIDRs.
    pub datacenter_ip: DatacenterIpRule,
    /// Invalid when one IP clicks more than `max_per_minute` times in an event-time minute
    /// (all its clicks of that minute, the earlier ones retroactively).
    pub ip_rate: RateRule,
    /// The same per user id.
    pub user_rate: RateRule,
    /// Trap ads: a client (IP, and user id if present) that clicks one is flagged.
    pub honeypot: HoneypotRule,
    /// Invalid when the click comes sooner than `min_ms` after the token was issued.
    pub too_fast: TooFastRule,
    /// Invalid when the device's clock-corrected time lies outside the token's lifetime.
    pub impossible_time: Switch,
}

/// A rule with only an on/off switch.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Switch {
    /// On (default).
    pub enabled: bool,
}

impl Default for Switch {
    fn default() -> Self {
        Switch { enabled: true }
    }
}

/// `[rules.datacenter_ip]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct DatacenterIpRule {
    /// On (default; without `cidr_file` it has no data and flags nothing).
    pub enabled: bool,
    /// One CIDR per line (`docs/datacenter-cidrs.md`); relative paths are relative to the
    /// config file's directory.
    pub cidr_file: Option<PathBuf>,
}

impl Default for DatacenterIpRule {
    fn default() -> Self {
        DatacenterIpRule {
            enabled: true,
            cidr_file: None,
        }
    }
}

/// `[rules.ip_rate]` / `[rules.user_rate]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RateRule {
    /// On (default).
    pub enabled: bool,
    /// Most clicks per event-time minute still valid (default 100); one more makes every
    /// click of that minute invalid.
    pub max_per_minute: u32,
}

impl Default for RateRule {
    fn default() -> Self {
        RateRule {
            enabled: true,
            max_per_minute: 100,
        }
    }
}

/// `[rules.honeypot]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct HoneypotRule {
    /// On (default; with no `ad_ids` it flags nothing).
    pub enabled: bool,
    /// Trap ad ids (invisible links no human clicks).
    pub ad_ids: Vec<u64>,
    /// A flagged client's clicks within this many minutes (event time, either side) of its
    /// trap click are invalid (default 60).
    pub window_minutes: i64,
    /// How far back a trap click reaches clicks of its client that were already counted
    /// as valid, in minutes of event time before the trap click (default 5, at most
    /// [`MAX_HONEYPOT_LOOKBACK_MINUTES`]; `window_minutes` when that is shorter; 0 =
    /// forward only). Those
    /// clicks move from valid to invalid like a rate rule's (versioned like late data).
    /// The cost is memory: every valid click with an IP or user id is remembered this
    /// long (about 120 bytes each), and only while trap ads are configured.
    pub lookback_minutes: i64,
}

impl Default for HoneypotRule {
    fn default() -> Self {
        HoneypotRule {
            enabled: true,
            ad_ids: Vec::new(),
            window_minutes: 60,
            lookback_minutes: 5,
        }
    }
}

/// `[rules.too_fast]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct TooFastRule {
    /// On (default).
    pub enabled: bool,
    /// Least time from the token's issue to the click, ms (default 1000).
    pub min_ms: i64,
}

impl Default for TooFastRule {
    fn default() -> Self {
        TooFastRule {
            enabled: true,
            min_ms: 1000,
        }
    }
}

/// Largest `max_per_minute`: the retroactive list of one IP-minute holds up to this many
/// clicks, so it bounds the rules' memory per client.
pub const MAX_PER_MINUTE: u32 = 100_000;
/// Largest honeypot window (a week): flags are kept in RAM that long.
pub const MAX_HONEYPOT_WINDOW_MINUTES: i64 = 7 * 24 * 60;
/// Largest `honeypot.lookback_minutes`: it bounds how many valid clicks the rules keep
/// in RAM (all those of this many minutes).
pub const MAX_HONEYPOT_LOOKBACK_MINUTES: i64 = 60;
/// Most trap ad ids.
pub const MAX_HONEYPOT_ADS: usize = 10_000;

impl RulesConfig {
    /// Values that cannot work, named by their key.
    pub fn validate(&self) -> Result<(), String> {
        for (name, r) in [("ip_rate", &self.ip_rate), ("user_rate", &self.user_rate)] {
            if r.max_per_minute == 0 || r.max_per_minute > MAX_PER_MINUTE {
                return Err(format!(
                    "rules.{name}.max_per_minute must be between 1 and {MAX_PER_MINUTE} (got {})",
                    r.max_per_minute
                ));
            }
        }
        let h = &self.honeypot;
        if h.window_minutes < 1 || h.window_minutes > MAX_HONEYPOT_WINDOW_MINUTES {
            return Err(format!(
                "rules.honeypot.window_minutes must be between 1 and {MAX_HONEYPOT_WINDOW_MINUTES} (got {})",
                h.window_minutes
            ));
        }
        if !(0..=MAX_HONEYPOT_LOOKBACK_MINUTES).contains(&h.lookback_minutes) {
            return Err(format!(
                "rules.honeypot.lookback_minutes must be between 0 and {MAX_HONEYPOT_LOOKBACK_MINUTES} (got {})",
                h.lookback_minutes
            ));
        }
        if h.ad_ids.len() > MAX_HONEYPOT_ADS || h.ad_ids.contains(&0) {
            return Err(format!(
                "rules.honeypot.ad_ids: at most {MAX_HONEYPOT_ADS} nonzero ad ids"
            ));
        }
        if !(0..=crate::rules::MAX_TOO_FAST_MS).contains(&self.too_fast.min_ms) {
            return Err(format!(
                "rules.too_fast.min_ms must be between 0 and {} (got {})",
                crate::rules::MAX_TOO_FAST_MS,
                self.too_fast.min_ms
            ));
        }
        if self
            .datacenter_ip
            .cidr_file
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(
                "rules.datacenter_ip.cidr_file is empty: remove the key or name a file".into(),
            );
        }
        Ok(())
    }
}

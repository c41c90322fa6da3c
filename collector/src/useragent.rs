//! User-Agent classification for invalid-traffic filtering (issue 16): the collector is the
//! only component that sees the `User-Agent` header, so it matches it against the
//! maintained `crawler-user-agents` pattern list and forwards only the verdict
//! (`IngestClick.ua_class`: unspecified / client / bot); the raw header stays here.
//!
//! It must not decide validity: a bot click is spooled and forwarded like any other, and
//! the aggregator's rules stage (`bot_user_agent`) classifies it as invalid, counted and
//! archived, never dropped.
//!
//! - **The list** is data, not code: the pinned npm package vendored under
//!   `collector/data/crawler-user-agents/` (refreshed by
//!   `scripts/refresh-crawler-user-agents.sh`) is embedded in the binary; an operator may
//!   name another file of the same JSON shape (`[user_agent] bot_list`).
//! - **Compiled once** at start. Each pattern is parsed (`regex-syntax`); the ones that are
//!   plain literals (1,464 of the vendored 1,500: `Googlebot\/`) go into one Aho-Corasick
//!   automaton, the others (`[wW]get`, `^curl`, ...) into one [`regex::bytes::RegexSet`]
//!   (bytes: a header need not be UTF-8). One RegexSet of all 1,500 was ~150 µs per
//!   crawler UA once varied input thrashed its lazy DFA (BENCHMARKS.md); split, a header
//!   costs a few hundred ns whatever it holds. A pattern the Rust regex crate rejects
//!   (look-around, back-references), or one that matches the empty string (it would call
//!   every client a bot), is skipped with a WARN log line naming it and a count, never a
//!   panic; the vendored list's test pins which ones (`KNOWN_UNSUPPORTED`).
//! - **Bounded cost:** only the first [`MAX_UA_BYTES`] bytes of a header are matched, so a
//!   megabyte-long header costs what a 512-byte one does (hyper's header limits bound the
//!   rest). Patterns are matched case-sensitively, as the list's own validators do.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use adclick_proto::v1::UserAgentClass;
use aho_corasick::{AhoCorasick, AhoCorasickKind};
use regex::bytes::{RegexSet, RegexSetBuilder};
use regex_syntax::hir::HirKind;
use serde::Deserialize;

use crate::config::UserAgentConfig;

/// The vendored `crawler-user-agents` list (see `collector/data/crawler-user-agents/`).
pub const BUILTIN_LIST: &str = include_str!("../data/crawler-user-agents/crawler-user-agents.json");

/// The vendored list's `VERSION` file: package version, source and tarball checksum.
pub const BUILTIN_VERSION: &str = include_str!("../data/crawler-user-agents/VERSION");

/// Bytes of a User-Agent header that are matched; the rest is ignored. Real browser and
/// crawler UAs are well under this (the vendored list's longest example is under 300), so
/// a longer header only costs an attacker their own bandwidth.
pub const MAX_UA_BYTES: usize = 512;

/// Patterns of the vendored list that the Rust regex crate cannot compile (none in
/// 1.60.0; a refresh that adds one must list it here, or the test fails).
pub const KNOWN_UNSUPPORTED: &[&str] = &[];

/// `bot_list` value naming the embedded list.
pub const BUILTIN: &str = "builtin";

/// Why a bot list could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum UaListError {
    /// The operator's file could not be read.
    #[error("user_agent.bot_list {path}: cannot read: {source}")]
    Read {
        /// The configured path.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// The file is not a crawler-user-agents JSON list.
    #[error(
        "user_agent.bot_list {origin}: not a crawler-user-agents list (a JSON array of \
         objects with a \"pattern\" string): {detail}"
    )]
    Format {
        /// Where the list came from.
        origin: String,
        /// The parser's message.
        detail: String,
    },
    /// The list holds no pattern the regex crate accepts: classifying would call every
    /// client a browser, which is worse than an error at start.
    #[error("user_agent.bot_list {origin}: none of its {total} patterns compiles")]
    NoUsablePattern {
        /// Where the list came from.
        origin: String,
        /// Patterns in the list.
        total: usize,
    },
}

/// One entry of the list; the other fields (url, instances, tags...) are documentation.
#[derive(Debug, Deserialize)]
struct Entry {
    pattern: String,
}

/// A pattern that was skipped, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported {
    /// The pattern as written in the list.
    pub pattern: String,
    /// Why: the regex parser's or compiler's error (first line), or "matches the empty
    /// string".
    pub error: String,
}

/// The compiled bot list (or none, when classification is off).
#[derive(Debug)]
pub struct UaClassifier {
    enabled: bool,
    /// The patterns that are plain literals.
    literals: Option<AhoCorasick>,
    literal_count: usize,
    /// The others.
    set: Option<RegexSet>,
    origin: String,
    unsupported: Vec<Unsupported>,
}

impl UaClassifier {
    /// Classification off: every click is forwarded as `UNSPECIFIED` (no UA rule applies).
    pub fn disabled() -> Self {
        UaClassifier {
            enabled: false,
            literals: None,
            literal_count: 0,
            set: None,
            origin: "disabled".into(),
            unsupported: Vec::new(),
        }
    }

    /// The classifier `[user_agent]` asks for: off, the embedded list, or a file.
    pub fn from_config(cfg: &UserAgentConfig) -> Result<Arc<Self>, UaListError> {
        if !cfg.classify {
            return Ok(Arc::new(Self::disabled()));
        }
        if cfg.bot_list == BUILTIN {
            return Self::builtin();
        }
        let path = Path::new(&cfg.bot_list);
        let text = std::fs::read_to_string(path).map_err(|source| UaListError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text, &path.display().to_string()).map(Arc::new)
    }

    /// The embedded list, compiled once per process and shared (it never changes, and
    /// compiling ~1,500 patterns is the expensive part: tests and `adclick dev` start
    /// several collectors in one process).
    pub fn builtin() -> Result<Arc<Self>, UaListError> {
        static BUILTIN_SET: OnceLock<Arc<UaClassifier>> = OnceLock::new();
        if let Some(c) = BUILTIN_SET.get() {
            return Ok(c.clone());
        }
        let version = BUILTIN_VERSION.lines().next().unwrap_or("").trim();
        let c = Arc::new(Self::from_json(
            BUILTIN_LIST,
            &format!("builtin ({version})"),
        )?);
        Ok(BUILTIN_SET.get_or_init(|| c).clone())
    }

    /// Compiles a crawler-user-agents JSON list; `origin` names it in errors and logs.
    /// Patterns the regex crate rejects are skipped, logged and listed in
    /// [`UaClassifier::unsupported`].
    pub fn from_json(text: &str, origin: &str) -> Result<Self, UaListError> {
        let entries: Vec<Entry> = serde_json::from_str(text).map_err(|e| UaListError::Format {
            origin: origin.to_string(),
            detail: e.to_string(),
        })?;
        let patterns: Vec<String> = entries.into_iter().map(|e| e.pattern).collect();
        let total = patterns.len();
        let format = |detail: String| UaListError::Format {
            origin: origin.to_string(),
            detail,
        };
        let mut literals: Vec<Vec<u8>> = Vec::new();
        let mut regexes: Vec<String> = Vec::new();
        let mut unsupported = Vec::new();
        for p in patterns {
            let hir = match regex_syntax::Parser::new().parse(&p) {
                Ok(h) => h,
                Err(e) => {
                    unsupported.push(Unsupported {
                        error: first_line(&e.to_string()),
                        pattern: p,
                    });
                    continue;
                }
            };
            if hir.properties().minimum_len() == Some(0) {
                unsupported.push(Unsupported {
                    pattern: p,
                    error: "matches the empty string, so every User-Agent".into(),
                });
                continue;
            }
            match hir.kind() {
                HirKind::Literal(l) => literals.push(l.0.to_vec()),
                _ => regexes.push(p),
            }
        }
        // The regex patterns as one set; only when it fails is each compiled alone to
        // find the ones to skip (the parser accepts a few things the compiler refuses,
        // e.g. size limits).
        let set = match build_set(&regexes) {
            Ok(set) => set,
            Err(_) => {
                let mut good = Vec::with_capacity(regexes.len());
                for p in regexes {
                    match build_set(std::slice::from_ref(&p)) {
                        Ok(_) => good.push(p),
                        Err(e) => unsupported.push(Unsupported {
                            error: first_line(&e.to_string()),
                            pattern: p,
                        }),
                    }
                }
                build_set(&good).map_err(|e| {
                    format(format!(
                        "the {} compilable patterns fail together: {e}",
                        good.len()
                    ))
                })?
            }
        };
        let literal_count = literals.len();
        let ac = if literals.is_empty() {
            None
        } else {
            Some(
                AhoCorasick::builder()
                    .kind(Some(AhoCorasickKind::DFA))
                    .build(&literals)
                    .or_else(|_| AhoCorasick::new(&literals))
                    .map_err(|e| format(format!("literal patterns: {e}")))?,
            )
        };
        if literal_count + set.len() == 0 {
            return Err(UaListError::NoUsablePattern {
                origin: origin.to_string(),
                total,
            });
        }
        for u in &unsupported {
            tracing::warn!(list = origin, pattern = %u.pattern, error = %u.error,
                "bot User-Agent pattern not supported; skipped");
        }
        tracing::info!(
            list = origin,
            literals = literal_count,
            regexes = set.len(),
            unsupported = unsupported.len(),
            "bot User-Agent list compiled"
        );
        Ok(UaClassifier {
            enabled: true,
            literals: ac,
            literal_count,
            set: (!set.is_empty()).then_some(set),
            origin: origin.to_string(),
            unsupported,
        })
    }

    /// Whether classification is on.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Where the list came from (`builtin (crawler-user-agents 1.60.0)`, a path, or
    /// `disabled`).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Patterns in use.
    pub fn patterns(&self) -> usize {
        self.literal_count + self.set.as_ref().map_or(0, RegexSet::len)
    }

    /// Patterns skipped because the regex crate rejects them.
    pub fn unsupported(&self) -> &[Unsupported] {
        &self.unsupported
    }

    /// The class of a request's `User-Agent` header value (`None`: no header). An empty
    /// or all-blank header says nothing about the client and counts as no header.
    pub fn classify(&self, ua: Option<&[u8]>) -> UserAgentClass {
        if !self.enabled {
            return UserAgentClass::Unspecified;
        }
        let Some(ua) = ua.map(<[u8]>::trim_ascii).filter(|u| !u.is_empty()) else {
            return UserAgentClass::Unspecified;
        };
        let ua = &ua[..ua.len().min(MAX_UA_BYTES)];
        if self.literals.as_ref().is_some_and(|a| a.is_match(ua))
            || self.set.as_ref().is_some_and(|s| s.is_match(ua))
        {
            UserAgentClass::Bot
        } else {
            UserAgentClass::Client
        }
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").to_string()
}

fn build_set(patterns: &[String]) -> Result<RegexSet, regex::Error> {
    RegexSetBuilder::new(patterns)
        // An operator's list may have many non-literal patterns: room for them (spent
        // once at start).
        .size_limit(64 << 20)
        .dfa_size_limit(8 << 20)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct FullEntry {
        pattern: String,
        #[serde(default)]
        instances: Vec<String>,
    }

    fn builtin() -> UaClassifier {
        UaClassifier::from_json(BUILTIN_LIST, "builtin").unwrap()
    }

    #[test]
    fn every_vendored_pattern_compiles_or_is_known_unsupported() {
        let entries: Vec<FullEntry> = serde_json::from_str(BUILTIN_LIST).unwrap();
        let mut failing = Vec::new();
        for e in &entries {
            if regex::bytes::Regex::new(&e.pattern).is_err() {
                failing.push(e.pattern.as_str());
            }
        }
        assert_eq!(
            failing, KNOWN_UNSUPPORTED,
            "patterns the regex crate rejects must be listed in KNOWN_UNSUPPORTED"
        );
        let c = builtin();
        assert_eq!(c.patterns(), entries.len() - KNOWN_UNSUPPORTED.len());
        assert_eq!(c.unsupported().len(), KNOWN_UNSUPPORTED.len());
    }

    #[test]
    fn every_example_of_the_vendored_list_is_a_bot() {
        // The list's own examples are the oracle: each was written as a UA its pattern
        // must match.
        let entries: Vec<FullEntry> = serde_json::from_str(BUILTIN_LIST).unwrap();
        let c = builtin();
        let mut n = 0;
        for e in &entries {
            for ua in &e.instances {
                n += 1;
                assert_eq!(
                    c.classify(Some(ua.as_bytes())),
                    UserAgentClass::Bot,
                    "{ua:?} (pattern {:?})",
                    e.pattern
                );
            }
        }
        assert!(n > 1000, "the vendored list has its examples ({n})");
    }

    #[test]
    fn browsers_and_our_sdks_are_clients_and_no_header_is_unspecified() {
        let c = builtin();
        for ua in [
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
            "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.6 Safari/605.1.15",
            "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
            "Mozilla/5.0 (iPhone; CPU iPhone OS 17_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.6 Mobile/15E148 Safari/604.1",
            "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Mobile Safari/537.36",
            "adclick-rust/0.1.0",
        ] {
            assert_eq!(
                c.classify(Some(ua.as_bytes())),
                UserAgentClass::Client,
                "{ua}"
            );
        }
        assert_eq!(c.classify(None), UserAgentClass::Unspecified);
        assert_eq!(c.classify(Some(b"  ")), UserAgentClass::Unspecified);
        // Not UTF-8: still classified (bytes regexes), not refused.
        assert_eq!(
            c.classify(Some(b"Mozilla/5.0 \xff\xfe")),
            UserAgentClass::Client
        );
        assert_eq!(c.classify(Some(b"\xff Googlebot/2.1")), UserAgentClass::Bot);
    }

    #[test]
    fn the_literal_and_regex_split_agrees_with_one_regex_set_of_the_whole_list() {
        // The oracle: the straightforward compilation (every pattern in one RegexSet).
        let entries: Vec<FullEntry> = serde_json::from_str(BUILTIN_LIST).unwrap();
        let all = RegexSetBuilder::new(entries.iter().map(|e| e.pattern.as_str()))
            .size_limit(64 << 20)
            .build()
            .unwrap();
        let c = builtin();
        // Near misses: each example lower-cased and cut in half (many patterns are
        // case-sensitive literals), over a spread of the list.
        let mut inputs: Vec<String> = Vec::new();
        for e in entries.iter().step_by(5) {
            if let Some(ua) = e.instances.first() {
                inputs.push(ua.to_lowercase());
                inputs.push(ua[ua.len() / 2..].to_string());
                inputs.push(ua.to_uppercase());
            }
        }
        let (mut bots, mut clients) = (0, 0);
        for ua in &inputs {
            let want = if all.is_match(ua.as_bytes()) {
                bots += 1;
                UserAgentClass::Bot
            } else {
                clients += 1;
                UserAgentClass::Client
            };
            assert_eq!(c.classify(Some(ua.as_bytes())), want, "{ua:?}");
        }
        // Both verdicts are exercised.
        assert!(bots > 50 && clients > 50, "{bots} bots, {clients} clients");
    }

    #[test]
    fn only_the_first_512_bytes_are_matched() {
        let c = builtin();
        let pad = "x".repeat(MAX_UA_BYTES - "Googlebot/".len());
        let inside = format!("{pad}Googlebot/");
        assert_eq!(c.classify(Some(inside.as_bytes())), UserAgentClass::Bot);
        let outside = format!("{pad}xGooglebot/");
        assert_eq!(c.classify(Some(outside.as_bytes())), UserAgentClass::Client);
    }

    #[test]
    fn unsupported_patterns_are_skipped_and_listed_not_fatal() {
        let list = r#"[{"pattern":"(?=look)ahead"},{"pattern":"Good[Bb]ot"},{"pattern":"(a)\\1"},{"pattern":"x*"},{"pattern":"Plain\\/"}]"#;
        let c = UaClassifier::from_json(list, "test").unwrap();
        assert_eq!(c.patterns(), 2);
        let skipped: Vec<&str> = c.unsupported().iter().map(|u| u.pattern.as_str()).collect();
        assert_eq!(skipped, ["(?=look)ahead", "(a)\\1", "x*"]);
        assert_eq!(c.classify(Some(b"a Plain/1")), UserAgentClass::Bot);
        assert_eq!(c.classify(Some(b"a GoodBot")), UserAgentClass::Bot);
        assert_eq!(c.classify(Some(b"aa lookahead")), UserAgentClass::Client);
    }

    #[test]
    fn bad_lists_are_errors_naming_the_list() {
        for (text, want) in [
            ("{", "not a crawler-user-agents list"),
            (r#"[{"url":"x"}]"#, "not a crawler-user-agents list"),
            (
                r#"[{"pattern":"(?=x)"}]"#,
                "none of its 1 patterns compiles",
            ),
            ("[]", "none of its 0 patterns compiles"),
        ] {
            let e = UaClassifier::from_json(text, "/etc/bots.json").unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.contains(want) && msg.contains("/etc/bots.json"),
                "{msg}"
            );
        }
    }

    #[test]
    fn disabled_classifies_nothing() {
        let c = UaClassifier::from_config(&UserAgentConfig {
            classify: false,
            bot_list: BUILTIN.into(),
        })
        .unwrap();
        assert!(!c.enabled());
        assert_eq!(
            c.classify(Some(b"Googlebot/2.1")),
            UserAgentClass::Unspecified
        );
    }

    #[test]
    fn an_operator_file_replaces_the_builtin_list() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bots.json");
        std::fs::write(&path, r#"[{"pattern":"^InHouseProbe/"}]"#).unwrap();
        let c = UaClassifier::from_config(&UserAgentConfig {
            classify: true,
            bot_list: path.display().to_string(),
        })
        .unwrap();
        assert_eq!(c.patterns(), 1);
        assert_eq!(c.classify(Some(b"InHouseProbe/1")), UserAgentClass::Bot);
        assert_eq!(c.classify(Some(b"Googlebot/2.1")), UserAgentClass::Client);
        let missing = UaClassifier::from_config(&UserAgentConfig {
            classify: true,
            bot_list: dir.path().join("nope.json").display().to_string(),
        })
        .unwrap_err();
        assert!(missing.to_string().contains("cannot read"), "{missing}");
    }
}

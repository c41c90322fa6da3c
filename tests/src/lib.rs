//! adclick end-to-end tests. Nothing to link: the scenarios live in `tests/e2e.rs` (one
//! module per scenario) and drive the real SDK, collectors, aggregator and `adclick`
//! binary over sockets and files. Run them with `cargo test -p adclick-e2e`.

//! README.md, run as written (issue 17 item 7): every ```sh block of the README is either
//! run here or skip-listed in the README itself with the reason, and an unmarked block
//! fails this test, so a new example cannot slip in untested.
//!
//! The marker is an HTML comment (invisible on GitHub) on the line right above the fence:
//!
//! - `<!-- readme-test: dev -->` runs the block while `adclick dev --no-traffic` serves on
//!   its default ports (collector 8080, aggregator gRPC 9090 and HTTP 9091), started by this
//!   test from the block's directory, exactly as a reader's first terminal would.
//! - `<!-- readme-test: alone -->` runs it with no server of ours running (the block may
//!   start its own on the default ports; whatever it leaves running is stopped afterwards).
//! - `<!-- readme-test: deployed -->` runs it while `adclick aggregator --config
//!   aggregator.toml` and `adclick collector --config collector.toml` serve, started from
//!   the files that the README's "Run it outside `adclick dev`" block wrote: the servers a
//!   reader who pasted that block has running in the background.
//! - `streams` (e.g. `<!-- readme-test: dev, streams -->`): the block's last command runs
//!   until Ctrl-C (a watch, an SSE stream). It must print something and still be running
//!   after a few seconds; it is then stopped like Ctrl-C stops it.
//! - `<!-- readme-test: skip: <reason> -->` is not run; the reason is mandatory.
//!
//! Blocks run in README order, in one scratch directory (what one reader pasting them in
//! order gets), which holds `config/`, `scripts/` and `examples/` of the repository and
//! `target/release/adclick`, and with `adclick` on PATH: the binary under test is the
//! debug build, standing in for the release build that the README's first command makes.
//! Each block runs under `bash -e -o pipefail`, so every command must succeed; `curl` is
//! run with `--fail-with-body` added, so an HTTP error (401, 404, 500) fails the block
//! instead of printing an error body that nobody reads.
//!
//! The default ports must be free: stop a running `adclick dev` before the tests.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{adclick_bin, repo_root};

/// The default ports of `adclick dev` and of `config/*.toml`, which the README's commands
/// name literally.
const PORTS: [u16; 4] = [8080, 9090, 9091, 9290];

/// How long one block may run before it counts as hung.
const BLOCK_LIMIT: Duration = Duration::from_secs(180);

/// How long a `streams` block must keep streaming.
const STREAM_FOR: Duration = Duration::from_secs(4);

#[derive(Debug, Clone, PartialEq)]
enum Mode {
    Dev,
    Alone,
    Deployed,
    Skip(String),
}

#[derive(Debug)]
struct Block {
    /// 1-based line of the opening fence.
    line: usize,
    mode: Mode,
    streams: bool,
    text: String,
}

/// Every ```sh / ```bash / ```shell block with its marker; unmarked or badly marked blocks
/// are returned as errors naming their line.
fn blocks(readme: &str) -> (Vec<Block>, Vec<String>) {
    let lines: Vec<&str> = readme.lines().collect();
    let (mut out, mut errors) = (Vec::new(), Vec::new());
    let mut i = 0;
    while i < lines.len() {
        let fence = lines[i].trim_start();
        if !fence.starts_with("```") {
            i += 1;
            continue;
        }
        let lang = fence.trim_start_matches('`').trim();
        let start = i;
        i += 1;
        let body_start = i;
        while i < lines.len() && !lines[i].trim_start().starts_with("```") {
            i += 1;
        }
        let text = lines[body_start..i.min(lines.len())].join("\n");
        i += 1;
        if !matches!(lang, "sh" | "bash" | "shell" | "console") {
            continue;
        }
        let marker = start
            .checked_sub(1)
            .map(|p| lines[p].trim())
            .and_then(|l| l.strip_prefix("<!-- readme-test:"))
            .and_then(|l| l.strip_suffix("-->"))
            .map(str::trim);
        let Some(marker) = marker else {
            errors.push(format!(
                "README.md:{}: ```{lang} block without a `<!-- readme-test: dev|alone|deployed|skip: why -->` line above it",
                start + 1
            ));
            continue;
        };
        let (mode, streams) = if let Some(why) = marker.strip_prefix("skip:") {
            if why.trim().is_empty() {
                errors.push(format!("README.md:{}: skip without a reason", start + 1));
                continue;
            }
            (Mode::Skip(why.trim().to_string()), false)
        } else {
            let mut words = marker.split(',').map(str::trim);
            let mode = match words.next() {
                Some("dev") => Mode::Dev,
                Some("alone") => Mode::Alone,
                Some("deployed") => Mode::Deployed,
                other => {
                    errors.push(format!(
                        "README.md:{}: unknown readme-test mode {other:?}",
                        start + 1
                    ));
                    continue;
                }
            };
            let mut streams = false;
            for w in words {
                match w {
                    "streams" => streams = true,
                    other => errors.push(format!(
                        "README.md:{}: unknown readme-test option {other:?}",
                        start + 1
                    )),
                }
            }
            (mode, streams)
        };
        out.push(Block {
            line: start + 1,
            mode,
            streams,
            text,
        });
    }
    (out, errors)
}

/// A process group started by this test, SIGTERMed (then SIGKILLed) when dropped, so a
/// block's background servers never outlive it.
struct Group(Child);

impl Group {
    fn spawn(cmd: &mut Command) -> Group {
        cmd.process_group(0);
        Group(cmd.spawn().expect("cannot start a process"))
    }

    fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args(["-s", sig, "--", &format!("-{}", self.0.id())])
            .stderr(Stdio::null())
            .status();
    }

    fn stop(&mut self) {
        self.signal("TERM");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.signal("KILL");
        let _ = self.0.wait();
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.stop();
    }
}

fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

/// True once `GET /readyz` on `port` answers 200.
fn ready(port: u16) -> bool {
    use std::io::Write;
    let Ok(mut s) = TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(500),
    ) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /readyz HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 200")
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The scratch directory a reader works in: the repository's config/, scripts/ and
/// examples/, the binary as `target/release/adclick` and on PATH, and a `curl` that fails
/// on HTTP errors.
fn scratch(dir: &Path) -> String {
    let root = repo_root();
    for d in ["config", "scripts", "examples"] {
        std::os::unix::fs::symlink(root.join(d), dir.join(d)).unwrap();
    }
    let bin = adclick_bin();
    std::fs::create_dir_all(dir.join("target/release")).unwrap();
    std::os::unix::fs::symlink(&bin, dir.join("target/release/adclick")).unwrap();
    let path_dir = dir.join(".readme-bin");
    std::fs::create_dir_all(&path_dir).unwrap();
    std::os::unix::fs::symlink(&bin, path_dir.join("adclick")).unwrap();
    let real_curl = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|p| p.join("curl"))
        .find(|p| p.exists())
        .expect("curl is not on PATH (apt-get install curl)");
    let shim = path_dir.join("curl");
    std::fs::write(
        &shim,
        format!(
            "#!/bin/sh\nexec {} --fail-with-body \"$@\"\n",
            real_curl.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = std::env::var("PATH").unwrap_or_default();
    format!("{}:{path}", path_dir.display())
}

/// Runs one block; returns its combined output, or an error saying why it failed.
fn run_block(block: &Block, dir: &Path, path: &str) -> Result<String, String> {
    let log = dir.join(format!(".readme-block-{}.log", block.line));
    let out = std::fs::File::create(&log).unwrap();
    let mut cmd = Command::new("bash");
    cmd.args(["-e", "-o", "pipefail", "-c", &block.text])
        .current_dir(dir)
        .env("PATH", path)
        .env("NO_COLOR", "1")
        // The project's venv, as for a reader in the repository (scripts/ here is a link,
        // and the setup scripts would otherwise fill a venv in the scratch directory).
        .env("ADCLICK_VENV", repo_root().join(".venv"))
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    let mut group = Group::spawn(&mut cmd);
    let started = Instant::now();
    let limit = BLOCK_LIMIT;
    let status = loop {
        if let Ok(Some(status)) = group.0.try_wait() {
            break Some(status);
        }
        if block.streams && started.elapsed() >= STREAM_FOR {
            // Still running: the stream is alive. Stop it only once it has printed.
            let printed = std::fs::read_to_string(&log).unwrap_or_default();
            if !printed.trim().is_empty() {
                break None;
            }
        }
        if started.elapsed() > limit {
            group.stop();
            let printed = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(format!("still running after {limit:?}:\n{printed}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    group.stop();
    let printed = std::fs::read_to_string(&log).unwrap_or_default();
    match status {
        None => Ok(printed),
        Some(s) if s.success() && !block.streams => Ok(printed),
        Some(s) if s.success() => Err(format!(
            "a `streams` block ended by itself (exit 0) instead of streaming:\n{printed}"
        )),
        Some(s) => Err(format!("exited with {s}:\n{printed}")),
    }
}

/// The last lines of each server's log, for a failure message (the scratch directory goes
/// away with the test).
fn server_logs(dir: &Path) -> String {
    let mut out = String::new();
    for role in ["dev", "aggregator", "collector"] {
        if let Ok(log) = std::fs::read_to_string(dir.join(format!(".readme-{role}.log"))) {
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(20)..].join("\n");
            out.push_str(&format!("--- adclick {role} (last 20 lines)\n{tail}\n"));
        }
    }
    out
}

#[test]
fn every_readme_shell_block_runs_as_written_or_says_why_not() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let (blocks, errors) = blocks(&readme);
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    assert!(
        blocks
            .iter()
            .filter(|b| !matches!(b.mode, Mode::Skip(_)))
            .count()
            > 3,
        "the README lost its examples"
    );
    for p in PORTS {
        assert!(
            !port_open(p),
            "port {p} is taken: stop `adclick dev` (or whatever listens there) before the tests"
        );
    }

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let path = scratch(dir);
    // What serves on the default ports now: nothing, `adclick dev`, or the deployed pair.
    let mut serving: (Mode, Vec<Group>) = (Mode::Alone, Vec::new());
    let mut ran = 0;
    for block in &blocks {
        if let Mode::Skip(why) = &block.mode {
            eprintln!("README.md:{}: skipped: {why}", block.line);
            continue;
        }
        if serving.0 != block.mode {
            for mut g in serving.1.drain(..) {
                g.stop();
            }
            wait_until("the default ports free", Duration::from_secs(20), || {
                PORTS.iter().all(|p| !port_open(*p))
            });
            let servers: &[&[&str]] = match block.mode {
                Mode::Dev => &[&["dev", "--no-traffic"]],
                Mode::Deployed => &[
                    &["aggregator", "--config", "aggregator.toml"],
                    &["collector", "--config", "collector.toml"],
                ],
                _ => &[],
            };
            for args in servers {
                let log =
                    std::fs::File::create(dir.join(format!(".readme-{}.log", args[0]))).unwrap();
                let mut cmd = Command::new(adclick_bin());
                cmd.args(*args)
                    .current_dir(dir)
                    .env("NO_COLOR", "1")
                    .stdin(Stdio::null())
                    .stdout(log.try_clone().unwrap())
                    .stderr(log);
                serving.1.push(Group::spawn(&mut cmd));
            }
            if !servers.is_empty() {
                wait_until(
                    &format!("{:?} ready (logs: {})", block.mode, dir.display()),
                    Duration::from_secs(60),
                    || ready(8080) && ready(9091),
                );
            }
            serving.0 = block.mode.clone();
        }
        eprintln!("README.md:{}: running ({:?})", block.line, block.mode);
        match run_block(block, dir, &path) {
            Ok(out) => {
                eprintln!("{out}");
                ran += 1;
            }
            Err(why) => panic!(
                "README.md:{}: the block\n{}\nfailed: {why}\n{}",
                block.line,
                block.text,
                server_logs(dir)
            ),
        }
    }
    drop(serving);
    eprintln!("{ran} README blocks ran");
}

#[test]
fn markers_are_parsed_and_unmarked_blocks_refused() {
    let readme = "text\n<!-- readme-test: dev, streams -->\n```sh\necho a\n```\n\n```sh\necho b\n```\n<!-- readme-test: skip: -->\n```bash\nx\n```\n<!-- readme-test: skip: needs a phone -->\n```sh\ny\n```\n```toml\nnot = \"shell\"\n```\n";
    let (blocks, errors) = blocks(readme);
    assert_eq!(blocks.len(), 2);
    assert_eq!(blocks[0].mode, Mode::Dev);
    assert!(blocks[0].streams);
    assert_eq!(blocks[0].text, "echo a");
    assert_eq!(blocks[1].mode, Mode::Skip("needs a phone".into()));
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors[0].starts_with("README.md:7:"), "{errors:?}");
    assert!(errors[1].contains("skip without a reason"), "{errors:?}");
}

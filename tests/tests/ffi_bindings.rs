//! The mobile / foreign-language SDK (`sdk-ffi`, UniFFI) through its generated bindings,
//! against a real `adclick dev --no-traffic` (issue 18 item 2):
//! - Python (`sdk-ffi/tests/python/client.py`) and Kotlin on the JVM
//!   (`sdk-ffi/tests/kotlin/Main.kt`, compiled once with kotlinc, JNA loading the cdylib)
//!   run the same scenario: every click counted exactly once by the aggregator (a duplicate
//!   click and an invalid token included), the offline queue surviving a process restart
//!   (clicks tracked in one process while the collector is down, delivered by the next
//!   process on the same queue directory, counted exactly), and consent (held, sent once
//!   given, discarded once withdrawn);
//! - Swift: the bindings are generated; a Swift toolchain is not installable on these
//!   machines (Debian 12 packages none), so they are parsed only where `swiftc` exists.
//!
//! The cdylib and `uniffi-bindgen` are built once per run (`cargo build -p adclick-ffi`)
//! and the bindings generated from the library into `<target>/debug/ffi-bindings/`.
//! Python is the project venv's (`.venv/bin/python`) or `python3`; Kotlin comes from
//! `scripts/setup-kotlin.sh` (JDK + JNA from Debian, kotlinc from npm; run by `.ci/run`
//! first, and here again: it is idempotent). A missing tool fails the test, loudly.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use adclick_test_support::child::{ChildServer, adclick_bin, cargo_build};
use adclick_test_support::common::{free_addr, repo_root, stdlib_python};

/// Where the generated bindings and a copy of the cdylib are.
struct Bindings {
    /// `adclick_ffi.py`, `adclick_ffi.swift`, `adclick_ffiFFI.h`, `uniffi/adclick_ffi/adclick_ffi.kt`
    /// and `libadclick_ffi.so`.
    dir: PathBuf,
}

fn bindings() -> &'static Bindings {
    static B: OnceLock<Bindings> = OnceLock::new();
    B.get_or_init(|| {
        let debug = cargo_build(&["-p", "adclick-ffi", "--lib", "--bin", "uniffi-bindgen"]);
        let lib = debug.join(format!(
            "{}adclick_ffi{}",
            std::env::consts::DLL_PREFIX,
            std::env::consts::DLL_SUFFIX
        ));
        assert!(lib.exists(), "{} missing after the build", lib.display());
        let dir = debug.join("ffi-bindings");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let out = Command::new(debug.join("uniffi-bindgen"))
            .args(["generate", "--library"])
            .arg(&lib)
            .args([
                "--language",
                "python",
                "--language",
                "kotlin",
                "--language",
                "swift",
                "--no-format",
                "--metadata-no-deps",
                "--out-dir",
            ])
            .arg(&dir)
            .current_dir(repo_root())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "uniffi-bindgen generate failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::copy(&lib, dir.join(lib.file_name().unwrap())).unwrap();
        Bindings { dir }
    })
}

/// `adclick dev --no-traffic` on free ports, in a temp dir.
struct Dev {
    _server: ChildServer,
    dir: tempfile::TempDir,
    collector: String,
    grpc: String,
    admin: String,
}

fn http_ok(addr: &str, path: &str) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .is_err()
    {
        return false;
    }
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.starts_with("HTTP/1.1 200") || buf.starts_with("HTTP/1.0 200")
}

fn start_dev() -> Dev {
    let dir = tempfile::tempdir().unwrap();
    let (col, grpc, query) = (free_addr(), free_addr(), free_addr());
    let data = dir.path().join("dev");
    let server = ChildServer::spawn_args(
        [
            "dev".as_ref(),
            "--no-traffic".as_ref(),
            "--data-dir".as_ref(),
            data.as_os_str(),
            "--collector-port".as_ref(),
            col.port().to_string().as_ref(),
            "--grpc-port".as_ref(),
            grpc.port().to_string().as_ref(),
            "--query-port".as_ref(),
            query.port().to_string().as_ref(),
        ] as [&std::ffi::OsStr; 10],
        &[],
        &dir.path().join("dev.log"),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let col = col.to_string();
    while !(http_ok(&col, "/healthz") && data.join("admin.key").exists()) {
        assert!(
            Instant::now() < deadline,
            "adclick dev did not come up; log:\n{}",
            server.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let admin = std::fs::read_to_string(data.join("admin.key"))
        .unwrap()
        .trim()
        .to_string();
    Dev {
        _server: server,
        dir,
        collector: format!("http://{col}"),
        grpc: format!("http://{grpc}"),
        admin,
    }
}

fn run_ok(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

impl Dev {
    /// `n` fresh tokens for `ad` (one impression each), written to a file.
    fn tokens(&self, ad: u64, n: usize) -> PathBuf {
        let out = run_ok(
            Command::new(adclick_bin())
                .args(["impression", "mint", "--keys"])
                .arg(self.dir.path().join("dev/keys.toml"))
                .args([
                    "--ad",
                    &ad.to_string(),
                    "--advertiser",
                    "7",
                    "--campaign",
                    "1",
                ])
                .args(["--landing-url", "https://example.com/x", "--ttl", "1h"])
                .args(["--count", &n.to_string()]),
            "adclick impression mint",
        );
        assert_eq!(out.lines().count(), n, "{out}");
        let path = self.dir.path().join(format!("tokens-{ad}.txt"));
        std::fs::write(&path, out).unwrap();
        path
    }

    /// The aggregator's count of `ad` over the last 30 minutes.
    fn count(&self, ad: u64) -> u64 {
        let out = run_ok(
            Command::new(adclick_bin())
                .args(["query", "clicks", "--ad", &ad.to_string(), "--last", "30m"])
                .args(["--json", "--endpoint", &self.grpc, "--api-key", &self.admin]),
            "adclick query clicks",
        );
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["total_clicks"].as_u64().unwrap()
    }

    /// Waits until the aggregator counts `want` clicks of `ad` (the pipeline takes a
    /// moment), then checks that no more arrive.
    fn expect_count(&self, ad: u64, want: u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut got = self.count(ad);
        while got != want && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(250));
            got = self.count(ad);
        }
        std::thread::sleep(Duration::from_secs(1));
        let got = self.count(ad);
        assert_eq!(got, want, "ad {ad}: aggregator counted {got}, sent {want}");
    }
}

/// `key=value` fields of the `tag` line of a client's output.
fn fields(out: &str, tag: &str) -> std::collections::HashMap<String, String> {
    let line = out
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix(tag)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no `{tag}` line in:\n{out}"));
    line.split(' ')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn stat(out: &str, key: &str) -> u64 {
    fields(out, "stats")[key].parse().unwrap()
}

/// Runs the same scenario through a client program (`run(args)`): exact counts, the
/// offline queue across a process restart, consent. `ad0` picks the ads.
fn scenario(dev: &Dev, ad0: u64, run: &dyn Fn(&[&str]) -> String) {
    let tmp = dev.dir.path();
    let path = |p: &Path| p.to_str().unwrap().to_string();

    // Every click counted once: 60 distinct impressions (one clicked twice) in 3 batches.
    let n = 60;
    let toks = dev.tokens(ad0, n);
    let out = run(&[
        "send",
        &dev.collector,
        &path(&tmp.join("q-send")),
        &path(&toks),
    ]);
    assert_eq!(stat(&out, "sent"), n as u64 + 1, "{out}");
    assert_eq!(stat(&out, "invalid"), 1, "{out}");
    dev.expect_count(ad0, n as u64);

    // Offline: tracked while the collector is down, in one process...
    let n = 40;
    let toks = dev.tokens(ad0 + 1, n);
    let queue = tmp.join("q-offline");
    let down = format!("http://{}", free_addr());
    let out = run(&["offline", &down, &path(&queue), &path(&toks)]);
    assert_eq!(
        (stat(&out, "pending"), stat(&out, "sent")),
        (n as u64, 0),
        "{out}"
    );
    assert!(
        std::fs::metadata(queue.join("clicks.log")).unwrap().len() > 0,
        "the clicks are not on disk"
    );
    assert_eq!(dev.count(ad0 + 1), 0);
    // ... delivered by the next one.
    let out = run(&["resume", &dev.collector, &path(&queue)]);
    assert_eq!(
        (stat(&out, "restored"), stat(&out, "sent")),
        (n as u64, n as u64),
        "{out}"
    );
    dev.expect_count(ad0 + 1, n as u64);

    // Consent: 2 clicks held then sent, a third discarded after withdrawal.
    let toks = dev.tokens(ad0 + 2, 3);
    let out = run(&[
        "consent",
        &dev.collector,
        &path(&tmp.join("q-consent")),
        &path(&toks),
    ]);
    assert_eq!(
        (stat(&out, "sent"), stat(&out, "dropped_consent")),
        (2, 1),
        "{out}"
    );
    dev.expect_count(ad0 + 2, 2);
}

fn python() -> PathBuf {
    stdlib_python("the Python binding test")
}

#[test]
fn python_bindings_count_exactly_and_keep_clicks_across_a_restart() {
    let b = bindings();
    let dev = start_dev();
    let client = repo_root().join("sdk-ffi/tests/python/client.py");
    scenario(&dev, 910_001, &|args| {
        run_ok(
            Command::new(python())
                .arg(&client)
                .args(args)
                .env("PYTHONPATH", &b.dir),
            &format!("python client.py {}", args[0]),
        )
    });
}

#[test]
fn kotlin_bindings_on_the_jvm_count_exactly_and_keep_clicks_across_a_restart() {
    let b = bindings();
    let setup = Command::new("bash")
        .arg(repo_root().join("scripts/setup-kotlin.sh"))
        .output()
        .unwrap();
    assert!(
        setup.status.success(),
        "scripts/setup-kotlin.sh failed: the Kotlin bindings cannot be tested\n{}",
        String::from_utf8_lossy(&setup.stderr)
    );
    let kotlinc = String::from_utf8_lossy(&setup.stdout).trim().to_string();
    let jna = "/usr/share/java/jna.jar";
    // One compile (kotlinc is slow): the bindings and the client into one jar.
    let jar = b.dir.join("client.jar");
    let started = Instant::now();
    run_ok(
        Command::new(&kotlinc)
            .arg(b.dir.join("uniffi/adclick_ffi/adclick_ffi.kt"))
            .arg(repo_root().join("sdk-ffi/tests/kotlin/Main.kt"))
            .args(["-cp", jna, "-include-runtime", "-nowarn", "-d"])
            .arg(&jar),
        "kotlinc",
    );
    // For the CI log (the cost of this test is mostly this compile).
    eprintln!(
        "kotlinc: bindings + client compiled in {:?}",
        started.elapsed()
    );
    let dev = start_dev();
    scenario(&dev, 920_001, &|args| {
        run_ok(
            Command::new("java")
                .arg(format!("-Djna.library.path={}", b.dir.display()))
                .arg("-cp")
                .arg(format!("{}:{jna}", jar.display()))
                .arg("MainKt")
                .args(args),
            &format!("java MainKt {}", args[0]),
        )
    });
}

#[test]
fn swift_bindings_are_generated() {
    let b = bindings();
    let swift = std::fs::read_to_string(b.dir.join("adclick_ffi.swift")).unwrap();
    for needle in [
        "open class Tracker",
        "func trackClick(token: String, dims: ClickDimensions) throws",
        "func flush(callback: FlushCallback)",
        "func setConsent(granted: Bool)",
        "public struct TrackerConfig",
    ] {
        assert!(swift.contains(needle), "adclick_ffi.swift lacks `{needle}`");
    }
    let header = std::fs::read_to_string(b.dir.join("adclick_ffiFFI.h")).unwrap();
    assert!(header.contains("uniffi_adclick_ffi_fn_method_tracker_track_click"));
    assert!(b.dir.join("adclick_ffiFFI.modulemap").exists());
    // Syntax check where a Swift toolchain exists (none is packaged for Debian 12, the
    // machines CI runs on: said in README "Mobile").
    match Command::new("swiftc").arg("--version").output() {
        Ok(o) if o.status.success() => {
            run_ok(
                Command::new("swiftc")
                    .arg("-parse")
                    .arg(b.dir.join("adclick_ffi.swift")),
                "swiftc -parse adclick_ffi.swift",
            );
        }
        _ => eprintln!(
            "swiftc not found: adclick_ffi.swift generated and checked for its API, not parsed"
        ),
    }
}

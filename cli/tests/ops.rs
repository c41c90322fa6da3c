//! Operator-facing behaviour of the real `adclick` binary (issue 17): log formats, `--check`,
//! the deploy/ artefacts and `adclick top`. One test binary, one module per concern.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: failing loudly is the point

mod support {
    use std::io::{BufRead, BufReader};
    use std::path::Path;
    use std::process::{Child, ChildStderr, Command, Output, Stdio};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    pub fn bin() -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_adclick"));
        // The tests decide the format and the filter themselves.
        c.env_remove("ADCLICK_LOG_FORMAT").env_remove("RUST_LOG");
        c
    }

    pub fn run(args: &[&str]) -> Output {
        bin().args(args).output().unwrap()
    }

    /// `adclick keys new --out dir/keys.toml` (mode 0600).
    pub fn keys(dir: &Path) -> std::path::PathBuf {
        let path = dir.join("keys.toml");
        let out = run(&["keys", "new", "--out", path.to_str().unwrap()]);
        assert!(out.status.success(), "{out:?}");
        path
    }

    /// `GET http://{addr}{path}` over a plain TCP socket: (status, body).
    pub fn http_get(addr: &str, path: &str) -> (u16, String) {
        http_get_with(addr, path, "")
    }

    /// The same with extra header lines (each ending in CRLF).
    pub fn http_get_with(addr: &str, path: &str, headers: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nhost: {addr}\r\n{headers}connection: close\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let status = text[9..12].parse().unwrap();
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }

    /// `N` distinct free loopback ports (bound, then released; see `adclick_devtools::ports`).
    pub fn free_ports<const N: usize>() -> [u16; N] {
        std::array::from_fn(|_| adclick_devtools::ports::free_port().unwrap())
    }

    /// `adclick dev --no-traffic` on free ports in a temp data dir, until dropped.
    pub struct Dev {
        pub run: Running,
        pub dir: tempfile::TempDir,
        pub collector: String,
        pub http: String,
    }

    pub fn dev() -> Dev {
        let dir = tempfile::tempdir().unwrap();
        let [c, g, h] = free_ports::<3>();
        let mut cmd = bin();
        cmd.args(["dev", "--no-traffic", "--duration", "10m", "--data-dir"])
            .arg(dir.path().join("dev"))
            .args([
                "--collector-port",
                &c.to_string(),
                "--grpc-port",
                &g.to_string(),
            ])
            .args(["--query-port", &h.to_string()]);
        let mut run = spawn(cmd);
        let out = run.out.take().unwrap();
        // The banner is on stdout: wait until the servers answer instead.
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut { out }, &mut std::io::sink());
        });
        let dev = Dev {
            run,
            dir,
            collector: format!("127.0.0.1:{c}"),
            http: format!("127.0.0.1:{h}"),
        };
        let end = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(&dev.collector).is_err() {
            assert!(
                Instant::now() < end,
                "dev did not start: {:?}",
                dev.run.seen
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        dev
    }

    impl Dev {
        pub fn data(&self) -> std::path::PathBuf {
            self.dir.path().join("dev")
        }
    }

    /// `adclick keys new --force --out dir/keys.toml`.
    pub fn keys_force(dir: &Path) {
        let path = dir.join("keys.toml");
        let out = run(&["keys", "new", "--force", "--out", path.to_str().unwrap()]);
        assert!(out.status.success(), "{out:?}");
    }

    /// A child whose stderr lines arrive on a channel (read by a thread), stdout piped too.
    pub struct Running {
        pub child: Child,
        /// Its stdout, until taken.
        pub out: Option<std::process::ChildStdout>,
        pub lines: mpsc::Receiver<String>,
        pub seen: Vec<String>,
    }

    pub fn spawn(mut cmd: Command) -> Running {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let err: ChildStderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Running {
            out: child.stdout.take(),
            child,
            lines: rx,
            seen: Vec::new(),
        }
    }

    impl Running {
        /// Waits (at most 60 s) for a stderr line matching `f`; returns it.
        pub fn wait_line(&mut self, f: impl Fn(&str) -> bool) -> String {
            let end = Instant::now() + Duration::from_secs(60);
            loop {
                let left = end.saturating_duration_since(Instant::now());
                match self.lines.recv_timeout(left) {
                    Ok(l) => {
                        self.seen.push(l.clone());
                        if f(&l) {
                            return l;
                        }
                    }
                    Err(_) => panic!("no such line; stderr so far:\n{}", self.seen.join("\n")),
                }
            }
        }

        /// SIGTERM, wait for the exit, and return every stderr line and stdout.
        pub fn stop(mut self) -> (Vec<String>, String) {
            adclick_devtools::process::terminate(self.child.id()).unwrap();
            let status = self.child.wait().unwrap();
            assert!(status.success(), "exit {status}");
            let mut out = String::new();
            if let Some(mut o) = self.out.take() {
                std::io::Read::read_to_string(&mut o, &mut out).unwrap();
            }
            // The reader thread ends at EOF: take everything it read.
            while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(10)) {
                self.seen.push(l);
            }
            (std::mem::take(&mut self.seen), out)
        }
    }

    impl Drop for Running {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

mod logs {
    use super::support::*;
    use serde_json::Value;

    fn collector_toml(dir: &std::path::Path) -> std::path::PathBuf {
        let keys = keys(dir);
        let path = dir.join("collector.toml");
        std::fs::write(
            &path,
            format!(
                "collector_id = \"c-logs\"\nlisten_http = \"127.0.0.1:0\"\n\
                 data_dir = {:?}\nkeys_file = {:?}\n\
                 aggregators = [\"http://127.0.0.1:1\"]\n\
                 aggregator_key = \"0123456789abcdef0123456789abcdef\"\n",
                dir.join("data"),
                keys
            ),
        )
        .unwrap();
        path
    }

    /// Off a terminal (stderr piped) a collector logs one JSON object per line: every line
    /// parses, carries timestamp/level/target/message and the process's role and
    /// collector_id, library events included; no escape codes anywhere.
    #[test]
    fn json_by_default_off_a_terminal() {
        let dir = tempfile::tempdir().unwrap();
        let config = collector_toml(dir.path());
        let mut cmd = bin();
        cmd.args(["collector", "--config", config.to_str().unwrap()]);
        let mut c = spawn(cmd);
        let listening = c.wait_line(|l| l.contains("listening on"));
        let v: Value = serde_json::from_str(&listening).unwrap();
        assert_eq!(v["target"], "adclick::lifecycle", "{v}");
        assert_eq!(v["level"], "INFO");
        assert!(v["http"].as_str().unwrap().starts_with("127.0.0.1:"), "{v}");
        let (lines, stdout) = c.stop();
        assert!(stdout.is_empty(), "stdout: {stdout}");
        assert!(lines.len() >= 4, "{lines:#?}");
        let mut library = 0;
        for l in &lines {
            assert!(l.starts_with("{\"timestamp\":"), "fixed fields first: {l}");
            assert!(!l.contains('\u{1b}'), "escape code in {l:?}");
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            let o = v.as_object().unwrap();
            for k in ["timestamp", "level", "target", "message"] {
                assert!(o[k].is_string(), "{k} in {l}");
            }
            assert!(
                ["ERROR", "WARN", "INFO"].contains(&o["level"].as_str().unwrap()),
                "{l}"
            );
            assert_eq!(o["role"], "collector", "{l}");
            let id = o["collector_id"].as_str().unwrap_or_else(|| panic!("{l}"));
            assert!(id.starts_with("c-logs"), "{l}");
            if o["target"]
                .as_str()
                .unwrap()
                .starts_with("adclick_collector")
            {
                library += 1;
            }
        }
        assert!(
            library >= 2,
            "spool recovered, collector started: {lines:#?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.contains("\"message\":\"spool recovered\"")
                    && l.contains("\"pending_records\":0")),
            "event fields are typed JSON values: {lines:#?}"
        );
        assert!(lines.iter().any(|l| l.contains("shutting down")));
    }

    /// `--log-format text` off a terminal: human lines, no escape codes; RUST_LOG filters
    /// (warn hides the library's INFO events, the lifecycle lines stay).
    #[test]
    fn text_has_no_escape_codes_and_rust_log_filters() {
        let dir = tempfile::tempdir().unwrap();
        let config = collector_toml(dir.path());
        let mut cmd = bin();
        cmd.args(["--log-format", "text", "collector", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn");
        let mut c = spawn(cmd);
        c.wait_line(|l| l.contains("listening on"));
        let (lines, _) = c.stop();
        for l in &lines {
            assert!(!l.contains('\u{1b}'), "escape code in {l:?}");
            assert!(serde_json::from_str::<Value>(l).is_err(), "{l}");
        }
        assert!(
            lines
                .iter()
                .any(|l| l.contains(" INFO adclick::lifecycle: adclick collector c-logs-")),
            "{lines:#?}"
        );
        assert!(
            !lines.iter().any(|l| l.contains("spool recovered")),
            "RUST_LOG=warn hides INFO: {lines:#?}"
        );

        // A per-crate directive brings that crate's INFO lines back (JSON this time).
        let mut cmd = bin();
        cmd.args(["collector", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn,adclick_collector=info");
        let mut c = spawn(cmd);
        c.wait_line(|l| l.contains("listening on"));
        let (lines, _) = c.stop();
        assert!(
            lines.iter().any(|l| l.contains("spool recovered")),
            "{lines:#?}"
        );
    }

    /// A server that cannot start says why in one JSON line (ERROR); a tool keeps its plain
    /// `error:` line.
    #[test]
    fn a_failed_start_is_one_json_error_line() {
        let out = run(&["collector", "--config", "/nonexistent/collector.toml"]);
        assert!(!out.status.success());
        let err = String::from_utf8(out.stderr).unwrap();
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{err}");
        let v: Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(v["level"], "ERROR");
        assert_eq!(v["role"], "collector");
        let m = v["message"].as_str().unwrap();
        assert!(
            m.contains("cannot read config file /nonexistent/collector.toml"),
            "{m}"
        );
        assert_eq!(m.matches("No such file or directory").count(), 1, "{m}");
        let out = run(&["keys", "list", "--keys", "/nonexistent/keys.toml"]);
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.starts_with("error: "), "{err}");
    }
}

mod check {
    use super::support::*;
    use std::path::Path;

    fn chmod(p: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// A collector config in `dir` with only relative paths (data dir, keys file).
    fn collector_config(dir: &Path, port: u16) -> std::path::PathBuf {
        keys(dir);
        let path = dir.join("collector.toml");
        std::fs::write(
            &path,
            format!(
                "collector_id = \"c-check\"\nlisten_http = \"127.0.0.1:{port}\"\n\
                 data_dir = \"state/collector\"\nkeys_file = \"keys.toml\"\n\
                 aggregator_key = \"0123456789abcdef0123456789abcdef\"\n"
            ),
        )
        .unwrap();
        chmod(&path, 0o600);
        path
    }

    fn check(config: &Path, role: &str, cwd: &Path) -> (bool, String, String) {
        let out = bin()
            .current_dir(cwd)
            .args([role, "--check", "--config"])
            .arg(config)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    }

    /// --check passes on a good config, names each finding, prints the effective config
    /// with the secret redacted and the relative paths resolved against the config file's
    /// directory (not the working directory, which is elsewhere here).
    #[test]
    fn collector_check_resolves_relative_paths_and_redacts() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let config = collector_config(dir.path(), 0);
        let (ok, out, err) = check(&config, "collector", elsewhere.path());
        assert!(ok, "{out}\n{err}");
        let d = dir.path().display();
        assert!(
            out.contains(&format!("ok       config {}: valid", config.display())),
            "{out}"
        );
        assert!(
            out.contains(&format!("ok       keys_file {d}/keys.toml: key ids 1")),
            "{out}"
        );
        assert!(
            out.contains(&format!(
                "data_dir {d}/state/collector: does not exist yet; will be created under {d}"
            )),
            "{out}"
        );
        assert!(
            out.contains(&format!("data_dir = \"{d}/state/collector\"")),
            "{out}"
        );
        assert!(
            out.contains(&format!("keys_file = \"{d}/keys.toml\"")),
            "{out}"
        );
        assert!(!out.contains("0123456789abcdef"), "secret shown: {out}");
        assert!(
            out.contains("aggregator_key = \"<redacted, 32 characters>\""),
            "{out}"
        );
        // Every section of the effective config is there, defaults included.
        assert!(
            out.contains("[limits]") && out.contains("max_body_bytes = 1048576"),
            "{out}"
        );
        // The embedded bot User-Agent list compiles (every pattern of the vendored list).
        assert!(
            out.contains(
                "ok       user_agent: 1500 patterns from builtin (crawler-user-agents 1.60.0)"
            ),
            "{out}"
        );
        // --check created nothing.
        assert!(!dir.path().join("state").exists());

        // An operator's bot list, relative to the config file; one pattern the regex
        // crate rejects is a warning naming it, not a failure.
        std::fs::write(
            dir.path().join("bots.json"),
            r#"[{"pattern":"InHouseProbe"},{"pattern":"(?=x)y"}]"#,
        )
        .unwrap();
        let mut text = std::fs::read_to_string(&config).unwrap();
        text.push_str("\n[user_agent]\nbot_list = \"bots.json\"\n");
        std::fs::write(&config, text).unwrap();
        let (ok, out, err) = check(&config, "collector", elsewhere.path());
        assert!(ok, "{out}\n{err}");
        assert!(
            out.contains(&format!(
                "ok       user_agent: 1 patterns from {d}/bots.json"
            )),
            "{out}"
        );
        assert!(
            out.contains(
                "warning  user_agent: 1 patterns skipped (not supported by the regex crate, or matching every User-Agent): (?=x)y"
            ),
            "{out}"
        );
    }

    /// Each thing start-up would trip on fails --check with exit 1 and a clear message:
    /// a key file others can read (start-up refuses it too), an unparseable key file,
    /// a port in use, a data dir that is not writable, an invalid limit.
    #[test]
    fn collector_check_refuses_what_start_up_would() {
        let dir = tempfile::tempdir().unwrap();
        let config = collector_config(dir.path(), 0);
        let keys = dir.path().join("keys.toml");

        chmod(&keys, 0o644);
        let (ok, out, err) = check(&config, "collector", dir.path());
        assert!(!ok);
        let want = format!(
            "keys_file {} has mode 0644: it holds secrets and must not be readable or writable by group or others; run `chmod 600 {}`",
            keys.display(),
            keys.display()
        );
        assert!(out.contains(&format!("problem  {want}")), "{out}");
        assert!(err.contains("1 problem(s)") && err.contains(&want), "{err}");
        // The start refuses it as well, before listening.
        let out = bin()
            .args(["--log-format", "text", "collector", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let e = String::from_utf8(out.stderr).unwrap();
        assert!(e.contains("refusing to start") && e.contains(&want), "{e}");
        assert!(!e.contains("listening"), "{e}");
        chmod(&keys, 0o600);

        std::fs::write(&keys, "not a key file").unwrap();
        chmod(&keys, 0o600);
        let (ok, out, _) = check(&config, "collector", dir.path());
        assert!(!ok);
        assert!(
            out.contains(&format!(
                "problem  keys_file {}: not a key file",
                keys.display()
            )),
            "{out}"
        );
        crate::support::keys_force(dir.path());

        let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = busy.local_addr().unwrap().port();
        let config = collector_config_again(dir.path(), port);
        let (ok, out, _) = check(&config, "collector", dir.path());
        assert!(!ok);
        assert!(
            out.contains(&format!(
                "problem  listen_http 127.0.0.1:{port}: cannot listen"
            )),
            "{out}"
        );
        drop(busy);
        let (ok, out, _) = check(&config, "collector", dir.path());
        assert!(ok, "{out}");
        assert!(
            out.contains(&format!("ok       listen_http 127.0.0.1:{port}: free")),
            "{out}"
        );

        let ro = dir.path().join("ro");
        std::fs::create_dir(&ro).unwrap();
        chmod(&ro, 0o500);
        let probe = ro.join("probe");
        // Root ignores mode bits: only meaningful when a write to ro really fails.
        if std::fs::write(&probe, "x").is_err() {
            let (ok, out, _) = check_env(&config, "ADCLICK_COLLECTOR__DATA_DIR", &ro);
            assert!(!ok);
            assert!(out.contains("not writable"), "{out}");
        } else {
            std::fs::remove_file(&probe).unwrap();
        }
        let file = dir.path().join("a-file");
        std::fs::write(&file, "").unwrap();
        let (ok, out, _) = check_env(&config, "ADCLICK_COLLECTOR__DATA_DIR", &file);
        assert!(!ok);
        assert!(
            out.contains(&format!(
                "problem  data_dir {}: not a directory",
                file.display()
            )),
            "{out}"
        );

        let (ok, out, err) = check_env(
            &config,
            "ADCLICK_COLLECTOR__FORWARD__MAX_IN_FLIGHT",
            Path::new("0"),
        );
        assert!(!ok);
        assert!(
            out.contains("problem  config")
                && out.contains("forward.max_in_flight must be 1 to 256"),
            "{out}"
        );
        assert!(err.contains("forward.max_in_flight"), "{err}");
    }

    fn collector_config_again(dir: &Path, port: u16) -> std::path::PathBuf {
        let path = dir.join("collector.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let text = text
            .lines()
            .map(|l| {
                if l.starts_with("listen_http") {
                    format!("listen_http = \"127.0.0.1:{port}\"")
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn check_env(config: &Path, k: &str, v: &Path) -> (bool, String, String) {
        let out = bin()
            .args(["collector", "--check", "--config"])
            .arg(config)
            .env(k, v)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    }

    /// The aggregator: keys redacted, data dir relative to the config file, a config file
    /// holding keys that others can read is a warning (not a failure), a bad limit fails.
    #[test]
    fn aggregator_check() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("aggregator.toml");
        std::fs::write(
            &config,
            "listen_grpc = \"127.0.0.1:0\"\nlisten_http = \"127.0.0.1:0\"\ndata_dir = \"agg\"\n\
             ingest_keys = [\"ingest-secret-0123456789\"]\n\
             [[api_keys]]\nkey = \"admin-secret-0123456789\"\nrole = \"admin\"\n",
        )
        .unwrap();
        chmod(&config, 0o644);
        let elsewhere = tempfile::tempdir().unwrap();
        let (ok, out, err) = check(&config, "aggregator", elsewhere.path());
        assert!(ok, "{out}\n{err}");
        assert!(!out.contains("secret-0123456789"), "{out}");
        assert!(
            out.contains("ingest_keys = [\"<redacted, 24 characters>\"]"),
            "{out}"
        );
        assert!(
            out.contains(&format!("data_dir = \"{}/agg\"", dir.path().display())),
            "{out}"
        );
        assert!(
            out.contains(&format!(
                "warning  config file {} has mode 0644",
                config.display()
            )),
            "{out}"
        );
        assert!(out.contains("store ") && out.contains("none yet"), "{out}");
        let (ok, out, _) = {
            let o = bin()
                .args(["aggregator", "--check", "--config"])
                .arg(&config)
                .env("ADCLICK_AGGREGATOR__SHARDS__COUNT", "0")
                .output()
                .unwrap();
            (o.status.success(), String::from_utf8(o.stdout).unwrap(), ())
        };
        assert!(!ok);
        assert!(out.contains("shards.count must be 1 to 256"), "{out}");
    }

    /// The query front: the shipped example with a key checks out, ports and shards listed.
    #[test]
    fn query_front_check() {
        let dir = tempfile::tempdir().unwrap();
        let shipped = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../config/query-front.toml"
        ))
        .unwrap()
        .replace("127.0.0.1:9290", "127.0.0.1:0")
        .replace("127.0.0.1:9291", "127.0.0.1:0");
        let config = dir.path().join("front.toml");
        std::fs::write(
            &config,
            format!(
                "{shipped}\n[[api_keys]]\nkey = \"front-secret-0123456789\"\nrole = \"admin\"\n"
            ),
        )
        .unwrap();
        chmod(&config, 0o600);
        let (ok, out, err) = check(&config, "query-front", dir.path());
        assert!(ok, "{out}\n{err}");
        assert!(
            out.contains("ok       8 partitions over 2 shards, each exactly once"),
            "{out}"
        );
        assert!(
            out.contains("shard agg-1 http://127.0.0.1:9192 partitions 4-7"),
            "{out}"
        );
        assert!(out.contains("key = \"<redacted, 23 characters>\""), "{out}");
        assert!(!out.contains("front-secret"), "{out}");
    }
}

mod live {
    use super::support::*;

    fn loadgen(endpoint: &str, keys: &std::path::Path, extra: &[&str]) -> (bool, String, String) {
        let out = bin()
            .args(["loadgen", "--endpoint", endpoint, "--keys"])
            .arg(keys)
            .args(["--rate", "300", "--trackers", "2"])
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    }

    fn field(out: &str, name: &str) -> u64 {
        let line = out
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} line in {out}"));
        line[name.len()..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap_or_else(|e| panic!("{e}: {line}"))
    }

    /// Liveness and readiness are separate endpoints on both servers; loadgen accounts for
    /// every click (offered = acked, the collector's verdicts add up to what it acked, the
    /// forged ones refused as bad_signature) and exits 0; against a collector that is not
    /// there everything is undelivered and it exits 1 saying how many were lost.
    #[test]
    fn health_split_and_loadgen_accounting() {
        let dev = dev();
        for addr in [&dev.collector, &dev.http] {
            assert_eq!(
                http_get(addr, "/livez"),
                (200, "ok\n".to_string()),
                "{addr}"
            );
            let (code, body) = http_get(addr, "/readyz");
            assert_eq!(code, 200, "{addr}: {body}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["ready"], true, "{body}");
        }

        let keys = dev.data().join("keys.toml");
        let (ok, out, err) = loadgen(
            &format!("http://{}", dev.collector),
            &keys,
            &["--duration", "2s", "--forged-pct", "10", "--late-pct", "0"],
        );
        assert!(ok, "{out}\n{err}");
        let offered = field(&out, "offered");
        assert!(offered >= 300, "{out}");
        assert_eq!(field(&out, "acked"), offered, "{out}");
        assert_eq!(field(&out, "lost"), 0, "{out}");
        assert_eq!(field(&out, "undelivered"), 0, "{out}");
        assert!(out.contains("refused            0"), "{out}");
        // The collector's verdicts cover every acked click.
        let said = out
            .lines()
            .find_map(|l| l.trim_start().strip_prefix("collector said"))
            .unwrap_or_else(|| panic!("{out}"));
        let mut total = 0;
        let mut forged = 0;
        for part in said.split(',') {
            let (k, v) = part.trim().rsplit_once(' ').unwrap();
            let v: u64 = v.parse().unwrap();
            total += v;
            if k == "bad_signature" {
                forged = v;
            }
        }
        assert_eq!(total, offered, "{out}");
        assert!(forged > 0, "10% forged: {out}");
        // The invalid-traffic share is acked like the rest (counted in offered and acked
        // above); the collector classified exactly the crawler-UA clicks as bots (only
        // loadgen sends to this dev, and its bot clicks are fresh valid tokens).
        let bots = field(&out, "invalid share");
        assert!(bots > 0, "2% of >= 300 clicks: {out}");
        let (_, metrics) = http_get(&dev.collector, "/metrics");
        let bot_line = format!("adclick_collector_user_agent_clicks_total{{class=\"bot\"}} {bots}");
        assert!(
            metrics.lines().any(|l| l == bot_line),
            "want {bot_line}\n{out}"
        );

        // adclick top --once over the same servers, once the aggregator has counted
        // everything (two equal rankings a second apart): the screen shows what the
        // collector's metrics and the query API say.
        let admin = std::fs::read_to_string(dev.data().join("admin.key")).unwrap();
        let admin = admin.trim();
        let auth = format!("authorization: Bearer {admin}\r\n");
        let top_api = || http_get_with(&dev.http, "/v1/ads/top?n=10&last_minutes=5", &auth);
        let mut last = top_api();
        loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
            let now = top_api();
            if now == last {
                break;
            }
            last = now;
        }
        let out = bin()
            .args(["top", "--once", "--interval", "200ms", "--api-key", admin])
            .arg("--endpoints")
            .arg(format!("http://{},http://{}", dev.collector, dev.http))
            .output()
            .unwrap();
        let screen = String::from_utf8(out.stdout).unwrap();
        assert!(
            out.status.success(),
            "{screen}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            screen.starts_with("adclick top (1 collector(s), 1 aggregator(s), 0 query front(s))"),
            "{screen}"
        );
        let (_, metrics) = http_get(&dev.collector, "/metrics");
        let count = |outcome: &str| -> u64 {
            let name = format!("adclick_collector_clicks_total{{outcome=\"{outcome}\"}} ");
            let line = metrics.lines().find(|l| l.starts_with(&name)).unwrap();
            line[name.len()..].trim().parse().unwrap()
        };
        let (accepted, bad) = (count("accepted"), count("bad_signature"));
        assert!(accepted > 0 && bad > 0, "{metrics}");
        assert!(
            screen.contains(&format!("accepted     {accepted:>10}   duplicate")),
            "{screen}"
        );
        assert!(
            screen.contains(&format!("rejected     bad_signature {bad}")),
            "{screen}"
        );
        // The collectors' User-Agent classes: loadgen's crawler share, the rest its own UA.
        assert!(
            screen.contains(&format!(
                "user agents  bot {bots}, client {}",
                accepted - bots
            )),
            "{screen}"
        );
        assert!(
            screen.contains("forward lag           0 spool records not yet acked"),
            "{screen}"
        );
        let (code, body) = top_api();
        assert_eq!((code, &body), (last.0, &last.1), "the ranking moved");
        assert_eq!(code, 200, "{body}");
        let api: serde_json::Value = serde_json::from_str(&body).unwrap();
        let ads = api["ads"].as_array().unwrap();
        assert_eq!(ads.len(), 10, "{body}");
        let rows: Vec<&str> = screen
            .lines()
            .skip_while(|l| !l.starts_with("  rank"))
            .skip(1)
            .collect();
        assert_eq!(rows.len(), 10, "{screen}");
        for (i, (row, a)) in rows.iter().zip(ads).enumerate() {
            let (ad, clicks) = (a["ad_id"].as_u64().unwrap(), a["clicks"].as_u64().unwrap());
            let want = format!("  {:>4}  {ad:>8}  {clicks:>9}", i + 1);
            assert_eq!(*row, want, "{screen}\n{body}");
        }

        // Nothing listening: every click is undelivered, exit 1.
        let [dead] = free_ports::<1>();
        let (ok, out, err) = loadgen(
            &format!("http://127.0.0.1:{dead}"),
            &keys,
            &["--duration", "1s", "--late-pct", "0"],
        );
        assert!(!ok, "{out}");
        assert!(out.starts_with("offered"), "{out}\n{err}");
        let offered = field(&out, "offered");
        assert!(offered > 0);
        assert_eq!(field(&out, "acked"), 0, "{out}");
        assert_eq!(field(&out, "lost"), offered, "{out}");
        assert_eq!(field(&out, "undelivered"), offered, "{out}");
        assert!(
            err.contains(&format!(
                "{offered} of {offered} clicks offered were never acknowledged"
            )),
            "{err}"
        );
    }
}

mod deploy {
    use super::support::*;
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    fn repo() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .to_path_buf()
    }

    /// A unit file: section -> (key, value) in order (keys may repeat).
    type Unit = BTreeMap<String, Vec<(String, String)>>;

    fn parse_unit(text: &str) -> Unit {
        let mut u = Unit::new();
        let mut section = String::new();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = s.to_string();
                continue;
            }
            assert!(!line.ends_with('\\'), "no continuation lines: {line}");
            let (k, v) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("not key=value: {line}"));
            assert!(!section.is_empty(), "{line} outside a section");
            u.entry(section.clone())
                .or_default()
                .push((k.to_string(), v.to_string()));
        }
        u
    }

    fn all<'a>(u: &'a Unit, sec: &str, key: &str) -> Vec<&'a str> {
        u.get(sec)
            .map(|e| {
                e.iter()
                    .filter(|(k, _)| k == key)
                    .map(|(_, v)| v.as_str())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn one<'a>(u: &'a Unit, sec: &str, key: &str) -> &'a str {
        let v = all(u, sec, key);
        assert_eq!(v.len(), 1, "{sec}.{key}: {v:?}");
        v[0]
    }

    /// `adclick <args> --help` exits 0 only if clap accepts every argument before it: the
    /// subcommands and flags a unit or compose file uses are real.
    fn clap_accepts(args: &[String]) {
        let out = bin().args(args).arg("--help").output().unwrap();
        assert!(
            out.status.success(),
            "adclick {args:?} is refused: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn tools() -> PathBuf {
        let out = Command::new("bash")
            .arg(repo().join("scripts/setup-deploy-tools.sh"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "scripts/setup-deploy-tools.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    }

    fn units() -> Vec<(String, PathBuf)> {
        ["collector", "aggregator", "query-front"]
            .iter()
            .map(|r| {
                let p = repo().join(format!("deploy/systemd/adclick-{r}.service"));
                assert!(p.exists(), "{} missing", p.display());
                (r.to_string(), p)
            })
            .collect()
    }

    /// Each role's unit is hardened as documented, its ExecStart(Pre) are real `adclick`
    /// commands, and run as systemd would (credentials in %d, the unit's environment, a
    /// state directory) the --check of ExecStartPre passes on the shipped configs plus the
    /// secrets the unit's comment says to add: the unit and config/ agree.
    #[test]
    fn systemd_units_are_hardened_and_start_the_real_commands() {
        for (role, path) in units() {
            let u = parse_unit(&std::fs::read_to_string(&path).unwrap());
            let s = "Service";
            for (k, v) in [
                ("DynamicUser", "yes"),
                ("ProtectSystem", "strict"),
                ("ProtectHome", "yes"),
                ("PrivateTmp", "yes"),
                ("NoNewPrivileges", "yes"),
                ("CapabilityBoundingSet", ""),
                ("LimitNOFILE", "65536"),
                ("UMask", "0077"),
            ] {
                assert_eq!(one(&u, s, k), v, "{role}: {k}");
            }
            if role != "query-front" {
                let state = one(&u, s, "StateDirectory");
                assert_eq!(state, format!("adclick/{role}"));
                assert_eq!(one(&u, s, "ReadWritePaths"), format!("/var/lib/{state}"));
            }
            let start: Vec<String> = one(&u, s, "ExecStart")
                .split_whitespace()
                .map(String::from)
                .collect();
            let pre: Vec<String> = one(&u, s, "ExecStartPre")
                .split_whitespace()
                .map(String::from)
                .collect();
            assert_eq!(start[0], "/usr/local/bin/adclick", "{role}");
            assert_eq!(start[1], role);
            assert_eq!(
                pre,
                [start.clone(), vec!["--check".into()]].concat(),
                "{role}"
            );
            clap_accepts(&start[1..]);
            clap_accepts(&pre[1..]);

            // Run ExecStartPre as systemd would.
            let tmp = tempfile::tempdir().unwrap();
            let creds = tmp.path().join("credentials");
            std::fs::create_dir(&creds).unwrap();
            for c in all(&u, s, "LoadCredential") {
                let (name, source) = c.split_once(':').unwrap();
                let file = Path::new(source).file_name().unwrap().to_str().unwrap();
                assert_eq!(name, file, "{role}");
                assert!(source.starts_with("/etc/adclick/"), "{source}");
                let dest = creds.join(name);
                if name == "keys.toml" {
                    keys(&creds);
                } else {
                    let shipped = repo().join("config").join(name);
                    assert!(
                        shipped.exists(),
                        "{role}: {} (installed as {source}) missing",
                        shipped.display()
                    );
                    let mut text = std::fs::read_to_string(&shipped).unwrap();
                    // What the unit's comment says to add.
                    if role == "aggregator" {
                        text = format!("ingest_keys = [\"unit-test-ingest-key-0123\"]\n{text}");
                    }
                    if role != "collector" {
                        text += "\n[[api_keys]]\nkey = \"unit-test-admin-key-0123\"\nrole = \"admin\"\n";
                    }
                    std::fs::write(&dest, text).unwrap();
                }
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o400)).unwrap();
            }
            let mut cmd = bin();
            let d = creds.to_str().unwrap();
            cmd.args(pre[1..].iter().map(|a| a.replace("%d", d)));
            let prefix = format!("ADCLICK_{}", role.to_uppercase().replace('-', "_"));
            for e in all(&u, s, "Environment") {
                let (k, v) = e.split_once('=').unwrap();
                let v = v.replace("/var/lib/", &format!("{}/var/lib/", tmp.path().display()));
                cmd.env(k, v);
            }
            // Ports the machine may be using for something else.
            cmd.env(format!("{prefix}__LISTEN_HTTP"), "127.0.0.1:0");
            if role != "collector" {
                cmd.env(format!("{prefix}__LISTEN_GRPC"), "127.0.0.1:0");
            }
            let out = cmd.output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{role}: {text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            if role == "collector" {
                // keys_file = "keys.toml" resolved against the credentials directory.
                assert!(
                    text.contains(&format!("ok       keys_file {d}/keys.toml")),
                    "{text}"
                );
                assert!(
                    text.contains(&format!(
                        "data_dir = \"{}/var/lib/adclick/collector\"",
                        tmp.path().display()
                    )),
                    "{text}"
                );
            }
        }
    }

    /// `systemd-analyze verify` on each unit (the binary path pointed at the built one, as
    /// verify checks it exists): no warning, no error.
    #[test]
    fn systemd_analyze_verify_is_clean() {
        tools();
        let tmp = tempfile::tempdir().unwrap();
        for (_, path) in units() {
            let text = std::fs::read_to_string(&path)
                .unwrap()
                .replace("/usr/local/bin/adclick", env!("CARGO_BIN_EXE_adclick"));
            let copy = tmp.path().join(path.file_name().unwrap());
            std::fs::write(&copy, text).unwrap();
            let out = Command::new("systemd-analyze")
                .arg("verify")
                .arg(&copy)
                .env("SYSTEMD_LOG_LEVEL", "notice")
                .output()
                .unwrap();
            let said = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                out.status.success() && said.trim().is_empty(),
                "{}: {said}",
                path.display()
            );
        }
    }

    /// The Containerfile: multi-stage, builds the adclick binary, runs it as a non-root
    /// user; hadolint finds nothing.
    #[test]
    fn containerfile_is_multi_stage_non_root_and_lints_clean() {
        let path = repo().join("deploy/Containerfile");
        let text = std::fs::read_to_string(&path).unwrap();
        let froms: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
        assert_eq!(froms.len(), 2, "{froms:?}");
        assert!(froms[0].ends_with(" AS build"), "{froms:?}");
        assert!(text.contains("cargo build --release --locked -p adclick-cli --bin adclick"));
        assert!(text.contains("COPY --from=build /adclick /usr/local/bin/adclick"));
        let user = text.lines().rfind(|l| l.starts_with("USER ")).unwrap();
        assert!(!user.contains("root") && !user.contains(" 0"), "{user}");
        assert!(text.contains("ENTRYPOINT [\"/usr/local/bin/adclick\"]"));
        assert!(
            repo().join(".dockerignore").exists(),
            "the build context needs target/ out"
        );
        let hadolint = tools();
        let out = Command::new(&hadolint).arg(&path).output().unwrap();
        assert!(
            out.status.success() && out.stdout.is_empty(),
            "hadolint: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `${VAR:?msg}` and `${VAR}` replaced from `vars`, as compose does.
    fn interpolate(s: &str, vars: &BTreeMap<&str, &str>) -> String {
        let mut out = String::new();
        let mut rest = s;
        while let Some(i) = rest.find("${") {
            out += &rest[..i];
            let end = rest[i..].find('}').unwrap() + i;
            let name = rest[i + 2..end].split(':').next().unwrap();
            out += vars
                .get(name)
                .unwrap_or_else(|| panic!("{name} has no value"));
            rest = &rest[end + 1..];
        }
        out + rest
    }

    /// The compose file: every service runs the image with a real `adclick` command, the
    /// host paths it mounts exist, and each server's --check passes with the compose
    /// environment (its JSON-in-TOML secrets included) on the config it mounts.
    #[test]
    fn compose_services_are_real_commands_on_real_configs() {
        let dir = repo().join("deploy");
        let doc: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(&std::fs::read_to_string(dir.join("compose.yaml")).unwrap())
                .unwrap();
        let services = doc["services"].as_mapping().unwrap();
        let names: Vec<&str> = services.keys().map(|k| k.as_str().unwrap()).collect();
        assert_eq!(names, ["keys", "aggregator", "collector"]);
        let vars = BTreeMap::from([
            ("ADCLICK_INGEST_KEY", "compose-test-ingest-0123456789"),
            ("ADCLICK_ADMIN_KEY", "compose-test-admin-0123456789"),
        ]);
        let tmp = tempfile::tempdir().unwrap();
        for (name, svc) in services {
            let name = name.as_str().unwrap();
            assert_eq!(svc["image"], "localhost/adclick:latest", "{name}");
            let command: Vec<String> = svc["command"]
                .as_sequence()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap().to_string())
                .collect();
            clap_accepts(&command);
            let mut mounts = BTreeMap::new();
            for v in svc["volumes"].as_sequence().unwrap() {
                let v = v.as_str().unwrap();
                let (host, rest) = v.split_once(':').unwrap();
                let inside = rest.split(':').next().unwrap();
                if host.starts_with('.') {
                    let p = dir.join(host);
                    assert!(p.exists(), "{name}: {} missing", p.display());
                    mounts.insert(inside.to_string(), p);
                } else {
                    assert!(
                        doc["volumes"].get(host).is_some(),
                        "{name}: volume {host} not declared"
                    );
                }
            }
            if name == "keys" {
                continue;
            }
            // The server's --check on the file it mounts, with its environment.
            let config_at = command
                .iter()
                .skip_while(|a| *a != "--config")
                .nth(1)
                .unwrap();
            let config = mounts
                .get(config_at)
                .unwrap_or_else(|| panic!("{name}: {config_at} not mounted"));
            let mut cmd = bin();
            cmd.arg(name).arg("--check").arg("--config").arg(config);
            for (k, v) in svc["environment"].as_mapping().unwrap() {
                let k = k.as_str().unwrap();
                let mut v = interpolate(v.as_str().unwrap(), &vars);
                if k.ends_with("__LISTEN_HTTP") || k.ends_with("__LISTEN_GRPC") {
                    v = "127.0.0.1:0".into(); // the check binds: the compose ports may be taken here
                }
                if k.ends_with("__DATA_DIR") || k.ends_with("__KEYS_FILE") {
                    v = format!("{}{v}", tmp.path().display());
                }
                cmd.env(k, v);
            }
            if name == "collector" {
                let kdir = tmp.path().join("var/lib/adclick/keys");
                std::fs::create_dir_all(&kdir).unwrap();
                keys(&kdir);
            }
            let out = cmd.output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{name}: {text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            if name == "aggregator" {
                assert!(
                    text.contains("keys: 1 ingest key(s), 1 API key(s)"),
                    "{text}"
                );
            } else {
                assert!(
                    text.contains("aggregators = [\"http://aggregator:9090\"]"),
                    "{text}"
                );
            }
        }
    }
}

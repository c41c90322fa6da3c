//! The real `adclick` binary as a child process: built once per test run, started with a
//! config file, SIGKILLed on demand and always on drop.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

/// `<target>/debug/adclick`, built once per test run (`cargo build -p adclick-cli`).
pub fn adclick_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let bin = cargo_build(&["-p", "adclick-cli", "--bin", "adclick"])
            .join(format!("adclick{}", std::env::consts::EXE_SUFFIX));
        assert!(bin.exists(), "{} missing after the build", bin.display());
        bin
    })
    .clone()
}

/// Runs `cargo build -q <args>` in the workspace (debug profile) and returns the
/// directory its artifacts land in (`<target>/debug`). For tests that need a binary or a
/// library of another crate (the `adclick` binary, the FFI cdylib).
pub fn cargo_build(args: &[&str]) -> PathBuf {
    // This crate sits at `<workspace>/tests/support`.
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let workspace = manifest.parent().and_then(Path::parent).unwrap();
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .args(["build", "-q"])
        .args(args)
        .current_dir(workspace);
    // Drop what cargo set for this test process (CARGO_MANIFEST_DIR, CARGO_PKG_*, ...):
    // build scripts that track them (ring's does) would otherwise rerun, and the outer
    // and inner builds would invalidate each other's artifacts on every run.
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k == "OUT_DIR"
            || k.starts_with("CARGO_PKG_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_CRATE_NAME",
                "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
            ]
            .contains(&k.as_ref())
        {
            cargo.env_remove(&key);
        }
    }
    let status = cargo.status().expect("cannot run cargo");
    assert!(status.success(), "cargo build {} failed", args.join(" "));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    let target = if target.is_relative() {
        workspace.join(target)
    } else {
        target
    };
    target.join("debug")
}

/// A running `adclick <command> --config <file>`; SIGKILLed when dropped, so a failing
/// test never leaves a server behind. Its stderr goes to `log`.
#[derive(Debug)]
pub struct ChildServer {
    child: Child,
    /// Where its stderr goes.
    pub log: PathBuf,
}

impl ChildServer {
    /// Starts `adclick <command> --config <config>` with `RUST_LOG=warn`.
    pub fn spawn(command: &str, config: &Path, log: &Path) -> ChildServer {
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(adclick_bin())
            .args([command, "--config"])
            .arg(config)
            .env("RUST_LOG", "warn")
            // The tests read these logs as text lines (JSON is the default off a terminal).
            .env("ADCLICK_LOG_FORMAT", "text")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap();
        ChildServer {
            child,
            log: log.to_path_buf(),
        }
    }

    /// SIGKILL (on Unix `Child::kill` is SIGKILL) and reap: no shutdown path runs.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Fails the test if the process exited (with its log).
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("adclick exited with {status}; log:\n{}", self.log_text());
        }
    }

    /// Its log so far (empty if unreadable).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ChildServer {
    /// Starts `adclick <args...>` with extra environment `envs`, stdout and stderr appended
    /// to `log` (for commands other than a server on a config file, e.g. `dev --cluster`).
    pub fn spawn_args<I, S>(args: I, envs: &[(&str, &OsStr)], log: &Path) -> ChildServer
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let err = out.try_clone().unwrap();
        let mut cmd = Command::new(adclick_bin());
        cmd.args(args)
            .env("RUST_LOG", "warn")
            .env("ADCLICK_LOG_FORMAT", "text")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        for (k, v) in envs {
            cmd.env(k, v);
        }
        ChildServer {
            child: cmd.spawn().unwrap(),
            log: log.to_path_buf(),
        }
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM (the graceful stop; Ctrl-C does the same).
    pub fn terminate(&self) {
        adclick_devtools::process::terminate(self.child.id()).unwrap();
    }

    /// Waits up to `within` for the process to exit and reaps it; its status, or `None`
    /// if it still runs.
    pub fn wait_exit(&mut self, within: std::time::Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

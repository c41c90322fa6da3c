//! Processes by pid: SIGTERM/SIGKILL and "is it still there", for a supervisor that knows
//! its children only by the pid it wrote down (`dev.json`) and for tests that kill them.
//! Safe wrappers over kill(2) (rustix): the workspace forbids unsafe code.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process, test_kill_process};

fn pid_of(pid: u32) -> io::Result<Pid> {
    i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("bad pid {pid}")))
}

/// Sends SIGTERM to `pid` (a graceful stop for every adclick server and nats-server).
pub fn terminate(pid: u32) -> io::Result<()> {
    kill_process(pid_of(pid)?, Signal::TERM).map_err(io::Error::from)
}

/// Sends SIGKILL to `pid` (no shutdown path runs).
pub fn kill(pid: u32) -> io::Result<()> {
    kill_process(pid_of(pid)?, Signal::KILL).map_err(io::Error::from)
}

/// Whether a process `pid` exists (signal 0). A zombie (exited, not yet reaped by its
/// parent) still exists; on Linux, [`running`] tells them apart.
pub fn exists(pid: u32) -> bool {
    pid_of(pid).is_ok_and(|p| test_kill_process(p).is_ok())
}

/// Whether `pid` exists and is not a zombie (Linux: its `/proc/<pid>/stat` state is not
/// `Z`; elsewhere the same as [`exists`]).
pub fn running(pid: u32) -> bool {
    if !exists(pid) {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // `pid (comm) S ...`: the state follows the last ')' (comm may hold one).
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|state| state != "Z"),
        Err(_) => !cfg!(target_os = "linux"),
    }
}

/// Waits until something accepts TCP connections on `addr` (polling every 20 ms), or
/// `within` passes, or `gave_up()` says to stop (the process that should listen exited).
/// Whether it listens.
pub fn wait_listening(
    addr: SocketAddr,
    within: Duration,
    mut gave_up: impl FnMut() -> bool,
) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if gave_up() {
            return false;
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_is_running_until_killed_and_reaped() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        assert!(exists(pid) && running(pid));
        kill(pid).unwrap();
        // Killed but not reaped: a zombie exists, but is not running.
        let deadline = Instant::now() + Duration::from_secs(5);
        while running(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!running(pid));
        child.wait().unwrap();
        assert!(!exists(pid));
    }

    #[test]
    fn terminate_stops_a_child() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        terminate(child.id()).unwrap();
        let status = child.wait().unwrap();
        assert!(!status.success());
    }
}

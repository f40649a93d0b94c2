//! The child processes a test starts (PostgreSQL, Kafka nodes, the relay binary): they die with
//! the test process, stop with the signal asked for, restart on their old port, and show their
//! log when a test fails.
//!
//! Only process handling lives here; what each server is and how it starts is in its own module.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Makes the child receive `signal` when the test process dies, so no server outlives it.
pub fn set_parent_death_signal(command: &mut Command, signal: i32) {
    // SAFETY: prctl is async-signal-safe and touches only the child's own state.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Prints the end of a server's log, so a failing test shows what the server saw.
pub fn print_log_tail(name: &str, path: &std::path::Path) {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let kept = std::env::temp_dir().join(format!("outbox-test-{name}-{}.log", uuid::Uuid::new_v4().simple()));
    if std::fs::copy(path, &kept).is_ok() {
        eprintln!("the whole {name} log is kept at {}", kept.display());
    }
    let lines: Vec<&str> = log.lines().collect();
    let head = &lines[..lines.len().min(20)];
    let tail = &lines[lines.len().saturating_sub(20).max(head.len())..];
    eprintln!(
        "---- the {name} log ({}), first and last lines ----\n{}\n...\n{}",
        path.display(),
        head.join("\n"),
        tail.join("\n")
    );
}

/// Sends `signal` to a server process, waits up to `grace` for it to exit, then kills it.
pub fn stop_child(child: Option<Child>, signal: i32, grace: Duration) {
    let Some(mut child) = child else { return };
    // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
    unsafe {
        libc::kill(child.id() as i32, signal);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Calls `launch` until the server is up again on its old port (which the previous process
/// may hold for a moment after it exits).
pub fn relaunch(what: &str, port: u16, mut launch: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !launch() {
        assert!(Instant::now() < deadline, "{what} did not restart on port {port}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// True (and forgets the child) if the server process has exited, e.g. because its port was
/// taken between choosing it and binding it.
pub fn reap_if_exited(child: &mut Option<Child>) -> bool {
    if let Some(running) = child.as_mut()
        && let Ok(Some(_)) = running.try_wait()
    {
        *child = None;
        return true;
    }
    false
}

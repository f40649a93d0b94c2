//! The built `outbox-relay` binary as the tests run it: a command to completion
//! ([`run_command`]), or `run` as a child process ([`RelayProcess`]) that a test can signal,
//! kill and wait for, and whose log it can read.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outbox_relay::config::Config;

use super::environment::{PATIENCE, unique_name};
use super::processes::{print_log_tail, set_parent_death_signal};
use super::test_env::TestEnv;

/// Path of the built `outbox-relay` binary.
pub fn relay_binary() -> &'static str {
    env!("CARGO_BIN_EXE_outbox-relay")
}

/// Writes `config` to a TOML file and returns its path.
pub fn write_config(env: &TestEnv, config: &Config) -> PathBuf {
    let path = env.path(&format!("{}.toml", unique_name("config")));
    write_config_to(&path, config);
    path
}

/// Writes `config` to the TOML file `path`. Secrets are written as the placeholder (the relay
/// refuses it), so a test gives them by file or environment variable, as operators should.
pub fn write_config_to(path: &Path, config: &Config) {
    std::fs::write(path, toml::to_string(config).expect("config as TOML")).expect("write config");
}

/// Runs `outbox-relay ARGS` to completion with `env_vars`, returning exit code, stdout, stderr.
pub fn run_command(args: &[&str], env_vars: &[(&str, &str)]) -> (i32, String, String) {
    let mut command = Command::new(relay_binary());
    command.args(args);
    for (key, _) in std::env::vars() {
        if key.starts_with("OUTBOX_RELAY_") {
            command.env_remove(key);
        }
    }
    command.envs(env_vars.iter().copied());
    let out = command.output().expect("run outbox-relay");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Starts `outbox-relay run` as a child process with `config`; its log goes to a file.
pub fn spawn_relay_process(env: &TestEnv, config: &Config) -> RelayProcess {
    spawn_relay_process_with_env(env, config, &[])
}

/// As [`spawn_relay_process`], with extra environment variables (such as `FAILPOINTS`).
pub fn spawn_relay_process_with_env(env: &TestEnv, config: &Config, vars: &[(&str, &str)]) -> RelayProcess {
    let config_path = write_config(env, config);
    spawn_relay_process_from(&config_path, vars, &env.path(""))
}

/// Starts `outbox-relay --config CONFIG_PATH run` with `vars`, logging to a file in `log_dir`.
pub fn spawn_relay_process_from(config_path: &Path, vars: &[(&str, &str)], log_dir: &Path) -> RelayProcess {
    let log_path = log_dir.join(format!("{}.log", unique_name("relay")));
    let log = std::fs::File::create(&log_path).expect("relay log");
    let mut command = Command::new(relay_binary());
    command
        .arg("--config")
        .arg(config_path)
        .arg("run")
        .env("RUST_LOG", "outbox_relay=debug,info")
        .envs(vars.iter().copied())
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log);
    set_parent_death_signal(&mut command, libc::SIGKILL);
    RelayProcess { child: command.spawn().expect("spawn outbox-relay"), log_path }
}

/// The relay binary running as a child process.
pub struct RelayProcess {
    child: Child,
    /// Where its stdout and stderr go.
    pub log_path: PathBuf,
}

impl RelayProcess {
    /// Sends `signal` (SIGTERM, SIGKILL...).
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, signal);
        }
    }

    /// Waits for the process to exit and returns its exit code (None if killed by a signal).
    pub async fn wait(&mut self) -> Option<i32> {
        self.wait_within(PATIENCE).await
    }

    /// As [`RelayProcess::wait`], panicking if the process has not exited within `within`.
    pub async fn wait_within(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.code();
            }
            assert!(Instant::now() < deadline, "relay did not exit within {within:?}; log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until its log contains `text`; on timeout the panic shows the log.
    pub async fn wait_for_log(&self, text: &str) {
        let deadline = Instant::now() + PATIENCE;
        while !self.log().contains(text) {
            assert!(Instant::now() < deadline, "the relay never logged {text:?}; log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            print_log_tail("relay", &self.log_path);
        }
    }
}

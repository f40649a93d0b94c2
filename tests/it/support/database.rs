//! Connections to a test's PostgreSQL and the logins on it: the owner's connection, the relay's
//! restricted role as `sql/relay_role.sql` creates it, and URLs rewritten to another user or
//! database.

use std::process::{Command, Stdio};

use tokio_postgres::{Client, NoTls};

use super::postgres;

/// The test relay role's password. The test server trusts every local login, so it only shows
/// that the script sets one; an external server may check it.
pub const RELAY_PASSWORD: &str = "relay-secret";

/// Runs psql against `url` as an operator would (no psqlrc, quiet, stopping at the first
/// error) with `args` (`-v` variables, `-f FILE`, ...), returning its output.
pub fn run_psql(url: &str, args: &[&str]) -> std::io::Result<std::process::Output> {
    Command::new(postgres::bindir().join("psql"))
        .arg(url)
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1"])
        .args(args)
        .stdin(Stdio::null())
        .output()
}

/// Runs `sql/relay_role.sql` with psql against `owner_url` for `role`; the error carries psql's
/// output.
pub fn run_relay_role_script(owner_url: &str, role: &str, allow_delete: bool) -> Result<String, String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/sql/relay_role.sql");
    let (role, password) = (format!("relay_role={role}"), format!("relay_password={RELAY_PASSWORD}"));
    let delete = if allow_delete { "allow_delete=on" } else { "allow_delete=off" };
    let out = run_psql(owner_url, &["-v", &role, "-v", &password, "-v", delete, "-f", script])
        .map_err(|e| format!("run psql: {e}"))?;
    let output = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() { Ok(output) } else { Err(format!("sql/relay_role.sql failed: {output}")) }
}

/// `url` with its user and password replaced.
pub fn login_as(url: &str, user: &str, password: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.scheme().starts_with("postgres") => {
            let _ = parsed.set_username(user);
            let _ = parsed.set_password(Some(password));
            parsed.to_string()
        }
        _ => format!("{url} user={user} password={password}"),
    }
}

/// `url` pointed at `database` on the same server.
pub(super) fn replace_dbname(url: &str, database: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.scheme().starts_with("postgres") => {
            parsed.set_path(&format!("/{database}"));
            parsed.to_string()
        }
        _ => format!("{url} dbname={database}"),
    }
}

/// Connects to PostgreSQL, panicking with the reason if it cannot.
pub async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.expect("connect to test PostgreSQL");
    tokio::spawn(connection);
    client
}

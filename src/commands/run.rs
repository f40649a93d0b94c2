//! `outbox-relay run`: relay outbox rows to Kafka until SIGTERM or SIGINT.
//!
//! The loop itself is [`crate::relay`]; this command only ties it to the process's signals. It
//! has no report: a relay that stops on request has nothing to say, and one that stops for any
//! other reason returns the error that says why.

use crate::config::Config;
use crate::relay::{Relay, RelayError};
use crate::service::shutdown::Shutdown;

/// Why `run` stopped other than on request.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// SIGTERM and SIGINT could not be caught, so the relay could not be stopped gracefully.
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    /// The relay refused to start, or stopped.
    #[error(transparent)]
    Relay(#[from] RelayError),
}

/// Runs the relay until a signal asks it to stop and it has finished the batch in flight.
pub async fn run(config: Config) -> Result<(), RunError> {
    let shutdown = Shutdown::new();
    shutdown.on_signals().map_err(RunError::Signals)?;
    Relay::new(config, shutdown)?.run().await?;
    Ok(())
}

//! The notification channel of the outbox table: what the `outbox_relay_notify` trigger
//! (`sql/migrations/0002_order_retries_notify.sql`) and `outbox-relay retry` send, and what
//! [`crate::relay::wakeup`] listens to. Written down here, on the database side, so that the
//! statement that sends and the loop that listens agree without importing each other.

/// The channel the outbox trigger notifies.
pub const CHANNEL: &str = "outbox_relay";

/// The payload of the notification `outbox-relay retry` sends: rows may have become claimable
/// anywhere in the table, not only at its end.
pub const RESCAN_PAYLOAD: &str = "outbox-relay:rescan";

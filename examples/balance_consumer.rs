//! A consumer that applies a non-idempotent effect exactly once, whatever the relay repeats.
//!
//! Each event `{"account": "alice", "amount": 5}` adds `amount` to the account's balance. Adding
//! twice would be wrong, and the relay may deliver an event twice (a crash between publish and
//! mark). `outbox_relay::inbox::Inbox` records each `event_id` in the same transaction as the
//! addition and skips ids it has seen, so every event counts once.
//!
//! ```text
//! cargo run --example balance_consumer -- DATABASE_URL BROKERS TOPIC [GROUP] [--stop-at-end]
//! ```
//! `--stop-at-end` exits once every partition assigned to it has been read to its end. Several
//! instances may run at once in one group; each applies the events of its own partitions.
//!
//! An event whose payload is not a deposit (bad JSON, a missing field, a tombstone) cannot be
//! applied however often it is read again: exiting on it would crash-loop the consumer on that
//! one record. It is parked instead, in table `parked_events` with its event id, position and
//! why, in the same transaction that records it as handled, and logged; the consumer goes on.

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use tokio_postgres::{NoTls, Transaction};

use outbox_relay::inbox::{Event, Handled, Inbox, InboxError};

#[derive(serde::Deserialize)]
struct Deposit {
    account: String,
    amount: i64,
}

/// What became of one new event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Its deposit was added.
    Applied,
    /// Its payload is not a deposit; it was parked.
    Parked,
}

/// The effect: add the deposit to the account. Not idempotent on purpose. A payload that is not
/// a deposit is parked, not an error: an error rolls back and the same record comes again.
async fn apply(tx: &Transaction<'_>, event: &Event<'_>) -> Result<Outcome, Box<dyn std::error::Error + Send + Sync>> {
    let deposit = match event.payload {
        None => Err("no payload (a tombstone)".to_owned()),
        Some(payload) => serde_json::from_slice::<Deposit>(payload).map_err(|e| format!("not a deposit: {e}")),
    };
    let deposit = match deposit {
        Ok(deposit) => deposit,
        Err(why) => {
            tx.execute(
                "INSERT INTO parked_events (event_id, topic, partition, \"offset\", error, payload) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[&event.event_id, &event.topic, &event.partition, &event.offset, &why, &event.payload],
            )
            .await?;
            eprintln!(
                "parked event {} ({}[{}]@{}): {why}; see table parked_events",
                event.event_id, event.topic, event.partition, event.offset
            );
            return Ok(Outcome::Parked);
        }
    };
    tx.execute(
        "INSERT INTO accounts (account, balance) VALUES ($1, $2) \
         ON CONFLICT (account) DO UPDATE SET balance = accounts.balance + EXCLUDED.balance",
        &[&deposit.account, &deposit.amount],
    )
    .await?;
    Ok(Outcome::Applied)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let stop_at_end = args.iter().any(|a| a == "--stop-at-end");
    let positional: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    let [database_url, brokers, topic, rest @ ..] = positional.as_slice() else {
        eprintln!("usage: balance_consumer DATABASE_URL BROKERS TOPIC [GROUP] [--stop-at-end]");
        std::process::exit(2);
    };
    let group = rest.first().map(|g| g.as_str()).unwrap_or("balance-consumer");

    let (mut db, connection) = tokio_postgres::connect(database_url, NoTls).await?;
    tokio::spawn(connection);
    // Several instances may start at once; create_table lets them take turns.
    Inbox::create_table(&mut db).await?;
    let tx = db.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock(hashtext('balance-consumer-ddl'))", &[]).await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS accounts (account text PRIMARY KEY, balance bigint NOT NULL); \
         CREATE TABLE IF NOT EXISTS parked_events (event_id text PRIMARY KEY, topic text NOT NULL, \
             partition int NOT NULL, \"offset\" bigint NOT NULL, error text NOT NULL, payload bytea, \
             parked_at timestamptz NOT NULL DEFAULT now())",
    )
    .await?;
    tx.commit().await?;

    // What the inbox needs (offsets committed only after their effect), plus end-of-partition
    // events for --stop-at-end.
    let mut config = outbox_relay::inbox::consumer_config(brokers, group);
    config.set("enable.partition.eof", "true");
    outbox_relay::inbox::check_consumer_config(&config)?;
    let consumer: StreamConsumer = config.create()?;
    consumer.subscribe(&[topic.as_str()])?;
    let inbox = Inbox::new(group);

    let (mut applied, mut duplicates, mut parked) = (0u64, 0u64, 0u64);
    // Partitions read to their end since their last message. A rebalance can take some away
    // and hand over others, so the end is reached only when every partition assigned now is here.
    let mut ended = std::collections::HashSet::new();
    loop {
        let message = match consumer.recv().await {
            Ok(message) => message,
            Err(KafkaError::PartitionEOF(partition)) => {
                ended.insert(partition);
                let assigned: Vec<i32> = consumer.assignment()?.elements().iter().map(|p| p.partition()).collect();
                if stop_at_end && !assigned.is_empty() && assigned.iter().all(|p| ended.contains(p)) {
                    break;
                }
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        ended.remove(&message.partition());
        let mut outcome = Outcome::Applied;
        let handled = inbox
            .handle(&mut db, &consumer, &message, async |tx, event| {
                outcome = apply(tx, event).await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            })
            .await;
        match handled {
            Ok(Handled::Applied) if outcome == Outcome::Parked => parked += 1,
            Ok(Handled::Applied) => applied += 1,
            Ok(Handled::Duplicate) => duplicates += 1,
            // Not from the relay: nothing to deduplicate on. This consumer skips such records;
            // yours may prefer to stop.
            Err(e @ InboxError::MissingEventId { .. }) => {
                eprintln!("skipping: {e}");
                consumer.commit_message(&message, CommitMode::Async)?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    // Flush the last offset commits; "no offset stored" only means there is nothing new.
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) | Ok(()) => {}
        Err(e) => return Err(e.into()),
    }
    println!("applied {applied} events, skipped {duplicates} duplicates, parked {parked} bad payloads");
    Ok(())
}

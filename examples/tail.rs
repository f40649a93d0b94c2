//! Prints the records of a topic from the beginning: partition, offset, key, headers and value.
//! The demo uses it to show what the relay published; it is also a quick way to look at a
//! topic with the same librdkafka the relay uses.
//!
//! ```text
//! cargo run --example tail -- BROKERS TOPIC [COUNT]
//! ```
//! Stops after COUNT records (default: runs until interrupted).

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(brokers), Some(topic)) = (args.next(), args.next()) else {
        eprintln!("usage: tail BROKERS TOPIC [COUNT]");
        std::process::exit(2);
    };
    let count: Option<usize> = args.next().map(|c| c.parse()).transpose()?;

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "outbox-relay-tail")
        .set("enable.auto.commit", "false")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
    let partitions = metadata.topics().first().map(|t| t.partitions().len()).unwrap_or(0);
    let mut assignment = TopicPartitionList::new();
    for partition in 0..partitions as i32 {
        assignment.add_partition_offset(&topic, partition, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;

    let mut seen = 0;
    while count.is_none_or(|c| seen < c) {
        let message = consumer.recv().await?;
        let key = message.key().map(String::from_utf8_lossy).unwrap_or_default();
        let value = message.payload().map(String::from_utf8_lossy).unwrap_or("(tombstone)".into());
        let headers: Vec<String> = message
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| format!("{}={}", h.key, h.value.map(String::from_utf8_lossy).unwrap_or_default()))
                    .collect()
            })
            .unwrap_or_default();
        println!("{topic}[{}]@{}  key={key}  {}  {value}", message.partition(), message.offset(), headers.join(" "));
        seen += 1;
    }
    Ok(())
}

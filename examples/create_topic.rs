//! Creates a topic (the relay never creates topics): the demo uses it against the Apache Kafka
//! that `scripts/kafka.sh` runs, which has no command-line tools of its own here.
//!
//! ```text
//! cargo run --example create_topic -- BROKERS TOPIC PARTITIONS
//! ```
//! The replication factor is the cluster's default. An existing topic is left as it is.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::types::RDKafkaErrorCode;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [brokers, topic, partitions] = args.as_slice() else {
        eprintln!("usage: create_topic BROKERS TOPIC PARTITIONS");
        std::process::exit(2);
    };
    let partitions: i32 = partitions.parse().map_err(|_| format!("PARTITIONS must be a number, not {partitions}"))?;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new().set("bootstrap.servers", brokers).create()?;
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results =
        admin.create_topics(&[NewTopic::new(topic, partitions, TopicReplication::Fixed(-1))], &options).await?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => return Err(format!("creating topic {name}: {code}").into()),
        }
    }
    Ok(())
}

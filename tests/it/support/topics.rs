//! Creating and configuring a test's topics through Kafka's admin API, waiting until the broker
//! serves them.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;

use super::environment::{PATIENCE, unique_name, wait_until};

/// Creates `name` with `partitions` partitions and waits until the broker reports it.
pub async fn create_topic(brokers: &str, name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().expect("admin client");
    let results = admin
        // The cluster's default replication factor: 1 on one node, 3 on three.
        .create_topics(&[NewTopic::new(name, partitions, TopicReplication::Fixed(-1))], &AdminOptions::new())
        .await
        .expect("create topic");
    for result in results {
        result.unwrap_or_else(|(topic, e)| panic!("create topic {topic}: {e}"));
    }
    let name = name.to_owned();
    wait_until(PATIENCE, "the new topic's metadata", || {
        let admin = &admin;
        let name = name.clone();
        async move {
            admin
                .inner()
                .fetch_metadata(Some(&name), Duration::from_secs(5))
                .map(|m| {
                    m.topics().iter().any(|t| t.name() == name && t.error().is_none() && !t.partitions().is_empty())
                })
                .unwrap_or(false)
        }
    })
    .await;
}

/// Creates a topic with a unique name, `partitions` partitions and the topic `configs` given
/// (`max.message.bytes`, say), waits until the broker reports it, and returns the name.
pub async fn create_topic_with(brokers: &str, partitions: i32, configs: &[(&str, &str)]) -> String {
    let name = unique_name("topic");
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().expect("admin client");
    let mut topic = NewTopic::new(&name, partitions, TopicReplication::Fixed(-1));
    for (key, value) in configs {
        topic = topic.set(key, value);
    }
    for result in admin.create_topics(&[topic], &AdminOptions::new()).await.expect("create topic") {
        result.unwrap_or_else(|(topic, e)| panic!("create topic {topic}: {e}"));
    }
    wait_until(PATIENCE, "the new topic's metadata", || async {
        admin
            .inner()
            .fetch_metadata(Some(&name), Duration::from_secs(5))
            .map(|m| m.topics().iter().any(|t| t.name() == name && t.error().is_none() && !t.partitions().is_empty()))
            .unwrap_or(false)
    })
    .await;
    name
}

/// Sets topic `configs` on `topic` (replacing those set before).
pub async fn alter_topic(brokers: &str, topic: &str, configs: &[(&str, &str)]) {
    use rdkafka::admin::{AlterConfig, ResourceSpecifier};
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().expect("admin client");
    let mut change = AlterConfig::new(ResourceSpecifier::Topic(topic));
    for (key, value) in configs {
        change = change.set(key, value);
    }
    for result in admin.alter_configs(&[change], &AdminOptions::new()).await.expect("alter topic") {
        result.unwrap_or_else(|(resource, e)| panic!("alter {resource:?}: {e}"));
    }
}

/// Grows `topic` to `partitions` partitions, as an operator adds partitions to a live topic.
pub async fn add_partitions(brokers: &str, topic: &str, partitions: usize) {
    use rdkafka::admin::NewPartitions;
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().expect("admin client");
    let grow = NewPartitions::new(topic, partitions);
    for result in admin.create_partitions(&[grow], &AdminOptions::new()).await.expect("add partitions") {
        result.unwrap_or_else(|(topic, e)| panic!("add partitions to {topic}: {e}"));
    }
}

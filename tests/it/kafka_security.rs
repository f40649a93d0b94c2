//! TLS and SASL to the broker: the relay publishes with the right certificates and credentials,
//! and with wrong ones exits at startup with code 2 and one line naming the cause, every row left
//! unpublished, rather than retrying a mistake forever or stalling silently; and on a broker that
//! enforces ACLs, the ACLs the README lists for exactly-once delivery are enough, and each is
//! needed. The broker is Apache Kafka on its own SSL, SASL_SSL and SASL_PLAINTEXT listeners, with
//! SCRAM users made through its admin API (`crate::support::secured_kafka`) and ACLs granted
//! through it (`crate::support::kafka_acls`).

use std::collections::HashSet;

use crate::support::kafka_acls::{self, Acl, Operation, Resource};
use crate::support::secured_kafka::{Listener, SecuredKafka};
use crate::support::tls::TestCa;
use crate::support::{
    NewEvent, PATIENCE, RelayProcess, TestEnv, all_event_ids, insert_backlog, insert_events, marked_event_ids,
    read_topic, spawn_relay_process_with_env, unique_name, wait_until,
};
use outbox_relay::config::{Config, Delivery, SecurityProtocol};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

const ALICE: (&str, &str, &str) = ("alice", "alice-scram-512-secret", "SCRAM-SHA-512");
const BOB: (&str, &str, &str) = ("bob", "bob-scram-256-secret", "SCRAM-SHA-256");

/// A client of the secured broker for the test itself: creating the topic, reading it back.
fn client(brokers: &str, security: &[(&str, String)]) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    for (name, value) in security {
        config.set(*name, value);
    }
    config
}

async fn create_topic(client: &ClientConfig) -> String {
    create_topic_with(client, &[]).await
}

/// A topic of one partition with the topic `configs` given.
async fn create_topic_with(client: &ClientConfig, configs: &[(&str, &str)]) -> String {
    let admin: AdminClient<DefaultClientContext> = client.create().expect("admin client");
    let name = unique_name("topic");
    let mut topic = NewTopic::new(&name, 1, TopicReplication::Fixed(1));
    for (key, value) in configs {
        topic = topic.set(key, value);
    }
    let results = admin.create_topics(&[topic], &AdminOptions::new()).await.expect("create topic");
    for result in results {
        result.unwrap_or_else(|(topic, e)| panic!("create topic {topic}: {e}"));
    }
    name
}

/// The event ids of the first `expected` records of `topic` (one partition).
async fn read_event_ids(client: &ClientConfig, topic: &str, expected: usize) -> Vec<String> {
    let consumer: StreamConsumer = client
        .clone()
        .set("group.id", unique_name("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, 0, Offset::Beginning).expect("assignment");
    consumer.assign(&assignment).expect("assign");
    let mut ids = Vec::new();
    while ids.len() < expected {
        let message = tokio::time::timeout(PATIENCE, consumer.recv()).await.expect("records in time").expect("read");
        let headers = message.headers().expect("headers");
        let id = headers.iter().find(|h| h.key == "event_id").and_then(|h| h.value).expect("event_id header");
        ids.push(String::from_utf8_lossy(id).into_owned());
    }
    ids
}

/// The test's relay configuration against `brokers` with `protocol`.
fn relay_config(env: &TestEnv, brokers: &str, protocol: SecurityProtocol) -> Config {
    let mut config = env.config();
    config.kafka.brokers = brokers.to_owned();
    config.kafka.security_protocol = protocol;
    // A relay the broker refuses holds its records in flight for this long after SIGTERM (30 s
    // by default); the tests stop such relays and need not wait that long.
    config.relay.shutdown_timeout = std::time::Duration::from_secs(1);
    config
}

/// The relay's configuration as [`ALICE`] (SCRAM-SHA-512, her password in a file) on the
/// SASL_SSL listener of `broker`, whose certificate `ca` signed.
fn alice_over_sasl_ssl(env: &TestEnv, ca: &TestCa, broker: &SecuredKafka) -> Config {
    let mut config = relay_config(env, &broker.address(Listener::SaslSsl), SecurityProtocol::SaslSsl);
    config.kafka.tls.ca_file = Some(ca.ca_file());
    config.kafka.sasl.mechanism = Some("SCRAM-SHA-512".into());
    config.kafka.sasl.username = Some(ALICE.0.into());
    let password_file = env.path("sasl-password");
    std::fs::write(&password_file, format!("{}\n", ALICE.1)).unwrap();
    config.kafka.sasl.password_file = Some(password_file);
    config
}

async fn insert(env: &TestEnv, topic: &str, n: usize) {
    let events: Vec<NewEvent> = (0..n).map(|i| NewEvent::keyed(topic, "k", i)).collect();
    insert_events(&env.client().await, &events).await;
}

async fn wait_all_marked(env: &TestEnv, relay: &mut RelayProcess, n: usize) {
    let db = env.client().await;
    wait_until(PATIENCE, "every row marked published", || {
        let db = &db;
        async move { marked_event_ids(db).await.len() == n }
    })
    .await;
    assert!(relay.is_running());
}

/// A relay the broker refuses at startup exits with code 2 and one line naming the cause
/// (a credential or certificate does not fix itself), having marked no row.
async fn assert_refused_at_startup(env: &TestEnv, relay: &mut RelayProcess, cause: &str) {
    let code = tokio::time::timeout(PATIENCE, relay.wait()).await.expect("the relay exits at startup");
    let log = relay.log();
    assert_eq!(code, Some(2), "a refusal at startup is a configuration problem; log:\n{log}");
    let last = log.lines().last().unwrap_or_default();
    assert!(last.contains("refused the relay at startup") && last.contains(cause), "one line naming the cause:\n{log}");
    assert!(marked_event_ids(&env.client().await).await.is_empty(), "no row may be marked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_over_sasl_ssl_with_scram_sha_512_and_a_verified_broker_certificate() {
    publish_over_sasl_ssl(Delivery::AtLeastOnce).await;
}

/// Exactly-once delivery over the same listener: the shards' transactional producers and the
/// progress topic's reader authenticate like the relay's producer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_in_transactions_over_sasl_ssl() {
    publish_over_sasl_ssl(Delivery::ExactlyOnce).await;
}

async fn publish_over_sasl_ssl(delivery: Delivery) {
    let env = TestEnv::start().await;
    env.migrate().await;
    let ca = TestCa::new(&env.path(""), "kafka");
    let broker = SecuredKafka::start(&ca, &[ALICE]).await;
    let advertised = broker.address(Listener::SaslSsl);

    let security = vec![
        ("security.protocol", "sasl_ssl".to_owned()),
        ("ssl.ca.location", ca.ca_file().display().to_string()),
        ("sasl.mechanisms", "SCRAM-SHA-512".to_owned()),
        ("sasl.username", ALICE.0.to_owned()),
        ("sasl.password", ALICE.1.to_owned()),
    ];
    let reader = client(&advertised, &security);
    let topic = create_topic(&reader).await;
    insert(&env, &topic, 5).await;

    let mut config = alice_over_sasl_ssl(&env, &ca, &broker);
    config.kafka.delivery = delivery;
    if delivery == Delivery::ExactlyOnce {
        config.kafka.exactly_once.progress_topic = create_topic_with(&reader, &[("cleanup.policy", "compact")]).await;
    }
    let mut relay = spawn_relay_process_with_env(&env, &config, &[]);
    wait_all_marked(&env, &mut relay, 5).await;

    let published = read_event_ids(&reader, &topic, 5).await;
    let marked = marked_event_ids(&env.client().await).await;
    assert_eq!(published.iter().cloned().collect::<HashSet<_>>(), marked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_with_scram_sha_256_from_the_environment_and_exits_2_at_startup_with_a_wrong_password() {
    let env = TestEnv::start().await;
    env.migrate().await;
    // The node has TLS listeners too, so it needs a certificate even here.
    let ca = TestCa::new(&env.path(""), "kafka");
    let broker = SecuredKafka::start(&ca, &[BOB]).await;
    let brokers = broker.address(Listener::SaslPlaintext);
    let security = vec![
        ("security.protocol", "sasl_plaintext".to_owned()),
        ("sasl.mechanisms", "SCRAM-SHA-256".to_owned()),
        ("sasl.username", BOB.0.to_owned()),
        ("sasl.password", BOB.1.to_owned()),
    ];
    let topic = create_topic(&client(&brokers, &security)).await;
    insert(&env, &topic, 3).await;

    let mut config = relay_config(&env, &brokers, SecurityProtocol::SaslPlaintext);
    config.kafka.sasl.mechanism = Some("scram-sha-256".into());
    config.kafka.sasl.username = Some(BOB.0.into());
    let mut wrong = spawn_relay_process_with_env(&env, &config, &[("OUTBOX_RELAY_KAFKA__SASL__PASSWORD", "not-it")]);
    assert_refused_at_startup(&env, &mut wrong, "the brokers refused the relay's credentials").await;

    let mut relay = spawn_relay_process_with_env(&env, &config, &[("OUTBOX_RELAY_KAFKA__SASL__PASSWORD", BOB.1)]);
    wait_all_marked(&env, &mut relay, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_certificate_from_another_authority_is_refused() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let ca = TestCa::new(&env.path(""), "kafka");
    let stranger = TestCa::new(&env.path(""), "stranger");
    let broker = SecuredKafka::start(&ca, &[]).await;
    let advertised = broker.address(Listener::Ssl);
    let security =
        vec![("security.protocol", "ssl".to_owned()), ("ssl.ca.location", ca.ca_file().display().to_string())];
    let topic = create_topic(&client(&advertised, &security)).await;
    insert(&env, &topic, 2).await;

    let mut config = relay_config(&env, &advertised, SecurityProtocol::Ssl);
    config.kafka.tls.ca_file = Some(stranger.ca_file());
    let mut relay = spawn_relay_process_with_env(&env, &config, &[]);
    assert_refused_at_startup(&env, &mut relay, "the broker's certificate is not trusted").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_requires_client_certificates_gets_the_relays() {
    let env = TestEnv::start().await;
    env.migrate().await;
    let ca = TestCa::new(&env.path(""), "kafka");
    let (client_cert, client_key) = ca.issue("relay", &["outbox-relay"]);
    let broker = SecuredKafka::start(&ca, &[]).await;
    let advertised = broker.address(Listener::SslWithClientCertificate);
    let security = vec![
        ("security.protocol", "ssl".to_owned()),
        ("ssl.ca.location", ca.ca_file().display().to_string()),
        ("ssl.certificate.location", client_cert.display().to_string()),
        ("ssl.key.location", client_key.display().to_string()),
    ];
    let topic = create_topic(&client(&advertised, &security)).await;
    insert(&env, &topic, 2).await;

    let mut config = relay_config(&env, &advertised, SecurityProtocol::Ssl);
    config.kafka.tls.ca_file = Some(ca.ca_file());
    let mut without = spawn_relay_process_with_env(&env, &config, &[]);
    // The broker ends the handshake of a client without a certificate.
    assert_refused_at_startup(&env, &mut without, "the broker asks for a client certificate").await;

    config.kafka.tls.cert_file = Some(client_cert);
    config.kafka.tls.key_file = Some(client_key);
    let mut relay = spawn_relay_process_with_env(&env, &config, &[]);
    wait_all_marked(&env, &mut relay, 2).await;
}

/// [`ALICE`] as a broker's ACLs name her.
const ALICE_PRINCIPAL: &str = "User:alice";

/// What the README says the principal of an exactly-once relay needs besides `Write` on its
/// topics ("With ACLs"): every ACL of `config`'s transactional ids and progress topic.
fn exactly_once_acls(config: &Config) -> Vec<Acl> {
    let progress = Resource::Topic(config.kafka.exactly_once.progress_topic.clone());
    // The relay's transactional ids are `PREFIX.DATABASE.SCHEMA.TABLE.*`.
    let ids = Resource::TransactionalIdsPrefixed(format!("{}.", config.kafka.exactly_once.transactional_id_prefix));
    vec![
        Acl::allow(Operation::Write, ids),
        Acl::allow(Operation::Write, progress.clone()),
        Acl::allow(Operation::Read, progress.clone()),
        Acl::allow(Operation::DescribeConfigs, progress),
    ]
}

/// An exactly-once configuration as [`ALICE`] over SASL_SSL, with a compacted progress topic the
/// super user created and transactional ids of its own, on which Alice holds nothing yet.
async fn exactly_once_as_alice(env: &TestEnv, ca: &TestCa, broker: &SecuredKafka) -> Config {
    let mut config = alice_over_sasl_ssl(env, ca, broker);
    config.kafka.delivery = Delivery::ExactlyOnce;
    let super_user = client(&broker.super_user_address(), &[]);
    config.kafka.exactly_once.progress_topic = create_topic_with(&super_user, &[("cleanup.policy", "compact")]).await;
    config.kafka.exactly_once.transactional_id_prefix = unique_name("relay");
    config
}

/// Writes a record of another table's relay to `config`'s progress topic, as the super user
/// `super_user`: a relay then reads records from the topic when it takes its shards, as every
/// relay does once a relay of the topic has committed (on an empty topic it has nothing to read).
async fn write_another_relays_progress(super_user: &str, config: &Config) {
    let producer: FutureProducer = client(super_user, &[]).create().expect("producer");
    let record =
        FutureRecord::to(&config.kafka.exactly_once.progress_topic).key("another.db.public.outbox.0").payload("{}");
    producer.send(record, PATIENCE).await.unwrap_or_else(|(e, _)| panic!("another relay's progress record: {e}"));
}

/// The ACL the README advises besides: `Describe` on the group the progress reader is configured
/// with. It joins no group and commits nothing, but librdkafka looks the group's coordinator up,
/// and without the ACL logs the refusal as an error (the reads go on).
fn progress_reader_group_acl() -> Acl {
    Acl::allow(Operation::Describe, Resource::Group("outbox-relay-progress".to_owned()))
}

/// A database, and a broker that enforces ACLs, with alice as its one SCRAM user, and a topic
/// (created by the super user).
async fn with_acls_enforced() -> (TestEnv, TestCa, SecuredKafka, String) {
    let env = TestEnv::start().await;
    env.migrate().await;
    let ca = TestCa::new(&env.path(""), "kafka");
    let broker = SecuredKafka::start_with_acls(&ca, &[ALICE]).await;
    let topic = create_topic(&client(&broker.super_user_address(), &[])).await;
    (env, ca, broker, topic)
}

/// The README's ACLs are enough: on a broker that enforces ACLs, a principal granted `Write` on
/// the topic, [`exactly_once_acls`] and [`progress_reader_group_acl`], nothing more, publishes a
/// backlog in transactions, and again after a restart (which reads the shards' progress records
/// back), without a refusal in its log; `read_committed` consumers see each row once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_with_only_the_documented_acls_publishes_every_row_once() {
    let (env, ca, broker, topic) = with_acls_enforced().await;
    let super_user = broker.super_user_address();
    let config = exactly_once_as_alice(&env, &ca, &broker).await;
    let mut acls = exactly_once_acls(&config);
    acls.push(Acl::allow(Operation::Write, Resource::Topic(topic.clone())));
    acls.push(progress_reader_group_acl());
    kafka_acls::grant(&super_user, ALICE_PRINCIPAL, &acls);
    let db = env.client().await;
    insert_backlog(&db, &topic, 0..300, 7).await;

    let mut first = spawn_relay_process_with_env(&env, &config, &[]);
    wait_all_marked(&env, &mut first, 300).await;
    first.signal(libc::SIGTERM);
    assert_eq!(first.wait().await, Some(0), "log:\n{}", first.log());
    insert_backlog(&db, &topic, 300..400, 7).await;
    let mut second = spawn_relay_process_with_env(&env, &config, &[]);
    wait_all_marked(&env, &mut second, 400).await;

    let records = read_topic(&super_user, &topic).await;
    let on_topic: HashSet<String> = records.iter().map(|r| r.event_id()).collect();
    assert_eq!(on_topic, all_event_ids(&db).await, "every row reached read_committed consumers");
    assert_eq!(records.len(), on_topic.len(), "and none twice");
    for log in [first.log(), second.log()] {
        assert!(!log.to_ascii_lowercase().contains("authorization failed"), "nothing was refused:\n{log}");
    }
}

/// Each of the README's ACLs is needed: without any one of them, the relay exits at startup with
/// code 2 and a line naming what is missing, rather than retrying forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_without_one_of_the_documented_acls_exits_2_at_startup_naming_it() {
    let (env, ca, broker, topic) = with_acls_enforced().await;
    let super_user = broker.super_user_address();
    kafka_acls::grant(&super_user, ALICE_PRINCIPAL, &[Acl::allow(Operation::Write, Resource::Topic(topic.clone()))]);
    insert(&env, &topic, 3).await;

    for missing in 0..exactly_once_acls(&env.config()).len() {
        // Each case has its own progress topic and transactional ids, so the grants of one do
        // not serve another.
        let config = exactly_once_as_alice(&env, &ca, &broker).await;
        write_another_relays_progress(&super_user, &config).await;
        let mut granted = exactly_once_acls(&config);
        let withheld = granted.remove(missing);
        kafka_acls::grant(&super_user, ALICE_PRINCIPAL, &granted);

        eprintln!("the relay's principal lacks {withheld}");
        let mut relay = spawn_relay_process_with_env(&env, &config, &[]);
        let code = relay.wait().await;
        let log = relay.log();
        let last = log.lines().last().unwrap_or_default();
        assert_eq!(code, Some(2), "without {withheld}: a configuration problem; log:\n{log}");
        let named = cause_of(&withheld).iter().all(|cause| last.contains(cause.as_str()));
        assert!(named, "without {withheld}: one line naming the cause:\n{log}");
        assert!(marked_event_ids(&env.client().await).await.is_empty(), "without {withheld}: no row may be marked");
    }
}

/// What the relay's last line says when `acl`, one of [`exactly_once_acls`], is missing.
fn cause_of(acl: &Acl) -> Vec<String> {
    let refused =
        |topic: &str, step: &str| vec![format!("refused the relay's principal access to topic {topic} ({step}")];
    match (&acl.resource, acl.operation) {
        (Resource::TransactionalIdsPrefixed(prefix), _) => {
            let grant = format!("needs Write on the transactional ids that start with \"{prefix}\"");
            vec![format!("refused the relay's principal transactional id {prefix}"), grant]
        }
        (Resource::Topic(topic), Operation::Write) => refused(topic, "writing to it"),
        (Resource::Topic(topic), Operation::Read) => refused(topic, "reading it"),
        (Resource::Topic(topic), _) => refused(topic, "describing its configuration"),
        (Resource::Group(_), _) => unreachable!("no group's ACL is needed"),
    }
}

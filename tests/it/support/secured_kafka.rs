//! Apache Kafka with its own TLS and SASL listeners, for the security tests: one node whose
//! certificate a test CA signed (a PEM keystore, as `ssl.keystore.type=PEM` reads it), with
//! SCRAM users created through Kafka's admin API.
//!
//! Every listener a test may want is open on every such node, each on its own port; a test
//! points its clients at the one it checks. The PLAINTEXT listener stays: the node's brokers and
//! controller talk over it, and the SCRAM users are created through it (no user can log in
//! before one exists).
//!
//! A node started with [`SecuredKafka::start_with_acls`] enforces ACLs: a SCRAM user may do only
//! what a test grants it ([`super::kafka_acls`]). The PLAINTEXT and controller listeners'
//! principal, `User:ANONYMOUS`, is its super user: the node itself, and the test creating users,
//! topics and ACLs and reading topics back.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

use super::environment::{PATIENCE, free_ports, wait_until};
use super::kafka::{self, Kafka};
use super::tls::TestCa;

/// A way in to a [`SecuredKafka`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// TLS: the broker shows its certificate and asks for none.
    Ssl,
    /// TLS, and the client must show a certificate the test CA signed.
    SslWithClientCertificate,
    /// SASL SCRAM over TLS.
    SaslSsl,
    /// SASL SCRAM over TLS, and a client certificate the test CA signed.
    SaslSslWithClientCertificate,
    /// SASL SCRAM without TLS.
    SaslPlaintext,
}

impl Listener {
    const ALL: [Listener; 5] = [
        Listener::Ssl,
        Listener::SslWithClientCertificate,
        Listener::SaslSsl,
        Listener::SaslSslWithClientCertificate,
        Listener::SaslPlaintext,
    ];

    /// The listener's name in the broker's configuration.
    fn name(self) -> &'static str {
        match self {
            Listener::Ssl => "SSL",
            Listener::SslWithClientCertificate => "SSL_CLIENT_CERT",
            Listener::SaslSsl => "SASL_SSL",
            Listener::SaslSslWithClientCertificate => "SASL_SSL_CLIENT_CERT",
            Listener::SaslPlaintext => "SASL_PLAINTEXT",
        }
    }

    fn protocol(self) -> &'static str {
        match self {
            Listener::Ssl | Listener::SslWithClientCertificate => "SSL",
            Listener::SaslSsl | Listener::SaslSslWithClientCertificate => "SASL_SSL",
            Listener::SaslPlaintext => "SASL_PLAINTEXT",
        }
    }

    fn wants_client_certificate(self) -> bool {
        matches!(self, Listener::SslWithClientCertificate | Listener::SaslSslWithClientCertificate)
    }

    fn sasl(self) -> bool {
        self.protocol().starts_with("SASL")
    }
}

/// A SCRAM user: name, password and mechanism (`SCRAM-SHA-256` or `SCRAM-SHA-512`).
pub type ScramUser<'a> = (&'a str, &'a str, &'a str);

/// A running single-node Apache Kafka with TLS and SASL listeners; killed on drop.
pub struct SecuredKafka {
    kafka: Kafka,
    /// Each listener's port, in [`Listener::ALL`]'s order.
    ports: Vec<u16>,
    /// The broker's private key (PEM).
    key_file: PathBuf,
}

impl SecuredKafka {
    /// Starts a node whose certificate (for `localhost`) `ca` signs, and which trusts client
    /// certificates `ca` signs, then creates `users`.
    pub async fn start(ca: &TestCa, users: &[ScramUser<'_>]) -> SecuredKafka {
        Self::start_with(ca, users, &[]).await
    }

    /// As [`SecuredKafka::start`], on a node that enforces ACLs (Kafka's `StandardAuthorizer`):
    /// `users` may do nothing a test does not grant them; the PLAINTEXT listener
    /// ([`SecuredKafka::super_user_address`]) may do everything.
    pub async fn start_with_acls(ca: &TestCa, users: &[ScramUser<'_>]) -> SecuredKafka {
        let authorizer = [
            "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "super.users=User:ANONYMOUS",
            // Kafka's default, written out: a resource without ACLs is nobody's but the super user's.
            "allow.everyone.if.no.acl.found=false",
        ];
        Self::start_with(ca, users, &authorizer).await
    }

    async fn start_with(ca: &TestCa, users: &[ScramUser<'_>], properties: &[&str]) -> SecuredKafka {
        let (cert, key) = ca.issue("broker", &["localhost"]);
        // A PEM keystore is the private key (PKCS#8) followed by the certificate chain.
        let keystore = cert.with_file_name("broker-keystore.pem");
        let pem = [std::fs::read_to_string(&key).expect("broker key"), std::fs::read_to_string(&cert).expect("cert")];
        std::fs::write(&keystore, pem.concat()).expect("write the broker's keystore");

        let (kafka, ports) =
            Self::start_node(&keystore.display().to_string(), &ca.ca_file().display().to_string(), properties);
        let kafka = SecuredKafka { kafka, ports, key_file: key };
        for (name, password, mechanism) in users {
            create_scram_user(&kafka.kafka, name, password, mechanism);
        }
        for user in users {
            kafka.wait_until_logged_in(user).await;
        }
        kafka
    }

    /// Starts the node with every listener and the extra broker `properties`; returns it and
    /// each listener's port.
    fn start_node(keystore: &str, truststore: &str, extra: &[&str]) -> (Kafka, Vec<u16>) {
        for _ in 0..3 {
            let mut ports = free_ports(Listener::ALL.len() + 2);
            let (client, controller) = (ports.remove(0), ports.remove(0));
            let mut listeners =
                vec![format!("PLAINTEXT://127.0.0.1:{client}"), format!("CONTROLLER://127.0.0.1:{controller}")];
            let mut advertised = vec![format!("PLAINTEXT://127.0.0.1:{client}")];
            let mut protocols = vec!["PLAINTEXT:PLAINTEXT".to_owned(), "CONTROLLER:PLAINTEXT".to_owned()];
            // Later keys override the script's `listeners`, `advertised.listeners` and map.
            let mut properties = vec![
                "ssl.keystore.type=PEM".to_owned(),
                format!("ssl.keystore.location={keystore}"),
                "ssl.truststore.type=PEM".to_owned(),
                format!("ssl.truststore.location={truststore}"),
                "sasl.enabled.mechanisms=SCRAM-SHA-256,SCRAM-SHA-512".to_owned(),
            ];
            for (listener, port) in Listener::ALL.iter().zip(&ports) {
                let name = listener.name();
                listeners.push(format!("{name}://127.0.0.1:{port}"));
                // The certificate names localhost, and clients check the name they connect to.
                advertised.push(format!("{name}://localhost:{port}"));
                protocols.push(format!("{name}:{}", listener.protocol()));
                let prefix = format!("listener.name.{}", name.to_ascii_lowercase());
                if listener.wants_client_certificate() {
                    properties.push(format!("{prefix}.ssl.client.auth=required"));
                }
                if listener.sasl() {
                    for mechanism in ["scram-sha-256", "scram-sha-512"] {
                        properties.push(format!(
                            "{prefix}.{mechanism}.sasl.jaas.config=\
                             org.apache.kafka.common.security.scram.ScramLoginModule required;"
                        ));
                    }
                }
            }
            properties.push(format!("listeners={}", listeners.join(",")));
            properties.push(format!("advertised.listeners={}", advertised.join(",")));
            properties.push(format!("listener.security.protocol.map={}", protocols.join(",")));
            properties.extend(extra.iter().map(|p| p.to_string()));
            let properties: Vec<&str> = properties.iter().map(String::as_str).collect();
            let mut kafka = Kafka::prepare_on(&[client, controller], &properties);
            if kafka.start_all() {
                return (kafka, ports);
            }
            // A port taken between choosing it and binding it: try others.
            kafka.stop_all();
        }
        panic!("Apache Kafka with TLS and SASL listeners did not start; see the logs above");
    }

    /// `localhost:PORT` of `listener`, for `bootstrap.servers`.
    pub fn address(&self, listener: Listener) -> String {
        let index = Listener::ALL.iter().position(|l| *l == listener).expect("a listener");
        format!("localhost:{}", self.ports[index])
    }

    /// `127.0.0.1:PORT` of the PLAINTEXT listener, for `bootstrap.servers`: on a node started
    /// with [`SecuredKafka::start_with_acls`], its clients are the super user.
    pub fn super_user_address(&self) -> String {
        self.kafka.address()
    }

    /// The broker's private key (PEM), which no client may ever show.
    pub fn key_file(&self) -> &Path {
        &self.key_file
    }

    /// Waits until `user` can log in: the broker learns of a new credential from its metadata
    /// log a moment after the admin call returns.
    async fn wait_until_logged_in(&self, (name, password, mechanism): &ScramUser<'_>) {
        let address = self.address(Listener::SaslPlaintext);
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", &address)
            .set("security.protocol", "sasl_plaintext")
            .set("sasl.mechanisms", *mechanism)
            .set("sasl.username", *name)
            .set("sasl.password", *password);
        wait_until(PATIENCE, &format!("SCRAM user {name} can log in"), || {
            let client = client.clone();
            async move {
                tokio::task::spawn_blocking(move || {
                    let consumer: BaseConsumer = client.create().expect("client");
                    consumer.fetch_metadata(None, Duration::from_secs(5)).is_ok()
                })
                .await
                .expect("log-in attempt")
            }
        })
        .await;
    }
}

/// Creates (or updates) a SCRAM credential with Kafka's own `kafka-configs` tool
/// (`kafka.admin.ConfigCommand`, which calls `Admin.alterUserScramCredentials`) over the
/// PLAINTEXT listener.
fn create_scram_user(kafka: &Kafka, name: &str, password: &str, mechanism: &str) {
    let out = Command::new(std::env::var("JAVA").unwrap_or_else(|_| "java".to_owned()))
        .arg("-cp")
        .arg(kafka::jars().join("*"))
        .arg("kafka.admin.ConfigCommand")
        .args(["--bootstrap-server", &kafka.address()])
        .args(["--alter", "--entity-type", "users", "--entity-name", name])
        .args(["--add-config", &format!("{mechanism}=[password={password}]")])
        .output()
        .expect("run kafka.admin.ConfigCommand");
    assert!(
        out.status.success(),
        "creating SCRAM user {name} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

//! TLS for the security tests: a throwaway certificate authority, and a TLS-terminating proxy
//! in front of tansu. tansu 0.6 cannot switch TLS on from its command line (its `--cert` and
//! `--key` are declared mutually exclusive), so the tests put TLS where many deployments put it
//! anyway: in front of the broker, which advertises the proxy's address.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use openssl::ssl::{Ssl, SslAcceptor, SslFiletype, SslMethod, SslVerifyMode};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A certificate authority that lives for one test.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    dir: PathBuf,
    ca_file: PathBuf,
}

impl TestCa {
    /// A new CA whose certificate is written to `dir/<name>-ca.pem`.
    pub fn new(dir: &Path, name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, format!("outbox-relay test CA {name}"));
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        let ca_file = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&ca_file, cert.pem()).expect("write CA certificate");
        TestCa { issuer: Issuer::new(params, key), dir: dir.to_owned(), ca_file }
    }

    /// The CA's certificate (PEM).
    pub fn ca_file(&self) -> PathBuf {
        self.ca_file.clone()
    }

    /// A certificate for `names` (host names or IP addresses) signed by this CA, written to
    /// `dir/<stem>.pem` with its private key in `dir/<stem>.key` (mode 0600).
    pub fn issue(&self, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).expect("certificate params");
        params.distinguished_name.push(DnType::CommonName, names.first().cloned().unwrap_or_default());
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("certificate");
        let cert_file = self.dir.join(format!("{stem}.pem"));
        let key_file = self.dir.join(format!("{stem}.key"));
        std::fs::write(&cert_file, cert.pem()).expect("write certificate");
        std::fs::write(&key_file, key.serialize_pem()).expect("write key");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).expect("key file mode");
        (cert_file, key_file)
    }
}

/// Accepts TLS on a loopback port and forwards the plaintext to an upstream address.
pub struct TlsProxy {
    /// The port clients connect to.
    pub port: u16,
    upstream: Arc<OnceLock<SocketAddr>>,
    task: JoinHandle<()>,
}

impl TlsProxy {
    /// Listens with `cert`/`key`; with `client_ca`, a client must present a certificate signed
    /// by it. Connections are forwarded once [`TlsProxy::forward_to`] names the upstream.
    pub async fn start(cert: &Path, key: &Path, client_ca: Option<&Path>) -> TlsProxy {
        let mut acceptor = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server()).expect("acceptor");
        acceptor.set_certificate_chain_file(cert).expect("proxy certificate");
        acceptor.set_private_key_file(key, SslFiletype::PEM).expect("proxy key");
        if let Some(ca) = client_ca {
            acceptor.set_ca_file(ca).expect("client CA");
            acceptor.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
        }
        let acceptor = Arc::new(acceptor.build());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let upstream: Arc<OnceLock<SocketAddr>> = Arc::default();
        let target = upstream.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let target = target.clone();
                tokio::spawn(async move {
                    let Some(&upstream) = target.get() else { return };
                    let Ok(ssl) = Ssl::new(acceptor.context()) else { return };
                    let Ok(mut tls) = tokio_openssl::SslStream::new(ssl, client) else { return };
                    // A client that fails the handshake (wrong CA, no certificate) is dropped.
                    if Pin::new(&mut tls).accept().await.is_err() {
                        return;
                    }
                    if let Ok(mut server) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut server).await;
                    }
                });
            }
        });
        TlsProxy { port, upstream, task }
    }

    /// Where accepted connections go (`127.0.0.1:PORT`).
    pub fn forward_to(&self, upstream: &str) {
        let address = upstream.parse().expect("upstream address");
        let _ = self.upstream.set(address);
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

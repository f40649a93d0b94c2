//! TLS for the security tests: a throwaway certificate authority that signs the brokers',
//! PostgreSQL's and the relay's certificates.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

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

//! TLS for the listeners that serve it (rustls, ring): TLS 1.2 and 1.3
//! only, rustls's cipher suites (forward-secret AEAD ones only), ALPN `h2`
//! and `http/1.1`. The certificate chain and key come from PEM files and
//! can be swapped while serving ([`Tls::reload`]): new handshakes get the
//! new certificate, connections already open keep theirs.

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why a certificate or key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {}: {io}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        io: std::io::Error,
    },
    #[error("{}: no certificate in it (expected a PEM \"BEGIN CERTIFICATE\" block)", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: not a PEM certificate chain: {reason}", path.display())]
    BadCertificate { path: PathBuf, reason: String },
    #[error("{}: no private key in it (expected a PEM PKCS#8, RSA or EC private key)", path.display())]
    NoKey { path: PathBuf },
    #[error("{}: unusable private key: {reason}", path.display())]
    BadKey { path: PathBuf, reason: String },
    #[error("the private key {} does not match the certificate {}", key.display(), cert.display())]
    Mismatch { cert: PathBuf, key: PathBuf },
}

/// Where the certificate chain and its key are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// Reads and checks both files.
    pub fn load(&self) -> Result<CertifiedKey, TlsError> {
        let read = |what, path: &Path| {
            std::fs::read(path).map_err(|io| TlsError::Read {
                what,
                path: path.to_path_buf(),
                io,
            })
        };
        let cert_pem = read("certificate", &self.cert)?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| TlsError::BadCertificate {
                path: self.cert.clone(),
                reason: e.to_string(),
            })?;
        if chain.is_empty() {
            return Err(TlsError::NoCertificate {
                path: self.cert.clone(),
            });
        }
        let key_pem = read("private key", &self.key)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
            rustls_pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
                path: self.key.clone(),
            },
            e => TlsError::BadKey {
                path: self.key.clone(),
                reason: e.to_string(),
            },
        })?;
        let provider = rustls::crypto::ring::default_provider();
        let signer = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| TlsError::BadKey {
                path: self.key.clone(),
                reason: e.to_string(),
            })?;
        let certified = CertifiedKey::new(chain, signer);
        match certified.keys_match() {
            Ok(()) => Ok(certified),
            // A certificate whose public key cannot be read (unusual
            // algorithms) cannot be checked here; rustls checks at use.
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
                Ok(certified)
            }
            Err(_) => Err(TlsError::Mismatch {
                cert: self.cert.clone(),
                key: self.key.clone(),
            }),
        }
    }
}

/// The server's TLS: a configuration whose certificate can be swapped.
pub struct Tls {
    current: Arc<Current>,
    config: Arc<ServerConfig>,
    files: ArcSwap<TlsFiles>,
}

/// The certificate every new handshake gets.
#[derive(Debug)]
struct Current(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

impl Tls {
    /// Loads the certificate and key; errors name the file and what is
    /// wrong with it.
    pub fn new(files: TlsFiles) -> Result<Tls, TlsError> {
        let key = files.load()?;
        let current = Arc::new(Current(ArcSwap::from_pointee(key)));
        let mut config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
                .expect("rustls supports TLS 1.2 and 1.3 with ring")
                .with_no_client_auth()
                .with_cert_resolver(current.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        // The server's order of cipher suites (strongest first), not the
        // client's.
        config.ignore_client_order = true;
        Ok(Tls {
            current,
            config: Arc::new(config),
            files: ArcSwap::from_pointee(files),
        })
    }

    /// Reads `files` again (they may be other files) and, if they are
    /// good, serves their certificate to new connections. On error the
    /// previous certificate stays.
    pub fn reload(&self, files: TlsFiles) -> Result<(), TlsError> {
        let key = files.load()?;
        self.current.0.store(Arc::new(key));
        self.files.store(Arc::new(files));
        Ok(())
    }

    /// The files the certificate in use came from.
    pub fn files(&self) -> Arc<TlsFiles> {
        self.files.load_full()
    }

    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.clone())
    }
}

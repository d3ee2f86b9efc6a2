//! TLS termination: HTTPS, WSS and HTTP/2 over TLS on the server's one port, with rustls.
//!
//! This module owns:
//! - loading the certificate chain and private key (`tls_cert`, `tls_key`: PEM; a chain of
//!   `CERTIFICATE` blocks, leaf first; a PKCS#8, PKCS#1 RSA or SEC1 EC key) and refusing
//!   one that cannot work (unreadable, not PEM, no certificate, a key of an unsupported kind
//!   or that does not belong to the leaf certificate) with a message naming the file;
//! - the rustls server configuration: TLS 1.2 and 1.3 with rustls' safe defaults, the `ring`
//!   crypto provider (passed explicitly, so no process-wide default is needed), no client
//!   certificates, and ALPN `h2` then `http/1.1`;
//! - reloading on SIGHUP: the configuration's certificate comes from a [`CertStore`], a
//!   `ResolvesServerCert` holding the current `Arc<CertifiedKey>` behind a lock. A reload
//!   builds a complete new `CertifiedKey` from the files first and swaps it in only when
//!   that succeeded, so a bad file leaves the old certificate in force. Each handshake takes
//!   the certificate current when its ClientHello arrives; established connections (and
//!   their SSE streams and WebSockets) are never touched by a reload.
//!
//! What it does not own: the accept loop (`server.rs`) runs the handshake over the
//! connection's [`crate::limits::WatchedIo`], so connection caps and slow-client timers see
//! TLS connections like any other, and bounds the handshake by the header read timeout.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::config::Config;

/// The ALPN protocol id of HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";
/// The ALPN protocol id of HTTP/1.1.
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// Why a certificate or key cannot be used. Each message names the file concerned.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("TLS {what} {}: cannot read it: {source}", path.display())]
    Read {
        /// `certificate` or `key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file is not well-formed PEM, or holds no block of the kind wanted.
    #[error("TLS {what} {}: {detail}", path.display())]
    Pem {
        /// `certificate` or `key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// The key is of a kind the crypto provider cannot sign with, or does not belong to the
    /// first (leaf) certificate of the chain.
    #[error("TLS key {} does not fit certificate {}: {detail}", key.display(), cert.display())]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls' reason.
        detail: String,
    },
    /// rustls refused the configuration (not expected with the built-in provider).
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// The server's certificate and key, swappable while the server runs.
///
/// Guarantees: [`CertStore::resolve`](ResolvesServerCert::resolve) always returns a complete
/// certificate/key pair that was loaded and checked together (never a new certificate with an
/// old key); [`CertStore::reload`] either replaces the pair as a whole or leaves it as it was.
pub struct CertStore {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

impl CertStore {
    /// Loads `cert_path` and `key_path` and checks that they belong together.
    pub fn load(
        cert_path: &Path,
        key_path: &Path,
        provider: Arc<CryptoProvider>,
    ) -> Result<CertStore, TlsError> {
        let key = load_certified_key(cert_path, key_path, &provider)?;
        Ok(CertStore {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            provider,
            current: RwLock::new(Arc::new(key)),
        })
    }

    /// Reads the same two files again and, if they are usable, makes them the certificate
    /// of every handshake from now on. On an error nothing changes.
    pub fn reload(&self) -> Result<(), TlsError> {
        let key = load_certified_key(&self.cert_path, &self.key_path, &self.provider)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(key);
        Ok(())
    }

    /// The certificate/key pair new handshakes get now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// TLS for the server: the acceptor every connection's handshake runs through, and the
/// reloadable certificate behind it. Cheap to clone (shared).
#[derive(Clone)]
pub struct Tls {
    acceptor: TlsAcceptor,
    store: Arc<CertStore>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls").field("store", &self.store).finish()
    }
}

/// A finished server-side TLS handshake.
pub struct Handshaken<IO> {
    /// The encrypted stream, ready for HTTP.
    pub stream: TlsStream<IO>,
    /// ALPN chose `h2`: the client speaks HTTP/2 on this connection.
    pub h2: bool,
}

impl Tls {
    /// The TLS `config` asks for: `None` when neither `tls_cert` nor `tls_key` is set.
    /// Guarantees: `Some` only with a certificate and key that were read, parsed and found
    /// to belong together; one set without the other is an error (as in
    /// [`Config::validate`]).
    pub fn from_config(config: &Config) -> Result<Option<Tls>, TlsError> {
        match (&config.tls_cert, &config.tls_key) {
            (None, None) => Ok(None),
            (Some(cert), Some(key)) => Tls::from_files(cert, key).map(Some),
            (Some(cert), None) => Err(TlsError::Pem {
                what: "certificate",
                path: cert.clone(),
                detail: "tls_cert is set but tls_key is not: set both or neither".into(),
            }),
            (None, Some(key)) => Err(TlsError::Pem {
                what: "key",
                path: key.clone(),
                detail: "tls_key is set but tls_cert is not: set both or neither".into(),
            }),
        }
    }

    /// TLS with the certificate chain in `cert` and the private key in `key` (PEM files),
    /// offering ALPN `h2` and `http/1.1`.
    pub fn from_files(cert: &Path, key: &Path) -> Result<Tls, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let store = Arc::new(CertStore::load(cert, key, provider.clone())?);
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(store.clone());
        config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()];
        Ok(Tls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            store,
        })
    }

    /// Runs the server side of a handshake over `io`. Unbounded in time: the caller bounds
    /// it (the server uses the header read timeout).
    pub async fn accept<IO>(&self, io: IO) -> std::io::Result<Handshaken<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let stream = self.acceptor.accept(io).await?;
        let h2 = stream.get_ref().1.alpn_protocol() == Some(ALPN_H2);
        Ok(Handshaken { stream, h2 })
    }

    /// Reloads the certificate and key from their files (see [`CertStore::reload`]): new
    /// handshakes get the new pair, open connections keep theirs; on an error the old pair
    /// stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        self.store.reload()
    }

    /// The leaf certificate new handshakes present now.
    pub fn current_leaf(&self) -> Option<CertificateDer<'static>> {
        self.store.current().cert.first().cloned()
    }
}

/// Reloads `tls` on every SIGHUP until the process ends, logging the outcome (an error
/// keeps the old certificate). Registering the handler replaces SIGHUP's default action
/// (terminate), so from the first call on SIGHUP never stops the server. Returns at once,
/// with an error, when the handler cannot be registered.
#[cfg(unix)]
pub fn reload_on_sighup(tls: Tls) -> std::io::Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup())?;
    Ok(tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let store = tls.store.clone();
            let outcome = tokio::task::spawn_blocking(move || store.reload()).await;
            match outcome {
                Ok(Ok(())) => tracing::info!(
                    cert = %tls.store.cert_path.display(),
                    "SIGHUP: TLS certificate reloaded; new connections use it"
                ),
                Ok(Err(e)) => tracing::error!(
                    error = %e,
                    "SIGHUP: TLS reload failed; keeping the previous certificate"
                ),
                Err(e) => tracing::error!(
                    error = %e,
                    "SIGHUP: TLS reload task failed; keeping the previous certificate"
                ),
            }
        }
    }))
}

/// Reads and checks one certificate/key pair.
fn load_certified_key(
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain = read_chain(cert_path)?;
    let key = read_key(key_path)?;
    let certified =
        CertifiedKey::from_der(chain, key, provider).map_err(|e| TlsError::Mismatch {
            cert: cert_path.to_path_buf(),
            key: key_path.to_path_buf(),
            detail: e.to_string(),
        })?;
    // `from_der` lets a pair pass whose consistency it cannot tell; refuse that too, so a
    // wrong key fails at start-up rather than in every handshake.
    certified.keys_match().map_err(|e| TlsError::Mismatch {
        cert: cert_path.to_path_buf(),
        key: key_path.to_path_buf(),
        detail: e.to_string(),
    })?;
    Ok(certified)
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file("certificate", path)?;
    let bad = |detail: String| TlsError::Pem {
        what: "certificate",
        path: path.to_path_buf(),
        detail,
    };
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not valid PEM: {e}")))?;
    if chain.is_empty() {
        return Err(bad("no CERTIFICATE block found".into()));
    }
    Ok(chain)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_file("key", path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Pem {
        what: "key",
        path: path.to_path_buf(),
        detail: match e {
            rustls_pki_types::pem::Error::NoItemsFound => {
                "no PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY block found".into()
            }
            e => format!("not valid PEM: {e}"),
        },
    })
}

//! TLS for the WSS and HTTPS listeners (rustls): loading the certificate and key, and
//! accepting TLS connections without letting one slow handshake hold up the others.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use super::Transport;
use crate::hub::Hub;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{key}: cannot read {path}: {source}")]
    Read { key: &'static str, path: PathBuf, source: io::Error },
    #[error("{key}: {path} holds no PEM {what}")]
    Empty { key: &'static str, path: PathBuf, what: &'static str },
    #[error("{key}: {path} is not valid PEM: {message}")]
    Pem { key: &'static str, path: PathBuf, message: String },
    #[error("tls: certificate {cert} and key {key} do not make a usable pair: {source}")]
    Pair { cert: PathBuf, key: PathBuf, source: rustls::Error },
}

/// The process-wide rustls crypto provider (ring). Installing twice is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Builds the server config from PEM files; every error names the config key and file.
pub fn load(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    install_crypto_provider();
    let read = |k: &'static str, path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read { key: k, path: path.to_path_buf(), source })
    };
    let cert_pem = read("tls.cert", cert)?;
    let key_pem = read("tls.key", key)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem { key: "tls.cert", path: cert.to_path_buf(), message: e.to_string() })?;
    if chain.is_empty() {
        return Err(TlsError::Empty { key: "tls.cert", path: cert.to_path_buf(), what: "CERTIFICATE" });
    }
    let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => {
            TlsError::Empty { key: "tls.key", path: key.to_path_buf(), what: "PRIVATE KEY" }
        }
        other => TlsError::Pem { key: "tls.key", path: key.to_path_buf(), message: other.to_string() },
    })?;
    let mut config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|source| TlsError::Pair { cert: cert.to_path_buf(), key: key.to_path_buf(), source })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Accepts TCP, completes the TLS handshake within `deadline` in its own task, and yields
/// finished streams. Used by both TLS listeners.
fn spawn_handshakes(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    deadline: Duration,
    stop: CancellationToken,
    tracker: TaskTracker,
) -> mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)> {
    let (tx, rx) = mpsc::channel(64);
    tracker.clone().spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let (stream, remote) = match accepted {
                Ok(ok) => ok,
                Err(e) => {
                    super::accept_backoff(&e).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tracker.spawn(async move {
                match tokio::time::timeout(deadline, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send((tls, remote)).await;
                    }
                    Ok(Err(e)) => debug!(%remote, error = %e, "TLS handshake failed"),
                    Err(_) => debug!(%remote, "TLS handshake timed out"),
                }
            });
        }
    });
    rx
}

/// Accepts WSS clients until shutdown.
pub async fn accept_loop_wss(listener: TcpListener, acceptor: TlsAcceptor, hub: Arc<Hub>, tracker: TaskTracker) {
    let deadline = hub.config().limits.connect_timeout;
    let stop = hub.shutdown_token().clone();
    let mut rx = spawn_handshakes(listener, acceptor, deadline, stop.clone(), tracker.clone());
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => return,
            next = rx.recv() => next,
        };
        let Some((stream, remote)) = next else { return };
        tracker.spawn(super::ws::serve_connection(stream, remote, Transport::Wss, hub.clone()));
    }
}

/// A TLS listener for `axum::serve`: the HTTP API over HTTPS.
#[derive(Debug)]
pub struct HttpsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl HttpsListener {
    pub fn new(listener: TcpListener, acceptor: TlsAcceptor, hub: &Hub, tracker: TaskTracker) -> io::Result<Self> {
        let local = listener.local_addr()?;
        let deadline = hub.config().limits.connect_timeout;
        let rx = spawn_handshakes(listener, acceptor, deadline, hub.shutdown_token().clone(), tracker);
        Ok(Self { rx, local })
    }
}

impl axum::serve::Listener for HttpsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(conn) => conn,
            // The accept task ended at shutdown; axum stops calling accept once its own
            // graceful-shutdown signal fires, so waiting forever here is correct.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

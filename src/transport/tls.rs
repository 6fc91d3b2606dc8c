//! TLS for the WSS and HTTPS listeners (rustls): loading the certificate and key, and the
//! WSS accept loop (HTTPS is served by `api::serve`).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
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

/// Accepts WSS clients until shutdown. A connection slot is taken before the TLS
/// handshake, so handshakes in flight count toward `limits.max_connections`, and the
/// handshake plus the WebSocket upgrade share one `limits.connect_timeout`.
pub async fn accept_loop_wss(listener: TcpListener, acceptor: TlsAcceptor, hub: Arc<Hub>, tracker: TaskTracker) {
    let stop = hub.shutdown_token();
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
        let Some(guard) = hub.try_admit() else {
            hub.metrics().rejected(None, Transport::Wss, crate::protocol::ErrorCode::TooManyConnections.as_str());
            debug!(%remote, "WSS connection refused: limits.max_connections reached");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (acceptor, hub) = (acceptor.clone(), hub.clone());
        tracker.spawn(async move {
            let deadline = Instant::now() + hub.config().limits.connect_timeout;
            match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    super::ws::serve_connection(tls, remote, Transport::Wss, hub, Some(guard), deadline).await
                }
                Ok(Err(e)) => {
                    hub.metrics().rejected(None, Transport::Wss, "tls_handshake_failed");
                    debug!(%remote, error = %e, "TLS handshake failed");
                }
                Err(_) => {
                    hub.metrics().rejected(None, Transport::Wss, crate::protocol::ErrorCode::ConnectTimeout.as_str());
                    debug!(%remote, "TLS handshake timed out");
                }
            }
        });
    }
}

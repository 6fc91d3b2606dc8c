//! Serving the API router over HTTP or HTTPS, with the limits axum's defaults lack: a cap
//! on concurrent connections, deadlines for the TLS handshake, the request headers and the
//! whole request, and a graceful stop that the node triggers only after its clients have
//! drained (so `/healthz` can report 503 while they do).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::ApiError;

/// Bounds for one HTTP listener.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    pub request_timeout: Duration,
}

/// Fails a request that takes longer than `limit` to be read and answered.
pub(super) async fn request_deadline(limit: Duration, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => {
            ApiError::new(StatusCode::REQUEST_TIMEOUT, "request_timeout", "the request took too long").into_response()
        }
    }
}

/// Serves `router` on `listener` (over TLS when `tls` is given) until `stop` is cancelled,
/// then lets open requests finish within `drain`.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    router: Router,
    limits: HttpLimits,
    stop: CancellationToken,
    drain: Duration,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, remote) = match accepted {
            Ok(ok) => ok,
            Err(e) => {
                crate::transport::accept_backoff(&e).await;
                continue;
            }
        };
        // Over the cap, close at once rather than queue: the client retries elsewhere.
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            debug!(%remote, "HTTP connection refused: limits.max_http_connections reached");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (router, tls, watcher) = (router.clone(), tls.clone(), graceful.watcher());
        tokio::spawn(async move {
            let _permit = permit;
            match tls {
                None => serve_connection(stream, remote, router, watcher).await,
                Some(acceptor) => match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => serve_connection(tls, remote, router, watcher).await,
                    Ok(Err(e)) => debug!(%remote, error = %e, "TLS handshake failed"),
                    Err(_) => debug!(%remote, "TLS handshake timed out"),
                },
            }
        });
    }
    drop(listener);
    // Tells every open connection to finish its current request and close, then waits.
    let _ = tokio::time::timeout(drain, graceful.shutdown()).await;
}

async fn serve_connection<I>(io: I, remote: SocketAddr, router: Router, watcher: Watcher)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(router);
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .serve_connection(TokioIo::new(io), service);
    if let Err(e) = watcher.watch(conn).await {
        debug!(%remote, error = %e, "HTTP connection ended with an error");
    }
}

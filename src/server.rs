//! Start-up and shutdown: bind every enabled listener, build the hub, run the accept loops
//! and the HTTP API, and leave gracefully.
//!
//! Binding is separate from running so that callers (tests, the CLI) learn the actual
//! addresses, including ports picked by the OS, before any client connects.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::api::{self, serve::HttpLimits};
use crate::cluster::nats::{Cluster, ClusterError};
use crate::cluster::{self, Bound, NodeIdError, NodeInfo};
use crate::config::Config;
use crate::hub::Hub;
use crate::plugin::{PluginError, PluginSet};
use crate::transport::{tcp, tls, ws};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("{key}: cannot listen on {addr}: {source}")]
    Bind { key: &'static str, addr: SocketAddr, source: io::Error },
    #[error(transparent)]
    NodeId(#[from] NodeIdError),
    #[error(transparent)]
    Plugin(#[from] PluginError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

/// The actual address of each enabled listener.
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalAddrs {
    pub http: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
    pub tcp: Option<SocketAddr>,
    pub ws: Option<SocketAddr>,
    pub wss: Option<SocketAddr>,
    /// The operator listener (`/admin`, `/metrics`), when `[listeners.admin]` is on.
    pub admin: Option<SocketAddr>,
}

/// A node whose sockets are bound, ready to [`run`](Server::run).
pub struct Server {
    hub: Arc<Hub>,
    addrs: LocalAddrs,
    http: Option<TcpListener>,
    https: Option<TcpListener>,
    tcp: Option<TcpListener>,
    ws: Option<TcpListener>,
    wss: Option<TcpListener>,
    admin: Option<TcpListener>,
    tls: Option<TlsAcceptor>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("addrs", &self.addrs).field("tls", &self.tls.is_some()).finish_non_exhaustive()
    }
}

/// Listen backlog: room for a burst of connects (the kernel caps it at somaxconn).
const BACKLOG: u32 = 4096;

async fn bind(key: &'static str, enabled: bool, addr: SocketAddr) -> Result<Option<TcpListener>, StartError> {
    if !enabled {
        return Ok(None);
    }
    let listen = || -> io::Result<TcpListener> {
        let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(BACKLOG)
    };
    listen().map(Some).map_err(|source| StartError::Bind { key, addr, source })
}

fn local(l: &Option<TcpListener>) -> Option<SocketAddr> {
    l.as_ref().and_then(|l| l.local_addr().ok())
}

impl Server {
    /// Loads TLS material, binds every enabled listener and works out the node's identity and
    /// advertised addresses. Nothing is accepted until [`run`](Self::run).
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        tls::install_crypto_provider();
        let tls = match &config.tls {
            Some(t) => Some(TlsAcceptor::from(tls::load(&config.resolve(&t.cert), &config.resolve(&t.key))?)),
            None => None,
        };
        let id = cluster::node_id(&config)?;
        let l = &config.listeners;
        let http = bind("listeners.http.bind", l.http.enabled, l.http.bind).await?;
        let https = bind("listeners.https.bind", config.https_enabled(), l.https.bind).await?;
        let tcp = bind("listeners.tcp.bind", l.tcp.enabled, l.tcp.bind).await?;
        let ws = bind("listeners.ws.bind", l.ws.enabled, l.ws.bind).await?;
        let wss = bind("listeners.wss.bind", config.wss_enabled(), l.wss.bind).await?;
        let admin = bind("listeners.admin.bind", l.admin.enabled, l.admin.bind).await?;
        let addrs = LocalAddrs {
            http: local(&http),
            https: local(&https),
            tcp: local(&tcp),
            ws: local(&ws),
            wss: local(&wss),
            admin: local(&admin),
        };

        let (external, intranet, warnings) =
            cluster::advertise(&config, &Bound { tcp: addrs.tcp, ws: addrs.ws, wss: addrs.wss });
        let node = NodeInfo { id, external, intranet, warnings };
        let plugins = PluginSet::load(&config, 1)?;
        let clustered = config.cluster.is_some();
        let hub = Hub::new(config, node, plugins);
        if clustered {
            let cluster = Cluster::start(&hub, hub.node_record()).await?;
            hub.set_cluster(cluster);
        }
        Ok(Self { hub, addrs, http, https, tcp, ws, wss, admin, tls })
    }

    pub fn local_addrs(&self) -> LocalAddrs {
        self.addrs
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Serves until `shutdown` resolves, then stops accepting, tells every client to
    /// reconnect elsewhere, and waits up to `shutdown.grace` for connections to finish.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
        let Server { hub, addrs, http, https, tcp, ws, wss, admin, tls } = self;
        let node = hub.node();
        let show = |a: Option<SocketAddr>| a.map_or_else(|| "off".to_string(), |a| a.to_string());
        info!(
            node_id = %node.id,
            http = %show(addrs.http),
            https = %show(addrs.https),
            tcp = %show(addrs.tcp),
            ws = %show(addrs.ws),
            wss = %show(addrs.wss),
            admin = %show(addrs.admin),
            "switchboard listening"
        );
        info!(tcp_addr = %node.external.tcp_addr, ws_addr = %node.external.ws_addr, wss_addr = %node.external.wss_addr, "advertising to clients");
        for w in &node.warnings {
            warn!("{w}");
        }
        let config = hub.config();
        let public = [addrs.http, addrs.https].into_iter().flatten().any(|a| !a.ip().is_loopback());
        if config.demo.enabled && public {
            for (id, _) in config.apps.iter().filter(|(_, a)| a.dev_tokens) {
                warn!(app = %id, "anyone who reaches this node can get a token for any user of apps.{id} (dev_tokens with [demo] on): development machines only");
            }
        }

        // Client listeners and sessions stop first; the HTTP API stays up while they drain
        // (so /healthz can say 503) and stops last.
        let clients = TaskTracker::new();
        let stop_http = CancellationToken::new();
        let http_tasks = TaskTracker::new();
        let router = api::router(hub.clone());
        let limits = &hub.config().limits;
        let http_limits = HttpLimits {
            max_connections: limits.max_http_connections,
            handshake_timeout: limits.connect_timeout,
            request_timeout: limits.http_request_timeout,
        };
        let grace = hub.config().shutdown.grace;
        let admin = admin.map(|l| (l, None, api::admin_router(hub.clone())));
        let public =
            [(http, None), (https, tls.clone())].into_iter().map(|(l, tls)| l.map(|l| (l, tls, router.clone())));
        for (listener, tls, router) in public.chain([admin]).flatten() {
            http_tasks.spawn(api::serve::serve(listener, tls, router, http_limits, stop_http.clone(), grace));
        }
        if let Some(listener) = tcp {
            clients.spawn(tcp::accept_loop(listener, hub.clone(), clients.clone()));
        }
        if let Some(listener) = ws {
            clients.spawn(ws::accept_loop(listener, hub.clone(), clients.clone()));
        }
        if let (Some(listener), Some(acceptor)) = (wss, tls) {
            clients.spawn(tls::accept_loop_wss(listener, acceptor, hub.clone(), clients.clone()));
        }

        shutdown.await;
        let started = tokio::time::Instant::now();
        if let Some(cluster) = hub.cluster() {
            // Leave routing first and move every client to its new node, spread out.
            let window = hub.config().shutdown.drain_window;
            hub.drain(window).await;
            let _ = tokio::time::timeout(grace, async {
                while hub.connections() > 0 {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            })
            .await;
            cluster.membership.leave().await;
        }
        info!(connections = hub.connections(), ?grace, "shutting down: telling clients to reconnect");
        hub.shut_down();
        clients.close();
        if tokio::time::timeout(grace, clients.wait()).await.is_err() {
            warn!(remaining = hub.connections(), "grace period over; closing the rest");
        }
        stop_http.cancel();
        http_tasks.close();
        let left = grace.saturating_sub(started.elapsed()).max(std::time::Duration::from_secs(1));
        let _ = tokio::time::timeout(left, http_tasks.wait()).await;
        info!("stopped");
        Ok(())
    }
}

/// Binds and serves `config` until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    Server::bind(config).await?.run(shutdown).await
}

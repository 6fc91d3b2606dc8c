//! Configuration: the TOML schema, its defaults and its validation.
//!
//! Owns parsing `config.toml` into [`Config`] and checking it as a whole before anything
//! binds a port. It does not read certificates or open files other than the config itself;
//! that happens at start-up in `server`, with errors that name the key they came from.
//!
//! Every table is `deny_unknown_fields`: a typo is an error naming the key and line, never a
//! silently ignored setting.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

/// Everything a node needs to run. `Config::default()` is the embedded single-node default
/// minus apps; the `config.toml` at the repository root adds the `demo` app.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Who this node is and which addresses it tells clients to use.
    pub node: NodeConfig,
    /// The sockets this node listens on.
    pub listeners: Listeners,
    /// Certificate and key for the WSS and HTTPS listeners.
    pub tls: Option<TlsConfig>,
    /// Protection of the node against clients and app servers that send too much.
    pub limits: Limits,
    /// Liveness of client connections.
    pub heartbeat: Heartbeat,
    /// The HTTP push API's replay protection and fan-out bounds.
    pub push: PushConfig,
    /// The route API's bounds.
    pub route: RouteConfig,
    /// How the node leaves: how long clients get, how their reconnections are spread.
    pub shutdown: ShutdownConfig,
    /// Applications, keyed by app id. Users of different apps never see each other.
    pub apps: BTreeMap<String, AppConfig>,
    /// WebAssembly policy plugins (`[[plugins]]`), selected per app by name.
    pub plugins: Vec<PluginConfig>,
    /// Operator endpoints (`/admin/...`).
    pub admin: AdminConfig,
    /// Prometheus metrics at `GET /metrics`.
    pub metrics: MetricsConfig,
    /// The demo page at `GET /demo` (on in the repository's `config.toml`, off by default).
    pub demo: DemoConfig,
    /// Which web pages (origins) may call the HTTP API from a browser.
    pub cors: CorsConfig,
    /// Several nodes as one system, over NATS. Absent: a single node with no dependency.
    pub cluster: Option<ClusterConfig>,
    /// The directory relative paths in this config are resolved against (the config file's
    /// directory). Not a TOML key.
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// The file this config was read from, re-read by a plugin reload. Not a TOML key.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Stable node id. When absent, one is generated and kept in `data_dir/node-id` so a
    /// restarted node keeps its identity.
    pub id: Option<String>,
    /// Where the node keeps the little state it has (its generated id).
    pub data_dir: PathBuf,
    /// Addresses given to clients on the public side (`/route?intranet=0`).
    pub external: AdvertiseConfig,
    /// Addresses given to callers inside the data centre (`/route?intranet=1`).
    pub intranet: AdvertiseConfig,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            id: None,
            data_dir: PathBuf::from("data"),
            external: AdvertiseConfig::default(),
            intranet: AdvertiseConfig::default(),
        }
    }
}

/// How one side (external or intranet) reaches this node. Each field is optional: the host
/// defaults to the listener's bind address, or to the first non-loopback interface when the
/// listener binds every interface; a listener override replaces the whole address (use it
/// behind a load balancer: `wss_addr = "wss://im.example.com"`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdvertiseConfig {
    /// Host name or IP address clients use to reach this node.
    pub host: Option<String>,
    /// Full `host:port` for TCP clients, replacing `host` + the TCP listener's port.
    pub tcp_addr: Option<String>,
    /// Full `ws://...` URL base, replacing `host` + the WS listener's port.
    pub ws_addr: Option<String>,
    /// Full `wss://...` URL base, replacing `host` + the WSS listener's port.
    pub wss_addr: Option<String>,
}

/// The sockets a node listens on. Every key of every listener is optional.
#[derive(Debug, Clone, Deserialize)]
#[serde(from = "RawListeners")]
pub struct Listeners {
    /// HTTP API: route, push, version, health (default port 5001).
    pub http: Listener,
    /// HTTP API over TLS, for pages served over HTTPS (default port 5443).
    pub https: TlsListener,
    /// Length-prefixed JSON frames over plain TCP (default port 5100).
    pub tcp: Listener,
    /// WebSocket (default port 5200).
    pub ws: Listener,
    /// WebSocket over TLS (default port 5300).
    pub wss: TlsListener,
    /// A separate HTTP listener for `/admin/...` and `/metrics` (off by default; when on,
    /// the HTTP and HTTPS listeners no longer serve them).
    pub admin: Listener,
}

impl Default for Listeners {
    fn default() -> Self {
        RawListeners::default().into()
    }
}

#[derive(Debug, Clone)]
pub struct Listener {
    /// Whether the listener is started; a disabled listener advertises `""`.
    pub enabled: bool,
    /// Socket address to bind. Port 0 picks a free port (tests).
    pub bind: SocketAddr,
}

/// A listener that needs `[tls]`.
#[derive(Debug, Clone)]
pub struct TlsListener {
    /// `true`/`false` to force; absent means "on when `[tls]` is configured".
    pub enabled: Option<bool>,
    pub bind: SocketAddr,
}

/// The TOML form: every key optional, defaults filled in per listener.
#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawListeners {
    http: RawListener,
    https: RawListener,
    tcp: RawListener,
    ws: RawListener,
    wss: RawListener,
    admin: RawListener,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawListener {
    enabled: Option<bool>,
    bind: Option<SocketAddr>,
}

impl RawListener {
    fn plain(self, port: u16) -> Listener {
        Listener {
            enabled: self.enabled.unwrap_or(true),
            bind: self.bind.unwrap_or(SocketAddr::from(([0, 0, 0, 0], port))),
        }
    }

    fn tls(self, port: u16) -> TlsListener {
        TlsListener { enabled: self.enabled, bind: self.bind.unwrap_or(SocketAddr::from(([0, 0, 0, 0], port))) }
    }
}

impl From<RawListeners> for Listeners {
    fn from(raw: RawListeners) -> Self {
        Self {
            http: raw.http.plain(5001),
            https: raw.https.tls(5443),
            tcp: raw.tcp.plain(5100),
            ws: raw.ws.plain(5200),
            wss: raw.wss.tls(5300),
            // Off unless configured; giving it a bind address turns it on.
            admin: Listener {
                enabled: raw.admin.enabled.unwrap_or(raw.admin.bind.is_some()),
                bind: raw.admin.bind.unwrap_or(SocketAddr::from(([127, 0, 0, 1], 9091))),
            },
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest frame a client may send, in bytes (JSON text).
    pub max_frame_bytes: usize,
    /// Connections this node accepts before refusing new ones.
    pub max_connections: usize,
    /// Connections one user may hold at once (devices, tabs).
    pub max_connections_per_user: usize,
    /// Time a client has to complete the WebSocket handshake or send its TCP `connect` frame.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Frames waiting to be written to one connection; when full the client is too slow and
    /// is disconnected rather than allowed to hold memory or stall senders.
    pub outbound_queue: usize,
    /// Bytes waiting to be written to one connection; the same slow-consumer rule applies.
    /// A single frame must fit, so this is at least twice the largest frame or push body.
    pub outbound_queue_bytes: usize,
    /// A single flush to a client may take this long before the client counts as stuck.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Sustained messages per second one connection may send.
    pub messages_per_second: u32,
    /// Messages a connection may send in a burst above the sustained rate.
    pub message_burst: u32,
    /// Largest HTTP request body the API reads, in bytes.
    pub max_http_body_bytes: usize,
    /// Channels one connection may subscribe to.
    pub max_channels_per_connection: usize,
    /// Concurrent connections per HTTP/HTTPS listener; more are closed at once.
    pub max_http_connections: usize,
    /// Time an HTTP request may take to be read and answered.
    #[serde(with = "humantime_serde")]
    pub http_request_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_bytes: 64 * 1024,
            max_connections: 100_000,
            max_connections_per_user: 16,
            connect_timeout: Duration::from_secs(10),
            outbound_queue: 1024,
            outbound_queue_bytes: 8 * 1024 * 1024,
            write_timeout: Duration::from_secs(10),
            messages_per_second: 100,
            message_burst: 200,
            max_http_body_bytes: 1024 * 1024,
            max_channels_per_connection: 64,
            max_http_connections: 10_000,
            http_request_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Heartbeat {
    /// How often the server pings each connection.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// A connection that sends nothing (not even a pong) for this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self { ping_interval: Duration::from_secs(25), idle_timeout: Duration::from_secs(60) }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PushConfig {
    /// How far a push request's timestamp may be from the node's clock; older or newer
    /// requests are refused, which bounds how long nonces must be remembered.
    #[serde(with = "humantime_serde")]
    pub timestamp_window: Duration,
    /// Nonces remembered per app; a push arriving when this many unexpired nonces are held is
    /// refused (503) rather than forgetting one that could then be replayed.
    pub nonce_capacity: usize,
    /// Recipients one push request may name.
    pub max_recipients: usize,
}

impl Default for PushConfig {
    fn default() -> Self {
        Self { timestamp_window: Duration::from_secs(300), nonce_capacity: 100_000, max_recipients: 1000 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouteConfig {
    /// User ids one `/route/batch` request may carry.
    pub batch_max_uids: usize,
    /// Router plugin for apps without their own `router` (default: rendezvous hashing).
    pub plugin: Option<String>,
}

impl Default for RouteConfig {
    fn default() -> Self {
        Self { batch_max_uids: 10_000, plugin: None }
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// NATS servers to connect to (any of them; the client learns the rest of the cluster).
    pub urls: Vec<String>,
    /// NATS authentication: a token, user and password, or a credentials (`.creds`) file.
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
    /// TLS to NATS: a CA file to trust (implies TLS), and whether to require TLS.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    #[serde(default)]
    pub require_tls: bool,
    /// Where this node is, for geographic routing.
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub lat: Option<f64>,
    #[serde(default)]
    pub lon: Option<f64>,
    /// Connections this node is meant to hold (load routing); default `limits.max_connections`.
    #[serde(default)]
    pub capacity: Option<u64>,
    /// How often this node refreshes its registry entry.
    #[serde(default = "default_cluster_heartbeat", with = "humantime_serde")]
    pub heartbeat: Duration,
    /// A node not heard from for this long is gone: never routed to.
    #[serde(default = "default_cluster_ttl", with = "humantime_serde")]
    pub ttl: Duration,
    /// Prefix of every subject and bucket, so several deployments can share one NATS.
    #[serde(default = "default_subject_prefix")]
    pub subject_prefix: String,
    /// After the first answer from another node, how long to wait for more (a user may be
    /// connected to several nodes) before reporting how many connections a message reached.
    #[serde(default = "default_gather_window", with = "humantime_serde")]
    pub gather_window: Duration,
    /// Longest wait for other nodes' answers to a delivery.
    #[serde(default = "default_cluster_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
}

fn default_cluster_heartbeat() -> Duration {
    Duration::from_secs(2)
}
fn default_cluster_ttl() -> Duration {
    Duration::from_secs(10)
}
fn default_subject_prefix() -> String {
    "sb".into()
}
fn default_gather_window() -> Duration {
    Duration::from_millis(5)
}
fn default_cluster_request_timeout() -> Duration {
    Duration::from_secs(2)
}

// Credentials stay out of `{:?}`.
impl fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("urls", &self.urls)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("credentials_file", &self.credentials_file)
            .field("region", &self.region)
            .field("heartbeat", &self.heartbeat)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Bearer token for `/admin/...`; the admin endpoints are off without one.
    pub token: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Whether `GET /metrics` answers (on the admin listener when there is one).
    pub enabled: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { enabled: true }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CorsConfig {
    /// Origins (`https://app.example.com`) whose pages may call the API (`/route` first of
    /// all) from a browser, or `["*"]` for any. Empty: same-origin pages only.
    pub allowed_origins: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DemoConfig {
    /// Serve the demo page at `/demo`. It lets anyone get tokens for apps with
    /// `dev_tokens = true`, so it is for development machines only.
    pub enabled: bool,
}

/// Which capability a plugin provides: the WIT world it implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum World {
    Authenticator,
    MessageFilter,
    Router,
}

/// The interface of a message filter that takes a burst of messages per call.
pub const BATCH_FILTER_EXPORT: &str = "switchboard:policy/batch-filter@0.1.0";

impl World {
    pub const ALL: [World; 3] = [World::Authenticator, World::MessageFilter, World::Router];

    pub const fn as_str(self) -> &'static str {
        match self {
            World::Authenticator => "authenticator",
            World::MessageFilter => "message-filter",
            World::Router => "router",
        }
    }

    /// The interfaces a component of this world may export (at least one), the one the
    /// host prefers first: a message filter may take messages one by one (`filter`) or a
    /// burst at a time (`batch-filter`, world `batch-message-filter`).
    pub const fn exports(self) -> &'static [&'static str] {
        match self {
            World::Authenticator => &["switchboard:policy/auth@0.1.0"],
            World::MessageFilter => &[BATCH_FILTER_EXPORT, "switchboard:policy/filter@0.1.0"],
            World::Router => &["switchboard:policy/routing@0.1.0"],
        }
    }

    /// The longest deadline allowed: a call runs on the thread that needs its answer, so a
    /// filter (run for every message) must stay short.
    pub const fn max_deadline(self) -> Duration {
        match self {
            World::Authenticator | World::Router => Duration::from_secs(1),
            World::MessageFilter => Duration::from_millis(100),
        }
    }

    fn default_deadline(self) -> Duration {
        match self {
            World::Authenticator => Duration::from_millis(50),
            World::MessageFilter => Duration::from_millis(2),
            World::Router => Duration::from_millis(20),
        }
    }
}

/// What happens to the request a plugin was serving when the plugin fails (traps, runs
/// past its deadline, exhausts its memory or returns something invalid).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    /// Refuse: the connection is rejected, the message is not delivered.
    FailClosed,
    /// Carry on as if the plugin had allowed it (filters only).
    FailOpen,
}

/// One `[[plugins]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// How apps refer to the plugin.
    pub name: String,
    /// The component (`.wasm`), relative to the config file.
    pub path: PathBuf,
    /// The world the component must implement.
    pub world: World,
    /// Default `fail_closed`; `fail_open` is allowed for message filters only. Routers
    /// always fall back to rendezvous hashing.
    #[serde(default)]
    pub failure: Option<FailurePolicy>,
    /// Longest a single call may run (default: authenticator 50ms, message-filter 2ms,
    /// router 20ms).
    #[serde(default, with = "humantime_serde::option")]
    pub deadline: Option<Duration>,
    /// Linear memory one instance may use, in MiB.
    #[serde(default = "default_plugin_memory")]
    pub memory_limit_mb: u32,
    /// Warm instances kept per app; concurrent calls beyond this instantiate more and the
    /// extra ones are dropped afterwards. Default: the number of CPUs.
    #[serde(default)]
    pub pool_size: Option<usize>,
    /// The plugin's own settings, handed to its `init` as JSON.
    #[serde(default)]
    pub config: toml::Table,
}

fn default_plugin_memory() -> u32 {
    32
}

impl PluginConfig {
    pub fn failure_policy(&self) -> FailurePolicy {
        self.failure.unwrap_or(FailurePolicy::FailClosed)
    }

    pub fn deadline(&self) -> Duration {
        self.deadline.unwrap_or(self.world.default_deadline())
    }

    pub fn pool_size(&self) -> usize {
        self.pool_size.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
    }
}

/// How an app's authenticator plugin relates to the built-in JWT check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// The plugin alone decides, from the raw token.
    Replace,
    /// The JWT is checked first; the plugin then sees its user id and may refuse the
    /// connection or add metadata (it cannot change the user id).
    AfterJwt,
}

/// `auth = { plugin = "...", mode = "..." }` in an app.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppAuth {
    pub plugin: String,
    #[serde(default = "default_auth_mode")]
    pub mode: AuthMode,
}

fn default_auth_mode() -> AuthMode {
    AuthMode::Replace
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// After SIGTERM/SIGINT, how long connections get to receive their `reconnect` frame and
    /// close before the process exits anyway.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
    /// Each client is told to wait a random delay below this before reconnecting, so a
    /// node going away does not send every client to the others at the same instant.
    #[serde(with = "humantime_serde")]
    pub reconnect_jitter: Duration,
    /// In a cluster, draining (`POST /admin/drain`, or SIGTERM) moves clients to their new
    /// nodes spread over this window rather than all at once.
    #[serde(with = "humantime_serde")]
    pub drain_window: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(10),
            reconnect_jitter: Duration::from_secs(5),
            drain_window: Duration::from_secs(5),
        }
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    /// Shared secret: signs client JWTs (HS256) and push requests (HMAC-SHA256).
    pub secret: String,
    /// Clock skew tolerated on `exp` and `nbf`.
    #[serde(default = "default_leeway", with = "humantime_serde")]
    pub token_leeway: Duration,
    /// An authenticator plugin instead of, or after, the built-in JWT check.
    #[serde(default)]
    pub auth: Option<AppAuth>,
    /// Message filter plugins, run in this order on every message to a user of this app.
    #[serde(default)]
    pub filters: Vec<String>,
    /// Router plugin for this app's users (default: `route.plugin`, then rendezvous hashing).
    #[serde(default)]
    pub router: Option<String>,
    /// Whether clients may publish to channels (`publish` frames); otherwise only the app
    /// server can (`POST /api/v1/channels/{channel}/publish`).
    #[serde(default)]
    pub client_publish: bool,
    /// Whether anyone may get a token for any user of this app from
    /// `POST /api/v1/dev/token` when `[demo]` is on (development only: it makes the app
    /// open to all).
    #[serde(default)]
    pub dev_tokens: bool,
}

fn default_leeway() -> Duration {
    Duration::from_secs(30)
}

// The secret must never reach a log line through `{:?}`.
impl fmt::Debug for AppConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppConfig")
            .field("secret", &"<redacted>")
            .field("token_leeway", &self.token_leeway)
            .field("auth", &self.auth)
            .field("filters", &self.filters)
            .field("router", &self.router)
            .field("client_publish", &self.client_publish)
            .field("dev_tokens", &self.dev_tokens)
            .finish()
    }
}

/// One thing wrong with a config, tied to the key it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Parse(#[from] toml::de::Error),
    #[error("{} problem(s) in config:\n{}", .0.len(), .0.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
}

impl FromStr for Config {
    type Err = ConfigError;

    /// Parses and validates; relative paths resolve against the current directory.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let config: Config = toml::from_str(s)?;
        config.validate().map_err(ConfigError::Invalid)?;
        Ok(config)
    }
}

/// The longest app id; ids appear in URLs, metrics labels and NATS subjects.
pub const MAX_APP_ID_LEN: usize = 64;

impl Config {
    /// Reads, parses and validates the file; relative paths in it resolve against its directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        let mut config: Config = toml::from_str(&text)?;
        config.base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        config.source = Some(path.to_path_buf());
        config.validate().map_err(ConfigError::Invalid)?;
        Ok(config)
    }

    /// A path from the config, made absolute against the config file's directory.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() || self.base_dir.as_os_str().is_empty() {
            path.to_path_buf()
        } else {
            self.base_dir.join(path)
        }
    }

    /// Whether the WSS listener runs.
    pub fn wss_enabled(&self) -> bool {
        self.listeners.wss.enabled.unwrap_or(self.tls.is_some())
    }

    /// Whether the HTTPS listener runs.
    pub fn https_enabled(&self) -> bool {
        self.listeners.https.enabled.unwrap_or(self.tls.is_some())
    }

    /// Checks the config as a whole and returns every problem found, not just the first.
    pub fn validate(&self) -> Result<(), Vec<Problem>> {
        let mut problems = Vec::new();
        let mut problem = |key: &str, message: String| {
            problems.push(Problem { key: key.to_string(), message });
        };

        if self.apps.is_empty() {
            problem("apps", "at least one app is required, e.g. [apps.demo] secret = \"...\"".into());
        }
        for (id, app) in &self.apps {
            let key = format!("apps.{id}");
            if id.is_empty()
                || id.len() > MAX_APP_ID_LEN
                || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                problem(&key, format!("app id must be 1-{MAX_APP_ID_LEN} characters of A-Z a-z 0-9 _ -"));
            }
            if app.secret.len() < 16 {
                problem(&format!("{key}.secret"), "must be at least 16 bytes (32 or more recommended)".into());
            }
            if app.token_leeway > Duration::from_secs(300) {
                problem(&format!("{key}.token_leeway"), "must be at most 5m".into());
            }
        }

        let mut secrets: Vec<(&str, &str)> = self.apps.iter().map(|(id, a)| (a.secret.as_str(), id.as_str())).collect();
        secrets.sort();
        for pair in secrets.windows(2) {
            if pair[0].0 == pair[1].0 {
                problem(
                    &format!("apps.{}.secret", pair[1].1),
                    format!(
                        "is the same as apps.{}.secret; each app needs its own secret, or its tokens and pushes would be valid for the other",
                        pair[0].1
                    ),
                );
            }
        }

        if let Some(id) = &self.node.id
            && !valid_node_id(id)
        {
            problem("node.id", "must be 1-64 characters of A-Z a-z 0-9 _ -".into());
        }

        for (name, side) in [("node.external", &self.node.external), ("node.intranet", &self.node.intranet)] {
            if let Some(host) = &side.host
                && (host.is_empty() || host.contains(['/', ' ']))
            {
                problem(&format!("{name}.host"), format!("{host:?} is not a host name or IP address"));
            }
            if let Some(addr) = &side.tcp_addr
                && (addr.contains("://") || !addr.contains(':'))
            {
                problem(&format!("{name}.tcp_addr"), format!("{addr:?} must be host:port, without a scheme"));
            }
            if let Some(addr) = &side.ws_addr
                && !addr.starts_with("ws://")
            {
                problem(&format!("{name}.ws_addr"), format!("{addr:?} must start with ws://"));
            }
            if let Some(addr) = &side.wss_addr
                && !addr.starts_with("wss://")
            {
                problem(&format!("{name}.wss_addr"), format!("{addr:?} must start with wss://"));
            }
        }

        if self.tls.is_none() {
            if self.listeners.wss.enabled == Some(true) {
                problem("listeners.wss.enabled", "the WSS listener needs [tls] cert and key".into());
            }
            if self.listeners.https.enabled == Some(true) {
                problem("listeners.https.enabled", "the HTTPS listener needs [tls] cert and key".into());
            }
        }
        if let Some(tls) = &self.tls {
            for (key, path) in [("tls.cert", &tls.cert), ("tls.key", &tls.key)] {
                let full = self.resolve(path);
                if !full.is_file() {
                    problem(key, format!("file not found: {}", full.display()));
                }
            }
        }

        let enabled: Vec<(&str, SocketAddr)> = [
            ("listeners.http", self.listeners.http.enabled, self.listeners.http.bind),
            ("listeners.https", self.https_enabled(), self.listeners.https.bind),
            ("listeners.tcp", self.listeners.tcp.enabled, self.listeners.tcp.bind),
            ("listeners.ws", self.listeners.ws.enabled, self.listeners.ws.bind),
            ("listeners.wss", self.wss_enabled(), self.listeners.wss.bind),
            ("listeners.admin", self.listeners.admin.enabled, self.listeners.admin.bind),
        ]
        .into_iter()
        .filter(|(_, on, _)| *on)
        .map(|(name, _, bind)| (name, bind))
        .collect();
        for (i, (name, bind)) in enabled.iter().enumerate() {
            if bind.port() != 0
                && let Some((other, _)) = enabled[..i].iter().find(|(_, b)| b == bind)
            {
                problem(&format!("{name}.bind"), format!("{bind} is already used by {other}"));
            }
        }
        let origins = &self.cors.allowed_origins;
        for origin in origins {
            let scheme_ok = origin.starts_with("http://") || origin.starts_with("https://");
            let host = origin.split_once("://").map_or("", |(_, rest)| rest);
            if origin != "*" && (!scheme_ok || host.is_empty() || host.contains(['/', ' ', '?', '#'])) {
                problem(
                    "cors.allowed_origins",
                    format!("{origin:?} is not an origin: scheme://host[:port], without a path, or \"*\""),
                );
            }
        }
        if origins.len() > 1 && origins.iter().any(|o| o == "*") {
            problem("cors.allowed_origins", "\"*\" allows every origin; list it alone".into());
        }
        if origins.iter().any(|o| o == "*")
            && let Some((id, _)) = self.apps.iter().find(|(_, a)| a.dev_tokens)
        {
            problem(
                "cors.allowed_origins",
                format!("\"*\" would let any web page get tokens for apps.{id} (dev_tokens); list the origins"),
            );
        }
        if self.demo.enabled && !self.listeners.http.enabled && !self.https_enabled() {
            problem("demo.enabled", "the demo page needs the HTTP or HTTPS listener".into());
        }
        if !self.listeners.ws.enabled && !self.wss_enabled() && !self.listeners.tcp.enabled {
            problem("listeners", "no client listener is enabled (tcp, ws or wss)".into());
        }

        let l = &self.limits;
        if !(64..=16 * 1024 * 1024).contains(&l.max_frame_bytes) {
            problem("limits.max_frame_bytes", "must be between 64 and 16777216".into());
        }
        if l.max_connections == 0 {
            problem("limits.max_connections", "must be at least 1".into());
        }
        if l.max_connections_per_user == 0 {
            problem("limits.max_connections_per_user", "must be at least 1".into());
        }
        if l.connect_timeout.is_zero() {
            problem("limits.connect_timeout", "must be more than 0s".into());
        }
        if l.outbound_queue == 0 {
            problem("limits.outbound_queue", "must be at least 1".into());
        }
        let largest = l.max_frame_bytes.max(l.max_http_body_bytes);
        if l.outbound_queue_bytes < 2 * largest {
            problem(
                "limits.outbound_queue_bytes",
                format!(
                    "must be at least twice the larger of max_frame_bytes and max_http_body_bytes ({})",
                    2 * largest
                ),
            );
        }
        if l.write_timeout.is_zero() {
            problem("limits.write_timeout", "must be more than 0s".into());
        }
        if l.messages_per_second == 0 {
            problem("limits.messages_per_second", "must be at least 1".into());
        }
        if l.message_burst == 0 {
            problem("limits.message_burst", "must be at least 1".into());
        }
        if l.max_http_connections == 0 {
            problem("limits.max_http_connections", "must be at least 1".into());
        }
        if l.http_request_timeout.is_zero() {
            problem("limits.http_request_timeout", "must be more than 0s".into());
        }
        if l.max_http_body_bytes < 1024 {
            problem("limits.max_http_body_bytes", "must be at least 1024".into());
        }

        let h = &self.heartbeat;
        if h.ping_interval.is_zero() {
            problem("heartbeat.ping_interval", "must be more than 0s".into());
        }
        if h.idle_timeout <= h.ping_interval {
            problem("heartbeat.idle_timeout", "must be longer than heartbeat.ping_interval".into());
        }

        if self.push.timestamp_window < Duration::from_secs(1) {
            problem("push.timestamp_window", "must be at least 1s".into());
        }
        if self.push.nonce_capacity == 0 {
            problem("push.nonce_capacity", "must be at least 1".into());
        }
        if self.push.max_recipients == 0 {
            problem("push.max_recipients", "must be at least 1".into());
        }
        if self.route.batch_max_uids == 0 {
            problem("route.batch_max_uids", "must be at least 1".into());
        }

        self.validate_plugins(&mut problem);
        if let Some(c) = &self.cluster {
            if c.urls.is_empty() {
                problem("cluster.urls", "at least one NATS URL is required, e.g. [\"nats://127.0.0.1:4222\"]".into());
            }
            for (i, url) in c.urls.iter().enumerate() {
                if !(url.starts_with("nats://") || url.starts_with("tls://") || url.contains(':')) {
                    problem(&format!("cluster.urls[{i}]"), format!("{url:?} is not a NATS URL (nats://host:port)"));
                }
            }
            if c.user.is_some() != c.password.is_some() {
                problem("cluster.password", "user and password go together".into());
            }
            if c.heartbeat.is_zero() {
                problem("cluster.heartbeat", "must be more than 0s".into());
            }
            if c.ttl < c.heartbeat * 2 {
                problem("cluster.ttl", "must be at least twice cluster.heartbeat".into());
            }
            if c.subject_prefix.is_empty() || !c.subject_prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            {
                problem("cluster.subject_prefix", "must be letters, digits and _".into());
            }
            if c.lat.is_some_and(|x| x.abs() > 90.0) {
                problem("cluster.lat", "must be within ±90".into());
            }
            if c.lon.is_some_and(|x| x.abs() > 180.0) {
                problem("cluster.lon", "must be within ±180".into());
            }
            for (key, path) in
                [("cluster.credentials_file", &c.credentials_file), ("cluster.tls_ca_file", &c.tls_ca_file)]
            {
                if let Some(p) = path
                    && !self.resolve(p).is_file()
                {
                    problem(key, format!("file not found: {}", self.resolve(p).display()));
                }
            }
        }
        if let Some(token) = &self.admin.token
            && token.len() < 16
        {
            problem("admin.token", "must be at least 16 bytes".into());
        }

        if problems.is_empty() { Ok(()) } else { Err(problems) }
    }

    /// Plugin entries and every reference to them.
    fn validate_plugins(&self, problem: &mut impl FnMut(&str, String)) {
        let mut seen = std::collections::HashSet::new();
        for (i, p) in self.plugins.iter().enumerate() {
            let key = format!("plugins[{i}]");
            if !valid_node_id(&p.name) {
                problem(&format!("{key}.name"), "must be 1-64 characters of A-Z a-z 0-9 _ -".into());
            } else if !seen.insert(p.name.as_str()) {
                problem(&format!("{key}.name"), format!("{:?} is defined twice", p.name));
            }
            let path = self.resolve(&p.path);
            if !path.is_file() {
                problem(&format!("{key}.path"), format!("file not found: {}", path.display()));
            }
            match (p.world, p.failure) {
                (World::Authenticator, Some(FailurePolicy::FailOpen)) => problem(
                    &format!("{key}.failure"),
                    "an authenticator fails closed: a broken plugin must not let everyone in".into(),
                ),
                (World::Router, Some(FailurePolicy::FailClosed)) => problem(
                    &format!("{key}.failure"),
                    "routers always fall back to rendezvous hashing; leave failure unset".into(),
                ),
                _ => {}
            }
            if let Some(d) = p.deadline
                && (d < Duration::from_millis(1) || d > p.world.max_deadline())
            {
                let max = humantime::format_duration(p.world.max_deadline());
                problem(
                    &format!("{key}.deadline"),
                    format!("must be between 1ms and {max} for a {}", p.world.as_str()),
                );
            }
            if !(1..=4096).contains(&p.memory_limit_mb) {
                problem(&format!("{key}.memory_limit_mb"), "must be between 1 and 4096".into());
            }
            if p.pool_size == Some(0) {
                problem(&format!("{key}.pool_size"), "must be at least 1".into());
            }
        }
        let mut reference = |key: String, name: &str, world: World| match self.plugins.iter().find(|p| p.name == name) {
            None => problem(&key, format!("no [[plugins]] entry is named {name:?}")),
            Some(p) if p.world != world => problem(
                &key,
                format!("plugin {name:?} is a {} plugin; this needs a {}", p.world.as_str(), world.as_str()),
            ),
            Some(_) => {}
        };
        if let Some(name) = &self.route.plugin {
            reference("route.plugin".into(), name, World::Router);
        }
        for (id, app) in &self.apps {
            if let Some(auth) = &app.auth {
                reference(format!("apps.{id}.auth.plugin"), &auth.plugin, World::Authenticator);
            }
            for (i, name) in app.filters.iter().enumerate() {
                reference(format!("apps.{id}.filters[{i}]"), name, World::MessageFilter);
            }
            if let Some(name) = &app.router {
                reference(format!("apps.{id}.router"), name, World::Router);
            }
        }
    }
}

/// Node ids appear in subjects and metrics; keep them to a safe alphabet.
pub fn valid_node_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = "[apps.demo]\nsecret = \"0123456789abcdef\"\n";

    #[test]
    fn minimal_config_gets_defaults() {
        let c: Config = MIN.parse().unwrap();
        assert_eq!(c.listeners.http.bind.port(), 5001);
        assert_eq!(c.listeners.tcp.bind.port(), 5100);
        assert_eq!(c.listeners.ws.bind.port(), 5200);
        assert_eq!(c.listeners.wss.bind.port(), 5300);
        assert!(!c.wss_enabled(), "WSS is off without [tls]");
        assert_eq!(c.apps["demo"].token_leeway, Duration::from_secs(30));
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let err = format!("{MIN}[limits]\nmax_frame_byte = 10\n").parse::<Config>().unwrap_err().to_string();
        assert!(err.contains("max_frame_byte"), "{err}");
        assert!(err.contains("line 4"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = "[apps.demo]\nsecret = \"short\"\n[apps.\"bad id\"]\nsecret = \"0123456789abcdef\"\n\
                    [limits]\noutbound_queue = 0\n[listeners.wss]\nenabled = true\nbind = \"0.0.0.0:5300\"\n";
        let Err(ConfigError::Invalid(problems)) = text.parse::<Config>() else { panic!("expected problems") };
        let keys: Vec<_> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            ["apps.bad id", "apps.demo.secret", "listeners.wss.enabled", "limits.outbound_queue"],
            "{problems:?}"
        );
    }

    #[test]
    fn duplicate_bind_is_a_problem() {
        let text = format!("{MIN}[listeners.ws]\nbind = \"0.0.0.0:5100\"\n");
        let Err(ConfigError::Invalid(problems)) = text.parse::<Config>() else { panic!() };
        assert_eq!(problems[0].key, "listeners.ws.bind");
        assert!(problems[0].message.contains("listeners.tcp"));
    }

    #[test]
    fn listener_tables_need_no_bind() {
        let c: Config = format!("{MIN}[listeners.tcp]\nenabled = false\n[listeners.ws]\nbind = \"127.0.0.1:9000\"\n")
            .parse()
            .unwrap();
        assert!(!c.listeners.tcp.enabled);
        assert_eq!(c.listeners.tcp.bind.port(), 5100);
        assert!(c.listeners.ws.enabled);
    }

    #[test]
    fn apps_may_not_share_a_secret() {
        let text = "[apps.a]\nsecret = \"0123456789abcdef\"\n[apps.b]\nsecret = \"0123456789abcdef\"\n";
        let Err(ConfigError::Invalid(problems)) = text.parse::<Config>() else { panic!() };
        assert_eq!(problems[0].key, "apps.b.secret");
    }

    #[test]
    fn durations_are_human() {
        let c: Config = format!("{MIN}[heartbeat]\nping_interval = \"5s\"\nidle_timeout = \"1m\"\n").parse().unwrap();
        assert_eq!(c.heartbeat.idle_timeout, Duration::from_secs(60));
    }

    #[test]
    fn secret_is_not_debug_printed() {
        let c: Config = MIN.parse().unwrap();
        assert!(!format!("{c:?}").contains("0123456789abcdef"));
    }
}

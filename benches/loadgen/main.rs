//! switchboard's load generator: drives switchboard, and its peers nats-server and
//! mosquitto over WebSocket, with the same client code and payloads in the same run, and
//! prints a table (and JSON for scripts). `connections` and `direct` run every system over
//! plain TCP as well.
//!
//! ```text
//! loadgen [--smoke] [--json FILE] [--peers nats,mosquitto] <scenario>...
//! scenarios: connections direct latency push fanout plugins cluster all
//! ```
//! `benches/run.sh` builds release binaries, installs the peers and runs everything;
//! `--smoke` runs every scenario at tiny sizes in seconds (the test command does).
//! `--target HOST:PORT` drives a switchboard that is already running, on this machine or
//! another, instead of starting one (`connections`, `direct` and `latency`).

// A binary: `pub` marks what the modules share with each other.
#![allow(unreachable_pub)]

mod client;
mod scenarios;
mod target;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use serde::Serialize;

use client::{Endpoint, System, Wire};
use scenarios::{ConnectionsResult, DirectOpts, DirectResult, FanoutResult, PushResult};
use target::SwitchboardSetup;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum Scenario {
    Connections,
    Direct,
    /// `direct` paced at the same fixed rates for every system: latency at equal load.
    Latency,
    Push,
    Fanout,
    Plugins,
    Cluster,
    All,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum Peer {
    Nats,
    Mosquitto,
    /// switchboard alone.
    None,
}

#[derive(Parser, Debug)]
#[command(about = "switchboard load generator")]
struct Args {
    /// Scenarios to run.
    #[arg(value_enum, required = true)]
    scenarios: Vec<Scenario>,
    /// Tiny sizes and short runs: proves every scenario still works.
    #[arg(long)]
    smoke: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Peers to run side by side (default: every one that is installed; `none` for switchboard alone).
    #[arg(long, value_enum, value_delimiter = ',')]
    peers: Option<Vec<Peer>>,
    /// Connections to hold in `connections` (default: as many as the open-file limit allows, up to 100000).
    #[arg(long)]
    connections: Option<usize>,
    /// Handshakes in flight at once in `connections`.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Sender/receiver pairs in `direct`.
    #[arg(long, default_value_t = 64)]
    pairs: usize,
    /// Measured seconds per run.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 128)]
    payload: usize,
    /// Subscribers of the one channel in `fanout`.
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Offered loads of `latency`, msg/s in all, comma-separated (default: 10000,30000,100000,200000).
    #[arg(long, value_delimiter = ',', value_parser = parse_rate)]
    rates: Option<Vec<f64>>,
    /// Rounds of `direct`'s maximum-rate runs and of the `plugins` comparison, the systems
    /// (the filter counts) taking turns; the median round is reported, the faster of the
    /// middle two for an even number (default: 3, 1 with --smoke).
    #[arg(long)]
    repeat: Option<usize>,
    /// Drive this switchboard instead of starting one: its WebSocket listener, `host:port`
    /// (on another machine, say, so that the clients do not share its cores). Runs
    /// `connections`, `direct` and `latency`, switchboard alone; its CPU time and memory
    /// are not read (`-` in the tables, `null` in JSON).
    #[arg(long, value_name = "HOST:PORT")]
    target: Option<String>,
    /// The `--target`'s TCP listener, `host:port`: adds the runs over TCP.
    #[arg(long, value_name = "HOST:PORT", requires = "target")]
    target_tcp: Option<String>,
    /// The app the clients of `--target` connect to.
    #[arg(long, default_value = target::APP, requires = "target")]
    app: String,
    /// That app's JWT secret, which the clients' tokens are signed with.
    #[arg(long, env = "LOADGEN_SECRET", hide_env_values = true)]
    secret: Option<String>,
}

/// A switchboard given with `--target`.
struct Remote {
    endpoint: Endpoint,
    /// Its TCP listener was given (`--target-tcp`).
    tcp: bool,
}

impl Remote {
    fn from_args(args: &Args) -> anyhow::Result<Option<Remote>> {
        let Some(ws) = &args.target else { return Ok(None) };
        let resolve = |flag: &str, addr: &str| -> anyhow::Result<std::net::SocketAddr> {
            use std::net::ToSocketAddrs as _;
            addr.to_socket_addrs()
                .with_context(|| format!("{flag} {addr}: expected host:port"))?
                .next()
                .with_context(|| format!("{flag} {addr}: the name has no address"))
        };
        let scenarios = [Scenario::Connections, Scenario::Direct, Scenario::Latency];
        if let Some(other) = args.scenarios.iter().find(|s| !scenarios.contains(s)) {
            anyhow::bail!("--target runs connections, direct and latency; not {other:?}");
        }
        if args.peers.as_ref().is_some_and(|p| p.iter().any(|p| *p != Peer::None)) {
            anyhow::bail!("--target drives switchboard alone: --peers has nothing to start there");
        }
        let secret = args.secret.clone().context("--target needs the app's JWT secret: --secret or LOADGEN_SECRET")?;
        let ws = resolve("--target", ws)?;
        let tcp = args.target_tcp.as_deref().map(|addr| resolve("--target-tcp", addr)).transpose()?;
        let endpoint = Endpoint {
            system: System::Switchboard,
            ws,
            // Never dialled without --target-tcp: the TCP runs are left out.
            tcp: tcp.unwrap_or(ws),
            wire: Wire::WebSocket,
            app: args.app.clone(),
            secret,
            hmac_key: None,
            batch: true,
        };
        Ok(Some(Remote { endpoint, tcp: tcp.is_some() }))
    }
}

#[derive(Debug, Default, Serialize)]
struct Report {
    connections: Vec<ConnectionsResult>,
    direct: Vec<DirectResult>,
    latency: Vec<DirectResult>,
    push: Vec<PushResult>,
    fanout: Vec<FanoutResult>,
    cluster: Vec<DirectResult>,
    /// CPU milliseconds a node with no users used while the others exchanged messages.
    cluster_idle_node_cpu_ms: Option<f64>,
    plugins_direct: Vec<DirectResult>,
    plugins_connect: Vec<ConnectionsResult>,
    /// switchboard / peer, per scenario and figure.
    ratios: Vec<Ratio>,
}

#[derive(Debug, Serialize)]
struct Ratio {
    what: String,
    ratio: f64,
}

/// Raises the open-file limit to its hard limit; returns how many files we may open.
fn raise_nofile() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((_, hard)) => {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
            hard
        }
        Err(_) => 1024,
    }
}

/// How many ephemeral ports the kernel hands out (`net.ipv4.ip_local_port_range`).
fn ephemeral_ports() -> usize {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let ends: Vec<usize> = range.split_whitespace().filter_map(|p| p.parse().ok()).collect();
    match ends[..] {
        [low, high] if high >= low => high - low + 1,
        // Linux's default range, 32768-60999.
        _ => 28_232,
    }
}

fn progress(msg: &str) {
    eprintln!("[loadgen {:>7.1}s] {msg}", client::now_ns() as f64 / 1e9);
}

fn systems(args: &Args) -> Vec<System> {
    let wanted = |p: Peer| args.peers.as_ref().is_none_or(|list| list.contains(&p));
    let mut out = vec![System::Switchboard];
    if wanted(Peer::Nats) && target::nats_bin().is_some() {
        out.push(System::Nats);
    } else if args.peers.as_ref().is_some_and(|l| l.contains(&Peer::Nats)) {
        eprintln!("loadgen: nats-server not found (benches/run.sh installs it); skipping");
    }
    if wanted(Peer::Mosquitto) && target::mosquitto_bin().is_some() {
        out.push(System::Mosquitto);
    } else if args.peers.as_ref().is_some_and(|l| l.contains(&Peer::Mosquitto)) {
        eprintln!("loadgen: mosquitto not found; skipping");
    }
    out
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    switchboard::transport::tls::install_crypto_provider();
    let nofile = raise_nofile();
    let all = args.scenarios.contains(&Scenario::All);
    let run = |s: Scenario| all || args.scenarios.contains(&s);
    let (warmup, duration) = if args.smoke {
        (Duration::from_millis(200), Duration::from_millis(500))
    } else {
        (Duration::from_secs(2), Duration::from_secs_f64(args.duration))
    };
    let remote = Remote::from_args(&args)?;
    let systems = if remote.is_some() { vec![System::Switchboard] } else { systems(&args) };
    // The server for each run: a fresh one, or the --target every time.
    let start = |system: System| match &remote {
        Some(r) => Ok(target::Server::remote(r.endpoint.clone())),
        None => target::start(system),
    };
    let reachable = |wire: Wire| wire == Wire::WebSocket || remote.as_ref().is_none_or(|r| r.tcp);
    let mut report = Report::default();

    if run(Scenario::Connections) {
        // Server and load generator each need one descriptor per connection.
        let n = args.connections.unwrap_or(if args.smoke {
            50
        } else {
            let most = (nofile.saturating_sub(1000) as usize).min(100_000);
            // Towards another machine every connection leaves from the one address the OS
            // picks: its ephemeral ports bound how many reach one listener.
            if remote.as_ref().is_some_and(|r| !r.endpoint.ws.ip().is_loopback()) {
                most.min(ephemeral_ports())
            } else {
                most
            }
        });
        for &system in &systems {
            for (wire, label) in WIRES.into_iter().filter(|(wire, _)| reachable(*wire)) {
                let server = start(system)?;
                let endpoint = server.endpoint.over(wire);
                progress(&format!("connections: {n} to {}, {label}", system.name()));
                let r = scenarios::connections(&server, &endpoint, label, n, args.concurrency).await?;
                report.connections.push(r);
            }
        }
    }

    if run(Scenario::Direct) {
        let opts = direct_opts(&args, warmup, duration);
        let pairs = opts.pairs;
        // The peers' publishes are never answered; switchboard runs as it is used by default
        // (every send acknowledged) and again with `"ack": false`, like them. Its clients
        // read batched frames (one message per burst; NATS's byte stream lets one message
        // carry many); once more they read one message per frame. Every system once more
        // with both clients of a pair sending to each other (a conversation: switchboard's
        // acks then share a connection with deliveries). Then every system over plain TCP
        // (switchboard acknowledging).
        let mut runs: Vec<(System, Wire, bool, bool, bool, &str)> = Vec::new();
        for &system in &systems {
            let variants: &[(Wire, bool, bool, bool, &str)] = if system == System::Switchboard {
                &[
                    (Wire::WebSocket, true, true, false, ""),
                    (Wire::WebSocket, false, true, false, ", no ack"),
                    (Wire::WebSocket, true, false, false, ", unbatched"),
                    (Wire::WebSocket, true, true, true, ", two-way"),
                    (Wire::Tcp, true, true, false, ", tcp"),
                ]
            } else {
                &[
                    (Wire::WebSocket, true, true, false, ""),
                    (Wire::WebSocket, true, true, true, ", two-way"),
                    (Wire::Tcp, true, true, false, ", tcp"),
                ]
            };
            for &(wire, ack, batch, two_way, suffix) in variants.iter().filter(|v| reachable(v.0)) {
                runs.push((system, wire, ack, batch, two_way, suffix));
            }
        }
        // The maximum rate of every run, `repeat` rounds in which the systems take turns;
        // each run reports its median round. The machine's load drifts (by a fifth between
        // two runs of one binary on a shared machine): interleaving spreads the drift over
        // all of them, and the median keeps one bad round out of the ratios.
        let repeat = repeat(&args);
        let mut peaks: Vec<Vec<DirectResult>> = vec![Vec::new(); runs.len()];
        for round in 0..repeat {
            for (n, &(system, wire, ack, batch, two_way, suffix)) in runs.iter().enumerate() {
                let opts = DirectOpts { ack, two_way, ..opts.clone() };
                let server = start(system)?;
                let endpoint = Endpoint { batch, ..server.endpoint.over(wire) };
                progress(&format!(
                    "direct: {pairs} pairs, max rate, {}{suffix}, round {}/{repeat}",
                    system.name(),
                    round + 1
                ));
                peaks[n].push(scenarios::direct(&server, &endpoint, &format!("max{suffix}"), &opts).await?);
            }
        }
        for (&(system, wire, ack, batch, two_way, suffix), mut rounds) in runs.iter().zip(peaks) {
            rounds.sort_by(|a, b| a.msgs_per_sec.total_cmp(&b.msgs_per_sec));
            let mut peak = rounds.swap_remove(rounds.len() / 2);
            peak.rounds = repeat;
            let half = (peak.msgs_per_sec / 2.0).max(100.0);
            report.direct.push(peak);
            // Latency at half of that peak, on a fresh server (or the --target again).
            let server = start(system)?;
            progress(&format!("direct: {pairs} pairs at {half:.0} msg/s (half of peak), {}{suffix}", system.name()));
            let paced = DirectOpts { ack, two_way, ..opts.clone() }.paced(half);
            let label = format!("half-peak{suffix}");
            let endpoint = Endpoint { batch, ..server.endpoint.over(wire) };
            report.direct.push(scenarios::direct(&server, &endpoint, &label, &paced).await?);
        }
    }

    if run(Scenario::Latency) {
        // The same offered load for every system (half of each one's own peak, above, is a
        // different load per system): where does p99 stay low?
        let opts = direct_opts(&args, warmup, duration);
        let rates: &[f64] = match &args.rates {
            Some(rates) => rates,
            None if args.smoke => &[400.0],
            None => &LATENCY_RATES,
        };
        for &system in &systems {
            // switchboard as used by default (acknowledged), and without acks like the peers.
            let acks: &[(bool, &str)] =
                if system == System::Switchboard { &[(true, ""), (false, ", no ack")] } else { &[(true, "")] };
            for &(ack, suffix) in acks {
                for &rate in rates {
                    let server = start(system)?;
                    progress(&format!("latency: {} pairs at {rate:.0} msg/s, {}{suffix}", opts.pairs, system.name()));
                    let paced = DirectOpts { ack, ..opts.clone() }.paced(rate);
                    let label = format!("{}k/s{suffix}", rate / 1000.0);
                    report.latency.push(scenarios::direct(&server, &server.endpoint, &label, &paced).await?);
                }
            }
        }
    }

    if run(Scenario::Push) {
        let server = target::start(System::Switchboard)?;
        let (receivers, concurrency) = if args.smoke { (4, 2) } else { (64, 32) };
        progress(&format!("push: {concurrency} HTTP clients to {receivers} receivers"));
        report.push.push(scenarios::push(&server, receivers, concurrency, warmup, duration, args.payload).await?);
    }

    if run(Scenario::Fanout) {
        let (subscribers, max_messages) = if args.smoke { (20, 50) } else { (args.subscribers, 1_000_000) };
        for &system in &systems {
            let server = match system {
                System::Switchboard => target::start_switchboard(&SwitchboardSetup {
                    app_keys: "client_publish = true".into(),
                    ..SwitchboardSetup::default()
                })?,
                other => target::start(other)?,
            };
            progress(&format!("fanout: 1 publisher to {subscribers} subscribers, {}", system.name()));
            report.fanout.push(scenarios::fanout(&server, subscribers, 4, max_messages, duration, args.payload).await?);
        }
    }

    if run(Scenario::Plugins) {
        plugins(&args, warmup, duration, &mut report).await?;
    }

    if run(Scenario::Cluster) {
        cluster(&args, warmup, duration, &mut report).await?;
    }

    ratios(&mut report);
    print_tables(&report);
    let refused: u64 = report.direct.iter().chain(&report.latency).map(|d| d.refused).sum();
    if remote.is_some() && refused > 0 {
        eprintln!(
            "loadgen: the target refused {refused} sends; one under load needs [limits] messages_per_second \
             and message_burst above the rate each client sends at (docs/performance.md, --target)"
        );
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// `direct` with 0, 1 and 3 filter plugins, and connecting with the built-in JWT check vs
/// the hmac-auth plugin, against one switchboard.
async fn plugins(args: &Args, warmup: Duration, duration: Duration, report: &mut Report) -> anyhow::Result<()> {
    let dist = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("plugins/dist");
    let words = dist.join("word-filter.wasm");
    let hmac = dist.join("hmac-auth.wasm");
    anyhow::ensure!(words.is_file() && hmac.is_file(), "plugins missing in {}: run plugins/build.sh", dist.display());
    let hmac_key = "bench-hmac-key-0123456789";
    let mut extra = String::new();
    for name in ["w1", "w2", "w3"] {
        extra += &format!(
            "[[plugins]]\nname = \"{name}\"\npath = \"{}\"\nworld = \"message-filter\"\n[plugins.config]\ndeny = [\"spam\"]\nmask = [\"darn\"]\n",
            words.display()
        );
    }
    extra += &format!(
        "[[plugins]]\nname = \"hmac\"\npath = \"{}\"\nworld = \"authenticator\"\n[plugins.config]\nkey = \"{hmac_key}\"\n",
        hmac.display()
    );
    let apps = [
        ("f1", "filters = [\"w1\"]"),
        ("f3", "filters = [\"w1\", \"w2\", \"w3\"]"),
        ("authp", "auth = { plugin = \"hmac\", mode = \"replace\" }"),
    ];
    for (id, keys) in apps {
        extra += &format!("[apps.{id}]\nsecret = \"bench-secret-{id}-0123456789\"\n{keys}\n");
    }
    let setup = SwitchboardSetup { extra_toml: extra, ..SwitchboardSetup::default() };
    let endpoint_for = |server: &target::Server, app: &str| -> Endpoint {
        let mut e = server.endpoint.clone();
        if app != target::APP {
            e.app = app.into();
            e.secret = format!("bench-secret-{app}-0123456789");
        }
        e
    };
    let opts = direct_opts(args, warmup, duration);
    // The variants take turns, `repeat` rounds, and each reports its median round: the
    // machine's load drifts, and interleaving spreads the drift over all of them.
    let variants = [(0, target::APP), (1, "f1"), (3, "f3")];
    let mut rounds: Vec<Vec<DirectResult>> = vec![Vec::new(); variants.len()];
    let repeat = repeat(args);
    for round in 0..repeat {
        for (v, (filters, app)) in variants.iter().enumerate() {
            // A fresh server per run, so one run's leftovers never weigh on the next.
            let server = target::start_switchboard(&setup)?;
            progress(&format!("plugins: direct with {filters} filter(s), round {}/{repeat}", round + 1));
            let r =
                scenarios::direct(&server, &endpoint_for(&server, app), &format!("{filters} filters"), &opts).await?;
            rounds[v].push(r);
        }
    }
    for mut runs in rounds {
        runs.sort_by(|a, b| a.msgs_per_sec.total_cmp(&b.msgs_per_sec));
        let mut median = runs[runs.len() / 2].clone();
        median.label = format!("{} (median of {})", median.label, runs.len());
        report.plugins_direct.push(median);
    }
    let n = if args.smoke { 20 } else { 2000 };
    for (label, app, key) in [("jwt", target::APP, None), ("auth plugin", "authp", Some(hmac_key))] {
        let server = target::start_switchboard(&setup)?;
        let mut endpoint = endpoint_for(&server, app);
        endpoint.hmac_key = key.map(str::to_string);
        progress(&format!("plugins: {n} sequential connects with {label}"));
        // One at a time: the connect latency itself, not queueing.
        let r = scenarios::connections(&server, &endpoint, label, n, 1).await?;
        report.plugins_connect.push(r);
    }
    Ok(())
}

/// Three nodes over one NATS: `direct` with senders on one node and receivers on another,
/// against both on the same node; and what the third node, which holds nobody, spends.
async fn cluster(args: &Args, warmup: Duration, duration: Duration, report: &mut Report) -> anyhow::Result<()> {
    let opts = direct_opts(args, warmup, duration);
    let pairs = opts.pairs;
    for cross in [true, false] {
        let nats = target::start_nats_jetstream()?;
        let url = format!("nats://{}", nats.nats_client.expect("nats client port"));
        let nodes: Vec<target::Server> = ["a", "b", "c"]
            .iter()
            .map(|id| {
                target::start_switchboard(&SwitchboardSetup {
                    node_id: Some((*id).into()),
                    extra_toml: format!("[cluster]\nurls = [\"{url}\"]\nheartbeat = \"1s\"\nttl = \"5s\"\n"),
                    ..SwitchboardSetup::default()
                })
            })
            .collect::<anyhow::Result<_>>()?;
        let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
        let label = if cross { "cross-node" } else { "same-node" };
        progress(&format!("cluster: direct, {pairs} pairs, {label}"));
        let idle0 = c.cpu_seconds().expect("a node started here");
        let r = if cross {
            scenarios::direct_between(&[a, b], &b.endpoint, &a.endpoint, label, &opts).await?
        } else {
            scenarios::direct_between(&[a], &a.endpoint, &a.endpoint, label, &opts).await?
        };
        if cross {
            report.cluster_idle_node_cpu_ms = c.cpu_seconds().map(|cpu| (cpu - idle0) * 1000.0);
        }
        report.cluster.push(r);
    }
    Ok(())
}

/// Offered loads (msg/s) of the `latency` scenario: from light to about half of the peers'
/// WebSocket peaks on a 2-core machine.
const LATENCY_RATES: [f64; 4] = [10_000.0, 30_000.0, 100_000.0, 200_000.0];

/// A `--rates` entry: messages per second in all, from 1 to 100,000,000 (each of the
/// `--pairs` senders sends one message every `pairs / rate` seconds).
fn parse_rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(rate) if (1.0..=1e8).contains(&rate) => Ok(rate),
        _ => Err(format!("{s:?} is not a rate in messages per second (a number from 1 to 100000000)")),
    }
}

/// The transports connections are measured on, with their labels.
const WIRES: [(Wire, &str); 2] = [(Wire::WebSocket, "idle"), (Wire::Tcp, "idle, tcp")];

/// The `direct` settings every scenario built on it starts from: as fast as a window of 64
/// messages in flight allows, every send acknowledged.
/// Rounds of the runs that are repeated (`--repeat`).
fn repeat(args: &Args) -> usize {
    args.repeat.unwrap_or(if args.smoke { 1 } else { 3 }).max(1)
}

fn direct_opts(args: &Args, warmup: Duration, duration: Duration) -> DirectOpts {
    let pairs = if args.smoke { 4 } else { args.pairs };
    DirectOpts { pairs, warmup, duration, payload: args.payload, window: 64, rate: None, ack: true, two_way: false }
}

fn ratios(report: &mut Report) {
    let mut out = Vec::new();
    let find_direct = |system: &str, label: &str| report.direct.iter().find(|r| r.system == system && r.label == label);
    for (label, peer_label, what) in [
        ("max", "max", ""),
        ("max, no ack", "max", ", switchboard without acks"),
        ("max, unbatched", "max", ", switchboard's clients reading one message per frame"),
        ("max, two-way", "max, two-way", ", both clients of a pair sending"),
        ("max, tcp", "max, tcp", ", over TCP"),
    ] {
        let Some(sb) = find_direct("switchboard", label) else { continue };
        for peer in ["nats-server", "mosquitto"] {
            if let Some(p) = find_direct(peer, peer_label) {
                out.push(Ratio {
                    what: format!("direct msg/s switchboard/{peer}{what}"),
                    ratio: sb.msgs_per_sec / p.msgs_per_sec,
                });
            }
        }
    }
    for (label, what) in [("idle", ""), ("idle, tcp", ", over TCP")] {
        let find_conn = |system: &str| report.connections.iter().find(|r| r.system == system && r.label == label);
        let Some(sb) = find_conn("switchboard") else { continue };
        for peer in ["nats-server", "mosquitto"] {
            if let Some(p) = find_conn(peer) {
                out.push(Ratio {
                    what: format!("connects/s switchboard/{peer}{what}"),
                    ratio: sb.connects_per_sec / p.connects_per_sec,
                });
                if let (Some(sb), Some(p)) = (sb.rss_per_connection_kib, p.rss_per_connection_kib) {
                    out.push(Ratio {
                        what: format!("RSS per connection switchboard/{peer}{what}"),
                        ratio: sb / p.max(f64::MIN_POSITIVE),
                    });
                }
            }
        }
    }
    if let (Some(cross), Some(same)) = (
        report.cluster.iter().find(|r| r.label == "cross-node"),
        report.cluster.iter().find(|r| r.label == "same-node"),
    ) {
        out.push(Ratio {
            what: "cluster direct msg/s cross-node / same-node".into(),
            ratio: cross.msgs_per_sec / same.msgs_per_sec,
        });
    }
    for sb in report.latency.iter().filter(|r| r.system == "switchboard") {
        for peer in ["nats-server", "mosquitto"] {
            let peer_label = sb.label.trim_end_matches(", no ack");
            if let Some(p) = report.latency.iter().find(|r| r.system == peer && r.label == peer_label) {
                out.push(Ratio {
                    what: format!("p99 latency at {} switchboard/{peer}", sb.label),
                    ratio: sb.p99_us / p.p99_us.max(f64::MIN_POSITIVE),
                });
            }
        }
    }
    let find_fanout = |system: &str| report.fanout.iter().find(|r| r.system == system);
    if let Some(sb) = find_fanout("switchboard") {
        for peer in ["nats-server", "mosquitto"] {
            if let Some(p) = find_fanout(peer) {
                out.push(Ratio {
                    what: format!("fanout deliveries/s switchboard/{peer}"),
                    ratio: sb.deliveries_per_sec / p.deliveries_per_sec,
                });
            }
        }
    }
    if let Some(base) = report.plugins_direct.first() {
        for r in &report.plugins_direct[1..] {
            out.push(Ratio {
                what: format!("direct msg/s with {} / without", r.label),
                ratio: r.msgs_per_sec / base.msgs_per_sec,
            });
        }
    }
    report.ratios = out;
}

fn print_direct<'a>(title: &str, rows: impl Iterator<Item = &'a DirectResult>) {
    let rows: Vec<&DirectResult> = rows.collect();
    println!("\n{title}");
    println!(
        "{:<12} {:<24} {:>6} {:>11} {:>10} {:>9} {:>9} {:>9} {:>12} {:>12} {:>8}",
        "system",
        "run",
        "pairs",
        "target/s",
        "msg/s",
        "p50 µs",
        "p99 µs",
        "p999 µs",
        "server ms/1k",
        "client ms/1k",
        "refused"
    );
    for d in &rows {
        let target = d.target_rate.map_or("max".to_string(), |t| format!("{t:.0}"));
        println!(
            "{:<12} {:<24} {:>6} {:>11} {:>10.0} {:>9.0} {:>9.0} {:>9.0} {:>12} {:>12.2} {:>8}",
            d.system,
            d.label,
            d.pairs,
            target,
            d.msgs_per_sec,
            d.p50_us,
            d.p99_us,
            d.p999_us,
            figure(d.server_cpu_ms_per_1k, 2),
            d.client_cpu_ms_per_1k,
            d.refused
        );
    }
    if let Some(median) = rows.iter().find(|d| d.rounds > 1) {
        println!("(max rows: the median of {} rounds, the systems taking turns)", median.rounds);
    }
}

/// A server-side figure for a table: `-` where it could not be read (`--target`).
fn figure(value: Option<f64>, decimals: usize) -> String {
    value.map_or("-".into(), |v| format!("{v:.decimals$}"))
}

fn print_tables(r: &Report) {
    if !r.connections.is_empty() || !r.plugins_connect.is_empty() {
        println!("\nconnections (held idle; RSS of the server process)");
        println!(
            "{:<12} {:<12} {:>8} {:>6} {:>11} {:>10} {:>10} {:>14} {:>10} {:>10}",
            "system", "run", "conns", "failed", "connects/s", "p50 µs", "p99 µs", "cpu µs/conn", "RSS MiB", "KiB/conn"
        );
        for c in r.connections.iter().chain(&r.plugins_connect) {
            println!(
                "{:<12} {:<12} {:>8} {:>6} {:>11.0} {:>10.0} {:>10.0} {:>14} {:>10} {:>10}",
                c.system,
                c.label,
                c.connections,
                c.failed,
                c.connects_per_sec,
                c.connect_p50_us,
                c.connect_p99_us,
                figure(c.server_cpu_us_per_connect, 1),
                figure(c.rss_after_mib, 1),
                figure(c.rss_per_connection_kib, 2)
            );
        }
    }
    if !r.direct.is_empty() || !r.plugins_direct.is_empty() {
        print_direct(
            "direct (pairs of clients; latency from send to receive)",
            r.direct.iter().chain(&r.plugins_direct),
        );
    }
    if !r.latency.is_empty() {
        print_direct("latency (direct over WebSocket, every system at the same rates)", r.latency.iter());
    }
    if !r.fanout.is_empty() {
        println!("\nfanout (one publisher, one channel; latency until the last subscriber has it)");
        println!(
            "{:<12} {:>6} {:>9} {:>9} {:>13} {:>10} {:>10}",
            "system", "subs", "messages", "complete", "deliveries/s", "p50 µs", "p99 µs"
        );
        for f in &r.fanout {
            println!(
                "{:<12} {:>6} {:>9} {:>9} {:>13.0} {:>10.0} {:>10.0}",
                f.system,
                f.subscribers,
                f.messages,
                f.complete,
                f.deliveries_per_sec,
                f.last_receive_p50_us,
                f.last_receive_p99_us
            );
        }
    }
    if !r.cluster.is_empty() {
        println!("\ncluster (3 nodes over NATS)");
        for d in &r.cluster {
            println!(
                "{:<12} {:>6} pairs {:>10.0} msg/s  p50 {:>7.0} µs  p99 {:>7.0} µs  cpu {:>6} ms/1k  refused {}",
                d.label,
                d.pairs,
                d.msgs_per_sec,
                d.p50_us,
                d.p99_us,
                figure(d.server_cpu_ms_per_1k, 2),
                d.refused
            );
        }
        if let Some(idle) = r.cluster_idle_node_cpu_ms {
            println!("a third node, holding nobody, used {idle:.0} ms of CPU during the cross-node run");
        }
    }
    for p in &r.push {
        println!("\npush (HTTP API)");
        println!(
            "{} HTTP clients -> {} receivers: {:.0} pushes/s ({} failed); push-to-receive p50 {:.0} µs, p99 {:.0} µs",
            p.concurrency, p.receivers, p.pushes_per_sec, p.failed, p.push_to_receive_p50_us, p.push_to_receive_p99_us
        );
    }
    if !r.ratios.is_empty() {
        println!("\nratios");
        for x in &r.ratios {
            println!("  {:<64} {:>6.2}", x.what, x.ratio);
        }
    }
}

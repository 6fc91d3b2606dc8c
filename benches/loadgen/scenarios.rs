//! The scenarios: what is measured, and how.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::FutureExt as _;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::client::{self, Endpoint, System, now_ns, payload, sent_at};
use crate::target::{self, Server};

/// Source address for connection `i`: spread over 127.0.0.2-127.0.0.201 so that many
/// connections never exhaust one address's ephemeral ports.
fn source(i: usize) -> Option<IpAddr> {
    Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i % 200) as u8)))
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds")
}

fn us(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() { 0.0 } else { h.value_at_quantile(q) as f64 / 1000.0 }
}

// === connections ===

#[derive(Debug, Clone, Serialize)]
pub struct ConnectionsResult {
    pub system: &'static str,
    pub label: String,
    pub connections: usize,
    pub failed: usize,
    pub connects_per_sec: f64,
    pub connect_p50_us: f64,
    pub connect_p99_us: f64,
    /// CPU time the server spent per connection opened (handshake, authentication, session
    /// start), in microseconds. This and the RSS figures are `None` (JSON `null`) for a
    /// server given with `--target`.
    pub server_cpu_us_per_connect: Option<f64>,
    pub rss_before_mib: Option<f64>,
    pub rss_after_mib: Option<f64>,
    pub rss_per_connection_kib: Option<f64>,
}

/// Opens `n` connections (at most `concurrency` handshakes at once), holds them, and
/// reads the server's RSS before and after.
pub async fn connections(
    server: &Server,
    endpoint: &Endpoint,
    label: &str,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<ConnectionsResult> {
    let rss_before = server.rss_bytes();
    let cpu_before = server.cpu_seconds();
    let gate = Arc::new(Semaphore::new(concurrency));
    let mut set = JoinSet::new();
    let started = Instant::now();
    for i in 0..n {
        let permit = gate.clone().acquire_owned().await?;
        let endpoint = endpoint.clone();
        set.spawn(async move {
            let t0 = Instant::now();
            let conn = client::connect(&endpoint, &format!("c{i}"), false, source(i)).await;
            drop(permit);
            conn.map(|c| (c, t0.elapsed()))
        });
    }
    let mut held = Vec::with_capacity(n);
    let mut latency = hist();
    let mut failed = 0;
    let mut first_error = None;
    while let Some(joined) = set.join_next().await {
        match joined? {
            Ok((conn, took)) => {
                let _ = latency.record(took.as_nanos() as u64);
                held.push(conn);
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = server.cpu_seconds().zip(cpu_before).map(|(after, before)| after - before);
    if let Some(e) = first_error {
        eprintln!("loadgen: {failed} of {n} connections to {} failed; first: {e:#}", server.system.name());
    }
    // Let the server settle (allocator, lazily touched buffers) before reading its RSS.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = server.rss_bytes();
    let ok = held.len().max(1);
    let result = ConnectionsResult {
        system: server.system.name(),
        label: label.into(),
        connections: held.len(),
        failed,
        connects_per_sec: held.len() as f64 / elapsed,
        connect_p50_us: us(&latency, 0.5),
        connect_p99_us: us(&latency, 0.99),
        server_cpu_us_per_connect: cpu.map(|cpu| cpu * 1e6 / ok as f64),
        rss_before_mib: rss_before.map(|b| b as f64 / 1048576.0),
        rss_after_mib: rss_after.map(|b| b as f64 / 1048576.0),
        rss_per_connection_kib: rss_after
            .zip(rss_before)
            .map(|(after, before)| after.saturating_sub(before) as f64 / ok as f64 / 1024.0),
    };
    for (writer, reader) in held {
        drop(reader);
        writer.close().await;
    }
    Ok(result)
}

// === direct ===

#[derive(Debug, Clone)]
pub struct DirectOpts {
    pub pairs: usize,
    pub warmup: Duration,
    pub duration: Duration,
    pub payload: usize,
    /// Messages a sender may have in flight (sent, not yet received) at once.
    pub window: u64,
    /// Total messages per second over all pairs; `None` is as fast as possible.
    pub rate: Option<f64>,
    /// Switchboard: whether every send asks for an `ack` (`false` sends `"ack": false`, the
    /// fire-and-forget the peers' QoS 0 and plain PUB are).
    pub ack: bool,
    /// Both clients of a pair send to each other (a conversation), instead of one sending
    /// and the other receiving: a client then reads its acks and its peer's messages from
    /// one connection. `rate` is still the total of all senders, `window` per sender.
    pub two_way: bool,
}

impl DirectOpts {
    /// The same run paced at `rate` msg/s in all: each sender sends on its own timer, and the
    /// window only bounds how far ahead of a stalled receiver it may get.
    pub fn paced(self, rate: f64) -> Self {
        Self { rate: Some(rate), window: 10_000, ..self }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DirectResult {
    pub system: &'static str,
    pub label: String,
    pub pairs: usize,
    pub payload_bytes: usize,
    pub target_rate: Option<f64>,
    pub delivered: u64,
    /// Sends the server refused during the whole run (switchboard error frames).
    pub refused: u64,
    /// Senders (one per pair, two when two-way) at least one of whose messages arrived.
    pub senders_delivered: usize,
    /// Rounds this run was the median of (1: a single run).
    pub rounds: usize,
    pub seconds: f64,
    pub msgs_per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// CPU milliseconds the server used per 1000 delivered messages (`None`, JSON `null`,
    /// for a server given with `--target`).
    pub server_cpu_ms_per_1k: Option<f64>,
    /// The same for the load generator: what the clients paid.
    pub client_cpu_ms_per_1k: f64,
}

struct PairState {
    received: AtomicU64,
    /// Sends the server refused (error frames): they free the window like a receipt.
    refused: AtomicU64,
    notify: Notify,
}

impl PairState {
    fn settled(&self) -> u64 {
        self.received.load(Ordering::Relaxed) + self.refused.load(Ordering::Relaxed)
    }
}

/// `pairs` senders each send to their own receiver for `duration` after `warmup` (both
/// clients of a pair send to each other when `opts.two_way`); reports delivered messages per
/// second and send-to-receive latency.
pub async fn direct(
    server: &Server,
    endpoint: &Endpoint,
    label: &str,
    opts: &DirectOpts,
) -> anyhow::Result<DirectResult> {
    direct_between(&[server], endpoint, endpoint, label, opts).await
}

/// One client connection of a `direct` run: what it sends, and to whom, and what it receives.
struct End {
    /// The user it is connected as.
    user: String,
    writer: client::Writer,
    reader: client::Reader,
    /// The user it sends to and that flow's window; `None` for a client that only receives.
    sends: Option<(String, Arc<PairState>)>,
    /// The flow it receives; `None` for a client that only sends.
    receives: Option<Arc<PairState>>,
}

/// [`direct`] with receivers connected at `receive_at` and senders at `send_at` (two nodes
/// of a cluster); CPU is summed over `servers`. Two-way, the first client of each pair is
/// connected at `receive_at`, the second at `send_at`.
pub async fn direct_between(
    servers: &[&Server],
    receive_at: &Endpoint,
    send_at: &Endpoint,
    label: &str,
    opts: &DirectOpts,
) -> anyhow::Result<DirectResult> {
    // None when any of them was not started here.
    let cpu_now = || servers.iter().map(|s| s.cpu_seconds()).sum::<Option<f64>>();
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let done = CancellationToken::new();
    let delivered = Arc::new(AtomicU64::new(0));
    // Users of this run only: a server that outlives a run (`--target`) may still hold
    // messages for the last run's receivers, which must not be counted here.
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let run = RUNS.fetch_add(1, Ordering::Relaxed);
    // One flow per sender: its messages in flight, counted off by its receiver.
    let flows = if opts.two_way { 2 * opts.pairs } else { opts.pairs };
    let states: Vec<Arc<PairState>> = (0..flows)
        .map(|_| Arc::new(PairState { received: AtomicU64::new(0), refused: AtomicU64::new(0), notify: Notify::new() }))
        .collect();
    // Every client subscribes before any sends, so every message has somewhere to go.
    let mut ends = Vec::with_capacity(2 * opts.pairs);
    for i in 0..opts.pairs {
        let (first, second) = if opts.two_way { ("a", "b") } else { ("r", "s") };
        let (a, b) = (format!("{first}{i}-{run}"), format!("{second}{i}-{run}"));
        let (writer, reader) =
            client::connect(receive_at, &a, true, source(i)).await.with_context(|| format!("client {a}"))?;
        let (sends, receives) = match opts.two_way {
            true => (Some((b.clone(), states[2 * i + 1].clone())), Some(states[2 * i].clone())),
            false => (None, Some(states[i].clone())),
        };
        ends.push(End { user: a.clone(), writer, reader, sends, receives });
        let (writer, reader) = client::connect(send_at, &b, opts.two_way, source(opts.pairs + i))
            .await
            .with_context(|| format!("client {b}"))?;
        let flow = if opts.two_way { 2 * i } else { i };
        let receives = opts.two_way.then(|| states[2 * i + 1].clone());
        ends.push(End { user: b, writer, reader, sends: Some((a, states[flow].clone())), receives });
    }
    let mut readers = JoinSet::new();
    let mut senders = JoinSet::new();
    for End { user, writer, mut reader, sends, receives } in ends {
        // Switchboard answers refused sends with error frames: they settle the sender's
        // flow as a receipt would (and are counted).
        let refusals = sends.as_ref().map(|(_, state)| state.clone());
        let (measuring, delivered, done) = (measuring.clone(), delivered.clone(), done.clone());
        let reading_stop = stop.clone();
        // A client that only receives keeps its connection open from its reader.
        let (keep, writer) = if sends.is_some() { (None, Some(writer)) } else { (Some(writer), None) };
        readers.spawn(async move {
            let _writer = keep;
            let mut h = hist();
            while let Some(read) = done.run_until_cancelled(reader.next_delivery()).await {
                // Once the senders stop, connections close and how they end is not the run's.
                let read = match read {
                    Ok(Some(read)) => read,
                    Err(e) if !reading_stop.load(Ordering::Relaxed) => return Err(e.context(format!("client {user}"))),
                    Ok(None) | Err(_) => break,
                };
                match (read, &receives, &refusals) {
                    (client::Delivery::Payload(frame), Some(state), _) => {
                        state.received.fetch_add(1, Ordering::Relaxed);
                        state.notify.notify_one();
                        if measuring.load(Ordering::Relaxed) {
                            delivered.fetch_add(1, Ordering::Relaxed);
                            if let Some(t) = sent_at(&frame) {
                                let _ = h.record(now_ns().saturating_sub(t).max(1));
                            }
                        }
                    }
                    (client::Delivery::Refused, _, Some(state)) => {
                        state.refused.fetch_add(1, Ordering::Relaxed);
                        state.notify.notify_one();
                    }
                    _ => {}
                }
            }
            anyhow::Ok(h)
        });
        let (Some((to, state)), Some(mut writer)) = (sends, writer) else { continue };
        writer.set_ack(opts.ack);
        let (stop, opts) = (stop.clone(), opts.clone());
        senders.spawn(async move {
            let mut sent: u64 = 0;
            // Paced: messages whose time has come and that are not sent yet.
            let mut owed: u64 = 0;
            let mut tick = opts.rate.map(|rate| {
                let period = Duration::from_secs_f64(flows as f64 / rate);
                let mut t = tokio::time::interval(period);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                t
            });
            while !stop.load(Ordering::Relaxed) {
                // Paced: every message whose time has come (the timer wakes at most once a
                // millisecond, so at high rates several are due at each wake-up). A long
                // period does not keep the sender from seeing `stop`.
                if let Some(t) = &mut tick {
                    if owed == 0 {
                        match tokio::time::timeout(Duration::from_millis(100), t.tick()).await {
                            Ok(_) => owed = 1,
                            Err(_) => continue,
                        }
                    }
                    while owed < opts.window && t.tick().now_or_never().is_some() {
                        owed += 1;
                    }
                }
                // Window: wait while too many are in flight.
                loop {
                    let notified = state.notify.notified();
                    if sent - state.settled() < opts.window || stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
                }
                // Fill the window (with the messages due, when paced), then flush once.
                let room = opts.window.saturating_sub(sent - state.settled()).max(1);
                let room = if tick.is_some() { owed.min(room) } else { room };
                owed -= owed.min(room);
                for _ in 0..room {
                    writer.feed(&to, &payload(opts.payload)).await?;
                    sent += 1;
                }
                writer.flush().await?;
            }
            writer.close().await;
            anyhow::Ok(sent)
        });
    }

    tokio::time::sleep(opts.warmup).await;
    let cpu0 = cpu_now();
    let own0 = target::cpu_seconds_of(nix::unistd::Pid::this());
    measuring.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(opts.duration).await;
    measuring.store(false, Ordering::Relaxed);
    let seconds = t0.elapsed().as_secs_f64();
    let cpu = cpu_now().zip(cpu0).map(|(after, before)| after - before);
    let own = target::cpu_seconds_of(nix::unistd::Pid::this()) - own0;
    let count = delivered.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    for s in &states {
        s.notify.notify_one();
    }
    // A sender that failed (its connection closed under it) is reported after the readers:
    // a reader that saw the server's fatal error frame says why.
    let mut failed = None;
    while let Some(r) = senders.join_next().await {
        if let Err(e) = r? {
            failed.get_or_insert(e);
        }
    }
    done.cancel();
    let mut latency = hist();
    while let Some(h) = readers.join_next().await {
        latency.add(&h??).expect("same bounds");
    }
    if let Some(e) = failed {
        return Err(e);
    }
    Ok(DirectResult {
        system: servers[0].system.name(),
        label: label.into(),
        pairs: opts.pairs,
        payload_bytes: opts.payload,
        target_rate: opts.rate,
        delivered: count,
        refused: states.iter().map(|s| s.refused.load(Ordering::Relaxed)).sum(),
        senders_delivered: states.iter().filter(|s| s.received.load(Ordering::Relaxed) > 0).count(),
        rounds: 1,
        seconds,
        msgs_per_sec: count as f64 / seconds,
        p50_us: us(&latency, 0.5),
        p99_us: us(&latency, 0.99),
        p999_us: us(&latency, 0.999),
        server_cpu_ms_per_1k: cpu.map(|cpu| if count == 0 { 0.0 } else { cpu * 1000.0 / (count as f64 / 1000.0) }),
        client_cpu_ms_per_1k: if count == 0 { 0.0 } else { own * 1000.0 / (count as f64 / 1000.0) },
    })
}

// === push ===

#[derive(Debug, Clone, Serialize)]
pub struct PushResult {
    pub system: &'static str,
    pub receivers: usize,
    pub concurrency: usize,
    pub pushes: u64,
    pub failed: u64,
    pub seconds: f64,
    pub pushes_per_sec: f64,
    pub push_to_receive_p50_us: f64,
    pub push_to_receive_p99_us: f64,
}

/// `concurrency` HTTP clients push signed messages to `receivers` connected users.
pub async fn push(
    server: &Server,
    receivers: usize,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
    size: usize,
) -> anyhow::Result<PushResult> {
    let endpoint = &server.endpoint;
    let http = server.http.context("push needs switchboard's HTTP API")?;
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let done = CancellationToken::new();
    let mut readers = JoinSet::new();
    for i in 0..receivers {
        let user = format!("p{i}");
        let (writer, mut reader) = client::connect(endpoint, &user, true, source(i)).await?;
        let (measuring, done) = (measuring.clone(), done.clone());
        readers.spawn(async move {
            let _writer = writer;
            let mut h = hist();
            while let Some(frame) = done.run_until_cancelled(reader.next_payload()).await {
                let Some(frame) = frame.with_context(|| format!("client {user}"))? else { break };
                if measuring.load(Ordering::Relaxed)
                    && let Some(t) = sent_at(&frame)
                {
                    let _ = h.record(now_ns().saturating_sub(t).max(1));
                }
            }
            anyhow::Ok(h)
        });
    }
    let client = reqwest::Client::builder().pool_max_idle_per_host(concurrency).build()?;
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut workers = JoinSet::new();
    for w in 0..concurrency {
        let (client, stop, measuring, ok, failed) =
            (client.clone(), stop.clone(), measuring.clone(), ok.clone(), failed.clone());
        let url = format!("http://{http}/api/v1/push");
        let secret = endpoint.secret.clone();
        let app = endpoint.app.clone();
        workers.spawn(async move {
            let mut n: u64 = 0;
            while !stop.load(Ordering::Relaxed) {
                let to = format!("p{}", (w as u64 + n * concurrency as u64) % receivers as u64);
                let nonce = format!("w{w}-{n}");
                // Written by hand: a serde_json::Value would sort the payload's keys, and the
                // timestamp must stay first to be found the same way as everywhere else.
                let message = String::from_utf8(payload(size)).expect("ASCII payload");
                let body = format!(r#"{{"app_key":"{app}","send_to":"{to}","message":{message},"nonce":"{nonce}"}}"#)
                    .into_bytes();
                let ts = (switchboard::protocol::now_ms() / 1000).to_string();
                let sig = switchboard::auth::signature::sign(secret.as_bytes(), &ts, &nonce, &body);
                let resp = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .header(switchboard::auth::signature::TIMESTAMP_HEADER, ts)
                    .header(switchboard::auth::signature::SIGNATURE_HEADER, sig)
                    .body(body)
                    .send()
                    .await;
                let counted = measuring.load(Ordering::Relaxed);
                match resp {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                        if counted {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    _ if counted => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
                n += 1;
            }
        });
    }
    tokio::time::sleep(warmup).await;
    measuring.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(duration).await;
    measuring.store(false, Ordering::Relaxed);
    let seconds = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    while workers.join_next().await.is_some() {}
    // Let the last pushes arrive, then stop the readers.
    tokio::time::sleep(Duration::from_millis(100)).await;
    done.cancel();
    let mut latency = hist();
    while let Some(h) = readers.join_next().await {
        latency.add(&h??).expect("same bounds");
    }
    let pushes = ok.load(Ordering::Relaxed);
    Ok(PushResult {
        system: System::Switchboard.name(),
        receivers,
        concurrency,
        pushes,
        failed: failed.load(Ordering::Relaxed),
        seconds,
        pushes_per_sec: pushes as f64 / seconds,
        push_to_receive_p50_us: us(&latency, 0.5),
        push_to_receive_p99_us: us(&latency, 0.99),
    })
}

// === fanout ===

#[derive(Debug, Clone, Serialize)]
pub struct FanoutResult {
    pub system: &'static str,
    pub subscribers: usize,
    pub messages: u64,
    /// Messages every subscriber received.
    pub complete: u64,
    pub deliveries: u64,
    pub seconds: f64,
    pub deliveries_per_sec: f64,
    /// Per message, from send to the last subscriber's receipt.
    pub last_receive_p50_us: f64,
    pub last_receive_p99_us: f64,
}

/// One publisher, `subscribers` subscribers of one channel. The publisher keeps at most
/// `window` messages ahead of the slowest subscriber, for at most `max_messages` messages or
/// `duration`; reports deliveries per second and, per message, the time until the last
/// subscriber had it.
pub async fn fanout(
    server: &Server,
    subscribers: usize,
    window: u64,
    max_messages: u64,
    duration: Duration,
    size: usize,
) -> anyhow::Result<FanoutResult> {
    let endpoint = &server.endpoint;
    let channel = "bench";
    // Per message: how many subscribers have it, and the latest receipt.
    let got: Arc<Vec<std::sync::atomic::AtomicU32>> =
        Arc::new((0..max_messages).map(|_| std::sync::atomic::AtomicU32::new(0)).collect());
    let last: Arc<Vec<AtomicU64>> = Arc::new((0..max_messages).map(|_| AtomicU64::new(0)).collect());
    let complete = Arc::new(AtomicU64::new(0));
    let progress = Arc::new(Notify::new());
    let deliveries = Arc::new(AtomicU64::new(0));
    let done = CancellationToken::new();
    let mut readers = JoinSet::new();
    let gate = Arc::new(Semaphore::new(256));
    let mut connects = JoinSet::new();
    for i in 0..subscribers {
        let (endpoint, gate) = (endpoint.clone(), gate.clone());
        connects.spawn(async move {
            let _permit = gate.acquire_owned().await;
            let user = format!("f{i}");
            let conn = client::connect_channel(&endpoint, &user, channel, source(i)).await;
            conn.map(|conn| (user, conn))
        });
    }
    while let Some(conn) = connects.join_next().await {
        let (user, (writer, mut reader)) = conn??;
        let (got, last, complete, progress, deliveries, done) =
            (got.clone(), last.clone(), complete.clone(), progress.clone(), deliveries.clone(), done.clone());
        readers.spawn(async move {
            let _writer = writer;
            while let Some(frame) = done.run_until_cancelled(reader.next_payload()).await {
                let Some(frame) = frame.with_context(|| format!("subscriber {user}"))? else { break };
                let (Some(seq), Some(t)) = (client::seq_of(&frame), sent_at(&frame)) else { continue };
                let Some(n) = got.get(seq as usize) else { continue };
                deliveries.fetch_add(1, Ordering::Relaxed);
                last[seq as usize].fetch_max(now_ns().saturating_sub(t), Ordering::Relaxed);
                if n.fetch_add(1, Ordering::Relaxed) + 1 == subscribers as u32 {
                    complete.fetch_add(1, Ordering::Relaxed);
                    progress.notify_one();
                }
            }
            anyhow::Ok(())
        });
    }
    let (mut publisher, reader) = client::connect(endpoint, "publisher", false, source(subscribers)).await?;
    let publisher_reader = tokio::spawn(reader.drain_counting_errors(|| {}));
    let started = Instant::now();
    let mut sent: u64 = 0;
    while sent < max_messages && started.elapsed() < duration {
        loop {
            let notified = progress.notified();
            if sent - complete.load(Ordering::Relaxed) < window || started.elapsed() >= duration {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
        }
        let published = async {
            publisher.feed_channel(channel, &client::payload_seq(size, sent)).await?;
            publisher.flush().await
        };
        if let Err(e) = published.await {
            // A publisher the server closed fails here; its reader saw why.
            return Err(match tokio::time::timeout(Duration::from_secs(1), publisher_reader).await {
                Ok(Ok(Err(reason))) => reason.context("the publisher"),
                _ => e.context("the publisher"),
            });
        }
        sent += 1;
    }
    // Let the last messages arrive (bounded), then stop.
    let settle = Instant::now();
    while complete.load(Ordering::Relaxed) < sent && settle.elapsed() < Duration::from_secs(5) {
        let _ = tokio::time::timeout(Duration::from_millis(100), progress.notified()).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    done.cancel();
    while let Some(read) = readers.join_next().await {
        read??;
    }
    publisher.close().await;
    publisher_reader.abort();
    let mut latency = hist();
    for s in 0..sent as usize {
        if got[s].load(Ordering::Relaxed) == subscribers as u32 {
            let _ = latency.record(last[s].load(Ordering::Relaxed).max(1));
        }
    }
    let delivered = deliveries.load(Ordering::Relaxed);
    Ok(FanoutResult {
        system: server.system.name(),
        subscribers,
        messages: sent,
        complete: complete.load(Ordering::Relaxed),
        deliveries: delivered,
        seconds,
        deliveries_per_sec: delivered as f64 / seconds,
        last_receive_p50_us: us(&latency, 0.5),
        last_receive_p99_us: us(&latency, 0.99),
    })
}

//! The scenarios: what is measured, and how.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::client::{self, Endpoint, System, now_ns, payload, sent_at};
use crate::target::Server;

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
    pub rss_before_mib: f64,
    pub rss_after_mib: f64,
    pub rss_per_connection_kib: f64,
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
        rss_before_mib: rss_before as f64 / 1048576.0,
        rss_after_mib: rss_after as f64 / 1048576.0,
        rss_per_connection_kib: rss_after.saturating_sub(rss_before) as f64 / ok as f64 / 1024.0,
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
    pub seconds: f64,
    pub msgs_per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// CPU seconds the server used per 1000 delivered messages.
    pub server_cpu_ms_per_1k: f64,
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

/// `pairs` senders each send to their own receiver for `duration` after `warmup`; reports
/// delivered messages per second and send-to-receive latency.
pub async fn direct(
    server: &Server,
    endpoint: &Endpoint,
    label: &str,
    opts: &DirectOpts,
) -> anyhow::Result<DirectResult> {
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let done = CancellationToken::new();
    let delivered = Arc::new(AtomicU64::new(0));
    let mut receivers = JoinSet::new();
    let mut states = Vec::with_capacity(opts.pairs);
    // Receivers first, so every message has somewhere to go.
    for i in 0..opts.pairs {
        let (writer, mut reader) = client::connect(endpoint, &format!("r{i}"), true, source(i))
            .await
            .with_context(|| format!("receiver r{i}"))?;
        let state =
            Arc::new(PairState { received: AtomicU64::new(0), refused: AtomicU64::new(0), notify: Notify::new() });
        states.push(state.clone());
        let (measuring, delivered, done) = (measuring.clone(), delivered.clone(), done.clone());
        receivers.spawn(async move {
            let _writer = writer;
            let mut h = hist();
            while let Some(Ok(Some(frame))) = done.run_until_cancelled(reader.next_payload()).await {
                state.received.fetch_add(1, Ordering::Relaxed);
                state.notify.notify_one();
                if measuring.load(Ordering::Relaxed) {
                    delivered.fetch_add(1, Ordering::Relaxed);
                    if let Some(t) = sent_at(&frame) {
                        let _ = h.record(now_ns().saturating_sub(t).max(1));
                    }
                }
            }
            h
        });
    }
    let mut senders = JoinSet::new();
    for (i, state) in states.iter().enumerate() {
        let (mut writer, reader) = client::connect(endpoint, &format!("s{i}"), false, source(opts.pairs + i))
            .await
            .with_context(|| format!("sender s{i}"))?;
        // Switchboard acknowledges every send: read those away, counting refusals.
        let counted = state.clone();
        tokio::spawn(reader.drain_counting_errors(move || {
            counted.refused.fetch_add(1, Ordering::Relaxed);
            counted.notify.notify_one();
        }));
        let (state, stop, opts) = (state.clone(), stop.clone(), opts.clone());
        let to = format!("r{i}");
        senders.spawn(async move {
            let mut sent: u64 = 0;
            let mut tick = opts.rate.map(|rate| {
                let period = Duration::from_secs_f64(opts.pairs as f64 / rate);
                let mut t = tokio::time::interval(period);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                t
            });
            while !stop.load(Ordering::Relaxed) {
                if let Some(t) = &mut tick {
                    t.tick().await;
                }
                // Window: wait while too many are in flight.
                loop {
                    let notified = state.notify.notified();
                    if sent - state.settled() < opts.window || stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
                }
                // Fill the window (one message when paced), then flush once.
                let room = if tick.is_some() { 1 } else { opts.window.saturating_sub(sent - state.settled()) };
                for _ in 0..room.max(1) {
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
    let cpu0 = server.cpu_seconds();
    measuring.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(opts.duration).await;
    measuring.store(false, Ordering::Relaxed);
    let seconds = t0.elapsed().as_secs_f64();
    let cpu = server.cpu_seconds() - cpu0;
    let count = delivered.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    for s in &states {
        s.notify.notify_one();
    }
    while let Some(r) = senders.join_next().await {
        r??;
    }
    done.cancel();
    let mut latency = hist();
    while let Some(h) = receivers.join_next().await {
        latency.add(&h?).expect("same bounds");
    }
    Ok(DirectResult {
        system: server.system.name(),
        label: label.into(),
        pairs: opts.pairs,
        payload_bytes: opts.payload,
        target_rate: opts.rate,
        delivered: count,
        refused: states.iter().map(|s| s.refused.load(Ordering::Relaxed)).sum(),
        seconds,
        msgs_per_sec: count as f64 / seconds,
        p50_us: us(&latency, 0.5),
        p99_us: us(&latency, 0.99),
        p999_us: us(&latency, 0.999),
        server_cpu_ms_per_1k: if count == 0 { 0.0 } else { cpu * 1000.0 / (count as f64 / 1000.0) },
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
        let (writer, mut reader) = client::connect(endpoint, &format!("p{i}"), true, source(i)).await?;
        let (measuring, done) = (measuring.clone(), done.clone());
        readers.spawn(async move {
            let _writer = writer;
            let mut h = hist();
            while let Some(Ok(Some(frame))) = done.run_until_cancelled(reader.next_payload()).await {
                if measuring.load(Ordering::Relaxed)
                    && let Some(t) = sent_at(&frame)
                {
                    let _ = h.record(now_ns().saturating_sub(t).max(1));
                }
            }
            h
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
        latency.add(&h?).expect("same bounds");
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

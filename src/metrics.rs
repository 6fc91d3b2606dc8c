//! Prometheus metrics: what the node counts, and `GET /metrics` in the OpenMetrics text
//! format (which Prometheus reads natively).
//!
//! Counters on the message path are atomics reached without a lookup: each app keeps its own
//! handles ([`AppMetrics`]) and each connection its gauge ([`ConnectionGauge`]). What the
//! node knows anyway (plugin pools' counters and latency, queue sizes, the cluster's state)
//! is read when scraped ([`Scrape`]) instead of being counted twice. Label values are only
//! ever configured names (apps, plugins), transports and error codes, never user ids, so the
//! number of series stays bounded whatever clients send.

use std::cell::Cell;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crossbeam_utils::CachePadded;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

use crate::plugin::MetricsSnapshot;
use crate::protocol::ErrorCode;
use crate::transport::Transport;

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnLabels {
    app: String,
    transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectLabels {
    app: String,
    transport: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AppLabels {
    app: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    app: String,
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    app: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    app: String,
    outcome: &'static str,
}

/// The node's counters and gauges.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    connections: Family<ConnLabels, Gauge>,
    connects: Family<ConnLabels, Counter>,
    rejects: Family<RejectLabels, Counter>,
    disconnects: Family<ReasonLabels, Counter>,
    slow_consumers: Family<AppLabels, Counter>,
    received: Family<SourceLabels, ShardedCounter>,
    delivered: Family<AppLabels, ShardedCounter>,
    dropped: Family<AppLabels, ShardedCounter>,
    denied: Family<ReasonLabels, Counter>,
    push_requests: Family<OutcomeLabels, Counter>,
    push_recipients: Family<OutcomeLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("switchboard");
        let m = Self {
            connections: Family::default(),
            connects: Family::default(),
            rejects: Family::default(),
            disconnects: Family::default(),
            slow_consumers: Family::default(),
            received: Family::default(),
            delivered: Family::default(),
            dropped: Family::default(),
            denied: Family::default(),
            push_requests: Family::default(),
            push_recipients: Family::default(),
            registry: Registry::default(),
        };
        registry.register("connections", "Client connections held now, by app and transport", m.connections.clone());
        registry.register("connects", "Connections accepted (authenticated), by app and transport", m.connects.clone());
        registry.register(
            "connect_rejects",
            "Connection attempts refused, by reason (the error code sent; app empty when unknown)",
            m.rejects.clone(),
        );
        registry.register(
            "disconnects",
            "Authenticated connections that ended, by reason (client_closed, or the error code)",
            m.disconnects.clone(),
        );
        registry.register(
            "slow_consumer_disconnects",
            "Connections closed because they did not keep up with their messages",
            m.slow_consumers.clone(),
        );
        registry.register(
            "messages_received",
            "Messages that entered the node, by source (client, push, channel_api)",
            m.received.clone(),
        );
        registry.register(
            "messages_delivered",
            "Message frames queued to this node's connections (one per receiving connection)",
            m.delivered.clone(),
        );
        registry.register(
            "messages_dropped",
            "Message frames not queued because the receiving connection was too slow",
            m.dropped.clone(),
        );
        registry.register(
            "messages_denied",
            "Messages refused, by reason (denied, filter_failed, rate_limited, publish_forbidden)",
            m.denied.clone(),
        );
        registry.register(
            "push_requests",
            "HTTP push and channel publish requests, by outcome (ok, or the error code)",
            m.push_requests.clone(),
        );
        registry.register(
            "push_recipients",
            "Recipients of HTTP pushes, by outcome (delivered, offline, dropped, unavailable, or the refusal code)",
            m.push_recipients.clone(),
        );
        Self { registry, ..m }
    }

    /// Handles for one app's per-message counters.
    pub fn app(&self, app: &str) -> AppMetrics {
        let source = |source| self.received.get_or_create_owned(&SourceLabels { app: app.into(), source });
        let labels = AppLabels { app: app.into() };
        let denied = DENIED_REASONS
            .map(|code| self.denied.get_or_create_owned(&ReasonLabels { app: app.into(), reason: code.as_str() }));
        let recipients = PUSH_OUTCOMES
            .map(|outcome| self.push_recipients.get_or_create_owned(&OutcomeLabels { app: app.into(), outcome }));
        AppMetrics {
            from_clients: source("client"),
            from_push: source("push"),
            from_channel_api: source("channel_api"),
            delivered: self.delivered.get_or_create_owned(&labels),
            dropped: self.dropped.get_or_create_owned(&labels),
            denied,
            recipients,
        }
    }

    /// Counts an accepted connection; the returned gauge counts it as held until dropped.
    pub fn connected(&self, app: &str, transport: Transport) -> ConnectionGauge {
        let labels = ConnLabels { app: app.into(), transport: transport.as_str() };
        self.connects.get_or_create(&labels).inc();
        let gauge = self.connections.get_or_create_owned(&labels);
        gauge.inc();
        ConnectionGauge(gauge)
    }

    /// Counts a refused connection attempt. `app` is `None` unless it is a configured app.
    pub fn rejected(&self, app: Option<&str>, transport: Transport, reason: &'static str) {
        let labels = RejectLabels { app: app.unwrap_or_default().into(), transport: transport.as_str(), reason };
        self.rejects.get_or_create(&labels).inc();
    }

    /// Counts the end of an authenticated connection.
    pub fn disconnected(&self, app: &str, reason: &'static str) {
        self.disconnects.get_or_create(&ReasonLabels { app: app.into(), reason }).inc();
        if reason == ErrorCode::SlowConsumer.as_str() {
            self.slow_consumers.get_or_create(&AppLabels { app: app.into() }).inc();
        }
    }

    /// Counts a push or channel publish request. `app` is `None` unless configured.
    pub fn push_request(&self, app: Option<&str>, outcome: &'static str) {
        self.push_requests.get_or_create(&OutcomeLabels { app: app.unwrap_or_default().into(), outcome }).inc();
    }

    /// Everything, in the OpenMetrics text format: the counters above, then `scrape`.
    pub fn render(&self, scrape: Scrape) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let mut dynamic = Registry::with_prefix("switchboard");
        dynamic.register_collector(Box::new(scrape));
        prometheus_client::encoding::text::encode_registry(&mut out, &self.registry)
            .and_then(|()| prometheus_client::encoding::text::encode_registry(&mut out, &dynamic))
            .and_then(|()| prometheus_client::encoding::text::encode_eof(&mut out))
            .expect("writing to a String cannot fail");
        out
    }
}

/// One connection counted in `switchboard_connections` while it lives.
#[derive(Debug)]
pub struct ConnectionGauge(Gauge);

impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Why a message may be refused before delivery (`messages_denied_total`'s reasons).
const DENIED_REASONS: [ErrorCode; 4] =
    [ErrorCode::Denied, ErrorCode::FilterFailed, ErrorCode::RateLimited, ErrorCode::PublishForbidden];

/// What can become of one push recipient (`push_recipients_total`'s outcomes).
const PUSH_OUTCOMES: [&str; 6] = ["delivered", "offline", "dropped", "unavailable", "denied", "filter_failed"];

/// One app's per-message counters, created up front so that counting is one atomic add.
#[derive(Debug, Clone)]
pub struct AppMetrics {
    /// `send` and `publish` frames from clients.
    pub from_clients: ShardedCounter,
    /// Push requests (one per request, whatever its number of recipients).
    pub from_push: ShardedCounter,
    pub from_channel_api: ShardedCounter,
    pub delivered: ShardedCounter,
    pub dropped: ShardedCounter,
    denied: [Counter; DENIED_REASONS.len()],
    recipients: [Counter; PUSH_OUTCOMES.len()],
}

impl AppMetrics {
    /// Counts a message refused before delivery.
    pub fn denied(&self, code: ErrorCode) {
        match DENIED_REASONS.iter().position(|c| *c == code) {
            Some(i) => {
                self.denied[i].inc();
            }
            None => debug_assert!(false, "{code} is not a reason to deny a message"),
        }
    }

    /// Counts one recipient of a push, by [`Outcome::status`](crate::hub::Outcome::status)
    /// or the refusal code.
    pub fn push_recipient(&self, outcome: &str) {
        match PUSH_OUTCOMES.iter().position(|o| *o == outcome) {
            Some(i) => {
                self.recipients[i].inc();
            }
            None => debug_assert!(false, "{outcome} is not a push outcome"),
        }
    }
}

/// A counter every message adds to, split into one cache line per thread (up to
/// [`SHARDS`] threads; more share them): a thread adds to its own line, and a scrape sums
/// them. A single atomic that every core adds to moves its cache line between the cores on
/// each add. At the `direct` peak (docs/performance.md) the adds to two such counters, one
/// per message received and one per delivery, were 5.1-5.4 % of the server's user time.
#[derive(Debug, Clone)]
pub struct ShardedCounter(Arc<[CachePadded<AtomicU64>; SHARDS]>);

/// How many lines a [`ShardedCounter`] has: a power of two.
const SHARDS: usize = 16;

impl Default for ShardedCounter {
    fn default() -> Self {
        Self(Arc::new(std::array::from_fn(|_| CachePadded::new(AtomicU64::new(0)))))
    }
}

impl ShardedCounter {
    pub fn inc(&self) {
        self.inc_by(1);
    }

    pub fn inc_by(&self, n: u64) {
        self.0[this_thread_shard()].fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.iter().map(|shard| shard.load(Ordering::Relaxed)).sum()
    }
}

/// This thread's line in every [`ShardedCounter`]: threads take them in turn, the first
/// time they count.
fn this_thread_shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    SHARD.with(|shard| {
        if shard.get() == usize::MAX {
            shard.set(NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS);
        }
        shard.get()
    })
}

impl TypedMetric for ShardedCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for ShardedCounter {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> fmt::Result {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.get(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Values read at scrape time from the parts of the node that keep them anyway.
#[derive(Debug, Default)]
pub struct Scrape {
    pub node_id: String,
    pub draining: bool,
    /// Per app: outbound queue bytes in all connections, and in the fullest one.
    pub queues: Vec<(String, crate::registry::QueueStats)>,
    pub plugins: Vec<PluginScrape>,
    pub cluster: Option<ClusterScrape>,
}

/// One (plugin, app) pool.
#[derive(Debug)]
pub struct PluginScrape {
    pub snapshot: MetricsSnapshot,
    /// Sampled call latency: (upper bound in seconds, samples in that bucket), the last
    /// bound infinite; and the samples' sum and count.
    pub latency_buckets: Vec<(f64, u64)>,
    pub latency_sum_seconds: f64,
    pub latency_count: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct ClusterScrape {
    pub connected: bool,
    pub live_nodes: usize,
    /// Deliveries this node published to the others, and received from them.
    pub published: u64,
    pub received: u64,
}

/// Upper bounds of the plugin latency histogram, in seconds: 1 µs to 100 ms.
pub const PLUGIN_LATENCY_BOUNDS: [f64; 14] =
    [1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2, 2.5e-2, 1e-1];

fn gauge(encoder: &mut DescriptorEncoder<'_>, name: &str, help: &str, value: i64) -> fmt::Result {
    let g = ConstGauge::new(value);
    g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
}

fn counter(encoder: &mut DescriptorEncoder<'_>, name: &str, help: &str, value: u64) -> fmt::Result {
    let c = ConstCounter::new(value);
    c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        {
            let mut info = encoder.encode_descriptor("build", "This node's id and version", None, MetricType::Info)?;
            info.encode_info(&[("node", self.node_id.as_str()), ("version", env!("CARGO_PKG_VERSION"))])?;
        }
        gauge(&mut encoder, "draining", "1 while the node moves its clients away", i64::from(self.draining))?;

        {
            let mut total = encoder.encode_descriptor(
                "outbound_queue_bytes",
                "Bytes waiting to be written to this app's connections",
                None,
                MetricType::Gauge,
            )?;
            for (app, q) in &self.queues {
                ConstGauge::new(q.total as i64).encode(total.encode_family(&[("app", app.as_str())])?)?;
            }
        }
        {
            let mut max = encoder.encode_descriptor(
                "outbound_queue_max_bytes",
                "Bytes waiting for this app's most backed-up connection",
                None,
                MetricType::Gauge,
            )?;
            for (app, q) in &self.queues {
                ConstGauge::new(q.max as i64).encode(max.encode_family(&[("app", app.as_str())])?)?;
            }
        }

        self.encode_plugins(&mut encoder)?;

        if let Some(c) = &self.cluster {
            gauge(&mut encoder, "cluster_nats_connected", "1 while the NATS connection is up", i64::from(c.connected))?;
            gauge(&mut encoder, "cluster_nodes", "Live nodes in the cluster, this one included", c.live_nodes as i64)?;
            counter(
                &mut encoder,
                "cluster_published",
                "Deliveries this node published to other nodes over NATS",
                c.published,
            )?;
            counter(
                &mut encoder,
                "cluster_received",
                "Deliveries other nodes sent to this node over NATS",
                c.received,
            )?;
        }
        Ok(())
    }
}

impl Scrape {
    fn encode_plugins(&self, encoder: &mut DescriptorEncoder<'_>) -> fmt::Result {
        let labels = |p: &PluginScrape| [("plugin", p.snapshot.plugin.clone()), ("app", p.snapshot.app.clone())];
        {
            let mut calls = encoder.encode_descriptor(
                "plugin_calls",
                "Plugin calls, by plugin and app (they restart from zero when plugins are reloaded)",
                None,
                MetricType::Counter,
            )?;
            for p in &self.plugins {
                ConstCounter::new(p.snapshot.calls).encode(calls.encode_family(&labels(p))?)?;
            }
        }
        {
            let mut denials =
                encoder.encode_descriptor("plugin_denials", "Messages a filter denied", None, MetricType::Counter)?;
            for p in self.plugins.iter().filter(|p| p.snapshot.world == "message-filter") {
                ConstCounter::new(p.snapshot.denials).encode(denials.encode_family(&labels(p))?)?;
            }
        }
        {
            let mut errors = encoder.encode_descriptor(
                "plugin_errors",
                "Plugin calls that failed, by kind (trap, deadline, memory, ...)",
                None,
                MetricType::Counter,
            )?;
            for p in &self.plugins {
                for (kind, n) in &p.snapshot.errors {
                    let [plugin, app] = labels(p);
                    let set = [plugin, app, ("kind", (*kind).to_string())];
                    ConstCounter::new(*n).encode(errors.encode_family(&set)?)?;
                }
            }
        }
        {
            let mut latency = encoder.encode_descriptor(
                "plugin_call_duration_seconds",
                "Plugin call latency, sampled (one call in 8)",
                None,
                MetricType::Histogram,
            )?;
            for p in &self.plugins {
                latency.encode_family(&labels(p))?.encode_histogram::<NoLabelSet>(
                    p.latency_sum_seconds,
                    p.latency_count,
                    &p.latency_buckets,
                    None,
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_scrape_values() {
        let m = Metrics::new();
        let app = m.app("demo");
        app.from_clients.inc();
        app.delivered.inc_by(3);
        let held = m.connected("demo", Transport::Ws);
        m.rejected(None, Transport::Tcp, "unknown_app");
        m.disconnected("demo", "slow_consumer");
        let text = m.render(Scrape {
            node_id: "n1".into(),
            queues: vec![("demo".into(), crate::registry::QueueStats { total: 10, max: 7 })],
            cluster: Some(ClusterScrape { connected: true, live_nodes: 3, published: 5, received: 6 }),
            ..Scrape::default()
        });
        for line in [
            r#"switchboard_connections{app="demo",transport="ws"} 1"#,
            r#"switchboard_connects_total{app="demo",transport="ws"} 1"#,
            r#"switchboard_connect_rejects_total{app="",transport="tcp",reason="unknown_app"} 1"#,
            r#"switchboard_slow_consumer_disconnects_total{app="demo"} 1"#,
            r#"switchboard_messages_received_total{app="demo",source="client"} 1"#,
            r#"switchboard_messages_delivered_total{app="demo"} 3"#,
            r#"switchboard_outbound_queue_max_bytes{app="demo"} 7"#,
            r#"switchboard_cluster_nodes 3"#,
            r#"switchboard_cluster_received_total 6"#,
            r#"switchboard_build_info{node="n1",version=""#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
        drop(held);
        let text = m.render(Scrape::default());
        assert!(text.contains(r#"switchboard_connections{app="demo",transport="ws"} 0"#), "{text}");
    }

    #[test]
    fn a_sharded_counter_sums_what_every_thread_added() {
        let m = Metrics::new();
        let app = m.app("demo");
        // More threads than lines, so that some share one.
        std::thread::scope(|s| {
            for t in 0..SHARDS as u64 + 3 {
                let delivered = app.delivered.clone();
                s.spawn(move || {
                    for _ in 0..1000 {
                        delivered.inc();
                    }
                    delivered.inc_by(t);
                });
            }
        });
        let threads = SHARDS as u64 + 3;
        let expected = threads * 1000 + threads * (threads - 1) / 2;
        assert_eq!(app.delivered.get(), expected);
        let text = m.render(Scrape::default());
        assert!(text.contains(&format!(r#"switchboard_messages_delivered_total{{app="demo"}} {expected}"#)), "{text}");
    }
}

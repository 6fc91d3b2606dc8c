//! Warm instances of one plugin for one app, and the rules every call follows: a deadline
//! in epoch ticks, a memory cap, and an instance that failed is never used again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hdrhistogram::Histogram;
use serde::Serialize;
use wasmtime::component::Instance;
use wasmtime::{Store, Trap};

use super::bindings::{auth, filter, routing};
use super::engine::deadline_ticks;
use super::host::HostState;
use super::{Failure, FailureKind, Plugin};

/// The exported interface of an instance, typed.
#[derive(Clone)]
pub(super) enum Guest {
    Auth(auth::Guest),
    Filter(filter::Guest),
    Router(routing::Guest),
}

/// Where a world's functions sit in a component; found once per plugin.
#[derive(Clone)]
pub(super) enum Indices {
    Auth(auth::GuestIndices),
    Filter(filter::GuestIndices),
    Router(routing::GuestIndices),
}

impl Indices {
    fn load(&self, store: &mut Store<HostState>, instance: &Instance) -> wasmtime::Result<Guest> {
        Ok(match self {
            Indices::Auth(i) => Guest::Auth(i.load(store, instance)?),
            Indices::Filter(i) => Guest::Filter(i.load(store, instance)?),
            Indices::Router(i) => Guest::Router(i.load(store, instance)?),
        })
    }
}

impl Guest {
    fn init(&self, store: &mut Store<HostState>, config: &str) -> wasmtime::Result<Result<(), String>> {
        match self {
            Guest::Auth(g) => g.call_init(store, config),
            Guest::Filter(g) => g.call_init(store, config),
            Guest::Router(g) => g.call_init(store, config),
        }
    }
}

/// An instance ready for a call.
struct Warm {
    store: Store<HostState>,
    guest: Guest,
}

/// Per (plugin, app) counters, as the admin endpoint shows them.
#[derive(Debug)]
pub(super) struct PoolMetrics {
    calls: AtomicU64,
    denials: AtomicU64,
    instantiations: AtomicU64,
    errors: [AtomicU64; FailureKind::COUNT],
    /// Call latency in nanoseconds.
    latency: Mutex<Histogram<u64>>,
}

impl Default for PoolMetrics {
    fn default() -> Self {
        Self {
            calls: AtomicU64::new(0),
            denials: AtomicU64::new(0),
            instantiations: AtomicU64::new(0),
            errors: Default::default(),
            latency: Mutex::new(Histogram::new(3).expect("3 significant figures is valid")),
        }
    }
}

/// A point-in-time copy of [`PoolMetrics`].
#[derive(Debug, Clone, Serialize)]
pub struct MetricsSnapshot {
    pub plugin: String,
    pub app: String,
    pub world: &'static str,
    pub calls: u64,
    pub denials: u64,
    pub errors: std::collections::BTreeMap<&'static str, u64>,
    pub instantiations: u64,
    pub pool_idle: usize,
    pub latency_us: LatencySnapshot,
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencySnapshot {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

/// Warm instances of one plugin for one app. Calls take an idle instance (or make one),
/// so concurrent calls never wait on each other; at most `pool_size` stay warm.
pub struct Pool {
    pub plugin: Arc<Plugin>,
    pub(super) app: Arc<str>,
    idle: Mutex<Vec<Warm>>,
    pub(super) metrics: PoolMetrics,
    /// Unix second of the last failure warning, so a failing plugin logs once a second.
    last_warning: AtomicU64,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("plugin", &self.plugin.name).field("app", &self.app).finish_non_exhaustive()
    }
}

impl Pool {
    /// Creates the pool and one warm instance, so a plugin whose `init` fails for this app
    /// is refused at load time rather than at its first call.
    pub(super) fn new(plugin: Arc<Plugin>, app: &str) -> Result<Self, Failure> {
        let pool = Self {
            plugin,
            app: app.into(),
            idle: Mutex::new(Vec::new()),
            metrics: PoolMetrics::default(),
            last_warning: AtomicU64::new(0),
        };
        let warm = pool.instantiate()?;
        pool.idle.lock().expect("pool lock").push(warm);
        Ok(pool)
    }

    pub fn plugin_name(&self) -> &str {
        &self.plugin.name
    }

    fn instantiate(&self) -> Result<Warm, Failure> {
        self.metrics.instantiations.fetch_add(1, Ordering::Relaxed);
        let plugin = &self.plugin;
        let state = HostState::new(plugin.name.clone(), self.app.clone(), plugin.memory_limit_bytes);
        let mut store = Store::new(plugin.pre.engine(), state);
        store.limiter(|s| &mut s.limiter);
        // `init` may parse a large config: give it the longer of its deadline and a second.
        store.set_epoch_deadline(deadline_ticks(plugin.deadline.max(std::time::Duration::from_secs(1))));
        let result = (|| {
            let instance = plugin.pre.instantiate(&mut store)?;
            let guest = plugin.indices.load(&mut store, &instance)?;
            let init = guest.init(&mut store, &plugin.config_json)?;
            Ok::<_, wasmtime::Error>((guest, init))
        })();
        match result {
            Ok((guest, Ok(()))) => Ok(Warm { store, guest }),
            Ok((_, Err(message))) => Err(Failure::new(FailureKind::Init, format!("init refused: {message}"))),
            Err(e) => Err(classify(&e, store.data())),
        }
    }

    /// Runs `f` on an idle instance (or a new one) within the plugin's deadline. An instance
    /// whose call failed is dropped: a trap leaves a wasmtime store unusable.
    pub(super) fn call<R>(
        &self,
        f: impl FnOnce(&Guest, &mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<R, Failure> {
        let started = Instant::now();
        self.metrics.calls.fetch_add(1, Ordering::Relaxed);
        let pooled = self.idle.lock().expect("pool lock").pop();
        let mut warm = match pooled {
            Some(w) => w,
            None => self.instantiate().inspect_err(|e| self.count_error(e.kind))?,
        };
        warm.store.data_mut().begin_call();
        warm.store.set_epoch_deadline(self.plugin.deadline_ticks);
        let result = f(&warm.guest, &mut warm.store);
        let result = match result {
            Ok(value) => {
                let mut idle = self.idle.lock().expect("pool lock");
                if idle.len() < self.plugin.pool_size {
                    idle.push(warm);
                }
                Ok(value)
            }
            Err(e) => {
                let failure = classify(&e, warm.store.data());
                self.count_error(failure.kind);
                Err(failure)
            }
        };
        let nanos = started.elapsed().as_nanos() as u64;
        if let Ok(mut h) = self.metrics.latency.lock() {
            let _ = h.record(nanos.max(1));
        }
        result
    }

    /// Logs a failure at warn level at most once a second per pool (metrics count them all).
    pub fn warn_rate_limited(&self, failure: &Failure, what: &str) {
        let now = crate::protocol::now_ms() / 1000;
        if self.last_warning.swap(now, Ordering::Relaxed) != now {
            tracing::warn!(plugin = &*self.plugin.name, app = &*self.app, kind = failure.kind.as_str(), error = %failure, "{what}");
        }
    }

    pub(super) fn count_error(&self, kind: FailureKind) {
        self.metrics.errors[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn count_denial(&self) {
        self.metrics.denials.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        let m = &self.metrics;
        let latency = m.latency.lock().map(|h| h.clone()).unwrap_or_else(|e| e.into_inner().clone());
        let us = |q: f64| latency.value_at_quantile(q) as f64 / 1000.0;
        MetricsSnapshot {
            plugin: self.plugin.name.to_string(),
            app: self.app.to_string(),
            world: self.plugin.world.as_str(),
            calls: m.calls.load(Ordering::Relaxed),
            denials: m.denials.load(Ordering::Relaxed),
            errors: FailureKind::ALL
                .iter()
                .map(|k| (k.as_str(), m.errors[*k as usize].load(Ordering::Relaxed)))
                .collect(),
            instantiations: m.instantiations.load(Ordering::Relaxed),
            pool_idle: self.idle.lock().map(|i| i.len()).unwrap_or(0),
            latency_us: LatencySnapshot {
                p50: us(0.5),
                p90: us(0.9),
                p99: us(0.99),
                max: latency.max() as f64 / 1000.0,
            },
        }
    }
}

/// What kind of failure a wasmtime error was, given what the host saw during the call.
fn classify(e: &wasmtime::Error, state: &HostState) -> Failure {
    if state.limiter.denied {
        return Failure::new(FailureKind::Memory, "the plugin ran out of its memory limit".into());
    }
    match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => Failure::new(FailureKind::Deadline, "the plugin ran past its deadline".into()),
        Some(trap) => Failure::new(FailureKind::Trap, format!("the plugin trapped: {trap}")),
        None => Failure::new(FailureKind::Trap, format!("the plugin failed: {e}")),
    }
}

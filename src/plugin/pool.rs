//! Warm instances of one plugin for one app, and the rules every call follows: a deadline
//! in epoch ticks, a memory cap, and an instance that failed is never used again.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hdrhistogram::Histogram;
use serde::Serialize;
use wasmtime::component::Instance;
use wasmtime::{Store, Trap};

use super::bindings::{auth, batch_filter, filter, routing};
use super::host::HostState;
use super::{Failure, FailureKind, Plugin};

/// The exported interface of an instance, typed.
#[derive(Clone)]
pub(super) enum Guest {
    Auth(auth::Guest),
    Filter(filter::Guest),
    BatchFilter(batch_filter::Guest),
    Router(routing::Guest),
}

/// Where a world's functions sit in a component; found once per plugin.
#[derive(Clone)]
pub(super) enum Indices {
    Auth(auth::GuestIndices),
    Filter(filter::GuestIndices),
    BatchFilter(batch_filter::GuestIndices),
    Router(routing::GuestIndices),
}

impl Indices {
    fn load(&self, store: &mut Store<HostState>, instance: &Instance) -> wasmtime::Result<Guest> {
        Ok(match self {
            Indices::Auth(i) => Guest::Auth(i.load(store, instance)?),
            Indices::Filter(i) => Guest::Filter(i.load(store, instance)?),
            Indices::BatchFilter(i) => Guest::BatchFilter(i.load(store, instance)?),
            Indices::Router(i) => Guest::Router(i.load(store, instance)?),
        })
    }
}

impl Guest {
    fn init(&self, store: &mut Store<HostState>, config: &str) -> wasmtime::Result<Result<(), String>> {
        match self {
            Guest::Auth(g) => g.call_init(store, config),
            Guest::Filter(g) => g.call_init(store, config),
            Guest::BatchFilter(g) => g.call_init(store, config),
            Guest::Router(g) => g.call_init(store, config),
        }
    }
}

/// An instance ready for a call.
struct Warm {
    store: Store<HostState>,
    guest: Guest,
}

/// Consecutive failures after which a pool stops calling its plugin for a while.
const BREAKER_THRESHOLD: u32 = 5;
/// How long a tripped pool applies its failure policy without calling the plugin.
const BREAKER_OPEN_MS: u64 = 1000;
/// One call in this many has its latency recorded.
const LATENCY_SAMPLE: u64 = 8;
/// Time `init` gets when a pool is created (at start-up or reload, off the hot path).
const LOAD_INIT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(1);

/// Per (plugin, app) counters, as the admin endpoint shows them. They start at zero with
/// each plugin set (a reload builds new pools).
#[derive(Debug)]
pub(super) struct PoolMetrics {
    denials: AtomicU64,
    instantiations: AtomicU64,
    errors: [AtomicU64; FailureKind::COUNT],
    /// Call latency in nanoseconds.
    latency: Mutex<Histogram<u64>>,
}

impl Default for PoolMetrics {
    fn default() -> Self {
        Self {
            denials: AtomicU64::new(0),
            instantiations: AtomicU64::new(0),
            errors: Default::default(),
            // 1 ns to 1 hour, 2 significant figures: a few KiB.
            latency: Mutex::new(Histogram::new_with_bounds(1, 3_600_000_000_000, 2).expect("valid bounds")),
        }
    }
}

/// A point-in-time copy of [`PoolMetrics`].
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct MetricsSnapshot {
    pub plugin: String,
    pub app: String,
    pub world: &'static str,
    pub calls: u64,
    pub denials: u64,
    pub errors: std::collections::BTreeMap<&'static str, u64>,
    pub instantiations: u64,
    /// Warm instances waiting now, and the most that are kept.
    pub pool_idle: usize,
    pub pool_size: usize,
    pub latency_us: LatencySnapshot,
}

/// Sampled call latency in microseconds.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct LatencySnapshot {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

/// Shards per pool: each thread works on its own shard (its own lock, counter and idle
/// instances, on its own cache lines), so calls from different cores do not contend.
const SHARDS: usize = 8;

/// This thread's shard index.
fn shard_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    INDEX.with(|i| *i)
}

#[repr(align(128))]
#[derive(Default)]
struct Shard {
    idle: Mutex<Vec<Warm>>,
    calls: AtomicU64,
}

/// Warm instances of one plugin for one app. Calls take an idle instance (or make one),
/// so concurrent calls never wait on each other. Idle instances are kept per thread:
/// `pool_size` spread over the threads that call, at least one per thread.
pub struct Pool {
    pub plugin: Arc<Plugin>,
    pub(super) app: Arc<str>,
    shards: Box<[Shard]>,
    pub(super) metrics: PoolMetrics,
    /// Unix second of the last failure warning, so a failing plugin logs once a second.
    last_warning: AtomicU64,
    /// Failures in a row; at [`BREAKER_THRESHOLD`] the breaker opens.
    consecutive_failures: AtomicU32,
    /// Until this monotonic millisecond, calls fail at once without running the plugin.
    open_until_ms: AtomicU64,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("plugin", &self.plugin.name).field("app", &self.app).finish_non_exhaustive()
    }
}

fn monotonic_ms() -> u64 {
    super::engine::monotonic_nanos() / 1_000_000
}

impl Pool {
    /// Creates the pool and one warm instance, so a plugin whose `init` fails for this app
    /// is refused at load time rather than at its first call.
    pub(super) fn new(plugin: Arc<Plugin>, app: &str) -> Result<Self, Failure> {
        let pool = Self {
            plugin,
            app: app.into(),
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            metrics: PoolMetrics::default(),
            last_warning: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            open_until_ms: AtomicU64::new(0),
        };
        let warm = pool.instantiate(LOAD_INIT_DEADLINE.max(pool.plugin.deadline))?;
        pool.shards[shard_index()].idle.lock().expect("pool lock").push(warm);
        Ok(pool)
    }

    pub fn plugin_name(&self) -> &str {
        &self.plugin.name
    }

    /// The app this pool serves (`*` for the global router).
    pub fn app(&self) -> &str {
        &self.app
    }

    /// A new instance, instantiated and `init`ed within `deadline`.
    fn instantiate(&self, deadline: std::time::Duration) -> Result<Warm, Failure> {
        self.metrics.instantiations.fetch_add(1, Ordering::Relaxed);
        let plugin = &self.plugin;
        let state = HostState::new(plugin.name.clone(), self.app.clone(), plugin.memory_limit_bytes);
        let mut store = Store::new(plugin.pre.engine(), state);
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_callback(super::host::on_epoch_tick);
        store.data_mut().begin_call(deadline);
        store.set_epoch_deadline(1);
        store.set_hostcall_fuel(INIT_FUEL);
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

    /// Runs `f` on an idle instance (or a new one) within the plugin's deadline, letting the
    /// plugin hand at most `fuel` bytes back to the host. An instance whose call trapped is
    /// dropped: a trap leaves a wasmtime store unusable. After repeated failures the pool
    /// fails calls at once for a while (a breaker), so a broken plugin stops costing CPU.
    pub(super) fn call<R>(
        &self,
        fuel: usize,
        f: impl FnOnce(&Guest, &mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<R, Failure> {
        self.call_within(self.plugin.deadline, fuel, f)
    }

    /// [`call`](Self::call) with a deadline of its own (a batch's, which covers several
    /// messages).
    pub(super) fn call_within<R>(
        &self,
        deadline: std::time::Duration,
        fuel: usize,
        f: impl FnOnce(&Guest, &mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<R, Failure> {
        // Latency is sampled (one call in LATENCY_SAMPLE): reading the clock twice and
        // locking the histogram on every call would cost more than some plugins do.
        let shard = &self.shards[shard_index()];
        let sampled = shard.calls.fetch_add(1, Ordering::Relaxed).is_multiple_of(LATENCY_SAMPLE);
        let open_until = self.open_until_ms.load(Ordering::Relaxed);
        if open_until != 0 && monotonic_ms() < open_until {
            self.count_error(FailureKind::CircuitOpen);
            return Err(Failure::new(
                FailureKind::CircuitOpen,
                format!("not called: {BREAKER_THRESHOLD} failures in a row; retrying within {BREAKER_OPEN_MS} ms"),
            ));
        }
        let started = sampled.then(Instant::now);
        let pooled = self.take_idle(shard);
        let warm = match pooled {
            Some(w) => Ok(w),
            // On the hot path a replacement gets the call's own deadline, not the load-time one.
            None => self.instantiate(deadline),
        };
        let result = warm.and_then(|mut warm| {
            warm.store.data_mut().begin_call(deadline);
            warm.store.set_epoch_deadline(1);
            warm.store.set_hostcall_fuel(fuel);
            match f(&warm.guest, &mut warm.store) {
                Ok(value) => {
                    let mut idle = shard.idle.lock().expect("pool lock");
                    if idle.len() < self.plugin.pool_size.div_ceil(SHARDS) {
                        idle.push(warm);
                    }
                    Ok(value)
                }
                Err(e) => Err(classify(&e, warm.store.data())),
            }
        });
        if let Some(started) = started
            && let Ok(mut h) = self.metrics.latency.lock()
        {
            let _ = h.record((started.elapsed().as_nanos() as u64).max(1));
        }
        match &result {
            // Read first: a store on every call would bounce the line between cores.
            Ok(_) => {
                if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
                    self.consecutive_failures.store(0, Ordering::Relaxed);
                }
            }
            Err(failure) => {
                self.count_error(failure.kind);
                self.failed();
            }
        }
        result
    }

    /// An idle instance: this thread's, else another thread's, else none.
    fn take_idle(&self, own: &Shard) -> Option<Warm> {
        if let Some(w) = own.idle.lock().expect("pool lock").pop() {
            return Some(w);
        }
        self.shards.iter().find_map(|s| s.idle.try_lock().ok().and_then(|mut i| i.pop()))
    }

    /// Counts a failure towards the breaker (also for answers rejected after the call).
    pub(super) fn failed(&self) {
        if self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1 >= BREAKER_THRESHOLD {
            // Open; after the pause one trial call decides (one more failure re-opens).
            self.consecutive_failures.store(BREAKER_THRESHOLD - 1, Ordering::Relaxed);
            self.open_until_ms.store(monotonic_ms() + BREAKER_OPEN_MS, Ordering::Relaxed);
        }
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

    /// The sampled latency as histogram buckets: for each upper bound (seconds, ascending)
    /// the samples above the previous bound and at most this one, then the rest above the
    /// last bound (`+Inf`); and the samples' sum (seconds) and count.
    pub fn latency_histogram(&self, bounds: &[f64]) -> (Vec<(f64, u64)>, f64, u64) {
        let bounds_ns: Vec<u64> = bounds.iter().map(|b| (b * 1e9) as u64).collect();
        let mut counts = vec![0u64; bounds.len() + 1];
        let (mut sum_ns, mut total) = (0f64, 0u64);
        {
            // One pass over the recorded values; calls that sample wait on this lock.
            let h = self.metrics.latency.lock().unwrap_or_else(|e| e.into_inner());
            for v in h.iter_recorded() {
                let (ns, n) = (v.value_iterated_to(), v.count_at_value());
                counts[bounds_ns.partition_point(|b| *b < ns)] += n;
                sum_ns += ns as f64 * n as f64;
                total += n;
            }
        }
        let buckets = bounds.iter().copied().chain([f64::INFINITY]).zip(counts).collect();
        (buckets, sum_ns / 1e9, total)
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        let m = &self.metrics;
        let latency = {
            let h = m.latency.lock().unwrap_or_else(|e| e.into_inner());
            let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
            LatencySnapshot { p50: us(0.5), p90: us(0.9), p99: us(0.99), max: h.max() as f64 / 1000.0 }
        };
        MetricsSnapshot {
            plugin: self.plugin.name.to_string(),
            app: self.app.to_string(),
            world: self.plugin.world.as_str(),
            calls: self.shards.iter().map(|s| s.calls.load(Ordering::Relaxed)).sum(),
            denials: m.denials.load(Ordering::Relaxed),
            errors: FailureKind::ALL
                .iter()
                .map(|k| (k.as_str(), m.errors[*k as usize].load(Ordering::Relaxed)))
                .collect(),
            instantiations: m.instantiations.load(Ordering::Relaxed),
            pool_idle: self.shards.iter().map(|s| s.idle.lock().map_or(0, |i| i.len())).sum(),
            pool_size: self.plugin.pool_size,
            latency_us: latency,
        }
    }
}

/// Bytes a plugin's `init` (and the host calls it makes meanwhile) may hand to the host.
const INIT_FUEL: usize = 64 * 1024;

/// What kind of failure a wasmtime error was, given what the host saw during the call.
fn classify(e: &wasmtime::Error, state: &HostState) -> Failure {
    match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => Failure::new(FailureKind::Deadline, "the plugin ran past its deadline".into()),
        _ if state.limiter.denied => Failure::new(FailureKind::Memory, "the plugin ran out of its memory limit".into()),
        Some(trap) => Failure::new(FailureKind::Trap, format!("the plugin trapped: {trap}")),
        // Not a trap: the host could not read what the plugin handed back (too much data,
        // invalid UTF-8, out-of-bounds pointers).
        None => Failure::new(
            FailureKind::InvalidOutput,
            format!("the plugin handed the host data it could not accept: {e}"),
        ),
    }
}

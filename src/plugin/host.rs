//! What the host gives each plugin instance: its store data, the `host` imports (log and
//! clocks), and the memory limit.

use std::sync::Arc;

use wasmtime::ResourceLimiter;

use super::bindings::host::{self, Level};

/// Log lines one instance may write per call; more are dropped (and counted) so that a
/// chatty or looping plugin cannot flood the node's log.
const LOG_LINES_PER_CALL: u32 = 32;
/// Longest log line kept from a plugin.
const LOG_LINE_MAX: usize = 1024;

/// The data of one plugin instance's store.
#[derive(Debug)]
pub struct HostState {
    pub plugin: Arc<str>,
    pub app: Arc<str>,
    pub limiter: MemoryLimiter,
    logs_this_call: u32,
    /// The running call's CPU budget; see [`CpuBudget`].
    pub cpu: CpuBudget,
}

/// A call's deadline in CPU time, so that a call the OS preempts (a busy machine) does not
/// lose its budget while it is not running.
///
/// The epoch ticks every millisecond. A call starts with a deadline one tick away, so short
/// calls (almost all of them) never look at this. When a tick passes during a call, wasmtime
/// runs [`on_epoch_tick`]: it charges the CPU time this thread used since the last tick (the
/// first tick is charged in full, as it is not measured) and interrupts the call once the
/// budget is spent.
#[derive(Debug, Default)]
pub struct CpuBudget {
    pub budget_ns: u64,
    consumed_ns: u64,
    last_cpu_ns: Option<u64>,
}

fn thread_cpu_ns() -> u64 {
    use nix::time::{ClockId, clock_gettime};
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// The store's epoch callback: charge CPU time, interrupt when the budget is spent.
pub fn on_epoch_tick(mut ctx: wasmtime::StoreContextMut<'_, HostState>) -> wasmtime::Result<wasmtime::UpdateDeadline> {
    let cpu = &mut ctx.data_mut().cpu;
    let now = thread_cpu_ns();
    cpu.consumed_ns += match cpu.last_cpu_ns {
        None => super::engine::TICK.as_nanos() as u64,
        Some(last) => now.saturating_sub(last),
    };
    cpu.last_cpu_ns = Some(now);
    Ok(if cpu.consumed_ns >= cpu.budget_ns {
        wasmtime::UpdateDeadline::Interrupt
    } else {
        wasmtime::UpdateDeadline::Continue(1)
    })
}

impl HostState {
    pub fn new(plugin: Arc<str>, app: Arc<str>, memory_limit_bytes: usize) -> Self {
        Self {
            plugin,
            app,
            limiter: MemoryLimiter { max_bytes: memory_limit_bytes, total: 0, denied: false },
            logs_this_call: 0,
            cpu: CpuBudget::default(),
        }
    }

    /// Resets per-call state before a call that may use `cpu` of CPU time.
    pub fn begin_call(&mut self, cpu: std::time::Duration) {
        self.logs_this_call = 0;
        self.limiter.denied = false;
        self.cpu = CpuBudget { budget_ns: cpu.as_nanos() as u64, consumed_ns: 0, last_cpu_ns: None };
    }
}

/// Caps an instance's linear memory, summed over every memory its core instances have.
/// Refusing growth makes the guest's allocator fail, which in a Rust guest aborts: a trap we
/// then attribute to memory thanks to `denied`.
#[derive(Debug)]
pub struct MemoryLimiter {
    max_bytes: usize,
    /// Bytes of linear memory the instance holds, over all its memories.
    total: usize,
    /// Set when growth was refused; the failure that follows is a memory failure.
    pub denied: bool,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let total = self.total - current.min(self.total) + desired;
        if total > self.max_bytes {
            self.denied = true;
            return Ok(false);
        }
        self.total = total;
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }

    // A plugin is one component: a handful of core instances, tables and memories. The
    // defaults (10,000 each) would let one instance multiply its memory cap.
    fn instances(&self) -> usize {
        32
    }

    fn tables(&self) -> usize {
        32
    }

    fn memories(&self) -> usize {
        8
    }
}

impl host::Host for HostState {
    fn log(&mut self, level: Level, message: String) {
        self.logs_this_call += 1;
        if self.logs_this_call > LOG_LINES_PER_CALL {
            return;
        }
        let mut message = message;
        if message.len() > LOG_LINE_MAX {
            let mut cut = LOG_LINE_MAX;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
        let (plugin, app) = (&*self.plugin, &*self.app);
        match level {
            Level::Trace => tracing::trace!(plugin, app, "{message}"),
            Level::Debug => tracing::debug!(plugin, app, "{message}"),
            Level::Info => tracing::info!(plugin, app, "{message}"),
            Level::Warn => tracing::warn!(plugin, app, "{message}"),
            Level::Error => tracing::error!(plugin, app, "{message}"),
        }
    }

    fn monotonic_now(&mut self) -> u64 {
        super::engine::monotonic_nanos()
    }

    fn wall_now_ms(&mut self) -> u64 {
        crate::protocol::now_ms()
    }
}

impl super::bindings::types::Host for HostState {}

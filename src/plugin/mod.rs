//! WebAssembly policy plugins: loading components against `wit/`, running them safely, and
//! the per-app selection the gateway consults.
//!
//! Owns the wasmtime engine, compilation (with an on-disk cache), instance pools per
//! (plugin, app), call deadlines and memory limits, output validation, failure
//! classification and per-plugin metrics. It does not decide what a failure means for a
//! request: the hub applies each plugin's failure policy.
//!
//! A [`PluginSet`] is immutable once loaded; a reload builds a whole new set and swaps it
//! in, so a broken reload never leaves a half-updated state.

pub mod bindings;
mod calls;
pub mod engine;
pub mod host;
pub mod inspect;
mod pool;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, InstancePre, Linker};

pub use calls::{AuthOutcome, AuthRequest, FilterMessage, RouteNode, RouteUser, Verdict};
pub use pool::{LatencySnapshot, MetricsSnapshot, Pool};

use crate::config::{AuthMode, Config, FailurePolicy, PluginConfig, World};
use bindings::{auth, batch_filter, filter, routing};
use host::HostState;
use pool::Indices;

/// Kinds of plugin failure, as counted in metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    Trap = 0,
    Deadline = 1,
    Memory = 2,
    InvalidOutput = 3,
    Init = 4,
    /// A router returned an error instead of an assignment.
    Declined = 5,
    /// Not called: the plugin failed repeatedly and its breaker is open.
    CircuitOpen = 6,
}

impl FailureKind {
    const COUNT: usize = 7;
    const ALL: [FailureKind; 7] = [
        FailureKind::Trap,
        FailureKind::Deadline,
        FailureKind::Memory,
        FailureKind::InvalidOutput,
        FailureKind::Init,
        FailureKind::Declined,
        FailureKind::CircuitOpen,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            FailureKind::Trap => "trap",
            FailureKind::Deadline => "deadline",
            FailureKind::Memory => "memory",
            FailureKind::InvalidOutput => "invalid_output",
            FailureKind::Init => "init",
            FailureKind::Declined => "declined",
            FailureKind::CircuitOpen => "circuit_open",
        }
    }
}

/// A plugin call (or instantiation) that did not produce a usable answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
}

impl Failure {
    fn new(kind: FailureKind, message: String) -> Self {
        Self { kind, message }
    }
}

/// Why a plugin set could not be loaded. Every message names the plugin.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("plugin {name:?}: cannot read {path}: {source}")]
    Read { name: String, path: PathBuf, source: std::io::Error },
    #[error("plugin {name:?}: {path} is not a loadable component: {message}")]
    Compile { name: String, path: PathBuf, message: String },
    #[error(
        "plugin {name:?}: {path} does not implement the {world} world (it must export {expected}); it exports: {exports}"
    )]
    WrongWorld { name: String, path: PathBuf, world: &'static str, expected: String, exports: String },
    #[error("plugin {name:?}: {path} needs imports this host does not provide: {message}")]
    Link { name: String, path: PathBuf, message: String },
    #[error(
        "plugin {name:?}: {path} exports {export} but not with the functions and types of switchboard:policy@0.1.0: {message}"
    )]
    Signature { name: String, path: PathBuf, export: &'static str, message: String },
    #[error("plugin {name:?} for app {app:?}: {failure}")]
    Instance { name: String, app: String, failure: Failure },
    #[error("cannot re-read the config: {0}")]
    Config(String),
}

/// A compiled, linked plugin, shared by every app that uses it.
pub struct Plugin {
    pub name: Arc<str>,
    pub world: World,
    pub path: PathBuf,
    pub failure: FailurePolicy,
    pub deadline: Duration,
    memory_limit_bytes: usize,
    pool_size: usize,
    /// SHA-256 of the component file.
    content_hash: [u8; 32],
    config_json: String,
    pre: InstancePre<HostState>,
    indices: Indices,
}

impl Plugin {
    /// Whether the plugin takes a burst of messages per call (`batch-filter`).
    pub fn takes_batches(&self) -> bool {
        matches!(self.indices, Indices::BatchFilter(_))
    }
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin").field("name", &self.name).field("world", &self.world).finish_non_exhaustive()
    }
}

/// An app's authenticator and how it relates to the built-in JWT check.
#[derive(Debug, Clone)]
pub struct AuthPlugin {
    pub pool: Arc<Pool>,
    pub mode: AuthMode,
}

/// The plugins one app uses.
#[derive(Debug, Clone, Default)]
pub struct AppPlugins {
    pub auth: Option<AuthPlugin>,
    /// Run in this order on every message.
    pub filters: Vec<Arc<Pool>>,
    /// This app's router, or the global one.
    pub router: Option<Arc<Pool>>,
}

/// Every plugin the node runs and which app uses which: swapped as a whole on reload.
#[derive(Debug, Default)]
pub struct PluginSet {
    pub generation: u64,
    pub plugins: BTreeMap<String, Arc<Plugin>>,
    apps: HashMap<String, AppPlugins>,
    /// For `/route` requests that name no app.
    pub global_router: Option<Arc<Pool>>,
}

static NO_PLUGINS: OnceLock<AppPlugins> = OnceLock::new();

impl PluginSet {
    /// The plugins `app` uses (none for an unknown app).
    pub fn app(&self, app: &str) -> &AppPlugins {
        self.apps.get(app).unwrap_or_else(|| NO_PLUGINS.get_or_init(AppPlugins::default))
    }

    /// Every (plugin, app) pool once, ordered by plugin then app.
    pub fn pools(&self) -> Vec<&Arc<Pool>> {
        let mut pools: Vec<&Arc<Pool>> = Vec::new();
        for app in self.apps.values() {
            pools.extend(app.auth.iter().map(|a| &a.pool));
            pools.extend(app.filters.iter());
            pools.extend(app.router.iter());
        }
        pools.extend(self.global_router.iter());
        let mut seen = std::collections::HashSet::new();
        pools.retain(|p| seen.insert(Arc::as_ptr(p)));
        pools.sort_by(|a, b| (a.plugin_name(), a.app()).cmp(&(b.plugin_name(), b.app())));
        pools
    }

    /// Metrics of every (plugin, app) pool.
    pub fn metrics(&self) -> Vec<MetricsSnapshot> {
        self.pools().into_iter().map(|p| p.snapshot()).collect()
    }

    /// Compiles, links and instantiates everything `config` asks for; `init` runs once per
    /// (plugin, app). Any failure refuses the whole set.
    pub fn load(config: &Config, generation: u64) -> Result<Self, PluginError> {
        if config.plugins.is_empty() {
            return Ok(Self { generation, ..Self::default() });
        }
        let engine = engine::engine();
        let cache_dir = config.resolve(&config.node.data_dir).join("plugin-cache");
        let mut plugins = BTreeMap::new();
        for p in &config.plugins {
            let plugin = load_plugin(engine, config, p, &cache_dir)?;
            plugins.insert(p.name.clone(), Arc::new(plugin));
        }
        // One pool per (plugin, app): instances never carry state from one app to another.
        let mut pools: HashMap<(String, String), Arc<Pool>> = HashMap::new();
        let mut pool_for = |name: &str, app: &str| -> Result<Arc<Pool>, PluginError> {
            let key = (name.to_string(), app.to_string());
            if let Some(pool) = pools.get(&key) {
                return Ok(pool.clone());
            }
            let plugin = plugins[name].clone();
            let pool = Pool::new(plugin, app).map_err(|failure| PluginError::Instance {
                name: name.into(),
                app: app.into(),
                failure,
            })?;
            let pool = Arc::new(pool);
            pools.insert(key, pool.clone());
            Ok(pool)
        };
        let global_router = config.route.plugin.as_deref().map(|name| pool_for(name, "*")).transpose()?;
        let mut apps = HashMap::new();
        for (id, app) in &config.apps {
            let auth = match &app.auth {
                Some(a) => Some(AuthPlugin { pool: pool_for(&a.plugin, id)?, mode: a.mode }),
                None => None,
            };
            let filters = app.filters.iter().map(|name| pool_for(name, id)).collect::<Result<Vec<_>, _>>()?;
            // The global router gets a pool per app too: instances and metrics stay per app.
            let router = match app.router.as_deref().or(config.route.plugin.as_deref()) {
                Some(name) => Some(pool_for(name, id)?),
                None => None,
            };
            apps.insert(id.clone(), AppPlugins { auth, filters, router });
        }
        let set = Self { generation, plugins, apps, global_router };
        let in_use: Vec<[u8; 32]> = set.plugins.values().map(|p| p.content_hash).collect();
        forget_compiled_except(&in_use);
        Ok(set)
    }
}

/// Components compiled in this process, by content hash: a reload, or another node in the
/// same test process, reuses them. Entries no loaded set uses are dropped after each load.
static COMPILED: OnceLock<Mutex<HashMap<[u8; 32], Component>>> = OnceLock::new();

/// Compiles `wasm` once per process; the lock is held while compiling so that two loads of
/// the same component (parallel tests, a reload) do not compile or write the cache twice.
fn compile_cached(
    engine: &wasmtime::Engine,
    key: [u8; 32],
    wasm: &[u8],
    cache_dir: &std::path::Path,
) -> wasmtime::Result<Component> {
    let mut memo = COMPILED.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    if let Some(c) = memo.get(&key) {
        return Ok(c.clone());
    }
    let component = engine::compile(engine, wasm, Some(cache_dir))?;
    memo.insert(key, component.clone());
    Ok(component)
}

/// Drops compiled components whose content hash is not in `keep`. Several hubs in one
/// process (tests) may each keep their own; what one forgets, the other recompiles or
/// finds in the on-disk cache.
fn forget_compiled_except(keep: &[[u8; 32]]) {
    if let Some(memo) = COMPILED.get() {
        let mut memo = memo.lock().unwrap_or_else(|e| e.into_inner());
        if memo.len() > 64 {
            memo.retain(|k, _| keep.contains(k));
        }
    }
}

/// A linker offering exactly the host interface (log, clocks) and nothing else.
pub fn linker(engine: &wasmtime::Engine) -> wasmtime::Result<Linker<HostState>> {
    let mut linker = Linker::new(engine);
    bindings::Plugins::add_to_linker::<HostState, wasmtime::component::HasSelf<HostState>>(&mut linker, |s| s)?;
    Ok(linker)
}

fn load_plugin(
    engine: &wasmtime::Engine,
    config: &Config,
    p: &PluginConfig,
    cache_dir: &std::path::Path,
) -> Result<Plugin, PluginError> {
    let path = config.resolve(&p.path);
    let wasm = std::fs::read(&path).map_err(|source| PluginError::Read {
        name: p.name.clone(),
        path: path.clone(),
        source,
    })?;
    let content_hash: [u8; 32] = Sha256::digest(&wasm).into();
    let component = compile_cached(engine, content_hash, &wasm, cache_dir).map_err(|e| PluginError::Compile {
        name: p.name.clone(),
        path: path.clone(),
        message: format!("{e:#}"),
    })?;
    let exports = inspect::exports(engine, &component);
    let Some(export) = p.world.exports().iter().copied().find(|e| exports.iter().any(|(name, _)| name == e)) else {
        let described: Vec<String> = exports.into_iter().map(|(_, d)| d).collect();
        return Err(PluginError::WrongWorld {
            name: p.name.clone(),
            path,
            world: p.world.as_str(),
            expected: p.world.exports().join(" or "),
            exports: if described.is_empty() { "nothing".into() } else { described.join(", ") },
        });
    };
    let link_err =
        |e: wasmtime::Error| PluginError::Link { name: p.name.clone(), path: path.clone(), message: format!("{e:#}") };
    let pre = linker(engine).map_err(link_err)?.instantiate_pre(&component).map_err(link_err)?;
    let indices = match p.world {
        World::Authenticator => auth::GuestIndices::new(&pre).map(Indices::Auth),
        World::MessageFilter if export == crate::config::BATCH_FILTER_EXPORT => {
            batch_filter::GuestIndices::new(&pre).map(Indices::BatchFilter)
        }
        World::MessageFilter => filter::GuestIndices::new(&pre).map(Indices::Filter),
        World::Router => routing::GuestIndices::new(&pre).map(Indices::Router),
    }
    .map_err(|e| PluginError::Signature {
        name: p.name.clone(),
        path: path.clone(),
        export,
        message: format!("{e:#}"),
    })?;
    let config_json = serde_json::to_string(&p.config).expect("a TOML table serialises to JSON");
    Ok(Plugin {
        name: p.name.as_str().into(),
        world: p.world,
        path,
        failure: p.failure_policy(),
        deadline: p.deadline(),
        memory_limit_bytes: p.memory_limit_mb as usize * 1024 * 1024,
        pool_size: p.pool_size(),
        content_hash,
        config_json,
        pre,
        indices,
    })
}

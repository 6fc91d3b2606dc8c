//! The process's one wasmtime `Engine`, the epoch ticker that enforces call deadlines, and
//! compilation with an on-disk cache of precompiled components.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tracing::{debug, warn};
use wasmtime::component::Component;
use wasmtime::{Config, Engine};

/// One epoch tick: how often a running call's CPU time is checked against its deadline
/// (see `host::CpuBudget`).
pub const TICK: Duration = Duration::from_millis(1);

static ENGINE: OnceLock<Engine> = OnceLock::new();
static START: OnceLock<Instant> = OnceLock::new();

/// The engine every plugin is compiled and run with. The first call starts the epoch
/// ticker thread.
pub fn engine() -> &'static Engine {
    ENGINE.get_or_init(|| {
        let mut config = Config::new();
        config.epoch_interruption(true);
        config.wasm_component_model(true);
        // For profiling plugins with `perf`: writes /tmp/perf-<pid>.map so samples in
        // plugin code get function names.
        if std::env::var_os("SWITCHBOARD_WASM_PERFMAP").is_some() {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let engine = Engine::new(&config).expect("the wasmtime configuration is valid on this host");
        let ticker = engine.clone();
        std::thread::Builder::new()
            .name("plugin-epoch".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(TICK);
                    ticker.increment_epoch();
                }
            })
            .expect("the epoch ticker thread starts");
        engine
    })
}

/// Nanoseconds since the first call; what plugins see as their monotonic clock.
pub fn monotonic_nanos() -> u64 {
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// The cache file name for `wasm`: its content hash and the engine's compatibility hash, so
/// a changed plugin or an upgraded engine never loads a stale artifact.
fn cache_key(engine: &Engine, wasm: &[u8]) -> String {
    let mut compat = DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut compat);
    format!("{}-{:016x}.cwasm", hex::encode(Sha256::digest(wasm)), compat.finish())
}

/// Whether `dir` is a directory only this process's user can write: the precompiled code
/// in it is loaded as machine code, so nobody else may be able to put files there.
fn private_dir(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::symlink_metadata(dir)
        .is_ok_and(|m| m.is_dir() && m.uid() == nix::unistd::geteuid().as_raw() && m.mode() & 0o022 == 0)
}

fn ensure_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Compiles `wasm`, or loads it from `cache_dir` when it was compiled before. The cache is
/// used only when the directory is private to this user (mode 0700 when we create it).
pub fn compile(engine: &Engine, wasm: &[u8], cache_dir: Option<&Path>) -> wasmtime::Result<Component> {
    let Some(dir) = cache_dir else { return Component::new(engine, wasm) };
    if ensure_private_dir(dir).is_err() || !private_dir(dir) {
        warn!(dir = %dir.display(), "plugin compile cache disabled: the directory must be owned by this user and not writable by others");
        return Component::new(engine, wasm);
    }
    let path = dir.join(cache_key(engine, wasm));
    if path.is_file() {
        // SAFETY: deserialising runs the file's machine code, so its integrity matters.
        // The file was written (atomically, via a temp file and rename) by
        // `Component::serialize` of this same engine configuration; its name carries the
        // component's content hash and the engine's compatibility hash; the directory is
        // private to this user (checked above), so nobody else can have replaced it; and
        // wasmtime checks the artifact's header for version and configuration before use.
        #[allow(unsafe_code)]
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(component) => {
                debug!(path = %path.display(), "plugin loaded from the compile cache");
                return Ok(component);
            }
            Err(e) => warn!(path = %path.display(), error = %e, "ignoring an unusable compile cache entry"),
        }
    }
    let component = Component::new(engine, wasm)?;
    if let Err(e) = write_cache(dir, &path, &component) {
        warn!(path = %path.display(), error = %e, "cannot write the plugin compile cache");
    }
    Ok(component)
}

fn write_cache(dir: &Path, path: &Path, component: &Component) -> anyhow::Result<()> {
    use std::io::Write as _;
    let bytes = component.serialize().map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(&bytes)?;
    tmp.persist(path)?;
    Ok(())
}

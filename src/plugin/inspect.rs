//! What a component is: its exports and imports, which of switchboard's worlds it
//! implements, and whether this host can load it. Used by `switchboard plugin check` and by
//! the loader's "wrong world" error.

use std::path::Path;

use serde::Serialize;
use wasmtime::Engine;
use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, InstancePre};

use super::bindings::{auth, batch_filter, filter, routing};
use super::host::HostState;
use crate::config::World;

/// A component's exports as `(name, description)`; instances are described with their
/// functions.
pub fn exports(engine: &Engine, component: &Component) -> Vec<(String, String)> {
    let ty = component.component_type();
    ty.exports(engine).map(|(name, item)| (name.to_string(), describe(engine, name, &item.ty))).collect()
}

fn describe(engine: &Engine, name: &str, item: &ComponentItem) -> String {
    match item {
        ComponentItem::ComponentInstance(inst) => {
            let funcs: Vec<&str> = inst
                .exports(engine)
                .filter(|(_, item)| matches!(item.ty, ComponentItem::ComponentFunc(_)))
                .map(|(n, _)| n)
                .collect();
            if funcs.is_empty() { format!("{name} (types only)") } else { format!("{name} ({})", funcs.join(", ")) }
        }
        ComponentItem::ComponentFunc(_) => format!("{name} (function)"),
        _ => name.to_string(),
    }
}

/// The result of inspecting a component file.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub path: String,
    pub size_bytes: usize,
    pub exports: Vec<String>,
    pub imports: Vec<String>,
    /// Worlds whose interface the component exports with the right function types.
    pub worlds: Vec<&'static str>,
    /// `None` when this host can instantiate it; otherwise why not.
    pub unloadable: Option<String>,
}

fn implements(pre: &InstancePre<HostState>, world: World) -> bool {
    match world {
        World::Authenticator => auth::GuestIndices::new(pre).is_ok(),
        World::MessageFilter => batch_filter::GuestIndices::new(pre).is_ok() || filter::GuestIndices::new(pre).is_ok(),
        World::Router => routing::GuestIndices::new(pre).is_ok(),
    }
}

/// Inspects the component at `path`.
pub fn check(path: &Path) -> Result<Report, String> {
    let wasm = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if !wasm.starts_with(b"\0asm") {
        return Err(format!("{} is not a WebAssembly file", path.display()));
    }
    let engine = super::engine::engine();
    let component = Component::new(engine, &wasm)
        .map_err(|e| format!("{} is not a WebAssembly component this host can compile: {e:#}", path.display()))?;
    let ty = component.component_type();
    let imports = ty.imports(engine).map(|(name, item)| describe(engine, name, &item.ty)).collect();
    let exports = exports(engine, &component).into_iter().map(|(_, described)| described).collect();
    let linked = super::linker(engine).and_then(|l| l.instantiate_pre(&component));
    let (worlds, unloadable) = match &linked {
        Ok(pre) => {
            let worlds: Vec<&'static str> =
                World::ALL.into_iter().filter(|w| implements(pre, *w)).map(World::as_str).collect();
            let why = worlds.is_empty().then(|| "it implements none of switchboard's worlds".to_string());
            (worlds, why)
        }
        Err(e) => (Vec::new(), Some(format!("it needs imports this host does not provide: {e:#}"))),
    };
    Ok(Report { path: path.display().to_string(), size_bytes: wasm.len(), exports, imports, worlds, unloadable })
}

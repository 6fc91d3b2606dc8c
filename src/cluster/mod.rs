//! Node identity and the addresses a node tells clients to connect to.
//!
//! Owns the node id (configured, or generated once and kept in `data_dir`) and the
//! advertised external and intranet addresses of each listener, with the warnings an
//! operator needs when those addresses cannot work. The NATS-backed node registry of a
//! cluster builds on this (`membership`: the node registry in JetStream KV; `nats`: interest
//! subjects, the envelope and delivery counts). A single node needs nothing else.

mod advertise;
pub mod membership;
pub mod nats;

pub use advertise::{Addrs, Bound, advertise};

use std::path::Path;

use rand::Rng as _;

use crate::config::{Config, valid_node_id};

/// Who this node is and how it is reached.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub id: String,
    /// What `/route?intranet=0` answers.
    pub external: Addrs,
    /// What `/route?intranet=1` answers.
    pub intranet: Addrs,
    /// Problems an operator should fix, shown at start-up and in `/api/version`.
    pub warnings: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeIdError {
    #[error("node.data_dir: cannot keep the generated node id in {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("node.data_dir: {path} holds {found:?}, which is not a valid node id")]
    Invalid { path: String, found: String },
}

/// The configured node id, or the one generated on a previous start, or a new one (kept in
/// `data_dir/node-id` so a restart does not make the node look like a stranger).
pub fn node_id(config: &Config) -> Result<String, NodeIdError> {
    if let Some(id) = &config.node.id {
        return Ok(id.clone());
    }
    let dir = config.resolve(&config.node.data_dir);
    let path = dir.join("node-id");
    let shown = path.display().to_string();
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let id = text.trim().to_string();
            if valid_node_id(&id) { Ok(id) } else { Err(NodeIdError::Invalid { path: shown, found: id }) }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = format!("sb-{:08x}", rand::thread_rng().r#gen::<u32>());
            write_id(&dir, &path, &id).map_err(|source| NodeIdError::Io { path: shown, source })?;
            Ok(id)
        }
        Err(source) => Err(NodeIdError::Io { path: shown, source }),
    }
}

fn write_id(dir: &Path, path: &Path, id: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(path, format!("{id}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_id_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut config: Config = "[apps.a]\nsecret = \"0123456789abcdef\"\n".parse().unwrap();
        config.node.data_dir = dir.path().join("state");
        let first = node_id(&config).unwrap();
        assert!(first.starts_with("sb-"), "{first}");
        assert_eq!(node_id(&config).unwrap(), first);
        config.node.id = Some("fixed".into());
        assert_eq!(node_id(&config).unwrap(), "fixed");
    }
}

//! The node registry: every node's record in a JetStream key-value bucket, refreshed every
//! heartbeat, and each node's local view of who is alive.
//!
//! Liveness is judged locally: a node is alive while its record was updated (as seen by our
//! watcher) within `cluster.ttl`. No clocks are compared between machines, and a node that
//! dies without saying goodbye simply stops being refreshed (NATS does not announce the
//! expiry of a key, see ../shared/NATS.md). The bucket's `max_age` removes its record too.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::kv::{self, Operation, Store};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::Addrs;

/// What a node publishes about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: String,
    pub external: Addrs,
    pub intranet: Addrs,
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub lat: Option<f64>,
    #[serde(default)]
    pub lon: Option<f64>,
    pub connections: u64,
    pub capacity: u64,
    pub draining: bool,
    /// Milliseconds since the Unix epoch when the record was written (informational).
    pub heartbeat_ms: u64,
    pub version: String,
}

struct Seen {
    record: NodeRecord,
    at: Instant,
}

/// This node's registry entry and its view of the others.
pub struct Membership {
    kv: Store,
    ttl: Duration,
    me: RwLock<NodeRecord>,
    view: RwLock<HashMap<String, Seen>>,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership").field("ttl", &self.ttl).finish_non_exhaustive()
    }
}

impl Membership {
    /// Opens (or creates) the bucket and writes this node's first record.
    pub async fn join(
        js: &async_nats::jetstream::Context,
        bucket: String,
        ttl: Duration,
        me: NodeRecord,
    ) -> anyhow::Result<Arc<Self>> {
        // A NATS cluster that has just started may still be electing its JetStream leader:
        // keep asking for a while before giving up.
        let deadline = Instant::now() + Duration::from_secs(30);
        let kv = loop {
            let config = kv::Config {
                bucket: bucket.clone(),
                description: "switchboard node registry".into(),
                history: 1,
                max_age: ttl,
                ..Default::default()
            };
            match js.create_or_update_key_value(config).await {
                Ok(kv) => break kv,
                Err(e) if Instant::now() < deadline => {
                    debug!(error = %e, "node registry bucket not available yet; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(anyhow::anyhow!("cannot open the node registry bucket: {e}")),
            }
        };
        let membership = Arc::new(Self { kv, ttl, me: RwLock::new(me), view: RwLock::new(HashMap::new()) });
        membership.publish().await?;
        Ok(membership)
    }

    /// Writes this node's record now.
    pub async fn publish(&self) -> anyhow::Result<()> {
        let record = {
            let mut me = self.me.write().expect("membership lock");
            me.heartbeat_ms = crate::protocol::now_ms();
            me.clone()
        };
        let bytes = serde_json::to_vec(&record).expect("record serialises");
        self.kv.put(&record.id, bytes.into()).await.map_err(|e| anyhow::anyhow!("registry put: {e}"))?;
        Ok(())
    }

    /// Changes this node's record (connections, draining) for the next write.
    pub fn update(&self, f: impl FnOnce(&mut NodeRecord)) {
        f(&mut self.me.write().expect("membership lock"));
    }

    pub fn me(&self) -> NodeRecord {
        self.me.read().expect("membership lock").clone()
    }

    /// Live nodes: this one, and every other whose record was refreshed within the TTL.
    pub fn live(&self) -> Vec<NodeRecord> {
        let me = self.me();
        let view = self.view.read().expect("membership lock");
        let mut nodes: Vec<NodeRecord> = view
            .values()
            .filter(|s| s.at.elapsed() < self.ttl && s.record.id != me.id)
            .map(|s| s.record.clone())
            .collect();
        nodes.push(me);
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        nodes
    }

    /// Removes this node's record (a clean leave).
    pub async fn leave(&self) {
        let id = self.me().id;
        if let Err(e) = self.kv.delete(&id).await {
            warn!(error = %e, "could not remove this node from the registry; it expires after cluster.ttl");
        }
    }

    /// Refreshes this node's record every `heartbeat` (with `connections` from the caller),
    /// and follows everyone's records, until `stop`.
    pub fn spawn(
        self: &Arc<Self>,
        heartbeat: Duration,
        connections: impl Fn() -> u64 + Send + Sync + 'static,
        stop: CancellationToken,
    ) {
        let me = self.clone();
        let stop_beat = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(heartbeat);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut failing = false;
            loop {
                tokio::select! {
                    _ = stop_beat.cancelled() => return,
                    _ = tick.tick() => {}
                }
                me.update(|r| r.connections = connections());
                match tokio::time::timeout(heartbeat, me.publish()).await {
                    Ok(Ok(())) if failing => {
                        failing = false;
                        info!("node registry reachable again");
                    }
                    Ok(Ok(())) => {}
                    Ok(Err(e)) if !failing => {
                        failing = true;
                        warn!(error = %e, "cannot refresh this node's registry entry; retrying every heartbeat");
                    }
                    Err(_) if !failing => {
                        failing = true;
                        warn!("registry refresh timed out; retrying every heartbeat");
                    }
                    _ => {}
                }
            }
        });
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let watch = tokio::select! {
                    _ = stop.cancelled() => return,
                    w = me.kv.watch_with_history(">") => w,
                };
                match watch {
                    Ok(mut entries) => loop {
                        let next = tokio::select! {
                            _ = stop.cancelled() => return,
                            next = entries.next() => next,
                        };
                        match next {
                            Some(Ok(entry)) => me.apply(entry),
                            Some(Err(e)) => {
                                debug!(error = %e, "registry watch interrupted; watching again");
                                break;
                            }
                            None => break,
                        }
                    },
                    Err(e) => debug!(error = %e, "cannot watch the registry yet"),
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        });
    }

    fn apply(&self, entry: kv::Entry) {
        let mut view = self.view.write().expect("membership lock");
        match entry.operation {
            Operation::Put => match serde_json::from_slice::<NodeRecord>(&entry.value) {
                Ok(record) => {
                    view.insert(entry.key, Seen { record, at: Instant::now() });
                }
                Err(e) => warn!(key = %entry.key, error = %e, "ignoring an unreadable registry record"),
            },
            Operation::Delete | Operation::Purge => {
                view.remove(&entry.key);
            }
        }
    }
}

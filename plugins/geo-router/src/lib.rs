//! A router that sends each user to the nearest live node.
//!
//! - User and nodes with coordinates: nearest by great-circle (haversine) distance; nodes
//!   within `tie_km` of the nearest count as equally near.
//! - Otherwise, a user with a region goes to nodes of that region when there are any.
//! - Among equally good nodes, the least loaded wins (connections plus users already
//!   assigned in this batch, relative to capacity). Draining nodes are never chosen.
//!
//! Config:
//! ```toml
//! tie_km = 50.0   # optional, default 50
//! ```

use std::cell::Cell;

use serde::Deserialize;

wit_bindgen::generate!({ world: "router", path: "../../wit" });

use exports::switchboard::policy::routing::{Guest, Node, User};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_tie")]
    tie_km: f64,
}

fn default_tie() -> f64 {
    50.0
}

thread_local! {
    static TIE_KM: Cell<f64> = const { Cell::new(50.0) };
}

/// Great-circle distance in kilometres.
fn haversine_km(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    const EARTH_RADIUS_KM: f64 = 6371.0;
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = (lat2 - lat1).to_radians();
    let dl = (lon2 - lon1).to_radians();
    let a = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_KM * a.sqrt().asin()
}

fn load(node: &Node, extra: u64) -> f64 {
    (node.connections + extra) as f64 / node.capacity.max(1) as f64
}

struct GeoRouter;

impl Guest for GeoRouter {
    fn init(config: String) -> Result<(), String> {
        let parsed: Config = serde_json::from_str(&config).map_err(|e| format!("geo-router config: {e}"))?;
        if !(parsed.tie_km >= 0.0) {
            return Err("geo-router config: tie_km must be >= 0".into());
        }
        TIE_KM.with(|t| t.set(parsed.tie_km));
        Ok(())
    }

    fn route(_app_id: String, users: Vec<User>, nodes: Vec<Node>) -> Result<Vec<u32>, String> {
        let tie_km = TIE_KM.with(Cell::get);
        let live: Vec<usize> = (0..nodes.len()).filter(|&i| !nodes[i].draining).collect();
        if live.is_empty() {
            return Err("no live node".into());
        }
        let mut assigned = vec![0u64; nodes.len()];
        let mut out = Vec::with_capacity(users.len());
        for user in &users {
            let mut candidates = live.clone();
            let located = |i: &usize| nodes[*i].lat.is_some() && nodes[*i].lon.is_some();
            if let (Some(lat), Some(lon)) = (user.lat, user.lon) {
                let with_coords: Vec<usize> = candidates.iter().copied().filter(located).collect();
                if !with_coords.is_empty() {
                    let dist = |i: usize| haversine_km(lat, lon, nodes[i].lat.unwrap(), nodes[i].lon.unwrap());
                    let nearest = with_coords.iter().map(|&i| dist(i)).fold(f64::INFINITY, f64::min);
                    candidates = with_coords.into_iter().filter(|&i| dist(i) <= nearest + tie_km).collect();
                }
            } else if let Some(region) = &user.region {
                let same: Vec<usize> =
                    candidates.iter().copied().filter(|&i| nodes[i].region.as_ref() == Some(region)).collect();
                if !same.is_empty() {
                    candidates = same;
                }
            }
            let best = candidates
                .into_iter()
                .min_by(|&a, &b| load(&nodes[a], assigned[a]).total_cmp(&load(&nodes[b], assigned[b])).then(a.cmp(&b)))
                .expect("candidates is never empty");
            assigned[best] += 1;
            out.push(best as u32);
        }
        Ok(out)
    }
}

export!(GeoRouter);

//! A router that sends each user to the least loaded node: lowest
//! `(connections + users already assigned in this batch) / capacity`, skipping draining
//! nodes. Counting the batch's own assignments spreads a batch over the nodes instead of
//! sending it all to whichever node was emptiest at the start.
//!
//! Config: none (`{}`).

wit_bindgen::generate!({ world: "router", path: "../../wit" });

use exports::switchboard::policy::routing::{Guest, Node, User};

struct LoadRouter;

/// Index of the node with the lowest projected load, ties to the lowest index.
fn least_loaded(nodes: &[Node], assigned: &[u64]) -> Option<usize> {
    nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| !n.draining && n.capacity > 0)
        .min_by(|(i, a), (j, b)| {
            // Compare (ca + xa) / capa with (cb + xb) / capb without floating point.
            let lhs = u128::from(a.connections + assigned[*i]) * u128::from(b.capacity);
            let rhs = u128::from(b.connections + assigned[*j]) * u128::from(a.capacity);
            lhs.cmp(&rhs).then(i.cmp(j))
        })
        .map(|(i, _)| i)
}

impl Guest for LoadRouter {
    fn init(_config: String) -> Result<(), String> {
        Ok(())
    }

    fn route(_app_id: String, users: Vec<User>, nodes: Vec<Node>) -> Result<Vec<u32>, String> {
        let mut assigned = vec![0u64; nodes.len()];
        users
            .iter()
            .map(|_| {
                let i = least_loaded(&nodes, &assigned).ok_or("no live node with capacity")?;
                assigned[i] += 1;
                Ok(i as u32)
            })
            .collect()
    }
}

export!(LoadRouter);

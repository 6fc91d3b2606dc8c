//! Which node a user should connect to: the app's router plugin when there is one, and
//! rendezvous (highest-random-weight) hashing otherwise or when the plugin fails.
//!
//! Rendezvous hashing gives every (user, node) pair a score and picks the highest: while
//! membership is unchanged an assignment never moves, and when a node leaves only its own
//! users move (each to its next-best node).

use sha2::{Digest, Sha256};
use tracing::debug;

use crate::plugin::{Pool, RouteNode, RouteUser};

fn score(uid: &str, node: &str) -> u64 {
    let mut h = Sha256::new();
    h.update((uid.len() as u32).to_be_bytes());
    h.update(uid.as_bytes());
    h.update(node.as_bytes());
    let d = h.finalize();
    u64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
}

/// The rendezvous choice for `uid` among the live (non-draining) nodes, or among all of
/// them when none is live.
pub fn rendezvous(uid: &str, nodes: &[RouteNode]) -> usize {
    let live = nodes.iter().any(|n| !n.draining);
    (0..nodes.len())
        .filter(|&i| !live || !nodes[i].draining)
        .max_by_key(|&i| (score(uid, &nodes[i].id), std::cmp::Reverse(i)))
        .expect("there is at least one node")
}

/// One node index per user.
pub fn assign(router: Option<&Pool>, app: &str, users: &[RouteUser], nodes: &[RouteNode]) -> Vec<usize> {
    if let Some(router) = router {
        match router.route(app, users, nodes) {
            Ok(indexes) => return indexes,
            Err(failure) => {
                router.warn_rate_limited(&failure, "router failed; falling back to rendezvous hashing");
                debug!(plugin = router.plugin_name(), error = %failure, "router fallback");
            }
        }
    }
    users.iter().map(|u| rendezvous(&u.uid, nodes)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(ids: &[&str]) -> Vec<RouteNode> {
        ids.iter().map(|id| RouteNode { id: id.to_string(), capacity: 100, ..RouteNode::default() }).collect()
    }

    #[test]
    fn stable_and_only_the_dead_nodes_users_move() {
        let three = nodes(&["a", "b", "c"]);
        let users: Vec<String> = (0..3000).map(|i| format!("user{i}")).collect();
        let before: Vec<usize> = users.iter().map(|u| rendezvous(u, &three)).collect();
        assert_eq!(before, users.iter().map(|u| rendezvous(u, &three)).collect::<Vec<_>>(), "stable");
        for node in 0..3 {
            let share = before.iter().filter(|&&n| n == node).count();
            assert!((800..1200).contains(&share), "node {node} got {share} of 3000");
        }
        // "b" goes away.
        let two = nodes(&["a", "c"]);
        for (u, &was) in users.iter().zip(&before) {
            let now = two[rendezvous(u, &two)].id.clone();
            if three[was].id != "b" {
                assert_eq!(now, three[was].id, "{u} did not move");
            }
        }
    }

    #[test]
    fn draining_nodes_are_skipped() {
        let mut n = nodes(&["a", "b"]);
        n[0].draining = true;
        assert!((0..100).all(|i| rendezvous(&format!("u{i}"), &n) == 1));
        n[1].draining = true;
        // Everyone draining: still an answer rather than none.
        assert!(rendezvous("u", &n) < 2);
    }
}

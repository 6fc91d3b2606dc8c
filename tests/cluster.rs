//! Many nodes, one system: real nats-server processes, real gateway nodes.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const ADMIN: &str = "admin-token-0123456789abcdef";

#[tokio::test]
async fn direct_message_across_nodes() {
    let nats = Nats::start();
    let nodes = start_nodes(2, &[nats.url()], |_, _| {}).await;
    let mut alice = nodes[0].ws("demo", "alice").await;
    let mut bob = nodes[1].tcp("demo", "bob").await;

    alice.send_json(&json!({"to":"bob","data":{"hi":1},"client_id":"x1"})).await;
    let msg = bob.recv().await;
    assert_eq!((msg["from"].as_str(), msg["data"]["hi"].as_i64()), (Some("alice"), Some(1)), "{msg}");
    let ack = alice.recv().await;
    assert_eq!(ack["type"], "ack");
    assert_eq!(ack["client_id"], "x1");
    assert_eq!(ack["delivered"], 1, "the other node's count comes back: {ack}");
    assert_eq!(ack["msg_id"], msg["msg_id"]);

    // Back the other way, and to someone nobody holds.
    bob.send_json(&json!({"to":"alice","data":"back"})).await;
    assert_eq!(alice.recv().await["data"], "back");
    alice.send_json(&json!({"to":"nobody","data":1})).await;
    let ack = alice.recv().await;
    assert_eq!((ack["status"].as_str(), ack["delivered"].as_u64()), (Some("offline"), Some(0)), "{ack}");

    // The cross-node traffic in each node's metrics.
    let (_, _, a) = scrape(&nodes[0].http()).await;
    let (_, _, b) = scrape(&nodes[1].http()).await;
    for text in [&a, &b] {
        assert_eq!(sample(text, "switchboard_cluster_nats_connected"), Some(1.0), "{text}");
        assert_eq!(sample(text, "switchboard_cluster_nodes"), Some(2.0), "{text}");
    }
    // alice's node published her two sends and received bob's one; bob's node the reverse.
    assert_eq!(sample(&a, "switchboard_cluster_published_total"), Some(2.0), "{a}");
    assert_eq!(sample(&b, "switchboard_cluster_received_total"), Some(1.0), "{b}");
    assert_eq!(sample(&a, r#"switchboard_messages_delivered_total{app="demo"}"#), Some(1.0), "{a}");
}

#[tokio::test]
async fn one_user_with_devices_on_two_nodes_and_push_via_a_third() {
    let nats = Nats::start();
    let nodes = start_nodes(3, &[nats.url()], |_, _| {}).await;
    let mut phone = nodes[0].ws("demo", "carol").await;
    let mut laptop = nodes[1].tcp("demo", "carol").await;
    let mut dave = nodes[2].ws("demo", "dave").await;

    // A direct message from the third node reaches both devices.
    dave.send_json(&json!({"to":"carol","data":"hello both"})).await;
    assert_eq!(phone.recv().await["data"], "hello both");
    assert_eq!(laptop.recv().await["data"], "hello both");
    assert_eq!(dave.recv().await["delivered"], 2);

    // Push via node 2 (holds neither of carol's devices).
    let (status, body) =
        nodes[2].push("demo", json!({"app_key":"demo","send_to":["carol","dave","erin"],"message":{"n":7}})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"][0], json!({"uid":"carol","status":"delivered","connections":2}));
    assert_eq!(body["results"][1], json!({"uid":"dave","status":"delivered","connections":1}));
    assert_eq!(body["results"][2], json!({"uid":"erin","status":"offline","connections":0}));
    for m in [phone.recv().await, laptop.recv().await, dave.recv().await] {
        assert_eq!(m["data"]["n"], 7);
    }
}

#[tokio::test]
async fn push_via_node_a_reaches_a_user_on_node_c() {
    let nats = Nats::start();
    let nodes = start_nodes(3, &[nats.url()], |_, _| {}).await;
    let mut zed = nodes[2].ws("demo", "zed").await;
    let (status, body) = nodes[0].push("demo", json!({"app_key":"demo","send_to":"zed","message":"via A"})).await;
    assert_eq!((status, body["results"][0]["connections"].as_u64()), (200, Some(1)), "{body}");
    assert_eq!(zed.recv().await["data"], "via A");
}

#[tokio::test]
async fn channel_fan_out_across_three_nodes() {
    let nats = Nats::start();
    let nodes = start_nodes(3, &[nats.url()], |_, c| {
        c.apps.get_mut("demo").unwrap().client_publish = true;
    })
    .await;
    let mut subscribers = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        for j in 0..2 {
            let mut c = node.ws("demo", &format!("s{i}-{j}")).await;
            c.send_json(&json!({"type":"subscribe","channel":"room:1","client_id":"sub"})).await;
            let ok = c.recv().await;
            assert_eq!((ok["type"].as_str(), ok["channel"].as_str()), (Some("subscribed"), Some("room:1")), "{ok}");
            subscribers.push(c);
        }
    }
    // From the app server, through node 1.
    let raw = serde_json::to_vec(&json!({"app_key":"demo","message":{"score":3},"nonce":"ch-1"})).unwrap();
    let ts = (switchboard::protocol::now_ms() / 1000).to_string();
    let sig = switchboard::auth::signature::sign(DEMO_SECRET.as_bytes(), &ts, "ch-1", &raw);
    let (status, body) = nodes[1].post_push("/api/v1/channels/room:1/publish", raw, &ts, &sig).await;
    assert_eq!(
        (status, body["delivered"].as_u64(), body["status"].as_str()),
        (200, Some(6), Some("delivered")),
        "{body}"
    );
    for s in &mut subscribers {
        let m = s.recv().await;
        assert_eq!(
            (m["event"].as_u64(), m["channel"].as_str(), m["to"].as_str()),
            (Some(2), Some("room:1"), Some("room:1"))
        );
        assert_eq!(m["data"], json!({"score":3}));
        assert_eq!(m["conversation_id"], "c:room:1");
    }
    // From a client on node 0: every subscriber, on every node.
    let mut author = nodes[0].ws("demo", "author").await;
    author.send_json(&json!({"type":"publish","channel":"room:1","data":"from a client","client_id":"p1"})).await;
    let ack = author.recv().await;
    assert_eq!((ack["client_id"].as_str(), ack["delivered"].as_u64()), (Some("p1"), Some(6)), "{ack}");
    for s in &mut subscribers {
        let m = s.recv().await;
        assert_eq!((m["from"].as_str(), m["data"].as_str()), (Some("author"), Some("from a client")));
    }
    // Unsubscribed connections stop receiving; bad names get their own error.
    subscribers[0].send_json(&json!({"type":"unsubscribe","channel":"room:1"})).await;
    assert_eq!(subscribers[0].recv().await["type"], "unsubscribed");
    author.send_json(&json!({"type":"publish","channel":"room:1","data":"again"})).await;
    assert_eq!(author.recv().await["delivered"], 5);
    for s in &mut subscribers[1..] {
        assert_eq!(s.recv().await["data"], "again");
    }
    subscribers[0].expect_silence(Duration::from_millis(200)).await;
    // Without an ack, the message still reaches every node; the author hears nothing back.
    author.send_json(&json!({"type":"publish","channel":"room:1","data":"quiet","ack":false})).await;
    for s in &mut subscribers[1..] {
        assert_eq!(s.recv().await["data"], "quiet");
    }
    // In a cluster an ack would follow the other nodes' answers: give it time to show up.
    author.expect_silence(Duration::from_millis(300)).await;
    author.send_json(&json!({"type":"subscribe","channel":"no spaces allowed"})).await;
    assert_eq!(author.recv().await["code"], "invalid_channel");
}

#[tokio::test]
async fn a_channel_reaches_only_nodes_with_subscribers() {
    let nats = Nats::start();
    let nodes = start_nodes(3, &[nats.url()], |_, _| {}).await;
    let mut sub = nodes[2].ws("demo", "listener").await;
    sub.send_json(&json!({"type":"subscribe","channel":"news"})).await;
    sub.recv().await;
    let received = |i: usize| nodes[i].hub.cluster().unwrap().received.load(std::sync::atomic::Ordering::Relaxed);
    let before = (received(0), received(1), received(2));
    for i in 0..20 {
        let raw = serde_json::to_vec(&json!({"app_key":"demo","message":i,"nonce":format!("n{i}")})).unwrap();
        let ts = (switchboard::protocol::now_ms() / 1000).to_string();
        let sig = switchboard::auth::signature::sign(DEMO_SECRET.as_bytes(), &ts, &format!("n{i}"), &raw);
        let (status, _) = nodes[0].post_push("/api/v1/channels/news/publish", raw, &ts, &sig).await;
        assert_eq!(status, 200);
        assert_eq!(sub.recv().await["data"], i);
    }
    assert_eq!(received(2) - before.2, 20, "the subscriber's node got each message once");
    assert_eq!(received(1) - before.1, 0, "a node with no subscriber got nothing");
    assert_eq!(received(0) - before.0, 0, "the publishing node does not get its own messages back");
}

fn node_of(nodes: &[TestServer], ws_addr: &str) -> usize {
    nodes.iter().position(|n| format!("ws://{}", n.addrs.ws.unwrap()) == ws_addr).unwrap_or_else(|| panic!("{ws_addr}"))
}

#[tokio::test]
async fn route_batch_spreads_users_over_the_cluster() {
    let nats = Nats::start();
    let nodes = start_nodes(3, &[nats.url()], |_, _| {}).await;
    let uids: Vec<String> = (0..300).map(|i| format!("user{i}")).collect();
    let (status, groups) = nodes[0].post("/route/batch", serde_json::to_string(&uids).unwrap()).await;
    assert_eq!(status, 200);
    let groups = groups.as_array().unwrap();
    assert_eq!(groups.len(), 3, "one group per node");
    let mut seen = HashSet::new();
    let mut assignment = std::collections::HashMap::new();
    for g in groups {
        let node = node_of(&nodes, g["ws_addr"].as_str().unwrap());
        assert!(seen.insert(node));
        let n = g["uids"].as_array().unwrap().len();
        assert!(n > 50, "rendezvous hashing spreads users: node {node} got {n}");
        for u in g["uids"].as_array().unwrap() {
            assignment.insert(u.as_str().unwrap().to_string(), node);
        }
    }
    // Any node answers the same for the whole cluster, and /route agrees.
    for node in &nodes {
        let (_, again) = node.post("/route/batch", serde_json::to_string(&uids).unwrap()).await;
        for g in again.as_array().unwrap() {
            let n = node_of(&nodes, g["ws_addr"].as_str().unwrap());
            assert!(g["uids"].as_array().unwrap().iter().all(|u| assignment[u.as_str().unwrap()] == n));
        }
    }
    let (_, one) = nodes[1].get("/route?uid=user7").await;
    assert_eq!(node_of(&nodes, one["ws_addr"].as_str().unwrap()), assignment["user7"]);
}

#[tokio::test]
async fn route_batch_with_load_and_geo_routers() {
    let nats = Nats::start();
    let dist = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("plugins/dist");
    let places = [("eu", 48.86, 2.35, 100), ("us", 40.71, -74.0, 100), ("ap", 35.68, 139.69, 1000)];
    let nodes = start_nodes(3, &[nats.url()], |i, c| {
        let cl = c.cluster.as_mut().unwrap();
        (cl.region, cl.lat, cl.lon, cl.capacity) = (Some(places[i].0.into()), Some(places[i].1), Some(places[i].2), Some(places[i].3));
        let text = format!(
            "[[plugins]]\nname = \"load\"\npath = \"{}\"\nworld = \"router\"\n[[plugins]]\nname = \"geo\"\npath = \"{}\"\nworld = \"router\"\n",
            dist.join("load-router.wasm").display(),
            dist.join("geo-router.wasm").display()
        );
        let plugins: switchboard::Config = format!("{text}[apps.x]\nsecret = \"0123456789abcdef\"\n").parse().unwrap();
        c.plugins = plugins.plugins;
        c.apps.get_mut("demo").unwrap().router = Some("load".into());
        c.apps.get_mut("other").unwrap().router = Some("geo".into());
    })
    .await;
    // Load: the node with ten times the capacity takes about ten times the users.
    let uids: Vec<String> = (0..120).map(|i| format!("u{i}")).collect();
    let (status, groups) = nodes[0].post("/route/batch?app_id=demo", serde_json::to_string(&uids).unwrap()).await;
    assert_eq!(status, 200, "{groups}");
    let count = |node: usize| -> usize {
        groups
            .as_array()
            .unwrap()
            .iter()
            .filter(|g| node_of(&nodes, g["ws_addr"].as_str().unwrap()) == node)
            .map(|g| g["uids"].as_array().unwrap().len())
            .sum()
    };
    assert_eq!(count(0) + count(1) + count(2), 120);
    assert!(count(2) >= 95, "the big node takes most of the batch: {groups}");
    // Geo: users go to the nearest node.
    let users = json!([
        {"uid":"lyon","lat":45.76,"lon":4.84},
        {"uid":"boston","lat":42.36,"lon":-71.06},
        {"uid":"osaka","lat":34.69,"lon":135.50},
        {"uid":"by-region","region":"us"}
    ]);
    let (_, groups) = nodes[1].post("/route/batch?app_id=other", users.to_string()).await;
    let home = |uid: &str| {
        let g =
            groups.as_array().unwrap().iter().find(|g| g["uids"].as_array().unwrap().iter().any(|u| u == uid)).unwrap();
        node_of(&nodes, g["ws_addr"].as_str().unwrap())
    };
    assert_eq!((home("lyon"), home("boston"), home("osaka"), home("by-region")), (0, 1, 2, 1), "{groups}");
}

#[tokio::test]
async fn drain_moves_200_clients_to_other_nodes() {
    let nats = Nats::start();
    let nodes = start_nodes(3, &[nats.url()], |_, c| {
        c.shutdown.drain_window = Duration::from_millis(500);
    })
    .await;
    let mut clients = Vec::new();
    for i in 0..200 {
        clients.push(nodes[0].ws("demo", &format!("d{i}")).await);
    }
    let resp = reqwest::Client::new()
        .post(format!("{}/admin/drain", nodes[0].http()))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    // It leaves routing at once: other nodes stop routing to it.
    wait_until(|| nodes[1].hub.route_nodes().iter().any(|n| n.id == "node-0" && n.draining)).await;
    let mut moved_to = [0usize; 3];
    let mut moved = Vec::new();
    for (i, mut c) in clients.into_iter().enumerate() {
        let (frames, code, reason) = c.expect_close().await;
        assert_eq!((code, reason.as_str()), (1001, "node_draining"));
        let reconnect = frames.iter().find(|f| f["type"] == "reconnect").expect("a reconnect frame");
        assert_eq!(reconnect["reason"], "node_draining");
        let target = node_of(&nodes, reconnect["ws_addr"].as_str().unwrap());
        assert_ne!(target, 0, "never back to the draining node");
        moved_to[target] += 1;
        // Follow the instruction: connect where told.
        let url = format!(
            "{}/ws/connect?app_id=demo&token={}",
            reconnect["ws_addr"].as_str().unwrap(),
            token("demo", &format!("d{i}"))
        );
        let mut again = WsClient::connect(&url).await;
        assert_eq!(again.recv().await["type"], "connected");
        moved.push(again);
    }
    assert!(moved_to[1] > 50 && moved_to[2] > 50, "spread over both remaining nodes: {moved_to:?}");
    assert_eq!(nodes[1].hub.connections() + nodes[2].hub.connections(), 200);
    wait_until(|| nodes[0].hub.connections() == 0).await;
    let (status, health) = nodes[0].get("/healthz").await;
    assert_eq!((status, health["status"].as_str()), (503, Some("draining")));
    let (_, one) = nodes[1].get("/route?uid=d0").await;
    assert_ne!(node_of(&nodes, one["ws_addr"].as_str().unwrap()), 0);
}

#[tokio::test]
async fn nats_down_and_back_needs_no_restart() {
    let mut nats = Nats::start();
    let nodes = start_nodes(2, &[nats.url()], |_, _| {}).await;
    let mut alice = nodes[0].ws("demo", "alice").await;
    let mut amy = nodes[0].ws("demo", "amy").await;
    let mut bob = nodes[1].ws("demo", "bob").await;
    alice.send_json(&json!({"to":"bob","data":"before"})).await;
    assert_eq!(bob.recv().await["data"], "before");
    assert_eq!(alice.recv().await["delivered"], 1);

    nats.stop();
    wait_until(|| !nodes[0].hub.cluster().unwrap().is_connected()).await;
    // Local delivery goes on ...
    alice.send_json(&json!({"to":"amy","data":"local"})).await;
    assert_eq!(amy.recv().await["data"], "local");
    let ack = alice.recv().await;
    assert_eq!((ack["delivered"].as_u64(), ack["cluster"].as_str()), (Some(1), Some("unavailable")), "{ack}");
    // ... and a cross-node send says so instead of pretending.
    alice.send_json(&json!({"to":"bob","data":"lost"})).await;
    let ack = alice.recv().await;
    assert_eq!((ack["status"].as_str(), ack["cluster"].as_str()), (Some("unavailable"), Some("unavailable")), "{ack}");
    let (_, body) = nodes[0].push("demo", json!({"app_key":"demo","send_to":"bob","message":1})).await;
    assert_eq!(body["results"][0]["status"], "unavailable", "{body}");
    let (_, version) = nodes[0].get("/api/version").await;
    assert_eq!(version["nats"], "disconnected");

    nats.restart();
    for node in &nodes {
        wait_until(|| node.hub.cluster().unwrap().is_connected()).await;
    }
    // Subscriptions come back by themselves: the same connections, no restart anywhere.
    tokio::time::timeout(WAIT, async {
        loop {
            alice.send_json(&json!({"to":"bob","data":"after"})).await;
            let ack = alice.recv().await;
            if ack["delivered"] == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("cross-node delivery resumes");
    assert_eq!(bob.recv().await["data"], "after");
    // The registry is rebuilt too.
    wait_until(|| nodes[0].hub.route_nodes().len() == 2).await;
}

#[tokio::test]
async fn nodes_on_a_three_server_nats_cluster() {
    let servers = Nats::cluster_of_three();
    servers[0].wait_for_jetstream().await;
    let urls: Vec<String> = servers.iter().map(Nats::url).collect();
    let nodes = start_nodes(3, &urls, |_, _| {}).await;
    let mut a = nodes[0].ws("demo", "a").await;
    let mut c = nodes[2].ws("demo", "c").await;
    c.send_json(&json!({"type":"subscribe","channel":"all"})).await;
    c.recv().await;
    // Interest crosses NATS routes asynchronously: allow it a moment.
    tokio::time::timeout(WAIT, async {
        loop {
            a.send_json(&json!({"to":"c","data":"across servers"})).await;
            if a.recv().await["delivered"] == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("delivery across NATS servers");
    let m = c.recv().await;
    assert_eq!(m["data"], "across servers");
    let raw = serde_json::to_vec(&json!({"app_key":"demo","message":"all","nonce":"x"})).unwrap();
    let ts = (switchboard::protocol::now_ms() / 1000).to_string();
    let sig = switchboard::auth::signature::sign(DEMO_SECRET.as_bytes(), &ts, "x", &raw);
    let (_, body) = nodes[1].post_push("/api/v1/channels/all/publish", raw, &ts, &sig).await;
    assert_eq!(body["delivered"], 1, "{body}");
    // Drain any duplicate of the retried direct message before checking the channel one.
    loop {
        let m = c.recv().await;
        if m["event"] == 2 {
            assert_eq!(m["data"], "all");
            break;
        }
    }
    let (_, version) = nodes[0].get("/api/version").await;
    assert_eq!(version["nodes"].as_array().unwrap().len(), 3, "{version}");
}

#[tokio::test]
async fn version_lists_the_cluster() {
    let nats = Nats::start();
    let nodes = start_nodes(2, &[nats.url()], |i, c| {
        c.cluster.as_mut().unwrap().region = Some(format!("r{i}"));
    })
    .await;
    let (_, v) = nodes[1].get("/api/version").await;
    let ids: Vec<&str> = v["nodes"].as_array().unwrap().iter().map(|n| n["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["node-0", "node-1"]);
    assert_eq!(v["nodes"][0]["region"], "r0");
    assert_eq!(v["nats"], "connected");
    let _: Value = v;
}

#[tokio::test]
async fn same_node_delivery_in_a_cluster_is_answered_at_once() {
    let nats = Nats::start();
    let nodes = start_nodes(2, &[nats.url()], |_, c| {
        // Long enough that waiting for it would show in the ack as "unavailable".
        c.cluster.as_mut().unwrap().request_timeout = Duration::from_secs(5);
    })
    .await;
    let mut alice = nodes[0].ws("demo", "alice").await;
    let mut bob = nodes[0].ws("demo", "bob").await;
    for i in 0..20 {
        alice.send_json(&json!({"to":"bob","data":i})).await;
        let ack = alice.recv().await;
        assert_eq!(ack["delivered"], 1, "{ack}");
        assert!(ack.get("cluster").is_none(), "no other node holds bob: nothing to wait for: {ack}");
        assert_eq!(bob.recv().await["data"], i);
    }
}

/// The address after `key=` in the "switchboard listening" log line.
fn logged_addr(line: &str, key: &str) -> String {
    let start = line.find(&format!(" {key}=")).unwrap_or_else(|| panic!("{key} in {line}")) + key.len() + 2;
    line[start..].split_whitespace().next().unwrap().to_string()
}

#[tokio::test]
async fn a_killed_node_leaves_routing_and_its_clients_land_elsewhere() {
    use std::io::{BufRead, BufReader};
    let nats = Nats::start();
    let nodes = start_nodes(2, &[nats.url()], |_, _| {}).await;
    // Node 2 is its own process, so it can be killed for real.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("node2.toml");
    std::fs::write(
        &cfg,
        format!(
            "[node]\nid = \"node-2\"\n[listeners.http]\nbind = \"127.0.0.1:0\"\n[listeners.tcp]\nenabled = false\n\
             [listeners.ws]\nbind = \"127.0.0.1:0\"\n[cluster]\nurls = [\"{}\"]\nheartbeat = \"200ms\"\nttl = \"1s\"\n\
             [apps.demo]\nsecret = \"{DEMO_SECRET}\"\n[apps.other]\nsecret = \"{OTHER_SECRET}\"\n",
            nats.url()
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("-c")
        .arg(&cfg)
        .arg("serve")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("switchboard listening") {
                let _ = tx.send(line);
            }
        }
    });
    let listening = rx.recv_timeout(WAIT).expect("node 2 starts");
    let ws = logged_addr(&listening, "ws");
    wait_until(|| nodes[0].hub.route_nodes().len() == 3).await;

    // Find a user the cluster routes to node 2, and connect it there.
    let uid =
        (0..1000).map(|i| format!("k{i}")).find(|u| switchboard::routing::rendezvous(u, &ids(&nodes[0])) == 2).unwrap();
    let (_, route) = nodes[0].get(&format!("/route?uid={uid}")).await;
    assert_eq!(route["ws_addr"], format!("ws://{ws}"));
    let mut victim =
        WsClient::connect(&format!("ws://{ws}/ws/connect?app_id=demo&token={}", token("demo", &uid))).await;
    assert_eq!(victim.recv().await["type"], "connected");

    let killed = tokio::time::Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    let _ = child.wait();
    // The client notices at once; the cluster within the TTL (1 s here, 10 s by default).
    assert!(matches!(
        victim.next_raw().await,
        None | Some(Err(_)) | Some(Ok(tokio_tungstenite::tungstenite::Message::Close(_)))
    ));
    wait_until(|| nodes[0].hub.route_nodes().len() == 2 && nodes[1].hub.route_nodes().len() == 2).await;
    let gone_after = killed.elapsed();
    assert!(gone_after < Duration::from_secs(3), "gone from routing {gone_after:?} after the kill (ttl 1s)");

    // Following /route, the client lands on a live node.
    let (_, route) = nodes[1].get(&format!("/route?uid={uid}")).await;
    let target = node_of(&nodes, route["ws_addr"].as_str().unwrap());
    let mut back = WsClient::connect(&format!(
        "{}/ws/connect?app_id=demo&token={}",
        route["ws_addr"].as_str().unwrap(),
        token("demo", &uid)
    ))
    .await;
    assert_eq!(back.recv().await["type"], "connected");
    assert_eq!(nodes[target].sessions_of("demo", &uid), 1);
}

fn ids(node: &TestServer) -> Vec<switchboard::plugin::RouteNode> {
    node.hub
        .route_nodes()
        .into_iter()
        .map(|n| switchboard::plugin::RouteNode { id: n.id, ..Default::default() })
        .collect()
}

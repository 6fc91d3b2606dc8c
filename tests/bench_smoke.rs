//! The benchmarks never rot: every load generator scenario runs at tiny sizes, against the
//! real servers, and produces sane figures.

mod common;

use std::process::Command;

use serde_json::Value;

use common::{DEMO_SECRET, TestServer};

#[test]
fn every_scenario_runs_in_smoke_mode() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("results.json");
    let out =
        Command::new(env!("CARGO_BIN_EXE_loadgen")).args(["--smoke", "all", "--json"]).arg(&json).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();

    let systems = |section: &str| -> Vec<String> {
        r[section].as_array().unwrap().iter().map(|x| x["system"].as_str().unwrap().to_string()).collect()
    };
    // Peers run whenever they are installed (the test command installs both).
    let mut expected = vec!["switchboard".to_string()];
    if Command::new("sh").args(["-c", "test -x .venv/bin/nats-server"]).status().unwrap().success() {
        expected.push("nats-server".into());
    }
    if std::path::Path::new("/usr/sbin/mosquitto").exists() {
        expected.push("mosquitto".into());
    }
    // Every system over WebSocket, then over plain TCP.
    let twice: Vec<String> = expected.iter().flat_map(|s| [s.clone(), s.clone()]).collect();
    assert_eq!(systems("connections"), twice);
    let labels: Vec<&str> = r["connections"].as_array().unwrap().iter().map(|c| c["label"].as_str().unwrap()).collect();
    assert!(labels.chunks(2).all(|pair| pair == ["idle", "idle, tcp"]), "{labels:?}");

    for c in r["connections"].as_array().unwrap() {
        assert_eq!((c["connections"].as_u64(), c["failed"].as_u64()), (Some(50), Some(0)), "{c}");
        assert!(c["connects_per_sec"].as_f64().unwrap() > 0.0);
        // A server started here is measured (only a --target's figures are unknown).
        assert!(c["server_cpu_us_per_connect"].as_f64().is_some() && c["rss_after_mib"].as_f64().unwrap() > 0.0, "{c}");
        assert!(c["rss_per_connection_kib"].as_f64().is_some(), "{c}");
    }
    for d in ["direct", "latency", "cluster"].iter().flat_map(|s| r[*s].as_array().unwrap()) {
        assert!(d["server_cpu_ms_per_1k"].as_f64().is_some(), "{d}");
    }
    for d in r["direct"].as_array().unwrap().iter().chain(r["plugins_direct"].as_array().unwrap()) {
        assert!(d["delivered"].as_u64().unwrap() > 0, "{d}");
        assert!(
            d["p50_us"].as_f64().unwrap() > 0.0 && d["p99_us"].as_f64().unwrap() >= d["p50_us"].as_f64().unwrap(),
            "{d}"
        );
    }
    let labels: Vec<&str> = r["direct"].as_array().unwrap().iter().map(|d| d["label"].as_str().unwrap()).collect();
    for label in [
        "max",
        "half-peak",
        "max, no ack",
        "half-peak, no ack",
        "max, two-way",
        "half-peak, two-way",
        "max, tcp",
        "half-peak, tcp",
    ] {
        assert!(labels.contains(&label), "{labels:?}");
    }
    for peer in &expected[1..] {
        let runs = r["direct"].as_array().unwrap().iter().filter(|d| d["system"] == peer.as_str());
        let labels: Vec<&str> = runs.map(|d| d["label"].as_str().unwrap()).collect();
        assert_eq!(
            labels,
            ["max", "half-peak", "max, two-way", "half-peak, two-way", "max, tcp", "half-peak, tcp"],
            "{peer}"
        );
    }
    for d in r["direct"].as_array().unwrap() {
        assert_eq!(d["refused"].as_u64(), Some(0), "{d}");
        // Every sender's messages arrived: both clients of a pair when two-way.
        let senders = if d["label"].as_str().unwrap().contains("two-way") { 8 } else { 4 };
        assert_eq!(d["senders_delivered"].as_u64(), Some(senders), "{d}");
    }
    // Every system paced at the same rate (one rate in smoke mode), switchboard with and
    // without acks; every message delivered.
    let mut paced = expected.clone();
    paced.insert(1, "switchboard".into());
    assert_eq!(systems("latency"), paced);
    let labels: Vec<&str> = r["latency"].as_array().unwrap().iter().map(|d| d["label"].as_str().unwrap()).collect();
    assert_eq!(labels[..2], ["0.4k/s", "0.4k/s, no ack"]);
    for d in r["latency"].as_array().unwrap() {
        assert_eq!(d["target_rate"].as_f64(), Some(400.0), "{d}");
        assert!(d["delivered"].as_u64().unwrap() > 0 && d["refused"].as_u64() == Some(0), "{d}");
        assert!(d["p99_us"].as_f64().unwrap() >= d["p50_us"].as_f64().unwrap(), "{d}");
    }
    assert_eq!(r["plugins_direct"].as_array().unwrap().len(), 3);
    for c in r["plugins_connect"].as_array().unwrap() {
        assert_eq!((c["connections"].as_u64(), c["failed"].as_u64()), (Some(20), Some(0)), "{c}");
    }
    let push = &r["push"][0];
    assert!(push["pushes"].as_u64().unwrap() > 0 && push["failed"].as_u64() == Some(0), "{push}");
    assert!(push["push_to_receive_p50_us"].as_f64().unwrap() > 0.0, "{push}");
    assert_eq!(systems("fanout"), expected);
    for f in r["fanout"].as_array().unwrap() {
        // Every message reached every subscriber.
        assert!(f["messages"].as_u64().unwrap() > 0 && f["complete"] == f["messages"], "{f}");
        assert_eq!(
            f["deliveries"].as_u64(),
            Some(f["messages"].as_u64().unwrap() * f["subscribers"].as_u64().unwrap())
        );
    }
    let cluster: Vec<&str> = r["cluster"].as_array().unwrap().iter().map(|d| d["label"].as_str().unwrap()).collect();
    assert_eq!(cluster, ["cross-node", "same-node"]);
    for d in r["cluster"].as_array().unwrap() {
        assert!(d["delivered"].as_u64().unwrap() > 0 && d["refused"].as_u64() == Some(0), "{d}");
    }
    assert!(r["cluster_idle_node_cpu_ms"].as_f64().is_some());
    assert!(stdout.contains("ratios"), "{stdout}");
}

/// `latency --rates`: the operator's own offered loads, each run paced at that rate.
#[test]
fn latency_runs_at_the_rates_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("results.json");
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["--smoke", "--peers", "none", "--rates", "300,1500", "latency", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let runs = r["latency"].as_array().unwrap();
    let rows: Vec<(&str, f64)> =
        runs.iter().map(|d| (d["label"].as_str().unwrap(), d["target_rate"].as_f64().unwrap())).collect();
    assert_eq!(rows, [("0.3k/s", 300.0), ("1.5k/s", 1500.0), ("0.3k/s, no ack", 300.0), ("1.5k/s, no ack", 1500.0)]);
    for d in runs {
        assert!(d["delivered"].as_u64().unwrap() > 0 && d["refused"].as_u64() == Some(0), "{d}");
    }

    // A rate that cannot pace anything is refused before any server starts.
    for bad in ["0", "-5", "fast", "inf", "1e9"] {
        let out =
            Command::new(env!("CARGO_BIN_EXE_loadgen")).args([&format!("--rates={bad}"), "latency"]).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "--rates {bad}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("not a rate in messages per second"), "--rates {bad}: {stderr}");
    }
}

/// `--target`: a switchboard this load generator did not start (here one in the test's own
/// process) is driven over WebSocket and TCP; what only a local process shows (its CPU
/// time, its memory) is reported as unknown, not as zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_switchboard_is_driven_with_target() {
    // Limits a driven node needs (docs/performance.md): sends above what one client sends,
    // and a queue above the paced runs' window, or a receiver the busy machine stalls for a
    // moment is closed as a slow consumer, as it should be.
    let server = TestServer::with(|c| {
        c.limits.messages_per_second = 1_000_000;
        c.limits.message_burst = 1_000_000;
        c.limits.outbound_queue = 65_536;
        c.limits.outbound_queue_bytes = 256 << 20;
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("results.json");
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_loadgen"));
    cmd.args(["--smoke", "--app", "demo", "--target"])
        .arg(server.addrs.ws.unwrap().to_string())
        .arg("--target-tcp")
        .arg(server.tcp_addr().to_string())
        .args(["connections", "direct", "latency", "--json"])
        .arg(&json)
        .env("LOADGEN_SECRET", DEMO_SECRET);
    let out = cmd.output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();

    let labels = |section: &str| -> Vec<String> {
        r[section].as_array().unwrap().iter().map(|x| x["label"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(labels("connections"), ["idle", "idle, tcp"]);
    for c in r["connections"].as_array().unwrap() {
        assert_eq!(
            (c["system"].as_str(), c["connections"].as_u64(), c["failed"].as_u64()),
            (Some("switchboard"), Some(50), Some(0)),
            "{c}"
        );
        for unknown in ["server_cpu_us_per_connect", "rss_after_mib", "rss_per_connection_kib"] {
            assert!(c[unknown].is_null(), "{unknown}: {c}");
        }
    }
    assert_eq!(
        labels("direct"),
        [
            "max",
            "half-peak",
            "max, no ack",
            "half-peak, no ack",
            "max, unbatched",
            "half-peak, unbatched",
            "max, two-way",
            "half-peak, two-way",
            "max, tcp",
            "half-peak, tcp"
        ]
    );
    assert_eq!(labels("latency"), ["0.4k/s", "0.4k/s, no ack"]);
    for d in r["direct"].as_array().unwrap().iter().chain(r["latency"].as_array().unwrap()) {
        assert!(d["delivered"].as_u64().unwrap() > 0 && d["refused"].as_u64() == Some(0), "{d}");
        assert!(d["server_cpu_ms_per_1k"].is_null() && d["client_cpu_ms_per_1k"].as_f64().unwrap() > 0.0, "{d}");
    }
    // The messages went through this server: its own count is at least the clients'.
    let received: u64 = r["direct"].as_array().unwrap().iter().map(|d| d["delivered"].as_u64().unwrap()).sum();
    let (_, _, metrics) = common::scrape(&server.http()).await;
    let delivered = common::sample(&metrics, r#"switchboard_messages_delivered_total{app="demo"}"#).unwrap();
    assert!(delivered >= received as f64, "{delivered} < {received}");
    // Every row of every table shows the unknown figures as `-`.
    let rows: Vec<&str> = stdout.lines().filter(|l| l.starts_with("switchboard ")).collect();
    assert_eq!(rows.len(), 2 + 10 + 2, "{stdout}");
    for row in rows {
        assert!(row.split_whitespace().any(|cell| cell == "-"), "{row}");
    }

    // Without --target-tcp the runs over TCP are left out. With --repeat, every maximum
    // rate is the median of that many rounds (the half-peak runs are single).
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["--smoke", "--repeat", "2", "--app", "demo", "--secret", DEMO_SECRET, "--target"])
        .arg(server.addrs.ws.unwrap().to_string())
        .args(["direct", "--json"])
        .arg(&json)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let labels: Vec<&str> = r["direct"].as_array().unwrap().iter().map(|d| d["label"].as_str().unwrap()).collect();
    assert_eq!(
        labels,
        [
            "max",
            "half-peak",
            "max, no ack",
            "half-peak, no ack",
            "max, unbatched",
            "half-peak, unbatched",
            "max, two-way",
            "half-peak, two-way"
        ]
    );
    for d in r["direct"].as_array().unwrap() {
        let rounds = if d["label"].as_str().unwrap().starts_with("max") { 2 } else { 1 };
        assert_eq!(d["rounds"].as_u64(), Some(rounds), "{d}");
    }
    assert!(String::from_utf8_lossy(&out.stdout).contains("the median of 2 rounds"));

    // A secret in the environment does not get in the way of a run without --target.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["--smoke", "--peers", "none", "--rates", "300", "latency"])
        .env("LOADGEN_SECRET", "exported-for-later")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // What cannot run against a target is refused before anything connects.
    for (args, expected) in [
        (vec!["push"], "--target runs connections, direct and latency"),
        (vec!["--peers", "nats", "direct"], "--target drives switchboard alone"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_loadgen"))
            .args(["--target", "127.0.0.1:9", "--secret", "s"])
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(expected), "{args:?}: {stderr}");
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["--target", "127.0.0.1:9", "direct"])
        .env_remove("LOADGEN_SECRET")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("needs the app's JWT secret"), "{stderr}");
}

//! What operators and developers look at: Prometheus metrics, the admin listener, JSON logs
//! with a span per connection, the OpenAPI document, the demo page with its development
//! tokens, and `switchboard cert`.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use switchboard::config::{PluginConfig, World};

fn words() -> PluginConfig {
    PluginConfig {
        name: "words".into(),
        path: plugin_path("word-filter"),
        world: World::MessageFilter,
        failure: None,
        deadline: None,
        memory_limit_mb: 32,
        pool_size: None,
        config: toml::Table::try_from(json!({"deny": ["spam"]})).unwrap(),
    }
}

#[tokio::test]
async fn metrics_count_connections_messages_pushes_and_plugins() {
    let s = TestServer::with(|c| {
        c.plugins.push(words());
        c.apps.get_mut("demo").unwrap().filters = vec!["words".into()];
    })
    .await;
    let mut alice = s.ws("demo", "alice").await;
    let mut bob = s.tcp("demo", "bob").await;

    alice.send_json(&json!({"type":"send","to":"bob","data":{"text":"hi"},"client_id":"1"})).await;
    assert_eq!(alice.recv().await["type"], "ack");
    assert_eq!(bob.recv().await["data"]["text"], "hi");
    alice.send_json(&json!({"type":"send","to":"bob","data":{"text":"buy spam"},"client_id":"2"})).await;
    assert_eq!(alice.recv().await["code"], "denied");

    // A refused connection, a push that arrives and one that is refused.
    let mut bad = WsClient::connect(&s.ws_url("app_id=demo&token=not.a.jwt")).await;
    bad.expect_close().await;
    let (status, _) = s.push("demo", json!({"app_key":"demo","send_to":["bob","carol"],"message":{"n":1}})).await;
    assert_eq!(status, 200);
    assert_eq!(bob.recv().await["data"]["n"], 1);
    let (status, _) = s.post_push("/api/v1/push", br#"{"app_key":"demo"}"#.to_vec(), "1", "x").await;
    assert_eq!(status, 400);

    drop(bob);
    let disconnected = r#"switchboard_disconnects_total{app="demo",reason="client_closed"}"#;
    scrape_until(&s.http(), |text| sample(text, disconnected) == Some(1.0)).await;

    let (status, ctype, text) = scrape(&s.http()).await;
    assert_eq!(status, 200);
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    assert!(text.ends_with("# EOF\n"), "{text}");
    let expect = [
        (r#"switchboard_connections{app="demo",transport="ws"}"#, 1.0),
        (r#"switchboard_connections{app="demo",transport="tcp"}"#, 0.0),
        (r#"switchboard_connects_total{app="demo",transport="tcp"}"#, 1.0),
        (r#"switchboard_connect_rejects_total{app="demo",transport="ws",reason="token_malformed"}"#, 1.0),
        (r#"switchboard_disconnects_total{app="demo",reason="client_closed"}"#, 1.0),
        (r#"switchboard_messages_received_total{app="demo",source="client"}"#, 2.0),
        (r#"switchboard_messages_received_total{app="demo",source="push"}"#, 1.0),
        (r#"switchboard_messages_delivered_total{app="demo"}"#, 2.0),
        (r#"switchboard_messages_denied_total{app="demo",reason="denied"}"#, 1.0),
        (r#"switchboard_push_requests_total{app="demo",outcome="ok"}"#, 1.0),
        (r#"switchboard_push_requests_total{app="",outcome="invalid_body"}"#, 1.0),
        (r#"switchboard_push_recipients_total{app="demo",outcome="delivered"}"#, 1.0),
        (r#"switchboard_push_recipients_total{app="demo",outcome="offline"}"#, 1.0),
        (r#"switchboard_outbound_queue_bytes{app="demo"}"#, 0.0),
        // Two sends, and one call for both recipients of the push (the word filter takes batches).
        (r#"switchboard_plugin_calls_total{plugin="words",app="demo"}"#, 3.0),
        (r#"switchboard_plugin_denials_total{plugin="words",app="demo"}"#, 1.0),
        (r#"switchboard_plugin_errors_total{plugin="words",app="demo",kind="trap"}"#, 0.0),
    ];
    for (series, value) in expect {
        assert_eq!(sample(&text, series), Some(value), "{series} in\n{text}");
    }
    // Calls are sampled for latency: the first call of each thread's shard is recorded.
    let histogram = r#"switchboard_plugin_call_duration_seconds_count{plugin="words",app="demo"}"#;
    assert!(sample(&text, histogram).unwrap() >= 1.0, "{text}");
    assert!(text.contains(r#"switchboard_plugin_call_duration_seconds_bucket{le="+Inf",plugin="words",app="demo"}"#));
    assert!(sample(&text, r#"switchboard_build_info{node="test-node",version="0.1.0"}"#).is_some(), "{text}");
    // A single node says nothing about a cluster.
    assert!(!text.contains("switchboard_cluster_"), "{text}");
    // Nothing a client chose becomes a label.
    assert!(!text.contains("alice") && !text.contains("bob") && !text.contains("carol"));
    alice.send_json(&json!({"type":"ping"})).await;
    s.assert_healthy().await;
}

#[tokio::test]
async fn rate_limited_messages_are_counted() {
    let s = TestServer::with(|c| {
        c.limits.messages_per_second = 1;
        c.limits.message_burst = 1;
    })
    .await;
    let mut alice = s.ws("demo", "alice").await;
    for i in 0..2 {
        alice.send_json(&json!({"type":"send","to":"nobody","data":i,"client_id":i.to_string()})).await;
    }
    assert_eq!(alice.recv().await["type"], "ack");
    assert_eq!(alice.recv().await["code"], "rate_limited");
    let (_, _, text) = scrape(&s.http()).await;
    assert_eq!(sample(&text, r#"switchboard_messages_denied_total{app="demo",reason="rate_limited"}"#), Some(1.0));

    // Slow consumers are counted in gateway.rs, where one is made.
}

#[tokio::test]
async fn admin_listener_takes_metrics_and_admin_off_the_public_one() {
    let s = TestServer::with(|c| {
        c.listeners.admin.enabled = true;
        c.listeners.admin.bind = "127.0.0.1:0".parse().unwrap();
        c.admin.token = Some("admin-token-0123456789abcdef".into());
    })
    .await;
    let admin = format!("http://{}", s.addrs.admin.expect("admin listener bound"));
    let (status, _, text) = scrape(&admin).await;
    assert_eq!(status, 200);
    assert!(text.contains("switchboard_build_info"));
    let plugins = reqwest::Client::new()
        .get(format!("{admin}/admin/plugins"))
        .bearer_auth("admin-token-0123456789abcdef")
        .send()
        .await
        .unwrap();
    assert_eq!(plugins.status(), 200);

    // Not on the public listener any more; and the admin listener serves nothing else.
    let (status, body) = s.get("/metrics").await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("not_found")));
    let (status, _) = s.get("/admin/plugins").await;
    assert_eq!(status, 404);
    let route = reqwest::get(format!("{admin}/route")).await.unwrap();
    assert_eq!(route.status(), 404);
    // The public listener's document lists what it serves.
    let (_, doc) = s.get("/api/openapi.json").await;
    assert!(doc["paths"].get("/route").is_some() && doc["paths"].get("/metrics").is_none(), "{doc}");
    assert!(doc["paths"].get("/admin/plugins").is_none());
    let (status, _) = s.get("/route").await;
    assert_eq!(status, 200);

    // Metrics can be turned off.
    let s = TestServer::with(|c| c.metrics.enabled = false).await;
    assert_eq!(s.get("/metrics").await.0, 404);
}

/// The OpenAPI document describes every operation the router serves, and nothing it does
/// not: each documented path answers with something other than the router's "no such
/// endpoint", and every endpoint named in docs/http-api.md is in the document.
#[tokio::test]
async fn openapi_document_matches_the_router() {
    let s = TestServer::with(|c| c.demo.enabled = true).await;
    let (status, doc) = s.get("/api/openapi.json").await;
    assert_eq!(status, 200);
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();
    let client = reqwest::Client::new();
    for (path, item) in paths {
        for (method, op) in item.as_object().unwrap() {
            assert!(op["responses"].as_object().is_some_and(|r| !r.is_empty()), "{method} {path} has responses");
            let concrete = path.replace("{channel}", "room-1").replace("{file}", "demo.js");
            let url = format!("{}{concrete}", s.http());
            let resp = match method.as_str() {
                "get" => client.get(&url).send().await.unwrap(),
                "post" => client.post(&url).body("{}").send().await.unwrap(),
                other => panic!("unexpected method {other}"),
            };
            let status = resp.status().as_u16();
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            assert!(
                !(status == 404
                    && body["error"]["message"].as_str().is_some_and(|m| m.starts_with("no such endpoint"))),
                "{method} {path} is documented but not served"
            );
            assert_ne!(status, 405, "{method} {path} is documented with a method the router does not take");
            assert!(status < 500, "{method} {path} answered {status}");
        }
    }

    let http_api = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/http-api.md")).unwrap();
    let mut named = 0;
    for line in http_api.lines().filter(|l| l.starts_with('#')) {
        for method in ["GET", "POST"] {
            for (at, _) in line.match_indices(&format!("{method} /")) {
                let path = line[at + method.len() + 1..].split(['`', '?', ' ', ')']).next().unwrap();
                let item =
                    paths.get(path).unwrap_or_else(|| panic!("docs/http-api.md names {path}; not in the document"));
                assert!(item.get(method.to_lowercase()).is_some(), "{method} {path}");
                named += 1;
            }
        }
    }
    // Every documented operation has its own heading there too.
    let operations: usize = paths.values().map(|item| item.as_object().unwrap().len()).sum();
    assert_eq!(named, operations - 1, "docs/http-api.md headings name every endpoint but /demo/{{file}}");
}

#[tokio::test]
async fn demo_page_and_dev_tokens() {
    // Off by default: no page, no tokens, even for an app that allows them.
    let s = TestServer::with(|c| c.apps.get_mut("demo").unwrap().dev_tokens = true).await;
    assert_eq!(s.get("/demo").await.0, 404);
    let (status, body) = s.post("/api/v1/dev/token", r#"{"app_id":"demo","uid":"alice"}"#).await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("not_found")));

    let s = TestServer::with(|c| {
        c.demo.enabled = true;
        c.apps.get_mut("demo").unwrap().dev_tokens = true;
    })
    .await;
    let page = reqwest::get(format!("{}/demo", s.http())).await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    let client = reqwest::get(format!("{}/demo/switchboard.js", s.http())).await.unwrap().text().await.unwrap();
    let source = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/clients/js/switchboard.js")).unwrap();
    assert_eq!(client, source, "the page gets the client module from clients/js");
    // Only the embedded files, whatever the path says.
    for path in ["/demo/..%2FCargo.toml", "/demo/%2E%2E%2Fconfig.toml", "/demo/index.html"] {
        assert_eq!(s.get(path).await.0, 404, "{path}");
    }
    assert_eq!(s.get("/demo/config.json").await.1, json!({"apps": ["demo"]}));

    // A token that connects as the user asked for, for flagged apps only.
    let (status, body) = s.post("/api/v1/dev/token", r#"{"app_id":"demo","uid":"dora","ttl_secs":60}"#).await;
    assert_eq!(status, 200, "{body}");
    let token = body["token"].as_str().unwrap();
    let mut dora = WsClient::connect(&s.ws_url(&format!("app_id=demo&token={token}"))).await;
    assert_eq!(dora.recv().await["uid"], "dora");
    for (body, status, code) in [
        (r#"{"app_id":"other","uid":"x"}"#, 403, "dev_tokens_disabled"),
        (r#"{"app_id":"nope","uid":"x"}"#, 404, "unknown_app"),
        (r#"{"app_id":"demo","uid":""}"#, 400, "invalid_uid"),
        (r#"{"app_id":"demo","uid":"x","ttl_secs":0}"#, 400, "invalid_ttl"),
        (r#"{"app_id":"demo"}"#, 400, "invalid_body"),
        ("not json", 400, "invalid_body"),
    ] {
        let (got, answer) = s.post("/api/v1/dev/token", body).await;
        assert_eq!((got, answer["error"]["code"].as_str()), (status, Some(code)), "{body}");
    }
}

/// `--log-format json`: one JSON object per line, the connection's span (app, uid,
/// transport, remote address) on its events, and no token or secret anywhere, even at
/// debug level.
#[tokio::test]
async fn json_logs_carry_the_connection_span_and_no_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("serve.toml");
    std::fs::write(
        &cfg,
        format!(
            "[node]\ndata_dir = \"state\"\n[node.external]\nhost = \"127.0.0.1\"\n\
             [listeners.http]\nbind = \"127.0.0.1:0\"\n[listeners.tcp]\nbind = \"127.0.0.1:0\"\n\
             [listeners.ws]\nbind = \"127.0.0.1:0\"\n[shutdown]\ngrace = \"2s\"\n\
             [apps.demo]\nsecret = \"{DEMO_SECRET}\"\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["--log-format", "json", "-c"])
        .arg(&cfg)
        .arg("serve")
        .env("RUST_LOG", "debug")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line.clone());
            all.push(line);
        }
        all
    });
    let listening: Value = loop {
        let line = rx.recv_timeout(WAIT).expect("server logs that it listens");
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if v["message"] == "switchboard listening" {
            break v;
        }
    };
    let ws = listening["ws"].as_str().unwrap().to_string();
    let token = token("demo", "alice");
    let mut c = WsClient::connect(&format!("ws://{ws}/ws/connect?app_id=demo&token={token}")).await;
    assert_eq!(c.recv().await["type"], "connected");
    let mut bad = WsClient::connect(&format!("ws://{ws}/ws/connect?app_id=demo&token={token}x")).await;
    bad.expect_close().await;
    drop(c);
    tokio::time::sleep(Duration::from_millis(300)).await;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    assert!(child.wait().unwrap().success());
    let lines = reader.join().unwrap();

    let events: Vec<Value> =
        lines.iter().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect();
    let connected = events
        .iter()
        .find(|e| e["message"] == "connected")
        .unwrap_or_else(|| panic!("a `connected` event: {lines:#?}"));
    let span = &connected["span"];
    assert_eq!(
        (span["name"].as_str(), span["app"].as_str(), span["uid"].as_str()),
        (Some("conn"), Some("demo"), Some("alice"))
    );
    assert_eq!(span["transport"], "ws");
    assert!(span["remote"].as_str().unwrap().starts_with("127.0.0.1:"), "{span}");
    assert!(events.iter().any(|e| e["message"] == "disconnected" && e["span"]["uid"] == "alice"));
    let all = lines.join("\n");
    assert!(!all.contains(&token) && !all.contains(DEMO_SECRET), "no token or secret in the logs");
}

#[test]
fn cert_writes_a_usable_development_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("certs");
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args(["cert", "--host", "gateway.test", "--out"])
            .arg(&out)
            .args(extra)
            .output()
            .unwrap()
    };
    let first = run(&[]);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    assert!(String::from_utf8_lossy(&first.stdout).contains("[tls]"));
    let key_mode = std::fs::metadata(out.join("dev.key")).unwrap().permissions().mode() & 0o777;
    assert_eq!(key_mode, 0o600, "the key is readable by its owner only");

    // Never overwritten by accident; replaced on request, and the key stays private even
    // when the file it replaces was readable by others.
    let again = run(&[]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    std::fs::set_permissions(out.join("dev.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(run(&["--force"]).status.success());
    let key_mode = std::fs::metadata(out.join("dev.key")).unwrap().permissions().mode() & 0o777;
    assert_eq!(key_mode, 0o600);

    // A client that trusts it reaches the node over HTTPS as gateway.test and 127.0.0.1.
    let pem = std::fs::read(out.join("dev.crt")).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let s = TestServer::with(|c| {
            c.tls = Some(switchboard::config::TlsConfig { cert: out.join("dev.crt"), key: out.join("dev.key") });
        })
        .await;
        switchboard::transport::tls::install_crypto_provider();
        let https = s.addrs.https.unwrap();
        let client = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(&pem).unwrap()])
            .resolve("gateway.test", https)
            .build()
            .unwrap();
        for host in ["gateway.test", "127.0.0.1"] {
            let resp = client.get(format!("https://{host}:{}/healthz", https.port())).send().await.unwrap();
            assert_eq!(resp.status(), 200, "{host}");
        }
    });
}

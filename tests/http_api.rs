//! The HTTP API as an app server or client sees it: route discovery in WuKongIM's shape,
//! version, health, push results, JSON errors.

mod common;

use common::*;
use serde_json::json;

#[tokio::test]
async fn route_answers_wukongim_shape() {
    let s = TestServer::spawn().await;
    let (tcp, ws) = (s.addrs.tcp.unwrap(), s.addrs.ws.unwrap());
    let expected = json!({"tcp_addr": tcp.to_string(), "ws_addr": format!("ws://{ws}"), "wss_addr": ""});
    for path in ["/route", "/route?intranet=0", "/route?intranet=1", "/route?uid=alice&intranet=0"] {
        let (status, body) = s.get(path).await;
        assert_eq!(status, 200, "{path}");
        assert_eq!(body, expected, "{path}: WSS is disabled, so wss_addr is empty");
    }
    let (status, err) = s.get("/route?intranet=2").await;
    assert_eq!((status, err["error"]["code"].as_str()), (400, Some("invalid_parameter")));
}

#[tokio::test]
async fn configured_hosts_and_overrides_are_advertised() {
    let s = TestServer::with(|c| {
        c.node.external.host = Some("im.example.com".into());
        c.node.external.tcp_addr = Some("tcp.example.com:443".into());
        c.node.intranet.host = Some("10.1.2.3".into());
    })
    .await;
    let ws_port = s.addrs.ws.unwrap().port();
    let (_, public) = s.get("/route").await;
    assert_eq!(public["tcp_addr"], "tcp.example.com:443");
    assert_eq!(public["ws_addr"], format!("ws://im.example.com:{ws_port}"));
    let (_, private) = s.get("/route?intranet=1").await;
    assert_eq!(private["ws_addr"], format!("ws://10.1.2.3:{ws_port}"));
    assert_eq!(private["tcp_addr"], format!("10.1.2.3:{}", s.addrs.tcp.unwrap().port()));

    // No loopback warning when the external host is set.
    let (_, version) = s.get("/api/version").await;
    assert_eq!(version["warnings"], json!([]), "{version}");
}

#[tokio::test]
async fn disabled_listener_is_empty() {
    let s = TestServer::with(|c| c.listeners.tcp.enabled = false).await;
    let (_, body) = s.get("/route").await;
    assert_eq!(body["tcp_addr"], "");
    assert!(body["ws_addr"].as_str().unwrap().starts_with("ws://"));
}

#[tokio::test]
async fn route_batch_groups_uids() {
    let s = TestServer::spawn().await;
    let (status, body) = s.post("/route/batch?intranet=0", r#"["u1","u2","u3"]"#).await;
    assert_eq!(status, 200);
    let groups = body.as_array().unwrap();
    assert_eq!(groups.len(), 1, "one node, one group: {body}");
    assert_eq!(groups[0]["uids"], json!(["u1", "u2", "u3"]));
    assert_eq!(groups[0]["tcp_addr"], s.addrs.tcp.unwrap().to_string());
    assert_eq!(groups[0]["ws_addr"], format!("ws://{}", s.addrs.ws.unwrap()));
    assert_eq!(groups[0]["wss_addr"], "");

    let (status, body) = s.post("/route/batch", "[]").await;
    assert_eq!((status, body), (200, json!([])));
}

#[tokio::test]
async fn route_batch_rejects_bad_bodies() {
    let s = TestServer::with(|c| c.route.batch_max_uids = 3).await;
    let cases = [
        ("not json", "invalid_body"),
        (r#"{"uids":["a"]}"#, "invalid_body"),
        (r#"["a", 2]"#, "invalid_body"),
        (r#"[null]"#, "invalid_body"),
        (r#"["a", ""]"#, "invalid_uid"),
        (r#"["a","b","c","d"]"#, "too_many_uids"),
    ];
    for (body, code) in cases {
        let (status, err) = s.post("/route/batch", body).await;
        assert_eq!((status, err["error"]["code"].as_str()), (400, Some(code)), "for {body}: {err}");
        assert!(err["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let (status, err) = s.post("/route/batch?intranet=yes", "[]").await;
    assert_eq!((status, err["error"]["code"].as_str()), (400, Some("invalid_parameter")));
}

#[tokio::test]
async fn version_reports_node_and_loopback_warning() {
    let s = TestServer::spawn().await;
    let (status, v) = s.get("/api/version").await;
    assert_eq!(status, 200);
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["node_id"], "test-node");
    assert_eq!(v["nodes"][0]["id"], "test-node");
    assert_eq!(v["nodes"][0]["ws_addr"], format!("ws://{}", s.addrs.ws.unwrap()));
    // The test node binds 127.0.0.1, so it advertises loopback to the outside: say so.
    let warnings: Vec<&str> = v["warnings"].as_array().unwrap().iter().map(|w| w.as_str().unwrap()).collect();
    assert!(!warnings.is_empty());
    assert!(warnings.iter().all(|w| w.contains("[node.external] host")), "{warnings:?}");
}

#[tokio::test]
async fn healthz() {
    let s = TestServer::spawn().await;
    let _c = s.ws("demo", "a").await;
    let (status, body) = s.get("/healthz").await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"status":"ok","connections":1}));
}

#[tokio::test]
async fn unknown_paths_and_methods_are_json_errors() {
    let s = TestServer::spawn().await;
    let (status, err) = s.get("/nope").await;
    assert_eq!((status, err["error"]["code"].as_str()), (404, Some("not_found")));
    let (status, err) = s.get("/api/v1/push").await;
    assert_eq!((status, err["error"]["code"].as_str()), (405, Some("method_not_allowed")));
    let (status, err) = s.post("/route", "").await;
    assert_eq!((status, err["error"]["code"].as_str()), (405, Some("method_not_allowed")));
}

#[tokio::test]
async fn push_reaches_every_connection_and_reports_per_recipient() {
    let s = TestServer::spawn().await;
    let mut bob_phone = s.ws("demo", "bob").await;
    let mut bob_laptop = s.tcp("demo", "bob").await;
    let mut carol = s.ws("demo", "carol").await;

    let (status, body) = s
        .push(
            "demo",
            json!({"app_key":"demo","send_to":["bob","carol","dan"],"message":{"title":"hello","n":[1,2]},"from":"ops"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["delivered"], 3);
    assert_eq!(
        body["results"],
        json!([
            {"uid":"bob","status":"delivered","connections":2},
            {"uid":"carol","status":"delivered","connections":1},
            {"uid":"dan","status":"offline","connections":0},
        ])
    );
    for msg in [bob_phone.recv().await, bob_laptop.recv().await, carol.recv().await] {
        assert_eq!(msg["type"], "message");
        assert_eq!(msg["from"], "ops");
        assert_eq!(msg["event"], 1);
        assert_eq!(msg["data"], json!({"title":"hello","n":[1,2]}));
        assert_eq!(msg["msg_id"], body["msg_id"]);
        assert_eq!(msg["send_at"], body["send_at"]);
    }

    // Single recipient as a string, through the alias path, without a sender.
    let raw =
        serde_json::to_vec(&json!({"app_key":"demo","send_to":"carol","message":"ping","nonce":"alias-1"})).unwrap();
    let ts = (switchboard::protocol::now_ms() / 1000).to_string();
    let sig = switchboard::auth::signature::sign(DEMO_SECRET.as_bytes(), &ts, "alias-1", &raw);
    let (status, body) = s.post_push("/api/v1/im/push", raw, &ts, &sig).await;
    assert_eq!(status, 200, "{body}");
    let msg = carol.recv().await;
    assert_eq!((msg["from"].as_str(), msg["data"].as_str()), (Some(""), Some("ping")));
}

#[tokio::test]
async fn wildcard_bind_advertises_a_real_interface() {
    let s = TestServer::with(|c| {
        c.listeners.ws.bind = "0.0.0.0:0".parse().unwrap();
        c.listeners.tcp.bind = "0.0.0.0:0".parse().unwrap();
    })
    .await;
    let (_, route) = s.get("/route").await;
    let ws = route["ws_addr"].as_str().unwrap();
    let host = ws.trim_start_matches("ws://").rsplit_once(':').unwrap().0;
    assert_ne!(host, "0.0.0.0", "an unspecified address is never advertised");
    let interfaces: Vec<String> = if_addrs::get_if_addrs()
        .unwrap()
        .into_iter()
        .filter(|i| !i.is_loopback() && i.ip().is_ipv4())
        .map(|i| i.ip().to_string())
        .collect();
    if interfaces.is_empty() {
        // No network interface at all: loopback is all there is, and the node warns.
        assert_eq!(host, "127.0.0.1");
    } else {
        assert!(interfaces.contains(&host.to_string()), "{host} is one of {interfaces:?}");
        let (_, version) = s.get("/api/version").await;
        let warnings = version["warnings"].as_array().unwrap();
        assert!(warnings.iter().all(|w| !w.as_str().unwrap().contains("ws_addr")), "{warnings:?}");
    }
}

#[tokio::test]
async fn cors_lets_listed_origins_call_the_api_from_browsers() {
    let get = |base: String, origin: &'static str| async move {
        reqwest::Client::new().get(format!("{base}/route?uid=alice")).header("origin", origin).send().await.unwrap()
    };
    // Off by default: browsers keep other origins' pages out.
    let s = TestServer::spawn().await;
    let resp = get(s.http(), "https://app.example").await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("access-control-allow-origin").is_none());

    let s = TestServer::with(|c| c.cors.allowed_origins = vec!["https://app.example".into()]).await;
    let resp = get(s.http(), "https://app.example").await;
    assert_eq!(resp.headers()["access-control-allow-origin"], "https://app.example");
    let resp = get(s.http(), "https://elsewhere.example").await;
    assert!(resp.headers().get("access-control-allow-origin").is_none());
    // The preflight a page sends before POSTing JSON to /route/batch.
    let preflight = reqwest::Client::new()
        .request(reqwest::Method::OPTIONS, format!("{}/route/batch", s.http()))
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type")
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status(), 200);
    assert_eq!(preflight.headers()["access-control-allow-origin"], "https://app.example");
    assert!(preflight.headers()["access-control-allow-methods"].to_str().unwrap().contains("POST"));

    let mut bad = base_config();
    bad.cors.allowed_origins = vec!["https://app.example/path".into(), "*".into()];
    let problems = bad.validate().unwrap_err();
    assert_eq!(problems.iter().filter(|p| p.key == "cors.allowed_origins").count(), 2, "{problems:?}");
    // Any web page could get development tokens from a developer's node.
    let mut open = base_config();
    open.cors.allowed_origins = vec!["*".into()];
    open.validate().unwrap();
    open.apps.get_mut("demo").unwrap().dev_tokens = true;
    let problems = open.validate().unwrap_err();
    assert!(problems[0].message.contains("dev_tokens"), "{problems:?}");
}

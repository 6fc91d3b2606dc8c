//! WebAssembly policy plugins in a real server, with real components built from plugins/:
//! authenticators, filters, routers, hostile plugins, reload.

mod common;

use std::time::Duration;

use common::*;
use futures_util::SinkExt as _;
use hmac::{Mac, SimpleHmac};
use serde_json::{Value, json};
use switchboard::config::{AppAuth, AuthMode, Config, FailurePolicy, PluginConfig, World};
use switchboard::plugin::{PluginSet, RouteNode, RouteUser};
use switchboard::{Server, StartError};

const ADMIN: &str = "admin-token-0123456789abcdef";
const HMAC_KEY: &str = "hmac-plugin-key-0123456789";

fn plugin(name: &str, file: &str, world: World, config: Value) -> PluginConfig {
    PluginConfig {
        name: name.into(),
        path: plugin_path(file),
        world,
        failure: None,
        deadline: None,
        memory_limit_mb: 32,
        pool_size: None,
        config: toml::Table::try_from(config).expect("plugin config is a table"),
    }
}

fn words() -> PluginConfig {
    plugin("words", "word-filter", World::MessageFilter, json!({"deny": ["spam"], "mask": ["darn"]}))
}

fn hostile(name: &str, world: World, mode: &str) -> PluginConfig {
    let mut p = plugin(name, "hostile", world, json!({"mode": mode}));
    p.memory_limit_mb = 16;
    p
}

fn app<'c>(c: &'c mut Config, id: &str) -> &'c mut switchboard::config::AppConfig {
    c.apps.get_mut(id).unwrap()
}

/// An hmac-auth token: `uid:expiry:region:hex(hmac(key, "uid:expiry:region"))`.
fn hmac_token(uid: &str, expiry: u64, region: &str, key: &str) -> String {
    let mut mac = SimpleHmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(format!("{uid}:{expiry}:{region}").as_bytes());
    format!("{uid}:{expiry}:{region}:{}", hex::encode(mac.finalize().into_bytes()))
}

fn in_an_hour() -> u64 {
    switchboard::protocol::now_ms() / 1000 + 3600
}

async fn admin_plugins(s: &TestServer) -> Value {
    let resp =
        reqwest::Client::new().get(format!("{}/admin/plugins", s.http())).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

fn metrics_of<'a>(m: &'a Value, plugin: &str, app: &str) -> &'a Value {
    m["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["plugin"] == plugin && x["app"] == app)
        .unwrap_or_else(|| panic!("no metrics for {plugin}/{app} in {m}"))
}

async fn reload(s: &TestServer) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(format!("{}/admin/plugins/reload", s.http()))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

// === authenticators ===

#[tokio::test]
async fn auth_plugin_accepts_and_rejects_with_its_reason() {
    let s = TestServer::with(|c| {
        c.plugins.push(plugin(
            "hmac",
            "hmac-auth",
            World::Authenticator,
            json!({"key": HMAC_KEY, "deny_uids": ["mallory"]}),
        ));
        app(c, "demo").auth = Some(AppAuth { plugin: "hmac".into(), mode: AuthMode::Replace });
        c.admin.token = Some(ADMIN.into());
    })
    .await;

    // The plugin's own token scheme gets in; a JWT does not (this app replaced it).
    let alice_token = hmac_token("alice", in_an_hour(), "eu", HMAC_KEY);
    let mut alice = WsClient::connect(&s.ws_url(&format!("app_id=demo&token={alice_token}"))).await;
    let hello = alice.recv().await;
    assert_eq!((hello["type"].as_str(), hello["uid"].as_str()), (Some("connected"), Some("alice")), "{hello}");

    let cases = [
        (hmac_token("bob", in_an_hour(), "", "a-different-key-0123456789"), "bad_signature"),
        (hmac_token("bob", 1_000, "", HMAC_KEY), "expired"),
        (hmac_token("mallory", in_an_hour(), "", HMAC_KEY), "banned"),
        (token("demo", "bob"), "malformed"),
    ];
    for (token, reason) in cases {
        let mut c = WsClient::connect(&s.ws_url(&format!("app_id=demo&token={token}"))).await;
        let (frames, code, close_reason) = c.expect_close().await;
        assert_eq!((code, close_reason.as_str()), (4001, "auth_rejected"));
        assert_eq!(frames[0]["code"], "auth_rejected");
        assert_eq!(frames[0]["reason"], reason, "{frames:?}");
    }

    // TCP goes through the same plugin.
    let mut tcp = TcpClient::connect(s.tcp_addr()).await;
    tcp.send_json(&json!({"type":"connect","app_id":"demo","token":hmac_token("carol", in_an_hour(), "us", HMAC_KEY)}))
        .await;
    assert_eq!(tcp.recv().await["uid"], "carol");

    // Another app keeps its built-in JWT check.
    let _ = s.ws("other", "dave").await;

    let m = admin_plugins(&s).await;
    let hm = metrics_of(&m, "hmac", "demo");
    assert_eq!(hm["calls"], 6, "{hm}");
    assert_eq!(hm["denials"], 4);
    assert_eq!(hm["world"], "authenticator");
}

#[tokio::test]
async fn auth_plugin_after_jwt_keeps_the_jwt_uid() {
    let s = TestServer::with(|c| {
        c.plugins.push(plugin(
            "hmac",
            "hmac-auth",
            World::Authenticator,
            json!({"key": HMAC_KEY, "deny_uids": ["mallory"]}),
        ));
        app(c, "demo").auth = Some(AppAuth { plugin: "hmac".into(), mode: AuthMode::AfterJwt });
    })
    .await;
    let _alice = s.ws("demo", "alice").await;
    // The JWT is checked first, with its own codes ...
    let mut bad = WsClient::connect(&s.ws_url(&format!("app_id=demo&token={}", token("other", "alice")))).await;
    assert_eq!(bad.expect_close().await.2, "token_signature");
    // ... then the plugin may still refuse.
    let mut banned = WsClient::connect(&s.ws_url(&format!("app_id=demo&token={}", token("demo", "mallory")))).await;
    let (frames, _, reason) = banned.expect_close().await;
    assert_eq!((reason.as_str(), frames[0]["reason"].as_str()), ("auth_rejected", Some("banned")));
}

// === filters ===

/// A server whose app `demo` runs the word filter, with the admin API.
async fn words_server() -> TestServer {
    TestServer::with(|c| {
        c.plugins.push(words());
        app(c, "demo").filters = vec!["words".into()];
        c.admin.token = Some(ADMIN.into());
    })
    .await
}

#[tokio::test]
async fn denied_message_never_reaches_the_recipient() {
    let s = words_server().await;
    let mut alice = s.ws("demo", "alice").await;
    let mut bob = s.tcp("demo", "bob").await;

    alice.send_json(&json!({"to":"bob","data":{"text":"buy SPAM now"},"client_id":"s1"})).await;
    let err = alice.recv().await;
    assert_eq!(err["type"], "error");
    assert_eq!(err["code"], "denied");
    assert_eq!(err["client_id"], "s1");
    assert!(err["message"].as_str().unwrap().contains("blocked word"), "{err}");

    // A JSON escape does not hide the word ("\u0053pam" is "Spam").
    let escaped = r#"{"to":"bob","data":{"text":"buy \u0053pam"},"client_id":"s2"}"#;
    alice.send(tokio_tungstenite::tungstenite::Message::Text(escaped.into())).await;
    let err = alice.recv().await;
    assert_eq!((err["code"].as_str(), err["client_id"].as_str()), (Some("denied"), Some("s2")), "{err}");

    // A clean message still flows, even with the words' first letters and an escape that
    // spells something else; the denied ones never arrive before it.
    let clean = r#"{"to":"bob","data":{"text":"so spa, Sp\u0061rta","s":"d"}}"#;
    alice.send(tokio_tungstenite::tungstenite::Message::Text(clean.into())).await;
    assert_eq!(alice.recv().await["type"], "ack");
    assert_eq!(bob.recv().await["data"], json!({"text":"so spa, Sparta","s":"d"}));
    alice.send_json(&json!({"to":"bob","data":{"text":"hello"}})).await;
    assert_eq!(alice.recv().await["type"], "ack");
    assert_eq!(bob.recv().await["data"], json!({"text":"hello"}));

    // Pushes are filtered too, per recipient.
    let (status, body) = s.push("demo", json!({"app_key":"demo","send_to":["bob"],"message":["spam"]})).await;
    assert_eq!(status, 200);
    assert_eq!(body["results"][0]["status"], "denied", "{body}");
    assert!(body["results"][0]["reason"].as_str().unwrap().contains("blocked word"));
    assert_eq!(body["delivered"], 0);
    let m = admin_plugins(&s).await;
    assert_eq!(metrics_of(&m, "words", "demo")["denials"], 3);
}

#[tokio::test]
async fn a_burst_of_sends_reaches_a_batch_filter_in_one_call() {
    // The word filter exports `batch-filter`: the frames a client writes at once are
    // filtered by one call, and each still gets its own verdict and reply, in order.
    let s = words_server().await;
    let mut alice = s.ws("demo", "alice").await;
    let mut bob = s.ws("demo", "bob").await;
    let texts = ["hello", "buy spam", "oh darn", "bye"];
    let frames: Vec<Value> =
        texts.iter().enumerate().map(|(i, t)| json!({"to":"bob","data":t,"client_id":format!("c{i}")})).collect();
    send_burst(&mut alice, &frames).await;
    let mut replies = Vec::new();
    for _ in 0..texts.len() {
        let r = alice.recv().await;
        replies.push(format!("{} {}", r["type"].as_str().unwrap(), r["client_id"].as_str().unwrap()));
    }
    assert_eq!(replies, ["ack c0", "error c1", "ack c2", "ack c3"]);
    for data in ["hello", "oh ****", "bye"] {
        assert_eq!(bob.recv().await["data"], data);
    }
    let m = admin_plugins(&s).await;
    let words = metrics_of(&m, "words", "demo");
    assert_eq!((words["calls"].as_u64(), words["denials"].as_u64()), (Some(1), Some(1)), "{words}");

    // A push to several users is one call for all of them, each with its own verdict.
    let (status, body) =
        s.push("demo", json!({"app_key":"demo","send_to":["bob","carol","dave"],"message":"darn"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"][0]["status"], "delivered", "{body}");
    assert_eq!(body["results"][1]["status"], "offline", "{body}");
    assert_eq!(bob.recv().await["data"], "****");
    let m = admin_plugins(&s).await;
    assert_eq!(metrics_of(&m, "words", "demo")["calls"], 2);

    // A push to many users is cut into calls of 16.
    let many: Vec<String> = (0..40).map(|i| format!("user{i}")).collect();
    let (status, body) = s.push("demo", json!({"app_key":"demo","send_to":many,"message":"hi"})).await;
    assert_eq!((status, body["results"].as_array().map(Vec::len)), (200, Some(40)), "{body}");
    let m = admin_plugins(&s).await;
    assert_eq!(metrics_of(&m, "words", "demo")["calls"], 2 + 3);

    // ... and into calls of at most 256 KiB of data: two 150 KiB messages are two calls.
    let big = "a".repeat(150 * 1024);
    let (status, body) = s.push("demo", json!({"app_key":"demo","send_to":["carol","dave"],"message":big})).await;
    let statuses: Vec<_> = body["results"].as_array().unwrap().iter().map(|r| r["status"].clone()).collect();
    assert_eq!((status, statuses), (200, vec![json!("offline"), json!("offline")]));
    let m = admin_plugins(&s).await;
    assert_eq!(metrics_of(&m, "words", "demo")["calls"], 2 + 3 + 2);
}

/// Writes `frames` to the connection in one write, so that the server reads them as one
/// burst.
async fn send_burst(client: &mut WsClient, frames: &[Value]) {
    for frame in frames {
        client.ws.feed(tokio_tungstenite::tungstenite::Message::Text(frame.to_string().into())).await.unwrap();
    }
    client.ws.flush().await.unwrap();
}

async fn batch_filter_server(mode: &str, failure: FailurePolicy) -> TestServer {
    let mut p = plugin("batch", "hostile-batch", World::MessageFilter, json!({"mode": mode}));
    p.failure = Some(failure);
    TestServer::with(move |c| {
        c.plugins.push(p);
        app(c, "demo").filters = vec!["batch".into()];
        c.admin.token = Some(ADMIN.into());
    })
    .await
}

#[tokio::test]
async fn a_batch_holds_a_run_of_sends_and_replies_keep_the_frames_order() {
    // `count` denies each message with its place in its batch: a ping between the sends
    // ends one run, and the replies come back in the order the frames were written.
    let s = batch_filter_server("count", FailurePolicy::FailClosed).await;
    let mut alice = s.ws("demo", "alice").await;
    let send = |i: usize| json!({"to":"bob","data":i,"client_id":format!("c{i}")});
    send_burst(&mut alice, &[send(0), send(1), json!({"type":"ping"}), send(2)]).await;
    let mut replies = Vec::new();
    for _ in 0..4 {
        let r = alice.recv().await;
        replies.push(format!("{} {} {}", r["type"], r["client_id"], r["message"]));
    }
    assert_eq!(
        replies,
        [r#""error" "c0" "1 of 2""#, r#""error" "c1" "2 of 2""#, r#""pong" null null"#, r#""error" "c2" "1 of 1""#]
    );
}

#[tokio::test]
async fn a_failed_batch_call_fails_its_burst_and_a_bad_verdict_only_its_message() {
    let three = |tag: &str| -> Vec<Value> {
        (0..3).map(|i| json!({"to":"bob","data":format!("{tag}{i}"),"client_id":format!("{tag}{i}")})).collect()
    };
    for (mode, failure, delivered) in [
        // The call traps ("boom" is in the burst): none of the three is delivered.
        ("trap-on-boom", FailurePolicy::FailClosed, vec![]),
        // ... or all three, when the filter fails open.
        ("trap-on-boom", FailurePolicy::FailOpen, vec!["boom0", "boom1", "boom2"]),
        // A list of verdicts one short: the call is invalid, for every message.
        ("short", FailurePolicy::FailClosed, vec![]),
        // One rewrite that is not JSON: only its message fails.
        ("garbage-first", FailurePolicy::FailClosed, vec!["garbage-first1", "garbage-first2"]),
    ] {
        let s = batch_filter_server(mode, failure).await;
        let mut alice = s.ws("demo", "alice").await;
        let mut bob = s.ws("demo", "bob").await;
        let tag = if mode == "trap-on-boom" { "boom" } else { mode };
        send_burst(&mut alice, &three(tag)).await;
        for i in 0..3 {
            let r = alice.recv().await;
            assert_eq!(r["client_id"], format!("{tag}{i}"), "mode {mode}: {r}");
            let expected = if delivered.contains(&&*format!("{tag}{i}")) { "ack" } else { "error" };
            assert_eq!(r["type"], expected, "mode {mode}: {r}");
            if expected == "error" {
                assert_eq!(r["code"], "filter_failed", "mode {mode}: {r}");
            }
        }
        for data in &delivered {
            assert_eq!(bob.recv().await["data"], *data, "mode {mode}");
        }
        bob.expect_silence(Duration::from_millis(50)).await;
        // One call for the burst, whatever became of it; then the plugin serves the next
        // message (a trapped instance is replaced), as its mode says.
        let m = admin_plugins(&s).await;
        assert_eq!(metrics_of(&m, "batch", "demo")["calls"], 1, "mode {mode}: {m}");
        alice.send_json(&json!({"to":"bob","data":"fine"})).await;
        let r = alice.recv().await;
        if matches!(mode, "short" | "garbage-first") {
            assert_eq!(r["code"], "filter_failed", "mode {mode}: {r}");
        } else {
            assert_eq!(r["type"], "ack", "mode {mode}: {r}");
            assert_eq!(bob.recv().await["data"], "fine");
        }
    }
}

#[tokio::test]
async fn rewritten_message_arrives_rewritten() {
    let s = TestServer::with(|c| {
        c.plugins.push(words());
        app(c, "demo").filters = vec!["words".into()];
    })
    .await;
    let mut alice = s.ws("demo", "alice").await;
    let mut bob = s.ws("demo", "bob").await;
    alice.send_json(&json!({"to":"bob","data":{"text":"oh darn it","n":[1,"Darn"]}})).await;
    assert_eq!(alice.recv().await["delivered"], 1);
    let msg = bob.recv().await;
    assert_eq!(msg["data"], json!({"text":"oh **** it","n":[1,"****"]}));

    let (_, body) = s.push("demo", json!({"app_key":"demo","send_to":"bob","message":"darn"})).await;
    assert_eq!(body["results"][0]["status"], "delivered");
    assert_eq!(bob.recv().await["data"], "****");
}

#[tokio::test]
async fn filters_run_in_order() {
    // The word filter masks, then a second filter (hostile "trap-on-boom") sees the
    // rewritten data: "boom" is not masked, so it traps; "darn" reaches it as "****".
    let s = TestServer::with(|c| {
        c.plugins.push(words());
        let mut second = hostile("second", World::MessageFilter, "trap-on-boom");
        second.failure = Some(FailurePolicy::FailClosed);
        c.plugins.push(second);
        app(c, "demo").filters = vec!["words".into(), "second".into()];
    })
    .await;
    let mut alice = s.ws("demo", "alice").await;
    let mut bob = s.ws("demo", "bob").await;
    alice.send_json(&json!({"to":"bob","data":"darn"})).await;
    assert_eq!(alice.recv().await["type"], "ack");
    assert_eq!(bob.recv().await["data"], "****");
    alice.send_json(&json!({"to":"bob","data":"boom"})).await;
    let err = alice.recv().await;
    assert_eq!(err["code"], "filter_failed", "{err}");
}

// === hostile plugins are contained ===

/// A server where app "demo" has a hostile filter in `mode` and app "other" has none.
async fn hostile_filter_server(mode: &str, failure: FailurePolicy) -> TestServer {
    let mode = mode.to_string();
    TestServer::with(move |c| {
        let mut p = hostile("hostile", World::MessageFilter, &mode);
        p.failure = Some(failure);
        // Short for the endless loop, which only the deadline ends. The rest get the longest
        // a filter may have: the memory hog must reach its limit first, and the others fail
        // for their own reason (a huge answer took 6.5 ms to refuse in a debug build on a
        // slow machine, past an earlier 5 ms deadline).
        p.deadline = Some(Duration::from_millis(if mode == "loop" { 5 } else { 100 }));
        c.plugins.push(p);
        app(c, "demo").filters = vec!["hostile".into()];
        c.admin.token = Some(ADMIN.into());
    })
    .await
}

async fn other_app_works(s: &TestServer) {
    let mut a = s.ws("other", &format!("o-{}", rand_hex())).await;
    let uid = format!("p-{}", rand_hex());
    let mut b = s.tcp("other", &uid).await;
    a.send_json(&json!({"to": uid, "data": "fine"})).await;
    assert_eq!(a.recv().await["delivered"], 1);
    assert_eq!(b.recv().await["data"], "fine");
}

#[tokio::test]
async fn hostile_filters_cost_only_their_own_messages() {
    for (mode, kind) in [
        ("loop", "deadline"),
        ("hog", "memory"),
        ("trap", "trap"),
        ("huge", "invalid_output"),
        ("garbage", "invalid_output"),
    ] {
        let s = hostile_filter_server(mode, FailurePolicy::FailClosed).await;
        let mut alice = s.ws("demo", "alice").await;
        let mut bob = s.ws("demo", "bob").await;
        for i in 0..3 {
            alice.send_json(&json!({"to":"bob","data":{"i":i},"client_id":format!("c{i}")})).await;
            let err = alice.recv().await;
            assert_eq!(err["code"], "filter_failed", "mode {mode}: {err}");
            assert!(err["message"].as_str().unwrap().contains(kind), "mode {mode}: {err}");
            // Meanwhile the other app is served normally.
            other_app_works(&s).await;
        }
        bob.expect_silence(Duration::from_millis(50)).await;
        // Pushes get the same policy, per recipient.
        let (status, body) = s.push("demo", json!({"app_key":"demo","send_to":"bob","message":1})).await;
        assert_eq!(
            (status, body["results"][0]["status"].as_str()),
            (200, Some("filter_failed")),
            "mode {mode}: {body}"
        );

        let m = admin_plugins(&s).await;
        let hm = metrics_of(&m, "hostile", "demo");
        assert_eq!(hm["errors"][kind], 4, "mode {mode}: {hm}");
        assert_eq!(hm["calls"], 4);
        let instantiations = hm["instantiations"].as_u64().unwrap();
        if mode == "garbage" {
            // A well-formed answer that fails validation: the instance is sound and reused.
            assert_eq!(instantiations, 1, "mode {mode}: {hm}");
        } else {
            // A trap, or an answer the host refused to read (over the call's data budget),
            // costs the instance: each failed call got a fresh one for the next.
            assert!(instantiations >= 4, "mode {mode}: {hm}");
        }
        s.assert_healthy_in("other").await;
    }
}

#[tokio::test]
async fn fail_open_filter_lets_messages_through() {
    let s = hostile_filter_server("loop", FailurePolicy::FailOpen).await;
    let mut alice = s.ws("demo", "alice").await;
    let mut bob = s.ws("demo", "bob").await;
    alice.send_json(&json!({"to":"bob","data":"still here"})).await;
    assert_eq!(alice.recv().await["delivered"], 1);
    assert_eq!(bob.recv().await["data"], "still here");
    let m = admin_plugins(&s).await;
    assert_eq!(metrics_of(&m, "hostile", "demo")["errors"]["deadline"], 1);
}

#[tokio::test]
async fn trapped_instance_is_replaced() {
    let s = hostile_filter_server("trap-on-boom", FailurePolicy::FailClosed).await;
    let mut alice = s.ws("demo", "alice").await;
    let mut bob = s.ws("demo", "bob").await;
    alice.send_json(&json!({"to":"bob","data":"boom"})).await;
    assert_eq!(alice.recv().await["code"], "filter_failed");
    for i in 0..5 {
        alice.send_json(&json!({"to":"bob","data":{"after":i}})).await;
        assert_eq!(alice.recv().await["delivered"], 1);
        assert_eq!(bob.recv().await["data"]["after"], i);
    }
    let m = admin_plugins(&s).await;
    let hm = metrics_of(&m, "hostile", "demo");
    assert_eq!((hm["errors"]["trap"].as_u64(), hm["calls"].as_u64()), (Some(1), Some(6)), "{hm}");
    // One instance at load, one to replace the trapped one; the rest reused the pool.
    assert_eq!(hm["instantiations"], 2, "{hm}");
    assert!(hm["latency_us"]["p50"].as_f64().unwrap() > 0.0);
}

#[tokio::test]
async fn hostile_authenticators_fail_closed() {
    for mode in ["loop", "hog", "trap", "garbage", "huge"] {
        let s = TestServer::with(|c| {
            let mut p = hostile("gate", World::Authenticator, mode);
            p.deadline = Some(Duration::from_millis(if mode == "hog" { 1000 } else { 20 }));
            c.plugins.push(p);
            app(c, "demo").auth = Some(AppAuth { plugin: "gate".into(), mode: AuthMode::Replace });
            c.admin.token = Some(ADMIN.into());
        })
        .await;
        let mut c = WsClient::connect(&s.ws_url("app_id=demo&token=anything")).await;
        let (frames, code, reason) = c.expect_close().await;
        assert_eq!((code, reason.as_str()), (1013, "auth_unavailable"), "mode {mode}: {frames:?}");
        let m = admin_plugins(&s).await;
        let expected = match mode {
            "loop" => "deadline",
            "hog" => "memory",
            "trap" => "trap",
            _ => "invalid_output",
        };
        assert_eq!(metrics_of(&m, "gate", "demo")["errors"][expected], 1, "mode {mode}: {m}");
        s.assert_healthy_in("other").await;
    }
}

#[tokio::test]
async fn failing_init_and_wrong_world_refuse_to_start() {
    let mut config = base_config();
    config.plugins.push(hostile("bad-init", World::MessageFilter, "fail-init"));
    config.apps.get_mut("demo").unwrap().filters = vec!["bad-init".into()];
    match Server::bind(config).await {
        Err(e @ StartError::Plugin(_)) => {
            let msg = e.to_string();
            assert!(msg.contains("bad-init") && msg.contains("demo") && msg.contains("refuses to start"), "{msg}");
        }
        other => panic!("expected a plugin error, got {other:?}"),
    }

    let mut config = base_config();
    config.plugins.push(plugin("words-as-auth", "word-filter", World::Authenticator, json!({})));
    config.apps.get_mut("demo").unwrap().auth =
        Some(AppAuth { plugin: "words-as-auth".into(), mode: AuthMode::Replace });
    match Server::bind(config).await {
        Err(e @ StartError::Plugin(_)) => {
            let msg = e.to_string();
            assert!(msg.contains("does not implement the authenticator world"), "{msg}");
            assert!(msg.contains("it exports: switchboard:policy/filter@0.1.0 (init, filter)"), "{msg}");
        }
        other => panic!("expected a plugin error, got {other:?}"),
    }
}

#[tokio::test]
async fn config_names_bad_plugin_references() {
    let mut config = base_config();
    config.plugins.push(words());
    config.plugins.push(hostile("gate", World::Authenticator, "allow"));
    config.plugins[1].failure = Some(FailurePolicy::FailOpen);
    let demo = config.apps.get_mut("demo").unwrap();
    demo.filters = vec!["nope".into(), "gate".into()];
    demo.router = Some("words".into());
    let problems: Vec<String> = config.validate().unwrap_err().iter().map(|p| p.to_string()).collect();
    let all = problems.join("\n");
    assert!(all.contains("plugins[1].failure: an authenticator fails closed"), "{all}");
    assert!(all.contains("apps.demo.filters[0]: no [[plugins]] entry is named \"nope\""), "{all}");
    assert!(
        all.contains("apps.demo.filters[1]: plugin \"gate\" is a authenticator plugin; this needs a message-filter"),
        "{all}"
    );
    assert!(all.contains("apps.demo.router: plugin \"words\" is a message-filter plugin"), "{all}");
}

// === routers ===

fn node(id: &str, region: &str, lat: f64, lon: f64, connections: u64, capacity: u64) -> RouteNode {
    RouteNode {
        id: id.into(),
        region: Some(region.into()),
        lat: Some(lat),
        lon: Some(lon),
        connections,
        capacity,
        draining: false,
    }
}

fn user(uid: &str) -> RouteUser {
    RouteUser { uid: uid.into(), ..RouteUser::default() }
}

fn load_set(plugins: Vec<PluginConfig>, router: &str) -> PluginSet {
    let mut config = base_config();
    config.plugins = plugins;
    config.apps.get_mut("demo").unwrap().router = Some(router.into());
    config.validate().unwrap();
    PluginSet::load(&config, 1).unwrap()
}

#[test]
fn geo_router_picks_the_nearest_live_node_with_ties_by_load() {
    let set = load_set(vec![plugin("geo", "geo-router", World::Router, json!({"tie_km": 100.0}))], "geo");
    let router = set.app("demo").router.clone().unwrap();
    let nodes = vec![
        node("paris-1", "eu", 48.86, 2.35, 900, 1000),
        node("paris-2", "eu", 48.85, 2.30, 100, 1000),
        node("nyc", "us", 40.71, -74.0, 0, 1000),
        node("tokyo", "ap", 35.68, 139.69, 0, 1000),
    ];
    let mut lyon = user("lyon");
    (lyon.lat, lyon.lon) = (Some(45.76), Some(4.84));
    let mut boston = user("boston");
    (boston.lat, boston.lon) = (Some(42.36), Some(-71.06));
    let mut near_paris = user("versailles");
    (near_paris.lat, near_paris.lon) = (Some(48.80), Some(2.13));
    let mut osaka_by_region = user("osaka");
    osaka_by_region.region = Some("ap".into());
    let nowhere = user("nowhere");

    let got = router.route("demo", &[lyon, boston, near_paris.clone(), osaka_by_region, nowhere], &nodes).unwrap();
    // Lyon is ~390 km from both Paris nodes (within the tie): the less loaded one wins.
    assert_eq!(got[0], 1);
    assert_eq!(got[1], 2, "Boston goes to New York");
    assert_eq!(got[2], 1, "Paris tie goes to the less loaded node");
    assert_eq!(got[3], 3, "region ap goes to Tokyo");
    assert!(got[4] == 2 || got[4] == 3, "no location: least loaded overall, got {}", got[4]);

    // A draining node is never chosen, even when nearest.
    let mut draining = nodes.clone();
    draining[1].draining = true;
    draining[0].draining = true;
    let got = router.route("demo", &[near_paris], &draining).unwrap();
    assert_ne!(got[0], 0);
    assert_ne!(got[0], 1);
}

#[test]
fn load_router_balances_a_batch_by_capacity() {
    let set = load_set(vec![plugin("load", "load-router", World::Router, json!({}))], "load");
    let router = set.app("demo").router.clone().unwrap();
    let mut nodes = vec![
        node("a", "eu", 0.0, 0.0, 50, 100), // half full
        node("b", "eu", 0.0, 0.0, 0, 200),  // empty, twice the capacity
        node("c", "eu", 0.0, 0.0, 0, 100),  // empty, but draining
    ];
    nodes[2].draining = true;
    let users: Vec<RouteUser> = (0..300).map(|i| user(&format!("u{i}"))).collect();
    let got = router.route("demo", &users, &nodes).unwrap();
    let on = |n: usize| got.iter().filter(|&&g| g == n).count();
    assert_eq!(on(2), 0, "draining node skipped");
    // Balanced relative to capacity: a ends with (50 + x)/100 ≈ b's (300 - x)/200.
    let (a, b) = (on(0), on(1));
    assert_eq!(a + b, 300);
    assert!((65..=68).contains(&a), "a got {a}, b got {b}");
}

#[test]
fn router_output_is_validated() {
    let set = load_set(vec![hostile("bad", World::Router, "garbage")], "bad");
    let router = set.app("demo").router.clone().unwrap();
    let nodes = vec![node("only", "eu", 0.0, 0.0, 0, 10)];
    let err = router.route("demo", &[user("u")], &nodes).unwrap_err();
    assert_eq!(err.kind.as_str(), "invalid_output");
    assert!(err.message.contains("node index 99999"), "{err}");
    // The gateway falls back to rendezvous hashing rather than failing the request.
    assert_eq!(switchboard::routing::assign(Some(&router), "demo", &[user("u")], &nodes), vec![0]);
}

#[tokio::test]
async fn route_batch_goes_through_the_apps_router() {
    let s = TestServer::with(|c| {
        c.plugins.push(plugin("load", "load-router", World::Router, json!({})));
        c.plugins.push(hostile("broken", World::Router, "garbage"));
        app(c, "demo").router = Some("load".into());
        app(c, "other").router = Some("broken".into());
        c.admin.token = Some(ADMIN.into());
    })
    .await;
    let (status, body) =
        s.post("/route/batch?app_id=demo", r#"["u1",{"uid":"u2","region":"eu","lat":48.8,"lon":2.3}]"#).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body[0]["uids"], json!(["u1", "u2"]));
    assert_eq!(body[0]["ws_addr"], format!("ws://{}", s.addrs.ws.unwrap()));
    // A broken router still gets an answer (rendezvous), and it is counted.
    let (status, body) = s.post("/route/batch?app_id=other", r#"["u1"]"#).await;
    assert_eq!((status, body[0]["uids"].clone()), (200, json!(["u1"])));
    let (status, _) = s.get("/route?app_id=other&uid=u1").await;
    assert_eq!(status, 200);
    let m = admin_plugins(&s).await;
    assert_eq!(metrics_of(&m, "load", "demo")["calls"], 1);
    assert_eq!(metrics_of(&m, "broken", "other")["errors"]["invalid_output"], 2);
    let (status, err) = s.post("/route/batch?app_id=nope", "[]").await;
    assert_eq!((status, err["error"]["code"].as_str()), (404, Some("unknown_app")));
}

// === reload ===

fn write_config(dir: &std::path::Path, filter_config: &str, wasm: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("config.toml");
    let text = format!(
        r#"[node]
id = "reload-node"
data_dir = "{data}"
[listeners.http]
bind = "127.0.0.1:0"
[listeners.tcp]
bind = "127.0.0.1:0"
[listeners.ws]
bind = "127.0.0.1:0"
[admin]
token = "{ADMIN}"
[[plugins]]
name = "words"
path = "{wasm}"
world = "message-filter"
[plugins.config]
{filter_config}
[apps.demo]
secret = "{DEMO_SECRET}"
filters = ["words"]
[apps.other]
secret = "{OTHER_SECRET}"
"#,
        data = test_data_dir().display(),
        wasm = wasm.display(),
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn reload_swaps_plugins_and_keeps_the_old_set_on_failure() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "deny = [\"spam\"]", &plugin_path("word-filter"));
    let s = TestServer::from_file(&cfg).await;
    let mut alice = s.ws("demo", "alice").await;
    let mut bob = s.ws("demo", "bob").await;
    let send = |word: &'static str| json!({"to":"bob","data":word});

    // Admin endpoints want the token.
    let resp = reqwest::Client::new().post(format!("{}/admin/plugins/reload", s.http())).send().await.unwrap();
    assert_eq!(resp.status(), 401);

    // A broken file: the reload is refused and says why; "spam" is still denied.
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"\0asm\x0d\0\x01\0garbage").unwrap();
    write_config(dir.path(), "deny = [\"ham\"]", &junk);
    let (status, err) = reload(&s).await;
    assert_eq!((status, err["error"]["code"].as_str()), (422, Some("reload_failed")), "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("junk.wasm"), "{err}");
    // A plugin whose init refuses its config: refused too.
    write_config(dir.path(), "unknown_key = 1", &plugin_path("word-filter"));
    let (status, err) = reload(&s).await;
    assert_eq!(status, 422);
    assert!(err["error"]["message"].as_str().unwrap().contains("unknown_key"), "{err}");
    alice.send_json(&send("spam")).await;
    assert_eq!(alice.recv().await["code"], "denied");

    // A good config: swapped in; now "ham" is denied and "spam" passes.
    write_config(dir.path(), "deny = [\"ham\"]", &plugin_path("word-filter"));
    let (status, body) = reload(&s).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["generation"], 2);
    alice.send_json(&send("ham")).await;
    assert_eq!(alice.recv().await["code"], "denied");
    alice.send_json(&send("spam")).await;
    assert_eq!(alice.recv().await["delivered"], 1);
    assert_eq!(bob.recv().await["data"], "spam");
}

#[tokio::test]
async fn reload_with_100_clients_connected_drops_none() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "mask = [\"darn\"]", &plugin_path("word-filter"));
    let s = TestServer::from_file(&cfg).await;
    let mut clients = Vec::new();
    for i in 0..100 {
        clients.push(s.ws("demo", &format!("u{i}")).await);
    }
    for generation in 2..=4 {
        let (status, body) = reload(&s).await;
        assert_eq!((status, body["generation"].as_u64()), (200, Some(generation)), "{body}");
    }
    assert_eq!(s.hub.connections(), 100);
    let uids: Vec<String> = (0..100).map(|i| format!("u{i}")).collect();
    let (status, body) = s.push("demo", json!({"app_key":"demo","send_to":uids,"message":"darn after reload"})).await;
    assert_eq!((status, body["delivered"].as_u64()), (200, Some(100)), "{body}");
    for c in &mut clients {
        let msg = c.recv().await;
        assert_eq!(msg["type"], "message", "no client was disconnected: {msg}");
        assert_eq!(msg["data"], "**** after reload");
    }
}

// === plugin check ===

#[test]
fn plugin_check_reports_worlds_and_loadability() {
    let run = |file: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args(["plugin", "check", "--json"])
            .arg(file)
            .output()
            .unwrap()
    };
    let out = run(&plugin_path("word-filter"));
    assert!(out.status.success());
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["worlds"], json!(["message-filter"]));
    assert_eq!(report["unloadable"], Value::Null);
    assert_eq!(
        report["exports"],
        json!([
            "switchboard:policy/filter@0.1.0 (init, filter)",
            "switchboard:policy/batch-filter@0.1.0 (init, filter-batch)"
        ])
    );

    let out = run(&plugin_path("hmac-auth"));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["worlds"], json!(["authenticator"]));
    assert_eq!(
        report["imports"],
        json!(["switchboard:policy/host@0.1.0 (log, wall-now-ms)", "switchboard:policy/types@0.1.0 (types only)"])
    );

    let out = run(&plugin_path("hostile"));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["worlds"], json!(["authenticator", "message-filter", "router"]));

    let out = run(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml").as_path());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a WebAssembly file"));
}

// === containment under concurrency, metadata, breaker ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looping_filter_does_not_stall_other_apps() {
    let s = hostile_filter_server("loop", FailurePolicy::FailClosed).await;
    let flood = {
        let mut alice = s.ws("demo", "alice").await;
        tokio::spawn(async move {
            let mut codes = Vec::new();
            for i in 0..40 {
                alice.send_json(&json!({"to":"bob","data":i})).await;
                codes.push(alice.recv().await["code"].as_str().unwrap().to_string());
            }
            codes
        })
    };
    // Meanwhile, round trips in another app.
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let started = tokio::time::Instant::now();
        other_app_works(&s).await;
        slowest = slowest.max(started.elapsed());
    }
    let codes = flood.await.unwrap();
    assert!(codes.iter().all(|c| c == "filter_failed"), "{codes:?}");
    // Generous: a stall would take the whole flood (40 × the deadline and more) or hang.
    assert!(slowest < Duration::from_secs(1), "slowest round trip in the other app: {slowest:?}");

    let m = admin_plugins(&s).await;
    let hm = metrics_of(&m, "hostile", "demo");
    let deadline = hm["errors"]["deadline"].as_u64().unwrap();
    let skipped = hm["errors"]["circuit_open"].as_u64().unwrap();
    assert!(deadline >= 5, "{hm}");
    assert!(skipped >= 1, "after 5 failures in a row the breaker stops calling the plugin: {hm}");
    assert_eq!(deadline + skipped, 40, "{hm}");
}

#[tokio::test]
async fn filters_see_the_authenticators_metadata() {
    let s = TestServer::with(|c| {
        c.plugins.push(plugin("hmac", "hmac-auth", World::Authenticator, json!({"key": HMAC_KEY})));
        c.plugins.push(hostile("echo", World::MessageFilter, "show-metadata"));
        app(c, "demo").auth = Some(AppAuth { plugin: "hmac".into(), mode: AuthMode::Replace });
        app(c, "demo").filters = vec!["echo".into()];
    })
    .await;
    let token = hmac_token("alice", in_an_hour(), "eu", HMAC_KEY);
    let mut alice = WsClient::connect(&s.ws_url(&format!("app_id=demo&token={token}"))).await;
    assert_eq!(alice.recv().await["type"], "connected");
    alice.send_json(&json!({"to":"bob","data":1})).await;
    let err = alice.recv().await;
    assert_eq!(err["code"], "denied");
    assert_eq!(err["message"], "metadata: auth=hmac-auth,region=eu");
}

#[tokio::test]
async fn a_plugin_cannot_flood_the_host_through_its_imports() {
    let s = hostile_filter_server("chatty", FailurePolicy::FailClosed).await;
    let mut alice = s.ws("demo", "alice").await;
    alice.send_json(&json!({"to":"bob","data":1})).await;
    let err = alice.recv().await;
    assert_eq!(err["code"], "filter_failed", "{err}");
    let m = admin_plugins(&s).await;
    assert_eq!(metrics_of(&m, "hostile", "demo")["errors"]["invalid_output"], 1);
    s.assert_healthy_in("other").await;
}

#[test]
fn a_looping_router_falls_back_to_rendezvous() {
    let mut router = hostile("spin", World::Router, "loop");
    router.deadline = Some(Duration::from_millis(5));
    let set = load_set(vec![router], "spin");
    let pool = set.app("demo").router.clone().unwrap();
    let nodes = vec![node("a", "eu", 0.0, 0.0, 0, 10), node("b", "eu", 0.0, 0.0, 0, 10)];
    let users: Vec<RouteUser> = (0..10).map(|i| user(&format!("u{i}"))).collect();
    let expected: Vec<usize> = users.iter().map(|u| switchboard::routing::rendezvous(&u.uid, &nodes)).collect();
    assert_eq!(switchboard::routing::assign(Some(&pool), "demo", &users, &nodes), expected);
    assert_eq!(pool.snapshot().errors["deadline"], 1);
}

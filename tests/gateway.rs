//! The gateway as a client sees it: connect, send, receive, devices, heartbeat, limits,
//! shutdown. Real server, real WebSocket and TCP clients.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn ws_to_tcp_direct_message_with_ack() {
    let s = TestServer::spawn().await;
    let mut alice = s.ws("demo", "alice").await;
    let mut bob = s.tcp("demo", "bob").await;

    alice.send_json(&json!({"type":"send","to":"bob","data":{"text":"hi bob"},"client_id":"c-1"})).await;
    let ack = alice.recv().await;
    assert_eq!(ack["type"], "ack");
    assert_eq!(ack["client_id"], "c-1");
    assert_eq!(ack["status"], "delivered");
    assert_eq!(ack["delivered"], 1);

    let msg = bob.recv().await;
    assert_eq!(msg["type"], "message");
    assert_eq!(msg["from"], "alice");
    assert_eq!(msg["to"], "bob");
    assert_eq!(msg["event"], 1);
    assert_eq!(msg["data"], json!({"text":"hi bob"}));
    assert_eq!(msg["msg_id"], ack["msg_id"]);
    let now = switchboard::protocol::now_ms();
    let send_at = msg["send_at"].as_u64().unwrap();
    assert!(send_at <= now && now - send_at < 10_000, "send_at is in milliseconds: {send_at}");
    let conv = msg["conversation_id"].as_str().unwrap();
    assert!(conv.starts_with("d:") && conv.len() == 34, "{conv}");

    // The reply travels the other way in the same conversation.
    bob.send_json(&json!({"to":"alice","data":"hello back"})).await;
    assert_eq!(bob.recv().await["type"], "ack");
    let reply = alice.recv().await;
    assert_eq!(reply["data"], "hello back");
    assert_eq!(reply["conversation_id"], conv);
}

/// A session reads the clock once per burst of frames it reads in one go: a message sent on
/// its own still carries the time its frame arrived, not one kept from an earlier burst,
/// and its id sorts after the last.
#[tokio::test]
async fn send_at_is_when_the_frame_was_read() {
    let s = TestServer::spawn().await;
    let mut alice = s.ws("demo", "alice").await;
    let mut bob = s.tcp("demo", "bob").await;
    let mut last: Option<(u64, String)> = None;
    for text in ["first", "second", "third"] {
        tokio::time::sleep(Duration::from_millis(30)).await;
        let before = switchboard::protocol::now_ms();
        alice.send_json(&json!({"to":"bob","data":text})).await;
        let msg = bob.recv().await;
        let after = switchboard::protocol::now_ms();
        assert_eq!(msg["data"], text);
        let send_at = msg["send_at"].as_u64().unwrap();
        assert!((before..=after).contains(&send_at), "{text}: send_at {send_at} outside {before}..={after}");
        let msg_id = msg["msg_id"].as_str().unwrap().to_string();
        if let Some((previous_at, previous_id)) = &last {
            assert!(send_at >= previous_at + 30, "{text}: {send_at} is less than 30 ms after {previous_at}");
            assert!(msg_id > *previous_id, "{text}: id {msg_id} does not sort after {previous_id}");
        }
        assert_eq!(alice.recv().await["msg_id"], msg_id.as_str());
        last = Some((send_at, msg_id));
    }
}

/// A session remembers its last recipient's conversation id; switching peers back and forth
/// must never reuse the wrong one.
#[tokio::test]
async fn conversation_ids_follow_the_recipient() {
    let s = TestServer::spawn().await;
    let mut alice = s.ws("demo", "alice").await;
    let mut bob = s.ws("demo", "bob").await;
    let mut carol = s.tcp("demo", "carol").await;
    for (to, text) in [("bob", "1"), ("bob", "2"), ("carol", "3"), ("bob", "4"), ("carol", "5")] {
        alice.send_json(&json!({"to": to, "data": text})).await;
        assert_eq!(alice.recv().await["status"], "delivered");
        let msg = if to == "bob" { bob.recv().await } else { carol.recv().await };
        assert_eq!(msg["data"], text);
        let expected = switchboard::protocol::conversation_id("demo", "alice", to);
        assert_eq!(msg["conversation_id"], expected.as_str(), "message {text} to {to}");
    }
    // The other way round, the same conversation.
    bob.send_json(&json!({"to": "alice", "data": "back"})).await;
    assert_eq!(alice.recv().await["conversation_id"], switchboard::protocol::conversation_id("demo", "bob", "alice"));
}

#[tokio::test]
async fn connected_frame_describes_the_session() {
    let s = TestServer::with(|c| {
        c.heartbeat.ping_interval = Duration::from_secs(7);
        c.heartbeat.idle_timeout = Duration::from_secs(20);
    })
    .await;
    let mut c = WsClient::connect(&s.ws_url(&format!("app_id=demo&token={}", token("demo", "zoe")))).await;
    let hello = c.recv().await;
    assert_eq!(hello["type"], "connected");
    assert_eq!(hello["uid"], "zoe");
    assert_eq!(hello["node_id"], "test-node");
    assert_eq!(hello["ping_interval_ms"], 7000);
    assert_eq!(hello["idle_timeout_ms"], 20000);
    assert!(hello["conn_id"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(hello.get("batch").is_none(), "batch is said only when asked for: {hello}");
}

/// The lines of one batched message, each parsed; a line never holds a raw newline.
fn lines_of(message: &[u8]) -> Vec<serde_json::Value> {
    message.split(|&b| b == b'\n').map(|line| serde_json::from_slice(line).unwrap()).collect()
}

/// Twenty sends with client ids, in one write.
fn burst(to: &str) -> Vec<Message> {
    (0..20)
        .map(|i| Message::Text(json!({"to": to, "data": {"n": i}, "client_id": format!("b{i}")}).to_string().into()))
        .collect()
}

/// With `batch=1` the frames the server writes in one go arrive as one WebSocket message,
/// a line each; a client that did not ask still gets one message per frame.
#[tokio::test]
async fn batched_frames_arrive_as_lines_of_one_message() {
    use futures_util::SinkExt as _;
    let s = TestServer::spawn().await;
    let mut alice =
        WsClient::connect(&s.ws_url(&format!("app_id=demo&token={}&batch=1", token("demo", "alice")))).await;
    let hello = alice.recv().await;
    assert_eq!((hello["type"].as_str(), &hello["batch"]), (Some("connected"), &json!(true)), "{hello}");
    let mut bob = s.ws("demo", "bob").await;

    for m in burst("bob") {
        alice.ws.feed(m).await.unwrap();
    }
    alice.ws.flush().await.unwrap();
    // The session answers what one read brought in with one write: the twenty acks come
    // as lines of one message, in order.
    let mut acks = Vec::new();
    let mut messages = 0;
    while acks.len() < 20 {
        let Some(Ok(Message::Text(text))) = alice.next_raw().await else { panic!("expected text") };
        messages += 1;
        acks.extend(lines_of(text.as_bytes()));
    }
    assert_eq!(messages, 1, "twenty acks in one message");
    for (i, ack) in acks.iter().enumerate() {
        assert_eq!((ack["type"].as_str(), ack["client_id"].as_str()), (Some("ack"), Some(&*format!("b{i}"))));
        assert_eq!(ack["status"], "delivered");
    }
    // Bob did not ask: one message per frame.
    for i in 0..20 {
        let Some(Ok(Message::Text(text))) = bob.next_raw().await else { panic!("expected text") };
        assert!(!text.contains('\n'));
        assert_eq!(serde_json::from_str::<serde_json::Value>(&text).unwrap()["data"]["n"], i);
    }

    // A newline the sender left between JSON tokens becomes a space; one escaped inside a
    // string stays as it was.
    bob.send(Message::Text("{\"to\":\"alice\",\"data\":{\n\"k\":\"v\\n\"}}".into())).await;
    assert_eq!(bob.recv().await["type"], "ack");
    let Some(Ok(Message::Text(text))) = alice.next_raw().await else { panic!("expected text") };
    assert_eq!(text.matches('\n').count(), 0, "{text}");
    assert!(text.contains(r#""data":{ "k":"v\n"}"#), "{text}");
    assert_eq!(lines_of(text.as_bytes())[0]["data"], json!({"k": "v\n"}));
}

/// Over TCP, `"batch": true` in the connect frame: the frames of one write share one
/// length-prefixed frame.
#[tokio::test]
async fn batched_frames_over_tcp_share_one_length_prefix() {
    use futures_util::{SinkExt, StreamExt as _};
    let s = TestServer::spawn().await;
    let mut carol = TcpClient::connect(s.tcp_addr()).await;
    carol.send_json(&json!({"type":"connect","app_id":"demo","token":token("demo", "carol"),"batch":true})).await;
    let hello = carol.recv().await;
    assert_eq!((hello["type"].as_str(), &hello["batch"]), (Some("connected"), &json!(true)), "{hello}");
    let _dave = s.ws("demo", "dave").await;

    for m in burst("dave") {
        carol.framed.feed(m.into_data()).await.unwrap();
    }
    SinkExt::<bytes::Bytes>::flush(&mut carol.framed).await.unwrap();
    let frame = tokio::time::timeout(WAIT, carol.framed.next()).await.unwrap().unwrap().unwrap();
    let acks = lines_of(&frame);
    assert_eq!(acks.len(), 20, "twenty acks in one frame");
    assert!(acks.iter().enumerate().all(|(i, a)| a["client_id"] == format!("b{i}") && a["status"] == "delivered"));
}

/// `batch` takes a boolean; anything else is refused with a stable code before the
/// session starts.
#[tokio::test]
async fn a_batch_that_is_not_a_boolean_is_refused() {
    let s = TestServer::spawn().await;
    let mut ws = WsClient::connect(&s.ws_url(&format!("app_id=demo&token={}&batch=yes", token("demo", "erin")))).await;
    let (frames, code, reason) = ws.expect_close().await;
    assert_eq!((frames[0]["code"].as_str(), frames[0]["fatal"].as_bool()), (Some("invalid_frame"), Some(true)));
    assert!(frames[0]["message"].as_str().unwrap().contains("batch"), "{}", frames[0]);
    assert_eq!((code, reason.as_str()), (1008, "invalid_frame"));

    let mut tcp = TcpClient::connect(s.tcp_addr()).await;
    tcp.send_json(&json!({"type":"connect","app_id":"demo","token":token("demo", "erin"),"batch":"yes"})).await;
    let frames = tcp.expect_eof().await;
    assert_eq!((frames[0]["code"].as_str(), frames[0]["fatal"].as_bool()), (Some("invalid_frame"), Some(true)));
    assert_eq!(s.sessions_of("demo", "erin"), 0);
    s.assert_healthy().await;
}

/// The upgrade response and the `connected` frame reach the client in one TCP segment: the
/// server holds the first until the second joins it, and writes them together (checked
/// next to `WsIo` too).
#[cfg(target_os = "linux")]
#[tokio::test]
async fn upgrade_response_and_connected_frame_arrive_in_one_segment() {
    let s = TestServer::spawn().await;
    let mut c = WsClient::connect(&s.ws_url(&format!("app_id=demo&token={}", token("demo", "una")))).await;
    assert_eq!(c.recv().await["type"], "connected");
    assert_eq!(data_segments_received(&c), 1);

    // A refusal too: the upgrade response, the error frame and the close frame together.
    let mut refused = WsClient::connect(&s.ws_url("app_id=demo&token=nope")).await;
    let (frames, _, reason) = refused.expect_close().await;
    assert_eq!((frames[0]["type"].as_str(), reason.as_str()), (Some("error"), frames[0]["code"].as_str().unwrap()));
    assert_eq!(data_segments_received(&refused), 1);
}

/// `tcpi_data_segs_in` of a plain WebSocket client's `TCP_INFO`: segments received that
/// carried data.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn data_segments_received(client: &WsClient) -> u32 {
    use std::os::fd::AsRawFd;
    let tokio_tungstenite::MaybeTlsStream::Plain(socket) = client.ws.get_ref() else { unreachable!("plain ws://") };
    // SAFETY: getsockopt writes at most `len` bytes into `info`, a plain C struct for which
    // all zeroes is a valid value, on a descriptor `socket` keeps open.
    unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let rc =
            libc::getsockopt(socket.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, (&raw mut info).cast(), &mut len);
        assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
        info.tcpi_data_segs_in
    }
}

#[tokio::test]
async fn every_device_of_a_user_receives() {
    let s = TestServer::spawn().await;
    let mut phone = s.ws("demo", "carol").await;
    let mut laptop = s.tcp("demo", "carol").await;
    let mut tab = s.ws("demo", "carol").await;
    let mut dave = s.ws("demo", "dave").await;

    dave.send_json(&json!({"to":"carol","data":{"n":1}})).await;
    let ack = dave.recv().await;
    assert_eq!(ack["delivered"], 3, "{ack}");
    let ids: Vec<_> = [phone.recv().await, laptop.recv().await, tab.recv().await]
        .into_iter()
        .map(|m| m["msg_id"].as_str().unwrap().to_string())
        .collect();
    assert!(ids.iter().all(|id| *id == ids[0]), "same message on every device: {ids:?}");

    // One device leaves; the others keep receiving.
    drop(tab);
    wait_until(|| s.sessions_of("demo", "carol") == 2).await;
    dave.send_json(&json!({"to":"carol","data":{"n":2}})).await;
    assert_eq!(dave.recv().await["delivered"], 2);
    assert_eq!(phone.recv().await["data"]["n"], 2);
    assert_eq!(laptop.recv().await["data"]["n"], 2);
}

#[tokio::test]
async fn offline_recipient_is_reported_not_faked() {
    let s = TestServer::spawn().await;
    let mut alice = s.ws("demo", "alice").await;
    alice.send_json(&json!({"to":"nobody-here","data":1,"client_id":"x"})).await;
    let ack = alice.recv().await;
    assert_eq!(ack["type"], "ack");
    assert_eq!(ack["status"], "offline");
    assert_eq!(ack["delivered"], 0);
    assert!(ack["msg_id"].as_str().is_some());
}

#[tokio::test]
async fn apps_are_isolated() {
    let s = TestServer::spawn().await;
    let mut alice = s.ws("demo", "alice").await;
    let mut bob_other = s.ws("other", "bob").await;

    // alice (demo) sends to "bob": the only bob online is in app "other".
    alice.send_json(&json!({"to":"bob","data":"secret"})).await;
    let ack = alice.recv().await;
    assert_eq!(ack["status"], "offline", "{ack}");
    bob_other.expect_silence(Duration::from_millis(300)).await;

    // A push to demo never reaches other's bob either.
    let (status, body) = s.push("demo", json!({"app_key":"demo","send_to":"bob","message":"x"})).await;
    assert_eq!(status, 200);
    assert_eq!(body["results"][0]["status"], "offline");
    bob_other.expect_silence(Duration::from_millis(200)).await;

    // Within app "other", bob is reachable.
    let mut carol_other = s.ws("other", "carol").await;
    carol_other.send_json(&json!({"to":"bob","data":"hi"})).await;
    assert_eq!(carol_other.recv().await["delivered"], 1);
    assert_eq!(bob_other.recv().await["data"], "hi");
    s.assert_healthy().await;
}

#[tokio::test]
async fn ping_pong_and_server_pings() {
    let s = TestServer::with(|c| {
        c.heartbeat.ping_interval = Duration::from_millis(150);
        c.heartbeat.idle_timeout = Duration::from_millis(2000);
    })
    .await;
    let mut tcp = s.tcp("demo", "t").await;
    tcp.send_json(&json!({"type":"ping"})).await;
    assert_eq!(tcp.recv().await, json!({"type":"pong"}));
    // The server pings a TCP client with a JSON frame.
    assert_eq!(tcp.recv_any().await, json!({"type":"ping"}));

    // ... and a WebSocket client with protocol pings.
    let mut ws = s.ws("demo", "w").await;
    let got_ping = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(Ok(Message::Ping(_))) = ws.next_raw().await {
                return;
            }
        }
    })
    .await;
    assert!(got_ping.is_ok(), "WS client receives protocol pings");
}

#[tokio::test]
async fn idle_connection_is_closed_but_an_answering_one_stays() {
    let s = TestServer::with(|c| {
        c.heartbeat.ping_interval = Duration::from_millis(250);
        c.heartbeat.idle_timeout = Duration::from_millis(1000);
    })
    .await;
    // A WS client that keeps reading answers pings automatically and stays.
    let mut ws = s.ws("demo", "reader").await;
    ws.expect_silence(Duration::from_millis(2500)).await;
    assert_eq!(s.sessions_of("demo", "reader"), 1);

    // A TCP client that answers pings with pongs stays...
    let mut tcp = s.tcp("demo", "answering").await;
    let until = tokio::time::Instant::now() + Duration::from_millis(2500);
    while tokio::time::Instant::now() < until {
        let f = tcp.recv_any().await;
        assert_eq!(f["type"], "ping", "{f}");
        tcp.send_json(&json!({"type":"pong"})).await;
    }
    assert_eq!(s.sessions_of("demo", "answering"), 1);

    // ... until it stops answering.
    let frames = tcp.expect_eof().await;
    let last = frames.last().expect("an error frame before the close");
    assert_eq!(last["code"], "idle_timeout", "{frames:?}");
    assert_eq!(last["fatal"], true);
    s.assert_healthy().await;
}

#[tokio::test]
async fn rate_limit_drops_frames_and_keeps_the_connection() {
    let s = TestServer::with(|c| {
        c.limits.messages_per_second = 1;
        c.limits.message_burst = 2;
    })
    .await;
    let mut a = s.ws("demo", "spammer").await;
    for i in 0..5 {
        a.send_json(&json!({"to":"x","data":i,"client_id":format!("m{i}")})).await;
    }
    // The burst of two passes; of the next three (sent well within a second, so at most
    // one token can have refilled) at least two are refused.
    assert_eq!(a.recv().await["type"], "ack");
    assert_eq!(a.recv().await["type"], "ack");
    let mut limited = Vec::new();
    for _ in 0..3 {
        let f = a.recv().await;
        if f["type"] == "error" {
            assert_eq!(f["code"], "rate_limited", "{f}");
            assert!(f.get("fatal").is_none());
            limited.push(f["client_id"].as_str().unwrap().to_string());
        }
    }
    assert!(limited.len() >= 2, "{limited:?}");
    assert!(limited.iter().all(|id| ["m2", "m3", "m4"].contains(&id.as_str())), "client_id echoed: {limited:?}");
    // The connection is still usable.
    a.send_json(&json!({"type":"ping"})).await;
    assert_eq!(a.recv().await["type"], "pong");
}

#[tokio::test]
async fn send_without_ack_is_delivered_and_only_refusals_are_answered() {
    let s = TestServer::with(|c| {
        c.limits.messages_per_second = 1;
        c.limits.message_burst = 2;
    })
    .await;
    let mut alice = s.ws("demo", "alice").await;
    let mut bob = s.ws("demo", "bob").await;
    for i in 0..3 {
        alice.send_json(&json!({"to":"bob","data":i,"client_id":format!("m{i}"),"ack":false})).await;
    }
    assert_eq!(bob.recv().await["data"], 0);
    assert_eq!(bob.recv().await["data"], 1);
    // The two accepted messages got no ack; the third, over the rate, is refused out loud.
    let refused = alice.recv().await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["code"], "rate_limited");
    assert_eq!(refused["client_id"], "m2");
    alice.send_json(&json!({"type":"ping"})).await;
    assert_eq!(alice.recv().await["type"], "pong", "nothing else was queued before the pong");

    // `ack` must be a boolean.
    alice.send_json(&json!({"to":"bob","data":1,"ack":"no"})).await;
    let bad = alice.recv().await;
    assert_eq!(bad["code"], "invalid_frame", "{bad}");
}

#[tokio::test]
async fn connection_limits() {
    let s = TestServer::with(|c| {
        c.limits.max_connections = 3;
        c.limits.max_connections_per_user = 2;
    })
    .await;
    let _a1 = s.ws("demo", "a").await;
    let _a2 = s.ws("demo", "a").await;

    // A third device of the same user is refused.
    let mut a3 = WsClient::connect(&s.ws_url(&format!("app_id=demo&token={}", token("demo", "a")))).await;
    let (frames, code, reason) = a3.expect_close().await;
    assert_eq!((code, reason.as_str()), (1013, "too_many_devices"));
    assert_eq!(frames[0]["code"], "too_many_devices");
    drop(a3);
    wait_until(|| s.hub.connections() == 2).await;

    let _b = s.tcp("demo", "b").await;
    // The node is full: a WebSocket upgrade gets 503 and a JSON body ...
    let url = s.ws_url(&format!("app_id=demo&token={}", token("demo", "c")));
    match tokio_tungstenite::connect_async(&url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 503);
            let body: serde_json::Value = serde_json::from_slice(resp.body().as_deref().unwrap()).unwrap();
            assert_eq!(body["error"]["code"], "too_many_connections");
        }
        other => panic!("expected HTTP 503, got {:?}", other.map(|_| ())),
    }
    // ... and a TCP client an error frame.
    let mut c = TcpClient::connect(s.tcp_addr()).await;
    let frames = c.expect_eof().await;
    assert_eq!(frames[0]["code"], "too_many_connections");
}

#[tokio::test]
async fn wrong_path_is_404_before_upgrade() {
    let s = TestServer::spawn().await;
    let url = format!("ws://{}/nope", s.addrs.ws.unwrap());
    match tokio_tungstenite::connect_async(&url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 404),
        other => panic!("expected HTTP 404, got {:?}", other.map(|_| ())),
    }
    s.assert_healthy().await;
}

#[tokio::test]
async fn graceful_shutdown_tells_clients_to_reconnect() {
    let s = TestServer::spawn().await;
    let mut ws = s.ws("demo", "alice").await;
    let mut tcp = s.tcp("demo", "bob").await;
    // A client that never reads nor closes keeps its session in its goodbye for a while.
    let _stuck = s.tcp("demo", "stuck").await;
    // A message queued for alice before the shutdown is still delivered.
    let (status, _) = s.push("demo", json!({"app_key":"demo","send_to":"alice","message":"last words"})).await;
    assert_eq!(status, 200);

    let (ws_addr, http) = (s.addrs.ws.unwrap(), s.http());
    let stopped = s.begin_shutdown();

    // While clients drain, the API stays up and health says so.
    let draining = tokio::time::timeout(WAIT, async {
        loop {
            let resp = reqwest::get(format!("{http}/healthz")).await.unwrap();
            if resp.status() == 503 {
                return resp.json::<serde_json::Value>().await.unwrap();
            }
        }
    })
    .await
    .expect("healthz turns 503 during the drain");
    assert_eq!(draining["status"], "shutting_down");

    let (frames, code, reason) = ws.expect_close().await;
    assert_eq!(frames[0]["data"], "last words", "{frames:?}");
    assert_eq!(frames[1]["type"], "reconnect", "{frames:?}");
    assert_eq!(frames[1]["reason"], "server_shutdown");
    assert!(frames[1]["delay_ms"].as_u64().unwrap() < 1000, "delay is below shutdown.reconnect_jitter");
    assert_eq!((code, reason.as_str()), (1001, "server_shutdown"));

    let frames = tcp.expect_eof().await;
    assert_eq!(frames[0]["type"], "reconnect", "{frames:?}");
    assert_eq!(frames[1]["code"], "server_shutdown");

    stopped.await.unwrap();
    // Nothing listens any more.
    assert!(tokio::net::TcpStream::connect(ws_addr).await.is_err());
    assert!(reqwest::get(format!("{http}/healthz")).await.is_err());
}

#[tokio::test]
async fn slow_reader_is_disconnected_and_never_stalls_others() {
    let s = TestServer::with(|c| {
        c.limits.outbound_queue = 8;
        c.limits.messages_per_second = 1_000_000;
        c.limits.message_burst = 1_000_000;
        // Only the full queue may trigger the disconnect in this test.
        c.limits.write_timeout = Duration::from_secs(60);
    })
    .await;

    // "slow" connects over TCP with a tiny receive buffer and then never reads.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(s.tcp_addr()).await.unwrap();
    let mut slow = TcpClient::from_stream(stream);
    slow.send_json(&json!({"type":"connect","app_id":"demo","token":token("demo","slow")})).await;
    assert_eq!(slow.recv().await["type"], "connected");

    let mut flooder = s.ws("demo", "flooder").await;
    let mut carol = s.ws("demo", "carol").await;
    let mut dave = s.ws("demo", "dave").await;

    let big = "x".repeat(32 * 1024);
    let mut statuses = Vec::new();
    for i in 0..2000 {
        flooder.send_json(&json!({"to":"slow","data":big})).await;
        let ack = flooder.recv().await;
        statuses.push(ack["status"].as_str().unwrap().to_string());
        // Other users' traffic flows normally the whole time, before and after "slow"
        // is stuck (a stall would time this out).
        carol.send_json(&json!({"to":"dave","data":{"i":i}})).await;
        assert_eq!(carol.recv().await["delivered"], 1);
        assert_eq!(dave.recv().await["data"]["i"], i);
        if ack["status"] == "dropped" {
            assert_eq!((ack["delivered"].as_u64(), ack["dropped"].as_u64()), (Some(0), Some(1)), "{ack}");
        }
        if ack["status"] == "offline" {
            break;
        }
    }
    let first_dropped = statuses.iter().position(|s| s == "dropped").expect("a full queue is reported as dropped");
    assert!(statuses[..first_dropped].iter().all(|s| s == "delivered"), "{statuses:?}");
    assert_eq!(statuses.last().unwrap(), "offline", "then the slow reader is gone: {statuses:?}");
    assert_eq!(s.sessions_of("demo", "slow"), 0);

    // What "slow" finally reads ends with the connection closed.
    let _ = slow.expect_eof().await;
    s.assert_healthy().await;

    // Operators see it in the metrics.
    let slow_series = r#"switchboard_slow_consumer_disconnects_total{app="demo"}"#;
    let text = scrape_until(&s.http(), |t| sample(t, slow_series) == Some(1.0)).await;
    assert_eq!(sample(&text, r#"switchboard_disconnects_total{app="demo",reason="slow_consumer"}"#), Some(1.0));
    let dropped = sample(&text, r#"switchboard_messages_dropped_total{app="demo"}"#).unwrap();
    assert_eq!(dropped, statuses.iter().filter(|s| *s == "dropped").count() as f64, "{text}");
}

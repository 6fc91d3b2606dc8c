//! Bad input gets a clear error with a stable code, and nothing else breaks: after each
//! case a second, well-behaved pair of clients on the same server still works.

mod common;

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use common::*;
use futures_util::SinkExt;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{CloseFrame, Frame};

#[tokio::test]
async fn malformed_json_is_answered_and_the_connection_stays() {
    let s = TestServer::spawn().await;
    let mut c = s.ws("demo", "alice").await;
    c.send(Message::Text("{\"to\": \"bob\", ".into())).await;
    let err = c.recv().await;
    assert_eq!(err["type"], "error");
    assert_eq!(err["code"], "invalid_json", "{err}");
    assert!(err.get("fatal").is_none());
    c.send_json(&json!({"type":"ping"})).await;
    assert_eq!(c.recv().await["type"], "pong", "the connection is still usable");
    s.assert_healthy().await;
}

#[tokio::test]
async fn wrong_field_types_and_shapes() {
    let s = TestServer::spawn().await;
    let mut c = s.tcp("demo", "alice").await;
    let cases = [
        (json!({"to": 42, "data": 1}), "invalid_frame"),
        (json!({"type":"send","to":"bob","data":1,"client_id": 7}), "invalid_frame"),
        (json!(["not", "an", "object"]), "invalid_frame"),
        (json!({"type":"send","to":"bob"}), "invalid_frame"),
        (json!({"type":"send","to":"","data":1}), "invalid_recipient"),
        (json!({"type":"send","to":"x".repeat(129),"data":1}), "invalid_recipient"),
        (json!({"type":"teleport"}), "unknown_type"),
        (json!({"type":"connect","app_id":"demo","token":"t"}), "already_connected"),
    ];
    for (frame, code) in cases {
        c.send_json(&frame).await;
        let err = c.recv().await;
        assert_eq!((err["type"].as_str(), err["code"].as_str()), (Some("error"), Some(code)), "for {frame}: {err}");
    }
    // The client_id is echoed when the frame had a readable one.
    c.send_json(&json!({"type":"send","to":"","data":1,"client_id":"c-9"})).await;
    assert_eq!(c.recv().await["client_id"], "c-9");
    s.assert_healthy().await;
}

#[tokio::test]
async fn ws_frame_over_the_limit_closes_with_1009() {
    let s = TestServer::with(|c| c.limits.max_frame_bytes = 1024).await;
    let mut c = s.ws("demo", "alice").await;
    let big = json!({"to":"bob","data":"x".repeat(2000)}).to_string();
    c.send(Message::Text(big.into())).await;
    let (frames, code, reason) = c.expect_close().await;
    assert_eq!((code, reason.as_str()), (1009, "frame_too_large"));
    assert_eq!(frames[0]["code"], "frame_too_large");
    assert_eq!(frames[0]["fatal"], true);
    s.assert_healthy().await;
}

#[tokio::test]
async fn invalid_utf8_in_a_text_frame_closes_with_1007() {
    let s = TestServer::spawn().await;
    let mut c = s.ws("demo", "alice").await;
    let raw = Frame::message(Bytes::from_static(b"{\"to\":\"b\xff\xfe\"}"), OpCode::Data(Data::Text), true);
    c.send(Message::Frame(raw)).await;
    let (frames, code, reason) = c.expect_close().await;
    assert_eq!((code, reason.as_str()), (1007, "invalid_utf8"));
    assert_eq!(frames[0]["code"], "invalid_utf8");
    s.assert_healthy().await;
}

/// Frames a server must refuse (RFC 6455, section 5), written raw under the client's
/// WebSocket: an error frame, then a 1002 close.
#[tokio::test]
async fn ws_frames_that_break_the_protocol_close_with_1002() {
    let s = TestServer::spawn().await;
    let masked = |b0: u8, payload: &[u8]| {
        let mut f = vec![b0, 0x80 | payload.len() as u8, 1, 2, 3, 4];
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ [1, 2, 3, 4][i % 4]));
        f
    };
    let cases: [(&str, Vec<u8>); 5] = [
        ("unmasked", b"\x81\x02{}".to_vec()),
        ("reserved bit", masked(0x81 | 0x40, b"{}")),
        ("unknown opcode", masked(0x83, b"")),
        ("continuation of nothing", masked(0x80, b"{}")),
        ("fragmented ping", masked(0x09, b"")),
    ];
    for (case, raw) in cases {
        let mut c = s.ws("demo", "alice").await;
        c.ws.get_mut().write_all(&raw).await.unwrap();
        let (frames, code, reason) = c.expect_close().await;
        assert_eq!((code, reason.as_str()), (1002, "protocol_error"), "{case}");
        assert_eq!(frames[0]["code"], "protocol_error", "{case}: {frames:?}");
    }
    s.assert_healthy().await;
}

/// A ping is answered with its payload, a message may come in fragments with control
/// frames between them, and a client's close is answered with its code.
#[tokio::test]
async fn ws_pings_fragments_and_the_clients_close() {
    let s = TestServer::spawn().await;
    let mut c = s.ws("demo", "alice").await;
    c.send(Message::Ping(Bytes::from_static(b"are you there"))).await;
    assert_eq!(c.next_raw().await.unwrap().unwrap(), Message::Pong(Bytes::from_static(b"are you there")));

    let part =
        |payload: &'static [u8], opcode, fin| Message::Frame(Frame::message(Bytes::from_static(payload), opcode, fin));
    c.send(part(b"{\"type\":", OpCode::Data(Data::Text), false)).await;
    c.send(Message::Ping(Bytes::new())).await;
    c.send(part(b"\"pi", OpCode::Data(Data::Continue), false)).await;
    c.send(part(b"ng\"}", OpCode::Data(Data::Continue), true)).await;
    assert_eq!(c.recv().await["type"], "pong", "the three fragments made one ping frame");

    c.ws.close(Some(CloseFrame { code: CloseCode::Away, reason: "bye".into() })).await.unwrap();
    match c.next_raw().await {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Away),
        other => panic!("expected the close reply, got {other:?}"),
    }
    assert!(matches!(c.next_raw().await, None | Some(Err(_))), "then the server hangs up");
    s.assert_healthy().await;
}

#[tokio::test]
async fn binary_frame_is_refused_and_the_connection_stays() {
    let s = TestServer::spawn().await;
    let mut c = s.ws("demo", "alice").await;
    c.send(Message::Binary(Bytes::from_static(b"\x00\x01"))).await;
    let err = c.recv().await;
    assert_eq!(err["code"], "binary_unsupported", "{err}");
    assert!(err.get("fatal").is_none());
    c.send_json(&json!({"type":"ping"})).await;
    assert_eq!(c.recv().await["type"], "pong");
    s.assert_healthy().await;
}

#[tokio::test]
async fn tcp_length_prefix_over_the_limit() {
    let s = TestServer::with(|c| c.limits.max_frame_bytes = 1024).await;
    // Before connect ...
    let mut raw = tokio::net::TcpStream::connect(s.tcp_addr()).await.unwrap();
    raw.write_all(&(10_000_000u32).to_be_bytes()).await.unwrap();
    raw.write_all(&[b'{'; 512]).await.unwrap();
    let mut c = TcpClient::from_stream(raw);
    let frames = c.expect_eof().await;
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_eq!(frames[0]["code"], "frame_too_large");
    assert_eq!(frames[0]["fatal"], true);

    // ... and after.
    let mut c = s.tcp("demo", "alice").await;
    c.framed.get_mut().write_all(&(2048u32).to_be_bytes()).await.unwrap();
    c.framed.get_mut().write_all(&[b' '; 2048]).await.unwrap();
    let frames = c.expect_eof().await;
    assert_eq!(frames.last().unwrap()["code"], "frame_too_large", "{frames:?}");
    s.assert_healthy().await;
}

#[tokio::test]
async fn tcp_client_that_never_sends_connect() {
    let s = TestServer::with(|c| c.limits.connect_timeout = Duration::from_millis(300)).await;
    let started = tokio::time::Instant::now();
    let mut silent = TcpClient::connect(s.tcp_addr()).await;
    let frames = silent.expect_eof().await;
    assert_eq!(frames[0]["code"], "connect_timeout", "{frames:?}");
    assert!(started.elapsed() >= Duration::from_millis(300));

    // A first frame that is not `connect` is refused at once.
    let mut eager = TcpClient::connect(s.tcp_addr()).await;
    eager.send_json(&json!({"to":"bob","data":1})).await;
    assert_eq!(eager.expect_eof().await[0]["code"], "connect_required");

    // A connect frame without a token.
    let mut tokenless = TcpClient::connect(s.tcp_addr()).await;
    tokenless.send_json(&json!({"type":"connect","app_id":"demo"})).await;
    assert_eq!(tokenless.expect_eof().await[0]["code"], "token_missing");
    s.assert_healthy().await;
}

fn forged(header: &str, claims: &serde_json::Value, secret: &[u8]) -> String {
    use hmac::{Mac, SimpleHmac};
    let input = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(claims.to_string()));
    let mut mac = SimpleHmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
    mac.update(input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()))
}

/// Connects over WS with `query` and returns the close code, reason and error frame code.
async fn ws_refusal(s: &TestServer, query: &str) -> (u16, String, String) {
    let mut c = WsClient::connect(&s.ws_url(query)).await;
    let (frames, code, reason) = c.expect_close().await;
    assert_eq!(frames.len(), 1, "one error frame before the close: {frames:?}");
    assert_eq!(frames[0]["fatal"], true);
    (code, reason, frames[0]["code"].as_str().unwrap().to_string())
}

#[tokio::test]
async fn bad_tokens_and_apps_are_rejected_with_reasons() {
    let s = TestServer::spawn().await;
    let now = switchboard::protocol::now_ms() / 1000;
    let good_claims = json!({"sub":"mallory","exp": now + 600});
    let cases = [
        (format!("app_id=nope&token={}", token("demo", "mallory")), "unknown_app"),
        (format!("token={}", token("demo", "mallory")), "unknown_app"),
        ("app_id=demo".to_string(), "token_missing"),
        ("app_id=demo&token=abc.def".to_string(), "token_malformed"),
        (format!("app_id=demo&token={}", token("other", "mallory")), "token_signature"),
        (
            format!("app_id=demo&token={}", forged(r#"{"alg":"HS256"}"#, &good_claims, b"guessed-secret")),
            "token_signature",
        ),
        (
            format!(
                "app_id=demo&token={}",
                forged(r#"{"alg":"HS256"}"#, &json!({"sub":"mallory","exp": now - 3600}), DEMO_SECRET.as_bytes())
            ),
            "token_expired",
        ),
        (
            format!(
                "app_id=demo&token={}.{}.",
                URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
                URL_SAFE_NO_PAD.encode(good_claims.to_string())
            ),
            "token_algorithm",
        ),
        (
            format!(
                "app_id=demo&token={}",
                forged(r#"{"alg":"HS256"}"#, &json!({"exp": now + 600}), DEMO_SECRET.as_bytes())
            ),
            "token_claims",
        ),
    ];
    for (query, expected) in cases {
        let (code, reason, frame_code) = ws_refusal(&s, &query).await;
        assert_eq!((code, reason.as_str(), frame_code.as_str()), (4001, expected, expected), "query {query}");
    }

    // The same over TCP: an error frame, then the connection closes.
    let mut c = TcpClient::connect(s.tcp_addr()).await;
    c.send_json(&json!({"type":"connect","app_id":"demo","token":token("other","mallory")})).await;
    let frames = c.expect_eof().await;
    assert_eq!(frames[0]["code"], "token_signature");
    s.assert_healthy().await;
}

#[tokio::test]
async fn push_with_bad_signature_stale_timestamp_and_replayed_nonce() {
    let s = TestServer::spawn().await;
    let mut bob = s.ws("demo", "bob").await;
    let body = json!({"app_key":"demo","send_to":"bob","message":{"t":1},"nonce":"nonce-1"});
    let raw = serde_json::to_vec(&body).unwrap();
    let now = switchboard::protocol::now_ms() / 1000;
    let signed = raw.clone();
    let sign = |ts: u64, secret: &str| {
        switchboard::auth::signature::sign(secret.as_bytes(), &ts.to_string(), "nonce-1", &signed)
    };

    // Wrong secret.
    let (status, err) = s.post_push("/api/v1/push", raw.clone(), &now.to_string(), &sign(now, OTHER_SECRET)).await;
    assert_eq!((status, err["error"]["code"].as_str()), (401, Some("signature_invalid")), "{err}");
    // Body changed after signing.
    let tampered =
        serde_json::to_vec(&json!({"app_key":"demo","send_to":"eve","message":{"t":1},"nonce":"nonce-1"})).unwrap();
    let (status, err) = s.post_push("/api/v1/push", tampered, &now.to_string(), &sign(now, DEMO_SECRET)).await;
    assert_eq!((status, err["error"]["code"].as_str()), (401, Some("signature_invalid")));
    // Stale (and far-future) timestamps, correctly signed: well outside the 300 s window.
    for ts in [now - 310, now + 310] {
        let (status, err) = s.post_push("/api/v1/push", raw.clone(), &ts.to_string(), &sign(ts, DEMO_SECRET)).await;
        assert_eq!((status, err["error"]["code"].as_str()), (401, Some("timestamp_stale")), "ts {ts}");
    }
    // Missing or garbled headers.
    let (status, err) = s.post_push("/api/v1/push", raw.clone(), "yesterday", &sign(now, DEMO_SECRET)).await;
    assert_eq!((status, err["error"]["code"].as_str()), (401, Some("timestamp_invalid")));
    let resp = reqwest::Client::new().post(format!("{}/api/v1/push", s.http())).body(raw.clone()).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.json::<serde_json::Value>().await.unwrap()["error"]["code"], "timestamp_missing");

    bob.expect_silence(Duration::from_millis(100)).await;

    // The genuine request goes through once ...
    let (status, ok) = s.post_push("/api/v1/push", raw.clone(), &now.to_string(), &sign(now, DEMO_SECRET)).await;
    assert_eq!(status, 200, "{ok}");
    assert_eq!(bob.recv().await["data"], json!({"t":1}));
    // ... and a replay of it, byte for byte, is refused.
    let (status, err) = s.post_push("/api/v1/push", raw.clone(), &now.to_string(), &sign(now, DEMO_SECRET)).await;
    assert_eq!((status, err["error"]["code"].as_str()), (409, Some("nonce_replayed")));
    // Also through the alias path.
    let (status, _) = s.post_push("/api/v1/im/push", raw, &now.to_string(), &sign(now, DEMO_SECRET)).await;
    assert_eq!(status, 409);
    bob.expect_silence(Duration::from_millis(100)).await;
    s.assert_healthy().await;
}

#[tokio::test]
async fn push_body_errors() {
    let s = TestServer::with(|c| c.push.max_recipients = 3).await;
    let cases = [
        (json!({"app_key":"nope","send_to":"bob","message":1}), 401, "unknown_app"),
        (json!({"app_key":"demo","message":1}), 400, "invalid_body"),
        (json!({"app_key":"demo","send_to":5,"message":1}), 400, "invalid_body"),
        (json!({"app_key":"demo","send_to":"bob"}), 400, "invalid_body"),
        (json!({"app_key":"demo","send_to":[],"message":1}), 400, "invalid_recipient"),
        (json!({"app_key":"demo","send_to":["a","b","c","d"],"message":1}), 400, "invalid_recipient"),
        (json!({"app_key":"demo","send_to":["a",""],"message":1}), 400, "invalid_recipient"),
        (json!({"app_key":"demo","send_to":"a","message":1,"nonce":""}), 400, "invalid_nonce"),
        (json!({"app_key":"demo","send_to":"a","message":1,"nonce":"n".repeat(129)}), 400, "invalid_nonce"),
        (json!({"app_key":"demo","send_to":"a","message":1,"from":"\u{7}"}), 400, "invalid_sender"),
    ];
    for (body, status, code) in cases {
        let (got, err) = s.push("demo", body.clone()).await;
        assert_eq!((got, err["error"]["code"].as_str()), (status, Some(code)), "for {body}: {err}");
    }
    for raw in ["not json", r#"["demo","bob",1,"n"]"#] {
        let (status, err) = s.post("/api/v1/push", raw).await;
        assert_eq!((status, err["error"]["code"].as_str()), (400, Some("invalid_body")), "{raw}");
    }
    s.assert_healthy().await;
}

#[tokio::test]
async fn push_to_unknown_recipient_says_offline() {
    let s = TestServer::spawn().await;
    let mut online = s.ws("demo", "here").await;
    let (status, body) =
        s.push("demo", json!({"app_key":"demo","send_to":["here","never-seen","here"],"message":"m"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"].as_array().unwrap().len(), 2, "duplicates are delivered once: {body}");
    assert_eq!(body["results"][0], json!({"uid":"here","status":"delivered","connections":1}));
    assert_eq!(body["results"][1], json!({"uid":"never-seen","status":"offline","connections":0}));
    assert_eq!(body["delivered"], 1);
    assert_eq!(online.recv().await["data"], "m");
    online.expect_silence(Duration::from_millis(100)).await;
    s.assert_healthy().await;
}

#[tokio::test]
async fn nonce_memory_is_bounded() {
    let s = TestServer::with(|c| c.push.nonce_capacity = 2).await;
    for _ in 0..2 {
        assert_eq!(s.push("demo", json!({"app_key":"demo","send_to":"a","message":1})).await.0, 200);
    }
    let (status, err) = s.push("demo", json!({"app_key":"demo","send_to":"a","message":1})).await;
    assert_eq!((status, err["error"]["code"].as_str()), (503, Some("nonce_store_full")));
    // Other apps have their own memory.
    assert_eq!(s.push("other", json!({"app_key":"other","send_to":"a","message":1})).await.0, 200);
}

#[tokio::test]
async fn oversized_http_body_is_413() {
    let s = TestServer::with(|c| c.limits.max_http_body_bytes = 2048).await;
    let (status, err) = s.post("/route/batch", vec![b' '; 4096]).await;
    assert_eq!((status, err["error"]["code"].as_str()), (413, Some("body_too_large")));
    let (status, err) = s.post("/api/v1/push", vec![b' '; 4096]).await;
    assert_eq!((status, err["error"]["code"].as_str()), (413, Some("body_too_large")));
    s.assert_healthy().await;
}

#[tokio::test]
async fn garbage_and_silence_on_the_websocket_port() {
    use tokio::io::AsyncReadExt;
    let s = TestServer::with(|c| c.limits.connect_timeout = Duration::from_millis(300)).await;
    // Not HTTP at all: the handshake fails and the socket is closed.
    let mut garbage = tokio::net::TcpStream::connect(s.addrs.ws.unwrap()).await.unwrap();
    garbage.write_all(b"\x16\x03\x01 definitely not HTTP\r\n\r\n").await.unwrap();
    let mut sink = Vec::new();
    tokio::time::timeout(WAIT, garbage.read_to_end(&mut sink)).await.expect("closed in time").ok();

    // A client that opens the port and says nothing is dropped after limits.connect_timeout.
    let started = tokio::time::Instant::now();
    let mut idle = tokio::net::TcpStream::connect(s.addrs.ws.unwrap()).await.unwrap();
    let n = tokio::time::timeout(WAIT, idle.read(&mut [0u8; 64])).await.expect("closed in time").unwrap_or(0);
    assert_eq!(n, 0, "server closes without a response");
    assert!(started.elapsed() >= Duration::from_millis(300));
    s.assert_healthy().await;
}

#[tokio::test]
async fn invalid_utf8_on_tcp() {
    let s = TestServer::spawn().await;
    let mut c = s.tcp("demo", "alice").await;
    c.framed.send(Bytes::from_static(b"{\"to\":\"\xff\xfe\"}")).await.unwrap();
    let frames = c.expect_eof().await;
    assert_eq!(frames.last().unwrap()["code"], "invalid_utf8", "{frames:?}");
    s.assert_healthy().await;
}

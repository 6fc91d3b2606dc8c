//! What a policy plugin adds to the gateway's own work, in process, side by side:
//!
//! - `send_direct/filters/{0,1,3}`: one direct message through the hub (filters, encode,
//!   hand to the recipient's queue) with 0, 1 and 3 word-filter plugins;
//! - `send_direct/filters/1-allow`: the same with one filter that allows every message
//!   without looking at it (the example `hostile` plugin, mode `allow`): what a filter call
//!   costs before the filter does anything;
//! - `send_burst/filters/{0,1,1-allow,3}`: the same messages as a session's run of 12 sends
//!   read together: stamped, filtered together (one call per word-filter, which takes
//!   batches; one per message for `hostile`, which does not), then encoded and handed over
//!   one by one; throughput per message;
//! - `authenticate/{jwt,plugin,jwt+plugin}`: one connect's authentication with the built-in
//!   JWT check, the hmac-auth plugin instead, and the plugin after the JWT.
//!
//! Needs the example plugins: `plugins/build.sh`. Run: `cargo bench --bench plugins`.
//! `benches/report.py` prints the medians and differences from criterion's output.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde_json::value::RawValue;
use switchboard::cluster::nats::Target;
use switchboard::cluster::{Addrs, NodeInfo};
use switchboard::config::Config;
use switchboard::hub::{Hub, Sender};
use switchboard::plugin::PluginSet;
use switchboard::protocol::now_ms;
use switchboard::registry::{SessionHandle, Taken};
use switchboard::session::ConnectRequest;
use switchboard::transport::Transport;

const HMAC_KEY: &str = "bench-hmac-key-0123456789";

fn plugin_path(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("plugins/dist").join(format!("{name}.wasm"));
    assert!(p.is_file(), "{} missing: run plugins/build.sh", p.display());
    p
}

fn hub() -> Arc<Hub> {
    let words = plugin_path("word-filter");
    let hmac = plugin_path("hmac-auth");
    let hostile = plugin_path("hostile");
    let mut text = String::from("[node]\nid = \"bench\"\n[limits]\nmax_connections = 1000000\n");
    for name in ["w1", "w2", "w3"] {
        text += &format!(
            "[[plugins]]\nname = \"{name}\"\npath = \"{}\"\nworld = \"message-filter\"\n[plugins.config]\ndeny = [\"spam\"]\nmask = [\"darn\"]\n",
            words.display()
        );
    }
    text += &format!(
        "[[plugins]]\nname = \"allow\"\npath = \"{}\"\nworld = \"message-filter\"\n[plugins.config]\nmode = \"allow\"\n",
        hostile.display()
    );
    text += &format!(
        "[[plugins]]\nname = \"hmac\"\npath = \"{}\"\nworld = \"authenticator\"\n[plugins.config]\nkey = \"{HMAC_KEY}\"\n",
        hmac.display()
    );
    text += "[apps.f0]\nsecret = \"bench-secret-f0-0123456789\"\n";
    text += "[apps.f1]\nsecret = \"bench-secret-f1-0123456789\"\nfilters = [\"w1\"]\n";
    text += "[apps.f1a]\nsecret = \"bench-secret-f1a-0123456789\"\nfilters = [\"allow\"]\n";
    text += "[apps.f3]\nsecret = \"bench-secret-f3-0123456789\"\nfilters = [\"w1\", \"w2\", \"w3\"]\n";
    text +=
        "[apps.auth]\nsecret = \"bench-secret-auth-0123456789\"\nauth = { plugin = \"hmac\", mode = \"replace\" }\n";
    text += "[apps.after]\nsecret = \"bench-secret-after-0123456789\"\nauth = { plugin = \"hmac\", mode = \"after_jwt\" }\n";
    let mut config: Config = text.parse().expect("bench config is valid");
    config.node.data_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-data");
    let plugins = PluginSet::load(&config, 1).expect("plugins load");
    let node =
        NodeInfo { id: "bench".into(), external: Addrs::default(), intranet: Addrs::default(), warnings: vec![] };
    Hub::new(config, node, plugins)
}

fn send_direct(c: &mut Criterion) {
    let hub = hub();
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let data = RawValue::from_string(r#"{"text":"hello there, how are you doing today?","n":42}"#.into()).unwrap();
    let mut group = c.benchmark_group("send_direct");
    group.throughput(Throughput::Elements(1));
    for (filters, app_id) in [("0", "f0"), ("1", "f1"), ("1-allow", "f1a"), ("3", "f3")] {
        let app = hub.app(app_id).unwrap().clone();
        let handle = SessionHandle { conn_id: 1, control: Arc::default() };
        let mut taken = Taken::default();
        app.registry.register("bob", handle.clone(), 16).unwrap();
        group.bench_function(format!("filters/{filters}"), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let sent = hub
                            .send_direct(
                                &app,
                                Sender {
                                    uid: "alice",
                                    metadata: &[],
                                    wants_count: true,
                                    conversation: None,
                                    received_at: now_ms(),
                                },
                                "bob",
                                &data,
                            )
                            .await
                            .unwrap();
                        assert_eq!(sent.delivery.local.sessions, 1);
                        assert_eq!(handle.control.take_queued(1, &mut taken), 1);
                        assert!(taken.next().is_some());
                    }
                    start.elapsed()
                })
            })
        });
    }
    group.finish();
}

/// Sends in one run of a burst, as a session with filters handles them at most.
const BURST: usize = 12;

fn send_burst(c: &mut Criterion) {
    let hub = hub();
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let data = RawValue::from_string(r#"{"text":"hello there, how are you doing today?","n":42}"#.into()).unwrap();
    let max_bytes = hub.config().limits.max_frame_bytes;
    let mut group = c.benchmark_group("send_burst");
    group.throughput(Throughput::Elements(BURST as u64));
    for (filters, app_id) in [("0", "f0"), ("1", "f1"), ("1-allow", "f1a"), ("3", "f3")] {
        let app = hub.app(app_id).unwrap().clone();
        let handle = SessionHandle { conn_id: 1, control: Arc::default() };
        let mut taken = Taken::default();
        app.registry.register("bob", handle.clone(), 16).unwrap();
        let from = Sender { uid: "alice", metadata: &[], wants_count: true, conversation: None, received_at: now_ms() };
        let to = Target::User { app: &app.id, uid: "bob" };
        group.bench_function(format!("filters/{filters}"), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let stamps: Vec<_> = (0..BURST).map(|_| hub.stamp()).collect();
                        let msgs: Vec<_> =
                            stamps.iter().map(|(id, at)| Hub::message(&app, from, to, &data, id, *at)).collect();
                        let answers = hub.filter_burst(&app, &msgs, max_bytes);
                        drop(msgs);
                        for ((msg_id, send_at), answer) in stamps.into_iter().zip(answers) {
                            let rewritten = answer.unwrap();
                            let sent =
                                hub.send_filtered(&app, from, to, &data, rewritten.as_deref(), msg_id, send_at).await;
                            assert_eq!(sent.delivery.local.sessions, 1);
                            assert_eq!(handle.control.take_queued(1, &mut taken), 1);
                            assert!(taken.next().is_some());
                        }
                    }
                    start.elapsed()
                })
            })
        });
    }
    group.finish();
}

fn hmac_token(uid: &str) -> String {
    use hmac::{Mac, SimpleHmac};
    let expiry = switchboard::protocol::now_ms() / 1000 + 3600;
    let mut mac = SimpleHmac::<sha2::Sha256>::new_from_slice(HMAC_KEY.as_bytes()).unwrap();
    mac.update(format!("{uid}:{expiry}:eu").as_bytes());
    format!("{uid}:{expiry}:eu:{}", hex::encode(mac.finalize().into_bytes()))
}

fn authenticate(c: &mut Criterion) {
    let hub = hub();
    let request = |app: &str, token: String| ConnectRequest {
        app_id: Some(app.into()),
        token: Some(token),
        transport: Transport::Ws,
        remote: "127.0.0.1:40000".parse().unwrap(),
        params: vec![],
        batch: false,
    };
    let jwt = |app: &str, secret: &str| {
        request(app, switchboard::auth::jwt::issue(secret.as_bytes(), "alice", Duration::from_secs(3600)))
    };
    let cases = [
        ("jwt", jwt("f0", "bench-secret-f0-0123456789")),
        ("plugin", request("auth", hmac_token("alice"))),
        ("jwt+plugin", jwt("after", "bench-secret-after-0123456789")),
    ];
    let mut group = c.benchmark_group("authenticate");
    group.throughput(Throughput::Elements(1));
    for (name, req) in cases {
        group.bench_function(name, |b| b.iter(|| hub.authenticate(&req).expect("accepted")));
    }
    group.finish();
}

criterion_group!(benches, send_direct, send_burst, authenticate);
criterion_main!(benches);

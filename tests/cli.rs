//! The `switchboard` binary as an operator uses it: config check, token, push, and serve
//! with a signal-driven graceful shutdown.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use std::time::Duration;

use common::*;
use serde_json::json;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_switchboard"));
    c.env("RUST_LOG", "info").env_remove("SWITCHBOARD_CONFIG");
    c
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn repo_config() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml")
}

#[test]
fn shipped_config_checks_clean() {
    let out = bin().arg("-c").arg(repo_config()).args(["config", "check"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK"));
}

#[test]
fn config_check_lists_every_problem_and_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "bad.toml",
        "[limits]\noutbound_queue = 0\n[heartbeat]\nping_interval = \"30s\"\nidle_timeout = \"10s\"\n\
         [apps.demo]\nsecret = \"short\"\n",
    );
    let out = bin().arg("-c").arg(&cfg).args(["config", "check"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for key in ["apps.demo.secret", "limits.outbound_queue", "heartbeat.idle_timeout"] {
        assert!(err.contains(key), "stderr names {key}: {err}");
    }

    let typo = write(dir.path(), "typo.toml", "[apps.demo]\nsecret = \"0123456789abcdef\"\n[limitz]\nx = 1\n");
    let out = bin().arg("-c").arg(&typo).args(["config", "check"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("limitz") && err.contains("line 3"), "{err}");

    let out = bin().arg("-c").arg(dir.path().join("absent.toml")).args(["config", "check"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("absent.toml"));
}

#[test]
fn token_prints_a_valid_token_and_url() {
    let out = bin()
        .arg("-c")
        .arg(repo_config())
        .args(["token", "--app", "demo", "--uid", "alice", "--ttl", "2m"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let mut lines = stdout.lines();
    let token = lines.next().unwrap();
    let url = lines.next().unwrap();
    let config = switchboard::Config::load(&repo_config()).unwrap();
    let verifier = switchboard::auth::jwt::JwtVerifier::new(config.apps["demo"].secret.as_bytes(), Duration::ZERO);
    assert_eq!(verifier.verify(token).unwrap(), "alice");
    assert_eq!(url, format!("ws://127.0.0.1:5200/ws/connect?app_id=demo&token={token}"));

    let out = bin().arg("-c").arg(repo_config()).args(["token", "--app", "nope", "--uid", "a"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"nope\""));
}

fn client_config(dir: &Path) -> std::path::PathBuf {
    write(dir, "client.toml", &format!("[apps.demo]\nsecret = \"{DEMO_SECRET}\"\n"))
}

#[tokio::test]
async fn push_command_signs_and_reports() {
    let s = TestServer::spawn().await;
    let mut alice = s.ws("demo", "alice").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = client_config(dir.path());
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("-c")
        .arg(&cfg)
        .args(["push", "--app", "demo", "--to", "alice,bob", "--message", r#"{"text":"from the CLI"}"#])
        .args(["--server", &s.http()])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout} {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("alice\tdelivered\t1 connection(s)"), "{stdout}");
    assert!(stdout.contains("bob\toffline\t0 connection(s)"), "{stdout}");
    let msg = alice.recv().await;
    assert_eq!(msg["data"], json!({"text":"from the CLI"}));

    // Bad JSON is caught before anything is sent.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("-c")
        .arg(&cfg)
        .args(["push", "--app", "demo", "--to", "alice", "--message", "{oops", "--server", &s.http()])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not valid JSON"));
    alice.expect_silence(Duration::from_millis(100)).await;

    // A server refusal is shown with its code.
    let wrong = write(dir.path(), "wrong.toml", "[apps.demo]\nsecret = \"not-the-servers-secret\"\n");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("-c")
        .arg(&wrong)
        .args(["push", "--app", "demo", "--to", "alice", "--message", "1", "--server", &s.http()])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("signature_invalid"));
}

/// The address after `key=` in the "switchboard listening" log line.
fn logged_addr(line: &str, key: &str) -> String {
    let start = line.find(&format!(" {key}=")).unwrap_or_else(|| panic!("{key} in {line}")) + key.len() + 2;
    line[start..].split_whitespace().next().unwrap().to_string()
}

#[tokio::test]
async fn serve_runs_until_sigterm_and_sends_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "serve.toml",
        &format!(
            "[node]\ndata_dir = \"state\"\n[listeners.http]\nbind = \"127.0.0.1:0\"\n\
             [listeners.tcp]\nbind = \"127.0.0.1:0\"\n[listeners.ws]\nbind = \"127.0.0.1:0\"\n\
             [shutdown]\ngrace = \"3s\"\nreconnect_jitter = \"100ms\"\n\
             [apps.demo]\nsecret = \"{DEMO_SECRET}\"\n"
        ),
    );
    let mut child = bin().arg("-c").arg(&cfg).arg("serve").stderr(Stdio::piped()).spawn().unwrap();

    // Readiness: the node logs "switchboard listening", with the ports it got, once every
    // socket is bound.
    let stderr = child.stderr.take().unwrap();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let log = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("switchboard listening") {
                let _ = ready_tx.send(line.clone());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let listening = ready_rx.recv_timeout(WAIT).expect("server becomes ready");
    let ws = logged_addr(&listening, "ws");
    let http = logged_addr(&listening, "http");
    assert!(!listening.contains('\u{1b}'), "no terminal colours when stderr is not a terminal: {listening}");

    // The node id was generated and kept under data_dir.
    let id = std::fs::read_to_string(dir.path().join("state/node-id")).unwrap();
    let mut c = WsClient::connect(&format!("ws://{ws}/ws/connect?app_id=demo&token={}", token("demo", "a"))).await;
    let hello = c.recv().await;
    assert_eq!(hello["node_id"], id.trim());
    let version: serde_json::Value =
        reqwest::get(format!("http://{http}/api/version")).await.unwrap().json().await.unwrap();
    assert_eq!(version["node_id"], id.trim());

    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let (frames, code, _) = c.expect_close().await;
    assert_eq!(frames[0]["type"], "reconnect");
    assert_eq!(code, 1001);

    let exit = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    assert!(exit.success(), "clean exit after SIGTERM: {exit:?}");
    let log = log.join().unwrap();
    assert!(log.contains("shutting down"), "{log}");
    // Bound to 127.0.0.1 without [node.external] host: the start-up warning names the key.
    assert!(log.contains("WARN") && log.contains("[node.external] host"), "{log}");
    assert!(!log.contains(DEMO_SECRET) && !log.contains("token="), "no secrets in logs: {log}");
}

#[test]
fn serve_refuses_bad_tls_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let junk = write(dir.path(), "junk.pem", "nope\n");
    let cfg = write(
        dir.path(),
        "tls.toml",
        &format!(
            "[listeners.http]\nbind = \"127.0.0.1:0\"\n[listeners.tcp]\nbind = \"127.0.0.1:0\"\n\
             [listeners.ws]\nbind = \"127.0.0.1:0\"\n[listeners.wss]\nbind = \"127.0.0.1:0\"\n\
             [listeners.https]\nbind = \"127.0.0.1:0\"\n[node]\nid = \"n\"\n\
             [tls]\ncert = \"{}\"\nkey = \"{}\"\n[apps.demo]\nsecret = \"{DEMO_SECRET}\"\n",
            junk.display(),
            junk.display()
        ),
    );
    let out = bin().arg("-c").arg(&cfg).arg("serve").output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tls.cert") && err.contains("junk.pem"), "{err}");
}

#[tokio::test]
async fn sighup_reloads_plugins() {
    let dir = tempfile::tempdir().unwrap();
    let admin = "admin-token-0123456789abcdef";
    let write_cfg = |deny: &str| {
        write(
            dir.path(),
            "hup.toml",
            &format!(
                "[node]\nid = \"hup\"\ndata_dir = \"{data}\"\n[listeners.http]\nbind = \"127.0.0.1:0\"\n\
                 [listeners.tcp]\nenabled = false\n[listeners.ws]\nbind = \"127.0.0.1:0\"\n\
                 [admin]\ntoken = \"{admin}\"\n\
                 [[plugins]]\nname = \"words\"\npath = \"{wasm}\"\nworld = \"message-filter\"\n\
                 [plugins.config]\ndeny = [\"{deny}\"]\n\
                 [apps.demo]\nsecret = \"{DEMO_SECRET}\"\nfilters = [\"words\"]\n",
                data = test_data_dir().display(),
                wasm = plugin_path("word-filter").display(),
            ),
        )
    };
    let cfg = write_cfg("spam");
    let mut child = bin().arg("-c").arg(&cfg).arg("serve").stderr(Stdio::piped()).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("switchboard listening") || line.contains("SIGHUP") {
                let _ = tx.send(line);
            }
        }
    });
    let listening = rx.recv_timeout(WAIT).expect("server becomes ready");
    let http = logged_addr(&listening, "http");
    let generation = || async {
        let v: serde_json::Value = reqwest::Client::new()
            .get(format!("http://{http}/admin/plugins"))
            .bearer_auth(admin)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["generation"].as_u64().unwrap()
    };
    assert_eq!(generation().await, 1);

    write_cfg("ham");
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    let logged = rx.recv_timeout(WAIT).expect("the reload is logged");
    assert!(logged.contains("plugins reloaded"), "{logged}");
    assert_eq!(generation().await, 2);

    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let exit = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    assert!(exit.success());
}

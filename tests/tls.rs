//! WSS and HTTPS with a real certificate chain (a fresh self-signed certificate), and
//! refusals to start that name the bad file or key.

mod common;

use std::sync::Arc;

use common::*;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::json;
use switchboard::config::TlsConfig;
use switchboard::{Server, StartError};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

fn connector(cert_der: &[u8]) -> TlsConnector {
    switchboard::transport::tls::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(cert_der.to_vec())).unwrap();
    let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

async fn wss(s: &TestServer, app: &str, uid: &str) -> WsClient<tokio_rustls::client::TlsStream<TcpStream>> {
    let addr = s.addrs.wss.unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = connector(&s.cert.as_ref().unwrap().cert_der)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake with the configured certificate");
    let url = format!("wss://localhost:{}/ws/connect?app_id={app}&token={}", addr.port(), token(app, uid));
    let (ws, _) = tokio_tungstenite::client_async(url, tls).await.expect("WSS upgrade");
    let mut c = WsClient { ws };
    assert_eq!(c.recv().await["type"], "connected");
    c
}

#[tokio::test]
async fn wss_and_https_work_together() {
    let s = TestServer::with_tls(|c| c.node.external.host = Some("localhost".into())).await;
    let https = s.addrs.https.expect("HTTPS listener starts when [tls] is set");

    // A browser on an HTTPS page: route over HTTPS ...
    let client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_der(&s.cert.as_ref().unwrap().cert_der).unwrap()])
        .build()
        .unwrap();
    let route: serde_json::Value =
        client.get(format!("https://localhost:{}/route", https.port())).send().await.unwrap().json().await.unwrap();
    assert_eq!(route["wss_addr"], format!("wss://localhost:{}", s.addrs.wss.unwrap().port()));
    assert_eq!(route["ws_addr"], format!("ws://localhost:{}", s.addrs.ws.unwrap().port()));

    // ... then WSS, talking to a plain-WS user.
    let mut alice = wss(&s, "demo", "alice").await;
    let mut bob = s.ws("demo", "bob").await;
    alice.send_json(&json!({"to":"bob","data":"over tls"})).await;
    assert_eq!(alice.recv().await["delivered"], 1);
    assert_eq!(bob.recv().await["data"], "over tls");
    bob.send_json(&json!({"to":"alice","data":"back"})).await;
    assert_eq!(alice.recv().await["data"], "back");
}

#[tokio::test]
async fn plain_http_on_the_wss_port_fails_without_harm() {
    let s = TestServer::with_tls(|_| {}).await;
    let url = format!("ws://{}/ws/connect?app_id=demo&token={}", s.addrs.wss.unwrap(), token("demo", "x"));
    assert!(tokio_tungstenite::connect_async(url).await.is_err());
    let _ = wss(&s, "demo", "still-works").await;
    s.assert_healthy().await;
}

async fn start_error(tls: TlsConfig) -> String {
    let mut config = base_config();
    config.tls = Some(tls);
    match Server::bind(config).await {
        Err(e @ StartError::Tls(_)) => e.to_string(),
        other => panic!("expected a TLS start error, got {other:?}"),
    }
}

#[tokio::test]
async fn refusal_to_start_names_the_file_and_key() {
    let good = test_cert();
    let junk = good.dir.path().join("junk.pem");
    std::fs::write(&junk, "this is not PEM\n").unwrap();

    let e = start_error(TlsConfig { cert: junk.clone(), key: good.key.clone() }).await;
    assert!(e.contains("tls.cert") && e.contains("junk.pem"), "{e}");

    let e = start_error(TlsConfig { cert: good.cert.clone(), key: good.cert.clone() }).await;
    assert!(e.contains("tls.key") && e.contains("cert.pem") && e.contains("PRIVATE KEY"), "{e}");

    let e = start_error(TlsConfig { cert: good.dir.path().join("missing.pem"), key: good.key.clone() }).await;
    assert!(e.contains("tls.cert") && e.contains("missing.pem"), "{e}");

    // A key that does not belong to the certificate.
    let other = test_cert();
    let e = start_error(TlsConfig { cert: good.cert.clone(), key: other.key.clone() }).await;
    assert!(e.contains("do not make a usable pair"), "{e}");
}

#[tokio::test]
async fn wss_without_tls_is_a_config_problem() {
    let mut config = base_config();
    config.listeners.wss.enabled = Some(true);
    let problems = config.validate().unwrap_err();
    assert_eq!(problems[0].key, "listeners.wss.enabled");
}

//! The operator commands other than `serve`: minting a development token and sending a
//! signed push, so nobody computes JWTs or HMACs by hand.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use rand::Rng as _;
use serde_json::Value;

use crate::auth::{jwt, signature};
use crate::config::Config;
use crate::protocol::now_ms;

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("app {0:?} is not in the config (apps: {1})")]
    UnknownApp(String, String),
    #[error("--message is not valid JSON: {0}")]
    Message(serde_json::Error),
    #[error("no server address: the config has neither listeners.http nor listeners.https enabled; pass --server")]
    NoServer,
    #[error("request to {url} failed: {source}")]
    Http { url: String, source: reqwest::Error },
    #[error("server answered {status}: {code}: {message}")]
    Refused { status: u16, code: String, message: String },
}

fn app_secret<'c>(config: &'c Config, app: &str) -> Result<&'c str, ToolError> {
    config.apps.get(app).map(|a| a.secret.as_str()).ok_or_else(|| {
        ToolError::UnknownApp(app.to_string(), config.apps.keys().cloned().collect::<Vec<_>>().join(", "))
    })
}

/// Where this machine reaches a listener bound to `bind`.
fn local_target(bind: SocketAddr) -> SocketAddr {
    if bind.ip().is_unspecified() {
        let ip =
            if bind.is_ipv4() { IpAddr::V4(Ipv4Addr::LOCALHOST) } else { IpAddr::V6(std::net::Ipv6Addr::LOCALHOST) };
        SocketAddr::new(ip, bind.port())
    } else {
        bind
    }
}

/// A token for `uid` and, when a WS or WSS listener is enabled, a ready connect URL.
pub fn token(config: &Config, app: &str, uid: &str, ttl: Duration) -> Result<(String, Option<String>), ToolError> {
    let secret = app_secret(config, app)?;
    let token = jwt::issue(secret.as_bytes(), uid, ttl);
    let l = &config.listeners;
    let base = if l.ws.enabled {
        Some(format!("ws://{}", local_target(l.ws.bind)))
    } else if config.wss_enabled() {
        Some(format!("wss://{}", local_target(l.wss.bind)))
    } else {
        None
    };
    let url = base.map(|b| {
        let query: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("app_id", app)
            .append_pair("token", &token)
            .finish();
        format!("{b}{}?{query}", crate::transport::ws::CONNECT_PATH)
    });
    Ok((token, url))
}

/// The HTTP API base URL of the node described by `config`, as seen from this machine.
pub fn default_server(config: &Config) -> Result<String, ToolError> {
    let l = &config.listeners;
    if l.http.enabled {
        Ok(format!("http://{}", local_target(l.http.bind)))
    } else if config.https_enabled() {
        Ok(format!("https://{}", local_target(l.https.bind)))
    } else {
        Err(ToolError::NoServer)
    }
}

/// What to push.
#[derive(Debug, Clone)]
pub struct PushArgs<'a> {
    pub app: &'a str,
    pub to: Vec<String>,
    pub message: &'a str,
    pub from: Option<&'a str>,
    pub server: String,
    /// Accept any TLS certificate (development certificates).
    pub insecure: bool,
}

/// Signs and sends a push; returns the server's JSON answer.
pub async fn push(config: &Config, args: PushArgs<'_>) -> Result<Value, ToolError> {
    let secret = app_secret(config, args.app)?;
    let message: Value = serde_json::from_str(args.message).map_err(ToolError::Message)?;
    let nonce = hex::encode(rand::thread_rng().r#gen::<[u8; 16]>());
    let mut body = serde_json::json!({ "app_key": args.app, "send_to": args.to, "message": message, "nonce": nonce });
    if let Some(from) = args.from {
        body["from"] = from.into();
    }
    let body = serde_json::to_vec(&body).expect("JSON value serialises");
    let timestamp = (now_ms() / 1000).to_string();
    let sig = signature::sign(secret.as_bytes(), &timestamp, &nonce, &body);

    crate::transport::tls::install_crypto_provider();
    let url = format!("{}/api/v1/push", args.server.trim_end_matches('/'));
    let http = |source| ToolError::Http { url: url.clone(), source };
    let client = reqwest::Client::builder()
        .danger_accept_invalid_certs(args.insecure)
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(http)?;
    let resp = client
        .post(&url)
        .header("content-type", "application/json")
        .header(signature::TIMESTAMP_HEADER, &timestamp)
        .header(signature::SIGNATURE_HEADER, sig)
        .body(body)
        .send()
        .await
        .map_err(http)?;
    let status = resp.status();
    let value: Value = resp.json().await.map_err(http)?;
    if !status.is_success() {
        let field = |k: &str| value["error"][k].as_str().unwrap_or_default().to_string();
        return Err(ToolError::Refused { status: status.as_u16(), code: field("code"), message: field("message") });
    }
    Ok(value)
}

/// Where `switchboard cert` wrote its files.
#[derive(Debug, Clone)]
pub struct DevCert {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{0} exists; pass --force to replace it")]
    Exists(std::path::PathBuf),
    #[error("cannot generate the certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot write {path}: {source}")]
    Write { path: std::path::PathBuf, source: std::io::Error },
}

/// Writes a self-signed development certificate for `hosts` (DNS names or IP addresses,
/// `localhost` and `127.0.0.1` always included) and its private key, as `dev.crt` and
/// `dev.key` in `dir`. The key is readable by its owner only. Valid for 365 days.
pub fn dev_cert(hosts: &[String], dir: &std::path::Path, force: bool) -> Result<DevCert, CertError> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};

    let mut names: Vec<String> = hosts.to_vec();
    for always in ["localhost", "127.0.0.1"] {
        if !names.iter().any(|h| h == always) {
            names.push(always.to_string());
        }
    }
    let out = DevCert { cert: dir.join("dev.crt"), key: dir.join("dev.key") };
    if !force {
        for path in [&out.cert, &out.key] {
            if path.exists() {
                return Err(CertError::Exists(path.clone()));
            }
        }
    }
    let mut params = rcgen::CertificateParams::new(names)?;
    params.distinguished_name.push(rcgen::DnType::CommonName, hosts.first().map_or("localhost", String::as_str));
    params.distinguished_name.push(rcgen::DnType::OrganizationName, "switchboard development");
    let now = std::time::SystemTime::now();
    params.not_before = now.into();
    params.not_after = (now + Duration::from_secs(365 * 24 * 3600)).into();
    let key = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key)?;

    let write = |path: &std::path::Path, mode: u32, text: &str| -> Result<(), CertError> {
        let io = |source| CertError::Write { path: path.to_path_buf(), source };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut f =
            std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(path).map_err(io)?;
        // `mode` applies to a new file only: an existing one (--force) is narrowed first.
        f.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(io)?;
        f.write_all(text.as_bytes()).map_err(io)
    };
    write(&out.key, 0o600, &key.serialize_pem())?;
    write(&out.cert, 0o644, &cert.pem())?;
    Ok(out)
}

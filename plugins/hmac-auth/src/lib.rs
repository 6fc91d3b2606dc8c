//! An authenticator with its own token scheme: `uid:expiry:region:signature`, where
//! `signature = hex(HMAC-SHA256(key, "uid:expiry:region"))` and `expiry` is Unix seconds.
//! The token's region (or `default_region`) becomes the identity's `region` metadata, which
//! filters and routers see.
//!
//! Config:
//! ```toml
//! key = "a shared secret with the app server"
//! default_region = "eu"        # optional; used when the token's region is empty
//! deny_uids = ["mallory"]      # optional; always refused
//! ```
//! When the gateway runs it after its own JWT check (`mode = "after_jwt"`), the token is
//! the JWT: the plugin then only applies `deny_uids` and the region default.

use std::cell::RefCell;

use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

wit_bindgen::generate!({ world: "authenticator", path: "../../wit" });

use exports::switchboard::policy::auth::{ConnectRequest, Guest, Identity, Rejection};
use switchboard::policy::host;
use switchboard::policy::types::Pair;

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    key: String,
    #[serde(default)]
    default_region: Option<String>,
    #[serde(default)]
    deny_uids: Vec<String>,
}

thread_local! {
    static CONFIG: RefCell<Config> = RefCell::new(Config::default());
}

fn reject(code: &str, message: &str) -> Result<Identity, Rejection> {
    Err(Rejection { code: code.into(), message: message.into() })
}

fn identity(uid: String, region: Option<String>) -> Identity {
    let mut metadata = vec![Pair { key: "auth".into(), value: "hmac-auth".into() }];
    if let Some(region) = region.filter(|r| !r.is_empty()) {
        metadata.push(Pair { key: "region".into(), value: region });
    }
    Identity { uid, metadata }
}

struct HmacAuth;

impl Guest for HmacAuth {
    fn init(config: String) -> Result<(), String> {
        let parsed: Config = serde_json::from_str(&config).map_err(|e| format!("hmac-auth config: {e}"))?;
        if parsed.key.len() < 16 {
            return Err("hmac-auth config: key must be at least 16 bytes".into());
        }
        CONFIG.with(|c| *c.borrow_mut() = parsed);
        Ok(())
    }

    fn authenticate(request: ConnectRequest) -> Result<Identity, Rejection> {
        CONFIG.with(|c| {
            let config = c.borrow();
            if let Some(uid) = request.verified_uid {
                if config.deny_uids.contains(&uid) {
                    return reject("banned", "this user may not connect");
                }
                return Ok(identity(uid, config.default_region.clone()));
            }
            let parts: Vec<&str> = request.token.split(':').collect();
            let [uid, expiry, region, signature] = parts[..] else {
                return reject("malformed", "token must be uid:expiry:region:signature");
            };
            let Ok(expiry) = expiry.parse::<u64>() else {
                return reject("malformed", "expiry must be Unix seconds");
            };
            let mut mac = Hmac::<Sha256>::new_from_slice(config.key.as_bytes()).expect("any key length");
            mac.update(format!("{uid}:{expiry}:{region}").as_bytes());
            let Ok(given) = hex::decode(signature) else {
                return reject("malformed", "signature must be hex");
            };
            if mac.verify_slice(&given).is_err() {
                return reject("bad_signature", "token signature does not match");
            }
            if expiry * 1000 < host::wall_now_ms() {
                return reject("expired", "token has expired");
            }
            if uid.is_empty() || config.deny_uids.iter().any(|d| d == uid) {
                return reject("banned", "this user may not connect");
            }
            let region = if region.is_empty() { config.default_region.clone() } else { Some(region.to_string()) };
            host::log(host::Level::Debug, &format!("accepted {uid} from {}", request.remote_addr));
            Ok(identity(uid.to_string(), region))
        })
    }
}

export!(HmacAuth);

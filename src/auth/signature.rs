//! Push request signatures: `hex(HMAC-SHA256(secret, timestamp "\n" nonce "\n" body))`.
//!
//! The timestamp bounds how old a captured request can be; the nonce, remembered for that
//! window, stops it from being replayed inside it. Both are covered by the MAC so neither
//! can be changed without the secret.

use hmac::{Mac, SimpleHmac};
use sha2::Sha256;

/// Header carrying the Unix time (seconds) the request was signed at.
pub const TIMESTAMP_HEADER: &str = "x-switchboard-timestamp";
/// Header carrying the hex signature.
pub const SIGNATURE_HEADER: &str = "x-switchboard-signature";

fn mac(secret: &[u8], timestamp: &str, nonce: &str, body: &[u8]) -> SimpleHmac<Sha256> {
    let mut mac = SimpleHmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(timestamp.as_bytes());
    mac.update(b"\n");
    mac.update(nonce.as_bytes());
    mac.update(b"\n");
    mac.update(body);
    mac
}

/// The signature an app server sends in [`SIGNATURE_HEADER`].
pub fn sign(secret: &[u8], timestamp: &str, nonce: &str, body: &[u8]) -> String {
    hex::encode(mac(secret, timestamp, nonce, body).finalize().into_bytes())
}

/// Constant-time check of a hex signature.
pub fn verify(secret: &[u8], timestamp: &str, nonce: &str, body: &[u8], signature_hex: &str) -> bool {
    let Ok(given) = hex::decode(signature_hex.trim()) else { return false };
    mac(secret, timestamp, nonce, body).verify_slice(&given).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vector() {
        // printf '1700000000\nn1\n{}' | openssl dgst -sha256 -hmac 0123456789abcdef
        assert_eq!(
            sign(b"0123456789abcdef", "1700000000", "n1", b"{}"),
            "615264452d9e54a3ac2c44f1706dfd1b83ab047af847b242ed8f7e30a1df3136"
        );
    }

    #[test]
    fn any_change_breaks_it() {
        let s = sign(b"k", "1", "n", b"body");
        assert!(verify(b"k", "1", "n", b"body", &s));
        assert!(!verify(b"k", "2", "n", b"body", &s));
        assert!(!verify(b"k", "1", "m", b"body", &s));
        assert!(!verify(b"k", "1", "n", b"bodz", &s));
        assert!(!verify(b"j", "1", "n", b"body", &s));
        assert!(!verify(b"k", "1", "n", b"body", "zz"));
    }
}

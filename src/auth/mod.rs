//! Who a client or app server is: client JWTs (HS256) and push request signatures
//! (HMAC-SHA256).
//!
//! Owns the cryptographic checks and their mapping to stable error codes. It does not know
//! about connections or HTTP; `session` and `api` call into it.

pub mod jwt;
pub mod nonce;
pub mod signature;

/// Key material that must never reach a log: `Debug` prints a placeholder.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Box<[u8]>);

impl Secret {
    pub fn new(bytes: &[u8]) -> Self {
        Self(bytes.into())
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

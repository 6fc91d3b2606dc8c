//! Who a client or app server is: client JWTs (HS256) and push request signatures
//! (HMAC-SHA256).
//!
//! Owns the cryptographic checks and their mapping to stable error codes. It does not know
//! about connections or HTTP; `session` and `api` call into it.

pub mod jwt;
pub mod nonce;
pub mod signature;

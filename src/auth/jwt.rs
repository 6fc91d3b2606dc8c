//! Client tokens: HS256 JWTs signed with the app's secret, `sub` = user id, `exp` required.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::protocol::{ErrorCode, valid_uid};

/// Checks tokens for one app. Built once per app at start-up.
pub struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier").field("leeway", &self.validation.leeway).finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
}

#[derive(Serialize)]
struct IssuedClaims<'a> {
    sub: &'a str,
    iat: u64,
    exp: u64,
}

impl JwtVerifier {
    pub fn new(secret: &[u8], leeway: Duration) -> Self {
        // The algorithm is pinned: a token's header cannot choose another one (or `none`).
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = leeway.as_secs();
        validation.validate_nbf = true;
        // Apps may put an audience in their tokens for their own use; it is not ours to check.
        validation.validate_aud = false;
        Self { key: DecodingKey::from_secret(secret), validation }
    }

    /// Returns the user id the token was issued for, or why it is refused.
    pub fn verify(&self, token: &str) -> Result<String, ErrorCode> {
        if token.is_empty() {
            return Err(ErrorCode::TokenMissing);
        }
        match jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation) {
            Ok(data) => match data.claims.sub {
                Some(sub) if valid_uid(&sub) => Ok(sub),
                _ => Err(ErrorCode::TokenClaims),
            },
            Err(e) => Err(match e.kind() {
                ErrorKind::InvalidSignature => ErrorCode::TokenSignature,
                ErrorKind::ExpiredSignature => ErrorCode::TokenExpired,
                ErrorKind::ImmatureSignature => ErrorCode::TokenNotYetValid,
                ErrorKind::MissingRequiredClaim(_) | ErrorKind::InvalidClaimFormat(_) => ErrorCode::TokenClaims,
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName | ErrorKind::UnsupportedAlgorithm => {
                    ErrorCode::TokenAlgorithm
                }
                // `alg: none` (and any name jsonwebtoken has no variant for) fails header
                // parsing; tell the client it is the algorithm, not a garbled token.
                _ if header_alg(token).is_some_and(|alg| alg != "HS256") => ErrorCode::TokenAlgorithm,
                _ => ErrorCode::TokenMalformed,
            }),
        }
    }
}

/// The `alg` of a token's header, read without trusting anything else in it.
fn header_alg(token: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct H {
        alg: String,
    }
    let header = token.split('.').next()?;
    let bytes = URL_SAFE_NO_PAD.decode(header.trim_end_matches('=')).ok()?;
    serde_json::from_slice::<H>(&bytes).ok().map(|h| h.alg)
}

/// Signs a token for `uid`, valid for `ttl` (development tokens, the `token` command, tests).
pub fn issue(secret: &[u8], uid: &str, ttl: Duration) -> String {
    let now = crate::protocol::now_ms() / 1000;
    let claims = IssuedClaims { sub: uid, iat: now, exp: now + ttl.as_secs().max(1) };
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret))
        .expect("HS256 signing with a byte key cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn verifier() -> JwtVerifier {
        JwtVerifier::new(SECRET, Duration::from_secs(5))
    }

    fn raw_token(header: &str, claims: &str, secret: &[u8]) -> String {
        use hmac::{Mac, SimpleHmac};
        let signing_input = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(claims));
        let mut mac = SimpleHmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
        mac.update(signing_input.as_bytes());
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()))
    }

    fn exp_in(secs: i64) -> i64 {
        (crate::protocol::now_ms() / 1000) as i64 + secs
    }

    #[test]
    fn issued_token_verifies() {
        let t = issue(SECRET, "alice", Duration::from_secs(60));
        assert_eq!(verifier().verify(&t).unwrap(), "alice");
    }

    #[test]
    fn refusals_have_specific_codes() {
        let v = verifier();
        let ok_claims = format!(r#"{{"sub":"bob","exp":{}}}"#, exp_in(60));
        assert_eq!(v.verify(""), Err(ErrorCode::TokenMissing));
        assert_eq!(v.verify("not-a-jwt"), Err(ErrorCode::TokenMalformed));
        assert_eq!(
            v.verify(&raw_token(r#"{"alg":"HS256"}"#, &ok_claims, b"another-secret-entirely")),
            Err(ErrorCode::TokenSignature)
        );
        assert_eq!(v.verify(&raw_token(r#"{"alg":"HS384"}"#, &ok_claims, SECRET)), Err(ErrorCode::TokenAlgorithm));
        let none = format!("{}.{}.", URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#), URL_SAFE_NO_PAD.encode(&ok_claims));
        assert_eq!(v.verify(&none), Err(ErrorCode::TokenAlgorithm));
        let expired = format!(r#"{{"sub":"bob","exp":{}}}"#, exp_in(-60));
        assert_eq!(v.verify(&raw_token(r#"{"alg":"HS256"}"#, &expired, SECRET)), Err(ErrorCode::TokenExpired));
        let within_leeway = format!(r#"{{"sub":"bob","exp":{}}}"#, exp_in(-2));
        assert_eq!(v.verify(&raw_token(r#"{"alg":"HS256"}"#, &within_leeway, SECRET)), Ok("bob".into()));
        let nbf = format!(r#"{{"sub":"bob","exp":{},"nbf":{}}}"#, exp_in(600), exp_in(300));
        assert_eq!(v.verify(&raw_token(r#"{"alg":"HS256"}"#, &nbf, SECRET)), Err(ErrorCode::TokenNotYetValid));
        let no_sub = format!(r#"{{"exp":{}}}"#, exp_in(60));
        assert_eq!(v.verify(&raw_token(r#"{"alg":"HS256"}"#, &no_sub, SECRET)), Err(ErrorCode::TokenClaims));
        assert_eq!(v.verify(&raw_token(r#"{"alg":"HS256"}"#, r#"{"sub":"bob"}"#, SECRET)), Err(ErrorCode::TokenClaims));
        let empty_sub = format!(r#"{{"sub":"","exp":{}}}"#, exp_in(60));
        assert_eq!(v.verify(&raw_token(r#"{"alg":"HS256"}"#, &empty_sub, SECRET)), Err(ErrorCode::TokenClaims));
    }
}

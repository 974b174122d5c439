//! Client sessions: what a mini-program gets after logging in, bound to one
//! (app_id, openid), signed by the server, expiring.
//!
//! Format: `v1.<payload>.<signature>`, both base64url without padding; the payload
//! is `{"app": …, "sub": openid, "exp": unix seconds}` and the signature is
//! HMAC-SHA256 over `v1.<payload>` with the session secret. API keys never look
//! like this, and a session is never accepted where a key is required.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::secret::Secret;

type HmacSha256 = Hmac<Sha256>;

const VERSION: &str = "v1";
/// Longest token [`SessionKey::verify`] will look at.
const MAX_TOKEN_LEN: usize = 1024;

/// Who a valid session speaks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionClaims {
    #[serde(rename = "app")]
    pub app_id: String,
    #[serde(rename = "sub")]
    pub openid: String,
    /// Expiry, unix seconds.
    pub exp: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("malformed session")]
    Malformed,
    #[error("bad session signature")]
    BadSignature,
    #[error("session expired")]
    Expired,
}

/// Signs and verifies sessions.
#[derive(Clone)]
pub struct SessionKey {
    secret: Secret,
}

impl SessionKey {
    pub fn new(secret: Secret) -> Self {
        SessionKey { secret }
    }

    fn mac(&self, signed_part: &str) -> HmacSha256 {
        // HMAC takes keys of any length: new_from_slice cannot fail.
        let mut mac = HmacSha256::new_from_slice(self.secret.expose().as_bytes())
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        mac.update(signed_part.as_bytes());
        mac
    }

    pub fn sign(&self, app_id: &str, openid: &str, expires_at: DateTime<Utc>) -> Secret {
        let claims = SessionClaims {
            app_id: app_id.into(),
            openid: openid.into(),
            exp: expires_at.timestamp(),
        };
        // Serialising a struct of strings and an integer cannot fail.
        let payload = serde_json::to_vec(&claims).unwrap_or_default();
        let signed_part = format!("{VERSION}.{}", URL_SAFE_NO_PAD.encode(payload));
        let signature = URL_SAFE_NO_PAD.encode(self.mac(&signed_part).finalize().into_bytes());
        Secret::new(format!("{signed_part}.{signature}"))
    }

    /// The claims of a token this key signed that has not expired at `now`. The
    /// signature is checked (in constant time) before the payload is parsed.
    pub fn verify(&self, token: &str, now: DateTime<Utc>) -> Result<SessionClaims, SessionError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(SessionError::Malformed);
        }
        let (signed_part, signature) = token.rsplit_once('.').ok_or(SessionError::Malformed)?;
        let payload = signed_part
            .strip_prefix(VERSION)
            .and_then(|rest| rest.strip_prefix('.'))
            .ok_or(SessionError::Malformed)?;
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| SessionError::Malformed)?;
        self.mac(signed_part)
            .verify_slice(&signature)
            .map_err(|_| SessionError::BadSignature)?;
        let payload = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| SessionError::Malformed)?;
        let claims: SessionClaims =
            serde_json::from_slice(&payload).map_err(|_| SessionError::Malformed)?;
        if claims.exp <= now.timestamp() {
            return Err(SessionError::Expired);
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeDelta;

    fn key(s: &str) -> SessionKey {
        SessionKey::new(Secret::new(s))
    }

    #[test]
    fn a_signed_session_verifies_until_it_expires() {
        let k = key("0123456789abcdef0123456789abcdef");
        let now = Utc::now();
        let token = k.sign("wxapp", "openid-1", now + TimeDelta::hours(1));
        let claims = k.verify(token.expose(), now).unwrap();
        assert_eq!(
            (claims.app_id.as_str(), claims.openid.as_str()),
            ("wxapp", "openid-1")
        );
        assert_eq!(
            k.verify(token.expose(), now + TimeDelta::hours(2)),
            Err(SessionError::Expired)
        );
    }

    #[test]
    fn forged_or_mangled_sessions_fail() {
        let k = key("0123456789abcdef0123456789abcdef");
        let now = Utc::now();
        let token = k.sign("wxapp", "openid-1", now + TimeDelta::hours(1));
        let t = token.expose();
        // Another key's signature.
        let other = key("another-secret-another-secret-xx").sign(
            "wxapp",
            "openid-1",
            now + TimeDelta::hours(1),
        );
        assert_eq!(
            k.verify(other.expose(), now),
            Err(SessionError::BadSignature)
        );
        // A payload swapped for another openid, signature kept.
        let (_, sig) = t.rsplit_once('.').unwrap();
        let forged_payload =
            URL_SAFE_NO_PAD.encode(br#"{"app":"wxapp","sub":"victim","exp":9999999999}"#);
        let forged = format!("v1.{forged_payload}.{sig}");
        assert_eq!(k.verify(&forged, now), Err(SessionError::BadSignature));
        for bad in [
            "",
            "v1",
            "v1..",
            "v2.x.y",
            "nodots",
            &format!("{t}x"),
            &"a".repeat(5000),
        ] {
            assert!(k.verify(bad, now).is_err(), "{bad}");
        }
    }
}

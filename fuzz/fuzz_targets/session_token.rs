//! `SessionKey::verify`, the parser of the `Authorization: Bearer <session>` header.
//!
//! Properties:
//! * it never panics, whatever the text;
//! * it never accepts a token `sign` did not produce with this key: a token built by
//!   editing, splicing or re-keying signed tokens is accepted only if it is byte for
//!   byte one of the signed tokens, and then with that token's claims, unexpired;
//! * arbitrary text (no signed token to start from) is never accepted;
//! * round trip: `verify(sign(app, openid, exp), now < exp)` gives back exactly
//!   (app, openid, exp); at or after `exp` it is `Expired`; under another key it is
//!   `BadSignature`. Tokens longer than verify's bound (1024 bytes) are `Malformed`,
//!   and the claims the service can actually sign (an appid of at most 64 bytes, an
//!   openid that passes `check_openid`) always stay within that bound.
#![no_main]

use arbitrary::Arbitrary;
use chrono::{DateTime, Utc};
use formid_ledger::secret::Secret;
use formid_ledger::session::{SessionClaims, SessionError, SessionKey};
use libfuzzer_sys::fuzz_target;

const KEY: &str = "fuzz-session-secret-0123456789abcdef";
const OTHER_KEY: &str = "another-session-secret-0123456789ab";
/// `session::MAX_TOKEN_LEN` (private there).
const MAX_TOKEN_LEN: usize = 1024;

#[derive(Arbitrary, Debug)]
struct Claims {
    app: String,
    openid: String,
    exp: i64,
}

impl Claims {
    fn expires_at(&self) -> DateTime<Utc> {
        DateTime::from_timestamp(self.exp, 0).unwrap_or(DateTime::UNIX_EPOCH)
    }
    fn signed(&self, key: &SessionKey) -> (String, SessionClaims) {
        let at = self.expires_at();
        let token = key.sign(&self.app, &self.openid, at).expose().to_string();
        let claims = SessionClaims {
            app_id: self.app.clone(),
            openid: self.openid.clone(),
            exp: at.timestamp(),
        };
        (token, claims)
    }
}

#[derive(Arbitrary, Debug)]
enum Edit {
    Insert { at: u16, byte: u8 },
    Remove { at: u16 },
    Replace { at: u16, byte: u8 },
    Truncate { at: u16 },
    Append(String),
    Prepend(String),
    /// Segment `seg` (split on '.') replaced by the same segment of the other token.
    Splice { seg: u8 },
    /// Segment `seg` replaced by arbitrary text.
    ReplaceSegment { seg: u8, with: String },
}

#[derive(Arbitrary, Debug)]
enum Input {
    Raw {
        token: String,
        now: i64,
    },
    Mutated {
        a: Claims,
        b: Claims,
        b_with_other_key: bool,
        now: i64,
        edits: Vec<Edit>,
    },
    RoundTrip {
        claims: Claims,
        ahead: u32,
    },
}

fn at(now: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(now, 0).unwrap_or(DateTime::UNIX_EPOCH)
}

fn apply(token: &str, other: &str, edit: &Edit) -> String {
    let mut bytes = token.as_bytes().to_vec();
    let idx = |at: u16, len: usize| if len == 0 { 0 } else { at as usize % len };
    match edit {
        Edit::Insert { at, byte } => {
            let i = idx(*at, bytes.len() + 1);
            bytes.insert(i, *byte);
        }
        Edit::Remove { at } => {
            if !bytes.is_empty() {
                let i = idx(*at, bytes.len());
                bytes.remove(i);
            }
        }
        Edit::Replace { at, byte } => {
            if !bytes.is_empty() {
                let i = idx(*at, bytes.len());
                bytes[i] = *byte;
            }
        }
        Edit::Truncate { at } => {
            let i = idx(*at, bytes.len() + 1);
            bytes.truncate(i);
        }
        Edit::Append(s) => bytes.extend_from_slice(s.as_bytes()),
        Edit::Prepend(s) => {
            let mut v = s.as_bytes().to_vec();
            v.extend_from_slice(&bytes);
            bytes = v;
        }
        Edit::Splice { seg } => {
            let mut mine: Vec<&str> = token.split('.').collect();
            let theirs: Vec<&str> = other.split('.').collect();
            let i = *seg as usize % mine.len();
            if let Some(t) = theirs.get(i) {
                mine[i] = t;
            }
            return mine.join(".");
        }
        Edit::ReplaceSegment { seg, with } => {
            let mut mine: Vec<&str> = token.split('.').collect();
            let i = *seg as usize % mine.len();
            mine[i] = with;
            return mine.join(".");
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

fuzz_target!(|input: Input| {
    let key = SessionKey::new(Secret::new(KEY));
    let other_key = SessionKey::new(Secret::new(OTHER_KEY));
    match input {
        Input::Raw { token, now } => {
            let now = at(now);
            let got = key.verify(&token, now);
            assert!(got.is_err(), "unsigned text accepted: {token:?} -> {got:?}");
        }
        Input::Mutated {
            a,
            b,
            b_with_other_key,
            now,
            edits,
        } => {
            let (ta, ca) = a.signed(&key);
            let (tb, cb) = b.signed(if b_with_other_key { &other_key } else { &key });
            let mut t = ta.clone();
            for e in edits.iter().take(16) {
                t = apply(&t, &tb, e);
            }
            let now = at(now);
            if let Ok(claims) = key.verify(&t, now) {
                let genuine = (t == ta && claims == ca) || (!b_with_other_key && t == tb && claims == cb);
                assert!(
                    genuine,
                    "accepted a token sign() did not produce:\n  token {t:?}\n  claims {claims:?}\n  signed a {ta:?}\n  signed b {tb:?}"
                );
                assert!(claims.exp > now.timestamp(), "expired token accepted: {claims:?} at {now}");
            }
        }
        Input::RoundTrip { claims, ahead } => {
            let (token, want) = claims.signed(&key);
            let realistic = claims.app.len() <= 64
                && !claims.app.is_empty()
                && formid_ledger::ledger::is_valid_value(&claims.app)
                && formid_ledger::ledger::is_valid_value(&claims.openid);
            if realistic {
                assert!(
                    token.len() <= MAX_TOKEN_LEN,
                    "a session the service can sign is longer than verify accepts: {} bytes",
                    token.len()
                );
            }
            let exp = want.exp;
            let Some(before) = exp
                .checked_sub(1)
                .and_then(|t| t.checked_sub(i64::from(ahead)))
                .and_then(|t| DateTime::from_timestamp(t, 0))
            else {
                return;
            };
            let got = key.verify(&token, before);
            if token.len() > MAX_TOKEN_LEN {
                assert_eq!(got, Err(SessionError::Malformed));
                return;
            }
            assert_eq!(got.as_ref(), Ok(&want), "round trip of {token:?}");
            assert_eq!(key.verify(&token, at(exp)), Err(SessionError::Expired));
            assert_eq!(
                other_key.verify(&token, before),
                Err(SessionError::BadSignature)
            );
        }
    }
});

//! What a WeChat `errcode` means for the caller: the ONE table of the project.
//!
//! Unknown errcodes are [`ErrorClass::Caller`]: the safe default, because a
//! caller error is neither charged to the user's credential nor retried forever
//! (a retry loop on an unknown code could spam WeChat; a charge could waste a use
//! the user still has). An unknown code is worth a look in the logs, not a guess.

/// How a failed WeChat call should be handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// The access token is invalid, superseded or expired: compare-and-refresh, retry once.
    Token,
    /// The user's credential itself is bad (wrong, expired, used up, no subscription left),
    /// or the login code is invalid: the use is charged / the code is dead.
    Credential,
    /// The caller's mistake (template, page, data, openid, appid/secret, …): not charged,
    /// not worth retrying as is.
    Caller,
    /// A quota of the account or a rate limit: wait, the credential was not used.
    Limit,
    /// WeChat is busy or unreachable and surely did not act on the request: retry with backoff.
    Transient,
    /// The request may have reached WeChat and had its effect, but no answer came back.
    Ambiguous,
}

/// `(errcode, class, meaning)`: every code WeChat documents for the calls this
/// project makes (token, jscode2session, template and subscribe sends), plus a few
/// neighbours.
pub const ERRCODES: &[(i64, ErrorClass, &str)] = &[
    (-1, ErrorClass::Transient, "system busy"),
    (
        40001,
        ErrorClass::Token,
        "access_token invalid or not latest (or wrong secret)",
    ),
    (40014, ErrorClass::Token, "invalid access_token"),
    (42001, ErrorClass::Token, "access_token expired"),
    (41028, ErrorClass::Credential, "form_id wrong or expired"),
    (41029, ErrorClass::Credential, "form_id already used"),
    (
        43101,
        ErrorClass::Credential,
        "user has no subscription left",
    ),
    (40029, ErrorClass::Credential, "invalid js_code"),
    (40002, ErrorClass::Caller, "invalid grant_type"),
    (40003, ErrorClass::Caller, "invalid openid"),
    (40013, ErrorClass::Caller, "invalid appid"),
    (40037, ErrorClass::Caller, "invalid template_id"),
    (40125, ErrorClass::Caller, "invalid appsecret"),
    (40164, ErrorClass::Caller, "caller IP not whitelisted"),
    (40226, ErrorClass::Caller, "high-risk user blocked"),
    (41001, ErrorClass::Caller, "access_token missing"),
    (41002, ErrorClass::Caller, "appid missing"),
    (41004, ErrorClass::Caller, "secret missing"),
    (41008, ErrorClass::Caller, "code missing"),
    (41030, ErrorClass::Caller, "invalid page"),
    (
        45103,
        ErrorClass::Caller,
        "API retired for this mini-program",
    ),
    (47001, ErrorClass::Caller, "data format error"),
    (
        47003,
        ErrorClass::Caller,
        "argument invalid (a data value breaks its format)",
    ),
    (45009, ErrorClass::Limit, "daily limit reached"),
    (45011, ErrorClass::Limit, "rate limit reached"),
    (
        43108,
        ErrorClass::Limit,
        "concurrent calls to the same openid",
    ),
];

/// The class of a non-zero `errcode`; unknown codes are [`ErrorClass::Caller`].
pub fn classify(errcode: i64) -> ErrorClass {
    ERRCODES
        .iter()
        .find(|(code, _, _)| *code == errcode)
        .map_or(ErrorClass::Caller, |(_, class, _)| *class)
}

/// Why `jscode2session` refused a login, as the mini-program must hear it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginRefusal {
    /// 40029: the code is invalid, used or expired; call `wx.login()` again.
    InvalidCode,
    /// 40226: WeChat blocked the user as high-risk.
    UserBlocked,
    /// 45011: WeChat's per-user login rate limit.
    RateLimited,
    /// WeChat did not answer (busy, unreachable, no reply).
    Unavailable,
    /// Anything else: the service's own fault (wrong appid or secret, …).
    Refused,
}

impl LoginRefusal {
    /// The refusal a failed `jscode2session` call means.
    pub fn of(errcode: Option<i64>, class: ErrorClass) -> Self {
        match (errcode, class) {
            (Some(40029), _) => LoginRefusal::InvalidCode,
            (Some(40226), _) => LoginRefusal::UserBlocked,
            (Some(45011), _) => LoginRefusal::RateLimited,
            (_, ErrorClass::Transient | ErrorClass::Ambiguous) => LoginRefusal::Unavailable,
            _ => LoginRefusal::Refused,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{classify, ErrorClass::*};

    #[test]
    fn login_refusals_follow_the_errcode() {
        use super::LoginRefusal::{self, *};
        assert_eq!(LoginRefusal::of(Some(40029), Credential), InvalidCode);
        assert_eq!(LoginRefusal::of(Some(40226), Caller), UserBlocked);
        assert_eq!(LoginRefusal::of(Some(45011), Limit), RateLimited);
        assert_eq!(LoginRefusal::of(Some(-1), Transient), Unavailable);
        assert_eq!(LoginRefusal::of(None, Ambiguous), Unavailable);
        assert_eq!(LoginRefusal::of(Some(40125), Caller), Refused);
    }

    #[test]
    fn every_documented_errcode_has_its_class() {
        let expected = [
            (-1, Transient),
            (40001, Token),
            (40014, Token),
            (42001, Token),
            (41028, Credential),
            (41029, Credential),
            (43101, Credential),
            (40029, Credential),
            (40002, Caller),
            (40003, Caller),
            (40013, Caller),
            (40037, Caller),
            (40125, Caller),
            (40164, Caller),
            (40226, Caller),
            (41002, Caller),
            (41004, Caller),
            (41030, Caller),
            (45103, Caller),
            (47003, Caller),
            (45009, Limit),
            (45011, Limit),
            (43108, Limit),
            // Not in the table: the documented default.
            (99999, Caller),
        ];
        for (code, class) in expected {
            assert_eq!(classify(code), class, "errcode {code}");
        }
    }
}

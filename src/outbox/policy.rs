//! The outcome policy: what a send's result means for the message and for the
//! credential use it holds. This is the ONE place that decides it.

use std::time::Duration;

use super::settle::MessageErrorCode;
use crate::wechat::client::WechatError;
use crate::wechat::errcode::ErrorClass;

/// Knobs of the policy (defaults in [`Policy::default`]).
#[derive(Debug, Clone)]
pub struct Policy {
    /// A credential issued less than this long ago that answers 41028 is not yet
    /// active (a fresh prepay_id): retry it rather than give it up.
    pub young_window: Duration,
    /// Delay before retrying a young credential.
    pub young_retry_delay: Duration,
    /// Young retries of one message; past them a 41028 is the credential's fault.
    pub young_max_retries: u32,
    /// Transient failures (-1, 5xx, timeouts) retried with the same credential.
    pub max_retries: u32,
    /// The same for a probe: a single-use credential whose earlier call may have
    /// delivered is sent again until WeChat answers (41029 proves the delivery,
    /// success proves there was none). A probe can never send a second message, so
    /// it outlasts a fault burst far longer before the message ends `outcome_unknown`.
    pub max_probe_retries: u32,
    /// First backoff after a transient failure; doubles each time, with jitter.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Credentials tried for one message before it fails.
    pub max_credentials: u32,
    /// Token refreshes within one attempt before it counts as transient.
    pub max_token_refreshes: u32,
    /// A user gets no two messages of one app closer than this (0: no gap).
    pub user_min_gap: Duration,
    /// Messages sent per user and app per Beijing day (0: no cap); past it a
    /// message waits for the next day.
    pub user_daily_cap: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            young_window: Duration::from_secs(60),
            young_retry_delay: Duration::from_secs(5),
            young_max_retries: 6,
            max_retries: 5,
            max_probe_retries: 20,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
            max_credentials: 5,
            max_token_refreshes: 2,
            user_min_gap: Duration::ZERO,
            user_daily_cap: 0,
        }
    }
}

/// What to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// WeChat accepted: the message is sent, the use is spent.
    Sent,
    /// Try the SAME credential again after a delay (a young credential's 41028).
    RetrySame { after: Duration },
    /// The credential itself is bad: mark it invalid (the use stays charged) and
    /// try the user's next one.
    NextCredential { invalidate: &'static str },
    /// Compare-and-refresh the token and call again; not an attempt on the credential.
    RefreshToken,
    /// Transient: retry the same credential with backoff. `ambiguous`: WeChat may
    /// have delivered.
    Backoff { ambiguous: bool },
    /// Final failure that is not the credential's: the use is given back.
    Fail { code: MessageErrorCode },
    /// The app's daily limit: pause the app's sending until the limit resets, give
    /// the use back, keep the message queued.
    PauseApp,
}

/// What the decision may depend on besides WeChat's answer.
#[derive(Debug, Clone, Copy)]
pub struct Context {
    /// Since the credential was issued: the backend's `issued_at` when it gave one,
    /// otherwise since it was reported.
    pub credential_age: Duration,
    /// Young retries this message has had.
    pub young_retries: u32,
    /// An earlier call of this message with this credential may have delivered.
    pub earlier_ambiguous: bool,
}

/// The policy table: errcode (or failure class) → action.
pub fn decide(result: &Result<(), WechatError>, ctx: Context, policy: &Policy) -> Action {
    let Err(e) = result else {
        return Action::Sent;
    };
    use Action::*;
    use ErrorClass::*;
    match (e.errcode, e.class) {
        (Some(41028), _)
            if ctx.credential_age < policy.young_window
                && ctx.young_retries < policy.young_max_retries =>
        {
            RetrySame {
                after: policy.young_retry_delay,
            }
        }
        (Some(41028), _) => NextCredential {
            invalidate: "41028",
        },
        // Our own earlier attempt used it: that one delivered.
        (Some(41029), _) if ctx.earlier_ambiguous => Sent,
        (Some(41029), _) => NextCredential {
            invalidate: "41029",
        },
        (Some(43101), _) => NextCredential {
            invalidate: "43101",
        },
        (Some(45009), _) => PauseApp,
        (Some(40037), _) => Fail {
            code: MessageErrorCode::TemplateInvalid,
        },
        (Some(41030), _) => Fail {
            code: MessageErrorCode::PageInvalid,
        },
        (Some(47003), _) => Fail {
            code: MessageErrorCode::DataInvalid,
        },
        (Some(40003), _) => Fail {
            code: MessageErrorCode::OpenidInvalid,
        },
        (Some(45103), _) => Fail {
            code: MessageErrorCode::TemplateApiRetired,
        },
        (_, Token) => RefreshToken,
        // Rate limits other than the daily one (45011, 43108) pass within seconds.
        (_, Transient | Limit) => Backoff { ambiguous: false },
        (_, Ambiguous) => Backoff { ambiguous: true },
        (_, Credential) => NextCredential {
            invalidate: "credential",
        },
        (_, Caller) => Fail {
            code: MessageErrorCode::WechatRejected,
        },
    }
}

/// Backoff before transient retry number `retry` (1-based): base·2^(retry−1), capped,
/// with ±25 % jitter so retries of many messages do not arrive together.
pub fn backoff(policy: &Policy, retry: u32) -> Duration {
    let exp = policy
        .backoff_base
        .saturating_mul(1u32 << retry.saturating_sub(1).min(20))
        .min(policy.backoff_max);
    let jitter = 0.75 + rand::random::<f64>() * 0.5;
    exp.mul_f64(jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(errcode: Option<i64>, class: ErrorClass) -> Result<(), WechatError> {
        Err(WechatError {
            class,
            errcode,
            message: String::new(),
        })
    }

    fn ctx(age_s: u64, ambiguous: bool) -> Context {
        Context {
            credential_age: Duration::from_secs(age_s),
            young_retries: 0,
            earlier_ambiguous: ambiguous,
        }
    }

    /// Issue 14.10: a young credential's 41028 is retried a bounded number of times
    /// per message; then it is the credential's fault like an old one's.
    #[test]
    fn young_retries_are_bounded() {
        let p = Policy::default();
        let young_41028 = |young_retries| {
            let ctx = Context {
                young_retries,
                ..ctx(3, false)
            };
            decide(&err(Some(41028), ErrorClass::Credential), ctx, &p)
        };
        for n in 0..p.young_max_retries {
            assert_eq!(
                young_41028(n),
                Action::RetrySame {
                    after: p.young_retry_delay
                },
                "{n}"
            );
        }
        assert_eq!(
            young_41028(p.young_max_retries),
            Action::NextCredential {
                invalidate: "41028"
            }
        );
        assert_eq!(p.young_max_retries, 6);
    }

    #[test]
    fn every_row_of_the_table() {
        use crate::wechat::errcode::classify;
        let p = Policy::default();
        let code =
            |c: i64, age: u64, amb: bool| decide(&err(Some(c), classify(c)), ctx(age, amb), &p);
        assert_eq!(decide(&Ok(()), ctx(0, false), &p), Action::Sent);
        assert_eq!(
            code(41028, 3, false),
            Action::RetrySame {
                after: Duration::from_secs(5)
            }
        );
        assert_eq!(
            code(41028, 61, false),
            Action::NextCredential {
                invalidate: "41028"
            }
        );
        assert_eq!(code(41029, 100, true), Action::Sent);
        assert_eq!(
            code(41029, 100, false),
            Action::NextCredential {
                invalidate: "41029"
            }
        );
        assert_eq!(
            code(43101, 0, false),
            Action::NextCredential {
                invalidate: "43101"
            }
        );
        for token in [40001, 42001, 40014] {
            assert_eq!(code(token, 0, false), Action::RefreshToken, "{token}");
        }
        assert_eq!(code(-1, 0, false), Action::Backoff { ambiguous: false });
        assert_eq!(code(45011, 0, false), Action::Backoff { ambiguous: false });
        assert_eq!(
            decide(&err(None, ErrorClass::Transient), ctx(0, false), &p),
            Action::Backoff { ambiguous: false }
        );
        assert_eq!(
            decide(&err(None, ErrorClass::Ambiguous), ctx(0, false), &p),
            Action::Backoff { ambiguous: true }
        );
        assert_eq!(
            code(40037, 0, false),
            Action::Fail {
                code: MessageErrorCode::TemplateInvalid
            }
        );
        assert_eq!(
            code(41030, 0, false),
            Action::Fail {
                code: MessageErrorCode::PageInvalid
            }
        );
        assert_eq!(
            code(47003, 0, false),
            Action::Fail {
                code: MessageErrorCode::DataInvalid
            }
        );
        assert_eq!(
            code(40003, 0, false),
            Action::Fail {
                code: MessageErrorCode::OpenidInvalid
            }
        );
        assert_eq!(code(45009, 0, false), Action::PauseApp);
        assert_eq!(
            code(99999, 0, false),
            Action::Fail {
                code: MessageErrorCode::WechatRejected
            }
        );
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = Policy::default();
        for retry in 1..30 {
            let d = backoff(&p, retry);
            let nominal = p
                .backoff_base
                .saturating_mul(1 << (retry - 1).min(20))
                .min(p.backoff_max);
            assert!(
                d >= nominal.mul_f64(0.75) && d <= nominal.mul_f64(1.25),
                "{retry}: {d:?}"
            );
        }
    }
}

//! Settlement: how one step of a message ends, as pure functions of the message row,
//! WeChat's answer, the [`Policy`] and the time. The sender makes the calls;
//! [`store::settle`](super::store::settle) writes a [`Settlement`] in one transaction.

use chrono::{DateTime, Days, FixedOffset, TimeDelta, Utc};
use serde::Serialize;

use super::policy::{self, decide, Action, Context, Policy};
use super::store::MessageRow;
use super::Status;
use crate::db::DbResult;
use crate::ledger::Kind;
use crate::wechat::client::WechatError;

/// What one attempt came to: stored in `message_attempts.outcome` and shown as the
/// message resource's `attempts[].outcome`, as [`AttemptOutcome::as_str`] spells it
/// (the OpenAPI document shows this enum).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AttemptOutcome {
    /// WeChat accepted the message.
    Sent,
    /// WeChat answered 41029 to a probe: an earlier, ambiguous call delivered.
    DeliveredEarlier,
    /// A young credential's 41028: the same credential again after a delay.
    RetryLater,
    /// WeChat says the credential is bad: it is invalidated, the next one is tried.
    CredentialInvalid,
    /// A transient failure (or a token WeChat kept refusing): retried with backoff.
    Retry,
    /// The call may have delivered (e.g. the connection dropped after sending).
    Ambiguous,
    /// A final failure that is not the credential's.
    Failed,
    /// 45009, the app's daily limit: the app's sending is paused.
    AppPaused,
    /// A worker died (or lost its lease) with the call in flight.
    Interrupted,
}

impl AttemptOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::Sent => "sent",
            AttemptOutcome::DeliveredEarlier => "delivered_earlier",
            AttemptOutcome::RetryLater => "retry_later",
            AttemptOutcome::CredentialInvalid => "credential_invalid",
            AttemptOutcome::Retry => "retry",
            AttemptOutcome::Ambiguous => "ambiguous",
            AttemptOutcome::Failed => "failed",
            AttemptOutcome::AppPaused => "app_paused",
            AttemptOutcome::Interrupted => "interrupted",
        }
    }
}

/// The contract's `error.code` of a message that ended `failed` or `no_quota` (the
/// OpenAPI document shows this enum).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MessageErrorCode {
    /// The user had no usable credential.
    NoQuota,
    /// 40037.
    TemplateInvalid,
    /// 41030.
    PageInvalid,
    /// 47003.
    DataInvalid,
    /// 40003.
    OpenidInvalid,
    /// 45103: the template-message API is retired for the app.
    TemplateApiRetired,
    /// Any other error WeChat blames on the caller.
    WechatRejected,
    /// WeChat kept failing transiently with one credential.
    RetriesExhausted,
    /// A call may have delivered and the credential cannot prove it: not sent again.
    OutcomeUnknown,
    /// A campaign recipient over the user's daily cap (`LEDGER_USER_DAILY_CAP`).
    PolicyLimited,
    /// Every credential tried was bad.
    CredentialsExhausted,
    /// The service's own fault, not the caller's nor WeChat's: the stored message
    /// body does not parse (see [`corrupt_body`]). The same code as the HTTP 500
    /// answer, so clients need no new vocabulary; the cause is in the service log.
    Internal,
}

impl MessageErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageErrorCode::NoQuota => "no_quota",
            MessageErrorCode::TemplateInvalid => "template_invalid",
            MessageErrorCode::PageInvalid => "page_invalid",
            MessageErrorCode::DataInvalid => "data_invalid",
            MessageErrorCode::OpenidInvalid => "openid_invalid",
            MessageErrorCode::TemplateApiRetired => "template_api_retired",
            MessageErrorCode::WechatRejected => "wechat_rejected",
            MessageErrorCode::RetriesExhausted => "retries_exhausted",
            MessageErrorCode::OutcomeUnknown => "outcome_unknown",
            MessageErrorCode::CredentialsExhausted => "credentials_exhausted",
            MessageErrorCode::Internal => "internal",
            MessageErrorCode::PolicyLimited => "policy_limited",
        }
    }
}

/// The final error of a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MessageError {
    pub code: MessageErrorCode,
    /// WeChat's errcode of the call that decided it, if any.
    pub wechat_errcode: Option<i32>,
    pub message: String,
}

/// One attempt to record: a WeChat call, or a call lost with its worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    pub wechat_errcode: Option<i32>,
    pub outcome: AttemptOutcome,
}

/// What happens to the held credential use when a step settles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialFate {
    /// The message keeps it for the next try.
    Keep,
    /// Spent (sent, or possibly sent): the message lets go of it, uses stay charged.
    Spent,
    /// Not the credential's fault: the use goes back to the user.
    Release,
    /// WeChat says the credential is bad: it is marked invalid (with this reason),
    /// the use stays charged.
    Invalidate(&'static str),
}

/// The end of one step of a message.
#[derive(Debug, Clone, PartialEq)]
pub struct Settlement {
    pub attempt: Option<Attempt>,
    pub credential: CredentialFate,
    pub status: Status,
    /// Set when the message ends failed or no_quota.
    pub error: Option<MessageError>,
    pub next_attempt_at: DateTime<Utc>,
    pub retries: i32,
    /// A call with the kept credential may have delivered.
    pub ambiguous: bool,
    /// Pause the app's sending until then (45009).
    pub pause_until: Option<DateTime<Utc>>,
    /// The message waits for the user to report a credential: if one was reported
    /// since the message was leased (its `wakes` moved), it is due at once instead.
    pub awaits_report: bool,
    /// The `msgid` WeChat returned for an accepted subscribe send (its sent event
    /// names the message by it).
    pub wechat_msgid: Option<String>,
}

impl Settlement {
    /// Keep the credential for another try at `at`.
    fn keep(status: Status, at: DateTime<Utc>, retries: i32, ambiguous: bool) -> Self {
        Settlement {
            attempt: None,
            credential: CredentialFate::Keep,
            status,
            error: None,
            next_attempt_at: at,
            retries,
            ambiguous,
            pause_until: None,
            awaits_report: false,
            wechat_msgid: None,
        }
    }

    /// Let go of the credential (by `fate`); queued again at `at` for the next one.
    fn let_go(fate: CredentialFate, at: DateTime<Utc>) -> Self {
        Settlement {
            credential: fate,
            ..Settlement::keep(Status::Queued, at, 0, false)
        }
    }

    /// A final status.
    fn finish(status: Status, fate: CredentialFate, now: DateTime<Utc>) -> Self {
        Settlement {
            status,
            ..Settlement::let_go(fate, now)
        }
    }

    /// Failed with `code`.
    fn failed(
        fate: CredentialFate,
        code: MessageErrorCode,
        wechat_errcode: Option<i32>,
        message: impl Into<String>,
        now: DateTime<Utc>,
    ) -> Self {
        Settlement {
            error: Some(MessageError {
                code,
                wechat_errcode,
                message: message.into(),
            }),
            ..Settlement::finish(Status::Failed, fate, now)
        }
    }

    /// A young credential's retry: the message's young retries grow by one.
    pub fn is_young_retry(&self) -> bool {
        self.attempt
            .is_some_and(|a| a.outcome == AttemptOutcome::RetryLater)
    }

    fn recording(self, wechat_errcode: Option<i32>, outcome: AttemptOutcome) -> Self {
        Settlement {
            attempt: Some(Attempt {
                wechat_errcode,
                outcome,
            }),
            ..self
        }
    }
}

/// The message's call was in flight when its worker died (or lost its lease):
/// WeChat may have delivered. A single-use credential is probed (sent again: 41029
/// then proves the delivery); anything else is `outcome_unknown`, never sent again.
pub fn interrupted(msg: &MessageRow, now: DateTime<Utc>) -> DbResult<Settlement> {
    let settlement = if can_probe(msg)? {
        Settlement::keep(Status::Sending, now, msg.retries, true)
    } else {
        outcome_unknown(None, now)
    };
    Ok(settlement.recording(None, AttemptOutcome::Interrupted))
}

/// No access token: no call, so no attempt on the credential; the step is taken
/// again after a backoff, the message as it is (`status` as stored).
pub fn no_token(
    msg: &MessageRow,
    status: Status,
    policy: &Policy,
    now: DateTime<Utc>,
) -> Settlement {
    let at = backoff_at(policy, msg.retries + 1, now);
    Settlement::keep(status, at, msg.retries, msg.ambiguous)
}

/// The user has no live credential: wait for one to be reported until the
/// message's `await_until`, otherwise `no_quota`.
pub fn no_credential(msg: &MessageRow, now: DateTime<Utc>) -> Settlement {
    match msg.await_until.map(|t| t.and_utc()).filter(|t| *t > now) {
        Some(until) => Settlement {
            awaits_report: true,
            ..Settlement::let_go(CredentialFate::Keep, until)
        },
        None => Settlement {
            error: Some(MessageError {
                code: MessageErrorCode::NoQuota,
                wechat_errcode: None,
                message: "the user has no usable credential".into(),
            }),
            ..Settlement::finish(Status::NoQuota, CredentialFate::Keep, now)
        },
    }
}

/// The send policy (`LEDGER_USER_MIN_GAP_S`, `LEDGER_USER_DAILY_CAP`) holds the
/// message back until `until`: no call, nothing spent, the message as it is.
pub fn held_by_policy(msg: &MessageRow, until: DateTime<Utc>) -> DbResult<Settlement> {
    Ok(Settlement::keep(
        msg.status()?,
        until,
        msg.retries,
        msg.ambiguous,
    ))
}

/// What the send policy says of a message before it spends anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyVerdict {
    Go,
    /// Not before then.
    Wait(DateTime<Utc>),
    /// A campaign recipient over the daily cap: it ends `skipped`.
    Skip,
}

/// The send policy for the user's next message: `last_sent` is the user's latest
/// sent message of the app, `sent_today` how many were sent since Beijing midnight.
/// Over the daily cap a single message waits for the next day; a campaign
/// recipient is skipped (the contract's rule: a campaign is today's news).
pub fn policy_verdict(
    policy: &Policy,
    last_sent: Option<DateTime<Utc>>,
    sent_today: i64,
    campaign: bool,
    now: DateTime<Utc>,
) -> PolicyVerdict {
    let gap = TimeDelta::from_std(policy.user_min_gap).unwrap_or(TimeDelta::MAX);
    let after_gap = last_sent
        .filter(|_| !gap.is_zero())
        .map(|t| t + gap)
        .filter(|t| *t > now);
    let capped = policy.user_daily_cap > 0 && sent_today >= i64::from(policy.user_daily_cap);
    match (capped, after_gap) {
        (true, _) if campaign => PolicyVerdict::Skip,
        (true, gap) => {
            let midnight = next_beijing_midnight(now);
            PolicyVerdict::Wait(gap.map_or(midnight, |g| g.max(midnight)))
        }
        (false, Some(at)) => PolicyVerdict::Wait(at),
        (false, None) => PolicyVerdict::Go,
    }
}

/// A campaign recipient the policy skips: final, nothing spent, no call.
pub fn skipped(now: DateTime<Utc>) -> Settlement {
    Settlement {
        error: Some(MessageError {
            code: MessageErrorCode::PolicyLimited,
            wechat_errcode: None,
            message: "the user reached LEDGER_USER_DAILY_CAP messages today".into(),
        }),
        ..Settlement::finish(Status::Skipped, CredentialFate::Keep, now)
    }
}

/// Start of the current Beijing day (UTC+8), in UTC.
pub fn beijing_day_start(now: DateTime<Utc>) -> DateTime<Utc> {
    next_beijing_midnight(now) - TimeDelta::days(1)
}

/// The stored body does not parse ([`MessageRow::content`]): the message fails with
/// `internal` and is never sent (a guess at its data could deliver a wrong message,
/// and retrying cannot repair a stored body). A held use goes back to the user
/// unless an earlier call with it may have delivered.
pub fn corrupt_body(msg: &MessageRow, now: DateTime<Utc>) -> Settlement {
    Settlement::failed(
        give_back(msg),
        MessageErrorCode::Internal,
        None,
        "the stored message does not parse; not sent (see the service log)",
        now,
    )
}

/// WeChat's answer to a call with the held credential, settled by the policy table.
pub fn outcome(
    msg: &MessageRow,
    result: &Result<(), WechatError>,
    policy: &Policy,
    now: DateTime<Utc>,
) -> DbResult<Settlement> {
    let ctx = Context {
        credential_age: credential_age(msg, now),
        young_retries: u32::try_from(msg.young_retries).unwrap_or(0),
        earlier_ambiguous: msg.ambiguous,
    };
    let errcode = result
        .as_ref()
        .err()
        .and_then(|e| e.errcode)
        .and_then(|c| i32::try_from(c).ok());
    let errmsg = result.as_ref().err().map_or("", |e| e.message.as_str());
    Ok(match decide(result, ctx, policy) {
        Action::Sent => {
            let outcome = if result.is_ok() {
                AttemptOutcome::Sent
            } else {
                AttemptOutcome::DeliveredEarlier
            };
            Settlement::finish(Status::Sent, CredentialFate::Spent, now)
                .recording(Some(errcode.unwrap_or(0)), outcome)
        }
        Action::RetrySame { after } => {
            Settlement::keep(Status::Sending, now + after, msg.retries, msg.ambiguous)
                .recording(errcode, AttemptOutcome::RetryLater)
        }
        Action::NextCredential { invalidate } => {
            let fate = CredentialFate::Invalidate(invalidate);
            let tried = msg.credentials_tried;
            let most = i32::try_from(policy.max_credentials).unwrap_or(i32::MAX);
            let settlement = if tried >= most {
                let message = format!("{tried} credentials tried, none usable");
                let code = MessageErrorCode::CredentialsExhausted;
                Settlement::failed(fate, code, errcode, message, now)
            } else {
                Settlement::let_go(fate, now)
            };
            settlement.recording(errcode, AttemptOutcome::CredentialInvalid)
        }
        // Token errors that outlived the refreshes are treated as transient.
        Action::RefreshToken => backoff(msg, errcode, errmsg, false, policy, now)?,
        Action::Backoff { ambiguous } => backoff(msg, errcode, errmsg, ambiguous, policy, now)?,
        Action::Fail { code } => Settlement::failed(give_back(msg), code, errcode, errmsg, now)
            .recording(errcode, AttemptOutcome::Failed),
        Action::PauseApp => {
            let until = next_beijing_midnight(now);
            Settlement {
                pause_until: Some(until),
                ..Settlement::let_go(give_back(msg), until)
            }
            .recording(errcode, AttemptOutcome::AppPaused)
        }
    })
}

/// Since the held credential was issued: a backend's `issued_at` hours old makes
/// it old, however recently it was reported. A row claimed before
/// `credential_issued_at` existed counts from the report.
fn credential_age(msg: &MessageRow, now: DateTime<Utc>) -> std::time::Duration {
    msg.credential_issued_at
        .or(msg.credential_created_at)
        .map(|t| (now - t.and_utc()).to_std().unwrap_or_default())
        .unwrap_or_default()
}

/// A transient (or, if `ambiguous`, possibly delivered) failure: the same
/// credential again after a backoff, within the policy's retries.
fn backoff(
    msg: &MessageRow,
    errcode: Option<i32>,
    errmsg: &str,
    ambiguous: bool,
    policy: &Policy,
    now: DateTime<Utc>,
) -> DbResult<Settlement> {
    let outcome = if ambiguous {
        AttemptOutcome::Ambiguous
    } else {
        AttemptOutcome::Retry
    };
    let retries = msg.retries + 1;
    // Past an ambiguous call the credential is single-use (else it ended below), and
    // every further call is a probe.
    let most = if ambiguous || msg.ambiguous {
        policy.max_probe_retries
    } else {
        policy.max_retries
    };
    let settlement = if ambiguous && !can_probe(msg)? {
        // A multi-use prepay_id or a subscription: another call could deliver a
        // second message, and 41029 would prove nothing.
        outcome_unknown(errcode, now)
    } else if retries > i32::try_from(most).unwrap_or(i32::MAX) {
        if ambiguous || msg.ambiguous {
            // A call may have delivered and no probe could prove it either way.
            outcome_unknown(errcode, now)
        } else {
            let message = format!("WeChat kept failing: {errmsg}");
            let code = MessageErrorCode::RetriesExhausted;
            Settlement::failed(CredentialFate::Release, code, errcode, message, now)
        }
    } else {
        let at = backoff_at(policy, retries, now);
        Settlement::keep(Status::Sending, at, retries, msg.ambiguous || ambiguous)
    };
    Ok(settlement.recording(errcode, outcome))
}

/// Failed, the use spent: a call may have delivered and nothing can prove it.
fn outcome_unknown(errcode: Option<i32>, now: DateTime<Utc>) -> Settlement {
    Settlement::failed(
        CredentialFate::Spent,
        MessageErrorCode::OutcomeUnknown,
        errcode,
        "the call may have reached WeChat and the credential cannot prove it; not sent again",
        now,
    )
}

/// A use the message lets go of for a reason that is not the credential's: it goes
/// back to the user, unless an earlier call with it may have delivered.
fn give_back(msg: &MessageRow) -> CredentialFate {
    if msg.ambiguous {
        CredentialFate::Spent
    } else {
        CredentialFate::Release
    }
}

/// Can an ambiguous call be repeated with the same credential? Only if it has a
/// single use: then WeChat answers 41029 if the earlier call delivered.
fn can_probe(msg: &MessageRow) -> DbResult<bool> {
    Ok(msg.credential_kind()? != Some(Kind::Subscription) && msg.credential_uses_total == Some(1))
}

/// When transient retry number `retries` (1-based) is due.
fn backoff_at(policy: &Policy, retries: i32, now: DateTime<Utc>) -> DateTime<Utc> {
    let delay = policy::backoff(policy, u32::try_from(retries).unwrap_or(1));
    now + TimeDelta::from_std(delay).unwrap_or(TimeDelta::seconds(1))
}

/// WeChat's daily limits reset at midnight, Beijing time (UTC+8).
pub fn next_beijing_midnight(now: DateTime<Utc>) -> DateTime<Utc> {
    let beijing =
        FixedOffset::east_opt(8 * 3600).unwrap_or_else(|| unreachable!("+8 h is a valid offset"));
    let local = now.with_timezone(&beijing).date_naive();
    local
        .checked_add_days(Days::new(1))
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .and_then(|t| t.and_local_timezone(beijing).single())
        .map_or(now + TimeDelta::days(1), |t| t.with_timezone(&Utc))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wechat::errcode::{classify, ErrorClass};
    use crate::wechat::wire::DataValue;
    use chrono::TimeZone;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 27, 8, 0, 0).unwrap()
    }

    /// A message holding one use of `kind` with `uses` uses, reported an hour ago.
    fn holding(kind: Kind, uses: i32) -> MessageRow {
        let t = (now() - TimeDelta::hours(1)).naive_utc();
        MessageRow {
            id: 7,
            app_id: "wxa".into(),
            openid: "u1".into(),
            template_id: "TPL".into(),
            channel: "template".into(),
            page: None,
            body: r#"{"data":{}}"#.into(),
            status: "sending".into(),
            credential_id: Some(3),
            credential_kind: Some(kind.as_str().into()),
            credential_value: (kind != Kind::Subscription).then(|| "v".into()),
            credential_uses_total: Some(uses),
            credential_created_at: Some(t),
            credentials_tried: 1,
            retries: 0,
            in_flight: true,
            ambiguous: false,
            error_code: None,
            wechat_errcode: None,
            error_message: None,
            await_until: None,
            next_attempt_at: t,
            lease_owner: Some("me".into()),
            lease_until: None,
            created_at: t,
            updated_at: t,
            finished_at: None,
            credential_issued_at: Some(t),
            young_retries: 0,
            wakes: 0,
            public_id: "msg_test".into(),
            wechat_msgid: None,
            delivery: None,
            send_at: None,
            campaign_id: None,
        }
    }

    fn form_id() -> MessageRow {
        holding(Kind::FormId, 1)
    }

    fn wechat(errcode: i64) -> Result<(), WechatError> {
        Err(WechatError {
            class: classify(errcode),
            errcode: Some(errcode),
            message: format!("errcode {errcode}"),
        })
    }

    /// The connection dropped after the request was sent.
    fn dropped() -> Result<(), WechatError> {
        Err(WechatError {
            class: ErrorClass::Ambiguous,
            errcode: None,
            message: "connection closed".into(),
        })
    }

    fn settle(msg: &MessageRow, result: Result<(), WechatError>) -> Settlement {
        outcome(msg, &result, &Policy::default(), now()).expect("a known kind")
    }

    /// The status and what becomes of the held use.
    fn end(s: &Settlement) -> (Status, CredentialFate) {
        (s.status, s.credential)
    }

    fn attempt(s: &Settlement) -> Option<(Option<i32>, &'static str)> {
        s.attempt.map(|a| (a.wechat_errcode, a.outcome.as_str()))
    }

    fn error(s: &Settlement) -> Option<(&'static str, Option<i32>)> {
        s.error
            .as_ref()
            .map(|e| (e.code.as_str(), e.wechat_errcode))
    }

    #[test]
    fn outcomes_and_codes_keep_the_contract_strings() {
        use AttemptOutcome::*;
        let outcomes = [
            (Sent, "sent"),
            (DeliveredEarlier, "delivered_earlier"),
            (RetryLater, "retry_later"),
            (CredentialInvalid, "credential_invalid"),
            (Retry, "retry"),
            (Ambiguous, "ambiguous"),
            (Failed, "failed"),
            (AppPaused, "app_paused"),
            (Interrupted, "interrupted"),
        ];
        for (outcome, s) in outcomes {
            assert_eq!(outcome.as_str(), s);
            assert_eq!(serde_json::to_value(outcome).unwrap(), s);
        }
        use MessageErrorCode as C;
        let codes = [
            (C::NoQuota, "no_quota"),
            (C::TemplateInvalid, "template_invalid"),
            (C::PageInvalid, "page_invalid"),
            (C::DataInvalid, "data_invalid"),
            (C::OpenidInvalid, "openid_invalid"),
            (C::TemplateApiRetired, "template_api_retired"),
            (C::WechatRejected, "wechat_rejected"),
            (C::RetriesExhausted, "retries_exhausted"),
            (C::OutcomeUnknown, "outcome_unknown"),
            (C::CredentialsExhausted, "credentials_exhausted"),
            (C::Internal, "internal"),
        ];
        for (code, s) in codes {
            assert_eq!(code.as_str(), s);
            assert_eq!(serde_json::to_value(code).unwrap(), s);
        }
    }

    #[test]
    fn accepted_is_sent_and_spends_the_use() {
        let s = settle(&form_id(), Ok(()));
        assert_eq!(end(&s), (Status::Sent, CredentialFate::Spent));
        assert_eq!(attempt(&s), Some((Some(0), "sent")));
        assert_eq!(s.error, None);
    }

    #[test]
    fn an_ambiguous_single_use_credential_is_probed() {
        let s = settle(&form_id(), dropped());
        assert_eq!(end(&s), (Status::Sending, CredentialFate::Keep));
        assert_eq!((s.retries, s.ambiguous), (1, true));
        assert!(s.next_attempt_at > now(), "the probe waits a backoff");
        assert_eq!(attempt(&s), Some((None, "ambiguous")));
        // The probe's 41029 proves the earlier call delivered.
        let probed = MessageRow {
            ambiguous: true,
            retries: 1,
            ..form_id()
        };
        let s = settle(&probed, wechat(41029));
        assert_eq!(end(&s), (Status::Sent, CredentialFate::Spent));
        assert_eq!(attempt(&s), Some((Some(41029), "delivered_earlier")));
    }

    #[test]
    fn an_ambiguous_multi_use_or_subscription_call_is_outcome_unknown() {
        for msg in [holding(Kind::PrepayId, 3), holding(Kind::Subscription, 1)] {
            let s = settle(&msg, dropped());
            assert_eq!(end(&s), (Status::Failed, CredentialFate::Spent));
            assert_eq!(error(&s), Some(("outcome_unknown", None)));
            assert_eq!(attempt(&s), Some((None, "ambiguous")));
        }
    }

    #[test]
    fn an_interrupted_call_is_probed_only_on_a_single_use_credential() {
        let msg = MessageRow {
            retries: 2,
            ..form_id()
        };
        let s = interrupted(&msg, now()).expect("a known kind");
        assert_eq!(end(&s), (Status::Sending, CredentialFate::Keep));
        assert_eq!(
            (s.next_attempt_at, s.retries, s.ambiguous),
            (now(), 2, true)
        );
        assert_eq!(attempt(&s), Some((None, "interrupted")));
        let s = interrupted(&holding(Kind::PrepayId, 3), now()).expect("a known kind");
        assert_eq!(end(&s), (Status::Failed, CredentialFate::Spent));
        assert_eq!(error(&s), Some(("outcome_unknown", None)));
        assert_eq!(attempt(&s), Some((None, "interrupted")));
    }

    #[test]
    fn transient_failures_retry_then_exhaust() {
        let p = Policy::default();
        let s = settle(&form_id(), wechat(-1));
        assert_eq!(end(&s), (Status::Sending, CredentialFate::Keep));
        assert_eq!((s.retries, s.ambiguous), (1, false));
        assert_eq!(attempt(&s), Some((Some(-1), "retry")));
        let last = MessageRow {
            retries: i32::try_from(p.max_retries).unwrap(),
            ..form_id()
        };
        let s = settle(&last, wechat(-1));
        assert_eq!(end(&s), (Status::Failed, CredentialFate::Release));
        assert_eq!(error(&s), Some(("retries_exhausted", Some(-1))));
        assert_eq!(s.error.unwrap().message, "WeChat kept failing: errcode -1");
        // An earlier call may have delivered: every call is a probe now, retried up to
        // the probes' bound, and past it the use stays charged.
        let probing = MessageRow {
            ambiguous: true,
            ..last
        };
        let s = settle(&probing, wechat(-1));
        assert_eq!(end(&s), (Status::Sending, CredentialFate::Keep));
        assert_eq!((s.retries, s.ambiguous), (probing.retries + 1, true));
        let s = settle(
            &MessageRow {
                retries: i32::try_from(p.max_probe_retries).unwrap(),
                ..probing
            },
            wechat(-1),
        );
        assert_eq!(end(&s), (Status::Failed, CredentialFate::Spent));
        assert_eq!(error(&s), Some(("outcome_unknown", Some(-1))));
    }

    #[test]
    fn a_token_wechat_keeps_refusing_counts_as_transient() {
        let s = settle(&form_id(), wechat(40001));
        assert_eq!(end(&s), (Status::Sending, CredentialFate::Keep));
        assert_eq!(attempt(&s), Some((Some(40001), "retry")));
    }

    #[test]
    fn a_young_credential_is_retried_after_the_delay() {
        let msg = MessageRow {
            credential_created_at: Some((now() - TimeDelta::seconds(3)).naive_utc()),
            credential_issued_at: Some((now() - TimeDelta::seconds(3)).naive_utc()),
            ..holding(Kind::PrepayId, 1)
        };
        let s = settle(&msg, wechat(41028));
        assert_eq!(end(&s), (Status::Sending, CredentialFate::Keep));
        assert_eq!(
            s.next_attempt_at,
            now() + Policy::default().young_retry_delay
        );
        assert_eq!(attempt(&s), Some((Some(41028), "retry_later")));
    }

    /// Issue 14.10: the age counts from the credential's `issued_at`, not from its
    /// report: a prepay_id reported a moment ago but issued 2 h ago is not young.
    #[test]
    fn a_credential_issued_long_ago_is_not_young_however_recently_reported() {
        let just = (now() - TimeDelta::seconds(3)).naive_utc();
        let msg = MessageRow {
            credential_created_at: Some(just),
            credential_issued_at: Some((now() - TimeDelta::hours(2)).naive_utc()),
            ..holding(Kind::PrepayId, 1)
        };
        let s = settle(&msg, wechat(41028));
        assert_eq!(
            end(&s),
            (Status::Queued, CredentialFate::Invalidate("41028"))
        );
        assert_eq!(attempt(&s), Some((Some(41028), "credential_invalid")));
        assert!(!s.is_young_retry());
        // Issued when reported: young. Claimed before the column existed: the
        // report's time counts.
        for issued in [Some(just), None] {
            let msg = MessageRow {
                credential_issued_at: issued,
                ..msg.clone()
            };
            let s = settle(&msg, wechat(41028));
            assert_eq!(
                attempt(&s),
                Some((Some(41028), "retry_later")),
                "{issued:?}"
            );
            assert!(s.is_young_retry());
        }
    }

    /// Issue 14.10: a young credential that keeps answering 41028 is retried at
    /// most `young_max_retries` times per message, then given up as invalid.
    #[test]
    fn young_retries_of_a_message_are_bounded() {
        let young = |young_retries| MessageRow {
            credential_created_at: Some((now() - TimeDelta::seconds(3)).naive_utc()),
            credential_issued_at: Some((now() - TimeDelta::seconds(3)).naive_utc()),
            young_retries,
            ..holding(Kind::PrepayId, 1)
        };
        let most = i32::try_from(Policy::default().young_max_retries).unwrap();
        let s = settle(&young(most - 1), wechat(41028));
        assert_eq!(attempt(&s), Some((Some(41028), "retry_later")));
        assert!(s.is_young_retry());
        let s = settle(&young(most), wechat(41028));
        assert_eq!(
            end(&s),
            (Status::Queued, CredentialFate::Invalidate("41028"))
        );
        assert_eq!(attempt(&s), Some((Some(41028), "credential_invalid")));
        assert!(!s.is_young_retry());
    }

    #[test]
    fn a_bad_credential_is_invalidated_until_the_credentials_are_exhausted() {
        let s = settle(&form_id(), wechat(43101));
        assert_eq!(
            end(&s),
            (Status::Queued, CredentialFate::Invalidate("43101"))
        );
        assert_eq!((s.next_attempt_at, s.error.as_ref()), (now(), None));
        assert_eq!(attempt(&s), Some((Some(43101), "credential_invalid")));
        let fifth = MessageRow {
            credentials_tried: 5,
            ..form_id()
        };
        let s = settle(&fifth, wechat(41028));
        assert_eq!(
            end(&s),
            (Status::Failed, CredentialFate::Invalidate("41028"))
        );
        assert_eq!(error(&s), Some(("credentials_exhausted", Some(41028))));
        assert_eq!(attempt(&s), Some((Some(41028), "credential_invalid")));
    }

    #[test]
    fn a_callers_error_fails_and_gives_the_use_back() {
        let s = settle(&form_id(), wechat(40037));
        assert_eq!(end(&s), (Status::Failed, CredentialFate::Release));
        assert_eq!(error(&s), Some(("template_invalid", Some(40037))));
        assert_eq!(attempt(&s), Some((Some(40037), "failed")));
    }

    #[test]
    fn the_send_policy_holds_by_gap_and_by_beijing_day() {
        let now = Utc.with_ymd_and_hms(2026, 11, 27, 10, 0, 0).unwrap();
        let midnight = Utc.with_ymd_and_hms(2026, 11, 27, 16, 0, 0).unwrap();
        let policy = |gap_s, cap| Policy {
            user_min_gap: std::time::Duration::from_secs(gap_s),
            user_daily_cap: cap,
            ..Policy::default()
        };
        let ago = |s| Some(now - TimeDelta::seconds(s));
        use PolicyVerdict::{Go, Skip, Wait};
        let single = |p, last, today| policy_verdict(&p, last, today, false, now);
        // No policy: never held.
        assert_eq!(single(policy(0, 0), ago(1), 1000), Go);
        // Gap of 60 s: 10 s after the last one waits 50 s more; 60 s after, none.
        assert_eq!(
            single(policy(60, 0), ago(10), 1),
            Wait(now + TimeDelta::seconds(50))
        );
        assert_eq!(single(policy(60, 0), ago(60), 1), Go);
        assert_eq!(single(policy(60, 0), None, 0), Go);
        // Cap of 3 a day: the 3rd sent today holds the next until Beijing midnight.
        assert_eq!(single(policy(0, 3), ago(3600), 2), Go);
        assert_eq!(single(policy(0, 3), ago(3600), 3), Wait(midnight));
        // Both: the later of the two.
        assert_eq!(single(policy(60, 3), ago(10), 3), Wait(midnight));
        // A campaign recipient over the cap is skipped; under it, the gap holds it.
        let campaign = |p, last, today| policy_verdict(&p, last, today, true, now);
        assert_eq!(campaign(policy(60, 3), ago(10), 3), Skip);
        assert_eq!(
            campaign(policy(60, 3), ago(10), 2),
            Wait(now + TimeDelta::seconds(50))
        );
        assert_eq!(campaign(policy(0, 3), None, 0), Go);
        assert_eq!(beijing_day_start(now), midnight - TimeDelta::days(1));
    }

    #[test]
    fn the_daily_limit_pauses_the_app_until_beijing_midnight() {
        let s = settle(&form_id(), wechat(45009));
        let midnight = Utc.with_ymd_and_hms(2026, 11, 27, 16, 0, 0).unwrap();
        assert_eq!(end(&s), (Status::Queued, CredentialFate::Release));
        assert_eq!(
            (s.pause_until, s.next_attempt_at),
            (Some(midnight), midnight)
        );
        assert_eq!(attempt(&s), Some((Some(45009), "app_paused")));
        assert_eq!(s.error, None);
    }

    #[test]
    fn without_a_credential_the_message_waits_or_is_no_quota() {
        let until = now() + TimeDelta::seconds(30);
        let waiting = MessageRow {
            credential_id: None,
            await_until: Some(until.naive_utc()),
            ..form_id()
        };
        let s = no_credential(&waiting, now());
        assert_eq!((s.status, s.next_attempt_at), (Status::Queued, until));
        assert_eq!(s.error, None);
        let s = no_credential(&waiting, until);
        assert_eq!(end(&s), (Status::NoQuota, CredentialFate::Keep));
        assert_eq!(error(&s), Some(("no_quota", None)));
        assert_eq!(s.attempt, None);
    }

    #[test]
    fn a_body_that_does_not_parse_is_an_error_not_empty_data() {
        let content = crate::outbox::Content {
            data: [(
                "keyword1".to_string(),
                DataValue {
                    value: "339208499".into(),
                    color: None,
                },
            )]
            .into(),
            emphasis_keyword: Some("keyword1.DATA".into()),
            miniprogram_state: None,
            lang: None,
        };
        let stored = MessageRow {
            body: serde_json::to_string(&content).unwrap(),
            ..form_id()
        };
        assert_eq!(stored.content().unwrap(), content);
        for body in [
            "",
            "not json",
            "{}",
            r#"{"data": 5}"#,
            r#"{"data":{"k":{"value":1}}}"#,
        ] {
            let msg = MessageRow {
                body: body.into(),
                ..form_id()
            };
            assert!(msg.content().is_err(), "{body:?} parsed");
        }
    }

    #[test]
    fn a_corrupt_message_fails_as_internal_without_an_attempt_or_a_spent_use() {
        let s = corrupt_body(&form_id(), now());
        assert_eq!(end(&s), (Status::Failed, CredentialFate::Release));
        assert_eq!(error(&s), Some(("internal", None)));
        assert_eq!(s.attempt, None, "no call was made");
        // An earlier call with the held use may have delivered: it stays charged.
        let ambiguous = MessageRow {
            ambiguous: true,
            ..form_id()
        };
        assert_eq!(
            corrupt_body(&ambiguous, now()).credential,
            CredentialFate::Spent
        );
    }

    #[test]
    fn the_daily_limit_resets_at_beijing_midnight() {
        // 15:59 UTC is 23:59 in Beijing: a minute to go.
        let now = Utc.with_ymd_and_hms(2026, 11, 27, 15, 59, 0).unwrap();
        assert_eq!(
            next_beijing_midnight(now),
            Utc.with_ymd_and_hms(2026, 11, 27, 16, 0, 0).unwrap()
        );
        // 16:00 UTC is midnight: the next one is a day later.
        let now = Utc.with_ymd_and_hms(2026, 11, 27, 16, 0, 0).unwrap();
        assert_eq!(
            next_beijing_midnight(now),
            Utc.with_ymd_and_hms(2026, 11, 28, 16, 0, 0).unwrap()
        );
    }
}

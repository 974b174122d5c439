//! WeChat's message push, applied: what a verified, decrypted push means for the
//! ledger and the outbox, in one transaction per push.
//!
//! - `subscribe_msg_popup_event`: each `accept` is a grant under the merge rule
//!   ([`ledger::record_pushed`]); every item is counted in `subscription_results`;
//! - `subscribe_msg_change_event`: a `reject` removes the user's live
//!   subscriptions to that template; counted;
//! - `subscribe_msg_sent_event`: the message with that msgid gets its `delivery`,
//!   or an `outcome_unknown` subscribe send is proven sent
//!   ([`outbox::delivery::apply_sent`]).
//!
//! WeChat retries a push it got no answer to: a push's identity (app, `MsgId`, or
//! `FromUserName` + `CreateTime` + `Event`) goes into `push_receipts` in the same
//! transaction, and a push already there is not applied again.

use chrono::{DateTime, Utc};
use diesel::prelude::*;

use crate::db::schema::push_receipts::dsl as r;
use crate::db::{write_tx, DbConn, DbResult};
use crate::dispatch;
use crate::ledger;
use crate::outbox::delivery::{self, DeliveryStatus, SentEvent};
use crate::outbox::store;
use crate::time::to_db;
use crate::webhooks::EventType;
use crate::wechat::push::{Push, PushBody};

/// What applying one push did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// The push was applied before (a WeChat retry): nothing done now.
    pub duplicate: bool,
    /// Not a subscribe-message event: nothing for the ledger.
    pub foreign: bool,
    pub grants: ledger::PushedResults,
    pub deliveries: u32,
    /// `outcome_unknown` messages the sent events proved sent.
    pub resolved: u32,
}

/// A push that is not a subscribe-message event, to go to the business's own
/// handler (`LEDGER_PUSH_FORWARD`) as WeChat sent it.
#[derive(Debug, Clone)]
pub struct Forward {
    pub url: String,
    pub content_type: String,
    pub body: String,
    /// Leased by this instance until then (it POSTs at once itself).
    pub lease: (String, DateTime<Utc>),
}

/// [`apply`], and a push that is not a subscribe-message event queued for the
/// business's own handler in the same transaction, leased to the caller: WeChat's
/// retries of it are neither applied nor forwarded again. Returns the forward's
/// delivery id when one was queued.
pub fn apply_and_forward(
    conn: &mut DbConn,
    app_id: &str,
    push: &Push,
    forward: Option<&Forward>,
    now: DateTime<Utc>,
) -> DbResult<(Applied, Option<i64>)> {
    write_tx(conn, |conn| {
        let applied = apply(conn, app_id, push, now)?;
        let queued = match forward {
            Some(f) if applied.foreign && !applied.duplicate => {
                Some(crate::webhooks::enqueue_forward_leased(
                    conn,
                    app_id,
                    &f.url,
                    &f.content_type,
                    &f.body,
                    Some((f.lease.0.as_str(), f.lease.1)),
                )?)
            }
            _ => None,
        };
        Ok((applied, queued))
    })
}

/// The identity WeChat's retries repeat.
pub fn identity(push: &Push) -> String {
    match (&push.msg_id, push.msg_type.as_str()) {
        (Some(id), t) if t != "event" => format!("msg:{id}"),
        _ => format!(
            "evt:{}:{}:{}",
            push.from_user,
            push.create_time,
            push.event.as_deref().unwrap_or("")
        ),
    }
}

/// Applies one push of `app_id`, once.
pub fn apply(
    conn: &mut DbConn,
    app_id: &str,
    push: &Push,
    now: DateTime<Utc>,
) -> DbResult<Applied> {
    let identity = identity(push);
    write_tx(conn, |conn| {
        let fresh = dispatch!(conn, |c| diesel::insert_into(r::push_receipts)
            .values((
                r::app_id.eq(app_id),
                r::identity.eq(&identity),
                r::received_at.eq(to_db(now)),
            ))
            .on_conflict_do_nothing()
            .execute(c))?;
        let mut applied = Applied {
            duplicate: fresh == 0,
            ..Applied::default()
        };
        if applied.duplicate {
            return Ok(applied);
        }
        let openid = push.from_user.as_str();
        match &push.body {
            PushBody::Popup(items) => {
                let pairs: Vec<(&str, &str)> = items
                    .iter()
                    .map(|i| (i.template_id.as_str(), i.status.as_str()))
                    .collect();
                applied.grants = ledger::record_pushed(conn, app_id, openid, &pairs, false, now)?;
            }
            PushBody::Change(items) => {
                // Item by item: a template whose last grants a reject removed is
                // `subscription.exhausted` (the moment to ask the user again).
                for item in items {
                    let pair = [(item.template_id.as_str(), item.status.as_str())];
                    let done = ledger::record_pushed(conn, app_id, openid, &pair, true, now)?;
                    if done.removed > 0 {
                        store::exhausted_if_last(
                            conn,
                            app_id,
                            openid,
                            &item.template_id,
                            None,
                            now,
                        )?;
                    }
                    applied.grants.merged += done.merged;
                    applied.grants.granted += done.granted;
                    applied.grants.removed += done.removed;
                }
            }
            PushBody::Sent(items) => {
                ledger::lock_user(conn, app_id, openid)?;
                for item in items {
                    let event = SentEvent {
                        app_id,
                        openid,
                        template_id: &item.template_id,
                        msgid: &item.msg_id,
                        status: DeliveryStatus::of(&item.error_code, &item.error_status),
                        error_status: &item.error_status,
                    };
                    match delivery::apply_sent(conn, &event, now)? {
                        delivery::Delivered::Message(id) => {
                            store::message_event(conn, id, app_id, EventType::MessageDelivery)?;
                            applied.deliveries += 1;
                        }
                        delivery::Delivered::Resolved(id) => {
                            log::info!(
                                "message {id}: WeChat's sent event proves the ambiguous send was accepted; sent"
                            );
                            store::message_event(conn, id, app_id, EventType::MessageFinished)?;
                            store::message_event(conn, id, app_id, EventType::MessageDelivery)?;
                            applied.deliveries += 1;
                            applied.resolved += 1;
                        }
                        delivery::Delivered::Unmatched => {}
                    }
                }
            }
            PushBody::Other => applied.foreign = true,
        }
        Ok(applied)
    })
}

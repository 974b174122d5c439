//! The outbox store's races, step by step through the domain functions (the sender's
//! steps are interleaved by hand, so the race is hit every time, not by chance).

use chrono::{DateTime, TimeDelta, TimeZone, Utc};

use crate::helpers::ledger::{self, Item, Kind, Report, Rules};
use crate::helpers::outbox::settle;
use crate::helpers::outbox::store::{self, Inserted, NewMessageRow};
use crate::helpers::outbox::{Channel, Status};
use crate::helpers::{backend_tests, Db};

const APP: &str = "wxapp";

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 27, 8, 0, 0).unwrap()
}

fn db_time(t: DateTime<Utc>) -> chrono::NaiveDateTime {
    t.naive_utc()
}

/// A message for `u` that waits up to `wait` for a credential.
fn queue(db: &Db, wait: TimeDelta) -> i64 {
    let mut conn = db.get().unwrap();
    let row = NewMessageRow {
        public_id: "msg_race".into(),
        app_id: APP.into(),
        openid: "u".into(),
        template_id: "TPL".into(),
        channel: Channel::Template.as_str(),
        page: None,
        body: r#"{"data":{}}"#.into(),
        status: Status::Queued.as_str(),
        await_until: Some(db_time(t0() + wait)),
        next_attempt_at: db_time(t0()),
        created_at: db_time(t0()),
        updated_at: db_time(t0()),
        send_at: None,
        campaign_id: None,
        finished_at: None,
    };
    match store::insert(&mut conn, &row, None).unwrap() {
        Inserted::New(id) => id,
        other => panic!("{other:?}"),
    }
}

/// What the reporting service does for one report: record it and wake the user's
/// waiting messages, in one transaction.
fn report_form_id(db: &Db, value: &str, now: DateTime<Utc>) {
    let mut conn = db.get().unwrap();
    let report = Report {
        app_id: APP.into(),
        openid: "u".into(),
        items: vec![Item::Token {
            kind: Kind::FormId,
            value: value.into(),
            issued_at: None,
        }],
    };
    let outcome = ledger::record(&mut conn, &Rules::default(), now, &[report]).unwrap();
    assert_eq!(outcome.accepted, 1);
    store::wake_waiting_many(&mut conn, APP, &["u"], now).unwrap();
}

fn next_attempt_at(db: &Db, id: i64) -> DateTime<Utc> {
    let mut conn = db.get().unwrap();
    let (msg, _) = store::load(&mut conn, id).unwrap().unwrap();
    msg.next_attempt_at.and_utc()
}

backend_tests! {
    /// The sender looks, finds nothing, and settles "wait for a report"; a report
    /// that commits between the look and the settlement must still make the message
    /// due at once (before, the settlement overwrote the report's wake-up and the
    /// message slept until `await_until`).
    fn a_report_between_the_look_and_the_wait_still_wakes_the_message(tdb) {
        let db = tdb.connect(2);
        let id = queue(&db, TimeDelta::minutes(10));
        let now = t0() + TimeDelta::seconds(1);
        let mut conn = db.get().unwrap();
        let msg = store::lease_next(&mut conn, "w1", now, now + TimeDelta::seconds(30)).unwrap().unwrap();
        assert_eq!(msg.id, id);
        assert!(store::claim_credential(&mut conn, &msg, "w1", now).unwrap().is_none(), "nothing to claim yet");
        report_form_id(&db, "f1", now);
        let wait = settle::no_credential(&msg, now);
        assert!(wait.next_attempt_at > now, "the settlement on its own would wait");
        assert!(store::settle(&mut conn, &msg, "w1", &wait, now).unwrap());
        assert!(next_attempt_at(&db, id) <= now, "woken, not asleep until await_until");
        // Due, so the next look claims the reported credential.
        let msg = store::lease_next(&mut conn, "w1", now, now + TimeDelta::seconds(30)).unwrap().unwrap();
        let held = store::claim_credential(&mut conn, &msg, "w1", now).unwrap().unwrap();
        assert_eq!(held.credential_value.as_deref(), Some("f1"));
    }

    /// Without a report meanwhile the message does sleep until `await_until` (the
    /// fix does not turn waiting into polling), and a later report wakes it.
    fn a_message_without_a_report_waits_until_one_comes(tdb) {
        let db = tdb.connect(2);
        let id = queue(&db, TimeDelta::minutes(10));
        let now = t0() + TimeDelta::seconds(1);
        let mut conn = db.get().unwrap();
        let msg = store::lease_next(&mut conn, "w1", now, now + TimeDelta::seconds(30)).unwrap().unwrap();
        assert!(store::claim_credential(&mut conn, &msg, "w1", now).unwrap().is_none());
        assert!(store::settle(&mut conn, &msg, "w1", &settle::no_credential(&msg, now), now).unwrap());
        assert_eq!(next_attempt_at(&db, id), t0() + TimeDelta::minutes(10));
        assert!(store::lease_next(&mut conn, "w1", now, now + TimeDelta::seconds(30)).unwrap().is_none());
        let later = now + TimeDelta::seconds(5);
        report_form_id(&db, "f2", later);
        assert_eq!(next_attempt_at(&db, id), later);
    }
}

//! Purging what is past its retention, and nothing else.

use chrono::{TimeDelta, Utc};
use diesel::prelude::*;

use crate::helpers::ledger::{self, Item, Report, Rules};
use crate::helpers::outbox::{self, Content, IdempotencyKey, NewMessage, Submitted};
use crate::helpers::schema::messages::dsl as m;
use crate::helpers::{backend_tests, dispatch, purge, DbConn, Purged, Retention};

fn message(openid: &str) -> NewMessage {
    NewMessage {
        app_id: "wxapp".into(),
        openid: openid.into(),
        template_id: "T".into(),
        channel: outbox::Channel::Template,
        page: None,
        content: Content {
            data: Default::default(),
            emphasis_keyword: None,
            miniprogram_state: None,
            lang: None,
        },
        await_credential_s: 0,
        send_at: None,
    }
}

backend_tests! {
    fn old_finished_messages_and_keys_go_the_rest_stays(tdb) {
        let db = tdb.connect(2);
        let mut conn = db.get().unwrap();
        let now = Utc::now();
        let key = |k: &str| IdempotencyKey { scope: "shop".into(), key: k.into() };
        // 40 days old and finished; 40 days old but unfinished; 1 day old finished.
        let submit = |conn: &mut DbConn, openid: &str, k: &str, age: TimeDelta| {
            match outbox::submit(conn, &message(openid), Some(&key(k)), now - age).unwrap() {
                Submitted::Message(id) => id,
                Submitted::Mismatch => unreachable!(),
            }
        };
        let old_done = submit(&mut conn, "a", "k1", TimeDelta::days(40));
        let _old_queued = submit(&mut conn, "b", "k2", TimeDelta::days(40));
        let recent_done = submit(&mut conn, "c", "k3", TimeDelta::days(1));
        dispatch!(&mut *conn, |c| diesel::update(m::messages.filter(m::id.eq_any([old_done, recent_done])))
            .set(m::status.eq("sent"))
            .execute(c))
            .unwrap();
        let expected = Purged { credentials: 0, subscription_results: 0, messages: 1, idempotency_keys: 2, app_pauses: 0, webhook_deliveries: 0, push_receipts: 0 };
        let retention = Retention::default();
        assert_eq!(purge(&mut conn, &retention, now, true).unwrap(), expected, "dry run");
        assert_eq!(purge(&mut conn, &retention, now, false).unwrap(), expected);
        assert_eq!(purge(&mut conn, &retention, now, false).unwrap(), Purged::default(), "nothing left to purge");
        assert!(outbox::view(&mut conn, old_done).unwrap().is_none());
        assert!(outbox::view(&mut conn, recent_done).unwrap().is_some());
        // The 1-day-old key is kept: its retry still finds its message.
        assert!(matches!(outbox::submit(&mut conn, &message("c"), Some(&key("k3")), now).unwrap(), Submitted::Message(id) if id == recent_done));
    }

    /// Issue 14.4: subscription results go with the others, once no report touched
    /// them for the credential retention.
    fn subscription_results_not_reported_again_within_the_retention_go(tdb) {
        let db = tdb.connect(2);
        let mut conn = db.get().unwrap();
        let now = Utc::now();
        let retention = Retention::default();
        let report = |conn: &mut DbConn, openid: &str, template_id: &str, at| {
            let items = vec![Item::Subscription { template_id: template_id.into(), result: "reject".into() }];
            let report = Report { app_id: "wxapp".into(), openid: openid.into(), items };
            ledger::record(conn, &Rules::default(), at, &[report]).unwrap();
        };
        let week = TimeDelta::from_std(retention.credentials).unwrap();
        report(&mut conn, "stale", "T1", now - week - TimeDelta::days(1));
        report(&mut conn, "stale", "T2", now - week - TimeDelta::days(1));
        report(&mut conn, "fresh", "T1", now - week - TimeDelta::days(1));
        report(&mut conn, "fresh", "T1", now - TimeDelta::days(1));
        let expected = Purged { subscription_results: 2, ..Purged::default() };
        assert_eq!(purge(&mut conn, &retention, now, true).unwrap(), expected, "dry run");
        assert_eq!(purge(&mut conn, &retention, now, false).unwrap(), expected);
        assert_eq!(purge(&mut conn, &retention, now, false).unwrap(), Purged::default(), "nothing left to purge");
        assert!(ledger::quota(&mut conn, "wxapp", "stale", now).unwrap().subscription_results.is_empty());
        let fresh = ledger::quota(&mut conn, "wxapp", "fresh", now).unwrap().subscription_results;
        assert_eq!(fresh["T1"]["reject"], 2, "a result reported again is kept, with its count");
    }
}

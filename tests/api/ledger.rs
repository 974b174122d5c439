//! The ledger's rules, on both backends, through the domain functions.

use std::collections::HashSet;
use std::sync::{Arc, Barrier};

use chrono::{DateTime, TimeDelta, TimeZone, Utc};

use crate::helpers::ledger::{self, Item, Kind, RejectReason, Report, Rules};
use crate::helpers::{self, backend_tests, Db};

const APP: &str = "wxapp";

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 27, 8, 0, 0).unwrap()
}

fn form(value: &str) -> Item {
    Item::Token {
        kind: Kind::FormId,
        value: value.into(),
        issued_at: None,
    }
}

fn prepay(value: &str) -> Item {
    Item::Token {
        kind: Kind::PrepayId,
        value: value.into(),
        issued_at: None,
    }
}

fn issued(kind: Kind, value: &str, at: DateTime<Utc>) -> Item {
    Item::Token {
        kind,
        value: value.into(),
        issued_at: Some(at),
    }
}

fn sub(template: &str, result: &str) -> Item {
    Item::Subscription {
        template_id: template.into(),
        result: result.into(),
    }
}

fn record_at(
    db: &Db,
    rules: &Rules,
    now: DateTime<Utc>,
    openid: &str,
    items: Vec<Item>,
) -> ledger::RecordOutcome {
    let mut conn = db.get().unwrap();
    ledger::record(
        &mut conn,
        rules,
        now,
        &[Report {
            app_id: APP.into(),
            openid: openid.into(),
            items,
        }],
    )
    .unwrap()
}

fn record(db: &Db, openid: &str, items: Vec<Item>) -> ledger::RecordOutcome {
    record_at(db, &Rules::default(), t0(), openid, items)
}

fn claim_at(
    db: &Db,
    openid: &str,
    template: Option<&str>,
    now: DateTime<Utc>,
) -> Option<ledger::Use> {
    let mut conn = db.get().unwrap();
    let pick = template.map_or(ledger::Pick::Tokens, ledger::Pick::SubscriptionFirst);
    ledger::claim(&mut conn, APP, openid, pick, now).unwrap()
}

/// The value of the credential a claim took, or None.
fn claimed_value(
    db: &Db,
    openid: &str,
    template: Option<&str>,
    now: DateTime<Utc>,
) -> Option<String> {
    claim_at(db, openid, template, now).map(|u| {
        u.credential
            .value
            .clone()
            .unwrap_or_else(|| format!("sub:{}", u.credential.template_id.clone().unwrap()))
    })
}

fn reasons(outcome: &ledger::RecordOutcome) -> Vec<(String, RejectReason)> {
    outcome
        .rejected
        .iter()
        .map(|r| (r.value.clone(), r.reason))
        .collect()
}

backend_tests! {
    fn record_counts_accepted_duplicates_and_rejections(tdb) {
        let db = tdb.connect(2);
        let out = record(&db, "u1", vec![
            form("f1"),
            form("f1"),
            prepay("p1"),
            form(ledger::MOCK_FORM_ID),
            form("has space"),
            form(""),
            form(&"x".repeat(129)),
            sub("TPL_A", "accept"),
            sub("TPL_A", "reject"),
            sub("TPL_B", "ban"),
        ]);
        assert_eq!(out.accepted, 3, "{out:?}");
        assert_eq!(out.duplicates, 1);
        assert_eq!(reasons(&out), vec![
            (ledger::MOCK_FORM_ID.to_string(), RejectReason::MockFormId),
            ("has space".into(), RejectReason::InvalidFormat),
            (String::new(), RejectReason::InvalidFormat),
            ("x".repeat(129), RejectReason::InvalidFormat),
            ("TPL_A".into(), RejectReason::NotAccepted),
            ("TPL_B".into(), RejectReason::NotAccepted),
        ]);
        // A value already known to the app is a duplicate, whoever reports it again;
        // the same value in another app is not.
        assert_eq!(record(&db, "u2", vec![form("f1"), prepay("p1")]).duplicates, 2);
        let mut conn = db.get().unwrap();
        let other_app = ledger::record(&mut conn, &Rules::default(), t0(), &[Report {
            app_id: "wxother".into(), openid: "u1".into(), items: vec![form("f1")],
        }]).unwrap();
        assert_eq!(other_app.accepted, 1);
        let q = ledger::quota(&mut conn, APP, "u1", t0()).unwrap();
        assert_eq!(q.sendable, 2);
        assert_eq!(q.subscriptions.get("TPL_A"), Some(&1));
        assert_eq!(ledger::quota(&mut conn, APP, "u2", t0()).unwrap().sendable, 0);
    }

    fn the_user_cap_admits_the_first_ones_and_counts_only_live_credentials(tdb) {
        let db = tdb.connect(2);
        let rules = Rules { user_cap: 3, ..Rules::default() };
        let out = record_at(&db, &rules, t0(), "u", vec![form("a"), form("b"), form("a"), sub("T", "accept"), form("c")]);
        assert_eq!((out.accepted, out.duplicates), (3, 1));
        assert_eq!(reasons(&out), vec![("c".to_string(), RejectReason::UserCap)]);
        // Spending one makes room for one.
        assert!(claim_at(&db, "u", None, t0()).is_some());
        let out = record_at(&db, &rules, t0(), "u", vec![form("d"), form("e")]);
        assert_eq!(out.accepted, 1);
        assert_eq!(reasons(&out), vec![("e".to_string(), RejectReason::UserCap)]);
        // Another user is not affected.
        assert_eq!(record_at(&db, &rules, t0(), "v", vec![form("e")]).accepted, 1);
        // The same in one group commit of several requests: a value refused for the
        // cap is not known, so its second report is refused too, not a duplicate;
        // an admitted value's second report is a duplicate.
        let reports: Vec<Vec<Report>> = ["f", "g", "g", "f"]
            .iter()
            .map(|v| vec![Report { app_id: APP.into(), openid: "v".into(), items: vec![form(v)] }])
            .collect();
        let slices: Vec<&[Report]> = reports.iter().map(Vec::as_slice).collect();
        let rules = Rules { user_cap: 2, ..Rules::default() };
        let outs = ledger::record_group(&mut db.get().unwrap(), &rules, t0(), &slices).unwrap();
        let summary: Vec<_> = outs.iter().map(|o| (o.accepted, o.duplicates, reasons(o))).collect();
        assert_eq!(summary, vec![
            (1, 0, vec![]),
            (0, 0, vec![("g".to_string(), RejectReason::UserCap)]),
            (0, 0, vec![("g".to_string(), RejectReason::UserCap)]),
            (0, 1, vec![]),
        ]);
    }

    /// One group commit whose users are far from the cap (PostgreSQL stores them
    /// with one statement) and near it (the rules, one token at a time) answers as
    /// the rules do for each request: on SQLite everything takes the rules' path, so
    /// the same expectations on both backends compare the two.
    fn a_group_of_users_near_and_far_from_the_cap_answers_as_the_rules_do(tdb) {
        let db = tdb.connect(2);
        let rules = Rules { user_cap: 5, ..Rules::default() };
        let forms = |vs: &[&str]| vs.iter().map(|v| form(v)).collect::<Vec<_>>();
        assert_eq!(record_at(&db, &rules, t0(), "full", forms(&["a1", "a2", "a3", "a4"])).accepted, 4);
        assert_eq!(record_at(&db, &rules, t0(), "roomy", forms(&["k1"])).accepted, 1);
        let report = |openid: &str, values: &[&str]| Report {
            app_id: APP.into(), openid: openid.into(), items: forms(values),
        };
        let requests: Vec<Vec<Report>> = vec![
            vec![report("roomy", &["n1", "k1"])],
            vec![report("full", &["f1", "f2"]), report("roomy", &["n2"])],
            vec![report("roomy", &["n1"])],
            vec![report("full", &["a1"])],
            vec![report("fresh", &["k1", "m1"])],
        ];
        let slices: Vec<&[Report]> = requests.iter().map(Vec::as_slice).collect();
        let outs = ledger::record_group(&mut db.get().unwrap(), &rules, t0(), &slices).unwrap();
        let summary: Vec<_> = outs.iter().map(|o| (o.accepted, o.duplicates, reasons(o))).collect();
        assert_eq!(summary, vec![
            (1, 1, vec![]),
            (2, 0, vec![("f2".to_string(), RejectReason::UserCap)]),
            (0, 1, vec![]),
            (0, 1, vec![]),
            (1, 1, vec![]),
        ]);
        let mut conn = db.get().unwrap();
        for (openid, sendable) in [("roomy", 3), ("full", 5), ("fresh", 1)] {
            assert_eq!(ledger::quota(&mut conn, APP, openid, t0()).unwrap().sendable, sendable, "{openid}");
        }
    }

    /// Issue 14.4: invented templates and results cannot grow a user's rows
    /// without bound; a result outside the four is refused, and a template new to
    /// a user who has results for the cap's worth is refused and counted nowhere.
    fn subscription_results_are_known_results_for_a_bounded_set_of_templates(tdb) {
        let db = tdb.connect(2);
        let rules = Rules { subscription_templates_per_user: 2, ..Rules::default() };
        let out = record_at(&db, &rules, t0(), "u", vec![
            sub("A", "accept"), sub("B", "reject"), sub("C", "accept"), sub("A", "ban"), sub("A", "bogus"),
        ]);
        assert_eq!(out.accepted, 1, "{out:?}");
        assert_eq!(reasons(&out), vec![
            ("A".to_string(), RejectReason::InvalidResult),
            ("B".to_string(), RejectReason::NotAccepted),
            ("C".to_string(), RejectReason::TemplateCap),
            ("A".to_string(), RejectReason::NotAccepted),
        ]);
        // The cap holds across reports; known templates still count; other users
        // have their own.
        let out = record_at(&db, &rules, t0(), "u", vec![sub("C", "accept"), sub("B", "accept")]);
        assert_eq!(out.accepted, 1);
        assert_eq!(reasons(&out), vec![("C".to_string(), RejectReason::TemplateCap)]);
        assert_eq!(record_at(&db, &rules, t0(), "v", vec![sub("C", "accept")]).accepted, 1);
        let mut conn = db.get().unwrap();
        let q = ledger::quota(&mut conn, APP, "u", t0()).unwrap();
        assert_eq!(q.subscriptions, [("A".to_string(), 1), ("B".to_string(), 1)].into());
        let results: Vec<_> = q.subscription_results.iter()
            .flat_map(|(t, by)| by.iter().map(move |(r, n)| (t.as_str(), r.as_str(), *n)))
            .collect();
        assert_eq!(results, vec![("A", "accept", 1), ("A", "ban", 1), ("B", "accept", 1), ("B", "reject", 1)]);
    }

    fn expiry_is_seven_days_less_the_margin_and_issued_at_only_moves_it_earlier(tdb) {
        let db = tdb.connect(2);
        let margin = Rules::default().expiry_margin;
        assert_eq!(margin, TimeDelta::minutes(10));
        let out = record(&db, "u", vec![
            form("now"),
            issued(Kind::FormId, "future", t0() + TimeDelta::days(3)),
            issued(Kind::PrepayId, "old", t0() - TimeDelta::days(6)),
            issued(Kind::FormId, "too-old", t0() - TimeDelta::days(7) + TimeDelta::minutes(5)),
        ]);
        assert_eq!(out.accepted, 3);
        assert_eq!(reasons(&out), vec![("too-old".to_string(), RejectReason::Expired)]);
        let mut conn = db.get().unwrap();
        let q = ledger::quota(&mut conn, APP, "u", t0()).unwrap();
        let week = t0() + TimeDelta::days(7) - margin;
        // A future issued_at is clamped to now: never later than 7 days from now.
        assert_eq!(q.by_kind[&Kind::FormId].next_expiry, Some(week));
        assert_eq!(q.by_kind[&Kind::PrepayId].next_expiry, Some(week - TimeDelta::days(6)));
        assert_eq!(q.expiring_within_24h, 1);
        drop(conn);
        // Just before the margin starts both form_ids are usable, inside it none is.
        let before = week - TimeDelta::seconds(1);
        assert!(claim_at(&db, "u", None, before).is_some());
        assert!(claim_at(&db, "u", None, week).is_none());
    }

    fn prepay_ids_get_the_configured_uses(tdb) {
        let db = tdb.connect(2);
        let rules = Rules { prepay_id_uses: 3, ..Rules::default() };
        record_at(&db, &rules, t0(), "u", vec![prepay("p"), form("f")]);
        let mut conn = db.get().unwrap();
        let q = ledger::quota(&mut conn, APP, "u", t0()).unwrap();
        assert_eq!(q.by_kind[&Kind::PrepayId].uses_left, 3);
        assert_eq!(q.by_kind[&Kind::FormId].uses_left, 1);
        assert_eq!(q.sendable, 4);
        drop(conn);
        let values: Vec<_> = (0..5).map(|_| claimed_value(&db, "u", None, t0())).collect();
        let p = Some("p".to_string());
        let f = Some("f".to_string());
        // Same expiry: the older report (the prepay_id) goes first, all three uses.
        assert_eq!(values, vec![p.clone(), p.clone(), p, f, None]);
    }

    fn claim_takes_the_soonest_expiry_first_and_subscriptions_for_their_template(tdb) {
        let db = tdb.connect(2);
        record(&db, "u", vec![
            issued(Kind::FormId, "late", t0()),
            issued(Kind::FormId, "early", t0() - TimeDelta::days(2)),
            issued(Kind::PrepayId, "middle", t0() - TimeDelta::days(1)),
            sub("TPL_A", "accept"),
            sub("TPL_B", "accept"),
        ]);
        let got: Vec<_> = [Some("TPL_A"), Some("TPL_C"), None, Some("TPL_A"), None, None]
            .iter()
            .map(|t| claimed_value(&db, "u", *t, t0()))
            .collect();
        assert_eq!(got, vec![
            Some("sub:TPL_A".to_string()),
            Some("early".to_string()),
            Some("middle".to_string()),
            Some("late".to_string()),
            None,
            None,
        ]);
        // TPL_B's subscription was never used for anything else and still is there.
        assert_eq!(claimed_value(&db, "u", Some("TPL_B"), t0()), Some("sub:TPL_B".to_string()));
        assert_eq!(claimed_value(&db, "u", Some("TPL_B"), t0()), None);
        // Another user's credentials are never touched.
        assert_eq!(claimed_value(&db, "someone-else", None, t0()), None);
    }

    fn invalid_used_up_and_expired_credentials_are_never_claimed(tdb) {
        let db = tdb.connect(2);
        record(&db, "u", vec![form("bad"), form("good")]);
        let first = claim_at(&db, "u", None, t0()).unwrap();
        assert_eq!(first.credential.value.as_deref(), Some("bad"));
        assert_eq!(first.credential.uses_left, 0);
        let mut conn = db.get().unwrap();
        // WeChat said "bad" is bad: giving the use back must not revive it.
        assert!(ledger::invalidate(&mut conn, first.credential.id, "41028", t0()).unwrap());
        assert!(ledger::release(&mut conn, first, t0()).unwrap());
        drop(conn);
        assert_eq!(claimed_value(&db, "u", None, t0()), Some("good".to_string()));
        assert_eq!(claimed_value(&db, "u", None, t0()), None);
        // Expired: reported long ago.
        record(&db, "v", vec![issued(Kind::FormId, "old", t0() - TimeDelta::days(6))]);
        assert_eq!(claimed_value(&db, "v", None, t0() + TimeDelta::days(1)), None);
        assert!(claim_at(&db, "v", None, t0()).is_some());
    }

    fn release_gives_the_use_back_once(tdb) {
        let db = tdb.connect(2);
        record(&db, "u", vec![form("f")]);
        let used = claim_at(&db, "u", None, t0()).unwrap();
        assert!(claim_at(&db, "u", None, t0()).is_none());
        let mut conn = db.get().unwrap();
        assert!(ledger::release(&mut conn, used.clone(), t0()).unwrap());
        // A second release of the same use cannot push uses_left past the total.
        assert!(!ledger::release(&mut conn, used, t0()).unwrap());
        assert_eq!(ledger::quota(&mut conn, APP, "u", t0()).unwrap().sendable, 1);
        drop(conn);
        assert!(claim_at(&db, "u", None, t0()).is_some());
    }

    fn users_are_paged_by_openid_and_stats_total_live_credentials(tdb) {
        let db = tdb.connect(2);
        for i in 0..5 {
            record(&db, &format!("user{i}"), vec![form(&format!("f{i}")), prepay(&format!("p{i}"))]);
        }
        record(&db, "spent", vec![form("s")]);
        let _spent = claim_at(&db, "spent", None, t0()).unwrap();
        let mut conn = db.get().unwrap();
        let page1 = ledger::users(&mut conn, APP, 2, None, t0()).unwrap();
        let names: Vec<_> = page1.users.iter().map(|u| u.openid.as_str()).collect();
        assert_eq!(names, vec!["user0", "user1"]);
        assert_eq!((page1.users[0].credentials, page1.users[0].uses_left), (2, 2));
        let mut seen: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut cursor = page1.next_cursor;
        while let Some(c) = cursor {
            let page = ledger::users(&mut conn, APP, 2, Some(&c), t0()).unwrap();
            seen.extend(page.users.iter().map(|u| u.openid.clone()));
            cursor = page.next_cursor;
        }
        assert_eq!(seen, vec!["user0", "user1", "user2", "user3", "user4"]);
        let stats = ledger::stats(&mut conn, APP, t0()).unwrap();
        assert_eq!(stats.live[&Kind::FormId].credentials, 5);
        assert_eq!(stats.live[&Kind::PrepayId].uses_left, 5);
        assert_eq!(stats.live[&Kind::Subscription].credentials, 0);
        assert_eq!(stats.expiring_within_24h, 0);
        let later = ledger::stats(&mut conn, APP, t0() + TimeDelta::days(6) + TimeDelta::hours(1)).unwrap();
        assert_eq!(later.expiring_within_24h, 10);
    }

    fn purge_deletes_only_what_is_dead_past_the_retention(tdb) {
        let db = tdb.connect(2);
        record(&db, "u", vec![form("spent"), form("kept"), sub("T", "accept")]);
        let _spent = claim_at(&db, "u", None, t0()).unwrap();
        record(&db, "old", vec![issued(Kind::FormId, "old", t0() - TimeDelta::days(6))]);
        let mut conn = db.get().unwrap();
        // Nothing is dead for longer than a day yet.
        assert_eq!(ledger::purge(&mut conn, t0() - TimeDelta::days(1), 1, false).unwrap(), 0);
        // A week and a day later: "spent" (used up) and "old" (expired) go; the live
        // form_id has expired too by then, the subscription never does.
        let later = t0() + TimeDelta::days(8);
        assert_eq!(ledger::purge(&mut conn, later - TimeDelta::hours(1), 1, true).unwrap(), 3, "dry run");
        assert_eq!(ledger::purge(&mut conn, later - TimeDelta::hours(1), 1, true).unwrap(), 3, "a dry run deletes nothing");
        assert_eq!(ledger::purge(&mut conn, later - TimeDelta::hours(1), 1, false).unwrap(), 3);
        let q = ledger::quota(&mut conn, APP, "u", t0()).unwrap();
        assert_eq!(q.subscriptions.get("T"), Some(&1));
        assert_eq!(q.sendable, 0);
    }
}

/// `threads` claimers on `pools` separate pools (as separate instances would be) all
/// start at once on a user holding `credentials` single-use form_ids.
fn race_claims(tdb: &helpers::TestDb, pools: usize, threads: usize, credentials: usize) {
    // Pools as small as an instance's: the claims queue for connections as requests
    // do, and 64 threads never need 64 server connections at once.
    let dbs: Vec<Db> = (0..pools).map(|_| tdb.connect(8)).collect();
    let items = (0..credentials)
        .map(|i| form(&format!("form-{i}")))
        .collect();
    assert_eq!(record(&dbs[0], "hot", items).accepted as usize, credentials);
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let db = dbs[i % pools].clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                // Past the barrier first: a thread that fails cannot strand the rest.
                barrier.wait();
                let mut conn = db.get().unwrap();
                ledger::claim(&mut conn, APP, "hot", ledger::Pick::Tokens, t0())
                    .unwrap()
                    .map(|u| u.credential.id)
            })
        })
        .collect();
    let results: Vec<Option<i64>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let ids: Vec<i64> = results.iter().flatten().copied().collect();
    let distinct: HashSet<i64> = ids.iter().copied().collect();
    assert_eq!(ids.len(), credentials, "uses handed out");
    assert_eq!(
        distinct.len(),
        credentials,
        "a credential was handed out twice"
    );
    assert_eq!(
        results.iter().filter(|r| r.is_none()).count(),
        threads - credentials
    );
    let mut conn = dbs[0].get().unwrap();
    assert_eq!(
        ledger::quota(&mut conn, APP, "hot", t0()).unwrap().sendable,
        0
    );
}

backend_tests! {
    fn concurrent_claims_hand_out_each_use_once(tdb) {
        race_claims(&tdb, 1, 64, 20);
    }

    fn concurrent_reports_respect_the_cap(tdb) {
        let db = tdb.connect(8);
        let rules = Rules { user_cap: 10, ..Rules::default() };
        let barrier = Arc::new(Barrier::new(16));
        let handles: Vec<_> = (0..16)
            .map(|i| {
                let (db, rules, barrier) = (db.clone(), rules.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    record_at(&db, &rules, t0(), "capped", vec![form(&format!("a{i}")), form(&format!("b{i}"))])
                })
            })
            .collect();
        let accepted: u32 = handles.into_iter().map(|h| h.join().unwrap().accepted).sum();
        assert_eq!(accepted, 10);
        let mut conn = db.get().unwrap();
        assert_eq!(ledger::quota(&mut conn, APP, "capped", t0()).unwrap().sendable, 10);
    }
}

#[test]
fn postgres_three_instances_claim_each_use_once() {
    race_claims(&helpers::TestDb::postgres(), 3, 64, 20);
}

crate::helpers::backend_app_tests! {
    /// Set-based ingest keeps the cap exact: 64 reporters at once on one user, half
    /// through each of two instances on one database (groups commit concurrently on
    /// both, and on PostgreSQL each instance has several writers). Every request
    /// reports the same value first, then two of its own: the value is stored once
    /// (it comes first, so the first request to be recorded has room for it) and
    /// is a duplicate for the 63 others; the cap admits exactly 10 credentials.
    async fn sixty_four_concurrent_reporters_on_one_user_fill_the_cap_exactly(tdb) {
        use crate::helpers::{TestApp, KEY_ADMIN, KEY_SEND};
        use serde_json::json;

        const CAP: u64 = 10;
        let first = TestApp::spawn_with(tdb, |s| s.user_cap = CAP as u32).await;
        let second = TestApp::start(first.test_db.clone(), first.sim.clone(), |s| {
            s.user_cap = CAP as u32
        })
        .await;
        let apps = Arc::new([first, second]);
        let calls: Vec<_> = (0..64)
            .map(|i| {
                let apps = apps.clone();
                let body = json!({"credentials": [
                    {"openid": "crowded", "kind": "form_id", "value": "shared"},
                    {"openid": "crowded", "kind": "form_id", "value": format!("a{i}")},
                    {"openid": "crowded", "kind": "form_id", "value": format!("b{i}")},
                ]});
                actix_web::rt::spawn(async move {
                    apps[i % 2].post("/v1/credentials", Some(KEY_SEND), &body).await
                })
            })
            .collect();
        let (mut accepted, mut duplicates, mut capped) = (0, 0, 0);
        for call in calls {
            let (status, res) = call.await.unwrap();
            assert_eq!(status, 200, "{res}");
            let rejected = res["rejected"].as_array().unwrap();
            assert!(
                rejected.iter().all(|r| r["reason"] == "user_cap"),
                "only the cap refuses: {res}"
            );
            let (a, d) = (res["accepted"].as_u64().unwrap(), res["duplicates"].as_u64().unwrap());
            assert_eq!(a + d + rejected.len() as u64, 3, "each request answered for its own items: {res}");
            accepted += a;
            duplicates += d;
            capped += rejected.len() as u64;
        }
        assert_eq!(accepted, CAP);
        assert_eq!(duplicates, 63);
        assert_eq!(capped, 64 * 3 - CAP - 63);
        assert_eq!(apps[0].credential_count(), CAP as i64);
        for app in apps.iter() {
            let (status, q) = app.get("/v1/admin/users/crowded/quota", Some(KEY_ADMIN)).await;
            assert_eq!((status, q["sendable"].as_u64()), (200, Some(CAP)), "{q}");
        }
    }
}

/// On SQLite a group of reports and the wake-up of its users' waiting messages are
/// one write transaction (one lock, one turn). So when the wake-up fails, the
/// request is answered 503 and none of its credentials is kept: its retry is then
/// accepted, not called a duplicate of a report that was refused. A trigger makes
/// the wake-up (the only statement that sets `wakes`) fail.
#[actix_web::test]
async fn a_report_whose_wake_up_fails_keeps_nothing_sqlite() {
    use crate::helpers::{TestApp, TestDb, KEY_SEND};
    use serde_json::json;

    let app = TestApp::spawn(TestDb::sqlite()).await;
    // u holds no credential: the message waits for one.
    let waiting = json!({"openid": "u", "template_id": "TPL", "await_credential_s": 600});
    let (status, res) = app.post("/v1/messages", Some(KEY_SEND), &waiting).await;
    assert!(status < 300, "{status} {res}");
    app.sql(
        "CREATE TRIGGER refuse_wake_up BEFORE UPDATE OF wakes ON messages \
         BEGIN SELECT RAISE(ABORT, 'wake-up refused'); END",
    )
    .await;
    let report = json!({"openid": "u", "kind": "form_id", "value": "f1"});
    let (status, res) = app.post("/v1/credentials", Some(KEY_SEND), &report).await;
    assert_eq!(
        (status, res["error"]["code"].as_str()),
        (503, Some("unavailable")),
        "{res}"
    );
    assert_eq!(app.credential_count(), 0, "the refused report kept nothing");

    app.sql("DROP TRIGGER refuse_wake_up").await;
    let (status, res) = app.post("/v1/credentials", Some(KEY_SEND), &report).await;
    assert_eq!((status, res["accepted"].as_u64()), (200, Some(1)), "{res}");
    assert_eq!(app.credential_count(), 1);
}

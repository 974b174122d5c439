//! access_token central control against the simulator: one fetch per cycle across
//! instances, compare-and-refresh bursts, the limit on forced refreshes, WeChat down
//! during a refresh.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::prelude::*;
use serde_json::{json, Value};

use crate::helpers::{
    self, backend_app_tests, counter, dispatch, schema, FaultSet, Faults, SimTokenApi, TestApp,
    TestSim, TokenApi, APP, KEY_TOKEN,
};

/// Does WeChat (the simulator) take this token right now? A template send to a
/// user it never saw answers 40003 after the token check, or a token error.
async fn token_errcode(sim: &TestSim, token: &str) -> i64 {
    let res: Value = reqwest::Client::new()
        .post(format!(
            "{}/cgi-bin/message/wxopen/template/send?access_token={token}",
            sim.base
        ))
        .json(&json!({"touser": "nobody", "template_id": "T", "form_id": "f", "data": {}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    res["errcode"].as_i64().unwrap_or(0)
}

fn fetches(sim: &TestSim) -> usize {
    sim.sim
        .token_fetches()
        .iter()
        .filter(|f| f.appid == APP)
        .count()
}

fn forced_fetches(sim: &TestSim) -> usize {
    sim.sim
        .token_fetches()
        .iter()
        .filter(|f| f.appid == APP && f.api == SimTokenApi::Stable && f.force_refresh)
        .count()
}

/// The stored token was fetched an hour ago: older than any force interval.
async fn age_token(app: &TestApp) {
    use schema::access_tokens::dsl as t;
    let long_ago = chrono::Utc::now().naive_utc() - chrono::TimeDelta::hours(1);
    app.db
        .run(move |conn| {
            Ok(dispatch!(conn, |c| diesel::update(
                t::access_tokens.filter(t::app_id.eq(APP))
            )
            .set(t::fetched_at.eq(long_ago))
            .execute(c))?)
        })
        .await
        .unwrap();
}

/// Compare-and-refresh calls counted with this result, summed over instances.
async fn forced_refreshes(apps: &[&TestApp], result: &str) -> u64 {
    let series =
        format!(r#"ledger_token_forced_refreshes_total{{app_id="{APP}",result="{result}"}}"#);
    let mut n = 0;
    for app in apps {
        n += counter(app, &series).await;
    }
    n
}

/// A `token` key loops "get, then refresh with it as stale_token" on `refresh_on`
/// (`get_on` gets); returns each (token got, refresh answer).
async fn refresh_loop(
    get_on: &[&TestApp],
    refresh_on: &[&TestApp],
    n: usize,
) -> Vec<(String, Value)> {
    let mut answers = Vec::new();
    for i in 0..n {
        let (status, got) = get_token(get_on[i % get_on.len()]).await;
        assert_eq!(status, 200, "{got}");
        let got = got["access_token"].as_str().unwrap().to_string();
        let (status, res) = refresh(refresh_on[i % refresh_on.len()], &got).await;
        assert_eq!(status, 200, "{res}");
        answers.push((got, res));
    }
    answers
}

/// The first refresh of the loop replaced the token; every later one handed the
/// current token back without refreshing.
fn one_refresh_then_current(answers: &[(String, Value)], first: &str) -> String {
    let (_, res) = &answers[0];
    assert_eq!(res["refreshed"], true, "{res}");
    let new = res["access_token"].as_str().unwrap().to_string();
    assert_ne!(new, first);
    for (got, res) in &answers[1..] {
        assert_eq!(res["refreshed"], false, "{res}");
        assert_eq!(
            (got.as_str(), res["access_token"].as_str()),
            (new.as_str(), Some(new.as_str()))
        );
    }
    new
}

async fn get_token(app: &TestApp) -> (u16, Value) {
    app.get(&format!("/v1/apps/{APP}/access-token"), Some(KEY_TOKEN))
        .await
}

async fn refresh(app: &TestApp, stale: &str) -> (u16, Value) {
    app.post(
        &format!("/v1/apps/{APP}/access-token/refresh"),
        Some(KEY_TOKEN),
        &json!({"stale_token": stale}),
    )
    .await
}

backend_app_tests! {
    /// Three instances on one database, tokens living 3 s with a 1 s refresh margin:
    /// one fetch per cycle, and every token handed out works at WeChat.
    async fn instances_share_one_refresh_per_cycle(tdb) {
        let sim = TestSim::spawn_with(|c| {
            c.token_expires_in = Duration::from_secs(3);
            c.token_overlap = Duration::from_secs(2);
        });
        let tdb = Arc::new(tdb);
        let mut apps = Vec::new();
        for _ in 0..3 {
            apps.push(
                TestApp::start(tdb.clone(), sim.clone(), |s| {
                    s.token_api = TokenApi::Classic;
                    s.token_refresh_margin = Duration::from_secs(1);
                })
                .await,
            );
        }
        let started = Instant::now();
        let mut seen = HashSet::new();
        let mut checks = 0;
        while started.elapsed() < Duration::from_secs(8) {
            for app in &apps {
                let (status, res) = get_token(app).await;
                assert_eq!(status, 200, "{res}");
                let token = res["access_token"].as_str().unwrap().to_string();
                let errcode = token_errcode(&sim, &token).await;
                assert!(![40001, 42001, 40014].contains(&errcode), "a handed-out token was refused: {errcode}");
                seen.insert(token);
                checks += 1;
            }
            // Paces the checks; the 8 s of watching are the point: several refresh
            // cycles must pass.
            actix_web::rt::time::sleep(Duration::from_millis(100)).await;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let n = fetches(&sim);
        // A cycle is expires_in − margin = 2 s; the first fetch happens at start.
        let most = (elapsed / 2.0).ceil() as usize + 1;
        assert!(n <= most, "{n} fetches in {elapsed:.1} s, at most {most} expected");
        assert!(n >= 3, "only {n} fetches: the refresher did not keep up");
        assert!(seen.len() <= n, "{} tokens handed out, {n} fetched", seen.len());
        assert!(checks > 30);
    }

    /// 100 concurrent compare-and-refresh calls with the same stale token: one fetch.
    async fn a_burst_of_compare_and_refresh_fetches_once(tdb) {
        // A fresh token is refreshed at once: no force interval.
        let app = TestApp::spawn_with(tdb, |s| {
            s.token_api = TokenApi::Classic;
            s.token_force_interval = Duration::ZERO;
        })
        .await;
        let (_, first) = get_token(&app).await;
        let stale = first["access_token"].as_str().unwrap().to_string();
        let before = fetches(&app.sim);
        let app = Arc::new(app);
        let calls: Vec<_> = (0..100)
            .map(|_| {
                let (app, stale) = (app.clone(), stale.clone());
                actix_web::rt::spawn(async move { refresh(&app, &stale).await })
            })
            .collect();
        let mut tokens = HashSet::new();
        let mut refreshed = 0;
        for call in calls {
            let (status, res) = call.await.unwrap();
            assert_eq!(status, 200, "{res}");
            tokens.insert(res["access_token"].as_str().unwrap().to_string());
            refreshed += usize::from(res["refreshed"] == true);
        }
        assert_eq!(fetches(&app.sim) - before, 1, "WeChat fetches for one stale token");
        assert_eq!(refreshed, 1);
        assert_eq!(tokens.len(), 1, "everyone gets the one new token");
        assert!(!tokens.contains(&stale));
        // A token that is no longer current is answered without calling WeChat.
        let (status, res) = refresh(&app, &stale).await;
        assert_eq!((status, res["refreshed"].clone()), (200, json!(false)));
        assert_eq!(fetches(&app.sim) - before, 1);
    }

    /// The stable API: the normal call hands the refused token back, so the one
    /// refresh is forced; a burst still forces once.
    async fn stable_compare_and_refresh_forces_once(tdb) {
        let app = TestApp::spawn_with(tdb, |s| s.token_force_interval = Duration::ZERO).await;
        let (_, first) = get_token(&app).await;
        let stale = first["access_token"].as_str().unwrap().to_string();
        let app = Arc::new(app);
        let calls: Vec<_> = (0..20)
            .map(|_| {
                let (app, stale) = (app.clone(), stale.clone());
                actix_web::rt::spawn(async move { refresh(&app, &stale).await })
            })
            .collect();
        for call in calls {
            let (status, res) = call.await.unwrap();
            assert_eq!(status, 200, "{res}");
            assert_ne!(res["access_token"], stale.as_str());
        }
        let forced = app.sim.sim.token_fetches().iter()
            .filter(|f| f.api == SimTokenApi::Stable && f.force_refresh)
            .count();
        assert_eq!(forced, 1);
        assert_eq!(token_errcode(&app.sim, &stale).await, 40001, "the forced refresh retired the stale token");
    }

    /// Issue 14 item 5: a `token` key looping "get, refresh(stale = that token)"
    /// forces one stable refresh per interval; the rest get the current token with
    /// `refreshed: false`. At most one unforced check of the young token is added.
    async fn a_refresh_loop_forces_once_per_interval(tdb) {
        let app = TestApp::spawn(tdb).await;
        let (_, first) = get_token(&app).await;
        let first = first["access_token"].as_str().unwrap().to_string();
        age_token(&app).await;
        let before = fetches(&app.sim);
        let started = std::time::Instant::now();
        let answers = refresh_loop(&[&app], &[&app], 10).await;
        // Unforced checks of the young token: at most one a second.
        let checks = 1 + usize::try_from(started.elapsed().as_secs()).unwrap_or(usize::MAX - 3);
        one_refresh_then_current(&answers, &first);
        assert_eq!(forced_fetches(&app.sim), 1, "forced stable refreshes");
        let calls = fetches(&app.sim) - before;
        assert!(calls <= 2 + checks, "{calls} token calls: one normal and one forced to refresh, at most {checks} checks");
        assert_eq!(forced_refreshes(&[&app], "fetched").await, 1);
        assert_eq!(forced_refreshes(&[&app], "throttled").await, 9);
    }

    /// The limit is decided in the shared row: two instances on one database, a
    /// loop that gets from one and refreshes on the other, classic API (every call
    /// is a fetch that spends quota): one fetch in all.
    async fn the_refresh_limit_holds_across_instances(tdb) {
        let (tdb, sim) = (Arc::new(tdb), TestSim::spawn());
        let a = TestApp::start(tdb.clone(), sim.clone(), |s| s.token_api = TokenApi::Classic).await;
        let b = TestApp::start(tdb, sim.clone(), |s| s.token_api = TokenApi::Classic).await;
        let (_, first) = get_token(&a).await;
        let first = first["access_token"].as_str().unwrap().to_string();
        age_token(&a).await;
        let before = fetches(&sim);
        let answers = refresh_loop(&[&a, &b], &[&b, &a], 10).await;
        let new = one_refresh_then_current(&answers, &first);
        assert_eq!(fetches(&sim) - before, 1, "WeChat token fetches");
        assert!(![40001, 42001, 40014].contains(&token_errcode(&sim, &new).await));
        assert_eq!(forced_refreshes(&[&a, &b], "fetched").await, 1);
        assert_eq!(forced_refreshes(&[&a, &b], "throttled").await, 9);
        assert_eq!(forced_refreshes(&[&a], "throttled").await, 5, "the instance that did not fetch");
    }

    /// A young token refused because someone outside the service replaced it (the
    /// simulator kills every token): an unforced stable call catches up, spending
    /// none of the forced refreshes.
    async fn a_young_token_replaced_outside_is_caught_up_without_forcing(tdb) {
        let app = TestApp::spawn(tdb).await;
        let (_, first) = get_token(&app).await;
        let stale = first["access_token"].as_str().unwrap().to_string();
        app.sim.sim.invalidate_tokens(APP).unwrap();
        let (status, res) = refresh(&app, &stale).await;
        assert_eq!((status, res["refreshed"].clone()), (200, json!(true)), "{res}");
        let new = res["access_token"].as_str().unwrap();
        assert_ne!(new, stale);
        assert!(![40001, 42001, 40014].contains(&token_errcode(&app.sim, new).await), "the new token works");
        assert_eq!(forced_fetches(&app.sim), 0);
        assert_eq!(forced_refreshes(&[&app], "caught_up").await, 1);
    }

    /// WeChat fails every token call: the old token is served until it expires,
    /// then 503 wechat_unavailable, and the service recovers by itself.
    async fn wechat_down_during_a_refresh(tdb) {
        let sim = TestSim::spawn_with(|c| {
            c.token_expires_in = Duration::from_secs(3);
            c.token_overlap = Duration::from_secs(3);
        });
        let app = TestApp::start(Arc::new(tdb), sim.clone(), |s| {
            s.token_api = TokenApi::Classic;
            s.token_refresh_margin = Duration::from_secs(2);
        })
        .await;
        let (status, res) = get_token(&app).await;
        assert_eq!(status, 200, "{res}");
        let old = res["access_token"].as_str().unwrap().to_string();
        let down = Faults { token: FaultSet { busy: 1.0, ..FaultSet::default() }, ..Faults::default() };
        sim.sim.set_faults(down).unwrap();
        // Until it expires, the old token is served although every refresh fails.
        let mut served_old = 0;
        let deadline = Instant::now() + Duration::from_secs(6);
        let mut expired = false;
        while !expired && Instant::now() < deadline {
            let (status, res) = get_token(&app).await;
            if status == 200 {
                assert_eq!(res["access_token"], old.as_str());
                served_old += 1;
                // A poll until the token expires, checking each answer on the way.
                actix_web::rt::time::sleep(Duration::from_millis(50)).await;
            } else {
                assert_eq!((status, res["error"]["code"].as_str()), (503, Some("wechat_unavailable")), "{res}");
                expired = true;
            }
        }
        assert!(expired, "the expired token was never reported unavailable");
        assert!(served_old > 3, "the old token was served {served_old} times");
        sim.sim.set_faults(Faults::default()).unwrap();
        let recovered = helpers::eventually(Duration::from_secs(5), || async {
            get_token(&app).await.0 == 200
        })
        .await;
        assert!(recovered, "no new token after WeChat came back");
        let (_, res) = get_token(&app).await;
        assert_ne!(res["access_token"], old.as_str());
    }

    async fn token_endpoints_check_their_input(tdb) {
        let app = TestApp::spawn(tdb).await;
        let (status, res) = app.get("/v1/apps/wxnope/access-token", Some(KEY_TOKEN)).await;
        assert_eq!((status, res["error"]["code"].as_str()), (404, Some("unknown_app")));
        let (status, res) = app.post("/v1/apps/wxnope/access-token/refresh", Some(KEY_TOKEN), &json!({"stale_token": "x"})).await;
        assert_eq!((status, res["error"]["code"].as_str()), (404, Some("unknown_app")));
        for body in [json!({}), json!({"stale_token": 1}), json!({"stale_token": "x", "force": true})] {
            let (status, res) = app.post(&format!("/v1/apps/{APP}/access-token/refresh"), Some(KEY_TOKEN), &body).await;
            assert_eq!((status, res["error"]["code"].as_str()), (400, Some("invalid_request")), "{body}");
        }
    }
}

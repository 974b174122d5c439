//! /openapi.json is generated from the code: every route the app serves is in it,
//! and everything in it is served.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::helpers::{self, TestApp, TestDb, KEY_ALL};

/// (path, method) of every route registered in src/http, read from the source: a
/// route added without documentation fails this test.
fn routes_in_source() -> BTreeSet<(String, String)> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/http");
    let mut routes = BTreeSet::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        let compact: String = text.split_whitespace().collect();
        for chunk in compact.split("resource(\"").skip(1) {
            let Some((path, rest)) = chunk.split_once("\")") else {
                continue;
            };
            if path.contains('"') || !path.starts_with('/') {
                continue; // the helper's own definition, not a route
            }
            // Every `.route(web::METHOD()` up to the next resource is one of its routes.
            for piece in rest.split(".route(web::").skip(1) {
                let method = piece.split('(').next().unwrap().to_string();
                routes.insert((path.to_string(), method));
            }
        }
    }
    routes
}

fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            out.insert((path.clone(), method.clone()));
        }
    }
    out
}

#[actix_web::test]
async fn every_route_is_documented_and_served() {
    let app = TestApp::spawn(TestDb::sqlite()).await;
    let (status, doc) = app.get("/openapi.json", None).await;
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let source = routes_in_source();
    assert!(
        source.len() >= 18,
        "the source scan found too few routes: {source:?}"
    );
    let docs = documented(&doc);
    assert_eq!(source, docs, "routes served vs documented");

    // Every documented route answers something other than "no such route".
    for (path, method) in &docs {
        let concrete = path
            .replace("{app_id}", helpers::APP)
            .replace("{openid}", "o1")
            .replace("{id}", "1")
            .replace("{file}", "admin.js")
            .replace("{template_id}", "TPL");
        let req = match method.as_str() {
            "get" => app.http.get(app.url(&concrete)),
            "post" => app
                .http
                .post(app.url(&concrete))
                .json(&serde_json::json!({})),
            "put" => app.http.put(app.url(&concrete)),
            "delete" => app.http.delete(app.url(&concrete)),
            other => panic!("unexpected method {other}"),
        };
        let res = req.bearer_auth(KEY_ALL).send().await.unwrap();
        let status = res.status().as_u16();
        let body = res.text().await.unwrap();
        assert!(
            status != 405 && !body.contains("no route"),
            "{method} {concrete}: {status} {body}"
        );
    }
}

#[actix_web::test]
async fn the_document_names_every_error_code_and_scheme() {
    let app = TestApp::spawn(TestDb::sqlite()).await;
    let (_, doc) = app.get("/openapi.json", None).await;
    let text = doc.to_string();
    for code in [
        "invalid_request",
        "payload_too_large",
        "app_id_required",
        "unknown_app",
        "unauthorized",
        "forbidden",
        "not_found",
        "invalid_code",
        "user_blocked",
        "rate_limited",
        "wechat_unavailable",
        "idempotency_mismatch",
        "no_quota",
        "template_invalid",
        "page_invalid",
        "data_invalid",
        "openid_invalid",
        "retries_exhausted",
        "outcome_unknown",
        "mock_form_id",
        "invalid_format",
        "user_cap",
        "not_accepted",
    ] {
        assert!(
            text.contains(&format!("\"{code}\"")),
            "{code} is not in the document"
        );
    }
    let schemes = doc["components"]["securitySchemes"].as_object().unwrap();
    assert!(schemes.contains_key("api_key") && schemes.contains_key("client_session"));
    for schema in [
        "MessageView",
        "Quota",
        "RecordOutcome",
        "ErrorBody",
        "MessageIn",
        "UserPage",
    ] {
        assert!(
            doc["components"]["schemas"].get(schema).is_some(),
            "schema {schema} missing"
        );
    }
}

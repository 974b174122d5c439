//! An independent implementation of WeChat's push crypto as the peer: wechatpy's
//! `wechatpy.crypto` (PyPI, pinned in tests/push/wechatpy_peer.sh) signs and
//! encrypts pushes our endpoint must accept, and decrypts what our encryption
//! produces. A round trip through our own code alone would prove nothing about
//! compatibility. Needs python3; fails (never skips) when wechatpy cannot be had.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{json, Value};

use crate::helpers::{backend_app_tests, push_crypto, PushKey, APP};
use crate::push::{now_ts, popup, post, quota, spawn, Signed, KEY, TOKEN};

/// Runs the peer with one JSON request; its JSON answer.
fn wechatpy(request: &Value) -> Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/push/wechatpy_peer.sh");
    let mut child = Command::new(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {script} (python3 and a venv are required): {e}"));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(request.to_string().as_bytes())
        .expect("write the request");
    let out = child.wait_with_output().expect("wechatpy_peer.sh ran");
    assert!(
        out.status.success(),
        "wechatpy_peer.sh failed ({}): is wechatpy installable? see its stderr above",
        out.status
    );
    serde_json::from_slice(&out.stdout).expect("the peer answers JSON")
}

fn signed(v: &Value) -> Signed {
    Signed {
        query: v["query"]
            .as_object()
            .expect("query")
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().expect("text").to_string()))
            .collect(),
        body: v["body"].as_str().expect("body").to_string(),
    }
}

backend_app_tests! {
    /// wechatpy encrypts and signs pushes, XML and JSON: each is accepted and applied.
    async fn pushes_encrypted_by_wechatpy_are_accepted(tdb) {
        let app = spawn(tdb, true).await;
        let ts = now_ts();
        let json_popup = json!({"ToUserName": "gh_peer", "FromUserName": "u2", "CreateTime": 1_690_000_001,
            "MsgType": "event", "Event": "subscribe_msg_popup_event",
            "SubscribeMsgPopupEvent": {"List": [
                {"TemplateId": "TPL_A", "SubscribeStatusString": "accept", "PopupScene": "0"},
                {"TemplateId": "TPL_B", "SubscribeStatusString": "accept", "PopupScene": "0"}]}});
        let pushes = wechatpy(&json!({
            "mode": "encrypt", "token": TOKEN, "key": KEY, "appid": APP,
            "pushes": [
                {"format": "xml", "plain": popup("u1", &[("TPL_A", "accept")]), "timestamp": ts, "nonce": "5551234"},
                {"format": "json", "plain": json_popup.to_string(), "timestamp": ts, "nonce": "5551235"},
            ]
        }));
        for push in pushes.as_array().expect("pushes") {
            let (status, body) = post(&app, &signed(push)).await;
            assert_eq!((status, body.as_str()), (200, "success"), "{push}");
        }
        assert_eq!(quota(&app, "u1").await["subscriptions_confirmed"], json!({"TPL_A": 1}));
        assert_eq!(quota(&app, "u2").await["subscriptions_confirmed"], json!({"TPL_A": 1, "TPL_B": 1}));
        // The same peer with another token: refused, nothing applied.
        let forged = wechatpy(&json!({
            "mode": "encrypt", "token": "notTheToken", "key": KEY, "appid": APP,
            "pushes": [{"format": "xml", "plain": popup("u3", &[("TPL_A", "accept")]), "timestamp": ts, "nonce": "1"}]
        }));
        let (status, _) = post(&app, &signed(&forged[0])).await;
        assert_eq!(status, 403);
        assert_eq!(quota(&app, "u3").await["subscriptions"], json!({}));
    }
}

/// Our encryption, wechatpy's decryption: the same plaintexts come out.
#[test]
fn wechatpy_decrypts_what_we_encrypt() {
    let key = PushKey::from_encoding_aes_key(KEY).unwrap();
    let (ts, nonce) = ("1409735669", "1320562132");
    let plains = [
        String::new(),
        "success".to_string(),
        popup("u1", &[("TPL_A", "accept")]),
        "字".repeat(100),
        "x".repeat(5000),
    ];
    let items: Vec<Value> = plains
        .iter()
        .map(|p| {
            let encrypt = push_crypto::encrypt(&key, p.as_bytes(), APP, rand::random());
            let msg_signature = push_crypto::signature(&[TOKEN, ts, nonce, &encrypt]);
            json!({"encrypt": encrypt, "msg_signature": msg_signature, "timestamp": ts, "nonce": nonce})
        })
        .collect();
    let out = wechatpy(
        &json!({"mode": "decrypt", "token": TOKEN, "key": KEY, "appid": APP, "items": items}),
    );
    let got: Vec<&str> = out
        .as_array()
        .expect("list")
        .iter()
        .map(|v| v.as_str().expect("text"))
        .collect();
    assert_eq!(got, plains.iter().map(String::as_str).collect::<Vec<_>>());
}

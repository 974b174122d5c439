//! `push`: WeChat's message push, as WeChat sends it in safe mode: clients `POST`
//! encrypted, signed `subscribe_msg_popup_event` pushes (one `accept` each, a
//! distinct FromUserName/CreateTime per push, so every push is new) to
//! `/v1/wechat/push/{app}`. A push counts when the service answers 200 `success`;
//! afterwards the ledger itself is read to show that every acknowledged push was
//! applied (one `push_receipts` row and one pushed subscription grant each), so the
//! rate is not one of refusals or duplicates.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use clap::Args;
use diesel::prelude::*;
use serde_json::{json, Value};

use formid_ledger::db::schema::{credentials as c, push_receipts as r};
use formid_ledger::db::Db;
use formid_ledger::dispatch;
use formid_ledger::settings::DatabaseUrl;
use formid_ledger::wechat::push_crypto::{encrypt, signature, PushKey};

use crate::load::{client, closed_loop, nonce, result_json, Common};

#[derive(Args)]
pub struct PushArgs {
    #[command(flatten)]
    common: Common,
    /// The app whose pushes these are (its `LEDGER_PUSH` entry).
    #[arg(long)]
    app: String,
    /// The push Token of that entry.
    #[arg(long)]
    token: String,
    /// The EncodingAESKey of that entry (43 characters).
    #[arg(long)]
    aes_key: String,
    /// The template every popup accepts.
    #[arg(long, default_value = "TPL_BENCH")]
    template: String,
    /// The service's database, read after the run to check what was applied.
    #[arg(long)]
    db: String,
    /// Users are `{prefix}{run tag}-{n}` with n = push number modulo `users`.
    #[arg(long)]
    prefix: String,
    #[arg(long, default_value_t = 100_000)]
    users: u64,
}

/// One push as WeChat sends it in safe mode: the query string and the XML envelope.
fn signed_push(
    key: &PushKey,
    app: &str,
    token: &str,
    openid: &str,
    create_time: u64,
    template: &str,
) -> (Vec<(&'static str, String)>, String) {
    let plain = format!(
        "<xml><ToUserName><![CDATA[gh_bench]]></ToUserName><FromUserName><![CDATA[{openid}]]></FromUserName>\
<CreateTime>{create_time}</CreateTime><MsgType><![CDATA[event]]></MsgType><Event><![CDATA[subscribe_msg_popup_event]]></Event>\
<SubscribeMsgPopupEvent><List><TemplateId><![CDATA[{template}]]></TemplateId><SubscribeStatusString><![CDATA[accept]]></SubscribeStatusString>\
<PopupScene>0</PopupScene></List></SubscribeMsgPopupEvent></xml>"
    );
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        .to_string();
    let nonce = rand::random::<u32>().to_string();
    let encrypted = encrypt(key, plain.as_bytes(), app, rand::random());
    let query = vec![
        ("signature", signature(&[token, &ts, &nonce])),
        (
            "msg_signature",
            signature(&[token, &ts, &nonce, &encrypted]),
        ),
        ("timestamp", ts),
        ("nonce", nonce),
        ("openid", openid.to_string()),
        ("encrypt_type", "aes".to_string()),
    ];
    let body = format!(
        "<xml><ToUserName><![CDATA[gh_bench]]></ToUserName><Encrypt><![CDATA[{encrypted}]]></Encrypt></xml>"
    );
    (query, body)
}

pub async fn push(a: PushArgs) -> Result<Value, String> {
    let key = PushKey::from_encoding_aes_key(&a.aes_key).map_err(|e| e.to_string())?;
    let http = client(a.common.clients);
    let url: Arc<str> = format!("{}/v1/wechat/push/{}", a.common.url, a.app).into();
    // Run tag: reruns against the same database never repeat an identity.
    let users_prefix = format!("{}{}-", a.prefix, nonce());
    let base_ct = 1_700_000_000u64;
    let acked = Arc::new(AtomicU64::new(0));
    let op = {
        let (acked, users_prefix) = (acked.clone(), Arc::<str>::from(users_prefix.as_str()));
        let (app, token, template) = (
            Arc::<str>::from(a.app.as_str()),
            Arc::<str>::from(a.token.as_str()),
            Arc::<str>::from(a.template.as_str()),
        );
        let users = a.users.max(1);
        move |n: u64| {
            let (http, url, key, acked, users_prefix) = (
                http.clone(),
                url.clone(),
                key.clone(),
                acked.clone(),
                users_prefix.clone(),
            );
            let (app, token, template) = (app.clone(), token.clone(), template.clone());
            async move {
                let openid = format!("{users_prefix}{}", n % users);
                let (query, body) =
                    signed_push(&key, &app, &token, &openid, base_ct + n, &template);
                let resp = http
                    .post(&*url)
                    .query(&query)
                    .header("Content-Type", "text/xml")
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                let status = resp.status();
                let text = resp.text().await.map_err(|e| e.to_string())?;
                if status.as_u16() != 200 || text != "success" {
                    return Err(format!(
                        "{status}: {}",
                        text.chars().take(200).collect::<String>()
                    ));
                }
                acked.fetch_add(1, Ordering::Relaxed);
                Ok(1)
            }
        }
    };
    let res = closed_loop(&a.common, u64::MAX, op).await;
    let acked = acked.load(Ordering::Relaxed);
    let (receipts, grants) = applied(&a.db, &a.app, &users_prefix)?;
    Ok(result_json(
        &a.common,
        &res,
        json!({
            "acknowledged_total": acked,
            "push_receipts": receipts,
            "pushed_grants": grants,
            "applied_equals_acknowledged": receipts == acked && grants == acked,
            "users": a.users,
            "prefix": users_prefix,
        }),
    ))
}

/// What the ledger holds for this run's users: push receipts and pushed grants.
fn applied(db: &str, app: &str, users_prefix: &str) -> Result<(u64, u64), String> {
    let url = DatabaseUrl::parse(db)?;
    let db = Db::connect(&url, 1).map_err(|e| e.to_string())?;
    let mut conn = db.get().map_err(|e| e.to_string())?;
    let like_identity = format!("evt:{users_prefix}%");
    let like_user = format!("{users_prefix}%");
    let conn = &mut *conn;
    let receipts: i64 = dispatch!(conn, |conn| r::table
        .filter(r::app_id.eq(app))
        .filter(r::identity.like(&like_identity))
        .count()
        .get_result(conn))
    .map_err(|e| e.to_string())?;
    let grants: i64 = dispatch!(conn, |conn| c::table
        .filter(c::app_id.eq(app))
        .filter(c::openid.like(&like_user))
        .filter(c::kind.eq("subscription"))
        .filter(c::pushed_at.is_not_null())
        .count()
        .get_result(conn))
    .map_err(|e| e.to_string())?;
    Ok((receipts as u64, grants as u64))
}

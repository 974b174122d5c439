//! Thin HTTP handlers: parse, call the state, write the answer.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use actix_web::body::{BodySize, MessageBody};
use actix_web::http::StatusCode;
use actix_web::web::{self, Bytes};
use actix_web::{HttpRequest, HttpResponse, ResponseError};
use serde::{de::DeserializeOwned, Deserialize};
use serde_json::json;

use super::config::Faults;
use super::state::{Call, Reply, SimError};
use super::Simulator;
use crate::secret::Secret;
use crate::wechat::wire::{ApiStatus, Code2SessionQuery, StableTokenRequest, TokenQuery};

pub(super) fn config(cfg: &mut web::ServiceConfig, sim: &Simulator) {
    let data = web::Data::new(sim.clone());
    // curl -d sends form content-type: the control endpoints take JSON whatever it says.
    let json = web::JsonConfig::default()
        .content_type_required(false)
        .error_handler(|err, _| SimError::Invalid(format!("invalid JSON body: {err}")).into());
    let wx = |path: &str| {
        web::resource(path.to_owned())
            .app_data(data.clone())
            .default_service(web::to(method_not_allowed))
    };
    let control = |path: &str| wx(path).app_data(json.clone());
    cfg.service(wx("/cgi-bin/token").route(web::get().to(classic_token)))
        .service(wx("/cgi-bin/stable_token").route(web::post().to(stable_token)))
        .service(wx("/sns/jscode2session").route(web::get().to(code_to_session)))
        .service(wx("/cgi-bin/message/wxopen/template/send").route(web::post().to(send_template)))
        .service(wx("/cgi-bin/message/subscribe/send").route(web::post().to(send_subscribe)))
        .service(wx("/wxaapi/newtmpl/gettemplate").route(web::get().to(private_templates)))
        .service(control("/sim/apps").route(web::post().to(add_app)))
        .service(control("/sim/codes").route(web::post().to(mint_code)))
        .service(control("/sim/form-ids").route(web::post().to(mint_form_ids)))
        .service(control("/sim/prepay-ids").route(web::post().to(mint_prepay_ids)))
        .service(control("/sim/subscriptions").route(web::post().to(grant_subscriptions)))
        .service(control("/sim/subscriptions/off").route(web::post().to(turn_off)))
        .service(control("/sim/habits").route(web::post().to(set_habits)))
        .service(
            control("/sim/faults")
                .route(web::post().to(set_faults))
                .route(web::get().to(get_faults)),
        )
        .service(control("/sim/tokens/invalidate").route(web::post().to(invalidate_tokens)))
        .service(control("/sim/reset-limits").route(web::post().to(reset_limits)))
        .service(control("/sim/block").route(web::post().to(block)))
        .service(control("/sim/deliveries").route(web::get().to(deliveries)))
        .service(control("/sim/token-fetches").route(web::get().to(token_fetches)))
        .service(control("/sim/stats").route(web::get().to(stats)));
}

// ----- WeChat endpoints -----

async fn method_not_allowed() -> HttpResponse {
    HttpResponse::MethodNotAllowed()
        .json(json!({"error": {"code": "method_not_allowed", "message": "method not allowed"}}))
}

/// Standalone only: an unknown path is a JSON 404, like everything else.
pub(super) async fn not_found() -> HttpResponse {
    HttpResponse::NotFound()
        .json(json!({"error": {"code": "not_found", "message": "no such endpoint"}}))
}

/// A query as WeChat reads it: a field that is missing or unreadable is empty.
fn query<T: DeserializeOwned + Default>(req: &HttpRequest) -> T {
    web::Query::<T>::from_query(req.query_string())
        .map(web::Query::into_inner)
        .unwrap_or_default()
}

/// A body as WeChat reads it: not JSON of the right shape → 47001.
fn body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiStatus> {
    serde_json::from_slice(bytes).map_err(|_| ApiStatus {
        errcode: 47001,
        errmsg: "data format error".into(),
    })
}

#[derive(Default, Deserialize)]
struct TokenParam {
    #[serde(default)]
    access_token: String,
}

async fn classic_token(sim: web::Data<Simulator>, req: HttpRequest) -> HttpResponse {
    answer(&sim, Call::ClassicToken(query::<TokenQuery>(&req))).await
}

async fn stable_token(sim: web::Data<Simulator>, bytes: Bytes) -> HttpResponse {
    // A body WeChat cannot read is a request without fields.
    let req = body::<StableTokenRequest>(&bytes).unwrap_or_default();
    answer(&sim, Call::StableToken(req)).await
}

async fn code_to_session(sim: web::Data<Simulator>, req: HttpRequest) -> HttpResponse {
    answer(&sim, Call::Login(query::<Code2SessionQuery>(&req))).await
}

async fn send_template(sim: web::Data<Simulator>, req: HttpRequest, bytes: Bytes) -> HttpResponse {
    let token = query::<TokenParam>(&req).access_token;
    answer(
        &sim,
        Call::Template {
            token,
            msg: body(&bytes),
        },
    )
    .await
}

async fn send_subscribe(sim: web::Data<Simulator>, req: HttpRequest, bytes: Bytes) -> HttpResponse {
    let token = query::<TokenParam>(&req).access_token;
    answer(
        &sim,
        Call::Subscribe {
            token,
            msg: body(&bytes),
        },
    )
    .await
}

async fn private_templates(sim: web::Data<Simulator>, req: HttpRequest) -> HttpResponse {
    let token = query::<TokenParam>(&req).access_token;
    answer(&sim, Call::Templates { token }).await
}

async fn answer(sim: &Simulator, call: Call) -> HttpResponse {
    let subscribe = matches!(call, Call::Subscribe { .. });
    let (answer, delivered) = {
        let mut state = sim.lock();
        let before = state.delivery_count();
        let answer = state.call(call, Instant::now());
        let delivered = if subscribe {
            state.deliveries_since(before)
        } else {
            Vec::new()
        };
        (answer, delivered)
    };
    // WeChat pushes the sent event of each accepted subscribe send (when the app
    // has a push URL), whether or not its answer reached the caller.
    for d in delivered {
        if let Some(msgid) = d.msgid {
            sim.pusher.sent(&d.appid, &d.touser, &d.template_id, msgid);
        }
    }
    let _in_flight = answer.in_flight.map(|key| InFlight {
        sim: sim.clone(),
        key,
    });
    if !answer.latency.is_zero() {
        tokio::time::sleep(answer.latency).await;
    }
    match answer.reply {
        Reply::Json(body) => HttpResponse::Ok()
            .content_type("application/json")
            .body(body),
        Reply::Http500 => HttpResponse::InternalServerError()
            .json(json!({"errcode": -1, "errmsg": "injected HTTP 500"})),
        Reply::Dropped(body) => HttpResponse::Ok()
            .content_type("application/json")
            .body(Broken::new(body)),
    }
}

/// A send being answered; dropped when the handler ends, also when the client
/// went away during the latency.
struct InFlight {
    sim: Simulator,
    key: (String, String),
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.sim.lock().landed(&self.key);
    }
}

/// A body that announces its full length, sends the first half and then fails,
/// so actix closes the connection mid-answer: the client cannot know the outcome.
struct Broken {
    head: Option<Bytes>,
    len: u64,
}

impl Broken {
    fn new(body: Vec<u8>) -> Self {
        let (half, len) = (body.len() / 2, body.len() as u64);
        let head = Bytes::from(body).slice(..half);
        Broken {
            head: Some(head),
            len,
        }
    }
}

impl MessageBody for Broken {
    type Error = std::io::Error;

    fn size(&self) -> BodySize {
        BodySize::Sized(self.len)
    }

    fn poll_next(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        Poll::Ready(Some(match self.head.take() {
            Some(head) => Ok(head),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "simulator: response dropped on purpose",
            )),
        }))
    }
}

// ----- control endpoints -----

impl ResponseError for SimError {
    fn status_code(&self) -> StatusCode {
        match self {
            SimError::UnknownApp(_) => StatusCode::NOT_FOUND,
            SimError::Invalid(_) => StatusCode::BAD_REQUEST,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let code = match self {
            SimError::UnknownApp(_) => "unknown_app",
            SimError::Invalid(_) => "invalid_request",
        };
        HttpResponse::build(self.status_code())
            .json(json!({"error": {"code": code, "message": self.to_string()}}))
    }
}

type Answer = Result<HttpResponse, SimError>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AppReq {
    appid: String,
    secret: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AppIdReq {
    appid: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserReq {
    appid: String,
    openid: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FormIdsReq {
    appid: String,
    openid: String,
    count: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PrepayIdsReq {
    appid: String,
    openid: String,
    count: Option<u32>,
    uses: Option<u32>,
    activation_delay_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubscriptionsReq {
    appid: String,
    openid: String,
    template_id: String,
    count: Option<u32>,
}

async fn add_app(sim: web::Data<Simulator>, req: web::Json<AppReq>) -> Answer {
    if req.appid.is_empty() || req.secret.is_empty() {
        return Err(SimError::Invalid(
            "appid and secret must not be empty".into(),
        ));
    }
    sim.add_app(&req.appid, &Secret::new(req.secret.clone()));
    Ok(HttpResponse::Ok().json(json!({"appid": req.appid})))
}

async fn mint_code(sim: web::Data<Simulator>, req: web::Json<UserReq>) -> Answer {
    let code = sim.mint_code(&req.appid, &req.openid)?;
    Ok(HttpResponse::Ok().json(json!({"code": code})))
}

async fn mint_form_ids(sim: web::Data<Simulator>, req: web::Json<FormIdsReq>) -> Answer {
    let ids = sim.mint_form_ids(&req.appid, &req.openid, req.count.unwrap_or(1))?;
    Ok(HttpResponse::Ok().json(json!({"form_ids": ids})))
}

async fn mint_prepay_ids(sim: web::Data<Simulator>, req: web::Json<PrepayIdsReq>) -> Answer {
    let ids = sim.mint_prepay_ids(
        &req.appid,
        &req.openid,
        req.count.unwrap_or(1),
        req.uses,
        req.activation_delay_ms.map(Duration::from_millis),
    )?;
    Ok(HttpResponse::Ok().json(json!({"prepay_ids": ids})))
}

async fn grant_subscriptions(
    sim: web::Data<Simulator>,
    req: web::Json<SubscriptionsReq>,
) -> Answer {
    let left = sim.grant_subscriptions(
        &req.appid,
        &req.openid,
        &req.template_id,
        req.count.unwrap_or(1),
    )?;
    Ok(HttpResponse::Ok().json(json!({"grants_left": left})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TurnOffReq {
    appid: String,
    openid: String,
    template_id: String,
}

async fn turn_off(sim: web::Data<Simulator>, req: web::Json<TurnOffReq>) -> Answer {
    let voided = sim.turn_off(&req.appid, &req.openid, &req.template_id)?;
    Ok(HttpResponse::Ok().json(json!({"grants_voided": voided})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HabitsReq {
    appid: String,
    openid: String,
    #[serde(default)]
    always_keep: bool,
    #[serde(default)]
    refuses: bool,
}

async fn set_habits(sim: web::Data<Simulator>, req: web::Json<HabitsReq>) -> HttpResponse {
    let habits = super::UserHabits {
        always_keep: req.always_keep,
        refuses: req.refuses,
    };
    sim.set_habits(&req.appid, &req.openid, habits);
    HttpResponse::Ok().json(json!({"always_keep": habits.always_keep, "refuses": habits.refuses}))
}

async fn set_faults(sim: web::Data<Simulator>, req: web::Json<Faults>) -> Answer {
    sim.set_faults(req.into_inner())?;
    Ok(HttpResponse::Ok().json(sim.faults()))
}

async fn get_faults(sim: web::Data<Simulator>) -> HttpResponse {
    HttpResponse::Ok().json(sim.faults())
}

async fn invalidate_tokens(sim: web::Data<Simulator>, req: web::Json<AppIdReq>) -> Answer {
    let n = sim.invalidate_tokens(&req.appid)?;
    Ok(HttpResponse::Ok().json(json!({"invalidated": n})))
}

async fn reset_limits(sim: web::Data<Simulator>) -> HttpResponse {
    sim.reset_limits();
    HttpResponse::Ok().json(json!({"ok": true}))
}

async fn block(sim: web::Data<Simulator>, req: web::Json<UserReq>) -> Answer {
    sim.block(&req.appid, &req.openid)?;
    Ok(HttpResponse::Ok().json(json!({"ok": true})))
}

async fn deliveries(sim: web::Data<Simulator>) -> HttpResponse {
    HttpResponse::Ok().json(sim.deliveries())
}

async fn token_fetches(sim: web::Data<Simulator>) -> HttpResponse {
    HttpResponse::Ok().json(sim.token_fetches())
}

async fn stats(sim: web::Data<Simulator>) -> HttpResponse {
    HttpResponse::Ok().json(sim.stats())
}

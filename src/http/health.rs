//! `/healthz` (the process serves; touches no database) and `/readyz` (the database
//! answers).

use actix_web::{web, HttpResponse};
use serde_json::json;

use super::error::ApiError;
use super::{resource, AppState};

pub fn config(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/healthz").route(web::get().to(healthz)))
        .service(resource("/readyz").route(web::get().to(readyz)));
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

async fn readyz(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    state.db.run(crate::db::ping).await?;
    Ok(HttpResponse::Ok().json(json!({"status": "ready"})))
}

//! `/healthz` (the process serves; touches no database), `/readyz` (the database
//! answers) and `/metrics` (mounted apart: on its own address when
//! `LEDGER_METRICS_BIND` is set).

use actix_web::{web, HttpResponse};
use serde::Serialize;
use serde_json::json;
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::{resource, AppState};

pub fn config(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/healthz").route(web::get().to(healthz)))
        .service(resource("/readyz").route(web::get().to(readyz)));
}

/// `/metrics` alone, for whichever server exposes it.
pub fn metrics_config(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/metrics").route(web::get().to(metrics)));
}

#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "The process serves; touches no database", body = StatusBody)))]
pub(crate) async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, description = "The database answers", body = StatusBody),
        (status = 503, description = "unavailable", body = ErrorBody)))]
pub(crate) async fn readyz(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    state.db.run(crate::db::ping).await?;
    Ok(HttpResponse::Ok().json(json!({"status": "ready"})))
}

/// Prometheus text format. The gauges are read at scrape time.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub(crate) async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    let m = &state.metrics;
    let (open, idle) = state.db.pool_state();
    m.db_connections.set(open.into());
    m.db_idle_connections.set(idle.into());
    match state.db.run(crate::outbox::store::queue_depth).await {
        Ok(depth) => m.queue_depth.set(depth),
        Err(e) => log::warn!("metrics: queue depth unavailable: {e}"),
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(m.render())
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StatusBody {
    pub status: String,
}

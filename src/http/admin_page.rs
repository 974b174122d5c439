//! The admin web page (`GET /admin`): one HTML page, its stylesheet and its script,
//! embedded in the binary. The page holds no data and needs no key; its script asks
//! the operator for an admin API key and calls the admin endpoints with it.

use actix_web::http::header::{self, HeaderValue};
use actix_web::{web, HttpResponse};

use super::error::{ApiError, ErrorBody};
use super::resource;

const INDEX_HTML: &str = include_str!("../../assets/admin/index.html");
const ADMIN_CSS: &str = include_str!("../../assets/admin/admin.css");
const ADMIN_JS: &str = include_str!("../../assets/admin/admin.js");

/// Only this origin's own files; no inline script or style, no frames, no plugins,
/// and a form can never post anywhere (the sign-in form is handled by the script).
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
    img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; \
    form-action 'none'; frame-ancestors 'none'";

pub fn config(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/admin").route(web::get().to(page)))
        .service(resource("/admin/assets/{file}").route(web::get().to(asset)));
}

#[utoipa::path(get, path = "/admin", tag = "admin",
    responses((status = 200, description = "The admin web page", content_type = "text/html")))]
pub(crate) async fn page() -> HttpResponse {
    respond("text/html; charset=utf-8", INDEX_HTML, "no-store")
}

#[utoipa::path(get, path = "/admin/assets/{file}", tag = "admin",
    params(("file" = String, Path, description = "admin.css or admin.js")),
    responses((status = 200, description = "A stylesheet or script of the page", content_type = "text/plain"),
        (status = 404, description = "not_found", body = ErrorBody)))]
pub(crate) async fn asset(file: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let (content_type, body) = match file.as_str() {
        "admin.css" => ("text/css; charset=utf-8", ADMIN_CSS),
        "admin.js" => ("text/javascript; charset=utf-8", ADMIN_JS),
        other => return Err(ApiError::not_found(format!("no admin asset {other:?}"))),
    };
    // The names carry no version, so a browser must ask again after an upgrade.
    Ok(respond(content_type, body, "no-cache"))
}

fn respond(content_type: &'static str, body: &'static str, cache: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, HeaderValue::from_static(content_type)))
        .insert_header((header::CACHE_CONTROL, HeaderValue::from_static(cache)))
        .insert_header((
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        ))
        .insert_header((
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .insert_header((
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ))
        .insert_header((header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")))
        .body(body)
}

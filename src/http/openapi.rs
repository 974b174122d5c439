//! `GET /openapi.json`: the contract as an OpenAPI 3 document, generated from the
//! handlers' annotations and the types they take and return.

use actix_web::{web, HttpResponse};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::resource;

pub fn config(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/openapi.json").route(web::get().to(document)));
}

pub(crate) struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        components.add_security_scheme(
            "client_session",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "formid-ledger",
        description = "Collects WeChat mini-program message credentials per user and spends each use at most once."
    ),
    paths(
        super::health::healthz,
        super::health::readyz,
        super::health::metrics,
        document,
        super::credentials::register,
        super::client::login,
        super::client::report,
        super::messages::create,
        super::messages::get,
        super::campaigns::create,
        super::campaigns::list,
        super::campaigns::get,
        super::campaigns::act,
        super::campaigns::messages,
        super::push::verify_url,
        super::push::receive,
        super::tokens::current,
        super::tokens::refresh,
        super::admin::quota,
        super::admin::user_messages,
        super::admin::users,
        super::admin::stats,
        super::admin::apps,
        super::admin::list_templates,
        super::admin::register_template,
        super::admin::unregister_template,
        super::webhooks::put,
        super::webhooks::list,
        super::webhooks::delete,
        super::webhooks::deliveries,
        super::webhooks::retry,
        super::admin_page::page,
        super::admin_page::asset,
        super::api_docs::page, super::api_docs::asset,
    ),
    components(schemas(
        super::error::ErrorBody,
        super::error::ErrorCode,
        crate::outbox::settle::MessageErrorCode,
        crate::outbox::settle::AttemptOutcome
    )),
    modifiers(&Security)
)]
pub struct ApiDoc;

/// The OpenAPI document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "OpenAPI 3 document", content_type = "application/json")))]
pub async fn document() -> HttpResponse {
    HttpResponse::Ok().json(ApiDoc::openapi())
}

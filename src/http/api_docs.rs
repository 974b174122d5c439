//! The API reference (`GET /docs`): `/openapi.json` rendered by Swagger UI. The page,
//! its start-up script and the viewer (swagger-ui-dist, vendored under
//! `assets/apidocs/` by `scripts/vendor-apidocs.sh`) are embedded in the binary, so the
//! page loads nothing from elsewhere and works offline. `docs/API.md` is the same
//! contract as text; the tests below keep the two from drifting apart.

use std::sync::LazyLock;

use actix_web::http::header::{self, EntityTag, HeaderValue, IfNoneMatch};
use actix_web::middleware::Compress;
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse, HttpResponseBuilder};
use sha2::{Digest, Sha256};

use super::error::{ApiError, ErrorBody};
use super::resource;

const INDEX_HTML: &[u8] = include_bytes!("../../assets/apidocs/index.html");

/// Every file the page loads: (name, content type, body).
const ASSETS: [(&str, &str, &[u8]); 3] = [
    (
        "docs.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../assets/apidocs/docs.js"),
    ),
    (
        "swagger-ui-bundle.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../assets/apidocs/swagger-ui/swagger-ui-bundle.js"),
    ),
    (
        "swagger-ui.css",
        "text/css; charset=utf-8",
        include_bytes!("../../assets/apidocs/swagger-ui/swagger-ui.css"),
    ),
];

/// Weak validators of [`ASSETS`], by content: a browser revalidates the 1.9 MB viewer
/// with a 304 instead of downloading it on every visit, and any change of a file (an
/// upgrade, a new build) changes its tag. Weak because gzip may re-encode the body.
static ETAGS: LazyLock<Vec<EntityTag>> = LazyLock::new(|| {
    ASSETS
        .iter()
        .map(|(_, _, body)| EntityTag::new_weak(format!("{:x}", Sha256::digest(body))[..32].into()))
        .collect()
});

/// As tight as the viewer allows (checked in Chromium by tests/browser/docs.test.mjs):
/// nothing is allowed unless named; scripts and stylesheets only from this origin's
/// files (no inline script or style, no eval); no frames, no plugins, and a form can
/// never post anywhere. What is named beyond that, each for Swagger UI:
/// - `img-src data:`: swagger-ui.css draws its icons as data: SVG images (and the page's
///   empty favicon is one, so the browser asks for no /favicon.ico);
/// - `connect-src 'self'`: the page fetches /openapi.json, and "Try it out" calls the
///   API on this origin.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src data:; \
    connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

pub fn config(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/docs").route(web::get().to(page)))
        .service(
            resource("/docs/assets/{file}")
                .route(web::get().to(asset))
                .wrap(Compress::default()),
        );
}

#[utoipa::path(get, path = "/docs", tag = "operations",
    responses((status = 200, description = "The API reference: /openapi.json rendered by Swagger UI", content_type = "text/html")))]
pub(crate) async fn page() -> HttpResponse {
    with_headers(HttpResponse::Ok(), "no-store")
        .content_type("text/html; charset=utf-8")
        .body(INDEX_HTML)
}

#[utoipa::path(get, path = "/docs/assets/{file}", tag = "operations",
    params(("file" = String, Path, description = "docs.js, swagger-ui-bundle.js or swagger-ui.css"),
        ("If-None-Match" = Option<String>, Header, description = "The ETag of the copy the client holds")),
    responses((status = 200, description = "A script or stylesheet of the page (ETag; gzip on request)", content_type = "text/plain"),
        (status = 304, description = "Not modified: the client's copy is current"),
        (status = 404, description = "not_found", body = ErrorBody)))]
pub(crate) async fn asset(
    req: HttpRequest,
    file: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let file = file.into_inner();
    let found = ASSETS
        .iter()
        .zip(ETAGS.iter())
        .find(|((name, ..), _)| *name == file);
    let Some(((_, content_type, body), etag)) = found else {
        return Err(ApiError::not_found(format!("no docs asset {file:?}")));
    };
    let current = match req.get_header::<IfNoneMatch>() {
        Some(IfNoneMatch::Any) => true,
        Some(IfNoneMatch::Items(tags)) => tags.iter().any(|t| t.weak_eq(etag)),
        None => false,
    };
    // The names carry no version: a browser asks again each time, and the tag answers.
    let mut res = with_headers(
        if current {
            HttpResponse::NotModified()
        } else {
            HttpResponse::Ok()
        },
        "no-cache",
    );
    res.insert_header(header::ETag(etag.clone()));
    Ok(if current {
        res.finish()
    } else {
        res.content_type(*content_type).body(*body)
    })
}

/// The headers of every response of the page: caching as told, and the CSP.
fn with_headers(mut res: HttpResponseBuilder, cache: &'static str) -> HttpResponseBuilder {
    for (name, value) in [
        (header::CACHE_CONTROL, cache),
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_FRAME_OPTIONS, "DENY"),
    ] {
        res.insert_header((name, HeaderValue::from_static(value)));
    }
    res
}

#[cfg(test)]
mod tests {
    //! docs/API.md against the OpenAPI document, both ways: an endpoint or a code added
    //! to one and not the other fails here.

    use std::collections::BTreeSet;

    use serde_json::Value;
    use utoipa::OpenApi;

    use super::{ASSETS, INDEX_HTML};
    use crate::http::openapi::ApiDoc;

    const API_MD: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/API.md"));

    /// The keys of an OpenAPI path item that are operations.
    const METHODS: [&str; 8] = [
        "get", "put", "post", "delete", "options", "head", "patch", "trace",
    ];

    fn openapi() -> Value {
        serde_json::to_value(ApiDoc::openapi()).expect("the OpenAPI document serializes")
    }

    /// `METHOD /path` of every operation of the OpenAPI document.
    fn operations(doc: &Value) -> BTreeSet<String> {
        let paths = doc["paths"].as_object().expect("paths");
        let mut out = BTreeSet::new();
        for (path, item) in paths {
            for method in item.as_object().expect("path item").keys() {
                if METHODS.contains(&method.as_str()) {
                    out.insert(format!("{} {path}", method.to_uppercase()));
                }
            }
        }
        out
    }

    /// `METHOD /path` of every endpoint heading of docs/API.md: a line that is exactly
    /// ``### `METHOD /path` `` (a `### `` line of any other form fails).
    fn endpoint_headings(md: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for line in md.lines().filter(|l| l.starts_with("### `")) {
            let endpoint = line
                .strip_prefix("### `")
                .and_then(|rest| rest.strip_suffix('`'))
                .filter(|e| {
                    e.split_once(' ').is_some_and(|(method, path)| {
                        METHODS.contains(&method.to_lowercase().as_str())
                            && method == method.to_uppercase()
                            && path.starts_with('/')
                            && !path.contains([' ', '`'])
                    })
                })
                .unwrap_or_else(|| panic!("docs/API.md: {line:?} is not ### `METHOD /path`"));
            assert!(
                out.insert(endpoint.to_string()),
                "docs/API.md documents {endpoint} twice"
            );
        }
        out
    }

    /// The first cells (`` `code` ``) of the table rows under the line `heading`, up to
    /// the next heading.
    fn table_codes(md: &str, heading: &str) -> BTreeSet<String> {
        let mut lines = md.lines().skip_while(|l| *l != heading);
        assert!(lines.next().is_some(), "docs/API.md has no {heading:?}");
        lines
            .take_while(|l| !l.starts_with('#'))
            .filter_map(|l| l.strip_prefix("| `"))
            .map(|cell| cell.split('`').next().unwrap_or_default().to_string())
            .collect()
    }

    fn schema_enum(doc: &Value, schema: &str) -> BTreeSet<String> {
        doc["components"]["schemas"][schema]["enum"]
            .as_array()
            .unwrap_or_else(|| panic!("no enum schema {schema} in the OpenAPI document"))
            .iter()
            .map(|v| v.as_str().expect("string enum").to_string())
            .collect()
    }

    fn assert_same(what: &str, openapi: &BTreeSet<String>, md: &BTreeSet<String>) {
        let undocumented: Vec<_> = openapi.difference(md).collect();
        let unserved: Vec<_> = md.difference(openapi).collect();
        assert!(
            undocumented.is_empty() && unserved.is_empty(),
            "{what}: in /openapi.json but not docs/API.md: {undocumented:?}; \
             in docs/API.md but not /openapi.json: {unserved:?}"
        );
    }

    #[test]
    fn api_md_documents_exactly_the_endpoints_of_the_openapi_document() {
        let doc = openapi();
        let served = operations(&doc);
        assert!(served.len() >= 20, "too few operations found: {served:?}");
        assert_same("endpoints", &served, &endpoint_headings(API_MD));
    }

    #[test]
    fn api_md_code_tables_match_the_openapi_enums() {
        let doc = openapi();
        for (heading, schema) in [
            ("## Error codes", "ErrorCode"),
            ("### Message statuses", "Status"),
            ("### Message error codes", "MessageErrorCode"),
            ("### Attempt outcomes", "AttemptOutcome"),
            ("### Rejection reasons", "RejectReason"),
        ] {
            assert_same(
                &format!("{heading} vs schema {schema}"),
                &schema_enum(&doc, schema),
                &table_codes(API_MD, heading),
            );
        }
    }

    #[test]
    fn the_page_loads_exactly_the_embedded_assets() {
        let html = std::str::from_utf8(INDEX_HTML).expect("UTF-8");
        let loaded: BTreeSet<&str> = html
            .split("\"/docs/assets/")
            .skip(1)
            .filter_map(|rest| rest.split('"').next())
            .collect();
        let served: BTreeSet<&str> = ASSETS.iter().map(|(name, _, _)| *name).collect();
        assert_eq!(loaded, served);
        assert!(!html.contains("http://") && !html.contains("https://"));
    }
}

//! docs/API.md, the HTTP contract as text, checked against the OpenAPI document the
//! service serves at `/openapi.json`.

#[cfg(test)]
mod tests {
    //! Both ways: an endpoint or a code added to one and not the other fails here.

    use std::collections::BTreeSet;

    use serde_json::Value;
    use utoipa::OpenApi;

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
            ("### Rejection reasons", "RejectReason"),
        ] {
            assert_same(
                &format!("{heading} vs schema {schema}"),
                &schema_enum(&doc, schema),
                &table_codes(API_MD, heading),
            );
        }
    }
}

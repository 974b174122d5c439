// @generated automatically by Diesel CLI.

diesel::table! {
    credentials (id) {
        id -> Int8,
        app_id -> Text,
        openid -> Text,
        kind -> Text,
        value -> Nullable<Text>,
        template_id -> Nullable<Text>,
        uses_total -> Int4,
        uses_left -> Int4,
        issued_at -> Timestamp,
        expires_at -> Nullable<Timestamp>,
        invalid -> Bool,
        invalid_reason -> Nullable<Text>,
        created_at -> Timestamp,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    access_tokens (app_id) {
        app_id -> Text,
        token -> Text,
        expires_at -> Timestamp,
        fetched_at -> Nullable<Timestamp>,
        lease_owner -> Nullable<Text>,
        lease_until -> Nullable<Timestamp>,
        failures -> Int4,
        last_error -> Nullable<Text>,
    }
}

diesel::table! {
    service_secrets (name) {
        name -> Text,
        value -> Text,
        created_at -> Timestamp,
    }
}

diesel::allow_tables_to_appear_in_same_query!(access_tokens, credentials, service_secrets,);

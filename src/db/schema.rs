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

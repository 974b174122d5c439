// @generated automatically by Diesel CLI.

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
    app_pauses (app_id) {
        app_id -> Text,
        until -> Timestamp,
        reason -> Text,
    }
}

diesel::table! {
    campaigns (id) {
        id -> Int8,
        public_id -> Text,
        app_id -> Text,
        template_id -> Text,
        channel -> Text,
        page -> Nullable<Text>,
        body -> Text,
        holding -> Bool,
        audience -> Nullable<Text>,
        status -> Text,
        rate_per_s -> Nullable<Int4>,
        send_at -> Nullable<Timestamp>,
        targeted -> Int8,
        materialised -> Int8,
        holders_after -> Nullable<Text>,
        audience_done -> Bool,
        released -> Int8,
        pace_from -> Nullable<Timestamp>,
        pace_base -> Int8,
        paced_at -> Nullable<Timestamp>,
        runner -> Nullable<Text>,
        runner_until -> Nullable<Timestamp>,
        idem_scope -> Nullable<Text>,
        idem_key -> Nullable<Text>,
        request_hash -> Nullable<Text>,
        final_counts -> Nullable<Text>,
        created_at -> Timestamp,
        updated_at -> Timestamp,
        started_at -> Nullable<Timestamp>,
        finished_at -> Nullable<Timestamp>,
    }
}

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
        reported_at -> Nullable<Timestamp>,
        pushed_at -> Nullable<Timestamp>,
    }
}

diesel::table! {
    idempotency_keys (id) {
        id -> Int8,
        scope -> Text,
        key -> Text,
        request_hash -> Text,
        message_id -> Int8,
        created_at -> Timestamp,
    }
}

diesel::table! {
    jobs (name) {
        name -> Text,
        lease_owner -> Nullable<Text>,
        lease_until -> Nullable<Timestamp>,
        last_run_at -> Nullable<Timestamp>,
    }
}

diesel::table! {
    message_attempts (id) {
        id -> Int8,
        message_id -> Int8,
        at -> Timestamp,
        credential_id -> Nullable<Int8>,
        wechat_errcode -> Nullable<Int4>,
        outcome -> Text,
    }
}

diesel::table! {
    messages (id) {
        id -> Int8,
        app_id -> Text,
        openid -> Text,
        template_id -> Text,
        channel -> Text,
        page -> Nullable<Text>,
        body -> Text,
        status -> Text,
        credential_id -> Nullable<Int8>,
        credential_kind -> Nullable<Text>,
        credential_value -> Nullable<Text>,
        credential_uses_total -> Nullable<Int4>,
        credential_created_at -> Nullable<Timestamp>,
        credentials_tried -> Int4,
        retries -> Int4,
        in_flight -> Bool,
        ambiguous -> Bool,
        error_code -> Nullable<Text>,
        wechat_errcode -> Nullable<Int4>,
        error_message -> Nullable<Text>,
        await_until -> Nullable<Timestamp>,
        next_attempt_at -> Timestamp,
        lease_owner -> Nullable<Text>,
        lease_until -> Nullable<Timestamp>,
        created_at -> Timestamp,
        updated_at -> Timestamp,
        finished_at -> Nullable<Timestamp>,
        credential_issued_at -> Nullable<Timestamp>,
        young_retries -> Int4,
        wakes -> Int4,
        public_id -> Text,
        wechat_msgid -> Nullable<Text>,
        delivery -> Nullable<Text>,
        send_at -> Nullable<Timestamp>,
        campaign_id -> Nullable<Int8>,
    }
}

diesel::table! {
    unmatched_sent_events (app_id, msgid) {
        app_id -> Text,
        msgid -> Text,
        openid -> Text,
        template_id -> Text,
        delivery -> Text,
        received_at -> Timestamp,
    }
}

diesel::table! {
    push_receipts (app_id, identity) {
        app_id -> Text,
        identity -> Text,
        received_at -> Timestamp,
    }
}

diesel::table! {
    service_secrets (name) {
        name -> Text,
        value -> Text,
        created_at -> Timestamp,
    }
}

diesel::table! {
    subscription_results (app_id, openid, template_id, result) {
        app_id -> Text,
        openid -> Text,
        template_id -> Text,
        result -> Text,
        count -> Int8,
        last_at -> Timestamp,
    }
}

diesel::table! {
    subscription_templates (app_id, template_id) {
        app_id -> Text,
        template_id -> Text,
        created_at -> Timestamp,
    }
}

diesel::table! {
    webhook_deliveries (id) {
        id -> Int8,
        kind -> Text,
        webhook -> Nullable<Text>,
        url -> Nullable<Text>,
        event_id -> Nullable<Text>,
        event_type -> Nullable<Text>,
        app_id -> Text,
        content_type -> Text,
        body -> Text,
        status -> Text,
        attempts -> Int4,
        last_error -> Nullable<Text>,
        next_attempt_at -> Timestamp,
        retry_from -> Timestamp,
        lease_owner -> Nullable<Text>,
        lease_until -> Nullable<Timestamp>,
        created_at -> Timestamp,
        updated_at -> Timestamp,
        delivered_at -> Nullable<Timestamp>,
    }
}

diesel::table! {
    webhooks (name) {
        name -> Text,
        url -> Text,
        events -> Text,
        app_ids -> Nullable<Text>,
        secret -> Text,
        created_at -> Timestamp,
        updated_at -> Timestamp,
    }
}

diesel::table! {
    wechat_templates (app_id, template_id) {
        app_id -> Text,
        template_id -> Text,
        title -> Text,
        keys -> Text,
        kind -> Int4,
        fetched_at -> Timestamp,
    }
}

diesel::joinable!(message_attempts -> messages (message_id));

diesel::allow_tables_to_appear_in_same_query!(
    access_tokens,
    app_pauses,
    campaigns,
    credentials,
    idempotency_keys,
    jobs,
    message_attempts,
    messages,
    push_receipts,
    service_secrets,
    subscription_results,
    subscription_templates,
    webhook_deliveries,
    webhooks,
    wechat_templates,
    unmatched_sent_events,
);

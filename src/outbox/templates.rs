//! Which templates are subscription templates (sent with subscribe-send): those
//! named in configuration for every app, and those an admin registered per app.

use diesel::prelude::*;

use super::Channel;
use crate::db::schema::subscription_templates::dsl as t;
use crate::db::{DbConn, DbResult};
use crate::dispatch;
use crate::time::to_db;

/// The channel of a message of `template_id` to a user of `app_id`.
pub fn channel_of(
    conn: &mut DbConn,
    configured: &[String],
    app_id: &str,
    template_id: &str,
) -> DbResult<Channel> {
    if configured.iter().any(|c| c == template_id) {
        return Ok(Channel::Subscription);
    }
    let registered: i64 = dispatch!(conn, |c| t::subscription_templates
        .filter(t::app_id.eq(app_id))
        .filter(t::template_id.eq(template_id))
        .count()
        .get_result(c))?;
    Ok(if registered > 0 {
        Channel::Subscription
    } else {
        Channel::Template
    })
}

/// The app's registered subscription templates (configuration not included).
pub fn registered(conn: &mut DbConn, app_id: &str) -> DbResult<Vec<String>> {
    Ok(dispatch!(conn, |c| t::subscription_templates
        .filter(t::app_id.eq(app_id))
        .order(t::template_id)
        .select(t::template_id)
        .load(c))?)
}

/// Registers a subscription template; true if it was new.
pub fn register(conn: &mut DbConn, app_id: &str, template_id: &str) -> DbResult<bool> {
    let now = to_db(crate::time::now());
    let n = dispatch!(conn, |c| diesel::insert_into(t::subscription_templates)
        .values((
            t::app_id.eq(app_id),
            t::template_id.eq(template_id),
            t::created_at.eq(now),
        ))
        .on_conflict_do_nothing()
        .execute(c))?;
    Ok(n == 1)
}

/// Unregisters a subscription template; true if it was registered.
pub fn unregister(conn: &mut DbConn, app_id: &str, template_id: &str) -> DbResult<bool> {
    let n = dispatch!(conn, |c| diesel::delete(
        t::subscription_templates
            .filter(t::app_id.eq(app_id))
            .filter(t::template_id.eq(template_id))
    )
    .execute(c))?;
    Ok(n == 1)
}

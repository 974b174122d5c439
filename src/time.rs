//! Time as the service sees it: UTC, microsecond precision (what PostgreSQL stores,
//! so both backends hold the same instants), RFC 3339 on the wire.

use chrono::{DateTime, SubsecRound, Utc};

/// Now, truncated to microseconds.
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// The database's representation: UTC without zone, the column type on both backends.
pub fn to_db(t: DateTime<Utc>) -> chrono::NaiveDateTime {
    t.naive_utc()
}

/// Serde helpers: RFC 3339 in UTC with milliseconds, e.g. `2026-11-27T08:00:00.000Z`.
pub mod rfc3339 {
    use chrono::{DateTime, SecondsFormat, Utc};
    use serde::Serializer;

    pub fn format(t: &DateTime<Utc>) -> String {
        t.to_rfc3339_opts(SecondsFormat::Millis, true)
    }

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(t))
    }

    pub mod option {
        use super::*;

        pub fn serialize<S: Serializer>(
            t: &Option<DateTime<Utc>>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match t {
                Some(t) => super::serialize(t, s),
                None => s.serialize_none(),
            }
        }
    }
}

//! The WeChat server API as this service uses it. Knows nothing of the database.

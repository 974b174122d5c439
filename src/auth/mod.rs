//! Who may do what: API keys with roles (business backends, admins, other servers)
//! and client sessions (mini-programs). Plain logic, no HTTP: the extractors that
//! apply it to a request are `http::extract`.

mod keys;
mod session;

pub use keys::{ApiKey, AppScope, Denied, Grant, KeyRing, Role};
pub use session::{SessionClaims, SessionError, SessionKey};

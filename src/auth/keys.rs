//! API keys: `Authorization: Bearer <key>`, each key with roles.
//!
//! Keys are kept as SHA-256 digests and every presented key is compared with every
//! known digest in constant time, so neither a key nor its length leaks by timing.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::secret::Secret;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Send,
    Admin,
    Token,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Send => "send",
            Role::Admin => "admin",
            Role::Token => "token",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        [Role::Send, Role::Admin, Role::Token]
            .into_iter()
            .find(|r| r.name() == s)
    }
}

/// The apps a key acts on: every app, or only those named in the 4th field of
/// `LEDGER_API_KEYS`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum AppScope {
    #[default]
    All,
    Only(Vec<String>),
}

impl AppScope {
    pub fn allows(&self, app_id: &str) -> bool {
        match self {
            AppScope::All => true,
            AppScope::Only(apps) => apps.iter().any(|a| a == app_id),
        }
    }
}

/// An API key as configured: `name:role+role:key[:app+app]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub name: String,
    pub roles: Vec<Role>,
    pub key: Secret,
    pub apps: AppScope,
}

/// Why a presented key does not open an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("missing or unknown API key")]
    UnknownKey,
    #[error("this key lacks the role `{}`", .0.name())]
    MissingRole(Role),
}

struct KeyEntry {
    name: String,
    roles: Vec<Role>,
    apps: AppScope,
    digest: [u8; 32],
}

/// A key that opened an endpoint: its name and the apps it acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant<'a> {
    pub name: &'a str,
    pub apps: &'a AppScope,
}

/// The configured API keys, ready for lookup.
pub struct KeyRing {
    keys: Vec<KeyEntry>,
}

impl KeyRing {
    pub fn new(keys: &[ApiKey]) -> Self {
        KeyRing {
            keys: keys
                .iter()
                .map(|k| KeyEntry {
                    name: k.name.clone(),
                    roles: k.roles.clone(),
                    apps: k.apps.clone(),
                    digest: Sha256::digest(k.key.expose().as_bytes()).into(),
                })
                .collect(),
        }
    }

    /// The key `presented`, if it is a configured key with `role`.
    pub fn authorize(&self, presented: Option<&str>, role: Role) -> Result<Grant<'_>, Denied> {
        self.authorize_any(presented, &[role])
    }

    /// The key `presented`, if it is a configured key with one of `roles` (the
    /// first is the one a refusal names).
    pub fn authorize_any(
        &self,
        presented: Option<&str>,
        roles: &[Role],
    ) -> Result<Grant<'_>, Denied> {
        let entry = presented
            .and_then(|p| self.find(p))
            .ok_or(Denied::UnknownKey)?;
        if !roles.iter().any(|r| entry.roles.contains(r)) {
            return Err(Denied::MissingRole(roles[0]));
        }
        Ok(Grant {
            name: &entry.name,
            apps: &entry.apps,
        })
    }

    fn find(&self, presented: &str) -> Option<&KeyEntry> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = None;
        for entry in &self.keys {
            if bool::from(entry.digest.ct_eq(&digest)) {
                found = Some(entry);
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> KeyRing {
        KeyRing::new(&[ApiKey {
            name: "shop".into(),
            roles: vec![Role::Send],
            key: Secret::new("0123456789abcdef"),
            apps: AppScope::Only(vec!["wxa".into()]),
        }])
    }

    #[test]
    fn a_key_opens_only_its_roles() {
        let ring = ring();
        let grant = ring
            .authorize(Some("0123456789abcdef"), Role::Send)
            .unwrap();
        assert_eq!(grant.name, "shop");
        assert!(grant.apps.allows("wxa"));
        assert!(!grant.apps.allows("wxb"));
        assert!(AppScope::All.allows("wxb"));
        assert_eq!(
            ring.authorize(Some("0123456789abcdef"), Role::Admin),
            Err(Denied::MissingRole(Role::Admin))
        );
        assert_eq!(
            ring.authorize(Some("0123456789abcdeF"), Role::Send),
            Err(Denied::UnknownKey)
        );
        assert_eq!(ring.authorize(None, Role::Send), Err(Denied::UnknownKey));
    }
}

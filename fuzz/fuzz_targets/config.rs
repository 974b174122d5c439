//! `Settings::from_sources(toml_text, env)`, the configuration parser, on arbitrary
//! TOML text (or TOML built from the known keys and arbitrary values) and a small
//! arbitrary environment.
//!
//! Properties:
//! * it never panics;
//! * an error names a setting: `LEDGER_CONFIG` or `LEDGER_<KNOWN>`, and says so in
//!   its one line;
//! * an error about LEDGER_API_KEYS, LEDGER_APPS or LEDGER_SESSION_SECRET never
//!   repeats the secret it was given (secrets never appear in a log line).
//!
//! One thing is kept out: `LEDGER_BIND` is checked with `ToSocketAddrs`, which
//! resolves host names through DNS (≈0.6 s, and a query to the resolver, per input).
//! A bind value that would need a lookup (not an IP literal, with a valid port) is
//! replaced by `127.0.0.1:<port>` when it comes from the environment, and such an
//! input is skipped when it comes from the TOML text.
#![no_main]

use std::collections::HashMap;
use std::net::SocketAddr;

use arbitrary::Arbitrary;
use formid_ledger::settings::Settings;
use libfuzzer_sys::fuzz_target;

use formid_ledger::settings::SETTINGS as KNOWN;

#[derive(Arbitrary, Debug)]
enum Name {
    Known(u8),
    Other(String),
}

impl Name {
    fn key(&self) -> String {
        match self {
            Name::Known(i) => KNOWN[*i as usize % KNOWN.len()].name.to_string(),
            Name::Other(s) => s.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Value {
    Str(String),
    Int(i64),
    Bool(bool),
    Float(f64),
    Strings(Vec<String>),
    Ints(Vec<i64>),
    Table(Vec<(String, String)>),
}

#[derive(Arbitrary, Debug)]
enum TomlSource {
    Text(String),
    Built(Vec<(Name, Value)>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    toml: Option<TomlSource>,
    env: Vec<(Name, String)>,
}

/// A TOML basic string.
fn quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn render(v: &Value) -> String {
    match v {
        Value::Str(s) => quote(s),
        Value::Int(i) => i.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Float(f) if f.is_finite() => format!("{f:?}"),
        Value::Float(f) if f.is_nan() => "nan".into(),
        Value::Float(f) => if *f > 0.0 { "inf".into() } else { "-inf".into() },
        Value::Strings(items) => format!("[{}]", items.iter().map(|s| quote(s)).collect::<Vec<_>>().join(", ")),
        Value::Ints(items) => format!("[{}]", items.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", ")),
        Value::Table(kv) => format!(
            "{{ {} }}",
            kv.iter().map(|(k, v)| format!("{} = {}", quote(k), quote(v))).collect::<Vec<_>>().join(", ")
        ),
    }
}

fn needs_dns(v: &str) -> Option<u16> {
    let v = v.trim();
    if v.parse::<SocketAddr>().is_ok() {
        return None;
    }
    let (_, port) = v.rsplit_once(':')?;
    port.parse::<u16>().ok()
}

/// The text `settings` would make of a TOML value (strings, numbers, booleans,
/// arrays of strings joined with commas).
fn toml_text(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        toml::Value::Array(items) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .map(|v| v.join(",")),
        _ => None,
    }
}

/// Texts the error messages contain on their own: a secret that is part of one
/// would be a false alarm.
const STATIC: &[&str] = &[
    "expected name:role+role:key[,…]",
    "the key must be at least 16 printable characters",
    "expected appid:secret[,appid:secret…]",
    "is empty or malformed",
    "must be at least 32 characters",
    "invalid setting LEDGER_",
    "unknown role",
    "is listed twice",
    "is not an appid",
    "is not a key name",
    "(send, admin, token)",
];

fn assert_not_leaked(message: &str, secret: &str, raw: &str) {
    let secret = secret.trim();
    if secret.len() < 8 || raw.matches(secret).count() != 1 || STATIC.iter().any(|s| s.contains(secret)) {
        return;
    }
    assert!(!message.contains(secret), "the error repeats the secret {secret:?}: {message}");
}

fuzz_target!(|input: Input| {
    let text = match &input.toml {
        None => None,
        Some(TomlSource::Text(t)) => Some(t.clone()),
        Some(TomlSource::Built(entries)) => Some(
            entries
                .iter()
                .take(40)
                .map(|(k, v)| format!("{} = {}\n", quote(&k.key()), render(v)))
                .collect::<String>(),
        ),
    };
    let mut env: HashMap<String, String> = HashMap::new();
    for (name, value) in input.env.iter().take(12) {
        let var = match name {
            Name::Known(_) => format!("LEDGER_{}", name.key().to_ascii_uppercase()),
            Name::Other(s) => s.clone(),
        };
        env.insert(var, value.clone());
    }
    // Keep DNS out (see the top of the file).
    if let Some(port) = env.get("LEDGER_BIND").and_then(|v| needs_dns(v)) {
        env.insert("LEDGER_BIND".into(), format!("127.0.0.1:{port}"));
    } else if !env.contains_key("LEDGER_BIND") {
        if let Some(table) = text.as_deref().and_then(|t| t.parse::<toml::Table>().ok()) {
            if table.get("bind").and_then(toml_text).is_some_and(|b| needs_dns(&b).is_some()) {
                return;
            }
        }
    }

    let Err(err) = Settings::from_sources(text.as_deref(), &env) else {
        return;
    };
    let message = err.to_string();
    let setting = err.name.strip_prefix("LEDGER_").map(str::to_ascii_lowercase);
    assert!(
        err.name == "LEDGER_CONFIG"
            || env.contains_key(&err.name)
            || setting.as_deref().is_some_and(|s| KNOWN.iter().any(|k| k.name == s)),
        "the error names no setting: {err:?}"
    );
    assert!(message.contains(&err.name), "{message:?} does not say {}", err.name);
    assert!(!message.contains('\n'), "a multi-line error: {message:?}");

    match err.name.as_str() {
        "LEDGER_SESSION_SECRET" => {
            if let Some(v) = env.get("LEDGER_SESSION_SECRET") {
                assert_not_leaked(&message, v, v);
            }
        }
        "LEDGER_API_KEYS" => {
            if let Some(raw) = env.get("LEDGER_API_KEYS") {
                for entry in raw.split(',') {
                    if let Some(key) = entry.trim().splitn(3, ':').nth(2) {
                        assert_not_leaked(&message, key, raw);
                    }
                }
            }
        }
        "LEDGER_APPS" => {
            if let Some(raw) = env.get("LEDGER_APPS") {
                for entry in raw.split(',') {
                    if let Some((_, secret)) = entry.trim().split_once(':') {
                        assert_not_leaked(&message, secret, raw);
                    }
                }
            }
        }
        _ => {}
    }
});

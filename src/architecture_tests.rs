//! ARCHITECTURE.md's table of rooms, checked against the source: each top-level
//! module imports only the rooms the table allows (the leaves `secret` and `time`
//! everywhere), the rooms form no circle, and the domain rooms stay free of HTTP and
//! WeChat. A new arrow is a change to this table and to ARCHITECTURE.md together.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Room → the rooms it may import (besides `secret` and `time`). `cli` and
/// `startup` wire everything and are not listed.
const ALLOWED: &[(&str, &[&str])] = &[
    (
        "http",
        &[
            "auth",
            "reporting",
            "outbox",
            "tokens",
            "ledger",
            "stats",
            "settings",
            "db",
            "wechat",
            "metrics",
            "webhooks",
            "push",
            "campaigns",
        ],
    ),
    ("campaigns", &["outbox", "ledger", "db"]),
    ("push", &["ledger", "outbox", "webhooks", "db", "wechat"]),
    ("reporting", &["ledger", "outbox", "db", "metrics"]),
    (
        "outbox",
        &["ledger", "tokens", "wechat", "webhooks", "db", "metrics"],
    ),
    ("tokens", &["wechat", "db", "settings", "metrics"]),
    ("housekeeping", &["ledger", "db", "settings"]),
    ("stats", &["ledger", "outbox", "db"]),
    ("ledger", &["db"]),
    ("wechat", &["metrics"]),
    ("sim", &["wechat"]),
    ("auth", &[]),
    ("settings", &["auth", "db", "ledger", "webhooks"]),
    ("webhooks", &["db", "metrics"]),
    ("db", &[]),
    ("metrics", &[]),
    ("secret", &[]),
    ("time", &[]),
];

/// Rooms that must not name these crates.
const FORBIDDEN_CRATES: &[(&str, &[&str])] = &[
    ("ledger", &["actix_web", "reqwest"]),
    ("reporting", &["actix_web", "reqwest"]),
    ("push", &["actix_web", "reqwest"]),
    ("campaigns", &["actix_web", "reqwest"]),
    ("outbox", &["actix_web"]),
    ("webhooks", &["actix_web"]),
    ("auth", &["actix_web", "diesel"]),
    ("wechat", &["diesel", "actix_web"]),
    ("settings", &["actix_web", "diesel"]),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src is readable").flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The source of every room, without its `#[cfg(test)]` part (tests may reach
/// further than the code they test).
fn rooms() -> BTreeMap<String, String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut rooms: BTreeMap<String, String> = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(&src).expect("under src");
        let first = rel.components().next().expect("a path");
        let room = first
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if ["lib", "main", "architecture_tests"].contains(&room.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("readable source");
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        rooms.entry(room).or_default().push_str(code);
    }
    rooms
}

/// The rooms a source text names as `crate::room`, `crate::{room, …}` or
/// `$crate::room`.
fn imports(code: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.trim()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut found = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = group.split('}').next().unwrap_or_default();
            found.extend(group.split(',').map(ident).filter(|s| !s.is_empty()));
        } else {
            found.insert(ident(rest));
        }
    }
    // `dispatch!` is db's macro, exported at the crate root.
    if found.remove("dispatch") || code.contains("dispatch!(") {
        found.insert("db".into());
    }
    found
}

#[test]
fn each_room_imports_only_what_architecture_md_allows() {
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut wrong = Vec::new();
    for (room, code) in rooms() {
        if room == "cli" || room == "startup" {
            continue;
        }
        let Some(may) = allowed.get(room.as_str()) else {
            wrong.push(format!("{room} is not in the table"));
            continue;
        };
        for import in imports(&code) {
            let fine = import == room || import == "secret" || import == "time";
            if !fine && !may.contains(&import.as_str()) {
                wrong.push(format!("{room} -> {import}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "arrows ARCHITECTURE.md does not allow: {wrong:?}"
    );
}

#[test]
fn the_table_has_no_circle() {
    let graph: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    fn visit<'a>(
        room: &'a str,
        graph: &BTreeMap<&'a str, &'a [&'a str]>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) {
        if done.contains(room) {
            return;
        }
        assert!(!path.contains(&room), "circle: {path:?} -> {room}");
        path.push(room);
        for next in graph.get(room).copied().unwrap_or_default() {
            visit(next, graph, path, done);
        }
        path.pop();
        done.insert(room);
    }
    let mut done = BTreeSet::new();
    for room in graph.keys() {
        visit(room, &graph, &mut Vec::new(), &mut done);
    }
}

#[test]
fn the_domain_rooms_name_no_http_or_database_crate_they_must_not() {
    let rooms = rooms();
    for (room, crates) in FORBIDDEN_CRATES {
        let code = &rooms[*room];
        for krate in *crates {
            assert!(
                !code.contains(&format!("{krate}::")),
                "{room} names {krate}"
            );
        }
    }
}

#[test]
fn imports_are_read_in_every_form() {
    let code = "use crate::db::Db;\nuse crate::{ledger, outbox::store};\n$crate::metrics::X;";
    let names: Vec<String> = imports(code).into_iter().collect();
    assert_eq!(names, ["db", "ledger", "metrics", "outbox"]);
}

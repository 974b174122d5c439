//! The command line, seven commands: `serve` (the default) runs the service,
//! `migrate` applies the migrations, `sim` runs the WeChat simulator alone, and
//! `quota`, `purge`, `stats` and `token` are small admin commands on the database
//! the settings name. Settings come from `LEDGER_*` variables, as for `serve`.

use std::io::Write;
use std::net::TcpListener;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::db::Db;
use crate::settings::Settings;
use crate::startup::Application;

#[derive(Debug, Parser)]
#[command(name = "formid-ledger", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the service (the default). Settings come from LEDGER_* variables and the
    /// TOML file named by LEDGER_CONFIG.
    Serve,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Run the WeChat simulator on its own (for tests, benchmarks, a sandbox peer).
    Sim {
        /// Address to listen on.
        #[arg(long, env = "LEDGER_SIM_BIND", default_value = "127.0.0.1:8081")]
        bind: String,
        /// Apps the simulator knows, `appid:secret[,…]` (more can be added over HTTP).
        #[arg(long, env = "LEDGER_SIM_APPS", default_value = "")]
        apps: String,
        /// Be WeChat's message pusher for these apps, `appid:token[:encoding_aes_key][,…]`
        /// (the service's LEDGER_PUSH value): a popup event per minted grant, a sent
        /// event per subscribe delivery. Needs --push-url.
        #[arg(long, env = "LEDGER_SIM_PUSH", default_value = "")]
        push: String,
        /// The service the pushes go to, `http://host:port[,…]`: each push POSTs to
        /// `{url}/v1/wechat/push/{appid}`; with several (instances), round-robin, a
        /// retry going to the next one.
        #[arg(long, env = "LEDGER_SIM_PUSH_URL", default_value = "")]
        push_url: String,
    },
    /// A user's quota, as the admin endpoint shows it.
    Quota {
        /// The app (may be left out when one app is configured).
        #[arg(long)]
        app: Option<String>,
        openid: String,
    },
    /// Purge what is past its retention now (what housekeeping does every
    /// LEDGER_PURGE_INTERVAL_S); --dry-run only counts.
    Purge {
        #[arg(long)]
        dry_run: bool,
    },
    /// Totals of an app: live credentials, the last 24 h of messages.
    Stats {
        #[arg(long)]
        app: Option<String>,
    },
    /// Show an app's current access_token expiry (the token itself only with --show).
    Token {
        app_id: String,
        /// Print the token too.
        #[arg(long)]
        show: bool,
    },
}

pub fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve);
    if let Command::Sim {
        bind,
        apps,
        push,
        push_url,
    } = &command
    {
        return sim(bind, apps, push, push_url);
    }
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    match command {
        Command::Serve => serve(settings),
        Command::Migrate => migrate(&settings),
        Command::Token { app_id, show } => token(&settings, &app_id, show),
        Command::Quota { app, openid } => offline(&settings, app.as_deref(), move |c, app| {
            json(&crate::ledger::quota(c, &app, &openid, crate::time::now())?)
        }),
        Command::Purge { dry_run } => offline(&settings, None, {
            let retention = settings.retention.clone();
            move |c, _| {
                let purged =
                    crate::housekeeping::purge(c, &retention, crate::time::now(), dry_run)?;
                json(&purged)
            }
        }),
        Command::Stats { app } => offline(&settings, app.as_deref(), |c, app| {
            json(&crate::stats::app_stats(c, &app, crate::time::now())?)
        }),
        Command::Sim { .. } => unreachable!("handled above"),
    }
}

/// One clear line on stderr, exit code 2.
fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("formid-ledger: {e}");
    ExitCode::from(2)
}

fn migrate(settings: &Settings) -> ExitCode {
    let result = Db::connect(&settings.database_url, 1).and_then(|db| db.migrate());
    match result {
        Ok(applied) if applied.is_empty() => {
            println!("database is up to date");
            ExitCode::SUCCESS
        }
        Ok(applied) => {
            for v in applied {
                println!("applied {v}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

fn serve(settings: Settings) -> ExitCode {
    let listener = match TcpListener::bind(&settings.bind) {
        Ok(l) => l,
        Err(e) => return fail(format!("cannot listen on {}: {e}", settings.bind)),
    };
    let result = actix_web::rt::System::new().block_on(async move {
        let app = Application::build(settings, listener).await?;
        if let Some(sandbox) = app.sandbox() {
            print_sandbox_banner(app.port(), sandbox);
        }
        log::info!("formid-ledger listening on port {}", app.port());
        if let Some(port) = app.metrics_port() {
            log::info!("/metrics served on port {port} only");
        }
        app.run_until_stopped().await?;
        Ok::<_, crate::startup::StartupError>(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

fn print_sandbox_banner(port: u16, sandbox: &crate::startup::Sandbox) {
    let key = match &sandbox.api_key {
        Some(k) => k.expose().to_string(),
        None => "(the keys of LEDGER_API_KEYS)".into(),
    };
    let line = "=".repeat(78);
    println!(
        "{line}\n SANDBOX MODE: no LEDGER_APPS configured.\n \
         The built-in WeChat SIMULATOR answers on this port (/cgi-bin, /sns, /sim) for\n \
         the app `{app}`. Nothing reaches the real WeChat. Do not use in production.\n\n \
         API key (roles send+admin+token): {key}\n \
         Try:  curl -s -XPOST localhost:{port}/sim/codes -d '{{\"appid\":\"{app}\",\"openid\":\"o-demo\"}}'\n{line}",
        app = crate::startup::SANDBOX_APP,
    );
}

fn sim(bind: &str, apps: &str, push: &str, push_url: &str) -> ExitCode {
    let apps = match crate::settings::parse_apps(apps) {
        Ok(apps) => apps,
        Err(problem) => return fail(format!("--apps: {problem}")),
    };
    let targets = match push_targets(push, push_url) {
        Ok(targets) => targets,
        Err(problem) => return fail(problem),
    };
    let listener = match TcpListener::bind(bind) {
        Ok(l) => l,
        Err(e) => return fail(format!("cannot listen on {bind}: {e}")),
    };
    let sim = crate::sim::Simulator::new(crate::sim::SimConfig {
        apps: apps.into_iter().map(|a| (a.app_id, a.secret)).collect(),
        ..crate::sim::SimConfig::default()
    });
    for (app_id, target) in targets {
        log::info!("WeChat simulator pushes the events of {app_id} to {target:?}");
        sim.set_push_target(&app_id, target);
    }
    log::info!("WeChat simulator listening on {bind}");
    match actix_web::rt::System::new().block_on(crate::sim::serve(listener, sim)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

/// The simulator's push targets from `--push` (`appid:token[:key][,…]`, as the
/// service's LEDGER_PUSH) and `--push-url` (the service's base URLs). Errors never
/// quote a token or a key.
fn push_targets(
    push: &str,
    push_url: &str,
) -> Result<Vec<(String, crate::sim::PushTarget)>, String> {
    let apps = crate::settings::parse_push(push).map_err(|p| format!("--push: {p}"))?;
    let mut bases = Vec::new();
    for (n, raw) in push_url
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .enumerate()
    {
        let ok = url::Url::parse(raw)
            .ok()
            .is_some_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
        if !ok {
            return Err(format!(
                "--push-url: entry {}: expected http(s)://host[:port]",
                n + 1
            ));
        }
        bases.push(raw.trim_end_matches('/').to_string());
    }
    match (apps.is_empty(), bases.is_empty()) {
        (true, true) => return Ok(Vec::new()),
        (false, true) => return Err("--push needs --push-url (where to push)".into()),
        (true, false) => return Err("--push-url needs --push (the apps' tokens)".into()),
        (false, false) => {}
    }
    Ok(apps
        .into_iter()
        .map(|app| {
            let mut urls = bases
                .iter()
                .map(|base| format!("{base}/v1/wechat/push/{}", app.app_id));
            let target = crate::sim::PushTarget {
                url: urls.next().unwrap_or_default(),
                more_urls: urls.collect(),
                token: app.token.expose().to_string(),
                encoding_aes_key: app.encoding_aes_key.map(|k| k.expose().to_string()),
            };
            (app.app_id, target)
        })
        .collect())
}

fn token(settings: &Settings, app_id: &str, show: bool) -> ExitCode {
    let result = Db::connect(&settings.database_url, 1).and_then(|db| {
        db.migrate()?;
        let mut conn = db.get()?;
        crate::tokens::store::load(&mut conn, app_id)
    });
    match result {
        Ok(Some(row)) if !row.token.is_empty() => {
            let left = row.expires_at - crate::time::now();
            println!(
                "{app_id}: expires at {} ({} s left){}",
                crate::time::rfc3339::format(&row.expires_at),
                left.num_seconds(),
                row.last_error
                    .map(|e| format!("; last refresh failed: {e}"))
                    .unwrap_or_default()
            );
            if show {
                println!("{}", row.token);
            }
            ExitCode::SUCCESS
        }
        Ok(_) => fail(format!(
            "no token stored for {app_id} yet (is the service running with it configured?)"
        )),
        Err(e) => fail(e),
    }
}

/// Runs a command against the configured database (migrated first), for the app
/// named or the only one configured.
fn offline(
    settings: &Settings,
    app: Option<&str>,
    f: impl FnOnce(&mut crate::db::DbConn, String) -> crate::db::DbResult<String>,
) -> ExitCode {
    let app = match (app, settings.apps.as_slice()) {
        (Some(a), _) => a.to_string(),
        (None, [only]) => only.app_id.clone(),
        (None, []) => crate::startup::SANDBOX_APP.to_string(),
        (None, _) => return fail("several apps are configured: say which with --app"),
    };
    let result = Db::connect(&settings.database_url, 1).and_then(|db| {
        db.migrate()?;
        let mut conn = db.get()?;
        f(&mut conn, app)
    });
    match result {
        Ok(out) => {
            // A closed pipe (`| head`) is not an error worth a panic.
            let _ = writeln!(std::io::stdout(), "{out}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

fn json(value: &impl serde::Serialize) -> crate::db::DbResult<String> {
    Ok(serde_json::to_string_pretty(value).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::push_targets;

    const KEY: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";

    #[test]
    fn push_targets_name_every_instance_of_the_service() {
        let targets = push_targets(
            &format!("wxa:tok3n:{KEY},wxb:plain"),
            "http://127.0.0.1:1/, http://127.0.0.1:2",
        )
        .unwrap();
        assert_eq!(targets.len(), 2);
        let (app, a) = &targets[0];
        assert_eq!(app, "wxa");
        assert_eq!(a.url, "http://127.0.0.1:1/v1/wechat/push/wxa");
        assert_eq!(a.more_urls, ["http://127.0.0.1:2/v1/wechat/push/wxa"]);
        assert_eq!(a.token, "tok3n");
        assert_eq!(a.encoding_aes_key.as_deref(), Some(KEY));
        assert_eq!(targets[1].1.url, "http://127.0.0.1:1/v1/wechat/push/wxb");
        assert!(targets[1].1.encoding_aes_key.is_none());
        assert!(push_targets("", "").unwrap().is_empty());
    }

    #[test]
    fn push_targets_refuse_half_a_configuration_and_never_echo_secrets() {
        assert!(push_targets("wxa:tok3n", "")
            .unwrap_err()
            .contains("--push-url"));
        assert!(push_targets("", "http://h:1")
            .unwrap_err()
            .contains("--push"));
        let e = push_targets("wxa:tok3n", "ftp://h:1").unwrap_err();
        assert!(e.contains("entry 1"), "{e}");
        let e = push_targets(&format!("wxa:t!{KEY}"), "http://h:1").unwrap_err();
        assert!(!e.contains(KEY) && !e.contains("t!"), "{e}");
    }
}

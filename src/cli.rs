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
    if let Command::Sim { bind, apps } = &command {
        return sim(bind, apps);
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

fn sim(bind: &str, apps: &str) -> ExitCode {
    let apps = match crate::settings::parse_apps(apps) {
        Ok(apps) => apps,
        Err(problem) => return fail(format!("--apps: {problem}")),
    };
    let listener = match TcpListener::bind(bind) {
        Ok(l) => l,
        Err(e) => return fail(format!("cannot listen on {bind}: {e}")),
    };
    let sim = crate::sim::Simulator::new(crate::sim::SimConfig {
        apps: apps.into_iter().map(|a| (a.app_id, a.secret)).collect(),
        ..crate::sim::SimConfig::default()
    });
    log::info!("WeChat simulator listening on {bind}");
    match actix_web::rt::System::new().block_on(crate::sim::serve(listener, sim)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
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

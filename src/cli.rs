//! The command line: `serve` (the default) and `migrate`.

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
}

pub fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(settings),
        Command::Migrate => migrate(&settings),
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
    if settings.apps.is_empty() {
        return fail(
            "no app configured: set LEDGER_APPS=appid:secret (sandbox mode, with the \
             built-in WeChat simulator, is not available yet)",
        );
    }
    let listener = match TcpListener::bind(&settings.bind) {
        Ok(l) => l,
        Err(e) => return fail(format!("cannot listen on {}: {e}", settings.bind)),
    };
    let result = actix_web::rt::System::new().block_on(async move {
        let app = Application::build(settings, listener).await?;
        log::info!("formid-ledger listening on port {}", app.port());
        app.run_until_stopped().await?;
        Ok::<_, crate::startup::StartupError>(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

//! `ledger-load`: the load generator and helpers behind `scripts/bench.sh`.
//!
//! Every subcommand prints one JSON object on stdout (one line) so the script can
//! collect them into a JSONL file; `report` turns that file into Markdown tables.
//!
//! - `ingest`   64 closed-loop clients `POST /v1/credentials` (1 or N form_ids per request,
//!   distinct values, many users), for a fixed time.
//! - `quota`    closed-loop `GET /v1/admin/users/{openid}/quota` over a set of users.
//! - `send-setup` mints form_ids in the simulator and registers them (not timed).
//! - `send`     clients `POST /v1/messages`; the simulator's delivery count over time
//!   (`GET /sim/stats`, `template_send`/`ok`) is the oracle of messages reaching `sent`.
//! - `push`     clients `POST` safe-mode (encrypted, signed) popup pushes to
//!   `/v1/wechat/push/{app}`; the ledger is read afterwards to check what was applied.
//! - `webhooks` a receiver in this process is registered for `message.finished`;
//!   clients post messages as `send` does; events delivered per second.
//! - `campaign` one `POST /v1/campaigns` to `--users` recipients holding form_ids:
//!   the request's time, then recipients sent per second until it is done.
//! - `ceiling`  the service's own `ledger::record` / `ledger::claim` in a tight
//!   in-process loop (no HTTP): the SQLite ceiling (and a PostgreSQL cross-check).
//! - `report`   JSONL → Markdown.
//!
//! The generator runs on a single-threaded tokio runtime so it takes at most one core
//! of the machine away from the service; it reports its own CPU time and that of the
//! service, the simulator and PostgreSQL over the measured window.
//!
//! By subject: [`load`] the closed loop, its tallies and the HTTP helpers;
//! [`scenarios`] the timed HTTP scenarios; [`seed`] what `send-setup` registers;
//! [`push`] and [`webhooks`] the message-push and webhook scenarios;
//! [`ceiling`] the in-process ceiling; [`procstat`] CPU and memory from `/proc`;
//! [`report`] JSONL → Markdown.

mod campaign;
mod ceiling;
mod chart;
mod load;
mod procstat;
mod push;
mod report;
mod scenarios;
mod seed;
mod webhooks;

use clap::{Parser, Subcommand};

use campaign::{campaign, CampaignArgs};
use ceiling::{ceiling, CeilingArgs};
use chart::{chart, ChartArgs};
use push::{push, PushArgs};
use report::{report, ReportArgs};
use scenarios::{ingest, quota, send, IngestArgs, QuotaArgs, SendArgs};
use seed::{send_setup, SendSetupArgs};
use webhooks::{webhooks, WebhooksArgs};

#[derive(Parser)]
#[command(name = "ledger-load", about = "formid-ledger benchmark load generator")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Ingest(IngestArgs),
    Quota(QuotaArgs),
    SendSetup(SendSetupArgs),
    Send(SendArgs),
    Push(PushArgs),
    Webhooks(WebhooksArgs),
    Campaign(CampaignArgs),
    Ceiling(CeilingArgs),
    Report(ReportArgs),
    /// An SVG of the run's ratios to the plain ceilings (docs/bench.svg).
    Chart(ChartArgs),
}

fn main() {
    let cli = Cli::parse();
    let out = match cli.cmd {
        Cmd::Ingest(a) => rt().block_on(ingest(a)),
        Cmd::Quota(a) => rt().block_on(quota(a)),
        Cmd::SendSetup(a) => rt().block_on(send_setup(a)),
        Cmd::Send(a) => rt().block_on(send(a)),
        Cmd::Push(a) => rt().block_on(push(a)),
        Cmd::Webhooks(a) => rt().block_on(webhooks(a)),
        Cmd::Campaign(a) => rt().block_on(campaign(a)),
        Cmd::Ceiling(a) => ceiling(a),
        Cmd::Report(a) => {
            report(&a.file);
            return;
        }
        Cmd::Chart(a) => {
            print!("{}", chart(&a));
            return;
        }
    };
    match out {
        Ok(v) => println!("{v}"),
        Err(e) => {
            eprintln!("ledger-load: {e}");
            std::process::exit(1);
        }
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

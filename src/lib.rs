//! formid-ledger: collects WeChat mini-program message credentials per user and
//! spends each use at most once.

pub mod cli;
pub mod db;
pub mod housekeeping;
pub mod http;
pub mod ingest;
pub mod ledger;
pub mod metrics;
pub mod outbox;
pub mod secret;
pub mod session;
pub mod settings;
pub mod sim;
pub mod startup;
pub mod stats;
pub mod time;
pub mod tokens;
pub mod wechat;

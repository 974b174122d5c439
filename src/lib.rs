//! formid-ledger: collects WeChat mini-program message credentials per user and
//! spends each use at most once.

pub mod auth;
pub mod campaigns;
pub mod cli;
pub mod db;
pub mod housekeeping;
pub mod http;
pub mod ledger;
pub mod metrics;
pub mod outbox;
pub mod push;
pub mod reporting;
pub mod secret;
pub mod settings;
pub mod sim;
pub mod startup;
pub mod stats;
pub mod time;
pub mod tokens;
pub mod webhooks;
pub mod wechat;

#[cfg(test)]
mod architecture_tests;

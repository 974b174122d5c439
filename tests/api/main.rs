//! The black-box tests, one binary (zero2prod's `tests/api/` layout): one module per
//! subject, the shared support in `helpers`, compiled once.
//!
//! Every backend test runs twice, as `MODULE::NAME::sqlite` and
//! `MODULE::NAME::postgres` (CI counts both).

mod helpers;

mod abuse;
mod api;
mod campaigns;
mod client;
mod crash;
mod housekeeping;
mod ledger;
mod openapi;
mod outbox;
mod push;
mod push_peer;
mod sending;
mod sim_wechat;
mod subscriptions;
mod tls;
mod tokens;
mod webhooks;

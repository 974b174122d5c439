//! formid-ledger: collects WeChat mini-program message credentials per user and
//! spends each use at most once.

pub mod secret;
pub mod sim;
pub mod wechat;

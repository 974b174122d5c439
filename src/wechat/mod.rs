//! The WeChat server API as this service uses it. Knows nothing of the database.
//!
//! - [`wire`]: the JSON shapes of the five endpoints (shared with the simulator);
//! - [`errcode`]: the one table that says what each `errcode` means for a caller;
//! - [`client`]: [`WechatClient`], one HTTP client for all apps;
//! - [`subscribe_data`]: WeChat's value rules for subscribe-message `data` (part of
//!   the wire contract: the service checks them before spending a subscription, the
//!   simulator answers 47003 by them).

pub mod client;
pub mod errcode;
pub mod push;
pub mod push_crypto;
pub mod subscribe_data;
pub mod wire;

pub use client::{AccessToken, LoginSession, WechatClient, WechatError};
pub use errcode::{classify, ErrorClass};
pub use wire::{DataValue, SubscribeMessage, TemplateMessage};

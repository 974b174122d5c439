//! A WeChat simulator: behaves like the real API (../shared/WECHAT.md) and records
//! what it received, so tests, the sandbox and benchmarks have a faithful peer.

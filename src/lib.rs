//! pushgate: a push notification gateway. Devices hold WebSockets to the
//! device listener; backends push over the HTTP API; the node wires the
//! parts together. `main.rs` only parses the command line and calls in here.

pub mod api;
pub mod auth;
pub mod config;
pub mod device;
pub mod dispatch;
pub mod fanout;
pub mod handoff;
pub mod hub;
pub mod limit;
pub mod metrics;
pub mod net;
pub mod node;
pub mod protocol;
pub mod shutdown;
pub mod store;
pub mod systemd;

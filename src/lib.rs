//! switchboard: an instant-messaging connection gateway.
//!
//! App servers push messages to users over HTTP; clients hold long-lived WebSocket, WSS or
//! TCP connections and find their node through the route API.
//!
//! Module map:
//! - [`config`]: the TOML schema, defaults and whole-file validation.
//! - [`protocol`]: client frames, their JSON encoding, ids and stable error codes; no I/O.
//! - [`transport`]: TCP, WS and WSS accept loops producing one connection type.
//! - [`session`]: one task per connection: auth, heartbeat, rate limit, backpressure.
//! - [`registry`]: the local index (app, uid) -> live sessions, and delivery to them.
//! - [`hub`]: shared node state and the one delivery pipeline all entry points use.
//! - [`auth`]: client JWTs, push signatures and the push nonce memory.
//! - [`cluster`]: node identity and advertised addresses.
//! - [`api`]: the axum HTTP API (route, push, version, health).
//! - [`server`]: binding, running and graceful shutdown.
//! - [`tools`]: the operator commands other than `serve` (token, push).

pub mod api;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod hub;
pub mod metrics;
pub mod plugin;
pub mod protocol;
pub mod registry;
pub mod routing;
pub mod server;
pub mod session;
pub mod tools;
pub mod transport;

pub use config::Config;
pub use server::{LocalAddrs, Server, StartError, run};

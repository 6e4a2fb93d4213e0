//! The shared server kernel of every Plinth service: configuration, telemetry,
//! the gRPC/HTTP server builder, the error model, storage, events with the
//! transactional outbox, shared state and resilience primitives.
//!
//! Everything here is written once and used by every service crate. Domain
//! logic of a particular service never lives here.

pub mod auth;
pub mod client_address;
pub mod coalesce;
pub mod component;
pub mod config;
pub mod crypto;
pub mod error;
pub mod events;
pub mod framed;
pub mod health;
pub mod metrics;
pub mod resilience;
pub mod secrets;
pub mod server;
pub mod shutdown;
pub mod state;
pub mod storage;
pub mod tasks;
pub mod telemetry;
pub mod testing;
pub mod wire;

pub use component::Component;
pub use config::Config;
pub use error::{ErrorCode, ServiceError};
pub use tasks::Tasks;

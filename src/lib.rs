//! The Plinth contracts: Rust types and gRPC clients generated from `proto/`,
//! and the encoded descriptor set that reflection, the gateway and OpenAPI read.
//!
//! This crate stays light (tonic, prost, and the tokio that tonic brings) so that an application that
//! only wants typed clients depends on it alone. Server logic never lives here.

/// Every file under `proto/` plus its imports, encoded as a
/// `google.protobuf.FileDescriptorSet` with source info (comments).
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/plinth_descriptor.bin"));

/// Shared contract pieces: the `permission` method option.
pub mod common {
    /// Version 1 of the shared contract pieces.
    pub mod v1 {
        /// The full name of the method option that declares an RPC's permission.
        pub const PERMISSION_OPTION: &str = "plinth.common.v1.permission";
    }
}

/// Identities, sessions and tokens.
pub mod auth {
    /// Version 1 of the auth contract.
    #[expect(
        clippy::allow_attributes,
        reason = "tonic's generated servers carry #[allow(non_camel_case_types)]"
    )]
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/plinth.auth.v1.rs"));
    }
}

/// Versioned configuration with watch, releases and encrypted secrets, and
/// [`config::ConfigClient`], a local copy of an environment that follows it.
pub mod config {
    pub use crate::config_client::{ConfigClient, ConfigClientBuilder, Snapshot};

    /// Version 1 of the config contract.
    #[expect(
        clippy::allow_attributes,
        reason = "tonic's generated servers carry #[allow(non_camel_case_types)]"
    )]
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/plinth.config.v1.rs"));
    }
}

/// A durable job queue with leases, retries, dead letters and fairness.
pub mod queue {
    /// Version 1 of the queue contract.
    #[expect(
        clippy::allow_attributes,
        reason = "tonic's generated servers carry #[allow(non_camel_case_types)]"
    )]
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/plinth.queue.v1.rs"));
    }
}

/// One API over several model providers, with fallback and usage.
pub mod ai {
    /// Version 1 of the ai contract.
    #[expect(
        clippy::allow_attributes,
        reason = "tonic's generated servers carry #[allow(non_camel_case_types)]"
    )]
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/plinth.ai.v1.rs"));
    }
}

/// A tamper-evident audit log with signed checkpoints and Merkle proofs.
pub mod audit {
    /// Version 1 of the audit contract.
    #[expect(
        clippy::allow_attributes,
        reason = "tonic's generated servers carry #[allow(non_camel_case_types)]"
    )]
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/plinth.audit.v1.rs"));
    }
}

pub mod codec;
mod config_client;

/// Vendored Google types the contracts use.
pub mod google {
    /// `google.api`: HTTP annotations and field behaviour.
    pub mod api {
        include!(concat!(env!("OUT_DIR"), "/google.api.rs"));
    }
    /// `google.rpc`: the error model (`Status`, `ErrorInfo`, `BadRequest`).
    pub mod rpc {
        include!(concat!(env!("OUT_DIR"), "/google.rpc.rs"));
    }
}

//! Generated code for the VaultGuard contract (`proto/vaultguard/v1`).
//!
//! This crate is the one place that owns generated code: the server and the
//! client both depend on it, and it re-exports `tonic` so that their versions
//! cannot drift apart.

pub use prost;
pub use prost_types;
pub use tonic;

/// The `vaultguard.v1` package: messages, clients and servers.
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/vaultguard.v1.rs"));
}

/// The encoded `FileDescriptorSet` of the whole contract, for server
/// reflection and for tests that walk every RPC.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/vaultguard_descriptor.bin"));

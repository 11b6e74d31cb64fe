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

/// The codec of every generated client and server.
pub mod codec {
    use std::marker::PhantomData;

    use tonic::codec::BufferSettings;
    use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

    /// Each call's encoding and decoding buffer starts at this many bytes
    /// (room for a request carrying a token) and grows as a message needs.
    /// tonic's default, 8 KiB, is allocated up front and held for a
    /// stream's whole life: with 10,000 watches open, 80 MB of buffers for
    /// messages of a few hundred bytes.
    const BUFFER_BYTES: usize = 2048;
    /// Encoded responses of a stream are flushed past this size (tonic's
    /// default).
    const YIELD_THRESHOLD: usize = 32 * 1024;

    /// prost's `application/grpc+proto` with small starting buffers.
    #[derive(Debug, Clone, Copy)]
    pub struct Codec<T, U>(PhantomData<(T, U)>);

    impl<T, U> Default for Codec<T, U> {
        fn default() -> Self {
            Self(PhantomData)
        }
    }

    fn settings() -> BufferSettings {
        BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD)
    }

    impl<T, U> tonic::codec::Codec for Codec<T, U>
    where
        T: prost::Message + Send + 'static,
        U: prost::Message + Default + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = ProstEncoder<T>;
        type Decoder = ProstDecoder<U>;

        fn encoder(&mut self) -> Self::Encoder {
            ProstCodec::<T, U>::raw_encoder(settings())
        }

        fn decoder(&mut self) -> Self::Decoder {
            ProstCodec::<T, U>::raw_decoder(settings())
        }
    }
}

/// The encoded `FileDescriptorSet` of the whole contract, for server
/// reflection and for tests that walk every RPC.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/vaultguard_descriptor.bin"));

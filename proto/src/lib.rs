//! The adclick wire contract (`adclick.v1`): protobuf messages, gRPC service stubs, the
//! encoded file descriptor set for server reflection, and the signed impression token.
//!
//! This crate is pure data and crypto: it knows nothing about tokio, sockets or files
//! (key files are parsed from strings; reading them is the caller's job), so the browser
//! SDK can build it for `wasm32-unknown-unknown` with default features off. The one
//! exception is the servers' shared Prometheus exposition (feature `metrics`, off by
//! default), which reads `/proc/self` for the process metrics.
#![deny(missing_docs)]

pub mod countable;
#[cfg(feature = "metrics")]
pub mod metrics;
pub mod partition;
pub mod token;
pub mod wire;

#[cfg(feature = "keyfile")]
pub mod keyfile;

/// Generated prost messages (and, with the `grpc` feature, tonic stubs) for `adclick.v1`.
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    clippy::expect_used
)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/adclick.v1.rs"));
}

/// Encoded `google.protobuf.FileDescriptorSet` of `adclick.v1`, for `tonic-reflection`
/// (`Builder::register_encoded_file_descriptor_set`) so grpcurl and Postman work without
/// our `.proto` files.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/adclick_v1_descriptor.bin"));

/// Fully-qualified gRPC service names, as clients and health checks spell them.
pub mod service_names {
    /// `adclick.v1.IngestService`
    pub const INGEST: &str = "adclick.v1.IngestService";
    /// `adclick.v1.QueryService`
    pub const QUERY: &str = "adclick.v1.QueryService";
}

pub use countable::NotCountable;
pub use token::{Impression, Keyring, SigningKey, TokenError};

#[cfg(test)]
mod tests {
    use prost::Message;

    #[test]
    fn descriptor_set_names_both_services() {
        let fds = prost_types_lite::decode(super::FILE_DESCRIPTOR_SET);
        assert!(
            fds.contains(&"adclick.v1.IngestService".to_string()),
            "{fds:?}"
        );
        assert!(
            fds.contains(&"adclick.v1.QueryService".to_string()),
            "{fds:?}"
        );
    }

    /// Just enough of descriptor.proto to list service names without depending on
    /// prost-types: FileDescriptorSet.file (1) -> FileDescriptorProto.package (2),
    /// .service (6) -> ServiceDescriptorProto.name (1).
    mod prost_types_lite {
        use prost::Message;

        #[derive(Clone, PartialEq, Message)]
        struct Set {
            #[prost(message, repeated, tag = "1")]
            file: Vec<File>,
        }
        #[derive(Clone, PartialEq, Message)]
        struct File {
            #[prost(string, optional, tag = "2")]
            package: Option<String>,
            #[prost(message, repeated, tag = "6")]
            service: Vec<Service>,
        }
        #[derive(Clone, PartialEq, Message)]
        struct Service {
            #[prost(string, optional, tag = "1")]
            name: Option<String>,
        }

        pub fn decode(bytes: &[u8]) -> Vec<String> {
            let set = Set::decode(bytes).expect("descriptor set decodes");
            set.file
                .iter()
                .flat_map(|f| {
                    let pkg = f.package.clone().unwrap_or_default();
                    f.service
                        .iter()
                        .map(move |s| format!("{pkg}.{}", s.name.clone().unwrap_or_default()))
                })
                .collect()
        }
    }

    #[test]
    fn click_batch_round_trips() {
        use super::v1::{Click, ClickBatch, Device};
        let batch = ClickBatch {
            sdk_name: "adclick-rust".into(),
            sdk_version: "0.1.0".into(),
            sent_at_ms: 1_700_000_000_123,
            clicks: vec![Click {
                token: "abc".into(),
                occurred_at_ms: 1_700_000_000_000,
                sent_at_ms: 1_700_000_000_123,
                country: "US".into(),
                device: Device::Mobile as i32,
                ..Default::default()
            }],
        };
        let bytes = batch.encode_to_vec();
        assert_eq!(ClickBatch::decode(bytes.as_slice()).unwrap(), batch);
    }
}

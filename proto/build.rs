//! Compiles `proto/adclick/v1/adclick.proto` with protox (pure Rust: no system `protoc`),
//! writes the encoded `FileDescriptorSet` for gRPC reflection, and generates prost messages
//! (plus tonic stubs when the `grpc` feature is on).

use std::{env, error::Error, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn Error>> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("proto");
    let file = root.join("adclick/v1/adclick.proto");
    println!("cargo:rerun-if-changed={}", file.display());

    let fds = protox::compile([&file], [&root])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(out.join("adclick_v1_descriptor.bin"), fds.encode_to_vec())?;

    // Build scripts see the crate's features as CARGO_FEATURE_* variables.
    let grpc = env::var_os("CARGO_FEATURE_GRPC").is_some();
    tonic_prost_build::configure()
        .build_client(grpc)
        .build_server(grpc)
        .compile_fds(fds)?;
    Ok(())
}

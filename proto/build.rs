//! Compiles every `.proto` under `vaultguard/v1/` with protox (pure Rust, no
//! system `protoc`) and generates prost messages plus tonic clients and
//! servers. The encoded file descriptor set is kept for server reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read when the script runs, not baked in when it is compiled: a target
    // directory shared by two checkouts reuses one compiled build script,
    // which must read the protos of the checkout being built.
    let proto_root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let package_dir = proto_root.join("vaultguard").join("v1");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&package_dir)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "proto"))
        .collect();
    files.sort();
    println!("cargo:rerun-if-changed={}", package_dir.display());
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }

    let file_descriptors = protox::compile(&files, [&proto_root])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out_dir.join("vaultguard_descriptor.bin");
    std::fs::write(
        &descriptor_path,
        prost::Message::encode_to_vec(&file_descriptors),
    )?;

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .generate_default_stubs(true)
        .codec_path("crate::codec::Codec")
        .compile_fds(file_descriptors)?;
    Ok(())
}

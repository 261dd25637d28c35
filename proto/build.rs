//! Compiles the .proto files with protox (pure Rust), so a machine with only
//! cargo can build walbridge: no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(["walbridge/v1/link.proto", "walbridge/v1/api.proto"], ["proto"])?;
    // Tunnel bytes are passed through without copying them.
    tonic_prost_build::configure()
        .bytes(".walbridge.v1.TunnelData")
        .compile_fds(descriptors)?;
    Ok(())
}

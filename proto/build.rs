fn main() -> Result<(), Box<dyn std::error::Error>> {
    // No protoc on a fresh machine: use the vendored binary.
    if std::env::var_os("PROTOC").is_none() {
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    println!("cargo:rerun-if-changed=../proto/ablate.proto");
    // The encoded descriptors, for the coordinator's server reflection (grpcurl and other
    // clients discover the services from it).
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("ablate_descriptor.bin"))
        .compile_protos(&["ablate.proto"], &["."])?;
    Ok(())
}

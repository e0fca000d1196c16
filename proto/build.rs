fn main() -> Result<(), Box<dyn std::error::Error>> {
    // No protoc on a fresh machine: use the vendored binary.
    if std::env::var_os("PROTOC").is_none() {
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    println!("cargo:rerun-if-changed=../proto/ablate.proto");
    tonic_prost_build::configure().compile_protos(&["ablate.proto"], &["."])?;
    Ok(())
}

//! Compiles the test-only echo contract (`proto/`) into a descriptor set, so
//! the gateway's tests and benchmark exercise every transcoding rule against
//! a service that is not one of Plinth's. Google's protos come from the
//! contract crate's vendored copies.

use std::path::{Path, PathBuf};

use anyhow::Context;

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=../proto/google");
    let mut compiler =
        protox::Compiler::new([Path::new("proto"), Path::new("../proto")]).context("while opening the echo protos")?;
    compiler.include_imports(true).include_source_info(true);
    compiler
        .open_files([
            "plinth/gatewaytest/v1/echo.proto",
            "google/rpc/status.proto",
            "google/rpc/error_details.proto",
            "google/api/httpbody.proto",
        ])
        .map_err(|e| anyhow::anyhow!("{e:?}"))
        .context("while compiling the echo protos")?;
    let out = PathBuf::from(std::env::var("OUT_DIR").context("OUT_DIR is not set")?);
    std::fs::write(out.join("echo_descriptor.bin"), compiler.encode_file_descriptor_set())
        .context("while writing the echo descriptor set")?;
    Ok(())
}

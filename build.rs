//! Compiles `proto/` with protox (no system `protoc`) into Rust types and a
//! `FileDescriptorSet` that reflection, the gateway and OpenAPI read at run time.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// Vendored protos that are not imported by our contracts but that readers of
/// the descriptor set need (the gateway resolves `google.rpc` error details in
/// `Any`, and `HttpBody` for raw bodies).
const ALWAYS_INCLUDED: &[&str] = &[
    "google/rpc/status.proto",
    "google/rpc/error_details.proto",
    "google/rpc/code.proto",
    "google/api/httpbody.proto",
];

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=build.rs");
    let root = Path::new("proto");
    let mut files = Vec::new();
    collect_protos(&root.join("plinth"), &mut files)?;
    files.sort();
    let mut relative: Vec<String> = files
        .iter()
        .map(|f| f.strip_prefix(root).map(|p| p.to_string_lossy().replace('\\', "/")))
        .collect::<Result<_, _>>()?;
    relative.extend(ALWAYS_INCLUDED.iter().map(|s| s.to_string()));

    let mut compiler = protox::Compiler::new([root]).context("while opening proto/")?;
    compiler.include_imports(true).include_source_info(true);
    compiler
        .open_files(&relative)
        .map_err(|e| anyhow::anyhow!("{e:?}"))
        .context("while compiling proto/")?;

    let out_dir = PathBuf::from(std::env::var("OUT_DIR").context("OUT_DIR is not set")?);
    std::fs::write(
        out_dir.join("plinth_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )
    .context("while writing the descriptor set")?;

    // Google's comments are not valid rustdoc (bare `<placeholders>`): generate
    // their Rust types without them. The descriptor set above keeps them.
    let mut fds = compiler.file_descriptor_set();
    for file in &mut fds.file {
        if file.package().starts_with("google.") {
            file.source_code_info = None;
        }
    }
    tonic_prost_build::configure()
        .bytes(".")
        .codec_path("crate::codec::LeanCodec")
        .compile_fds(fds)
        .context("while generating Rust code")?;
    Ok(())
}

fn collect_protos(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("while listing {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            collect_protos(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path);
        }
    }
    Ok(())
}

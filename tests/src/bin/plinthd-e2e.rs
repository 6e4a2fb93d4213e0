//! The `plinthd` binary, built inside this crate so that end-to-end tests
//! can start it as separate processes (`env!("CARGO_BIN_EXE_plinthd-e2e")`):
//! the same program, `plinthd::cli::main`.

fn main() -> std::process::ExitCode {
    plinthd::cli::main()
}

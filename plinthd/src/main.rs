//! `plinthd`: everything is in the library (`plinthd::cli`).

fn main() -> std::process::ExitCode {
    plinthd::cli::main()
}

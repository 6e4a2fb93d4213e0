//! The `plinthd` command line: parse flags, load configuration, start
//! telemetry, run until a signal. It lives in the library so that test
//! crates can ship the very same binary (`plinthd::cli::main`) and start it
//! as a separate process.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::Plinth;
use clap::Parser;
use plinth_runtime::config::Config;
use plinth_runtime::{Component, shutdown, telemetry};
use tokio_util::sync::CancellationToken;

/// Plinth: config, queue, audit, ai and auth services in one binary.
///
/// Every setting can also come from plinth.toml or a PLINTH_* variable
/// (`__` separates nested keys); flags win. `--dump-config` shows the result.
#[derive(Debug, Parser)]
#[command(version, about, after_help = "Environment variables and components: see --help.", after_long_help = env_help())]
struct Args {
    /// TOML configuration file (optional).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Components to run, comma-separated: gateway,config,queue,audit,ai,auth (default: all).
    #[arg(long, value_name = "COMPONENTS")]
    only: Option<String>,
    /// gRPC listen address (PLINTH_GRPC_LISTEN, default 0.0.0.0:50051).
    #[arg(long, value_name = "ADDR")]
    grpc_listen: Option<String>,
    /// HTTP listen address: gateway, /metrics, /healthz (PLINTH_HTTP_LISTEN, default 0.0.0.0:8080).
    #[arg(long, value_name = "ADDR")]
    http_listen: Option<String>,
    /// Sets both listeners' host with port 0 (random ports), for tests: e.g. 127.0.0.1:0.
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Directory for the embedded SQLite files (PLINTH_DATA_DIR, default ./data).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<String>,
    /// Print the effective configuration as PLINTH_* lines (secrets redacted) and exit.
    #[arg(long)]
    dump_config: bool,
    /// Print the gateway's OpenAPI 3.1 document (generated from the protos) and exit.
    #[arg(long)]
    print_openapi: bool,
}

impl Args {
    fn overrides(&self) -> BTreeMap<String, String> {
        let mut o = BTreeMap::new();
        let mut put = |k: &str, v: &Option<String>| {
            if let Some(v) = v {
                o.insert(k.to_owned(), v.clone());
            }
        };
        put("only", &self.only);
        put("grpc_listen", &self.listen);
        put("http_listen", &self.listen);
        put("grpc_listen", &self.grpc_listen);
        put("http_listen", &self.http_listen);
        put("data_dir", &self.data_dir);
        o
    }
}

/// The components and every variable the loader reads, from the runtime's own
/// lists: deployment files are checked against this text.
fn env_help() -> String {
    let components: Vec<&str> = Component::ALL.iter().map(|c| c.name()).collect();
    let vars: Vec<String> = Config::env_vars()
        .into_iter()
        .map(|(name, default)| format!("  {name} ({})", if default.is_empty() { "unset" } else { &default }))
        .collect();
    format!(
        "Components (--only, PLINTH_ONLY): {}\n\nEnvironment variables (default):\n{}",
        components.join(","),
        vars.join("\n")
    )
}

/// The whole `plinthd` program: what `main` runs.
pub fn main() -> ExitCode {
    let args = Args::parse();
    let env: Vec<(String, String)> = std::env::vars().collect();
    let config = match Config::load(args.config.as_deref(), &env, &args.overrides()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("plinthd: {e}");
            return ExitCode::from(2);
        }
    };
    if args.print_openapi {
        return match plinth_gateway::Gateway::new(
            plinth::FILE_DESCRIPTOR_SET,
            plinth_gateway::Upstreams::new(),
            plinth_gateway::GatewayOptions::default(),
        ) {
            Ok(g) => match std::io::stdout().lock().write_all(g.openapi()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::FAILURE,
            },
            Err(e) => {
                eprintln!("plinthd: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if args.dump_config {
        let mut out = std::io::stdout().lock();
        for line in config.dump() {
            if writeln!(out, "{line}").is_err() {
                return ExitCode::FAILURE;
            }
        }
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("plinthd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "plinthd failed");
            eprintln!("plinthd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let telemetry = telemetry::init(&config.log, config.otlp_endpoint.as_deref(), "plinthd")?;
    let token = CancellationToken::new();
    shutdown::cancel_on_signal(token.clone());
    let result = match Plinth::build(config).await {
        Ok(app) => app.run_until(token).await,
        Err(e) => Err(e),
    };
    telemetry.shutdown();
    result
}

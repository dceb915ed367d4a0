//! The `hookrelay` binary: parses the command line, sets up logging, runs a command.

use std::process::ExitCode;

use clap::Parser;
use hookrelay::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    hookrelay::telemetry::init_logs(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hookrelay: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve { config } => hookrelay::run_serve(&config).await,
            Command::Check { config } => hookrelay::run_check(&config),
            Command::Sink {
                listen,
                status,
                delay,
                fail_first,
                reply,
            } => {
                hookrelay::sink::run(hookrelay::sink::SinkOptions {
                    listen,
                    status,
                    delay,
                    fail_first,
                    reply,
                })
                .await
            }
        }
    });
    // Not waiting on blocking work still under way (a store still opening when SIGTERM
    // came): cut off, it is as safe as a SIGKILL, which the store is made for.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hookrelay: {e:#}");
            ExitCode::FAILURE
        }
    }
}

//! Command line: `serve`, `check`, `sink` (clap).

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(name = "hookrelay", version, about = "Webhook fan-out relay")]
pub struct Cli {
    /// Log shape on stderr (level: HOOKRELAY_LOG, env-filter syntax).
    #[arg(long, value_enum, default_value = "text", global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay.
    Serve {
        /// Config file [default: $HOOKRELAY_CONFIG, else routes.toml].
        #[arg(long, env = "HOOKRELAY_CONFIG", default_value = "routes.toml")]
        config: PathBuf,
    },
    /// Validate the config and print the routing table.
    Check {
        #[arg(long, env = "HOOKRELAY_CONFIG", default_value = "routes.toml")]
        config: PathBuf,
    },
    /// A local receiver for trying routes: prints one JSON line per request.
    Sink {
        /// Address to listen on, e.g. 127.0.0.1:8000.
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// Status to answer with.
        #[arg(long, default_value_t = 200)]
        status: u16,
        /// Wait this long before answering, e.g. "250ms".
        #[arg(long, value_parser = humantime::parse_duration)]
        delay: Option<std::time::Duration>,
        /// Answer the first N requests with 503.
        #[arg(long, default_value_t = 0)]
        fail_first: u64,
        /// Send this file as the answer's body.
        #[arg(long)]
        reply: Option<PathBuf>,
    },
}

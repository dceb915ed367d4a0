//! Logs: `tracing` to stderr, level from `HOOKRELAY_LOG` (env-filter syntax, default
//! `info`), shape from `--log-format`; colours only when stderr is a terminal. No secret is
//! ever a field of a log event.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;

pub fn init_logs(format: LogFormat) {
    let filter = match std::env::var("HOOKRELAY_LOG") {
        Ok(v) => EnvFilter::try_new(&v).unwrap_or_else(|e| {
            // Said before any log line, where the operator looks first.
            eprintln!("HOOKRELAY_LOG={v:?} is not a valid filter ({e}); logging at info");
            EnvFilter::new("info")
        }),
        Err(_) => EnvFilter::new("info"),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A log file or a collector gets plain text: colour codes there are noise to read
        // and to grep, and formatting them was ~1 % of the relay's CPU at `info`.
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

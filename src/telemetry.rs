//! Logs: `tracing` to stderr, level from `HOOKRELAY_LOG` (env-filter syntax, default
//! `info`; the HTTP/2 library's own lines at `error` unless it names `h2`), shape from
//! `--log-format`; colours only when stderr is a terminal. No secret is ever a field of a
//! log event.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;

/// Added to a filter that says nothing of `h2`: the HTTP/2 library warns once per frame a
/// client may send at will (a PING acknowledgement never asked for), so at `warn` any
/// client could flood the log, a line per 17 bytes.
const QUIET_H2: &str = "h2=error";

/// The filter `HOOKRELAY_LOG` asks for (`info` without it, or set empty: an empty filter
/// would turn every log line off, errors too), with [`QUIET_H2`] unless it names `h2`
/// itself.
fn filter_text(asked: Option<&str>) -> String {
    let asked = asked.filter(|a| !a.trim().is_empty()).unwrap_or("info");
    if asked.contains("h2") {
        asked.to_string()
    } else {
        format!("{asked},{QUIET_H2}")
    }
}

pub fn init_logs(format: LogFormat) {
    let asked = std::env::var("HOOKRELAY_LOG").ok();
    let filter = EnvFilter::try_new(filter_text(asked.as_deref())).unwrap_or_else(|e| {
        // Said before any log line, where the operator looks first.
        let v = asked.as_deref().unwrap_or_default();
        eprintln!("HOOKRELAY_LOG={v:?} is not a valid filter ({e}); logging at info");
        EnvFilter::new(filter_text(None))
    });
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

/// At most one log line a second from one place for a fault that can repeat with every
/// request (a store that is down, a reply destination failing, accepts failing): the lines
/// in between are counted and the next one says how many. A `static` per call site.
pub struct Throttle {
    last_ms: std::sync::atomic::AtomicU64,
    skipped: std::sync::atomic::AtomicU64,
}

impl Throttle {
    const EVERY_MS: u64 = 1000;

    pub const fn new() -> Self {
        Throttle {
            last_ms: std::sync::atomic::AtomicU64::new(0),
            skipped: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// `Some(n)` when a line may be written now, `n` lines having been held back since the
    /// last; `None` when this one is held back (and counted).
    pub fn pass(&self, now_ms: u64) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        let last = self.last_ms.load(Relaxed);
        // A wall clock set back counts as due: a site is never silenced for that long.
        let due = last == 0 || now_ms < last || now_ms >= last.saturating_add(Self::EVERY_MS);
        if due
            && self
                .last_ms
                .compare_exchange(last, now_ms.max(1), Relaxed, Relaxed)
                .is_ok()
        {
            return Some(self.skipped.swap(0, Relaxed));
        }
        self.skipped.fetch_add(1, Relaxed);
        None
    }
}

impl Default for Throttle {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::{filter_text, Throttle};

    #[test]
    fn a_throttle_passes_one_line_a_second_and_counts_the_rest() {
        let t = Throttle::new();
        assert_eq!(t.pass(5_000), Some(0));
        assert_eq!(t.pass(5_001), None);
        assert_eq!(t.pass(5_999), None);
        assert_eq!(t.pass(6_000), Some(2));
        assert_eq!(t.pass(6_000), None);
        assert_eq!(t.pass(60_000), Some(1));
        // The clock set back: not silenced until it catches up.
        assert_eq!(t.pass(30_000), Some(0));
    }

    #[test]
    fn the_http2_librarys_warnings_are_quiet_unless_asked_for() {
        assert_eq!(filter_text(None), "info,h2=error");
        assert_eq!(filter_text(Some("debug")), "debug,h2=error");
        assert_eq!(filter_text(Some("info,h2=debug")), "info,h2=debug");
        // Set empty (an env file's `HOOKRELAY_LOG=`): the default, not every line off.
        assert_eq!(filter_text(Some("")), "info,h2=error");
        assert_eq!(filter_text(Some("  ")), "info,h2=error");
    }
}

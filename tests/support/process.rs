//! `hookrelay serve` as a child process ([`RelayProcess`]): started on a config, its
//! listening line read, SIGTERMed or SIGKILLed (always killed on drop), its RSS read.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

use super::bin;

/// `hookrelay serve` running as a child process. SIGKILLed when dropped.
pub struct RelayProcess {
    child: tokio::process::Child,
    pub ingress: SocketAddr,
    pub admin: SocketAddr,
    /// Kept open: the child must never write to a closed pipe.
    _stdout: BufReader<tokio::process::ChildStdout>,
}

impl RelayProcess {
    /// Starts `hookrelay serve --config <config>` with its stderr appended to `log`, and
    /// waits (bounded) for its `hookrelay listening ingress=ADDR admin=ADDR` line.
    pub async fn spawn(config: &Path, log: &Path) -> RelayProcess {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut child = tokio::process::Command::new(bin())
            .args(["serve", "--config"])
            .arg(config)
            .env("HOOKRELAY_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        let read = tokio::time::timeout(Duration::from_secs(30), stdout.read_line(&mut line)).await;
        if !matches!(read, Ok(Ok(n)) if n > 0) {
            let _ = child.kill().await;
            panic!(
                "the relay did not say it was listening within 30s ({read:?}); its log:\n{}",
                tail(log)
            );
        }
        let word = |p: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(p))
                .unwrap_or_else(|| panic!("no {p} in {line:?}"))
                .parse()
                .unwrap()
        };
        let (ingress, admin) = (word("ingress="), word("admin="));
        RelayProcess {
            child,
            ingress,
            admin,
            _stdout: stdout,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("the child is running")
    }

    /// SIGKILL, and waits until the process is gone.
    pub async fn sigkill(mut self) {
        self.child.kill().await.unwrap();
    }

    /// SIGTERM, and waits (bounded by `within`) for the exit status.
    pub async fn sigterm(self, within: Duration) -> ExitStatus {
        self.sigterm_or_kill(within)
            .await
            .unwrap_or_else(|| panic!("the relay did not exit within {within:?} of SIGTERM"))
    }

    /// SIGTERM; if the process has not exited within `within`, SIGKILL and `None`.
    pub async fn sigterm_or_kill(mut self, within: Duration) -> Option<ExitStatus> {
        let ok = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(ok.success(), "kill -TERM failed");
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(s) => Some(s.unwrap()),
            Err(_) => {
                let _ = self.child.kill().await;
                None
            }
        }
    }

    /// The process's resident set size in KiB (`VmRSS` in /proc/<pid>/status).
    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS")
    }

    /// The most the resident set has been, in KiB (`VmHWM`).
    pub fn peak_rss_kib(&self) -> u64 {
        self.status_kib("VmHWM")
    }

    fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} in /proc/<pid>/status"))
    }
}

/// The last lines of a log file, for failure messages.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

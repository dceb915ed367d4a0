//! `hookrelay serve` as a child process ([`RelayProcess`]): started on a config at a log
//! level, its listening line read, its stderr appended to a log file and kept for waits,
//! signalled, SIGTERMed or SIGKILLed (always killed on drop), its RSS read.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::bin;

/// `hookrelay serve` running as a child process. SIGKILLed when dropped.
pub struct RelayProcess {
    child: tokio::process::Child,
    pub ingress: SocketAddr,
    pub admin: SocketAddr,
    /// Kept open: the child must never write to a closed pipe.
    _stdout: BufReader<tokio::process::ChildStdout>,
    /// Every stderr line so far, and how many there are (to wait on).
    lines: Arc<Mutex<Vec<String>>>,
    count: watch::Receiver<usize>,
    /// Copies stderr to the log file and `lines` until EOF.
    reader: Option<JoinHandle<()>>,
}

impl RelayProcess {
    /// Starts `hookrelay serve --config <config>` at log level `warn` with its stderr
    /// appended to `log`, and waits (bounded) for its `hookrelay listening ingress=ADDR
    /// admin=ADDR` line.
    pub async fn spawn(config: &Path, log: &Path) -> RelayProcess {
        Self::spawn_at(config, log, "warn").await
    }

    /// [`spawn`](Self::spawn) at the log level `level` (`HOOKRELAY_LOG`).
    pub async fn spawn_at(config: &Path, log: &Path, level: &str) -> RelayProcess {
        Self::start(config, log, Some(level), &[]).await
    }

    /// [`spawn`](Self::spawn) with the variables `env` set too.
    #[allow(dead_code)]
    pub async fn spawn_with_env(config: &Path, log: &Path, env: &[(&str, &str)]) -> RelayProcess {
        Self::start(config, log, Some("warn"), env).await
    }

    /// [`spawn`](Self::spawn) with no environment variable at all, as a newcomer's shell
    /// might run it.
    pub async fn spawn_with_no_environment(config: &Path, log: &Path) -> RelayProcess {
        Self::start(config, log, None, &[]).await
    }

    /// `level: None` clears the environment; `env` is set after.
    async fn start(
        config: &Path,
        log: &Path,
        level: Option<&str>,
        env: &[(&str, &str)],
    ) -> RelayProcess {
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .await
            .unwrap();
        let mut command = tokio::process::Command::new(bin());
        match level {
            Some(level) => command.env("HOOKRELAY_LOG", level),
            None => command.env_clear(),
        };
        command.envs(env.iter().copied());
        let mut child = command
            .args(["serve", "--config"])
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (seen, count) = watch::channel(0);
        let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
        let kept = lines.clone();
        // Always read: the child must never block on a full pipe.
        let reader = tokio::spawn(async move {
            while let Ok(Some(line)) = stderr.next_line().await {
                let _ = file.write_all(format!("{line}\n").as_bytes()).await;
                // The lock goes before the count is sent: a `wait_log` reads the lines
                // while it holds the count, so holding both here would deadlock.
                let n = {
                    let mut all = kept.lock().unwrap();
                    all.push(line);
                    all.len()
                };
                seen.send_replace(n);
            }
            let _ = file.flush().await;
        });
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        let read = tokio::time::timeout(Duration::from_secs(60), stdout.read_line(&mut line)).await;
        if !matches!(read, Ok(Ok(n)) if n > 0) {
            let _ = child.kill().await;
            panic!(
                "the relay did not say it was listening within 60s ({read:?}); its log:\n{}",
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
            lines,
            count,
            reader: Some(reader),
        }
    }

    /// Sends signal `sig` (`HUP`, `TERM`, ...).
    pub fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(ok.success(), "kill -{sig} failed");
    }

    /// Waits (bounded by `within`) for a stderr line containing `text`, from the start.
    pub async fn wait_log(&mut self, text: &str, within: Duration) -> bool {
        let lines = self.lines.clone();
        let found = self
            .count
            .wait_for(|_| lines.lock().unwrap().iter().any(|l| l.contains(text)));
        matches!(tokio::time::timeout(within, found).await, Ok(Ok(_)))
    }

    /// Kills the process and returns everything it wrote to stderr.
    pub async fn finish(mut self) -> String {
        let _ = self.child.kill().await;
        if let Some(r) = self.reader.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), r).await;
        }
        self.lines.lock().unwrap().join("\n")
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("the child is running")
    }

    /// SIGKILL, and waits until the process is gone.
    pub async fn sigkill(mut self) {
        self.child.kill().await.unwrap();
    }

    /// Waits (bounded by `within`) for the exit status, signalling nothing (after a
    /// [`signal`](Self::signal) already sent).
    pub async fn exit_within(mut self, within: Duration) -> ExitStatus {
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(s) => s.unwrap(),
            Err(_) => panic!("the relay did not exit within {within:?}"),
        }
    }

    /// SIGTERM, waits (bounded by `within`) for the exit status, then for the last of its
    /// stderr, and returns both.
    pub async fn sigterm_with_log(mut self, within: Duration) -> (ExitStatus, String) {
        self.signal("TERM");
        let status = match tokio::time::timeout(within, self.child.wait()).await {
            Ok(s) => s.unwrap(),
            Err(_) => panic!("the relay did not exit within {within:?} of SIGTERM"),
        };
        if let Some(r) = self.reader.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), r).await;
        }
        let log = self.lines.lock().unwrap().join("\n");
        (status, log)
    }

    /// SIGTERM, and waits (bounded by `within`) for the exit status.
    pub async fn sigterm(self, within: Duration) -> ExitStatus {
        self.sigterm_or_kill(within)
            .await
            .unwrap_or_else(|| panic!("the relay did not exit within {within:?} of SIGTERM"))
    }

    /// SIGTERM; if the process has not exited within `within`, SIGKILL and `None`.
    pub async fn sigterm_or_kill(mut self, within: Duration) -> Option<ExitStatus> {
        self.signal("TERM");
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

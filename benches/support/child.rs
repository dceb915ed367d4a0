//! A server the benches run as a process of its own, so that its CPU time is its own and not
//! the load generator's or the sink's: the relay binary, or this bench re-run in a role
//! (`BENCH_ROLE`). It is killed when dropped, and a role ends when its standard input closes,
//! so nothing outlives the bench, even one that panics.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub struct Child {
    child: std::process::Child,
}

impl Child {
    /// Starts `cmd` with its standard input and output piped, and waits (bounded: 60 s) for
    /// the first line it prints, which it returns.
    pub fn start(mut cmd: Command) -> (Child, String) {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start a bench server");
        let out = child.stdout.take().unwrap();
        let guard = Child { child };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut out = BufReader::new(out);
            let mut line = String::new();
            let _ = out.read_line(&mut line);
            let _ = tx.send(line);
            // Keep reading, so that the child never blocks on a full pipe.
            let _ = std::io::copy(&mut out.take(u64::MAX), &mut std::io::sink());
        });
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("a bench server printed nothing within 60 s");
        assert!(!line.is_empty(), "a bench server ended before it listened");
        (guard, line.trim().to_string())
    }

    /// The relay binary on `config`; its ingress and admin addresses.
    pub fn relay(config: &std::path::Path) -> (Child, SocketAddr, SocketAddr) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hookrelay"));
        cmd.args(["serve", "--config"])
            .arg(config)
            .env("HOOKRELAY_LOG", "warn");
        let (child, line) = Child::start(cmd);
        let field = |name: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in the relay's line {line:?}"))
        };
        let (ingress, admin) = (field("ingress="), field("admin="));
        (child, ingress, admin)
    }

    /// This bench run again as `role` with `env`; the address it prints.
    pub fn role(role: &str, env: &[(&str, String)]) -> (Child, SocketAddr) {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.env("BENCH_ROLE", role);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let (child, line) = Child::start(cmd);
        let addr = line
            .parse()
            .unwrap_or_else(|_| panic!("{role} printed {line:?}, not an address"));
        (child, addr)
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// User + system CPU time of the process so far.
    pub fn cpu(&self) -> Duration {
        super::load::stat_cpu(&format!("/proc/{}/stat", self.child.id()))
    }

    /// SIGTERM, then waits (bounded: 30 s) for it to end; panics if it does not.
    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("a bench server did not stop within 30 s of SIGTERM");
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// In a role's process: prints `addr`, then returns once standard input closes (the bench
/// ended or dropped its `Child`).
pub fn serve_until_stdin_closes(addr: SocketAddr) {
    println!("{addr}");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
}

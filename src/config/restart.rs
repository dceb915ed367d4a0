//! What a reload cannot change in a running relay: the listeners and how they serve
//! connections (bound and set up once), TLS on or off, and the store (opened once). A
//! reload that changes one of them is refused, naming each, so the file and the relay
//! never disagree; the certificate and key files themselves are read again by a reload.

use super::{Backend, Config, Problem};

/// Every setting that differs between `running` and `new` and takes a restart.
pub fn needs_restart(running: &Config, new: &Config) -> Vec<Problem> {
    let mut out = Vec::new();
    let mut check = |key: &str, was: String, now: String| {
        if was != now {
            out.push(Problem {
                file: new.file.display().to_string(),
                at: None,
                key: key.to_string(),
                reason: format!(
                    "changed from {was} to {now}, which takes a restart (a reload keeps the old config)"
                ),
            });
        }
    };
    let time = |d| humantime::format_duration(d).to_string();
    let on_off = |t: bool| if t { "on" } else { "off" }.to_string();
    let (a, b) = (&running.server, &new.server);
    check("server.listen", a.listen.to_string(), b.listen.to_string());
    check(
        "server.admin_listen",
        a.admin_listen.to_string(),
        b.admin_listen.to_string(),
    );
    check(
        "server.max_connections",
        a.max_connections.to_string(),
        b.max_connections.to_string(),
    );
    check(
        "server.read_timeout",
        time(a.read_timeout),
        time(b.read_timeout),
    );
    check(
        "server.tls",
        on_off(a.tls.is_some()),
        on_off(b.tls.is_some()),
    );
    let (a, b) = (&running.store, &new.store);
    let backend = |b: &Backend| format!("{b:?}").to_lowercase();
    check("store.backend", backend(&a.backend), backend(&b.backend));
    check(
        "store.path",
        a.path.display().to_string(),
        b.path.display().to_string(),
    );
    // The addresses may carry credentials: not shown.
    if a.url != b.url {
        check("store.url", "one list".into(), "another".into());
    }
    check("store.prefix", a.prefix.clone(), b.prefix.clone());
    check(
        "store.replicas",
        a.replicas.to_string(),
        b.replicas.to_string(),
    );
    // The embedded stores' purge reads it each time; JetStream sets its records' lifetime
    // from it at start.
    if a.backend == Backend::Jetstream {
        check("store.retain", time(a.retain), time(b.retain));
    }
    out
}

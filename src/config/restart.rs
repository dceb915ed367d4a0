//! What a reload cannot change in a running relay: the listeners and how they serve
//! connections (bound and set up once), TLS on or off, and the store (opened once). A
//! reload that changes one of them is refused, naming each, so the file and the relay
//! never disagree; the certificate and key files themselves are read again by a reload.

use std::fmt::Display;

use super::{Backend, Config, Problem};

/// Every setting that differs between `running` and `new` and takes a restart.
pub fn needs_restart(running: &Config, new: &Config) -> Vec<Problem> {
    let mut out = Vec::new();
    let mut check = |key: &str, was: &dyn Display, now: &dyn Display, differ: bool| {
        if differ {
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
    let (a, b) = (&running.server, &new.server);
    check("server.listen", &a.listen, &b.listen, a.listen != b.listen);
    check(
        "server.admin_listen",
        &a.admin_listen,
        &b.admin_listen,
        a.admin_listen != b.admin_listen,
    );
    check(
        "server.max_connections",
        &a.max_connections,
        &b.max_connections,
        a.max_connections != b.max_connections,
    );
    check(
        "server.read_timeout",
        &humantime::format_duration(a.read_timeout),
        &humantime::format_duration(b.read_timeout),
        a.read_timeout != b.read_timeout,
    );
    let on_off = |t: bool| if t { "on" } else { "off" };
    check(
        "server.tls",
        &on_off(a.tls.is_some()),
        &on_off(b.tls.is_some()),
        a.tls.is_some() != b.tls.is_some(),
    );
    let (a, b) = (&running.store, &new.store);
    check(
        "store.backend",
        &format!("{:?}", a.backend).to_lowercase(),
        &format!("{:?}", b.backend).to_lowercase(),
        a.backend != b.backend,
    );
    check(
        "store.path",
        &a.path.display(),
        &b.path.display(),
        a.path != b.path,
    );
    // The addresses may carry credentials: not shown.
    check("store.url", &"one list", &"another", a.url != b.url);
    check("store.prefix", &a.prefix, &b.prefix, a.prefix != b.prefix);
    check(
        "store.replicas",
        &a.replicas,
        &b.replicas,
        a.replicas != b.replicas,
    );
    // The embedded stores' purge reads it each time; JetStream sets its records' lifetime
    // from it at start.
    check(
        "store.retain",
        &humantime::format_duration(a.retain),
        &humantime::format_duration(b.retain),
        a.backend == Backend::Jetstream && a.retain != b.retain,
    );
    out
}

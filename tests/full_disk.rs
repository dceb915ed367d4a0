//! The disk under the store fills up: the ingress answers 503 (promptly, with
//! Retry-After) and keeps everything it answered 200; once there is room again the relay
//! accepts again or says it is not ready, and a restart finds every accepted event. The
//! binary runs on a small tmpfs this test mounts (CI runs as root).

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::FAULT_WAIT as WAIT;
use support::{client, tail, try_post, FaultSink, RelayProcess};
use support::{destination_toml, fault_config, get_text, route_toml, voice_event};

/// A tmpfs mounted for one test; unmounted (lazily) on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. `"4m"`) on `dir`. Panics when it cannot: the
    /// full-disk case needs root (CI and `scripts/test` run as root), and a test that
    /// cannot fill a disk must fail, not pass having checked nothing.
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .unwrap_or_else(|e| panic!("no mount command ({e}): the full-disk tests need it"));
        assert!(
            out.status.success(),
            "cannot mount a tmpfs on {} ({}): the full-disk tests need root",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Tmpfs(dir.to_path_buf())
    }

    fn resize(&self, size: &str) {
        let ok = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(ok.success(), "remounting the tmpfs with size={size}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

// These run the binary: a store that hit ENOSPC can wedge sled (even other sled stores in
// the same process, through sled's process-wide locks), and a child process can always be
// killed.

/// What one run of [`full_disk`] saw.
struct FullDisk {
    /// How long the first refused request waited for its 503.
    first_503_after: Duration,
    /// `/readyz` while the disk was full.
    ready_while_full: u16,
    /// Within 5 s of space coming back: accepted again, or `/readyz` said 503.
    recovered: bool,
    unready_after_free: bool,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_answers_503_and_keeps_what_was_accepted_sled() {
    // Not asserted here: how long the 503 takes (a_full_disk_is_answered_503_promptly_sled).
    full_disk("sled", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_answers_503_and_keeps_what_was_accepted_redb() {
    let r = full_disk("redb", true).await;
    assert!(
        r.first_503_after < Duration::from_secs(10),
        "the 503 took {:?}",
        r.first_503_after
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_answered_503_promptly_sled() {
    let r = full_disk("sled", true).await;
    assert!(
        r.first_503_after < Duration::from_secs(10),
        "the 503 took {:?}",
        r.first_503_after
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_full_disk_the_relay_recovers_or_reports_unready_sled() {
    recovers_or_reports_unready("sled").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_full_disk_the_relay_accepts_again_redb() {
    // redb refuses writes after an I/O error until the file is opened again: the engine
    // reopens it, so the running relay takes events again once the disk has room.
    let r = full_disk("redb", false).await;
    assert!(
        r.recovered,
        "with space back the running relay did not accept again within 5 s (said unready: {})",
        r.unready_after_free
    );
}

async fn recovers_or_reports_unready(backend: &str) {
    let r = full_disk(backend, false).await;
    assert!(
        r.recovered || r.unready_after_free,
        "with space back, the relay neither accepted again nor said it was not ready \
         (/readyz answered {} while the disk was full)",
        r.ready_while_full
    );
}

/// Runs the binary with its store on a 4 MiB tmpfs and posts 16 KiB events until the
/// ingress refuses one: that answer must be 503 with Retry-After, and stay so while the
/// disk is full. Then gives the disk 64 MiB and watches (5 s) whether the running relay
/// accepts again or says it is not ready; restarts it on the same store, where every event
/// answered 200 must be. With `live`, the destination answers 200 (deliveries are recorded
/// while the disk fills); else it is down. Panics when no tmpfs can be mounted here.
async fn full_disk(backend: &str, live: bool) -> FullDisk {
    const PAD: usize = 16 * 1024;
    const MAX_POSTS: usize = 2000;
    /// How long the first refused request may take (sled can be slow to give up).
    const FIRST_WAIT: Duration = Duration::from_secs(60);
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    let disk = Tmpfs::mount(&mnt, "4m");
    let sink = FaultSink::answering(200).await;
    let url = if live {
        sink.url("/d")
    } else {
        "http://127.0.0.1:9/down".to_string()
    };
    let cfg = dir.path().join("routes.toml");
    std::fs::write(
        &cfg,
        fault_config(
            &format!(
                "backend = \"{backend}\"\npath = \"{}\"",
                mnt.join("data").display()
            ),
            r#"retry = { first = "1h" }"#,
            &format!("{}{}", destination_toml("d", &url, ""), route_toml(&["d"])),
        ),
    )
    .unwrap();
    let log = dir.path().join("relay.log");
    let relay = RelayProcess::spawn(&cfg, &log).await;
    let ingress = format!("http://{}/8x8/voice", relay.ingress);
    let ready = format!("http://{}/readyz", relay.admin);
    let c = client();

    let mut accepted = Vec::new();
    let mut refused = None;
    for i in 0..MAX_POSTS {
        let id = format!("disk-{i}");
        let t = Instant::now();
        let p = try_post(&c, &ingress, voice_event(&id, PAD), FIRST_WAIT)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "{id} after {} accepted: {e}; log:\n{}",
                    accepted.len(),
                    tail(&log)
                )
            });
        match p.status {
            200 => accepted.push(id),
            503 => {
                refused = Some((p, t.elapsed()));
                break;
            }
            s => panic!("{id}: unexpected {s}: {:?}", p.body),
        }
    }
    let (full, first_503_after) =
        refused.unwrap_or_else(|| panic!("{MAX_POSTS} posts never filled a 4 MiB disk"));
    assert!(
        !accepted.is_empty(),
        "some events fit before the disk was full"
    );
    assert_eq!(full.json()["error"], "unavailable", "{:?}", full.body);
    assert!(
        full.headers.contains_key("retry-after"),
        "{:?}",
        full.headers
    );
    // Still full: still 503, never a 200 for an event that was not stored.
    for i in 0..3 {
        let id = format!("disk-full-{i}");
        let p = try_post(&c, &ingress, voice_event(&id, PAD), FIRST_WAIT)
            .await
            .unwrap_or_else(|e| panic!("{id}: {e}"));
        assert_eq!(p.status, 503, "{:?}", p.body);
        assert!(p.headers.contains_key("retry-after"));
    }
    let ready_while_full = get_text(&ready).await.0;

    // Space comes back. Bounded polling: nothing announces a recovery.
    disk.resize("64m");
    let mut recovered = None;
    let mut unready_after_free = false;
    // Room for a loaded machine: redb reopens its file at the next write.
    let deadline = Instant::now() + Duration::from_secs(20);
    for i in 0..200 {
        let id = format!("disk-after-{i}");
        let p = try_post(&c, &ingress, voice_event(&id, 0), Duration::from_secs(2)).await;
        if p.is_ok_and(|p| p.status == 200) {
            recovered = Some(id);
            break;
        }
        if get_text(&ready).await.0 == 503 {
            unready_after_free = true;
            break;
        }
        if Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let exit = relay.sigterm_or_kill(WAIT).await;

    // Every event answered 200 is there after a restart.
    let relay = RelayProcess::spawn(&cfg, &log).await;
    for id in accepted.iter().chain(recovered.iter()) {
        let (status, body) = get_text(&format!("http://{}/api/events/{id}", relay.admin)).await;
        assert_eq!(status, 200, "{id} was accepted, then: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let state = &v["deliveries"][0]["state"];
        assert!(state == "pending" || state == "delivered", "{id}: {v}");
    }
    let ingress = format!("http://{}/8x8/voice", relay.ingress);
    let after_restart = try_post(&c, &ingress, voice_event("disk-after-restart", 0), WAIT)
        .await
        .unwrap()
        .status;
    let exit_after = relay.sigterm(WAIT).await;
    sink.stop().await;
    println!(
        "full disk ({backend}, destination {}): {} events of 16 KiB accepted into 4 MiB, then \
         503 with Retry-After (the first after {first_503_after:.1?}); /readyz while full: \
         {ready_while_full}; with space back the running relay {}; SIGTERM: {}; after a \
         restart all {} accepted events are there and a new one gets {after_restart}",
        if live { "up" } else { "down" },
        accepted.len(),
        if recovered.is_some() {
            "accepted again"
        } else if unready_after_free {
            "said it was not ready"
        } else {
            "still answered 503 and /readyz 200"
        },
        match exit {
            Some(s) => s.to_string(),
            None => format!("no exit within {WAIT:?}, killed"),
        },
        accepted.len(),
    );
    assert_eq!(after_restart, 200);
    assert!(exit_after.success());
    drop(disk);
    FullDisk {
        first_503_after,
        ready_while_full,
        recovered: recovered.is_some(),
        unready_after_free,
    }
}

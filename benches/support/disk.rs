//! How quick the disk is right now: the store's figures move with it (its commit ends in an
//! `fdatasync`, and this machine's disk is shared with others), so the benches print this
//! beside them.

use std::io::Write;
use std::time::Instant;

/// The median µs of a 4 KiB write followed by `fdatasync`, over `n` of them in a fresh file
/// in `dir` (overwriting the same block, so the file does not grow).
pub fn synced_write_us(dir: &std::path::Path, n: usize) -> f64 {
    let path = dir.join("disk-probe");
    let mut f = std::fs::File::create(&path).expect("the disk probe's file");
    let block = [0x5au8; 4096];
    let mut took = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        std::io::Seek::rewind(&mut f).unwrap();
        f.write_all(&block).unwrap();
        f.sync_data().unwrap();
        took.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let _ = std::fs::remove_file(&path);
    took.sort_by(f64::total_cmp);
    took[took.len() / 2]
}

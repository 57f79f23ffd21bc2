//! Cost of one metrics cycle. The floor reads exactly the files a cycle reads (and statvfs of
//! each mount), so the difference is parsing, computing and encoding.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;
use thingsly_core::StateHandle;
use thingsly_metrics::collect::Collector;
use thingsly_metrics::lineproto::{Encoder, Precision};
use thingsly_metrics::{Counters, agent_point, gather};

/// Counts allocations so the table can show them; otherwise the system allocator.
struct Counting;
static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

#[allow(unsafe_code)] // GlobalAlloc is an unsafe trait; this only forwards to System.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        BYTES.fetch_add(l.size() as u64, Relaxed);
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: p was allocated by System with l.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        BYTES.fetch_add(n as u64, Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name: utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest.split(' ').filter_map(|x| x.parse().ok()).collect();
    let ticks = f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0);
    Duration::from_millis(ticks * 1000 / procfs::ticks_per_second())
}

/// Reads what a collection reads, into one reused buffer.
fn read(buf: &mut String, p: &str) {
    use std::io::Read;
    buf.clear();
    if let Ok(mut f) = std::fs::File::open(p) {
        let _ = f.read_to_string(buf);
    }
}

fn floor(buf: &mut String) {
    for p in [
        "/proc/stat",
        "/proc/meminfo",
        "/proc/diskstats",
        "/proc/net/dev",
        "/proc/loadavg",
        "/proc/uptime",
        "/proc/cpuinfo",
        "/proc/self/status",
        "/proc/self/stat",
    ] {
        read(buf, p);
    }
    read(buf, "/proc/self/mounts");
    let mounts: Vec<String> = buf
        .lines()
        .filter_map(|l| l.split(' ').nth(1).map(String::from))
        .collect();
    for m in mounts {
        let _ = rustix::fs::statvfs(m.as_str());
    }
    if let Ok(d) = std::fs::read_dir("/sys/class/net") {
        for e in d.flatten() {
            read(buf, &e.path().join("flags").to_string_lossy());
            read(buf, &e.path().join("speed").to_string_lossy());
        }
    }
}

fn measure(n: u32, mut f: impl FnMut()) -> (Duration, f64, f64) {
    f(); // warm up (first cycle has no deltas)
    let (a0, b0, t0) = (ALLOCS.load(Relaxed), BYTES.load(Relaxed), cpu_time());
    for _ in 0..n {
        f();
    }
    let t = cpu_time().saturating_sub(t0);
    let allocs = (ALLOCS.load(Relaxed) - a0) as f64 / f64::from(n);
    let bytes = (BYTES.load(Relaxed) - b0) as f64 / f64::from(n);
    (t / n, allocs, bytes)
}

pub fn run(n: u32) -> anyhow::Result<()> {
    let state = StateHandle::new(Default::default());
    let counters = Counters::default();
    let encoder = Encoder::new(
        [("host".to_string(), "bench-device".to_string())],
        Precision::S,
    );
    let mut collector = Collector::new(Default::default());
    let mut buf = String::with_capacity(64 * 1024);
    let (floor_t, floor_a, floor_b) = measure(n, || floor(&mut buf));
    let mut last = String::new();
    let mut ts: i128 = 1_795_000_000_000_000_000;
    let (cyc_t, cyc_a, cyc_b) = measure(n, || {
        ts += 10_000_000_000;
        let agent = agent_point(&state, &counters);
        last = gather(&mut collector, &encoder, ts, agent).0;
    });
    println!(
        "| metrics: read the same /proc, /sys files + statvfs (floor), per cycle | {:.0} µs CPU, {floor_a:.0} allocations, {:.1} KiB |",
        floor_t.as_secs_f64() * 1e6,
        floor_b / 1024.0
    );
    println!(
        "| metrics: collect + encode one cycle, per cycle | {:.0} µs CPU, {cyc_a:.0} allocations, {:.1} KiB |",
        cyc_t.as_secs_f64() * 1e6,
        cyc_b / 1024.0
    );
    // A full cycle (CPU counters moved) for the wire size.
    std::thread::sleep(Duration::from_millis(300));
    let agent = agent_point(&state, &counters);
    last = gather(&mut collector, &encoder, ts + 10_000_000_000, agent).0;
    // Wire bytes per hour at the default 10 s interval, one request per collection (healthy).
    let plain = last.len() as f64 * 360.0;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, last.as_bytes())?;
    let zipped = gz.finish()?.len() as f64 * 360.0;
    println!(
        "| metrics: request bodies per hour at 10 s ({} lines each), plain (baseline) / gzip | {:.0} KiB / {:.0} KiB ({:.0} %) |",
        last.lines().count(),
        plain / 1024.0,
        zipped / 1024.0,
        100.0 * zipped / plain
    );
    Ok(())
}

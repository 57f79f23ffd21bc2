//! Telegraf's Linux system inputs (`cpu`, `mem`, `disk`, `diskio`, `net`, `system`) with its
//! measurement, tag and field names, units, types and formulas.
//!
//! Counters come from `procfs` (meminfo, diskstats, net/dev, loadavg, uptime, mounts) and
//! `statvfs`; sysinfo (the design card's first pick) has no per-state CPU times, drops,
//! inodes or diskio, and its current release needs a newer Rust than our Yocto floor.
//! `/proc/stat` cpu lines are split here because procfs numbers CPUs by position, which is
//! wrong once a core is hot-unplugged (common on big.LITTLE boards): Telegraf keeps `cpuN`.
//! Everything here is blocking file I/O: the caller runs it on the blocking pool.

use crate::lineproto::{Point, Value};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;
use thingsly_core::config::MetricsSection;

/// Keeps the previous sample of the counters whose fields are rates over the interval.
pub struct Collector {
    /// `[metrics]`: which inputs report what (Telegraf's plugin option names).
    opts: MetricsSection,
    sys: PathBuf,
    last_cpu: HashMap<String, CpuTicks>,
    last_diskio: HashMap<String, DiskSample>,
    last_diskio_at: Option<Instant>,
}

/// An input that failed this round; the others still report (as Telegraf's "Error in plugin").
#[derive(Debug, Clone, PartialEq)]
pub struct InputError {
    pub input: &'static str,
    pub message: String,
}

impl Collector {
    pub fn new(opts: MetricsSection) -> Self {
        Self {
            opts,
            sys: PathBuf::from("/sys"),
            last_cpu: HashMap::new(),
            last_diskio: HashMap::new(),
            last_diskio_at: None,
        }
    }

    /// One gather of every input into `out`.
    pub fn collect(&mut self, out: &mut Vec<Point>) -> Vec<InputError> {
        let mut errors = Vec::new();
        let mut run = |input: &'static str, r: Result<(), String>| {
            if let Err(message) = r {
                errors.push(InputError { input, message });
            }
        };
        run("cpu", self.cpu(out));
        run("mem", mem(out));
        run("disk", self.disk(out));
        run("diskio", self.diskio(out));
        run("net", self.net(out));
        run("system", self.system(out));
        errors
    }

    fn cpu(&mut self, out: &mut Vec<Point>) -> Result<(), String> {
        let stat = std::fs::read_to_string("/proc/stat").map_err(|e| format!("/proc/stat: {e}"))?;
        let mut seen = HashMap::with_capacity(self.last_cpu.len());
        for line in stat.lines().filter(|l| l.starts_with("cpu")) {
            let Some((name, ticks)) = CpuTicks::parse(line) else {
                continue;
            };
            let tag = if name == "cpu" {
                if !self.opts.totalcpu {
                    continue;
                }
                "cpu-total".to_string()
            } else {
                if !self.opts.percpu {
                    continue;
                }
                name.to_string()
            };
            if let Some(last) = self.last_cpu.get(&tag)
                && let Some(p) = cpu_point(&tag, last, &ticks)
            {
                out.push(p);
            }
            seen.insert(tag, ticks);
        }
        // CPUs that went offline are forgotten, so a later return starts a fresh delta.
        self.last_cpu = seen;
        Ok(())
    }

    fn disk(&self, out: &mut Vec<Point>) -> Result<(), String> {
        let text = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("/proc/self/mountinfo: {e}"))?;
        let mut seen = HashSet::new();
        for m in text.lines().filter_map(Mount::parse) {
            if !self.opts.mount_points.is_empty() && !self.opts.mount_points.contains(&m.path) {
                continue;
            }
            if self.opts.ignore_fs.contains(&m.fstype)
                || self.opts.ignore_mount_opts.iter().any(|o| m.has_opt(o))
                || !seen.insert(m.path.clone())
            {
                continue;
            }
            // A mount that vanished or is not ours to read is skipped, as Telegraf does.
            let Ok(st) = rustix::fs::statvfs(Path::new(&m.path)) else {
                continue;
            };
            if let Some(p) = disk_point(&m.device, &m.path, &m.fstype, m.read_only, &st) {
                out.push(p);
            }
        }
        Ok(())
    }

    fn diskio(&mut self, out: &mut Vec<Point>) -> Result<(), String> {
        let stats = procfs::diskstats().map_err(|e| format!("/proc/diskstats: {e}"))?;
        let now = Instant::now();
        let elapsed_ms = self
            .last_diskio_at
            .map(|t| now.duration_since(t).as_millis() as f64);
        let mut seen = HashMap::with_capacity(stats.len());
        for d in stats {
            let s = DiskSample {
                reads: d.reads,
                writes: d.writes,
                read_time: d.time_reading,
                write_time: d.time_writing,
                io_time: d.time_in_progress,
            };
            let mut p = Point::new("diskio").tag("name", d.name.clone());
            p.uint("reads", d.reads);
            p.uint("writes", d.writes);
            p.uint("read_bytes", d.sectors_read.saturating_mul(512));
            p.uint("write_bytes", d.sectors_written.saturating_mul(512));
            p.uint("read_time", d.time_reading);
            p.uint("write_time", d.time_writing);
            p.uint("io_time", d.time_in_progress);
            p.uint("weighted_io_time", d.weighted_time_in_progress);
            p.uint("iops_in_progress", d.in_progress);
            p.uint("merged_reads", d.merged);
            p.uint("merged_writes", d.writes_merged);
            if let (Some(last), Some(ms)) = (self.last_diskio.get(&d.name), elapsed_ms) {
                diskio_rates(&mut p, last, &s, ms);
            }
            out.push(p);
            seen.insert(d.name, s);
        }
        self.last_diskio = seen;
        self.last_diskio_at = Some(now);
        Ok(())
    }

    fn net(&self, out: &mut Vec<Point>) -> Result<(), String> {
        let devs = procfs::net::dev_status().map_err(|e| format!("/proc/net/dev: {e}"))?;
        let mut names: Vec<_> = devs.keys().cloned().collect();
        names.sort();
        for name in names {
            let Some(d) = devs.get(&name) else { continue };
            let dir = self.sys.join("class/net").join(&name);
            if self.opts.interfaces.is_empty() {
                // IFF_UP = 0x1, IFF_LOOPBACK = 0x8 (linux/if.h).
                let Some(flags) = read_trimmed(&dir.join("flags"))
                    .and_then(|f| u32::from_str_radix(f.trim_start_matches("0x"), 16).ok())
                else {
                    continue;
                };
                if flags & 0x8 != 0 || flags & 0x1 == 0 {
                    continue;
                }
            } else if !self.opts.interfaces.iter().any(|g| glob_match(g, &name)) {
                continue;
            }
            let speed = read_trimmed(&dir.join("speed"))
                .and_then(|s| s.parse::<i64>().ok())
                .unwrap_or(-1);
            let mut p = Point::new("net").tag("interface", name.clone());
            p.uint("bytes_sent", d.sent_bytes);
            p.uint("bytes_recv", d.recv_bytes);
            p.uint("packets_sent", d.sent_packets);
            p.uint("packets_recv", d.recv_packets);
            p.uint("err_in", d.recv_errs);
            p.uint("err_out", d.sent_errs);
            p.uint("drop_in", d.recv_drop);
            p.uint("drop_out", d.sent_drop);
            p.int("speed", speed);
            out.push(p);
        }
        Ok(())
    }

    fn system(&self, out: &mut Vec<Point>) -> Result<(), String> {
        use procfs::Current;
        let load = procfs::LoadAverage::current().map_err(|e| format!("/proc/loadavg: {e}"))?;
        let uptime = procfs::Uptime::current().map_err(|e| format!("/proc/uptime: {e}"))?;
        // Logical CPUs as gopsutil counts them: "processor" lines of /proc/cpuinfo (procfs's
        // CpuInfo would build a map of every field of every CPU for this one number).
        let n_cpus = std::fs::read_to_string("/proc/cpuinfo")
            .map(|c| c.lines().filter(|l| l.starts_with("processor")).count())
            .unwrap_or(0);
        let (n_users, n_unique_users) = users(Path::new("/var/run/utmp"));
        let mut p = Point::new("system");
        // The kernel prints two decimals; procfs hands them over as f32.
        p.float("load1", round2(load.one));
        p.float("load5", round2(load.five));
        p.float("load15", round2(load.fifteen));
        p.int("n_cpus", n_cpus as i64);
        p.int("n_users", n_users as i64);
        p.int("n_unique_users", n_unique_users as i64);
        p.int("n_physical_cpus", physical_cpus(&self.sys) as i64);
        out.push(p);
        // Telegraf writes uptime and uptime_format as two more lines at the same timestamp.
        let secs = uptime.uptime.max(0.0) as u64;
        let mut p = Point::new("system");
        p.uint("uptime", secs);
        out.push(p);
        let mut p = Point::new("system");
        p.field("uptime_format", Value::Str(format_uptime(secs)));
        out.push(p);
        Ok(())
    }
}

/// `/proc/stat` cpu counters in clock ticks: user nice system idle iowait irq softirq steal
/// guest guest_nice (older kernels print fewer; missing ones are 0).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuTicks([f64; 10]);

impl CpuTicks {
    pub fn parse(line: &str) -> Option<(&str, Self)> {
        let mut it = line.split_ascii_whitespace();
        let name = it.next()?;
        let mut t = [0f64; 10];
        for (slot, v) in t.iter_mut().zip(it) {
            *slot = v.parse::<u64>().ok()? as f64;
        }
        Some((name, Self(t)))
    }

    /// Telegraf's total: guest time is already inside user, so it is not added again.
    fn total(&self) -> f64 {
        self.0[..8].iter().sum()
    }
}

/// Telegraf's `usage_*` over the interval; `None` when no time passed or counters went back.
pub fn cpu_point(tag: &str, last: &CpuTicks, now: &CpuTicks) -> Option<Point> {
    let total = now.total() - last.total();
    if total <= 0.0 {
        return None;
    }
    let d = |i: usize| now.0[i] - last.0[i];
    let pct = |v: f64| 100.0 * v / total;
    let mut p = Point::new("cpu").tag("cpu", tag.to_string());
    p.float("usage_user", pct(d(0) - d(8)));
    p.float("usage_system", pct(d(2)));
    p.float("usage_idle", pct(d(3)));
    p.float("usage_nice", pct(d(1) - d(9)));
    p.float("usage_iowait", pct(d(4)));
    p.float("usage_irq", pct(d(5)));
    p.float("usage_softirq", pct(d(6)));
    p.float("usage_steal", pct(d(7)));
    p.float("usage_guest", pct(d(8)));
    p.float("usage_guest_nice", pct(d(9)));
    Some(p)
}

fn mem(out: &mut Vec<Point>) -> Result<(), String> {
    use procfs::Current;
    let m = procfs::Meminfo::current().map_err(|e| format!("/proc/meminfo: {e}"))?;
    let total = m.mem_total;
    // Kernels before 3.14 have no MemAvailable; gopsutil estimates it the same way.
    let available = m.mem_available.unwrap_or(m.mem_free + m.buffers + m.cached);
    let used = total.saturating_sub(available);
    let o = |v: Option<u64>| v.unwrap_or(0);
    let mut p = Point::new("mem");
    p.fields.reserve_exact(34);
    p.uint("total", total);
    p.uint("available", available);
    p.uint("used", used);
    p.uint("free", m.mem_free);
    p.uint("buffered", m.buffers);
    p.uint("cached", m.cached + o(m.s_reclaimable));
    p.uint("active", m.active);
    p.uint("inactive", m.inactive);
    p.uint("shared", o(m.shmem));
    p.uint("slab", m.slab);
    p.uint("sreclaimable", o(m.s_reclaimable));
    p.uint("sunreclaim", o(m.s_unreclaim));
    p.uint("dirty", m.dirty);
    p.uint("write_back", m.writeback);
    p.uint("write_back_tmp", o(m.writeback_tmp));
    p.uint("mapped", m.mapped);
    p.uint("page_tables", o(m.page_tables));
    p.uint("commit_limit", o(m.commit_limit));
    p.uint("committed_as", m.committed_as);
    p.uint("swap_total", m.swap_total);
    p.uint("swap_free", m.swap_free);
    p.uint("swap_cached", m.swap_cached);
    p.uint("huge_pages_total", o(m.hugepages_total));
    p.uint("huge_pages_free", o(m.hugepages_free));
    p.uint("huge_page_size", o(m.hugepagesize));
    p.uint("high_total", o(m.high_total));
    p.uint("high_free", o(m.high_free));
    p.uint("low_total", o(m.low_total));
    p.uint("low_free", o(m.low_free));
    p.uint("vmalloc_total", m.vmalloc_total);
    p.uint("vmalloc_used", m.vmalloc_used);
    p.uint("vmalloc_chunk", m.vmalloc_chunk);
    let pct = |v: u64| {
        if total == 0 {
            0.0
        } else {
            100.0 * v as f64 / total as f64
        }
    };
    p.float("used_percent", pct(used));
    p.float("available_percent", pct(available));
    out.push(p);
    Ok(())
}

/// One `/proc/self/mountinfo` line. Parsed here because procfs 0.17 decodes only
/// `\011 \012 \134 \043` and leaves a space as `\040`, so a mount path with a space would
/// never match `mount_points` nor be found by statvfs.
#[derive(Debug, Clone, PartialEq)]
pub struct Mount {
    pub device: String,
    pub path: String,
    pub fstype: String,
    /// Per-mount options (what `ignore_mount_opts` matches, as in Telegraf).
    pub options: String,
    /// The filesystem itself is read-only (superblock `ro`: a squashfs rootfs, an ext4 that
    /// remounted itself ro after errors). Not the per-mount flag: under the shipped unit's
    /// `ProtectSystem=strict` every mount the agent sees is a read-only bind, and `mode` must
    /// not depend on how the agent is sandboxed.
    pub read_only: bool,
}

impl Mount {
    /// `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL…] - FSTYPE SOURCE SUPER_OPTIONS`
    pub fn parse(line: &str) -> Option<Self> {
        let (left, right) = line.split_once(" - ")?;
        let mut l = left.split(' ').skip(4);
        let path = unmangle(l.next()?);
        let options = unmangle(l.next()?);
        let mut r = right.split(' ');
        let fstype = unmangle(r.next()?);
        let device = unmangle(r.next()?);
        let read_only = r.next().unwrap_or("").split(',').any(|o| o == "ro");
        Some(Self {
            device,
            path,
            fstype,
            options,
            read_only,
        })
    }

    fn has_opt(&self, opt: &str) -> bool {
        self.options
            .split(',')
            .any(|o| o == opt || o.split('=').next() == Some(opt))
    }
}

/// The kernel writes space, tab, newline, backslash (and `#`) in mount fields as `\ooo`.
fn unmangle(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = (b[i] == b'\\' && i + 3 < b.len())
            .then(|| &b[i + 1..i + 4])
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .map(|d| d.iter().fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0')))
            .and_then(|v| u8::try_from(v).ok());
        if let Some(v) = octal {
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Telegraf's `disk` point from one mount and its statvfs; `None` for size-less pseudo
/// filesystems (proc, sysfs, cgroup …).
pub fn disk_point(
    spec: &str,
    path: &str,
    fstype: &str,
    read_only: bool,
    st: &rustix::fs::StatVfs,
) -> Option<Point> {
    let frsize = st.f_frsize;
    let total = st.f_blocks.saturating_mul(frsize);
    if total == 0 {
        return None;
    }
    let free = st.f_bavail.saturating_mul(frsize);
    let used = st
        .f_blocks
        .saturating_sub(st.f_bfree)
        .saturating_mul(frsize);
    let used_percent = if used + free == 0 {
        0.0
    } else {
        100.0 * used as f64 / (used + free) as f64
    };
    let inodes_total = st.f_files;
    let inodes_free = st.f_ffree;
    let inodes_used = inodes_total.saturating_sub(inodes_free);
    let inodes_used_percent = if inodes_total == 0 {
        0.0
    } else {
        100.0 * inodes_used as f64 / inodes_total as f64
    };
    let device = spec.strip_prefix("/dev/").unwrap_or(spec);
    let device = if device == "none" { fstype } else { device };
    let mut p = Point::new("disk")
        .tag("path", path.to_string())
        .tag("device", device.to_string())
        .tag("fstype", fstype.to_string())
        .tag("mode", if read_only { "ro" } else { "rw" });
    p.uint("total", total);
    p.uint("free", free);
    p.uint("used", used);
    p.float("used_percent", used_percent);
    p.uint("inodes_total", inodes_total);
    p.uint("inodes_free", inodes_free);
    p.uint("inodes_used", inodes_used);
    p.float("inodes_used_percent", inodes_used_percent);
    Some(p)
}

#[derive(Debug, Clone, Copy)]
struct DiskSample {
    reads: u64,
    writes: u64,
    read_time: u64,
    write_time: u64,
    io_time: u64,
}

/// Telegraf's `io_await`, `io_svctm` (ms per I/O) and `io_util` (%), from the second gather on;
/// skipped when a counter went backwards (device re-created or 32-bit wrap).
fn diskio_rates(p: &mut Point, last: &DiskSample, now: &DiskSample, elapsed_ms: f64) {
    let (Some(rw_now), Some(rw_last)) = (
        now.reads.checked_add(now.writes),
        last.reads.checked_add(last.writes),
    ) else {
        return;
    };
    let time_now = now.read_time.saturating_add(now.write_time);
    let time_last = last.read_time.saturating_add(last.write_time);
    if rw_now < rw_last || time_now < time_last || now.io_time < last.io_time {
        return;
    }
    let d_rw = (rw_now - rw_last) as f64;
    let d_time = (time_now - time_last) as f64;
    let d_io = (now.io_time - last.io_time) as f64;
    if d_rw > 0.0 {
        p.float("io_await", d_time / d_rw);
        p.float("io_svctm", d_io / d_rw);
    }
    if elapsed_ms > 0.0 {
        p.float("io_util", 100.0 * d_io / elapsed_ms);
    }
}

/// Telegraf's `uptime_format`: "14 days, 11:07", "1 day,  2:03", " 0:05".
pub fn format_uptime(secs: u64) -> String {
    let days = secs / 86_400;
    let mut s = String::new();
    if days != 0 {
        s = format!("{days} day{}, ", if days > 1 { "s" } else { "" });
    }
    let minutes = secs / 60;
    s.push_str(&format!("{:2}:{:02}", (minutes / 60) % 24, minutes % 60));
    s
}

fn round2(v: f32) -> f64 {
    (f64::from(v) * 100.0).round() / 100.0
}

/// Login sessions (utmp USER_PROCESS): (sessions, distinct users). A board without utmp has
/// nobody logged in: 0, so the fields keep their type and dashboards keep their series.
fn users(utmp: &Path) -> (usize, usize) {
    let Ok(entries) = utmp_rs::parse_from_path(utmp) else {
        return (0, 0);
    };
    let names: Vec<String> = entries
        .into_iter()
        .filter_map(|e| match e {
            utmp_rs::UtmpEntry::UserProcess { user, .. } => Some(user),
            _ => None,
        })
        .collect();
    let unique = names.iter().collect::<BTreeSet<_>>().len();
    (names.len(), unique)
}

/// Physical cores: distinct sibling lists in sysfs topology, as gopsutil counts them.
fn physical_cpus(sys: &Path) -> usize {
    let Ok(dir) = std::fs::read_dir(sys.join("devices/system/cpu")) else {
        return 0;
    };
    let mut cores = BTreeSet::new();
    for e in dir.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if !name
            .strip_prefix("cpu")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        {
            continue;
        }
        let topo = e.path().join("topology");
        if let Some(list) = read_trimmed(&topo.join("core_cpus_list"))
            .or_else(|| read_trimmed(&topo.join("thread_siblings_list")))
        {
            cores.insert(list);
        }
    }
    cores.len()
}

fn read_trimmed(p: &Path) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
}

/// Telegraf's interface filter: `*` matches any run of characters.
fn glob_match(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((head, rest)) => {
            let Some(tail) = name.strip_prefix(head) else {
                return false;
            };
            (0..=tail.len())
                .filter(|i| tail.is_char_boundary(*i))
                .any(|i| glob_match(rest, &tail[i..]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(p: &Point, k: &str) -> f64 {
        match p.fields.iter().find(|(n, _)| n == k).map(|(_, v)| v) {
            Some(Value::Float(f)) => *f,
            other => panic!("{k}: {other:?}"),
        }
    }

    #[test]
    fn cpu_usage_is_telegrafs_formula() {
        let (_, a) = CpuTicks::parse("cpu 100 10 50 800 20 5 5 10 40 4").unwrap();
        let (_, b) = CpuTicks::parse("cpu 200 20 100 1500 30 10 10 30 80 6").unwrap();
        // Δ: user 100 nice 10 system 50 idle 700 iowait 10 irq 5 softirq 5 steal 20 → total 900
        let p = cpu_point("cpu-total", &a, &b).unwrap();
        assert!((field(&p, "usage_user") - 100.0 * 60.0 / 900.0).abs() < 1e-9);
        assert!((field(&p, "usage_nice") - 100.0 * 8.0 / 900.0).abs() < 1e-9);
        assert!((field(&p, "usage_idle") - 100.0 * 700.0 / 900.0).abs() < 1e-9);
        assert!((field(&p, "usage_guest") - 100.0 * 40.0 / 900.0).abs() < 1e-9);
        assert_eq!(p.fields.len(), 10);
        assert!(cpu_point("cpu-total", &b, &b).is_none(), "no time passed");
        assert!(
            cpu_point("cpu-total", &b, &a).is_none(),
            "counters went back"
        );
        let (name, old) = CpuTicks::parse("cpu3 1 2 3 4").unwrap();
        assert_eq!((name, old.total()), ("cpu3", 10.0));
    }

    #[test]
    fn first_cpu_gather_emits_nothing_second_does() {
        let mut c = Collector::new(MetricsSection::default());
        let mut out = Vec::new();
        c.cpu(&mut out).unwrap();
        assert!(out.is_empty());
        std::thread::sleep(std::time::Duration::from_millis(50));
        c.cpu(&mut out).unwrap();
        // Some ticks may not have passed on an idle CPU; cpu-total almost surely has.
        std::thread::sleep(std::time::Duration::from_millis(100));
        c.cpu(&mut out).unwrap();
        assert!(out.iter().any(|p| p.tags[0].1 == "cpu-total"));
    }

    #[test]
    fn uptime_format_matches_telegraf() {
        assert_eq!(format_uptime(300), " 0:05");
        assert_eq!(format_uptime(86_400 + 2 * 3600 + 3 * 60), "1 day,  2:03");
        assert_eq!(
            format_uptime(14 * 86_400 + 11 * 3600 + 7 * 60 + 59),
            "14 days, 11:07"
        );
    }

    #[test]
    fn diskio_rates_need_progress() {
        let a = DiskSample {
            reads: 10,
            writes: 10,
            read_time: 100,
            write_time: 100,
            io_time: 50,
        };
        let b = DiskSample {
            reads: 20,
            writes: 30,
            read_time: 200,
            write_time: 300,
            io_time: 150,
        };
        let mut p = Point::new("diskio");
        diskio_rates(&mut p, &a, &b, 1000.0);
        assert_eq!(field(&p, "io_await"), 300.0 / 30.0);
        assert_eq!(field(&p, "io_svctm"), 100.0 / 30.0);
        assert_eq!(field(&p, "io_util"), 10.0);
        let mut back = Point::new("diskio");
        diskio_rates(&mut back, &b, &a, 1000.0);
        assert!(back.fields.is_empty());
    }

    #[test]
    fn mount_fields_are_unescaped() {
        let m = Mount::parse(
            "40 27 0:35 / /tmp/data\\040a,b=c\\134x\\011y ro,relatime shared:20 - tmpfs tmp\\040fs rw,size=4096k",
        )
        .unwrap();
        assert_eq!(m.path, "/tmp/data a,b=c\\x\ty");
        assert_eq!((m.fstype.as_str(), m.device.as_str()), ("tmpfs", "tmp fs"));
        assert!(m.has_opt("ro") && m.has_opt("relatime") && !m.has_opt("rw"));
        assert!(!m.read_only, "a read-only bind of a read-write filesystem");
        let sq = Mount::parse("27 1 7:0 / / ro,relatime - squashfs /dev/loop0 ro,errors=continue")
            .unwrap();
        assert!(sq.read_only && sq.device == "/dev/loop0" && sq.path == "/");
        assert_eq!(unmangle("a\\04"), "a\\04", "a short escape stays as it is");
    }

    #[test]
    fn interface_globs() {
        assert!(glob_match("eth*", "eth0"));
        assert!(glob_match("*0", "wlan0"));
        assert!(glob_match("a,b=1", "a,b=1"));
        assert!(!glob_match("eth*", "wlan0"));
        assert!(glob_match("*", ""));
    }

    #[test]
    fn full_collect_has_every_measurement() {
        let mut c = Collector::new(MetricsSection::default());
        let mut out = Vec::new();
        assert_eq!(c.collect(&mut out), vec![]);
        out.clear();
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert_eq!(c.collect(&mut out), vec![]);
        let ms: BTreeSet<_> = out.iter().map(|p| p.measurement).collect();
        for m in ["cpu", "mem", "diskio", "system"] {
            assert!(ms.contains(m), "{m} missing: {ms:?}");
        }
    }
}

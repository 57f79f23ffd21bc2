//! The business telemetry sample: CPU use since the last sample and free memory, from /proc
//! through the `procfs` crate.

pub struct Sampler {
    last: Option<(u64, u64)>,
}

impl Sampler {
    pub fn new() -> Self {
        let mut s = Self { last: None };
        s.cpu_usage();
        s
    }

    /// Percent of CPU time busy since the previous call (all CPUs), `None` on the first call.
    pub fn cpu_usage(&mut self) -> Option<f64> {
        use procfs::CurrentSI;
        let stat = procfs::KernelStats::current().ok()?;
        let t = stat.total;
        let idle = t.idle + t.iowait.unwrap_or(0);
        let total = t.user
            + t.nice
            + t.system
            + t.idle
            + t.iowait.unwrap_or(0)
            + t.irq.unwrap_or(0)
            + t.softirq.unwrap_or(0)
            + t.steal.unwrap_or(0);
        let prev = self.last.replace((idle, total));
        let (pidle, ptotal) = prev?;
        let dt = total.saturating_sub(ptotal);
        if dt == 0 {
            return Some(0.0);
        }
        let busy = dt.saturating_sub(idle.saturating_sub(pidle));
        Some(((busy as f64 / dt as f64) * 1000.0).round() / 10.0)
    }

    /// MemAvailable in MiB.
    pub fn mem_free_mb(&self) -> Option<u64> {
        use procfs::Current;
        let m = procfs::Meminfo::current().ok()?;
        Some(m.mem_available.unwrap_or(m.mem_free) / (1024 * 1024))
    }
}

//! The `metrics` module: a collector loop on the clock and a writer loop that sends each
//! collection straight to InfluxDB while it answers and keeps collections in a bounded disk
//! buffer (drained oldest first) while it does not.
//!
//! Flash wear: while InfluxDB is healthy and the buffer is empty nothing touches the disk. From
//! the first failed write on, every collection is persisted before any send, so a restart or a
//! power cut during an outage loses nothing within `metric_buffer_limit`. At shutdown, what is
//! in memory is persisted too. A batch that was in flight when the agent stopped may be sent
//! again; InfluxDB keeps one point per series and timestamp, so a repeat is harmless.

use crate::collect::{Collector, InputError};
use crate::lineproto::{Encoder, Point, Value, count_lines};
use crate::writer::{Outcome, Writer};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use thingsly_core::StateHandle;
use thingsly_core::backoff::Backoff;
use thingsly_core::config::MetricsSection;
use thingsly_core::spool::{Spool, SpoolLimits};
use thingsly_core::state_dir::{StateDir, StateError};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub const MODULE: &str = "metrics";
const SPOOL_DIR: &str = "spool/metrics";
/// Collections waiting between the collector and the writer (the rest waits on disk).
const CHANNEL_DEPTH: usize = 4;
/// Upper bound for a server's Retry-After.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(transparent)]
    State(#[from] StateError),
}

/// Everything the module needs besides the shared state.
#[derive(Debug, Clone)]
pub struct MetricsConfig {
    pub device_id: String,
    pub section: MetricsSection,
    /// Used for an https URL when `metrics.influxdb.ca_bundle` is unset (enrollment's chain).
    pub fallback_ca: Option<PathBuf>,
    /// InfluxDB writes go through these (see `thingsly_core::proxy`).
    pub proxies: thingsly_core::proxy::Proxies,
}

impl MetricsConfig {
    pub fn encoder(&self) -> Encoder {
        let mut tags: Vec<(String, String)> = self
            .section
            .tags
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        tags.push(("host".into(), self.device_id.clone()));
        Encoder::new(tags, self.section.precision)
    }

    fn writer(&self) -> Result<Writer, String> {
        let i = &self.section.influxdb;
        let secret = i.secret()?;
        let ca_path = i.ca_bundle.clone().or_else(|| self.fallback_ca.clone());
        let ca = match (&ca_path, i.url.starts_with("https://")) {
            (Some(p), true) => Some(
                std::fs::read(p).map_err(|e| format!("InfluxDB CA bundle {}: {e}", p.display()))?,
            ),
            _ => None,
        };
        Writer::new(
            i,
            &secret,
            self.section.precision,
            ca.as_deref(),
            &self.proxies,
        )
    }
}

/// Counters the `agent` measurement and `status` report.
#[derive(Debug, Default)]
pub struct Counters {
    pub buffered_points: AtomicU64,
    pub dropped_points: AtomicU64,
    pub rejected_points: AtomicU64,
    pub write_errors: AtomicU64,
    pub points_written: AtomicU64,
}

/// One collection, encoded: every input plus the agent's own point, at `unix_ns`.
pub fn gather(
    collector: &mut Collector,
    encoder: &Encoder,
    unix_ns: i128,
    agent: Point,
) -> (String, Vec<InputError>) {
    let mut points = Vec::with_capacity(64);
    let errors = collector.collect(&mut points);
    points.push(agent);
    let mut out = String::with_capacity(points.len() * 160);
    for p in &points {
        encoder.encode(&mut out, p, unix_ns);
    }
    (out, errors)
}

/// The agent about itself: memory, CPU time, buffer and write counters, module states.
pub fn agent_point(state: &StateHandle, counters: &Counters) -> Point {
    let mut p = Point::new("agent");
    if let Ok(me) = procfs::process::Process::myself() {
        if let Ok(st) = me.status()
            && let Some(kb) = st.vmrss
        {
            p.uint("rss_bytes", kb * 1024);
        }
        if let Ok(stat) = me.stat() {
            let tps = procfs::ticks_per_second() as f64;
            p.float("cpu_time", (stat.utime + stat.stime) as f64 / tps);
        }
    }
    p.uint("buffered_points", counters.buffered_points.load(Relaxed));
    p.uint("dropped_points", counters.dropped_points.load(Relaxed));
    p.uint("rejected_points", counters.rejected_points.load(Relaxed));
    p.uint("write_errors", counters.write_errors.load(Relaxed));
    p.uint("points_written", counters.points_written.load(Relaxed));
    for (name, m) in state.get().modules {
        p.field(format!("module_{name}"), Value::Str(m.state));
    }
    p
}

fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// The next collection time (unix), on a multiple of `interval` when `round` is set.
pub fn next_tick(
    now: Duration,
    interval: Duration,
    round: bool,
    last: Option<Duration>,
) -> Duration {
    let interval_ns = interval.as_nanos().max(1);
    if round {
        let n = now.as_nanos() / interval_ns + 1;
        Duration::from_nanos((n * interval_ns) as u64)
    } else {
        match last {
            Some(l) if l + interval > now => l + interval,
            _ => now,
        }
    }
}

/// `thingsly-agent metrics --once`: collect, wait one interval, collect again and return
/// the second collection exactly as it would be written.
pub async fn once(cfg: &MetricsConfig, state: &StateHandle, interval: Duration) -> String {
    let encoder = cfg.encoder();
    let counters = Counters::default();
    let mut collector = Collector::new(cfg.section.clone());
    let mut sink = Vec::new();
    collector.collect(&mut sink);
    tokio::time::sleep(interval).await;
    let (text, errors) = gather(
        &mut collector,
        &encoder,
        unix_now().as_nanos() as i128,
        agent_point(state, &counters),
    );
    for e in errors {
        tracing::warn!(input = e.input, error = %e.message, "input failed");
    }
    text
}

/// The module: runs until `shutdown`.
pub async fn run(
    cfg: MetricsConfig,
    state: StateHandle,
    state_dir: StateDir,
    shutdown: CancellationToken,
) -> Result<(), MetricsError> {
    let s = &cfg.section;
    let limits = SpoolLimits {
        max_messages: s.metric_buffer_limit,
        // Points are bounded; bytes only guard against a pathological line (1 KiB/point).
        max_bytes: (s.metric_buffer_limit as u64).saturating_mul(1024),
    };
    let spool = Spool::open_weighted(state_dir.subdir(SPOOL_DIR)?, limits, count_lines)?;
    let counters = Arc::new(Counters::default());
    counters.buffered_points.store(spool.weight(), Relaxed);
    counters
        .dropped_points
        .store(spool.dropped_total(), Relaxed);
    if !spool.is_empty() {
        tracing::info!(
            points = spool.weight(),
            "metrics buffered by a previous run will be sent first"
        );
    }
    let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
    let collector = collect_loop(&cfg, state.clone(), counters.clone(), tx, shutdown.clone());
    let writer = WriteLoop {
        cfg: &cfg,
        state: &state,
        counters: &counters,
        spool,
        writer: None,
        backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(60)),
        retry_at: None,
        max_chunks: usize::MAX,
        last_error: String::new(),
    }
    .run(rx, shutdown.clone());
    let ((), r) = tokio::join!(collector, writer);
    r
}

async fn collect_loop(
    cfg: &MetricsConfig,
    state: StateHandle,
    counters: Arc<Counters>,
    tx: mpsc::Sender<String>,
    shutdown: CancellationToken,
) {
    let s = &cfg.section;
    let encoder = cfg.encoder();
    let mut collector = Some(Collector::new(cfg.section.clone()));
    let mut last_tick = None;
    let mut reported_errors: Vec<InputError> = Vec::new();
    loop {
        let now = unix_now();
        let tick = next_tick(now, s.interval, s.round_interval, last_tick);
        let jitter = if s.collection_jitter.is_zero() {
            Duration::ZERO
        } else {
            Duration::from_millis(fastrand::u64(0..=s.collection_jitter.as_millis() as u64))
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(tick.saturating_sub(now) + jitter) => {}
        }
        last_tick = Some(tick);
        // The point's time is the tick, so every collection has its own timestamp even when
        // the blocking pool was slow to start it.
        let stamp = if s.round_interval { tick } else { unix_now() };
        let Some(mut c) = collector.take() else {
            return;
        };
        let enc = encoder.clone();
        let agent = agent_point(&state, &counters);
        let began = Instant::now();
        let joined = tokio::task::spawn_blocking(move || {
            let (text, errors) = gather(&mut c, &enc, stamp.as_nanos() as i128, agent);
            (c, text, errors)
        })
        .await;
        let Ok((c, text, errors)) = joined else {
            tracing::error!("metrics collection panicked; collector state reset");
            collector = Some(Collector::new(cfg.section.clone()));
            continue;
        };
        collector = Some(c);
        // A hung mount (NFS, FUSE) blocks statvfs; say so instead of going quiet.
        if began.elapsed() > s.interval {
            tracing::warn!(took = ?began.elapsed(), "metrics collection took longer than the interval; ticks were skipped");
        }
        if errors != reported_errors {
            for e in &errors {
                tracing::warn!(input = e.input, error = %e.message, "metrics input failed");
            }
            reported_errors = errors;
        }
        if text.is_empty() {
            continue;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = tx.send(text) => if r.is_err() { return },
        }
    }
}

struct WriteLoop<'a> {
    cfg: &'a MetricsConfig,
    state: &'a StateHandle,
    counters: &'a Counters,
    spool: Spool,
    writer: Option<Writer>,
    backoff: Backoff,
    /// Set after a failure: nothing is sent before then, and new collections go to disk.
    retry_at: Option<Instant>,
    /// Collections per request; lowered after a 413.
    max_chunks: usize,
    last_error: String,
}

/// What a request carried: a collection still only in memory, or buffered ones.
enum Batch {
    Direct(String),
    Buffered { seqs: Vec<u64>, points: u64 },
}

impl WriteLoop<'_> {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<String>,
        shutdown: CancellationToken,
    ) -> Result<(), MetricsError> {
        self.report();
        loop {
            let can_drain = !self.spool.is_empty();
            let wake = self.retry_at.unwrap_or_else(Instant::now);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                chunk = rx.recv() => {
                    let Some(chunk) = chunk else { break };
                    if self.spool.is_empty() && self.retry_at.is_none() {
                        let out = tokio::select! {
                            _ = shutdown.cancelled() => None,
                            out = self.send(chunk.as_bytes()) => Some(out),
                        };
                        match out {
                            Some(out) => self.settle(out, Batch::Direct(chunk))?,
                            None => {
                                self.buffer(&chunk)?;
                                break;
                            }
                        }
                    } else {
                        self.buffer(&chunk)?;
                    }
                }
                _ = tokio::time::sleep_until(wake), if can_drain => {
                    let (seqs, body, points) = self.next_batch();
                    if seqs.is_empty() {
                        continue;
                    }
                    tokio::select! {
                        // The batch stays on disk: nothing to do.
                        _ = shutdown.cancelled() => break,
                        out = self.send(&body) => self.settle(out, Batch::Buffered { seqs, points })?,
                    }
                }
            }
        }
        // Persist what the collector handed over but was not sent yet.
        rx.close();
        while let Ok(chunk) = rx.try_recv() {
            self.buffer(&chunk)?;
        }
        Ok(())
    }

    async fn send(&mut self, body: &[u8]) -> Outcome {
        if self.writer.is_none() {
            match self.cfg.writer() {
                Ok(w) => self.writer = Some(w),
                Err(reason) => {
                    return Outcome::Retry {
                        reason,
                        after: None,
                    };
                }
            }
        }
        match self.writer.as_mut() {
            Some(w) => w.write(body).await,
            None => Outcome::Retry {
                reason: "no InfluxDB writer".into(),
                after: None,
            },
        }
    }

    /// Oldest buffered collections up to `metric_batch_size` points (at least one).
    fn next_batch(&mut self) -> (Vec<u64>, Vec<u8>, u64) {
        let limit = self.cfg.section.metric_batch_size as u64;
        let mut take = 0;
        let mut points = 0;
        for w in self.spool.weights() {
            if take == self.max_chunks || (take > 0 && points + w > limit) {
                break;
            }
            take += 1;
            points += w;
        }
        let chunks = self.spool.peek(None, take);
        let mut body = Vec::new();
        let mut seqs = Vec::with_capacity(chunks.len());
        points = 0;
        for (seq, data) in chunks {
            points += count_lines(&data);
            body.extend_from_slice(&data);
            seqs.push(seq);
        }
        self.sync_counters();
        (seqs, body, points)
    }

    fn buffer(&mut self, chunk: &str) -> Result<(), MetricsError> {
        let dropped = self.spool.push(chunk.as_bytes())?;
        if dropped > 0 {
            tracing::warn!(
                dropped,
                limit = self.cfg.section.metric_buffer_limit,
                "metric buffer full: oldest points dropped"
            );
        }
        self.sync_counters();
        self.report();
        Ok(())
    }

    fn settle(&mut self, out: Outcome, batch: Batch) -> Result<(), MetricsError> {
        let points = match &batch {
            Batch::Direct(c) => count_lines(c.as_bytes()),
            Batch::Buffered { points, .. } => *points,
        };
        match out {
            Outcome::Written => {
                self.counters.points_written.fetch_add(points, Relaxed);
                self.forget(batch)?;
                self.backoff.reset();
                self.retry_at = None;
                if !self.last_error.is_empty() {
                    tracing::info!(
                        buffered = self.spool.weight(),
                        "InfluxDB writes succeed again"
                    );
                    self.last_error.clear();
                }
            }
            Outcome::Retry { reason, after } => {
                self.counters.write_errors.fetch_add(1, Relaxed);
                if let Batch::Direct(c) = &batch {
                    self.spool.push(c.as_bytes())?;
                }
                let delay = self
                    .backoff
                    .next_delay()
                    .max(after.unwrap_or_default().min(MAX_RETRY_AFTER));
                self.retry_at = Some(Instant::now() + delay);
                tracing::warn!(error = %reason, retry_in = ?delay, buffered = self.spool.weight(), "metrics write failed; kept for retry");
                self.last_error = reason;
            }
            Outcome::Rejected { reason } => {
                self.counters.write_errors.fetch_add(1, Relaxed);
                self.counters.rejected_points.fetch_add(points, Relaxed);
                tracing::error!(error = %reason, points, "InfluxDB rejected a batch; it is dropped");
                self.last_error = format!("batch of {points} points rejected: {reason}");
                self.forget(batch)?;
            }
            Outcome::TooLarge => {
                self.counters.write_errors.fetch_add(1, Relaxed);
                match batch {
                    Batch::Buffered { seqs, .. } if seqs.len() > 1 => {
                        self.max_chunks = (seqs.len() / 2).max(1);
                        tracing::warn!(
                            collections = self.max_chunks,
                            "InfluxDB said 413: smaller batches"
                        );
                    }
                    other => {
                        self.counters.rejected_points.fetch_add(points, Relaxed);
                        self.last_error =
                            "one collection is larger than InfluxDB's max-body-size".into();
                        tracing::error!(points, "{}; dropped", self.last_error);
                        self.forget(other)?;
                    }
                }
            }
        }
        self.sync_counters();
        self.report();
        Ok(())
    }

    fn forget(&mut self, batch: Batch) -> Result<(), MetricsError> {
        if let Batch::Buffered { seqs, .. } = batch {
            for seq in seqs {
                self.spool.remove(seq)?;
            }
        }
        Ok(())
    }

    fn sync_counters(&self) {
        self.counters
            .buffered_points
            .store(self.spool.weight(), Relaxed);
        self.counters
            .dropped_points
            .store(self.spool.dropped_total(), Relaxed);
    }

    fn report(&self) {
        let c = self.counters;
        let buffered = c.buffered_points.load(Relaxed);
        let (st, detail) = if self.retry_at.is_some() {
            (
                "waiting",
                format!("{}; {buffered} points buffered", self.last_error),
            )
        } else if !self.last_error.is_empty() {
            ("running", format!("last error: {}", self.last_error))
        } else {
            (
                "running",
                format!(
                    "{} points written to {}",
                    c.points_written.load(Relaxed),
                    self.cfg.section.influxdb.url
                ),
            )
        };
        self.state.update(|s| {
            let m = s.modules.entry(MODULE.to_string()).or_default();
            m.state = st.into();
            m.detail = detail;
            for (k, v) in [
                ("buffered_points", buffered),
                ("dropped_points", c.dropped_points.load(Relaxed)),
                ("rejected_points", c.rejected_points.load(Relaxed)),
                ("write_errors", c.write_errors.load(Relaxed)),
                ("points_written", c.points_written.load(Relaxed)),
            ] {
                m.counters.insert(k.into(), v);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_align_to_the_interval() {
        let i = Duration::from_secs(10);
        assert_eq!(
            next_tick(Duration::from_millis(12_345), i, true, None),
            Duration::from_secs(20)
        );
        assert_eq!(
            next_tick(Duration::from_secs(20), i, true, None),
            Duration::from_secs(30)
        );
        let now = Duration::from_millis(12_345);
        assert_eq!(next_tick(now, i, false, None), now);
        assert_eq!(
            next_tick(now, i, false, Some(Duration::from_secs(5))),
            Duration::from_secs(15)
        );
    }
}

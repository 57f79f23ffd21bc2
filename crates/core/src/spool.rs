//! A bounded, durable FIFO of messages on disk (telemetry while the broker is away).
//!
//! One file per message, `SEQ.msg` (zero-padded sequence), written atomically and carrying a
//! CRC32 so a torn or bit-rotted file is detected, moved aside and counted instead of sent.
//! When a push would exceed `max_messages` or `max_bytes`, the oldest messages are dropped and
//! the drop is counted persistently (`dropped` survives restarts, so it can be reported).
//! A spool can weigh its messages (`open_weighted`): the metrics buffer stores one collection
//! of line protocol per file and bounds the number of *points*, as Telegraf's
//! `metric_buffer_limit` does, so `max_messages` and the drop counter are then in points.
//! File I/O here is synchronous: messages are small and rare (one per interval).

use crate::state_dir::{MODE_SECRET, StateError, fsync_dir, write_atomic};
use std::collections::VecDeque;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"TSP1";
const HEADER: usize = 12;

#[derive(Debug, Clone, Copy)]
pub struct SpoolLimits {
    /// Total weight kept: messages, or what the spool's weigh function counts.
    pub max_messages: usize,
    pub max_bytes: u64,
}

#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    limits: SpoolLimits,
    /// (sequence, payload length, weight), oldest first.
    index: VecDeque<(u64, u64, u64)>,
    bytes: u64,
    weight: u64,
    weigh: fn(&[u8]) -> u64,
    next_seq: u64,
    dropped: u64,
    corrupt: u64,
}

impl Spool {
    /// Open or create the spool in `dir`, scanning what a previous run left.
    pub fn open(dir: impl Into<PathBuf>, limits: SpoolLimits) -> Result<Self, StateError> {
        Self::open_weighted(dir, limits, |_| 1)
    }

    /// Like `open`, but each message counts `weigh(payload)` against `max_messages`.
    pub fn open_weighted(
        dir: impl Into<PathBuf>,
        limits: SpoolLimits,
        weigh: fn(&[u8]) -> u64,
    ) -> Result<Self, StateError> {
        let dir = dir.into();
        let io_err = |e: io::Error| StateError::Io {
            path: dir.clone(),
            source: e,
        };
        fs::create_dir_all(&dir).map_err(io_err)?;
        let mut seqs = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err)? {
            let entry = entry.map_err(io_err)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(seq) = name
                .strip_suffix(".msg")
                .and_then(|s| s.parse::<u64>().ok())
            {
                seqs.push(seq);
            } else if name.starts_with('.') && name.contains(".tmp-") {
                // An interrupted write: the message was never acknowledged as spooled.
                let _ = fs::remove_file(entry.path());
            }
        }
        seqs.sort_unstable();
        let meta = read_meta(&dir);
        let mut spool = Self {
            dir,
            limits,
            index: VecDeque::new(),
            bytes: 0,
            weight: 0,
            weigh,
            next_seq: seqs
                .last()
                .map_or(meta.next_seq, |s| (s + 1).max(meta.next_seq)),
            dropped: meta.dropped,
            corrupt: meta.corrupt,
        };
        for seq in seqs {
            match spool.read_file(seq) {
                Ok(data) => {
                    let w = weigh(&data);
                    spool.index.push_back((seq, data.len() as u64, w));
                    spool.bytes += data.len() as u64;
                    spool.weight += w;
                }
                Err(reason) => spool.quarantine(seq, &reason),
            }
        }
        // Limits may have shrunk since the last run.
        spool.enforce_limits(0, 0)?;
        Ok(spool)
    }

    fn file(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}.msg"))
    }

    fn read_file(&self, seq: u64) -> Result<Vec<u8>, String> {
        let raw = fs::read(self.file(seq)).map_err(|e| e.to_string())?;
        decode(&raw)
    }

    fn quarantine(&mut self, seq: u64, reason: &str) {
        let from = self.file(seq);
        let to = self.dir.join(format!("{seq:020}.corrupt"));
        tracing::error!(file = %from.display(), %reason, "spooled message corrupt, moved aside");
        let _ = fs::rename(&from, &to);
        self.corrupt += 1;
        let _ = self.save_meta();
    }

    /// Append a message durably. Returns the weight (messages, points) dropped to make room.
    pub fn push(&mut self, data: &[u8]) -> Result<u64, StateError> {
        let len = data.len() as u64;
        let w = (self.weigh)(data);
        if len > self.limits.max_bytes || w > self.limits.max_messages as u64 {
            // A single message larger than the whole spool can never be kept; older ones stay.
            self.dropped += w;
            self.save_meta()?;
            tracing::warn!(len, "message larger than the spool bound dropped");
            return Ok(w);
        }
        let dropped = self.enforce_limits(len, w)?;
        let seq = self.next_seq;
        write_atomic(&self.file(seq), &encode(data), MODE_SECRET)?;
        self.next_seq += 1;
        self.index.push_back((seq, len, w));
        self.bytes += len;
        self.weight += w;
        Ok(dropped)
    }

    /// Drop oldest until one more message of `incoming` bytes and weight `incoming_w` fits.
    fn enforce_limits(&mut self, incoming: u64, incoming_w: u64) -> Result<u64, StateError> {
        let mut dropped = 0;
        while !self.index.is_empty()
            && (self.weight + incoming_w > self.limits.max_messages as u64
                || self.bytes + incoming > self.limits.max_bytes)
        {
            if let Some((seq, _, w)) = self.index.front().copied() {
                self.remove(seq)?;
                dropped += w;
            }
        }
        if dropped > 0 {
            self.dropped += dropped;
            self.save_meta()?;
            tracing::warn!(
                dropped,
                total_dropped = self.dropped,
                "spool full, oldest messages dropped"
            );
        }
        Ok(dropped)
    }

    /// The oldest `n` messages after `after` (exclusive), oldest first. A file that fails its
    /// checksum is moved aside, counted, and skipped.
    pub fn peek(&mut self, after: Option<u64>, n: usize) -> Vec<(u64, Vec<u8>)> {
        // The index is sorted by sequence: start right after `after` instead of scanning, so
        // draining a long backlog one message at a time stays linear.
        let start = after.map_or(0, |a| self.index.partition_point(|(s, _, _)| *s <= a));
        let seqs: Vec<u64> = self
            .index
            .range(start..)
            .map(|(s, _, _)| *s)
            .take(n)
            .collect();
        let mut out = Vec::with_capacity(seqs.len());
        for seq in seqs {
            match self.read_file(seq) {
                Ok(d) => out.push((seq, d)),
                Err(reason) => {
                    self.quarantine(seq, &reason);
                    if let Some(pos) = self.index.iter().position(|(s, _, _)| *s == seq)
                        && let Some((_, len, w)) = self.index.remove(pos)
                    {
                        self.bytes -= len;
                        self.weight -= w;
                    }
                }
            }
        }
        out
    }

    /// Forget a message (it was acknowledged, or dropped).
    pub fn remove(&mut self, seq: u64) -> Result<(), StateError> {
        if let Some(pos) = self.index.iter().position(|(s, _, _)| *s == seq) {
            if let Some((_, len, w)) = self.index.remove(pos) {
                self.bytes -= len;
                self.weight -= w;
            }
            let p = self.file(seq);
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(StateError::Io { path: p, source: e }),
            }
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Total weight held (equals `len()` for an unweighted spool).
    pub fn weight(&self) -> u64 {
        self.weight
    }

    /// Weights of the oldest messages, oldest first, without reading them.
    pub fn weights(&self) -> impl Iterator<Item = u64> + '_ {
        self.index.iter().map(|(_, _, w)| *w)
    }

    /// Weight (messages, points) dropped at the bound since the spool was created (persisted).
    pub fn dropped_total(&self) -> u64 {
        self.dropped
    }

    /// Messages found corrupt on disk (persisted).
    pub fn corrupt_total(&self) -> u64 {
        self.corrupt
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn save_meta(&self) -> Result<(), StateError> {
        let meta = format!(
            "{{\"dropped\":{},\"corrupt\":{},\"next_seq\":{}}}\n",
            self.dropped, self.corrupt, self.next_seq
        );
        write_atomic(&self.dir.join("meta.json"), meta.as_bytes(), MODE_SECRET)?;
        fsync_dir(&self.dir).map_err(|e| StateError::Io {
            path: self.dir.clone(),
            source: e,
        })
    }
}

#[derive(Default, serde::Deserialize)]
struct Meta {
    #[serde(default)]
    dropped: u64,
    #[serde(default)]
    corrupt: u64,
    #[serde(default)]
    next_seq: u64,
}

fn read_meta(dir: &Path) -> Meta {
    fs::read(dir.join("meta.json"))
        .ok()
        .and_then(|d| serde_json::from_slice(&d).ok())
        .unwrap_or_default()
}

fn encode(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + data.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(data);
    out
}

fn decode(raw: &[u8]) -> Result<Vec<u8>, String> {
    if raw.len() < HEADER || &raw[..4] != MAGIC {
        return Err("bad header".into());
    }
    let crc = u32::from_le_bytes([raw[4], raw[5], raw[6], raw[7]]);
    let len = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]) as usize;
    let body = &raw[HEADER..];
    if body.len() != len {
        return Err(format!("length {} != header {len}", body.len()));
    }
    if crc32fast::hash(body) != crc {
        return Err("checksum mismatch".into());
    }
    Ok(body.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(n: usize) -> SpoolLimits {
        SpoolLimits {
            max_messages: n,
            max_bytes: 1 << 20,
        }
    }

    #[test]
    fn fifo_survives_reopen() {
        let t = tempfile::tempdir().unwrap();
        let mut s = Spool::open(t.path(), limits(10)).unwrap();
        for i in 0..5 {
            s.push(format!("m{i}").as_bytes()).unwrap();
        }
        let first = s.peek(None, 2);
        s.remove(first[0].0).unwrap();
        drop(s);
        let mut s = Spool::open(t.path(), limits(10)).unwrap();
        let all: Vec<_> = s.peek(None, 10).into_iter().map(|(_, d)| d).collect();
        assert_eq!(
            all,
            vec![
                b"m1".to_vec(),
                b"m2".to_vec(),
                b"m3".to_vec(),
                b"m4".to_vec()
            ]
        );
        // sequence numbers keep growing after reopen
        s.push(b"m5").unwrap();
        let last = s.peek(None, 10).pop().unwrap();
        assert_eq!(last.1, b"m5");
        assert!(last.0 > first[1].0);
    }

    #[test]
    fn full_spool_drops_oldest_and_counts_persistently() {
        let t = tempfile::tempdir().unwrap();
        let mut s = Spool::open(t.path(), limits(3)).unwrap();
        let mut dropped = 0;
        for i in 0..10 {
            dropped += s.push(format!("m{i}").as_bytes()).unwrap();
        }
        assert_eq!(dropped, 7);
        assert_eq!(s.dropped_total(), 7);
        drop(s);
        let mut s = Spool::open(t.path(), limits(3)).unwrap();
        assert_eq!(s.dropped_total(), 7);
        let all: Vec<_> = s.peek(None, 10).into_iter().map(|(_, d)| d).collect();
        assert_eq!(all, vec![b"m7".to_vec(), b"m8".to_vec(), b"m9".to_vec()]);
    }

    #[test]
    fn byte_bound_is_enforced() {
        let t = tempfile::tempdir().unwrap();
        let mut s = Spool::open(
            t.path(),
            SpoolLimits {
                max_messages: 100,
                max_bytes: 10,
            },
        )
        .unwrap();
        s.push(b"aaaa").unwrap();
        s.push(b"bbbb").unwrap();
        assert_eq!(s.push(b"cccc").unwrap(), 1);
        assert!(s.bytes() <= 10);
        assert_eq!(
            s.push(&[0u8; 11]).unwrap(),
            1,
            "oversized message is dropped alone"
        );
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn corrupt_message_is_quarantined_not_sent() {
        let t = tempfile::tempdir().unwrap();
        let mut s = Spool::open(t.path(), limits(10)).unwrap();
        s.push(b"good1").unwrap();
        s.push(b"good2").unwrap();
        let seq = s.peek(None, 1)[0].0;
        let f = s.file(seq);
        let mut raw = fs::read(&f).unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 0xff;
        fs::write(&f, raw).unwrap();
        drop(s);
        let mut s = Spool::open(t.path(), limits(10)).unwrap();
        assert_eq!(s.corrupt_total(), 1);
        let all: Vec<_> = s.peek(None, 10).into_iter().map(|(_, d)| d).collect();
        assert_eq!(all, vec![b"good2".to_vec()]);
    }

    #[test]
    fn weighted_spool_bounds_total_weight() {
        let t = tempfile::tempdir().unwrap();
        let lines = |d: &[u8]| d.iter().filter(|b| **b == b'\n').count() as u64;
        let mut s = Spool::open_weighted(t.path(), limits(5), lines).unwrap();
        assert_eq!(s.push(b"a\nb\n").unwrap(), 0);
        assert_eq!(s.push(b"c\nd\n").unwrap(), 0);
        assert_eq!(s.push(b"e\nf\n").unwrap(), 2, "oldest two points dropped");
        assert_eq!(s.weight(), 4);
        assert_eq!(s.push(b"1\n2\n3\n4\n5\n6\n").unwrap(), 6, "too heavy alone");
        drop(s);
        let s = Spool::open_weighted(t.path(), limits(5), lines).unwrap();
        assert_eq!((s.weight(), s.dropped_total()), (4, 8));
    }
}

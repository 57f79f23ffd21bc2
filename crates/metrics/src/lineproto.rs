//! InfluxDB line protocol, escaped exactly as Telegraf's serializer does.
//!
//! Written here rather than with the `influxdb-line-protocol` crate: that crate's builder is a
//! typestate chain that cannot take a runtime list of fields, pulls in nom and snafu, writes
//! `u64` with the `u` suffix that InfluxDB 1.x rejects ("invalid number"), and leaves newlines in
//! tag values unescaped. The rules are short and fully covered by the tests below and by
//! `tests/tests/metrics.rs` against a real InfluxDB.

use std::borrow::Cow;
use std::fmt::Write;

/// A field value with the line-protocol type InfluxDB pins per field on first write.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Written with the `i` suffix.
    Int(i64),
    /// Written without a suffix (`0` is a float).
    Float(f64),
    Str(String),
}

impl Value {
    /// Kernel counters are u64; InfluxDB 1.x has no unsigned type, so clamp as Telegraf does.
    pub fn uint(v: u64) -> Self {
        Value::Int(i64::try_from(v).unwrap_or(i64::MAX))
    }
}

pub type Key = Cow<'static, str>;

/// One line: measurement, tags (besides the global ones) and fields.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub measurement: &'static str,
    pub tags: Vec<(Key, String)>,
    pub fields: Vec<(Key, Value)>,
}

impl Point {
    pub fn new(measurement: &'static str) -> Self {
        // Sized for most of Telegraf's measurements, so filling a point rarely reallocates.
        Self {
            measurement,
            tags: Vec::with_capacity(4),
            fields: Vec::with_capacity(12),
        }
    }

    pub fn tag(mut self, k: impl Into<Key>, v: impl Into<String>) -> Self {
        self.tags.push((k.into(), v.into()));
        self
    }

    pub fn int(&mut self, k: &'static str, v: i64) {
        self.fields.push((Cow::Borrowed(k), Value::Int(v)));
    }

    pub fn uint(&mut self, k: &'static str, v: u64) {
        self.fields.push((Cow::Borrowed(k), Value::uint(v)));
    }

    pub fn float(&mut self, k: &'static str, v: f64) {
        self.fields.push((Cow::Borrowed(k), Value::Float(v)));
    }

    pub fn field(&mut self, k: impl Into<Key>, v: Value) {
        self.fields.push((k.into(), v));
    }
}

pub use thingsly_core::config::Precision;

fn divisor(p: Precision) -> i128 {
    p.unit().as_nanos() as i128
}

/// Turns points into lines with the global tags (`host`, configured ones) merged in.
#[derive(Debug, Clone)]
pub struct Encoder {
    global_tags: Vec<(String, String)>,
    precision: Precision,
}

impl Encoder {
    pub fn new(
        global_tags: impl IntoIterator<Item = (String, String)>,
        precision: Precision,
    ) -> Self {
        let mut global_tags: Vec<_> = global_tags.into_iter().collect();
        global_tags.sort();
        Self {
            global_tags,
            precision,
        }
    }

    /// Append one line (with its `\n`) to `out`. A point left without fields is skipped, as
    /// InfluxDB would refuse it. Returns whether a line was written.
    pub fn encode(&self, out: &mut String, p: &Point, unix_ns: i128) -> bool {
        let fields_ok = p.fields.iter().any(|(k, v)| !k.is_empty() && writable(v));
        if !fields_ok || p.measurement.is_empty() {
            return false;
        }
        escape_into(out, p.measurement, MEASUREMENT);
        // Merge point tags and global tags sorted by key; the point's own tag wins a clash.
        let mut tags: Vec<(&str, &str)> = p
            .tags
            .iter()
            .map(|(k, v)| (k.as_ref(), v.as_str()))
            .chain(
                self.global_tags
                    .iter()
                    .filter(|(k, _)| !p.tags.iter().any(|(pk, _)| pk == k))
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            )
            .collect();
        tags.sort_by(|a, b| a.0.cmp(b.0));
        for (k, v) in tags {
            // Telegraf drops tags that are empty or end in a backslash (they cannot be escaped).
            if k.is_empty() || v.is_empty() || k.ends_with('\\') || v.ends_with('\\') {
                continue;
            }
            out.push(',');
            escape_into(out, k, TAG);
            out.push('=');
            escape_into(out, v, TAG);
        }
        let mut sep = ' ';
        for (k, v) in &p.fields {
            if k.is_empty() || !writable(v) {
                continue;
            }
            out.push(sep);
            sep = ',';
            escape_into(out, k, TAG);
            out.push('=');
            match v {
                Value::Int(i) => {
                    let _ = write!(out, "{i}i");
                }
                // Rust's Display never uses an exponent and round-trips exactly.
                Value::Float(f) => {
                    let _ = write!(out, "{f}");
                }
                Value::Str(s) => {
                    out.push('"');
                    for c in s.chars() {
                        if c == '"' || c == '\\' {
                            out.push('\\');
                        }
                        out.push(c);
                    }
                    out.push('"');
                }
            }
        }
        let _ = writeln!(out, " {}", unix_ns / divisor(self.precision));
        true
    }
}

fn writable(v: &Value) -> bool {
    match v {
        Value::Float(f) => f.is_finite(),
        _ => true,
    }
}

const MEASUREMENT: bool = false;
const TAG: bool = true;

/// Measurement names escape `,` and space; tag keys, tag values and field keys also `=`.
/// Newline, tab, CR and form feed are written as `\n`, `\t`, `\r`, `\f` (they would end or
/// split the line otherwise), as Telegraf's escaper does.
fn escape_into(out: &mut String, s: &str, tag: bool) {
    for c in s.chars() {
        match c {
            ',' | ' ' => {
                out.push('\\');
                out.push(c);
            }
            '=' if tag => out.push_str("\\="),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '\u{0c}' => out.push_str("\\f"),
            _ => out.push(c),
        }
    }
}

/// Points in a chunk of line protocol (one per line).
pub fn count_lines(chunk: &[u8]) -> u64 {
    chunk.iter().filter(|b| **b == b'\n').count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc() -> Encoder {
        Encoder::new([("host".to_string(), "dev-1".to_string())], Precision::S)
    }

    fn line(p: &Point) -> String {
        let mut s = String::new();
        enc().encode(&mut s, p, 1_795_342_706_123_456_789);
        s
    }

    #[test]
    fn types_and_tag_order() {
        let mut p = Point::new("cpu").tag("cpu", "cpu-total");
        p.float("usage_idle", 82.38);
        p.float("usage_user", 0.0);
        p.int("n", -3);
        p.uint("big", u64::MAX);
        p.field("uptime_format", Value::Str("14 days, 11:07".into()));
        assert_eq!(
            line(&p),
            "cpu,cpu=cpu-total,host=dev-1 usage_idle=82.38,usage_user=0,n=-3i,big=9223372036854775807i,uptime_format=\"14 days, 11:07\" 1795342706\n"
        );
    }

    #[test]
    fn escaping_matches_telegraf() {
        let mut p = Point::new("we ird,m=x")
            .tag("pa th", "/mnt/a b,c=d")
            .tag("if", "a\nb\tc");
        p.field("f k=", Value::Str("say \"hi\" \\ back\nslash".into()));
        assert_eq!(
            line(&p),
            "we\\ ird\\,m=x,host=dev-1,if=a\\nb\\tc,pa\\ th=/mnt/a\\ b\\,c\\=d f\\ k\\==\"say \\\"hi\\\" \\\\ back\nslash\" 1795342706\n"
        );
    }

    #[test]
    fn point_tag_wins_and_bad_tags_and_values_skipped() {
        let mut p = Point::new("m")
            .tag("host", "other")
            .tag("empty", "")
            .tag("bs", "ends\\");
        p.float("nan", f64::NAN);
        p.float("ok", 1.5e-7);
        assert_eq!(line(&p), "m,host=other ok=0.00000015 1795342706\n");
        let mut only_nan = Point::new("m");
        only_nan.float("x", f64::INFINITY);
        assert_eq!(line(&only_nan), "");
    }

    #[test]
    fn precision_truncates() {
        let mut p = Point::new("m");
        p.int("x", 1);
        let mut s = String::new();
        Encoder::new([], Precision::Ms).encode(&mut s, &p, 1_795_342_706_123_456_789);
        assert_eq!(s, "m x=1i 1795342706123\n");
        assert_eq!(count_lines(s.as_bytes()), 1);
    }
}

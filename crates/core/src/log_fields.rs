//! Log lines that a client cannot forge: every field value (the message included) has its
//! control characters escaped before it is written, so a device id, a token header or an
//! error text carrying `\n` cannot start a line of its own (a fake `audit:` record) and a
//! `\r` or an escape sequence cannot rewrite what a terminal shows. tracing-subscriber itself
//! strips ANSI escapes only.

use std::fmt;
use tracing::field::{Field, Visit};
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::{DefaultVisitor, Writer};

/// `tracing_subscriber::fmt().fmt_fields(EscapedFields)`: the default field format, escaped.
#[derive(Debug, Clone, Copy, Default)]
pub struct EscapedFields;

impl<'a> MakeVisitor<Writer<'a>> for EscapedFields {
    type Visitor = EscapingVisitor<'a>;
    fn make_visitor(&self, target: Writer<'a>) -> Self::Visitor {
        EscapingVisitor(DefaultVisitor::new(target, true))
    }
}

pub struct EscapingVisitor<'a>(DefaultVisitor<'a>);

/// `s` with every control character (and the Unicode line/paragraph separators) written as
/// an escape; everything else unchanged.
pub fn escape_control(s: &str) -> std::borrow::Cow<'_, str> {
    let needs = |c: char| c.is_control() || c == '\u{2028}' || c == '\u{2029}';
    if !s.chars().any(needs) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Formats the inner value as it would be, then escapes the result.
struct Escaped<'v>(&'v dyn fmt::Debug);

impl fmt::Debug for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let raw = format!("{:?}", self.0);
        f.write_str(&escape_control(&raw))
    }
}

impl Visit for EscapingVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.record_str(field, &escape_control(value));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let mut text = value.to_string();
        let mut source = value.source();
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        self.0
            .record_debug(field, &format_args!("{}", escape_control(&text)));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.record_debug(field, &Escaped(value));
    }
}

impl VisitOutput<fmt::Result> for EscapingVisitor<'_> {
    fn finish(self) -> fmt::Result {
        self.0.finish()
    }
}

impl VisitFmt for EscapingVisitor<'_> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        self.0.writer()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    #[allow(clippy::unwrap_used)]
    fn values_from_outside_cannot_start_a_line() {
        let buf = Buf::default();
        let w = buf.clone();
        let sub = tracing_subscriber::fmt()
            .fmt_fields(EscapedFields)
            .with_writer(move || w.clone())
            .with_ansi(false)
            .without_time()
            .finish();
        let evil = "x\n2026-12-02T00:00:00Z INFO audit: device revoked device=victim\r\u{1b}[2K";
        tracing::subscriber::with_default(sub, || {
            tracing::info!(target: "audit", id = %evil, dbg = ?evil, "seen {}", evil);
            let e = std::io::Error::other(evil.to_string());
            tracing::warn!(error = &e as &(dyn std::error::Error + 'static), "failed");
        });
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(out.lines().count(), 2, "{out}");
        assert!(!out.contains('\r') && !out.contains('\u{1b}'), "{out}");
        assert!(out.contains("x\\n2026"), "{out}");
        assert_eq!(escape_control("plain id-1"), "plain id-1");
        assert_eq!(escape_control("a\u{2028}b\u{7}"), "a\\u{2028}b\\u{7}");
    }
}

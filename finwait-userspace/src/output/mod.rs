//! Output as sinks, one per mode behind one interface (as ripgrep's printers): [`human`] lines
//! that state the answer in words, [`json`] lines that are the documented contract. Every
//! kind of output (start, snapshot, reports, `--stuck`, summary, stats) goes through a sink.
use std::io::{self, Write};

use bytes::{BufMut, BytesMut};

use crate::{
    model::{Report, Stuck, Verdict, summary::Summary},
    snapshot::Snapshot,
};

mod detail_table;
pub(crate) mod endpoint;
pub(crate) mod health;
pub(crate) mod human;
pub(crate) mod json;
pub(crate) mod metrics;
mod stuck_groups;
pub(crate) mod top;
pub(crate) mod wire;

pub(crate) use health::{Start, Stats};

/// Where finwait's findings go.
pub(crate) trait Sink {
    /// The programs are attached: what runs, and how.
    fn start(&mut self, s: &Start) -> io::Result<()>;
    /// The sockets on the close path now; `detail`: one line each, besides the summary.
    fn snapshot(&mut self, snap: &Snapshot, detail: bool) -> io::Result<()>;
    /// One live report, with its verdict (decided once, by the pipeline).
    fn report(&mut self, r: &Report, verdict: Option<&Verdict>) -> io::Result<()>;
    /// A socket still half-closed or in CLOSE_WAIT past `--stuck`.
    fn stuck(&mut self, s: &Stuck) -> io::Result<()>;
    /// What the session found, per process.
    fn summary(&mut self, s: &Summary, now_ns: u64) -> io::Result<()>;
    /// The counters, at exit.
    fn stats(&mut self, s: &Stats) -> io::Result<()>;
    /// The counters, every second while tracing (for sinks that keep them current).
    fn health(&mut self, _s: &Stats) -> io::Result<()> {
        Ok(())
    }
    /// What was already stuck is counted (the start-up inventory, or none was asked for).
    fn ready(&mut self) {}
    fn flush(&mut self) -> io::Result<()>;
}

/// The sink `--json` asks for, on stdout; with `summary_only`, without the live reports.
pub(crate) fn for_stdout(json: bool, style: human::Style, summary_only: bool) -> Box<dyn Sink> {
    let out = Out::new(Box::new(io::stdout().lock()));
    let sink: Box<dyn Sink> = if json {
        Box::new(json::JsonSink::new(out))
    } else {
        Box::new(human::HumanSink::new(out, style))
    };
    if summary_only {
        Box::new(SummaryOnly(sink))
    } else {
        sink
    }
}

/// Every sink gets everything (stdout and the metrics endpoint, side by side).
pub(crate) struct Tee(pub(crate) Vec<Box<dyn Sink>>);

impl Sink for Tee {
    fn start(&mut self, s: &Start) -> io::Result<()> {
        self.0.iter_mut().try_for_each(|k| k.start(s))
    }
    fn snapshot(&mut self, snap: &Snapshot, detail: bool) -> io::Result<()> {
        self.0.iter_mut().try_for_each(|k| k.snapshot(snap, detail))
    }
    fn report(&mut self, r: &Report, verdict: Option<&Verdict>) -> io::Result<()> {
        self.0.iter_mut().try_for_each(|k| k.report(r, verdict))
    }
    fn stuck(&mut self, s: &Stuck) -> io::Result<()> {
        self.0.iter_mut().try_for_each(|k| k.stuck(s))
    }
    fn summary(&mut self, s: &Summary, now_ns: u64) -> io::Result<()> {
        self.0.iter_mut().try_for_each(|k| k.summary(s, now_ns))
    }
    fn stats(&mut self, s: &Stats) -> io::Result<()> {
        self.0.iter_mut().try_for_each(|k| k.stats(s))
    }
    fn health(&mut self, s: &Stats) -> io::Result<()> {
        self.0.iter_mut().try_for_each(|k| k.health(s))
    }
    fn ready(&mut self) {
        self.0.iter_mut().for_each(|k| k.ready());
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.iter_mut().try_for_each(|k| k.flush())
    }
}

/// `--summary-only`: a sink without the live reports.
struct SummaryOnly(Box<dyn Sink>);

impl Sink for SummaryOnly {
    fn start(&mut self, s: &Start) -> io::Result<()> {
        self.0.start(s)
    }
    fn snapshot(&mut self, snap: &Snapshot, detail: bool) -> io::Result<()> {
        self.0.snapshot(snap, detail)
    }
    fn report(&mut self, _r: &Report, _verdict: Option<&Verdict>) -> io::Result<()> {
        Ok(())
    }
    fn stuck(&mut self, s: &Stuck) -> io::Result<()> {
        self.0.stuck(s)
    }
    fn summary(&mut self, s: &Summary, now_ns: u64) -> io::Result<()> {
        self.0.summary(s, now_ns)
    }
    fn stats(&mut self, s: &Stats) -> io::Result<()> {
        self.0.stats(s)
    }
    fn ready(&mut self) {
        self.0.ready();
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// Lines gathered in one buffer and written in large pieces (a busy host makes thousands a
/// second).
pub(crate) struct Out {
    buf: BytesMut,
    w: Box<dyn Write>,
}

/// Written out once this much is gathered (and at every flush).
const OUT_CHUNK: usize = 64 * 1024;

impl Out {
    pub(crate) fn new(w: Box<dyn Write>) -> Self {
        Self {
            buf: BytesMut::with_capacity(OUT_CHUNK),
            w,
        }
    }

    /// One line (the newline is added).
    pub(crate) fn line(&mut self, text: &str) -> io::Result<()> {
        self.buf.put_slice(text.as_bytes());
        self.end_line()
    }

    /// One JSON object on a line.
    pub(crate) fn json_line(&mut self, v: &impl serde::Serialize) -> io::Result<()> {
        let mut json = serde_json::Serializer::with_formatter((&mut self.buf).writer(), SafeJson);
        v.serialize(&mut json)?;
        self.end_line()
    }

    fn end_line(&mut self) -> io::Result<()> {
        self.buf.put_u8(b'\n');
        if self.buf.len() >= OUT_CHUNK {
            self.write_out()?;
        }
        Ok(())
    }

    fn write_out(&mut self) -> io::Result<()> {
        self.w.write_all(&self.buf)?;
        self.buf.clear();
        Ok(())
    }

    pub(crate) fn flush(&mut self) -> io::Result<()> {
        self.write_out()?;
        self.w.flush()
    }
}

/// serde_json's compact format, with what could make a string lie (bidirectional controls,
/// invisible characters, U+2028/2029, which some readers split lines at) written as `\uXXXX`
/// escapes: no such character reaches the output raw, and a JSON reader gets it back exactly.
/// (serde_json already escapes the control characters.)
pub(crate) struct SafeJson;

impl serde_json::ser::Formatter for SafeJson {
    fn write_string_fragment<W: ?Sized + Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        let mut from = 0;
        for (at, c) in fragment.char_indices() {
            if crate::model::escape::must_escape(c) {
                w.write_all(&fragment.as_bytes()[from..at])?;
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    write!(w, "\\u{u:04x}")?;
                }
                from = at + c.len_utf8();
            }
        }
        w.write_all(&fragment.as_bytes()[from..])
    }
}

#[cfg(test)]
mod tests {
    /// A name that could reorder, hide or split a line reaches the JSON bytes as escapes only,
    /// and a reader gets it back exactly.
    #[test]
    fn json_escapes_what_could_lie_and_keeps_the_name() {
        let name = "a\u{202e}b\u{200b}\u{2028}\u{e0041}\x1b\\é";
        let mut out = Vec::new();
        let mut json = serde_json::Serializer::with_formatter(&mut out, super::SafeJson);
        serde::Serialize::serialize(&name, &mut json).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text, r#""a\u202eb\u200b\u2028\udb40\udc41\u001b\\é""#,
            "{text}"
        );
        assert_eq!(serde_json::from_str::<String>(&text).unwrap(), name);
    }
}

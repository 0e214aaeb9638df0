//! The human sink: one line per report that states the answer in words, with the time, the
//! states (coloured on a terminal) and the connection; wrapped to the terminal's width.
use std::fmt::Write as _;

use finwait_common::{Call, TcpState};

use super::{Out, Sink, Start, Stats, detail_table, stuck_groups};
use crate::{
    host::clock::Clock,
    model::{
        Cause, CauseKind, CloseNoFinReport, Dur, Fw2Exit, Report, Stuck, TransitionKind,
        TransitionReport, Verdict, container,
        summary::{Histogram, Summary},
    },
    snapshot::Snapshot,
};

/// Width of the time column (`   12.345` or `12:34:56.789`).
const TIME_WIDTH: usize = 12;

/// How human lines look: colour only on a terminal (and never with NO_COLOR), times relative to
/// the start unless `--timestamp` asks for the wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Style {
    pub(crate) color: bool,
    /// Some(start): seconds since then; None: wall-clock time of day.
    pub(crate) relative_to: Option<u64>,
    /// On a terminal: its width; a report longer than that continues on indented lines. Piped
    /// output keeps one line per report, for grep.
    pub(crate) width: Option<usize>,
}

/// The terminal's width (TIOCGWINSZ on stdout), 80 when it does not say.
fn terminal_width() -> usize {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes a winsize into the pointer we pass.
    let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0;
    if ok && ws.ws_col >= 40 {
        ws.ws_col as usize
    } else {
        80
    }
}

impl Style {
    pub(crate) fn for_stdout(wall_clock: bool, start_ns: u64) -> Self {
        use std::io::IsTerminal;
        let tty = std::io::stdout().is_terminal();
        let color = tty && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
        Self {
            color,
            relative_to: (!wall_clock).then_some(start_ns),
            width: tty.then(terminal_width),
        }
    }

    /// `head` then `text`, on one line when it fits the terminal, else `text` wrapped below
    /// `head`, indented past the time column. `head_width` is `head` without colour codes.
    fn fit(&self, head: &str, head_width: usize, text: &str, out: &mut String) {
        match self.width {
            Some(width) if head_width + 1 + text.len() > width => {
                let indent = " ".repeat(TIME_WIDTH + 1);
                let opts = textwrap::Options::new(width.max(TIME_WIDTH + 21))
                    .initial_indent(&indent)
                    .subsequent_indent(&indent);
                let _ = write!(out, "{}\n{}", head.trim_end(), textwrap::fill(text, opts));
            }
            _ => {
                out.push_str(head);
                out.push(' ');
                out.push_str(text);
            }
        }
    }

    /// A block's line, indented two columns; on a terminal wrapped to its width, the
    /// continuation indented two more.
    fn indented(&self, text: &str) -> String {
        match self.width {
            Some(width) if text.len() + 2 > width => {
                let opts = textwrap::Options::new(width)
                    .initial_indent("  ")
                    .subsequent_indent("    ");
                textwrap::fill(text, opts)
            }
            _ => format!("  {text}"),
        }
    }

    fn write_time(&self, out: &mut String, clock: &Clock, ts_ns: u64) {
        let Some(start) = self.relative_to else {
            let t = humantime::format_rfc3339_millis(clock.wall(ts_ns)).to_string();
            out.push_str(t.get(11..23).unwrap_or(&t));
            return;
        };
        // Seconds with milliseconds, right-aligned: integers, no floats, no fmt.
        let ms = ts_ns.saturating_sub(start) / 1_000_000;
        let mut secs = itoa::Buffer::new();
        let secs = secs.format(ms / 1000);
        out.extend(std::iter::repeat_n(
            ' ',
            (TIME_WIDTH - 4).saturating_sub(secs.len()),
        ));
        out.push_str(secs);
        let frac = ms % 1000;
        out.push('.');
        out.push(char::from(b'0' + (frac / 100) as u8));
        out.push(char::from(b'0' + (frac / 10 % 10) as u8));
        out.push(char::from(b'0' + (frac % 10) as u8));
    }

    /// `s`, coloured by whose job the socket is (`v`): what a process must close stands out,
    /// what the kernel frees (or is over) is dim; no verdict, no colour.
    fn write_state(&self, out: &mut String, s: TcpState, width: usize, v: Option<&Verdict>) {
        let code = if self.color { tone(v) } else { "" };
        if !code.is_empty() {
            let _ = write!(out, "\x1b[{code}m");
        }
        let name = s.name();
        out.push_str(name);
        out.extend(std::iter::repeat_n(' ', width.saturating_sub(name.len())));
        if !code.is_empty() {
            out.push_str("\x1b[0m");
        }
    }
}

/// The colour of a verdict (SGR codes): bold red where a process must act, dim where the
/// kernel frees the socket or nothing is left to do, yellow where it cannot be known.
fn tone(v: Option<&Verdict>) -> &'static str {
    match v {
        Some(Verdict::ApplicationMustClose(_) | Verdict::OwnerMustClose(_)) => "1;31",
        Some(Verdict::KernelFrees(_) | Verdict::Done) => "2",
        Some(Verdict::Unknown) => "33",
        None => "",
    }
}

/// `ip:port` (IPv4 without `core::fmt`: this runs for every line).
fn push_addr(out: &mut String, ip: std::net::IpAddr, port: u16) {
    let mut n = itoa::Buffer::new();
    match ip {
        std::net::IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                out.push_str(n.format(*octet));
            }
        }
        v6 => {
            let _ = write!(out, "{v6}");
        }
    }
    out.push(':');
    out.push_str(n.format(port));
}

/// The call and the task that made it, e.g. `shutdown(SHUT_WR) from nginx[12/13] fd 9`.
fn write_who(out: &mut String, c: &Cause) {
    match (c.kind, c.how) {
        (CauseKind::Call(Call::Shutdown), Some(_)) | (CauseKind::Exit, _) => {
            let _ = write!(out, "{}", c.call_name());
        }
        (k @ CauseKind::Call(_), _) => {
            out.push_str(k.name());
            out.push_str("()");
        }
        (k, _) => out.push_str(k.name()),
    }
    let Some(t) = &c.task else { return };
    let mut n = itoa::Buffer::new();
    match c.fd {
        Some(fd) => {
            // The common case, on every line: no core::fmt.
            out.push_str(" from ");
            out.push_str(&t.comm);
            out.push('[');
            out.push_str(n.format(t.pid));
            out.push('/');
            out.push_str(n.format(t.tid));
            out.push(']');
            write_thread(out, t);
            container::write_short(out, t.container.as_deref());
            out.push_str(" fd ");
            out.push_str(n.format(fd));
        }
        // Only the kernel hook saw it: no syscall of ours carried an fd (io_uring, ...).
        None if c.exact && matches!(c.kind, CauseKind::Call(_)) => {
            let _ = write!(
                out,
                " of {}[{}/{}] (in the kernel, not a close/shutdown syscall: io_uring?)",
                t.comm, t.pid, t.tid
            );
            write_thread(out, t);
        }
        None => {
            let _ = write!(out, " of {}[{}/{}]", t.comm, t.pid, t.tid);
            write_thread(out, t);
        }
    }
}

/// The calling thread's own name, said as the thread's, where it is not its process's.
fn write_thread(out: &mut String, t: &crate::model::Task) {
    if let Some(name) = &t.thread_comm {
        out.push_str(" (thread ");
        out.push_str(name);
        out.push(')');
    }
}

/// The answer in words for one transition.
#[cfg(test)]
pub(crate) fn explain(t: &TransitionReport) -> String {
    let mut out = String::new();
    write_explain(&mut out, t, t.verdict().as_ref());
    out
}

/// What caused the transition, then whose job the socket is (the verdict's words) where that is
/// the point of the line.
fn write_explain(out: &mut String, t: &TransitionReport, verdict: Option<&Verdict>) {
    let unknown = Cause::unknown();
    let cause = t.cause.as_ref().unwrap_or(&unknown);
    let whose = |out: &mut String| {
        if let Some(v) = verdict {
            out.push_str("; ");
            v.write_clause(out);
        }
    };
    match t.kind {
        TransitionKind::FinSent => {
            out.push_str("FIN sent by ");
            write_who(out, cause);
        }
        TransitionKind::FinWait2Entered => {
            let half = t.orphan == Some(false);
            out.push_str(if half {
                "half-closed by "
            } else {
                "orphaned by "
            });
            write_who(out, cause);
            whose(out);
        }
        TransitionKind::PeerFin => {
            out.push_str("peer sent FIN");
            whose(out);
        }
        TransitionKind::CloseWaitClosed => {
            out.push_str("closed by ");
            write_who(out, cause);
            if let Some(n) = t.close_wait_ns {
                let at_least = if t.at_least { "at least " } else { "" };
                let _ = write!(out, " after {at_least}{} in CLOSE_WAIT", Dur::tenths(n));
            }
        }
        TransitionKind::FinWait2Left => write_fin_wait2_exit(out, t, cause, verdict),
        TransitionKind::LastAckDone => {
            out.push_str("peer acknowledged our FIN (");
            write_who(out, cause);
            out.push_str("); socket freed");
        }
        TransitionKind::ClosingDone | TransitionKind::Aborted => {
            out.push_str("closed by ");
            write_who(out, cause);
        }
        TransitionKind::FinsCrossed | TransitionKind::Other => write_who(out, cause),
    }
}

/// FIN_WAIT2 -> CLOSE: the tracepoint says CLOSE for several different ends.
fn write_fin_wait2_exit(
    out: &mut String,
    t: &TransitionReport,
    cause: &Cause,
    verdict: Option<&Verdict>,
) {
    match t.fw2_exit {
        Some(Fw2Exit::TimeWait) => out.push_str("peer's FIN arrived: now TIME_WAIT"),
        Some(Fw2Exit::OrphanTimewait) => {
            out.push_str("orphaned by ");
            write_who(out, cause);
            if let Some(n) = t.half_closed_ns {
                let _ = write!(out, " after {} half-closed", Dur::tenths(n));
            }
            out.push_str("; `ss` still lists it as FIN-WAIT-2 (ino 0)");
            if let Some(v) = verdict {
                out.push_str("; ");
                v.write_clause(out);
            }
        }
        Some(Fw2Exit::Reset) if t.orphan_timed_out() => {
            let _ = write!(
                out,
                "orphan timed out: tcp_fin_timeout ({} s) passed without the peer's FIN; the kernel reset and freed it",
                t.fin_timeout_s
            );
        }
        Some(Fw2Exit::Reset) => {
            out.push_str("reset (");
            write_who(out, cause);
            out.push(')');
        }
        _ => {
            out.push_str("left FIN_WAIT2 (");
            write_who(out, cause);
            out.push(')');
        }
    }
}

/// Buffers a human line is built in, reused from line to line (no allocation once grown).
#[derive(Default)]
struct LineBuf {
    head: String,
    text: String,
    line: String,
}

impl LineBuf {
    fn clear(&mut self) {
        self.head.clear();
        self.text.clear();
        self.line.clear();
    }
}

/// Renders a transition into `b.line`.
fn write_transition(
    b: &mut LineBuf,
    t: &TransitionReport,
    verdict: Option<&Verdict>,
    clock: &Clock,
    style: &Style,
) {
    style.write_time(&mut b.head, clock, t.ts_ns);
    b.head.push(' ');
    style.write_state(&mut b.head, t.old, 11, None);
    b.head.push_str(" -> ");
    style.write_state(&mut b.head, t.effective_new(), 11, verdict);
    b.head.push(' ');
    // 12 + 1 + 11 + 4 + 11 + 1 + 31 = 71 columns before the explanation.
    let start = b.head.len();
    push_addr(&mut b.head, t.ends.local, t.ends.lport);
    b.head.push_str(" > ");
    push_addr(&mut b.head, t.ends.remote, t.ends.rport);
    let conn = b.head.len() - start;
    b.head
        .extend(std::iter::repeat_n(' ', 31usize.saturating_sub(conn)));
    let head_width = TIME_WIDTH + 28 + conn.max(31);
    write_explain(&mut b.text, t, verdict);
    style.fit(&b.head, head_width, &b.text, &mut b.line);
}

/// Renders a close without FIN into `b.line`.
fn write_close_no_fin(b: &mut LineBuf, n: &CloseNoFinReport, clock: &Clock, style: &Style) {
    let _ = write!(
        b.text,
        "{}() from {}[{}/{}]",
        CauseKind::Call(n.call).name(),
        n.task.comm,
        n.task.pid,
        n.task.tid,
    );
    write_thread(&mut b.text, &n.task);
    let _ = write!(
        b.text,
        " fd {} sent no FIN: the socket is still held by ",
        n.fd
    );
    if n.holders.is_empty() {
        b.text.push_str("other references");
    }
    for (i, o) in n.holders.iter().enumerate() {
        let sep = if i > 0 { ", " } else { "" };
        let _ = write!(b.text, "{sep}{}[{}] fd {}", o.comm, o.pid, o.fd);
    }
    style.write_time(&mut b.head, clock, n.ts_ns);
    style.fit(&b.head, b.head.len(), &b.text, &mut b.line);
}

/// The sockets open the longest, those of one process in one state on one line (their fds
/// as ranges, the age of the oldest).
fn longest_lines(longest: &[crate::model::summary::Longest]) -> Vec<String> {
    let mut groups: Vec<(&crate::model::summary::Longest, Vec<i32>, usize)> = Vec::new();
    for l in longest {
        match groups.iter_mut().find(|(g, _, _)| {
            (g.pid, &g.what, g.ends.local, g.ends.lport)
                == (l.pid, &l.what, l.ends.local, l.ends.lport)
        }) {
            Some((_, fds, n)) => {
                fds.extend(l.fd);
                *n += 1;
            }
            None => groups.push((l, l.fd.into_iter().collect(), 1)),
        }
    }
    groups
        .into_iter()
        .map(|(l, mut fds, n)| {
            let secs = l.age_ns as f64 / 1e9;
            let at_least = if l.at_least { "at least " } else { "" };
            let e = &l.ends;
            if n == 1 {
                let fd = l.fd.map(|fd| format!(" fd {fd}")).unwrap_or_default();
                return format!(
                    "    {} {}[{}]{fd} {}:{} > {}:{} for {at_least}{secs:.1} s",
                    l.what, l.comm, l.pid, e.local, e.lport, e.remote, e.rport
                );
            }
            fds.sort_unstable();
            format!(
                "    {n} x {} {}[{}] fds {} on {}:{} for {at_least}{secs:.1} s",
                l.what,
                l.comm,
                l.pid,
                stuck_groups::fd_ranges(&fds, 4),
                e.local,
                e.lport
            )
        })
        .collect()
}

/// A histogram as bars of `#`, the longest 40 wide.
fn histogram_lines(h: &Histogram) -> impl Iterator<Item = String> + '_ {
    let max = h.buckets().map(|(_, n)| n).max().unwrap_or(0).max(1);
    h.buckets().map(move |(below_ms, n)| {
        let label = if below_ms == 1 {
            "<1 ms".to_string()
        } else {
            format!("<{below_ms} ms")
        };
        let bar = "#".repeat((n * 40).div_ceil(max) as usize);
        format!("    {label:>10} {n:>7} {bar}")
    })
}

/// The human sink.
pub(crate) struct HumanSink {
    out: Out,
    clock: Clock,
    style: Style,
    line: LineBuf,
    /// This check's `--stuck` reports, written grouped at the next flush.
    stuck: Vec<Stuck>,
}

/// Stuck reports held for grouping at most (a larger check is written in parts).
const MAX_PENDING_STUCK: usize = 100_000;

impl HumanSink {
    pub(crate) fn new(out: Out, style: Style) -> Self {
        Self {
            out,
            clock: Clock::new(),
            style,
            line: LineBuf::default(),
            stuck: Vec::new(),
        }
    }

    /// The pending `--stuck` reports, one line per group of sockets like each other.
    fn write_stuck(&mut self) -> std::io::Result<()> {
        let pending = std::mem::take(&mut self.stuck);
        let mut time = String::new();
        self.style
            .write_time(&mut time, &self.clock, crate::host::clock::monotonic_ns());
        for g in stuck_groups::group(&pending) {
            let (head, text) = stuck_line(&g, &time);
            let mut line = String::new();
            self.style.fit(&head, head.len(), &text, &mut line);
            self.out.line(&line)?;
        }
        Ok(())
    }
}

/// A group's line: the head (time, STUCK, how many and where) and the words (whose job, what
/// the owner does about it).
fn stuck_line(g: &stuck_groups::Group<'_>, time: &str) -> (String, String) {
    let s = g.first;
    let at_least = if g.at_least { "at least " } else { "" };
    let who = format!("{}[{}]", s.holder.comm, s.holder.pid);
    if g.count == 1 {
        let e = &s.ends;
        let head = format!(
            "{time} STUCK {}:{} > {}:{}",
            e.local, e.lport, e.remote, e.rport
        );
        let mut text = format!(
            "{} for {at_least}{}: {}",
            s.what,
            Dur::tenths(s.stuck_ns),
            s.verdict.clause()
        );
        if let Some(o) = &s.owner_state {
            text += &format!("; {}", o.sentence(&who, s.holder.fd));
        }
        return (head, text);
    }
    let peers = match g.peers {
        stuck_groups::Peers::One(ip, port) => format!("to {ip}:{port}"),
        stuck_groups::Peers::OnPort(port) => format!("on port {port}"),
        stuck_groups::Peers::Many(n) => format!("to {n} peers"),
    };
    let head = format!("{time} STUCK {} sockets {peers}", g.count);
    let fds = match stuck_groups::fd_ranges(&g.fds, 4) {
        f if f.is_empty() => String::new(),
        f => format!(" fds {f}"),
    };
    let (young, old) = (
        Dur::tenths(g.youngest_ns).to_string(),
        Dur::tenths(g.oldest_ns).to_string(),
    );
    let ages = if young == old {
        old
    } else {
        format!("{young} to {old}")
    };
    let mut text = format!(
        "{} held by {who}{fds} for {at_least}{ages}: {}",
        s.what,
        s.verdict.plural(&s.holder.comm)
    );
    if let Some(o) = &s.owner_state {
        text += &format!("; {}", o.sentence(&who, None));
    }
    (head, text)
}

impl Sink for HumanSink {
    fn start(&mut self, s: &Start) -> std::io::Result<()> {
        let hook = match s.call_hook {
            Some(hook) => format!(" via {hook} on tcp_close/tcp_shutdown"),
            None => String::new(),
        };
        let fd = if s.fd_resolution { "on" } else { "off" };
        // Correlated mode where precise is unavailable: what that costs, once (-v says why).
        let unknown = if s.precise_unavailable.is_some() {
            ": closes without a close() or shutdown() syscall, such as io_uring's, show as unknown"
        } else {
            ""
        };
        self.out.line(&format!(
            "finwait-trace: tracing TCP close paths on {} (mode: {}{hook}{unknown}; fd->socket resolution: {fd}, socket inventory: {}, BPF maps: {}, tcp_fin_timeout {} s, sandbox: {}); Ctrl-C to stop",
            s.arch, s.mode, s.inventory, s.maps.allocation, s.tcp_fin_timeout_s, s.sandbox
        ))
    }

    fn snapshot(&mut self, snap: &Snapshot, detail: bool) -> std::io::Result<()> {
        let entries = &snap.entries;
        let spaces = match snap.coverage.read.len() {
            0 | 1 => String::new(),
            n => format!(" in {n} network namespaces"),
        };
        self.out
            .line(&format!("Sockets on the close path now{spaces}:"))?;
        for line in snap.tally.lines() {
            self.out.line(&self.style.indented(&line))?;
        }
        if !detail {
            return Ok(());
        }
        for line in detail_table::lines(entries.iter()) {
            self.out.line(&line)?;
        }
        Ok(())
    }

    fn report(&mut self, r: &Report, verdict: Option<&Verdict>) -> std::io::Result<()> {
        let b = &mut self.line;
        b.clear();
        match r {
            Report::Transition(t) => write_transition(b, t, verdict, &self.clock, &self.style),
            Report::CloseNoFin(n) => write_close_no_fin(b, n, &self.clock, &self.style),
        }
        self.out.line(&self.line.line)
    }

    fn stuck(&mut self, s: &Stuck) -> std::io::Result<()> {
        self.stuck.push(s.clone());
        if self.stuck.len() >= MAX_PENDING_STUCK {
            self.write_stuck()?;
        }
        Ok(())
    }

    fn summary(&mut self, s: &Summary, now_ns: u64) -> std::io::Result<()> {
        self.out.line("Summary:")?;
        let mut any = false;
        for p in s.processes() {
            any = true;
            self.out.line(&self.style.indented(&p.answer))?;
        }
        if !any {
            self.out
                .line("  nothing on the close path was attributed to a process")?;
        }
        for (name, h) in [
            ("Time half-closed in FIN_WAIT2", &s.half_closed_ms),
            ("Time in CLOSE_WAIT before close", &s.close_wait_ms),
        ] {
            if h.buckets().next().is_some() {
                self.out.line(&format!("  {name}:"))?;
                for line in histogram_lines(h) {
                    self.out.line(&line)?;
                }
            }
        }
        let longest = s.longest(now_ns, 5);
        if !longest.is_empty() {
            self.out.line("  Longest stuck, still open:")?;
        }
        for line in longest_lines(&longest) {
            self.out.line(&line)?;
        }
        Ok(())
    }

    fn stats(&mut self, s: &Stats) -> std::io::Result<()> {
        self.out.line(&format!(
            "finwait-trace: {} records, {} lost (ring full), {} skipped by the kernel, {} transitions never arrived, {} sockets evicted, {} hooks failed to attach; BPF maps {:.1} MiB, RSS {:.1} MiB",
            s.records,
            s.lost_ring_full,
            s.kernel_skipped_nested,
            s.transitions_missed,
            s.sockets_evicted,
            s.attach_failed,
            s.bpf_map_bytes.values().sum::<u64>() as f64 / f64::from(1 << 20),
            s.rss_kib as f64 / 1024.0,
        ))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.stuck.is_empty() {
            self.write_stuck()?;
        }
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoints, Task};

    impl Style {
        fn time(&self, clock: &Clock, ts_ns: u64) -> String {
            let mut out = String::new();
            self.write_time(&mut out, clock, ts_ns);
            out
        }

        fn state(&self, s: TcpState, width: usize, v: Option<&Verdict>) -> String {
            let mut out = String::new();
            self.write_state(&mut out, s, width, v);
            out
        }
    }

    fn human_line(t: &TransitionReport, clock: &Clock, style: &Style) -> String {
        let mut b = LineBuf::default();
        write_transition(&mut b, t, t.verdict().as_ref(), clock, style);
        b.line
    }

    fn json(t: &TransitionReport) -> serde_json::Value {
        let v = t.verdict();
        let e = super::super::wire::Event::Transition(super::super::wire::Transition::new(
            t,
            v.as_ref(),
            &Clock::new(),
        ));
        serde_json::to_value(&e).unwrap()
    }

    #[test]
    fn colour_only_when_asked_and_relative_times() {
        let plain = Style {
            color: false,
            relative_to: Some(1_000_000_000),
            width: None,
        };
        let color = Style {
            color: true,
            relative_to: None,
            width: None,
        };
        let owner = Verdict::OwnerMustClose(None);
        assert_eq!(
            plain.state(TcpState::CloseWait, 11, Some(&owner)),
            "CLOSE_WAIT "
        );
        assert_eq!(
            color.state(TcpState::CloseWait, 11, Some(&owner)),
            "\x1b[1;31mCLOSE_WAIT \x1b[0m",
            "a process must act: it stands out"
        );
        // The same state, by whose job it is: an orphan the kernel frees is dim, a half-closed
        // socket its application must close stands out.
        let frees = Verdict::KernelFrees(crate::model::verdict::Bound::FinTimeout(60));
        assert_eq!(
            color.state(TcpState::FinWait2, 11, Some(&frees)),
            "\x1b[2mFIN_WAIT2  \x1b[0m"
        );
        assert_eq!(
            color.state(
                TcpState::FinWait2,
                11,
                Some(&Verdict::ApplicationMustClose(None))
            ),
            "\x1b[1;31mFIN_WAIT2  \x1b[0m"
        );
        assert_eq!(
            color.state(TcpState::Established, 11, None),
            "ESTABLISHED",
            "no colour without a verdict"
        );
        assert_eq!(plain.time(&Clock::new(), 3_500_000_000), "       2.500");
    }

    /// A snapshot's or summary's sentence wraps to the terminal, indented under its first
    /// line; piped, it stays one line.
    #[test]
    fn blocks_wrap_to_the_terminal() {
        let text = "python3[1463]: 2196 CLOSE_WAIT held open (2196 never read the peer's FIN: \
                    not reading these sockets): python3 must close them (a leak if they stay)";
        let tty = Style {
            width: Some(80),
            ..Style::default()
        };
        let wrapped = tty.indented(text);
        assert!(wrapped.lines().count() > 1, "{wrapped}");
        assert!(wrapped.lines().all(|l| l.len() <= 80), "{wrapped}");
        assert!(
            wrapped.lines().skip(1).all(|l| l.starts_with("    ")),
            "{wrapped}"
        );
        assert_eq!(Style::default().indented(text), format!("  {text}"));
    }

    /// On an 80-column terminal every line of a report fits; piped, a report is one line.
    #[test]
    fn reports_fit_an_80_column_terminal() {
        let lo = "127.0.0.1".parse().unwrap();
        let mut t = TransitionReport::new(
            1_500_000_000,
            0xffff_8881_0000_0000,
            Endpoints {
                local: lo,
                lport: 40123,
                remote: lo,
                rport: 8080,
            },
            TcpState::FinWait1,
            TcpState::FinWait2,
            42,
        );
        t.orphan = Some(false);
        t.cause = Some(Cause {
            kind: CauseKind::Call(Call::Shutdown),
            how: Some(1),
            task: Some(Task {
                pid: 123456,
                tid: 123457,
                comm: "nginx-worker-15".into(),
                thread_comm: None,
                ..Default::default()
            }),
            fd: Some(1017),
            exact: true,
        });
        let report = t;
        let clock = Clock::new();
        let mut style = Style {
            color: true,
            relative_to: Some(0),
            width: Some(80),
        };
        let text = human_line(&report, &clock, &style);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines.len() >= 2, "{text}");
        for line in &lines {
            let visible = line.replace("\x1b[33m", "").replace("\x1b[0m", "");
            assert!(
                visible.len() <= 80,
                "{} columns: {visible:?}",
                visible.len()
            );
        }
        assert!(
            lines[1].starts_with("             half-closed by shutdown(SHUT_WR)"),
            "{text}"
        );
        style.width = None;
        assert_eq!(human_line(&report, &clock, &style).lines().count(), 1);
    }

    /// An orphan reset by its FIN_WAIT2 timer says so, with the tcp_fin_timeout that ran out;
    /// any other reset stays a plain reset.
    #[test]
    fn orphan_reset_by_its_timer_names_tcp_fin_timeout() {
        let lo = "127.0.0.1".parse().unwrap();
        let mut t = TransitionReport::new(
            7_000_000_000,
            0xffff_8881_0000_0000,
            Endpoints {
                local: lo,
                lport: 40123,
                remote: lo,
                rport: 8080,
            },
            TcpState::FinWait2,
            TcpState::Close,
            0,
        );
        t.orphan = Some(true);
        t.fw2_exit = Some(Fw2Exit::Reset);
        t.fin_timeout_s = 5;
        t.cause = Some(Cause::bare(CauseKind::Timer));
        assert_eq!(
            explain(&t),
            "orphan timed out: tcp_fin_timeout (5 s) passed without the peer's FIN; the kernel reset and freed it"
        );
        let v = json(&t);
        assert_eq!(v["tcp_fin_timeout_s"], 5);
        assert_eq!(v["to"], "CLOSE");
        assert!(v.get("timewait_substate").is_none());

        t.cause = Some(Cause::bare(CauseKind::PeerRst));
        assert!(explain(&t).starts_with("reset ("), "{}", explain(&t));
        let v = json(&t);
        assert!(v.get("tcp_fin_timeout_s").is_none());
    }
}

//! Rendering of reports: one JSON object per line (the documented contract) or one readable line
//! that states the answer in words.
use std::{
    fmt::Write,
    time::{Duration, SystemTime},
};

use finwait_common::{Call, tcp_state as st};
use serde_json::{Value, json};

use crate::correlate::{
    Cause, CauseKind, CloseNoFinReport, Fw2Exit, Owner, Report, TransitionReport,
};

pub fn state_name(s: u8) -> &'static str {
    match s {
        st::ESTABLISHED => "ESTABLISHED",
        st::SYN_SENT => "SYN_SENT",
        st::SYN_RECV => "SYN_RECV",
        st::FIN_WAIT1 => "FIN_WAIT1",
        st::FIN_WAIT2 => "FIN_WAIT2",
        st::TIME_WAIT => "TIME_WAIT",
        st::CLOSE => "CLOSE",
        st::CLOSE_WAIT => "CLOSE_WAIT",
        st::LAST_ACK => "LAST_ACK",
        st::LISTEN => "LISTEN",
        st::CLOSING => "CLOSING",
        st::NEW_SYN_RECV => "NEW_SYN_RECV",
        _ => "UNKNOWN",
    }
}

pub fn how_name(how: i32) -> &'static str {
    match how {
        0 => "SHUT_RD",
        1 => "SHUT_WR",
        2 => "SHUT_RDWR",
        _ => "SHUT_?",
    }
}

/// Converts the kernel's monotonic timestamps to wall-clock time.
#[derive(Clone, Copy)]
pub struct Clock {
    realtime_minus_monotonic_ns: i128,
}

impl Clock {
    pub fn new() -> Self {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: valid out-pointer.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let mono = ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128;
        let real = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i128;
        Self {
            realtime_minus_monotonic_ns: real - mono,
        }
    }

    pub fn wall(&self, mono_ns: u64) -> SystemTime {
        let ns = (mono_ns as i128 + self.realtime_minus_monotonic_ns).max(0) as u128;
        SystemTime::UNIX_EPOCH + Duration::from_nanos(ns as u64)
    }

    pub fn rfc3339(&self, mono_ns: u64) -> String {
        humantime::format_rfc3339_micros(self.wall(mono_ns)).to_string()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// The connection's fields, the same in every event that names one.
fn put_ends(m: &mut serde_json::Map<String, Value>, e: &crate::event::Endpoints) {
    m.insert(
        "family".into(),
        json!(if e.is_ipv6() { "ipv6" } else { "ipv4" }),
    );
    m.insert("laddr".into(), json!(e.local.to_string()));
    m.insert("lport".into(), json!(e.lport));
    m.insert("raddr".into(), json!(e.remote.to_string()));
    m.insert("rport".into(), json!(e.rport));
}

fn ms(ns: Option<u64>) -> Value {
    ns.map(|n| json!(n as f64 / 1e6)).unwrap_or(Value::Null)
}

fn cause_json(c: &Option<Cause>) -> Value {
    let Some(c) = c else { return Value::Null };
    json!({
        "call": c.kind.name(),
        "how": c.how.map(how_name),
        "pid": c.task.as_ref().map(|t| t.pid),
        "tid": c.task.as_ref().map(|t| t.tid),
        "comm": c.task.as_ref().map(|t| &*t.comm),
        "fd": c.fd,
        "exact": c.exact,
    })
}

fn owner_json(o: &Owner) -> Value {
    let mut v = json!({"pid": o.pid, "comm": o.comm, "fd": o.fd});
    if let Some(id) = o.cgroup_id {
        v["cgroup_id"] = id.into();
    }
    v
}

pub fn json_line(r: &Report, clock: &Clock, fin_timeout_s: u64) -> String {
    let v = match r {
        Report::Transition(t) => transition_json(t, clock, fin_timeout_s),
        Report::CloseNoFin(n) => close_no_fin_json(n, clock),
    };
    v.to_string()
}

/// Seconds until the kernel frees an orphan handed to the time-wait timer: `tcp_fin_timeout`
/// when handed over at FIN_WAIT2 entry, what is left beyond 60 s when the orphan timer did it.
fn frees_within_s(t: &TransitionReport, fin_timeout_s: u64) -> u64 {
    match t.cause.as_ref().map(|c| c.kind) {
        Some(CauseKind::Timer) => fin_timeout_s.saturating_sub(60),
        _ => fin_timeout_s,
    }
}

/// An orphan kept as a full socket in FIN_WAIT2 (its last ACK was processed while close() still
/// held the socket, or tcp_fin_timeout is above 60 s with linger2 off) whose timer found no time
/// left: the kernel resets it and frees it, tcp_fin_timeout after it entered FIN_WAIT2.
fn orphan_timed_out(t: &TransitionReport) -> bool {
    t.fw2_exit == Some(Fw2Exit::Reset)
        && t.orphan == Some(true)
        && t.cause.as_ref().is_some_and(|c| c.kind == CauseKind::Timer)
}

fn transition_json(t: &TransitionReport, clock: &Clock, fin_timeout_s: u64) -> Value {
    let fin_timeout_s = t.fin_timeout_s.unwrap_or(fin_timeout_s);
    let mut v = json!({
        "event": "transition",
        "time": clock.rfc3339(t.ts_ns),
        "sock": format!("{:#x}", t.sock),
        "from": state_name(t.old),
        "to": state_name(t.effective_new()),
        "kernel_to": state_name(t.new),
        "cause": cause_json(&t.cause),
        "inode": (t.inode != 0).then_some(t.inode),
    });
    let m = v.as_object_mut().unwrap();
    put_ends(m, &t.ends);
    if t.new == st::FIN_WAIT2 || t.old == st::FIN_WAIT2 {
        m.insert("orphan".into(), json!(t.orphan));
    }
    if t.new == st::CLOSE_WAIT || t.old == st::CLOSE_WAIT {
        m.insert(
            "owner".into(),
            t.owner.as_ref().map(owner_json).unwrap_or(Value::Null),
        );
    }
    if t.fw2_exit == Some(Fw2Exit::OrphanTimewait) {
        // `ss` keeps listing it as FIN-WAIT-2 (ino 0) until the kernel frees it.
        m.insert("timewait_substate".into(), json!("FIN_WAIT2"));
        m.insert(
            "kernel_frees_within_s".into(),
            json!(frees_within_s(t, fin_timeout_s)),
        );
        m.insert("tcp_fin_timeout_s".into(), json!(fin_timeout_s));
    } else if orphan_timed_out(t) {
        m.insert("tcp_fin_timeout_s".into(), json!(fin_timeout_s));
    }
    if t.at_least {
        m.insert("at_least".into(), json!(true));
    }
    for (k, ns) in [
        ("since_fin_ms", t.since_fin_ns),
        ("half_closed_ms", t.half_closed_ns),
        ("close_wait_ms", t.close_wait_ns),
    ] {
        if ns.is_some() {
            m.insert(k.into(), ms(ns));
        }
    }
    v
}

fn close_no_fin_json(n: &CloseNoFinReport, clock: &Clock) -> Value {
    json!({
        "event": "close_no_fin",
        "time": clock.rfc3339(n.ts_ns),
        "sock": format!("{:#x}", n.sock),
        "call": CauseKind::Call(n.call).name(),
        "pid": n.task.pid,
        "tid": n.task.tid,
        "comm": n.task.comm,
        "fd": n.fd,
        "remaining_refs": n.remaining_refs,
        "holders": n.holders.iter().map(owner_json).collect::<Vec<_>>(),
        "state": n.state.map(state_name),
        "laddr": n.ends.as_ref().map(|e| e.local.to_string()),
        "lport": n.ends.as_ref().map(|e| e.lport),
        "raddr": n.ends.as_ref().map(|e| e.remote.to_string()),
        "rport": n.ends.as_ref().map(|e| e.rport),
    })
}

pub fn stuck_json(s: &crate::summary::Stuck, clock: &Clock) -> String {
    let mut v = json!({
        "event": "stuck",
        "time": clock.rfc3339(crate::owners::monotonic_ns()),
        "sock": format!("{:#x}", s.sock),
        "state": s.what,
        "pid": s.pid,
        "comm": s.comm,
        "fd": s.fd,
        "stuck_s": s.stuck_ns as f64 / 1e9,
    });
    put_ends(v.as_object_mut().unwrap(), &s.ends);
    v.to_string()
}

pub fn stuck_line(s: &crate::summary::Stuck) -> String {
    let fd = s.fd.map(|fd| format!(" fd {fd}")).unwrap_or_default();
    format!(
        "STUCK {}:{} > {}:{} {} for {:.1} s: {}[{}]{fd} must close it",
        s.ends.local,
        s.ends.lport,
        s.ends.remote,
        s.ends.rport,
        s.what,
        s.stuck_ns as f64 / 1e9,
        s.comm,
        s.pid
    )
}

/// The call and the task that made it, e.g. `shutdown(SHUT_WR) from nginx[12/13] fd 9`.
fn write_who(out: &mut String, c: &Cause) {
    let _ = match (c.kind, c.how) {
        (CauseKind::Call(Call::Shutdown), Some(how)) => write!(out, "shutdown({})", how_name(how)),
        (CauseKind::Call(_), _) => {
            out.push_str(c.kind.name());
            out.push_str("()");
            Ok(())
        }
        (CauseKind::Exit, _) => write!(out, "process exit"),
        (k, _) => write!(out, "{}", k.name()),
    };
    let _ = match (&c.task, c.fd) {
        (Some(t), Some(fd)) => {
            // The common case, on every line: no core::fmt.
            let mut n = itoa::Buffer::new();
            out.push_str(" from ");
            out.push_str(&t.comm);
            out.push('[');
            out.push_str(n.format(t.pid));
            out.push('/');
            out.push_str(n.format(t.tid));
            out.push_str("] fd ");
            out.push_str(n.format(fd));
            Ok(())
        }
        // Only the kernel hook saw it: no syscall of ours carried an fd (io_uring, ...).
        (Some(t), None) if c.exact && matches!(c.kind, CauseKind::Call(_)) => write!(
            out,
            " of {}[{}/{}] (in the kernel, not a close/shutdown syscall: io_uring?)",
            t.comm, t.pid, t.tid
        ),
        (Some(t), None) => write!(out, " of {}[{}/{}]", t.comm, t.pid, t.tid),
        _ => Ok(()),
    };
}

/// `N ms`, or `N.N s` from a second on.
struct Dur(u64);

impl std::fmt::Display for Dur {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = self.0 as f64 / 1e6;
        if ms >= 1000.0 {
            write!(f, "{:.1} s", ms / 1000.0)
        } else {
            write!(f, "{ms:.0} ms")
        }
    }
}

/// The answer in words for one transition.
pub fn explain(t: &TransitionReport, fin_timeout_s: u64) -> String {
    let mut out = String::new();
    let _ = write_explain(&mut out, t, fin_timeout_s);
    out
}

fn write_explain(out: &mut String, t: &TransitionReport, fin_timeout_s: u64) -> std::fmt::Result {
    let fin_timeout_s = t.fin_timeout_s.unwrap_or(fin_timeout_s);
    let unknown = Cause::bare(CauseKind::Unknown);
    let cause = t.cause.as_ref().unwrap_or(&unknown);
    match (t.old, t.new) {
        (_, st::FIN_WAIT1) => {
            out.push_str("FIN sent by ");
            write_who(out, cause);
            Ok(())
        }
        (st::FIN_WAIT1, st::FIN_WAIT2) => {
            let half = t.orphan == Some(false);
            out.push_str(if half {
                "half-closed by "
            } else {
                "orphaned by "
            });
            write_who(out, cause);
            if half {
                write!(
                    out,
                    "; the application still owns it and must close it (no kernel timeout)"
                )
            } else {
                write!(
                    out,
                    "; the kernel frees it within tcp_fin_timeout ({fin_timeout_s} s)"
                )
            }
        }
        (st::ESTABLISHED, st::CLOSE_WAIT) => {
            out.push_str("peer sent FIN; ");
            match &t.owner {
                Some(o) => write!(out, "{}[{}] fd {}", o.comm, o.pid, o.fd),
                None => write!(out, "its owner (not found)"),
            }?;
            write!(out, " must close it (CLOSE_WAIT never times out)")
        }
        (st::CLOSE_WAIT, st::LAST_ACK) => {
            out.push_str("closed by ");
            write_who(out, cause);
            match t.close_wait_ns {
                Some(n) => {
                    let at_least = if t.at_least { "at least " } else { "" };
                    write!(out, " after {at_least}{} in CLOSE_WAIT", Dur(n))
                }
                None => Ok(()),
            }
        }
        (st::FIN_WAIT2, st::CLOSE) => match t.fw2_exit {
            Some(Fw2Exit::TimeWait) => write!(out, "peer's FIN arrived: now TIME_WAIT"),
            Some(Fw2Exit::OrphanTimewait) => {
                out.push_str("orphaned by ");
                write_who(out, cause);
                if let Some(n) = t.half_closed_ns {
                    write!(out, " after {} half-closed", Dur(n))?;
                }
                write!(
                    out,
                    "; `ss` still lists it as FIN-WAIT-2 (ino 0) until the kernel frees it within {} s",
                    frees_within_s(t, fin_timeout_s)
                )
            }
            Some(Fw2Exit::Reset) if orphan_timed_out(t) => write!(
                out,
                "orphan timed out: tcp_fin_timeout ({fin_timeout_s} s) passed without the peer's FIN; the kernel reset and freed it"
            ),
            Some(Fw2Exit::Reset) => {
                out.push_str("reset (");
                write_who(out, cause);
                write!(out, ")")
            }
            _ => {
                out.push_str("left FIN_WAIT2 (");
                write_who(out, cause);
                write!(out, ")")
            }
        },
        (st::LAST_ACK, st::CLOSE) => {
            out.push_str("peer acknowledged our FIN (");
            write_who(out, cause);
            write!(out, "); socket freed")
        }
        (_, st::CLOSE) => {
            out.push_str("closed by ");
            write_who(out, cause);
            Ok(())
        }
        _ => {
            write_who(out, cause);
            Ok(())
        }
    }
}

/// How human lines look: colour only on a terminal (and never with NO_COLOR), times relative to
/// the start unless `--timestamp` asks for the wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct Style {
    pub color: bool,
    /// Some(start): seconds since then; None: wall-clock time of day.
    pub relative_to: Option<u64>,
    /// On a terminal: its width; a report longer than that continues on indented lines. Piped
    /// output keeps one line per report, for grep.
    pub width: Option<usize>,
}

/// Width of the time column (`   12.345` or `12:34:56.789`).
const TIME_WIDTH: usize = 12;

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
    pub fn for_stdout(wall_clock: bool, start_ns: u64) -> Self {
        use std::io::IsTerminal;
        let color = std::io::stdout().is_terminal()
            && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
        Self {
            color,
            relative_to: (!wall_clock).then_some(start_ns),
            width: std::io::stdout().is_terminal().then(terminal_width),
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

    fn write_time(&self, out: &mut String, clock: &Clock, ts_ns: u64) {
        match self.relative_to {
            Some(start) => {
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
            None => {
                let t = humantime::format_rfc3339_millis(clock.wall(ts_ns)).to_string();
                out.push_str(t.get(11..23).unwrap_or(&t));
            }
        }
    }

    /// States that need someone's attention stand out.
    fn write_state(&self, out: &mut String, s: u8, width: usize) {
        let code = match s {
            st::CLOSE_WAIT => "31",                // red: a process must act
            st::FIN_WAIT2 | st::FIN_WAIT1 => "33", // yellow
            st::TIME_WAIT | st::CLOSE => "2",      // dim: done
            _ => "",
        };
        let colored = self.color && !code.is_empty();
        if colored {
            let _ = write!(out, "\x1b[{code}m");
        }
        let name = state_name(s);
        out.push_str(name);
        out.extend(std::iter::repeat_n(' ', width.saturating_sub(name.len())));
        if colored {
            out.push_str("\x1b[0m");
        }
    }

    #[cfg(test)]
    fn time(&self, clock: &Clock, ts_ns: u64) -> String {
        let mut out = String::new();
        self.write_time(&mut out, clock, ts_ns);
        out
    }

    #[cfg(test)]
    fn state(&self, s: u8, width: usize) -> String {
        let mut out = String::new();
        self.write_state(&mut out, s, width);
        out
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

/// Buffers a human line is built in, reused from line to line (no allocation once grown).
#[derive(Default)]
pub struct LineBuf {
    head: String,
    text: String,
    pub line: String,
}

pub fn human_line(r: &Report, clock: &Clock, fin_timeout_s: u64, style: &Style) -> String {
    let mut b = LineBuf::default();
    write_human(&mut b, r, clock, fin_timeout_s, style);
    b.line
}

/// Renders `r` into `b.line`.
pub fn write_human(b: &mut LineBuf, r: &Report, clock: &Clock, fin_timeout_s: u64, style: &Style) {
    b.head.clear();
    b.text.clear();
    b.line.clear();
    match r {
        Report::Transition(t) => {
            style.write_time(&mut b.head, clock, t.ts_ns);
            b.head.push(' ');
            style.write_state(&mut b.head, t.old, 11);
            b.head.push_str(" -> ");
            style.write_state(&mut b.head, t.effective_new(), 11);
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
            let _ = write_explain(&mut b.text, t, fin_timeout_s);
            style.fit(&b.head, head_width, &b.text, &mut b.line);
        }
        Report::CloseNoFin(n) => {
            let _ = write!(
                b.text,
                "{}() from {}[{}/{}] fd {} sent no FIN: the socket is still held by ",
                CauseKind::Call(n.call).name(),
                n.task.comm,
                n.task.pid,
                n.task.tid,
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(plain.state(st::CLOSE_WAIT, 11), "CLOSE_WAIT ");
        assert_eq!(
            color.state(st::CLOSE_WAIT, 11),
            "\x1b[31mCLOSE_WAIT \x1b[0m"
        );
        assert_eq!(
            color.state(st::ESTABLISHED, 11),
            "ESTABLISHED",
            "no colour where nothing is wrong"
        );
        assert_eq!(plain.time(&Clock::new(), 3_500_000_000), "       2.500");
    }

    /// On an 80-column terminal every line of a report fits; piped, a report is one line.
    #[test]
    fn reports_fit_an_80_column_terminal() {
        use crate::correlate::{Cause, CauseKind};
        use crate::event::{Endpoints, Task};
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
            st::FIN_WAIT1,
            st::FIN_WAIT2,
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
            }),
            fd: Some(1017),
            exact: true,
        });
        let report = Report::Transition(t);
        let clock = Clock::new();
        let mut style = Style {
            color: true,
            relative_to: Some(0),
            width: Some(80),
        };
        let text = human_line(&report, &clock, 60, &style);
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
        assert_eq!(human_line(&report, &clock, 60, &style).lines().count(), 1);
    }

    /// An orphan reset by its FIN_WAIT2 timer says so, with the tcp_fin_timeout that ran out;
    /// any other reset stays a plain reset.
    #[test]
    fn orphan_reset_by_its_timer_names_tcp_fin_timeout() {
        use crate::correlate::{Cause, CauseKind};
        use crate::event::Endpoints;
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
            st::FIN_WAIT2,
            st::CLOSE,
            0,
        );
        t.orphan = Some(true);
        t.fw2_exit = Some(Fw2Exit::Reset);
        t.fin_timeout_s = Some(5);
        t.cause = Some(Cause::bare(CauseKind::Timer));
        assert_eq!(
            explain(&t, 60),
            "orphan timed out: tcp_fin_timeout (5 s) passed without the peer's FIN; the kernel reset and freed it"
        );
        let v: Value = serde_json::from_str(&json_line(
            &Report::Transition(t.clone()),
            &Clock::new(),
            60,
        ))
        .unwrap();
        assert_eq!(v["tcp_fin_timeout_s"], 5);
        assert_eq!(v["to"], "CLOSE");
        assert!(v.get("timewait_substate").is_none());

        t.cause = Some(Cause::bare(CauseKind::PeerRst));
        assert!(
            explain(&t, 60).starts_with("reset ("),
            "{}",
            explain(&t, 60)
        );
        let v: Value =
            serde_json::from_str(&json_line(&Report::Transition(t), &Clock::new(), 60)).unwrap();
        assert!(v.get("tcp_fin_timeout_s").is_none());
    }
}

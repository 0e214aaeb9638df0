//! `top`'s terminal: drawn by its own thread from the view the sink publishes, read for keys,
//! and given back as it was on every way out (q, Ctrl-C, the end of the trace, an error, a
//! panic). While the table is up, stderr is gathered (the footer shows the last line) and
//! written out once the terminal is restored: no warning is lost.
use std::{
    io::{self, BufRead, BufReader, Write},
    os::fd::{FromRawFd, OwnedFd},
    sync::{
        Arc, Mutex, Once,
        atomic::{AtomicBool, AtomicI32, Ordering},
        mpsc,
    },
    thread,
    time::Duration,
};

use ratatui::{
    Frame, Terminal,
    backend::CrosstermBackend,
    crossterm::{
        cursor,
        event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
        execute, terminal,
    },
    layout::{Alignment, Constraint, Layout},
    style::{Modifier, Style},
    text::Line,
    widgets::{Cell, Paragraph, Row as TableRow, Table},
};
use tokio::sync::oneshot;

use super::{
    View,
    table::{self, SortBy},
};

/// The terminal is in raw mode on the alternate screen.
static ENTERED: AtomicBool = AtomicBool::new(false);
/// stderr as it was, while it is gathered (-1: not gathered).
static SAVED_STDERR: AtomicI32 = AtomicI32::new(-1);
/// stderr lines kept for the end at most (the rest are counted).
const NOTES_MAX: usize = 1000;
/// How long a key is waited for before the view is looked at again.
const POLL: Duration = Duration::from_millis(200);

/// What the sink and the screen share: the view to draw, and what stderr said meanwhile.
#[derive(Default)]
pub(super) struct Shared {
    pub(super) view: View,
    /// Bumped at each publish: the screen redraws when it moved.
    pub(super) generation: u64,
    notes: Vec<String>,
    notes_dropped: u64,
    /// The screen ended on an error: the trace ends with it.
    pub(super) failed: Option<String>,
}

/// The drawing thread; stopped (and the terminal restored) when dropped.
pub(super) struct Screen {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Screen {
    /// Takes the terminal and starts drawing. `quit` is sent (or dropped) once the screen
    /// ends, for whatever reason: the trace stops with it.
    pub(super) fn start(shared: Arc<Mutex<Shared>>, quit: oneshot::Sender<()>) -> io::Result<Self> {
        install_panic_hook();
        enter()?;
        let notes = match gather_stderr(shared.clone()) {
            Ok(n) => n,
            Err(e) => {
                restore();
                return Err(e);
            }
        };
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = thread::Builder::new()
            .name("finwait-top".into())
            .spawn(move || {
                let ended = run(&shared, &stopping);
                if let Err(e) = ended {
                    let mut s = shared
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    s.failed = Some(format!("the terminal: {e}"));
                }
                drop(quit); // the trace stops with the screen
                restore();
                finish_notes(&shared, &notes);
            });
        match thread {
            Ok(t) => Ok(Self {
                stop,
                thread: Some(t),
            }),
            Err(e) => {
                restore();
                Err(e)
            }
        }
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        restore(); // if the thread could not
    }
}

/// Raw mode, the alternate screen, no cursor.
fn enter() -> io::Result<()> {
    terminal::enable_raw_mode()?;
    ENTERED.store(true, Ordering::Release);
    if let Err(e) = execute!(io::stdout(), terminal::EnterAlternateScreen, cursor::Hide) {
        restore();
        return Err(e);
    }
    Ok(())
}

/// The terminal and stderr as they were; once, from whichever way out comes first.
fn restore() {
    if ENTERED.swap(false, Ordering::AcqRel) {
        let _ = execute!(io::stdout(), terminal::LeaveAlternateScreen, cursor::Show);
        let _ = terminal::disable_raw_mode();
    }
    let saved = SAVED_STDERR.swap(-1, Ordering::AcqRel);
    if saved >= 0 {
        // SAFETY: `saved` is the dup of stderr this module made and owns.
        unsafe {
            libc::dup2(saved, 2);
            libc::close(saved);
        }
    }
}

/// A panic anywhere restores the terminal before its message is printed.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
    });
}

/// stderr into a pipe whose lines a thread keeps in `shared`; the receiver says when the
/// pipe has ended (every writer gone: stderr restored).
fn gather_stderr(shared: Arc<Mutex<Shared>>) -> io::Result<mpsc::Receiver<()>> {
    let mut fds = [0i32; 2];
    // SAFETY: a valid array of two fds; then fds this function owns, and stderr.
    let (read, saved) = unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return Err(io::Error::last_os_error());
        }
        let read = OwnedFd::from_raw_fd(fds[0]);
        let write = OwnedFd::from_raw_fd(fds[1]);
        let saved = libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 3);
        if saved < 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&write), 2) < 0 {
            let e = io::Error::last_os_error();
            libc::close(saved);
            return Err(e);
        }
        (read, saved)
    };
    SAVED_STDERR.store(saved, Ordering::Release);
    let (done, ended) = mpsc::channel();
    let reader = move || {
        for line in BufReader::new(std::fs::File::from(read)).lines() {
            let Ok(line) = line else { break };
            let mut s = shared
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if s.notes.len() < NOTES_MAX {
                s.notes.push(line);
            } else {
                s.notes_dropped += 1;
            }
            s.generation += 1;
        }
        let _ = done.send(());
    };
    thread::Builder::new()
        .name("finwait-top-stderr".into())
        .spawn(reader)?;
    Ok(ended)
}

/// Once stderr is restored: what it said meanwhile, written out.
fn finish_notes(shared: &Mutex<Shared>, ended: &mpsc::Receiver<()>) {
    // The pipe ends when stderr is restored; a moment for its last lines.
    let _ = ended.recv_timeout(Duration::from_secs(1));
    let s = shared
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut err = io::stderr().lock();
    for n in &s.notes {
        let _ = writeln!(err, "{n}");
    }
    if s.notes_dropped > 0 {
        let _ = writeln!(
            err,
            "finwait-trace: ({} more lines on stderr while the table was up, not kept)",
            s.notes_dropped
        );
    }
}

/// Draws until q or Ctrl-C, or until the sink stops the screen.
fn run(shared: &Mutex<Shared>, stop: &AtomicBool) -> io::Result<()> {
    let mut term = Terminal::new(CrosstermBackend::new(io::stdout()))?;
    let mut sort = SortBy::default();
    let mut drawn = None;
    while !stop.load(Ordering::Acquire) {
        {
            let s = shared
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if drawn != Some(s.generation) {
                drawn = Some(s.generation);
                term.draw(|f| draw(f, &s, sort))?;
            }
        }
        if !event::poll(POLL)? {
            continue;
        }
        match event::read()? {
            Event::Key(k) if k.kind != KeyEventKind::Release => {
                let ctrl_c =
                    k.modifiers.contains(KeyModifiers::CONTROL) && k.code == KeyCode::Char('c');
                match k.code {
                    _ if ctrl_c => return Ok(()),
                    KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                    KeyCode::Char(c) => {
                        if let Some(by) = SortBy::from_key(c) {
                            sort = by;
                        }
                    }
                    _ => {}
                }
                drawn = None;
            }
            Event::Resize(..) => drawn = None,
            _ => {}
        }
    }
    Ok(())
}

/// The header, the table, the footer.
fn draw(f: &mut Frame<'_>, s: &Shared, sort: SortBy) {
    let v = &s.view;
    let [head, body, foot] = Layout::vertical([
        Constraint::Length(2),
        Constraint::Min(1),
        Constraint::Length(2),
    ])
    .areas(f.area());
    let mut rows = v.rows.clone();
    table::sort(&mut rows, sort);
    let (h, c, o) = table::totals(&rows);
    // Rows past the bottom are not silent either.
    let hidden = rows
        .len()
        .saturating_sub(usize::from(body.height.saturating_sub(1)));
    let below = if hidden > 0 {
        format!(" ({hidden} below the screen)")
    } else {
        String::new()
    };
    let header = vec![
        Line::from(format!("finwait top  {}", v.mode)),
        Line::from(format!(
            "{} workloads{below}: {h} half-closed, {c} CLOSE_WAIT, {o} orphans   sort: {} (c h o g n; q quits)",
            rows.len(),
            sort.column()
        )),
    ];
    f.render_widget(Paragraph::new(header), head);
    f.render_widget(rows_table(&rows, sort), body);
    let mut footer = vec![Line::from(v.losses.clone())];
    if let Some(last) = s.notes.last() {
        footer.push(
            Line::from(format!("stderr: {last}"))
                .style(Style::new().fg(ratatui::style::Color::Yellow)),
        );
    }
    f.render_widget(Paragraph::new(footer), foot);
}

const COLUMNS: [&str; 7] = [
    "WORKLOAD",
    "CONTAINER",
    "HALF-CLOSED",
    "CLOSE_WAIT",
    "ORPHANS",
    "GROWTH/MIN",
    "OLDEST",
];

fn rows_table(rows: &[table::Row], sort: SortBy) -> Table<'static> {
    let right = |s: String| Cell::from(Line::from(s).alignment(Alignment::Right));
    let dim = Style::new().add_modifier(Modifier::DIM);
    let header = TableRow::new(COLUMNS.iter().enumerate().map(|(i, name)| {
        let cell = if i >= 2 {
            right((*name).to_string())
        } else {
            Cell::from(*name)
        };
        let style = Style::new().add_modifier(Modifier::BOLD);
        cell.style(if *name == sort.column() {
            style.add_modifier(Modifier::REVERSED)
        } else {
            style
        })
    }));
    let body = rows.iter().map(|r| {
        let container = r.workload.container.as_deref().unwrap_or("-").to_string();
        let oldest = r
            .oldest
            .map_or_else(|| "-".into(), |(ns, at_least)| table::age(ns, at_least));
        TableRow::new([
            Cell::from(r.workload.name()),
            Cell::from(container),
            right(r.half_closed.to_string()),
            right(r.close_wait.to_string()),
            right(r.orphans.to_string()).style(dim),
            right(table::signed(r.growth)),
            right(oldest),
        ])
    });
    let names = widest(rows.iter().map(|r| r.workload.name()), 8);
    let containers = widest(
        rows.iter()
            .map(|r| r.workload.container.as_deref().unwrap_or("-").to_string()),
        9,
    );
    let widths = [
        Constraint::Length(names),
        Constraint::Length(containers),
        Constraint::Length(11),
        Constraint::Length(10),
        Constraint::Length(7),
        Constraint::Length(10),
        Constraint::Length(9),
    ];
    Table::new(body, widths).header(header).column_spacing(2)
}

/// As wide as the longest cell (at least the header's, at most 48), not the whole screen.
fn widest(cells: impl Iterator<Item = String>, header: usize) -> u16 {
    let w = cells.map(|c| c.chars().count()).fold(header, usize::max);
    w.min(48) as u16
}

#[cfg(test)]
mod tests {
    use ratatui::{Terminal, backend::TestBackend};

    use super::*;
    use crate::output::top::table::{Row, Workload};

    /// The table as drawn: one word per cell, the header's words above the row's, the losses
    /// in the footer.
    #[test]
    fn draws_the_rows_under_their_columns() {
        let mut s = Shared::default();
        s.view.mode = "precise mode, kernel 6.1".into();
        s.view.losses = "lost 0 (ring full)".into();
        s.view.rows = vec![Row {
            workload: Workload {
                pid: 7,
                comm: "imapd".into(),
                container: Some("docker:3f2a9c1b7d4e".into()),
            },
            half_closed: 1,
            close_wait: 8,
            orphans: 2,
            growth: 5,
            oldest: Some((65_000_000_000, true)),
        }];
        s.notes.push("finwait-trace: warning: x".into());
        let mut term = Terminal::new(TestBackend::new(120, 10)).unwrap();
        term.draw(|f| draw(f, &s, SortBy::CloseWait)).unwrap();
        let buf = term.backend().buffer();
        let lines: Vec<String> = (0..buf.area.height)
            .map(|y| {
                (0..buf.area.width)
                    .map(|x| buf[(x, y)].symbol())
                    .collect::<String>()
            })
            .collect();
        let header = lines.iter().position(|l| l.contains("WORKLOAD")).unwrap();
        let words: Vec<&str> = lines[header + 1].split_whitespace().collect();
        assert_eq!(
            words,
            [
                "imapd[7]",
                "docker:3f2a9c1b7d4e",
                "1",
                "8",
                "2",
                "+5",
                ">=1m05s"
            ],
            "{lines:#?}"
        );
        let columns: Vec<&str> = lines[header].split_whitespace().collect();
        assert_eq!(columns, COLUMNS, "{lines:#?}");
        assert!(lines.iter().any(|l| l.contains("lost 0 (ring full)")));
        assert!(
            lines
                .iter()
                .any(|l| l.contains("stderr: finwait-trace: warning: x"))
        );
        assert!(lines[1].contains("1 workloads: 1 half-closed, 8 CLOSE_WAIT, 2 orphans"));
        // Rows past the bottom are counted in the header: 10 lines hold 5 rows.
        let row = s.view.rows[0].clone();
        s.view.rows = (0..7).map(|_| row.clone()).collect();
        term.draw(|f| draw(f, &s, SortBy::CloseWait)).unwrap();
        let buf = term.backend().buffer();
        let second: String = (0..buf.area.width).map(|x| buf[(x, 1)].symbol()).collect();
        assert!(
            second.contains("7 workloads (2 below the screen)"),
            "{second}"
        );
    }
}

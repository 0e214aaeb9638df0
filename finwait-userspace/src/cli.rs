//! Command-line options.
use crate::kernel::loader;
use clap::{Args, Parser, Subcommand};
use std::time::Duration;

use finwait_common::TcpState;

#[derive(Debug, Parser)]
#[command(
    name = "finwait-trace",
    version,
    about = "Who left these TCP sockets in FIN_WAIT2 or CLOSE_WAIT: shutdown(), close(), or a peer's FIN nobody answered?",
    after_help = "Examples:
  # nginx piles up FIN_WAIT2: shutdown() or close()? (the master and every worker)
  sudo finwait-trace snapshot --pid $(pgrep -o nginx)
  sudo finwait-trace --pid $(pgrep -o nginx) --state FIN_WAIT2
  # a back-end leaks CLOSE_WAIT: name each socket it has not closed after 30 s
  sudo finwait-trace --comm imapd --stuck 30 --summary-only
  # one JSON object per line, for a minute
  sudo finwait-trace --json --duration 60
  # a built-in loopback workload, traced
  sudo finwait-trace --demo",
    args_conflicts_with_subcommands = true
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Option<Command>,

    #[command(flatten)]
    pub(crate) trace: TraceArgs,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// List the TCP sockets on the close path now: who holds each one and whose job it is.
    Snapshot(SnapshotArgs),
    /// The manual: every flag, then every JSON event and field (through `man` on a terminal).
    Man,
    /// A live, full-screen table of the workloads holding sockets someone must close
    /// (half-closed, CLOSE_WAIT; orphans dimmed), refreshed every second. Keys: c h o g n sort
    /// by CLOSE_WAIT, half-closed, oldest, growth, name; q quits.
    Top(TopArgs),
}

#[derive(Debug, Args)]
pub(crate) struct TopArgs {
    #[command(flatten)]
    pub(crate) select: SelectArgs,

    #[command(flatten)]
    pub(crate) workloads: WorkloadArgs,

    /// How calls are tied to sockets (as for a trace).
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    pub(crate) mode: Mode,
}

#[derive(Debug, Args)]
pub(crate) struct SnapshotArgs {
    #[command(flatten)]
    pub(crate) select: SelectArgs,

    #[command(flatten)]
    pub(crate) workloads: WorkloadArgs,

    /// One JSON object per line: a summary, then every socket.
    #[arg(long)]
    pub(crate) json: bool,

    /// After the summary, one line per socket.
    #[arg(long)]
    pub(crate) detail: bool,

    /// Do not sandbox finwait itself (for debugging; see docs/sandbox.md).
    #[arg(long)]
    pub(crate) no_sandbox: bool,
}

/// Processes, ports and states: what a snapshot or a trace is about (the same flags for both).
#[derive(Debug, Args, Clone, Default)]
pub(crate) struct SelectArgs {
    /// Only these processes and their descendants (repeatable): live, their calls and sockets;
    /// in a snapshot, the sockets they hold (or are inferred to have held).
    #[arg(long = "pid", value_name = "PID")]
    pub(crate) pids: Vec<u32>,

    /// Only processes with this name (as in /proc/PID/comm; repeatable, up to 4 live), and their
    /// descendants. Combines with --pid.
    #[arg(long = "comm", value_name = "NAME", value_parser = parse_comm)]
    pub(crate) comms: Vec<String>,

    /// Only sockets with this local or remote port (repeatable).
    #[arg(long = "port", value_name = "PORT")]
    pub(crate) ports: Vec<u16>,

    /// Only this state (repeatable): live, transitions into or out of it; in a snapshot, the
    /// sockets in it. FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING, TIME_WAIT, CLOSE, ...
    #[arg(long = "state", value_name = "STATE", value_parser = parse_state)]
    pub(crate) states: Vec<TcpState>,

    /// Only what a process must act on: sockets half-closed by shutdown() and still held, and
    /// CLOSE_WAIT; hides the orphans the kernel frees by itself and what is over.
    #[arg(long)]
    pub(crate) needs_action: bool,
}

/// Containers, pods and network namespaces: who a snapshot or a trace is about, by where the
/// processes run.
#[derive(Debug, Args, Clone, Default)]
pub(crate) struct WorkloadArgs {
    /// Only this container (repeatable): its id, or a prefix of at least 4 hex digits. Live,
    /// the processes in it at the start and their descendants; in a snapshot, also the orphans
    /// in its network namespace.
    #[arg(long = "container", value_name = "ID", value_parser = parse_container)]
    pub(crate) containers: Vec<String>,

    /// Only this Kubernetes pod (repeatable): NAME, NAMESPACE/NAME (where the node shows pod
    /// names, under /var/log/pods) or its UID.
    #[arg(long = "pod", value_name = "NAME|UID", value_parser = parse_pod)]
    pub(crate) pods: Vec<String>,

    /// Only this network namespace (repeatable): its inode, as `net:[INODE]` or INODE (`ls -l
    /// /proc/PID/ns/net` shows it). Live, the processes in it at the start and their
    /// descendants.
    #[arg(long = "netns", value_name = "INODE", value_parser = parse_netns)]
    pub(crate) netns: Vec<u64>,
}

impl WorkloadArgs {
    pub(crate) fn is_empty(&self) -> bool {
        self.containers.is_empty() && self.pods.is_empty() && self.netns.is_empty()
    }
}

#[derive(Debug, Args)]
pub(crate) struct TraceArgs {
    #[command(flatten)]
    pub(crate) select: SelectArgs,

    #[command(flatten)]
    pub(crate) workloads: WorkloadArgs,

    /// One JSON object per line (every event and field: `finwait-trace man`).
    #[arg(long)]
    pub(crate) json: bool,

    /// Stop after this many seconds (at most a year).
    #[arg(long, value_name = "SECONDS", value_parser = up_to_a_year, allow_hyphen_values = true)]
    pub(crate) duration: Option<Duration>,

    /// Show every TCP state transition, not only those on the close path.
    #[arg(long)]
    pub(crate) all: bool,

    /// Run a built-in loopback client and server that reproduce the common cases, trace them,
    /// print what was found and exit.
    #[arg(long, conflicts_with_all = ["pids", "comms", "containers", "pods", "netns"])]
    pub(crate) demo: bool,

    /// IPv4 only.
    #[arg(short = '4', conflicts_with = "ipv6")]
    pub(crate) ipv4: bool,

    /// IPv6 only.
    #[arg(short = '6')]
    pub(crate) ipv6: bool,

    /// Report each socket still half-closed (FIN_WAIT2 after shutdown()) or in CLOSE_WAIT after
    /// this many seconds, once, with its owner (at most a year).
    #[arg(long, value_name = "SECONDS", value_parser = up_to_a_year, allow_hyphen_values = true)]
    pub(crate) stuck: Option<Duration>,

    /// Wall-clock times in the human output (default: seconds since start).
    #[arg(long)]
    pub(crate) timestamp: bool,

    /// Print only the summary when tracing ends, not each transition.
    #[arg(long)]
    pub(crate) summary_only: bool,

    /// Serve Prometheus metrics at http://ADDR:PORT/metrics while tracing (`[::]:9977`,
    /// `0.0.0.0:9977`, `127.0.0.1:9977`): sockets half-closed and in CLOSE_WAIT now, entries by
    /// cause, durations, and finwait's own health, by workload (process name and container).
    #[arg(long, value_name = "ADDR:PORT", conflicts_with_all = ["states", "needs_action", "demo"])]
    pub(crate) metrics: Option<std::net::SocketAddr>,

    /// With --metrics: workloads with series of their own at most; beyond it idle ones lose
    /// theirs and, if none is idle, newcomers count under comm="other".
    #[arg(long, value_name = "N", default_value_t = 500, requires = "metrics", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub(crate) metrics_max_workloads: u32,

    /// With --metrics: TLS, client certificates, basic auth and response headers from FILE, in
    /// the Prometheus exporter-toolkit's web-config format (as node_exporter's
    /// --web.config.file: tls_server_config, basic_auth_users, http_server_config); paths in
    /// it are relative to its directory. Checked at start.
    #[arg(long, value_name = "FILE", requires = "metrics")]
    pub(crate) web_config_file: Option<std::path::PathBuf>,

    /// Print nothing on stdout (with --metrics: the endpoint is the output).
    #[arg(long, short = 'q', conflicts_with_all = ["json", "summary_only"])]
    pub(crate) quiet: bool,

    /// Do not start with a snapshot of the sockets already on the close path.
    #[arg(long)]
    pub(crate) no_snapshot: bool,

    /// Print the counters (records, lost, tracked sockets, RSS) as JSON to stderr this often
    /// (0.1 s to a day).
    #[arg(long, value_name = "SECONDS", value_parser = parse_stats_every, allow_hyphen_values = true)]
    pub(crate) stats_every: Option<Duration>,

    /// Size of the kernel's socket ownership map (entries; each socket holds one until it
    /// reaches CLOSE; default: twice the host's TCP sockets at start, plus 16,384). A full map is
    /// counted (`owner_map_full`) and those owners come from /proc.
    #[arg(long, value_name = "ENTRIES", hide = true, value_parser = clap::value_parser!(u32).range(1..=(1 << 24)))]
    pub(crate) owner_map_entries: Option<u32>,

    /// Preallocate the kernel's hash maps even where it can allocate their entries as they are
    /// written (Linux 6.1+): a test compares the two.
    #[arg(long, hide = true)]
    pub(crate) preallocate_maps: bool,

    /// Write a man page (`man`) or shell completions (`bash`, `zsh`, `fish`) to stdout.
    #[arg(long, hide = true, value_name = "WHAT")]
    pub(crate) generate: Option<String>,

    /// `--demo`'s workload processes: run one side of it.
    #[arg(long, hide = true, value_enum, value_name = "ROLE")]
    pub(crate) demo_role: Option<crate::demo::Role>,

    /// Do not sandbox finwait itself once its programs are attached (for debugging: the
    /// sandbox refuses writing files, loading BPF programs, running programs, reaching into other
    /// processes; see docs/sandbox.md).
    #[arg(long)]
    pub(crate) no_sandbox: bool,

    /// The sandbox's test: once it is on, try to open /proc/PID/mem read-write and to create a
    /// file, and print each errno to stderr as a JSON line.
    #[arg(long, hide = true, value_name = "PID")]
    pub(crate) sandbox_self_test_write_proc_mem: Option<u32>,

    /// Benchmark floor: attach every program as a no-op.
    #[arg(long, hide = true)]
    pub(crate) bench_noop: bool,

    /// How calls are tied to sockets. `precise`: also hook the kernel's tcp_close/tcp_shutdown
    /// (fentry, else kprobes), which sees every path that ends a socket (io_uring included);
    /// `correlated`: syscall tracepoints only; `auto`: precise where the kernel allows it.
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    pub(crate) mode: Mode,

    /// Ring buffer size in KiB (a power of two, at least 4; default: 1 MiB per CPU, from 4 to
    /// 16 MiB).
    #[arg(long, value_name = "KIB", value_parser = parse_ring_kib)]
    pub(crate) ring_buffer_kib: Option<u32>,

    /// Also print the eBPF programs' own diagnostics to stderr, as `finwait-trace: kernel: LEVEL
    /// MESSAGE`: a kernel read that failed (which program, at which offset), a kernel map that
    /// was full. Without -v, their logging is removed when the programs are loaded.
    #[arg(short, long)]
    pub(crate) verbose: bool,
}

impl Cli {
    /// Parses the command line, with the checks clap cannot express, as usage errors (exit 2).
    pub(crate) fn parse_checked() -> Self {
        let cli = <Self as Parser>::parse();
        if let Err(e) = cli.check() {
            e.exit();
        }
        cli
    }

    fn check(&self) -> Result<(), clap::Error> {
        use clap::CommandFactory;
        let max = finwait_common::MAX_COMMS;
        let select = match &self.command {
            Some(Command::Top(t)) => &t.select,
            _ => &self.trace.select,
        };
        if select.comms.len() > max {
            return Err(Self::command().error(
                clap::error::ErrorKind::TooManyValues,
                format!("--comm is matched in the kernel, which holds {max} names at most"),
            ));
        }
        // The table counts sockets in and out of their states: it needs every transition.
        if matches!(&self.command, Some(Command::Top(t)) if !t.select.states.is_empty()) {
            return Err(Self::command().error(
                clap::error::ErrorKind::ArgumentConflict,
                "top counts every socket on the close path: --state does not apply",
            ));
        }
        Ok(())
    }
}

/// `--generate`: the man page or completions, from these very definitions.
pub(crate) fn generate(what: &str, out: &mut dyn std::io::Write) -> anyhow::Result<()> {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    let shell = match what {
        "man" => {
            // The flags, then the JSON contract: the reference a host with only the binary has.
            clap_mangen::Man::new(cmd).render(out)?;
            return Ok(out.write_all(markdown_to_roff(JSON_DOC).as_bytes())?);
        }
        "bash" => clap_complete::Shell::Bash,
        "zsh" => clap_complete::Shell::Zsh,
        "fish" => clap_complete::Shell::Fish,
        other => anyhow::bail!("--generate takes man, bash, zsh or fish, not `{other}`"),
    };
    clap_complete::generate(shell, &mut cmd, "finwait-trace", out);
    Ok(())
}

/// The JSON contract (docs/json.md), carried in the binary for the man page.
const JSON_DOC: &str = include_str!("../../docs/json.md");

/// `finwait-trace man`: the man page with the JSON contract appended, through `man` when
/// stdout is a terminal that has it, else as roff.
pub(crate) fn man() -> anyhow::Result<()> {
    use std::io::{IsTerminal, Write};
    let mut page = Vec::new();
    generate("man", &mut page)?;
    if std::io::stdout().is_terminal() {
        let viewer = std::process::Command::new("man")
            .args(["-l", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn();
        if let Ok(mut man) = viewer {
            if let Some(mut input) = man.stdin.take() {
                input.write_all(&page)?;
            }
            man.wait()?;
            return Ok(());
        }
    }
    std::io::stdout().write_all(&page)?;
    Ok(())
}

/// Just enough Markdown for docs/json.md as a man page section: headings, bullets (two
/// levels), paragraphs; code spans lose their backticks; roff's specials are escaped.
fn markdown_to_roff(md: &str) -> String {
    let mut out = String::new();
    for line in md.lines() {
        let text = line.trim_start();
        let escaped = text.replace('\\', "\\e").replace('`', "");
        let escaped = if escaped.starts_with(['.', '\'']) {
            format!("\\&{escaped}")
        } else {
            escaped
        };
        if let Some(h) = line.strip_prefix("# ") {
            out += &format!(".SH \"{}\"\n", h.replace('`', "").to_uppercase());
        } else if let Some(item) = escaped.strip_prefix("- ") {
            let indent = if line.starts_with("  ") { 4 } else { 2 };
            out += &format!(".IP \\(bu {indent}\n{item}\n");
        } else if text.is_empty() {
            out += ".PP\n";
        } else {
            out += &escaped;
            out.push('\n');
        }
    }
    out
}

fn parse_state(s: &str) -> Result<TcpState, String> {
    // FIN_WAIT2, fin-wait-2 and TCP_FIN_WAIT2 all name the same state.
    let bare = |n: &str| n.to_ascii_uppercase().replace(['-', '_'], "");
    let want = bare(s.trim());
    let want = want.strip_prefix("TCP").unwrap_or(&want);
    TcpState::ALL
        .into_iter()
        .find(|v| bare(v.name()) == want)
        .ok_or_else(|| {
            format!("`{s}` is not a TCP state (FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, ...)")
        })
}

fn parse_netns(s: &str) -> Result<u64, String> {
    let bare = s.trim();
    let bare = bare
        .strip_prefix("net:[")
        .and_then(|b| b.strip_suffix(']'))
        .unwrap_or(bare);
    bare.parse()
        .map_err(|_| format!("`{s}` is not a network namespace (net:[INODE] or INODE)"))
}

fn parse_container(s: &str) -> Result<String, String> {
    // Ids are hex, pod UIDs hex and dashes: nothing else can match.
    let ok = (4..=64).contains(&s.len()) && s.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    ok.then(|| s.to_ascii_lowercase())
        .ok_or_else(|| format!("`{s}` is not a container id (4 to 64 hex digits) or a pod UID"))
}

fn parse_pod(s: &str) -> Result<String, String> {
    // Kubernetes names: lowercase DNS labels; a UID: hex and dashes.
    let ok = !s.is_empty()
        && s.len() <= 253 + 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-./".contains(&b));
    ok.then(|| s.to_string())
        .ok_or_else(|| format!("`{s}` is not a pod name, NAMESPACE/NAME or UID"))
}

fn parse_comm(s: &str) -> Result<String, String> {
    // The kernel keeps 15 bytes of a process name.
    if s.is_empty() || s.len() > 15 || s.contains('\0') {
        return Err(format!(
            "`{s}` is not a process name (1 to 15 bytes, as in /proc/PID/comm)"
        ));
    }
    Ok(s.to_string())
}

/// A year: longer durations are typos, and `Duration` (or a timer) would overflow on some.
const YEAR_S: f64 = 365.0 * 24.0 * 3600.0;

/// `--duration`, `--stuck`.
fn up_to_a_year(s: &str) -> Result<Duration, String> {
    seconds(s, 0.001, YEAR_S)
}

/// Faster than ten times a second, the stats lines would be most of the tracer's work.
fn parse_stats_every(s: &str) -> Result<Duration, String> {
    seconds(s, 0.1, 24.0 * 3600.0)
}

/// Seconds between `min` and `max`, as a duration; anything else a usage error that says the
/// bounds (never a panic: `Duration::from_secs_f64` panics out of range).
fn seconds(s: &str, min: f64, max: f64) -> Result<Duration, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if (min..=max).contains(&v) => Ok(Duration::from_secs_f64(v)),
        _ => Err(format!(
            "`{s}` is not a number of seconds between {min} and {max}"
        )),
    }
}

fn parse_ring_kib(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(v) if v >= 4 && v.is_power_of_two() && v <= 1 << 20 => Ok(v),
        _ => Err(format!(
            "`{s}` must be a power of two between 4 and 1048576"
        )),
    }
}

/// `--mode`: how calls are tied to sockets (the kernel layer's [`loader::Mode`], for clap).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Mode {
    /// Precise where the kernel allows it, else correlated.
    Auto,
    /// Hook tcp_close/tcp_shutdown (fentry, else kprobes); fail if the kernel refuses both.
    Precise,
    /// Syscall tracepoints only, matched to state changes by socket identity.
    Correlated,
}

impl From<Mode> for loader::Mode {
    fn from(m: Mode) -> Self {
        match m {
            Mode::Auto => Self::Auto,
            Mode::Precise => Self::Precise,
            Mode::Correlated => Self::Correlated,
        }
    }
}

/// What the kernel side loads, from the flags.
impl From<&TraceArgs> for loader::Options {
    fn from(t: &TraceArgs) -> Self {
        Self {
            all_transitions: t.all,
            pids: t.select.pids.clone(),
            comms: t.select.comms.clone(),
            ports: t.select.ports.clone(),
            ring_bytes: t.ring_buffer_kib.map(|k| k * 1024),
            noop: t.bench_noop,
            mode: t.mode.into(),
            owners_max: t.owner_map_entries,
            prealloc: t.preallocate_maps,
            diagnostics: t.verbose,
        }
    }
}

/// The options, built once from the flags.
impl From<&TraceArgs> for crate::trace::Options {
    fn from(t: &TraceArgs) -> Self {
        Self {
            load: t.into(),
            json: t.json,
            duration: t.duration,
            states: t.select.states.clone(),
            needs_action: t.select.needs_action,
            ipv6: (t.ipv4 || t.ipv6).then_some(t.ipv6),
            summary_only: t.summary_only,
            quiet: t.quiet,
            metrics: t.metrics,
            metrics_max_workloads: t.metrics_max_workloads as usize,
            web_config: t.web_config_file.clone(),
            stuck: t.stuck,
            wall_clock: t.timestamp,
            snapshot: !t.no_snapshot,
            stats_every: t.stats_every,
            sandbox: !t.no_sandbox,
            sandbox_self_test: t.sandbox_self_test_write_proc_mem,
            top: false,
        }
    }
}

/// `top`: a trace whose only output is the table, with the defaults a trace has.
impl From<&TopArgs> for crate::trace::Options {
    fn from(t: &TopArgs) -> Self {
        let load = loader::Options {
            all_transitions: false,
            pids: t.select.pids.clone(),
            comms: t.select.comms.clone(),
            ports: t.select.ports.clone(),
            ring_bytes: None,
            noop: false,
            mode: t.mode.into(),
            owners_max: None,
            prealloc: false,
            diagnostics: false,
        };
        Self {
            load,
            json: false,
            duration: None,
            states: Vec::new(),
            ipv6: None,
            summary_only: false,
            quiet: true,
            metrics: None,
            metrics_max_workloads: 0,
            web_config: None,
            stuck: None,
            wall_clock: false,
            snapshot: true,
            stats_every: None,
            sandbox: true,
            sandbox_self_test: None,
            needs_action: false,
            top: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--mode`'s values are the names the start event gives the kernel's modes.
    #[test]
    fn mode_values_are_the_kernel_modes_names() {
        use clap::ValueEnum;
        for &m in Mode::value_variants() {
            let value = m.to_possible_value().unwrap();
            assert_eq!(value.get_name(), loader::Mode::from(m).name());
        }
    }

    #[test]
    fn rejects_bad_values() {
        assert!(Cli::try_parse_from(["x", "--duration", "-1"]).is_err());
        assert!(Cli::try_parse_from(["x", "--ring-buffer-kib", "100"]).is_err());
        assert!(Cli::try_parse_from(["x", "--demo", "--pid", "1"]).is_err());
        let c = Cli::try_parse_from(["x", "--pid", "1", "--pid", "2", "--json"]).unwrap();
        assert_eq!(c.trace.select.pids, vec![1, 2]);
        let s = Cli::try_parse_from(["x", "snapshot", "--pid", "7", "--detail"]).unwrap();
        assert!(
            matches!(s.command, Some(Command::Snapshot(SnapshotArgs { ref select, detail: true, .. })) if select.pids == [7])
        );
        assert!(Cli::try_parse_from(["x", "--json", "snapshot"]).is_err());
        assert!(Cli::try_parse_from(["x", "--comm", "a-name-longer-than-15"]).is_err());
        let c = Cli::try_parse_from(["x", "--comm", "nginx", "--comm", "python3"]).unwrap();
        assert_eq!(c.trace.select.comms, vec!["nginx", "python3"]);
        let four = [
            "x", "--comm", "a", "--comm", "b", "--comm", "c", "--comm", "d",
        ];
        assert!(Cli::try_parse_from(four).unwrap().check().is_ok());
        let five = [&four[..], &["--comm", "e"]].concat();
        assert!(Cli::try_parse_from(five).unwrap().check().is_err());
        let c = Cli::try_parse_from([
            "x",
            "--state",
            "fin-wait-2",
            "--state",
            "CLOSE_WAIT",
            "-6",
            "--port",
            "80",
        ])
        .unwrap();
        assert_eq!(
            (c.trace.select.states, c.trace.ipv6, c.trace.select.ports),
            (
                vec![TcpState::FinWait2, TcpState::CloseWait],
                true,
                vec![80]
            )
        );
        assert!(Cli::try_parse_from(["x", "--state", "HALF_OPEN"]).is_err());
        assert!(Cli::try_parse_from(["x", "-4", "-6"]).is_err());
        // Gauges need every transition out of a state: no --state with --metrics.
        assert!(
            Cli::try_parse_from(["x", "--metrics", "[::]:9977", "--state", "CLOSE_WAIT"]).is_err()
        );
        assert!(Cli::try_parse_from(["x", "--metrics", "9977"]).is_err());
        assert!(Cli::try_parse_from(["x", "--metrics-max-workloads", "5"]).is_err());
        assert!(Cli::try_parse_from(["x", "--web-config-file", "w.yml"]).is_err());
        let m = Cli::try_parse_from(["x", "--metrics", "127.0.0.1:9977", "-q"]).unwrap();
        assert_eq!(m.trace.metrics, Some("127.0.0.1:9977".parse().unwrap()));
    }

    /// The man page and completions come from these definitions; the man page carries the
    /// JSON contract, in roff.
    #[test]
    fn man_page_and_completions() {
        let mut man = Vec::new();
        generate("man", &mut man).unwrap();
        assert!(String::from_utf8(man).unwrap().contains("snapshot"));
        let mut bash = Vec::new();
        generate("bash", &mut bash).unwrap();
        assert!(String::from_utf8(bash).unwrap().contains("--stuck"));
        assert!(generate("tcsh", &mut Vec::new()).is_err());
        // The man page carries the JSON contract, in roff.
        let roff = markdown_to_roff(JSON_DOC);
        assert!(roff.starts_with(".SH \"JSON LINES (--JSON)\""), "{roff}");
        assert!(
            roff.contains(".IP \\(bu 2\n{\"event\": \"transition\""),
            "{roff}"
        );
        assert!(!roff.lines().any(|l| l.starts_with('.')
            && !l.starts_with(".SH")
            && !l.starts_with(".IP")
            && !l.starts_with(".PP")));
    }

    #[test]
    fn top_takes_the_selection_flags() {
        let c = Cli::try_parse_from(["x", "top", "--pid", "7", "--port", "80"]).unwrap();
        let Some(Command::Top(t)) = &c.command else {
            panic!("{c:?}")
        };
        let o = crate::trace::Options::from(t);
        assert!(o.top && o.quiet && o.snapshot);
        assert_eq!((o.load.pids, o.load.ports), (vec![7], vec![80]));
        let states = Cli::try_parse_from(["x", "top", "--state", "CLOSE_WAIT"]).unwrap();
        assert!(states.check().is_err());
        let four = [
            "x", "top", "--comm", "a", "--comm", "b", "--comm", "c", "--comm", "d",
        ];
        assert!(Cli::try_parse_from(four).unwrap().check().is_ok());
        let five = [&four[..], &["--comm", "e"]].concat();
        assert!(Cli::try_parse_from(five).unwrap().check().is_err());
        assert!(Cli::try_parse_from(["x", "--json", "top"]).is_err());
    }
}

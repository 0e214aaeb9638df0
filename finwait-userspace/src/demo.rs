//! `--demo`: a loopback client and server that reproduce scenarios 1, 2 and 4 of docs/close-path.md
//! while the tracer watches, so a new user sees the answers without a target.
//!
//! The client and the server are separate processes (this binary again, `--demo-role`, named
//! `demo-client` and `demo-server`), so the answers name two processes with two different jobs,
//! as they would on a real host.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::trace::{self, Options};

/// How long the server leaves the third connection in CLOSE_WAIT.
const CLOSE_WAIT_MS: u64 = 300;
/// What a role prints once its part is done.
const DONE: &str = "done";
/// What the client waits for before it starts: tracing is ready.
const GO: &str = "go";

/// The two sides of the demo workload, each run as its own process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Role {
    Server,
    Client,
}

impl Role {
    /// Its `--demo-role` value, as clap spells it.
    fn arg(self) -> String {
        use clap::ValueEnum;
        let value = self.to_possible_value().expect("no variant is skipped");
        value.get_name().to_string()
    }

    /// The process name it takes, which the answers show.
    fn comm(self) -> String {
        format!("demo-{}", self.arg())
    }
}

/// A role process; dropping it kills and reaps it. Its stdin is a pipe from us: should we die
/// first, it sees EOF and exits on its own.
struct RoleProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl RoleProcess {
    fn spawn(role: Role, port: Option<u16>) -> Result<Self> {
        // This very binary, through the kernel's link to it: it runs even where its path is
        // not reachable by the user running it (a clone in a 0700 directory, run by another
        // user with the capabilities).
        let mut cmd = Command::new("/proc/self/exe");
        cmd.args(["--demo-role", &role.arg()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        if let Some(port) = port {
            cmd.args(["--port", &port.to_string()]);
        }
        let mut child = cmd.spawn().map_err(|e| spawn_error(role, &e))?;
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        let stdin = child.stdin.take();
        Ok(Self {
            child,
            stdin,
            stdout,
        })
    }

    /// Tells a role waiting for it to start its part.
    fn go(&mut self) -> Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .context("the demo's workload has no stdin")?;
        stdin.write_all(format!("{GO}\n").as_bytes())?;
        Ok(stdin.flush()?)
    }

    /// The next line the role printed.
    fn line(&mut self) -> Result<String> {
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        if line.is_empty() {
            bail!("the demo's workload process ended early");
        }
        Ok(line.trim().to_string())
    }
}

/// Why a workload process could not start, and what to do about it.
fn spawn_error(role: Role, e: &std::io::Error) -> anyhow::Error {
    let exe = std::env::current_exe()
        .map_or_else(|_| "finwait-trace".into(), |p| p.display().to_string());
    if e.kind() == std::io::ErrorKind::PermissionDenied {
        return anyhow::anyhow!(
            "starting the demo's {}: this user cannot execute {exe} again ({e}); the demo runs \
             its workload as processes of this binary. Install it where every user can run it \
             (e.g. /usr/local/bin) or run the demo as root",
            role.comm()
        );
    }
    anyhow::anyhow!("starting the demo's {} from {exe}: {e}", role.comm())
}

impl Drop for RoleProcess {
    fn drop(&mut self) {
        // Its stdin closed, it exits on its own (the sandbox refuses kill() on other processes).
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `--demo`: starts the workload once tracing is ready and traces it through the same pipeline
/// as any run (its own port only), ending with the same summary.
pub(crate) async fn run(mut opts: Options) -> Result<()> {
    let mut server = RoleProcess::spawn(Role::Server, None)?;
    let port: u16 = server.line()?.parse().context("the demo server's port")?;
    // Both processes start before tracing: once it is ready, the sandbox starts none.
    let mut client = RoleProcess::spawn(Role::Client, Some(port))?;
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();

    // Set going once the programs are attached; hands the processes back to be ended after tracing
    // stops, so the output holds only the scenarios.
    let workload =
        thread::Builder::new()
            .name("demo".into())
            .spawn(move || -> Result<Vec<RoleProcess>> {
                if ready_rx.recv().is_err() {
                    return Ok(vec![client, server]); // tracing never started
                }
                client.go()?;
                for p in [&mut client, &mut server] {
                    if p.line()? != DONE {
                        bail!("the demo's workload failed");
                    }
                }
                // Let the last softirq transitions reach the ring before stopping.
                thread::sleep(Duration::from_millis(300));
                let _ = stop_tx.send(());
                Ok(vec![client, server])
            })?;

    opts.load.ports = vec![port];
    opts.duration = Some(Duration::from_secs(30));
    // The demo's own connections are all that matter to it.
    opts.snapshot = false;
    let json = opts.json;
    let outcome = trace::run(opts, Some(stop_rx), move || {
        let _ = ready_tx.send(());
    })
    .await;
    // Whatever happened, end the workload: the processes are killed as they are dropped.
    let roles = workload.join().expect("demo thread panicked");
    outcome?;
    drop(roles?);
    if !json {
        println!("Trace a real process with: sudo finwait-trace --pid <PID>");
    }
    Ok(())
}

/// `--demo-role`: one side of the workload. Prints `done` when its part is over, then holds its
/// sockets open until stdin closes.
pub(crate) fn role(role: Role, ports: &[u16]) -> Result<()> {
    let name = std::ffi::CString::new(role.comm()).expect("no NUL");
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
    let mut stdin = std::io::stdin().lock();
    let held = match role {
        Role::Server => server()?,
        Role::Client => {
            let port = *ports.first().context("--demo-role client needs --port")?;
            let mut go = String::new();
            stdin.read_line(&mut go)?;
            if go.trim() != GO {
                return Ok(()); // the demo ended before tracing started
            }
            client(port)?
        }
    };
    println!("{DONE}");
    std::io::stdout().flush()?;
    // Hold the sockets until the demo ends (our stdin closes with it, or it kills us).
    let _ = stdin.read_to_end(&mut Vec::new());
    drop(held);
    Ok(())
}

fn server() -> Result<Vec<TcpStream>> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a loopback port")?;
    println!("{}", listener.local_addr()?.port());
    std::io::stdout().flush()?;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(listener.accept()?.0);
    }
    // Scenario 4: wait for the client's FIN on the third connection, then close late.
    let mut third = held.pop().expect("three connections");
    let _ = third.read(&mut [0u8; 1]);
    thread::sleep(Duration::from_millis(CLOSE_WAIT_MS));
    drop(third);
    Ok(held)
}

fn client(port: u16) -> Result<Vec<TcpStream>> {
    let addr = ("127.0.0.1", port);
    let half = TcpStream::connect(addr)?;
    let closed = TcpStream::connect(addr)?;
    let late = TcpStream::connect(addr)?;
    thread::sleep(Duration::from_millis(50));
    // Scenario 1: half-close and keep the fd.
    half.shutdown(Shutdown::Write)?;
    // Scenario 2: close; the server never closes its side.
    drop(closed);
    // Scenario 4: close; the server closes 300 ms later.
    drop(late);
    Ok(vec![half])
}

//! `--demo`: a loopback client and server that reproduce scenarios 1, 2 and 4 of TCP-CLOSE.md
//! while the tracer watches, so a new user sees the answers without a target.
use std::{
    io::Read,
    net::{Shutdown, TcpListener, TcpStream},
    sync::mpsc,
    thread,
    time::Duration,
};

use anyhow::{Context, Result};
use finwait_common::tcp_state as st;

use crate::{
    correlate::{CauseKind, Report},
    tracer::{self, Config, Stopper},
};

/// How long the server leaves the third connection in CLOSE_WAIT.
const CLOSE_WAIT_MS: u64 = 300;

pub async fn run(json: bool, ring_bytes: u32) -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a loopback port")?;
    let port = listener.local_addr()?.port();
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let (keep_tx, keep_rx) = mpsc::channel::<Vec<TcpStream>>();

    let workload = thread::Builder::new()
        .name("demo".into())
        .spawn(move || -> Result<()> {
            ready_rx.recv().ok();
            let sockets = scenarios(listener)?;
            // Let the last softirq transitions reach the ring, then stop tracing before cleanup,
            // so the output holds only the scenarios.
            thread::sleep(Duration::from_millis(300));
            let _ = stop_tx.send(());
            let _ = keep_tx.send(sockets);
            Ok(())
        })?;

    let cfg = Config {
        pids: Vec::new(),
        comms: Vec::new(),
        json,
        all: false,
        duration: Some(Duration::from_secs(30)),
        ring_bytes,
        ports: vec![port],
        states: Vec::new(),
        ipv6: None,
        summary_only: false,
        stuck: None,
        wall_clock: false,
        keep_reports: true,
        // The demo's own connections are all that matter to it.
        snapshot: false,
        noop: false,
        mode: crate::loader::Mode::Auto,
        stats_every: None,
    };
    let outcome = tracer::run(cfg, Stopper(Some(stop_rx)), || {
        let _ = ready_tx.send(());
    })
    .await?;
    workload.join().expect("demo thread panicked")?;
    drop(keep_rx.recv().ok());
    if !json {
        print_findings(&outcome.reports);
    }
    Ok(())
}

/// Runs the scenarios; returns the sockets that must stay open until tracing stops.
fn scenarios(listener: TcpListener) -> Result<Vec<TcpStream>> {
    let addr = listener.local_addr()?;
    let server = thread::Builder::new().name("demo-server".into()).spawn(
        move || -> Result<Vec<TcpStream>> {
            let mut held = Vec::new();
            for _ in 0..3 {
                held.push(listener.accept()?.0);
            }
            // Scenario 4: wait for the client's FIN on the third connection, then close late.
            let mut third = held.pop().unwrap();
            let mut buf = [0u8; 1];
            let _ = third.read(&mut buf);
            thread::sleep(Duration::from_millis(CLOSE_WAIT_MS));
            drop(third);
            Ok(held)
        },
    )?;
    let client = thread::Builder::new().name("demo-client".into()).spawn(
        move || -> Result<Vec<TcpStream>> {
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
        },
    )?;
    let mut keep = client.join().expect("client panicked")?;
    keep.extend(server.join().expect("server panicked")?);
    Ok(keep)
}

fn print_findings(reports: &[Report]) {
    let count = |f: &dyn Fn(&crate::correlate::TransitionReport) -> bool| {
        reports
            .iter()
            .filter(|r| matches!(r, Report::Transition(t) if f(t)))
            .count()
    };
    let half = count(&|t| t.new == st::FIN_WAIT2 && t.orphan == Some(false));
    let orphan = count(&|t| t.new == st::FIN_WAIT2 && t.orphan == Some(true));
    let close_wait = count(&|t| t.new == st::CLOSE_WAIT);
    let late = count(&|t| {
        t.new == st::LAST_ACK
            && t.cause
                .as_ref()
                .is_some_and(|c| matches!(c.kind, CauseKind::Call(_)))
    });
    println!();
    println!("What the demo shows:");
    println!(
        "  {half} socket(s) in FIN_WAIT2 half-closed by shutdown(): the application still owns them and must close them."
    );
    println!(
        "  {orphan} socket(s) in FIN_WAIT2 orphaned by close(): the kernel frees them on its own (tcp_fin_timeout)."
    );
    println!(
        "  {close_wait} socket(s) entered CLOSE_WAIT on the peer's FIN; {late} were closed later by their owner (LAST_ACK), the rest are still open: a leak if that lasts."
    );
    println!("Trace a real process with: sudo finwait-trace --pid <PID>");
}

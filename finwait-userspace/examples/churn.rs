//! Loopback connection churn for the overhead benchmark: threads that connect, send, shut down
//! and close as fast as they can (or at a set rate), for a while. Prints one JSON line.
//!
//! churn [--threads N] [--seconds S] [--rate PER_SECOND] [--connections MAX] [--close-first client|server]
// Test and bench crates share the package's dependencies (the library is where unused ones
// show); their drivers are long by nature.
#![allow(
    unused_crate_dependencies,
    clippy::too_many_lines,
    clippy::needless_pass_by_value
)]
use std::{
    io::{Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

fn main() {
    let mut threads = 2usize;
    let mut seconds = 5.0f64;
    let mut rate = 0u64;
    let mut max = u64::MAX;
    let mut client_first = true;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut v = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--threads" => threads = v().parse().unwrap(),
            "--seconds" => seconds = v().parse().unwrap(),
            "--rate" => rate = v().parse().unwrap(),
            "--connections" => max = v().parse().unwrap(),
            "--close-first" => client_first = v() == "client",
            other => panic!("unknown option {other}"),
        }
    }
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let per_thread_rate = if rate == 0 {
        0.0
    } else {
        rate as f64 / threads as f64
    };
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let done = done.clone();
            std::thread::spawn(move || {
                let listener = TcpListener::bind("127.0.0.1:0").unwrap();
                let addr = listener.local_addr().unwrap();
                let mut n = 0u64;
                let mut buf = [0u8; 16];
                while Instant::now() < deadline && done.load(Ordering::Relaxed) < max {
                    let mut client = TcpStream::connect(addr).unwrap();
                    let (mut server, _) = listener.accept().unwrap();
                    client.write_all(b"ping").unwrap();
                    let _ = server.read(&mut buf).unwrap();
                    let (first, second) = if client_first {
                        (client, server)
                    } else {
                        (server, client)
                    };
                    first.shutdown(Shutdown::Write).unwrap();
                    drop(first);
                    drop(second);
                    n += 1;
                    done.fetch_add(1, Ordering::Relaxed);
                    if per_thread_rate > 0.0 {
                        let due = start + Duration::from_secs_f64(n as f64 / per_thread_rate);
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                    }
                }
            })
        })
        .collect();
    workers.into_iter().for_each(|w| w.join().unwrap());
    let secs = start.elapsed().as_secs_f64();
    let n = done.load(Ordering::Relaxed);
    println!(
        "{{\"connections\": {n}, \"seconds\": {secs:.3}, \"per_second\": {:.1}}}",
        n as f64 / secs
    );
}

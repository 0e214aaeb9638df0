//! `--metrics`: the findings as Prometheus metrics, by workload (process name and container),
//! for the endpoint in [`super::endpoint`] to serve. A sink like the others: this file is what
//! each report counts; [`registry`] names the series, [`workloads`] caps them, [`held`] moves
//! the gauges with the ledger of the sockets someone must close, so that they are exact.
mod exposition;
mod held;
mod registry;
mod workloads;

use std::{collections::HashMap, io, time::Instant};

use finwait_common::TcpState;
use prometheus_client::metrics::{family::Family, gauge::Gauge, histogram::Histogram};

pub(crate) use self::{
    exposition::{Exposition, Format},
    held::ReadKernel,
};
use self::{
    held::{CHECK_EVERY, Held},
    registry::{
        CauseLabels, Families, Health, PodLabels, ProcessMetrics, Workload, duration_histogram,
        remove_series, set_counter,
    },
    workloads::Workloads,
};
use super::{Sink, Start, Stats};
use crate::{
    model::{
        Report, Stuck, TransitionKind, TransitionReport, Verdict,
        ledger::{Kind, Ledger},
        summary::Summary,
    },
    snapshot::Snapshot,
};

pub(crate) struct MetricsSink {
    families: Families,
    health: Health,
    process: ProcessMetrics,
    half_closed_seconds: Histogram,
    close_wait_seconds: Histogram,
    /// One series, 1: the mode, state hook, kernel and version as labels.
    info: Family<Vec<(&'static str, String)>, Gauge>,
    workloads: Workloads,
    /// Sockets someone must close, each counted once in a gauge.
    held: Ledger<Workload>,
    checked_at: Instant,
    /// What the gauges are checked against every [`CHECK_EVERY`].
    read_kernel: ReadKernel,
    /// Set once the gauges are seeded (the endpoint answers from then on).
    ready: super::endpoint::Ready,
}

impl MetricsSink {
    /// The sink, and the registry holding its metrics (for the endpoint).
    pub(crate) fn new(max_workloads: usize, read_kernel: ReadKernel) -> (Self, Exposition) {
        let sink = Self {
            families: Families::default(),
            health: Health::default(),
            process: ProcessMetrics::default(),
            half_closed_seconds: duration_histogram(),
            close_wait_seconds: duration_histogram(),
            info: Family::default(),
            workloads: Workloads {
                max: max_workloads,
                live: HashMap::new(),
                clock: 0,
            },
            held: Ledger::default(),
            checked_at: Instant::now(),
            read_kernel,
            ready: Default::default(),
        };
        let registry = sink.registry();
        (sink, registry)
    }

    /// The flag the endpoint reads: set once the gauges are seeded.
    pub(crate) fn readiness(&self) -> super::endpoint::Ready {
        self.ready.clone()
    }

    /// The series `w`'s events count in (its own, or `other`).
    fn counted(&mut self, w: Workload) -> Workload {
        let f = &self.families;
        let w = self
            .workloads
            .label(w, &self.health, |gone| remove_series(f, gone));
        if let Some(pod) = PodLabels::of(&w) {
            f.pod_info.get_or_create(&pod).set(1);
        }
        w
    }

    fn transition(&mut self, t: &TransitionReport, verdict: Option<&Verdict>) {
        // Closed, or entered while the start-up inventory was read (which saw it there too:
        // one socket, counted once, from the live report).
        for h in self.held.transition(t).entries() {
            self.release_held(&h);
        }
        if let Some(ns) = t.half_closed_ns.filter(|_| t.old == TcpState::FinWait2) {
            self.half_closed_seconds.observe(ns as f64 / 1e9);
        }
        if let Some(ns) = t.close_wait_ns.filter(|_| t.old == TcpState::CloseWait) {
            self.close_wait_seconds.observe(ns as f64 / 1e9);
        }
        match t.kind {
            TransitionKind::FinWait2Entered => {
                let task = t.cause.as_ref().and_then(|c| c.task.as_ref());
                let w = self.counted(Workload::of_task(task));
                let cause = t.cause.as_ref().map_or("unknown", |c| c.kind.name());
                let labels = CauseLabels {
                    cause,
                    workload: w.clone(),
                };
                self.families.fin_wait2_entries.get_or_create(&labels).inc();
                if matches!(verdict, Some(Verdict::ApplicationMustClose(_))) {
                    let pid = task.map_or(0, |t| t.pid);
                    self.hold(t, Kind::HalfClosed, w, pid);
                }
            }
            TransitionKind::PeerFin => {
                let w = self.counted(Workload::of_owner(t.owner.as_ref()));
                self.families.close_wait_entries.get_or_create(&w).inc();
                let pid = t.owner.as_ref().map_or(0, |o| o.pid);
                self.hold(t, Kind::CloseWait, w, pid);
            }
            TransitionKind::FinSent
            | TransitionKind::CloseWaitClosed
            | TransitionKind::FinWait2Left
            | TransitionKind::LastAckDone
            | TransitionKind::FinsCrossed
            | TransitionKind::ClosingDone
            | TransitionKind::Aborted
            | TransitionKind::Other => {}
        }
    }
}

impl Sink for MetricsSink {
    fn start(&mut self, s: &Start) -> io::Result<()> {
        let labels = vec![
            ("mode", s.mode.to_string()),
            ("state_hook", s.state_hook.to_string()),
            ("kernel", s.kernel.clone()),
            ("version", env!("CARGO_PKG_VERSION").to_string()),
        ];
        self.info.get_or_create(&labels).set(1);
        Ok(())
    }

    /// The sockets already waiting for someone to close them count from the start.
    fn snapshot(&mut self, snap: &Snapshot, _detail: bool) -> io::Result<()> {
        let entries = &snap.entries;
        for e in entries {
            let kind = match (&e.verdict, e.sock.state) {
                (Verdict::OwnerMustClose(_), TcpState::CloseWait) => Kind::CloseWait,
                (Verdict::ApplicationMustClose(_), TcpState::FinWait2) => Kind::HalfClosed,
                _ => continue,
            };
            if e.sock.inode == 0 {
                continue;
            }
            let w = self.counted(Workload::of_owner(e.owners.first()));
            let held = Held {
                kind,
                pid: e.owners.first().map_or(0, |o| o.pid),
                key: e.sock.key(),
                since_ns: snap.taken_ns,
                at_least: true,
                data: w.clone(),
            };
            // The same socket twice counts once.
            if self.held.seed(e.sock.inode, held) {
                self.gauge(kind, &w).inc();
                self.workloads.held(&w, 1);
            }
        }
        Ok(())
    }

    fn report(&mut self, r: &Report, verdict: Option<&Verdict>) -> io::Result<()> {
        match r {
            Report::Transition(t) => self.transition(t, verdict),
            Report::CloseNoFin(n) => {
                let w = self.counted(Workload::of_task(Some(&n.task)));
                self.families.closes_without_fin.get_or_create(&w).inc();
            }
        }
        Ok(())
    }

    fn stuck(&mut self, _s: &Stuck) -> io::Result<()> {
        Ok(())
    }

    fn summary(&mut self, _s: &Summary, _now_ns: u64) -> io::Result<()> {
        Ok(())
    }

    fn stats(&mut self, s: &Stats) -> io::Result<()> {
        self.health(s)
    }

    fn health(&mut self, s: &Stats) -> io::Result<()> {
        if self.checked_at.elapsed() >= CHECK_EVERY {
            self.checked_at = Instant::now();
            self.check_against_kernel();
        }
        let h = &self.health;
        set_counter(&h.records, s.records);
        set_counter(&h.lost, s.lost_ring_full);
        set_counter(&h.skipped, s.kernel_skipped_nested);
        set_counter(&h.recovered, s.kernel_recovered_nested);
        set_counter(&h.read_failed, s.kernel_read_failed);
        set_counter(&h.transitions_missed, s.transitions_missed);
        set_counter(&h.owner_map_full, s.owner_map_full);
        set_counter(&h.sockets_evicted, s.sockets_evicted);
        set_counter(&h.containers_unresolved, s.containers_unresolved);
        h.attach_failed.set(s.attach_failed as i64);
        for (map, bytes) in &s.bpf_map_bytes {
            h.bpf_map_bytes
                .get_or_create(&vec![("map", map.clone())])
                .set(i64::try_from(*bytes).unwrap_or(i64::MAX));
        }
        h.workloads.set(self.workloads.live.len() as i64);
        if let Some(u) = crate::host::procs::own_usage() {
            self.process.set(&u);
        }
        Ok(())
    }

    fn ready(&mut self) {
        self.ready.store(true, std::sync::atomic::Ordering::Release);
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use finwait_common::Call;

    use super::*;
    use crate::{
        host::{namespaces::CloseTable, sockdiag::DiagSocket},
        model::{Cause, CauseKind, Container, Endpoints, Owner, Task},
        output::metrics::registry::CAUSES,
    };
    use prometheus_client::metrics::counter::Counter;

    /// A sink whose kernel table cannot be read (nothing is ever released by a check).
    fn sink(max_workloads: usize) -> (MetricsSink, Exposition) {
        MetricsSink::new(max_workloads, Box::new(|_| None))
    }

    fn ends() -> Endpoints {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        Endpoints {
            local: lo,
            lport: 80,
            remote: lo,
            rport: 4000,
        }
    }

    fn owner(comm: &str, path: &str) -> Owner {
        Owner {
            pid: 7,
            comm: comm.into(),
            fd: 9,
            container: Some(Container::from_path(path).into()),
            ..Owner::default()
        }
    }

    /// A CLOSE_WAIT socket the start-up inventory found, with `ends()`.
    fn close_wait_at_start(inode: u64) -> DiagSocket {
        DiagSocket {
            state: TcpState::CloseWait,
            local: ends().local,
            lport: ends().lport,
            remote: ends().remote,
            rport: ends().rport,
            inode,
            uid: 0,
            timer: None,
            recv_queue: 1,
            send_queue: 0,
            netns: 0,
        }
    }

    fn close_wait(sock: u64, inode: u64, o: Owner) -> Report {
        let mut t = TransitionReport::new(
            1,
            sock,
            ends(),
            TcpState::Established,
            TcpState::CloseWait,
            inode,
        );
        t.owner = Some(o);
        Report::Transition(t)
    }

    fn closed(sock: u64, inode: u64) -> Report {
        let mut t = TransitionReport::new(
            2,
            sock,
            ends(),
            TcpState::CloseWait,
            TcpState::LastAck,
            inode,
        );
        t.close_wait_ns = Some(2_000_000_000);
        Report::Transition(t)
    }

    fn send(m: &mut MetricsSink, r: &Report) {
        let v = match r {
            Report::Transition(t) => t.verdict(),
            Report::CloseNoFin(_) => None,
        };
        m.report(r, v.as_ref()).unwrap();
    }

    fn text(r: &Exposition) -> String {
        r.encode(Format::OpenMetrics).unwrap()
    }

    const DOCKER: &str = "/system.slice/docker-3f2a9c1b7d4e5f60718293a4b5c6d7e8f0112233445566778899aabbccddeeff.scope";

    #[test]
    fn close_wait_gauge_counts_seeded_and_live_sockets_by_container() {
        let (mut m, reg) = sink(10);
        let seeded = DiagSocket {
            lport: 80,
            rport: 5000,
            ..close_wait_at_start(77)
        };
        let entries = crate::snapshot::build(vec![seeded], |_| vec![owner("imapd", DOCKER)], &[]);
        m.snapshot(&Snapshot::of(entries), false).unwrap();
        send(&mut m, &close_wait(0x100, 55, owner("imapd", DOCKER)));
        let series = r#"finwait_close_wait_sockets{comm="imapd",container_id="3f2a9c1b7d4e5f60718293a4b5c6d7e8f0112233445566778899aabbccddeeff",k8s_pod_uid="",systemd_unit="docker-3f2a9c1b7d4e5f60718293a4b5c6d7e8f0112233445566778899aabbccddeeff.scope"}"#;
        assert!(
            text(&reg).contains(&format!("{series} 2\n")),
            "{}",
            text(&reg)
        );
        // The seeded one leaves by its inode (its address was never seen), the live one by
        // address.
        send(&mut m, &closed(0x999, 77));
        send(&mut m, &closed(0x100, 0));
        let t = text(&reg);
        assert!(t.contains(&format!("{series} 0\n")), "{t}");
        assert!(
            t.contains("finwait_close_wait_duration_seconds_count 2\n"),
            "{t}"
        );
        assert!(
            t.contains("finwait_close_wait_entries_total{comm=\"imapd\""),
            "{t}"
        );
        // A socket already released is not released twice.
        send(&mut m, &closed(0x100, 0));
        assert!(text(&reg).contains(&format!("{series} 0\n")));
    }

    /// A pod's name is not a label of its series (its UID is) but of `finwait_pod_info`, once
    /// per pod, to join on; a name found later does not split the pod's series in two.
    #[test]
    fn pods_are_named_once_in_pod_info() {
        let (mut m, reg) = sink(10);
        let path = "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0d3c1a52_7e7f_4c5e_9a1b_2f6e8d9c0b1a.slice/cri-containerd-3f2a9c1b7d4e5f60718293a4b5c6d7e8f0112233445566778899aabbccddeeff.scope";
        let unnamed = owner("imapd", path);
        let mut named = owner("imapd", path);
        let mut c = Container::from_path(path);
        c.pod = Some(("shop".into(), "checkout".into()));
        named.container = Some(c.into());
        send(&mut m, &close_wait(0x100, 1, unnamed));
        send(&mut m, &close_wait(0x200, 2, named));
        let t = text(&reg);
        assert!(
            t.contains(r#"finwait_pod_info{k8s_pod_uid="0d3c1a52-7e7f-4c5e-9a1b-2f6e8d9c0b1a",k8s_namespace="shop",k8s_pod_name="checkout"} 1"#),
            "{t}"
        );
        let series: Vec<&str> = t
            .lines()
            .filter(|l| l.starts_with("finwait_close_wait_sockets{"))
            .collect();
        assert_eq!(series.len(), 1, "{t}");
        assert!(series[0].ends_with(" 2"), "{t}");
    }

    /// A socket that enters CLOSE_WAIT while the start-up inventory is read is seen by both:
    /// counted once, and released once it closes.
    #[test]
    fn a_socket_seen_by_the_inventory_and_live_counts_once() {
        let (mut m, reg) = sink(10);
        let seeded = close_wait_at_start(77);
        let entries = crate::snapshot::build(vec![seeded], |_| vec![owner("imapd", DOCKER)], &[]);
        m.snapshot(&Snapshot::of(entries), false).unwrap();
        send(&mut m, &close_wait(0x100, 77, owner("imapd", DOCKER)));
        let gauge = |t: &str| {
            t.lines()
                .find(|l| l.starts_with("finwait_close_wait_sockets{"))
                .map(|l| l.rsplit_once(' ').unwrap().1.to_string())
        };
        assert_eq!(gauge(&text(&reg)).as_deref(), Some("1"), "{}", text(&reg));
        send(&mut m, &closed(0x100, 77));
        assert_eq!(gauge(&text(&reg)).as_deref(), Some("0"), "{}", text(&reg));
        assert!(text(&reg).contains("finwait_gauge_corrections_total 0\n"));
    }

    #[test]
    fn half_closed_gauge_follows_the_verdict() {
        let (mut m, reg) = sink(10);
        let mut t =
            TransitionReport::new(1, 0x200, ends(), TcpState::FinWait1, TcpState::FinWait2, 3);
        t.cause = Some(Cause {
            kind: CauseKind::Call(Call::Shutdown),
            how: Some(1),
            task: Some(Task {
                pid: 5,
                tid: 5,
                comm: "nginx".into(),
                thread_comm: None,
                ..Task::default()
            }),
            fd: Some(4),
            exact: false,
        });
        t.orphan = Some(false);
        send(&mut m, &Report::Transition(t));
        let t = text(&reg);
        assert!(t.contains("finwait_half_closed_sockets{comm=\"nginx\",container_id=\"\",k8s_pod_uid=\"\",systemd_unit=\"\"} 1\n"), "{t}");
        assert!(
            t.contains("finwait_fin_wait2_entries_total{cause=\"shutdown\",comm=\"nginx\""),
            "{t}"
        );
        let mut end =
            TransitionReport::new(2, 0x200, ends(), TcpState::FinWait2, TcpState::TimeWait, 3);
        end.half_closed_ns = Some(1_000_000);
        send(&mut m, &Report::Transition(end));
        let t = text(&reg);
        assert!(t.contains("finwait_half_closed_sockets{comm=\"nginx\",container_id=\"\",k8s_pod_uid=\"\",systemd_unit=\"\"} 0\n"), "{t}");
        assert!(
            t.contains("finwait_half_closed_duration_seconds_count 1\n"),
            "{t}"
        );
    }

    #[test]
    fn workloads_beyond_the_cap_evict_idle_ones_then_fold_into_other() {
        let (mut m, reg) = sink(3);
        // Three holders: nobody idle.
        for (i, name) in ["a", "b", "c"].iter().enumerate() {
            send(&mut m, &close_wait(i as u64 + 1, 0, owner(name, "/")));
        }
        send(&mut m, &close_wait(4, 0, owner("d", "/")));
        let t = text(&reg);
        assert!(
            t.contains("finwait_close_wait_sockets{comm=\"other\""),
            "{t}"
        );
        assert!(!t.contains("comm=\"d\""), "{t}");
        assert!(t.contains("finwait_workloads_folded_total 1\n"), "{t}");
        // `a` closes its socket: idle, so the next newcomer takes its place.
        send(&mut m, &closed(1, 0));
        send(&mut m, &close_wait(5, 0, owner("e", "/")));
        let t = text(&reg);
        assert!(!t.contains("comm=\"a\""), "{t}");
        assert!(t.contains("finwait_close_wait_sockets{comm=\"e\""), "{t}");
        assert!(t.contains("finwait_workloads_evicted_total 1\n"), "{t}");
        // The folded socket leaves the `other` series it was counted in.
        send(&mut m, &closed(4, 0));
        assert!(text(&reg).contains("finwait_close_wait_sockets{comm=\"other\",container_id=\"\",k8s_pod_uid=\"\",systemd_unit=\"\"} 0\n"));
    }

    /// imapd holds two CLOSE_WAIT sockets: to ports 4000 (sock 1) and 4001 (sock 2).
    fn two_close_waits_of_imapd(m: &mut MetricsSink) {
        send(m, &close_wait(1, 0, owner("imapd", "/")));
        let mut other = ends();
        other.rport = 4001;
        let mut t =
            TransitionReport::new(1, 2, other, TcpState::Established, TcpState::CloseWait, 0);
        t.owner = Some(owner("imapd", "/"));
        send(m, &Report::Transition(t));
    }

    #[test]
    fn sockets_the_kernel_no_longer_has_are_released_and_counted() {
        let (mut m, reg) = sink(10);
        two_close_waits_of_imapd(&mut m);
        // The close of the first was lost: the kernel's table no longer has it.
        m.release_gone(|h| h.key.3 == 4000);
        let t = text(&reg);
        assert!(t.contains("finwait_close_wait_sockets{comm=\"imapd\",container_id=\"\",k8s_pod_uid=\"\",systemd_unit=\"\"} 1\n"), "{t}");
        assert!(t.contains("finwait_gauge_corrections_total 1\n"), "{t}");
        // Its late transition, if it comes, releases nothing more.
        send(&mut m, &closed(1, 0));
        assert!(text(&reg).contains("finwait_close_wait_sockets{comm=\"imapd\",container_id=\"\",k8s_pod_uid=\"\",systemd_unit=\"\"} 1\n"));
    }

    #[test]
    fn the_minute_check_releases_what_the_kernel_table_no_longer_has() {
        // The kernel's table: the owner (pid 7) is in namespace 70, which was read, and has only the second socket.
        let read = |_: &std::collections::HashSet<u32>| {
            let mut other = ends();
            other.rport = 4001;
            Some(CloseTable {
                ns_of: [(7, Some(70))].into(),
                read: [70].into(),
                sockets: [((70, other.key()), (TcpState::CloseWait, 9))].into(),
            })
        };
        let (mut m, reg) = MetricsSink::new(10, Box::new(read));
        two_close_waits_of_imapd(&mut m);
        m.check_against_kernel();
        let t = text(&reg);
        assert!(t.contains("finwait_close_wait_sockets{comm=\"imapd\",container_id=\"\",k8s_pod_uid=\"\",systemd_unit=\"\"} 1\n"), "{t}");
        assert!(t.contains("finwait_gauge_corrections_total 1\n"), "{t}");
    }

    #[test]
    fn an_evicted_workload_loses_the_series_of_every_cause() {
        use finwait_common::Call::{Close, CloseRange, Dup2, Dup3, Shutdown};
        let kinds = [Shutdown, Close, CloseRange, Dup2, Dup3]
            .map(CauseKind::Call)
            .into_iter()
            .chain([
                CauseKind::Exit,
                CauseKind::PeerFin,
                CauseKind::PeerRst,
                CauseKind::Timer,
                CauseKind::Unknown,
            ]);
        for k in kinds {
            assert!(CAUSES.contains(&k.name()), "{}", k.name());
        }
    }

    #[test]
    fn counters_follow_absolute_values() {
        let c = Counter::default();
        set_counter(&c, 5);
        set_counter(&c, 3);
        set_counter(&c, 9);
        assert_eq!(c.get(), 9);
    }
}

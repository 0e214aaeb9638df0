//! A dump of TCP sockets through netlink sock_diag (what `ss` uses): state, addresses, inode,
//! uid, timer with its remaining time, queues.
use std::{net::IpAddr, time::Duration};

use anyhow::{Context, Result, bail};
use finwait_common::TcpState;
use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags, Timer},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

/// The timer the kernel runs for a socket, with the time left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TimerLeft {
    Retransmit(Duration),
    /// Also the orphan FIN_WAIT2 timer of a full socket (tcp_fin_timeout above 60 s).
    KeepAlive(Duration),
    /// A time-wait mini-socket (TIME_WAIT, or substate FIN_WAIT2 for an orphan).
    TimeWait(Duration),
    Probe(Duration),
}

impl TimerLeft {
    pub(crate) fn name(self) -> &'static str {
        match self {
            TimerLeft::Retransmit(_) => "retransmit",
            TimerLeft::KeepAlive(_) => "keepalive",
            TimerLeft::TimeWait(_) => "timewait",
            TimerLeft::Probe(_) => "probe",
        }
    }
    pub(crate) fn left(self) -> Duration {
        match self {
            TimerLeft::Retransmit(d)
            | TimerLeft::KeepAlive(d)
            | TimerLeft::TimeWait(d)
            | TimerLeft::Probe(d) => d,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DiagSocket {
    pub(crate) state: TcpState,
    pub(crate) local: IpAddr,
    pub(crate) lport: u16,
    pub(crate) remote: IpAddr,
    pub(crate) rport: u16,
    /// 0 for a socket no file refers to (an orphan, or a time-wait mini-socket).
    pub(crate) inode: u64,
    pub(crate) uid: u32,
    pub(crate) timer: Option<TimerLeft>,
    pub(crate) recv_queue: u32,
    pub(crate) send_queue: u32,
    /// The network namespace it lives in (its inode; 0 where not known). Ends are unique only
    /// within a namespace: every pod has its own 127.0.0.1.
    pub(crate) netns: u64,
}

impl DiagSocket {
    pub(crate) fn key(&self) -> crate::model::EndsKey {
        crate::model::ends_key(self.local, self.lport, self.remote, self.rport)
    }
}

/// Hands every TCP socket (IPv4 and IPv6) of finwait's own network namespace in one of
/// `states` to `each`, as the kernel sends them (nothing is kept: a host's 100,000 sockets cost
/// no memory).
pub(crate) fn dump_each(states: &StateFlags, each: impl FnMut(DiagSocket)) -> Result<()> {
    Diag::here()?.dump_each(states, each)
}

/// A sock_diag socket: it answers for the network namespace it was made in, whichever thread
/// uses it later.
pub(crate) struct Diag {
    socket: Socket,
    netns: u64,
}

impl Diag {
    /// One in the calling thread's network namespace, `netns` (its inode, 0: not known).
    pub(crate) fn new(netns: u64) -> Result<Self> {
        let mut socket = Socket::new(NETLINK_SOCK_DIAG).context("a sock_diag socket")?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Self { socket, netns })
    }

    pub(crate) fn netns(&self) -> u64 {
        self.netns
    }

    /// One in finwait's own network namespace.
    pub(crate) fn here() -> Result<Self> {
        Self::new(super::namespaces::own().unwrap_or(0))
    }

    /// As [`dump_each`], in this socket's namespace.
    pub(crate) fn dump_each(
        &mut self,
        states: &StateFlags,
        mut each: impl FnMut(DiagSocket),
    ) -> Result<()> {
        let netns = self.netns;
        for family in [AF_INET, AF_INET6] {
            let request = dump_request(family, states.clone());
            let mut tagged = |mut s: DiagSocket| {
                s.netns = netns;
                each(s);
            };
            exchange(
                &mut self.socket,
                request,
                NLM_F_REQUEST | NLM_F_DUMP,
                &mut tagged,
            )
            .with_context(|| {
                format!(
                    "sock_diag dump of {} TCP sockets",
                    if family == AF_INET { "IPv4" } else { "IPv6" }
                )
            })?;
        }
        Ok(())
    }
}

/// Offset of `idiag_expires` in `struct inet_diag_msg`, after the 16-byte netlink header. The
/// crate drops it for time-wait sockets, which is exactly the time an orphan has left.
const EXPIRES_OFFSET: usize = 16 + 52;

fn dump_request(family: u8, states: StateFlags) -> InetRequest {
    let socket_id = if family == AF_INET {
        SocketId::new_v4()
    } else {
        SocketId::new_v6()
    };
    InetRequest {
        family,
        protocol: IPPROTO_TCP,
        extensions: ExtensionFlags::empty(),
        states,
        socket_id,
    }
}

/// The one TCP socket with these ends, asked of the kernel by its 4-tuple (no dump). An IPv4
/// peer of a dual-stack socket is looked up as IPv4, then as its v4-mapped IPv6 address. Asked
/// in `diag`'s namespace.
pub(crate) fn find(
    diag: &mut Diag,
    local: IpAddr,
    lport: u16,
    remote: IpAddr,
    rport: u16,
) -> Result<Option<DiagSocket>> {
    let mut tries = vec![(local, remote)];
    if let (IpAddr::V4(l), IpAddr::V4(r)) = (local, remote) {
        tries.push((l.to_ipv6_mapped().into(), r.to_ipv6_mapped().into()));
    }
    for (local, remote) in tries {
        let socket_id = SocketId {
            source_port: lport,
            destination_port: rport,
            source_address: local,
            destination_address: remote,
            interface_id: 0,
            // INET_DIAG_NOCOOKIE: match by address alone.
            cookie: [0xff; 8],
        };
        let request = InetRequest {
            family: if local.is_ipv4() { AF_INET } else { AF_INET6 },
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id,
        };
        let mut found = None;
        match exchange(&mut diag.socket, request, NLM_F_REQUEST, &mut |s| {
            found = Some(s);
        }) {
            Ok(()) if found.is_some() => return Ok(found),
            // ENOENT: not under this family; a real failure is said by the caller.
            Ok(()) | Err(_) => {}
        }
    }
    Ok(None)
}

/// Sends one sock_diag request and hands every socket of the answer to `each`.
fn exchange(
    socket: &mut Socket,
    request: InetRequest,
    flags: u16,
    each: &mut impl FnMut(DiagSocket),
) -> Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    let mut packet = NetlinkMessage::new(header, SockDiagMessage::InetRequest(request).into());
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0)?;
    let dump = flags & NLM_F_DUMP != 0;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let size = socket.recv(&mut &mut buf[..], 0)?;
        let mut offset = 0;
        while offset < size {
            let bytes = &buf[offset..size];
            let msg = <NetlinkMessage<SockDiagMessage>>::deserialize(bytes)
                .map_err(|e| anyhow::anyhow!("bad sock_diag message: {e}"))?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    let expires = bytes
                        .get(EXPIRES_OFFSET..EXPIRES_OFFSET + 4)
                        .map_or(0, |b| u32::from_ne_bytes(b.try_into().unwrap()));
                    each(convert(&r, expires));
                    if !dump {
                        return Ok(());
                    }
                }
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => bail!("sock_diag error: {e:?}"),
                _ => {}
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
}

pub(crate) fn unmap(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(a),
        v4 => v4,
    }
}

fn convert(r: &InetResponse, raw_expires_ms: u32) -> DiagSocket {
    let h = &r.header;
    let timer = h.timer.as_ref().map(|t| match *t {
        Timer::Retransmit(d, _) => TimerLeft::Retransmit(d),
        Timer::KeepAlive(d) => TimerLeft::KeepAlive(d),
        Timer::TimeWait => TimerLeft::TimeWait(Duration::from_millis(u64::from(raw_expires_ms))),
        Timer::Probe(d) => TimerLeft::Probe(d),
    });
    DiagSocket {
        state: TcpState::from_u8(h.state),
        local: unmap(h.socket_id.source_address),
        lport: h.socket_id.source_port,
        remote: unmap(h.socket_id.destination_address),
        rport: h.socket_id.destination_port,
        inode: u64::from(h.inode),
        uid: h.uid,
        timer,
        recv_queue: h.recv_queue,
        send_queue: h.send_queue,
        netns: 0,
    }
}

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

    /// As [`dump_each`], in this socket's namespace. One request answers for both address
    /// families: each dump walks the kernel's whole TCP hash table (shared by every
    /// namespace), so one walk instead of one per family halves the cost. Where the kernel
    /// refuses the older request, each family is asked for in turn.
    pub(crate) fn dump_each(
        &mut self,
        states: &StateFlags,
        mut each: impl FnMut(DiagSocket),
    ) -> Result<()> {
        let netns = self.netns;
        let mut tagged = |mut s: DiagSocket| {
            s.netns = netns;
            each(s);
        };
        let mut seen = 0usize;
        let mut counted = |s: DiagSocket| {
            seen += 1;
            tagged(s);
        };
        match dump_both(&mut self.socket, states.bits(), &mut counted) {
            Ok(()) => return Ok(()),
            // Refused before any answer: the per-family requests below; a failure midway is
            // not retried (its sockets were handed on already).
            Err(e) if seen > 0 => return Err(e).context("sock_diag dump of TCP sockets"),
            Err(_) => {}
        }
        for family in [AF_INET, AF_INET6] {
            let request = dump_request(family, states.clone());
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

/// `TCPDIAG_GETSOCK`: the request older than `SOCK_DIAG_BY_FAMILY`, still served; its dump
/// asks for no family (`AF_UNSPEC`), so IPv4 and IPv6 sockets come from one table walk.
const TCPDIAG_GETSOCK: u16 = 18;
/// `struct inet_diag_msg`: the fixed part of each answer.
const DIAG_MSG_LEN: usize = 72;
const NLMSG_HDR_LEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

/// Dumps the TCP sockets of both families in `states` (a bitmask by state number) with one
/// `TCPDIAG_GETSOCK` request, each answer read in place (nothing is allocated per socket).
fn dump_both(socket: &mut Socket, states: u32, each: &mut impl FnMut(DiagSocket)) -> Result<()> {
    // nlmsghdr, then struct inet_diag_req: family, src_len, dst_len, ext, the 48-byte
    // inet_diag_sockid (zero: any), idiag_states, idiag_dbs.
    const LEN: usize = NLMSG_HDR_LEN + 60;
    let mut req = [0u8; LEN];
    req[0..4].copy_from_slice(&(LEN as u32).to_ne_bytes());
    req[4..6].copy_from_slice(&TCPDIAG_GETSOCK.to_ne_bytes());
    req[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    let at = NLMSG_HDR_LEN + 4 + 48;
    req[at..at + 4].copy_from_slice(&states.to_ne_bytes());
    socket.send(&req, 0)?;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let size = socket.recv(&mut &mut buf[..], 0)?;
        if size == 0 {
            bail!("sock_diag: the dump ended without its last message");
        }
        let mut offset = 0;
        while offset + NLMSG_HDR_LEN <= size {
            let msg = &buf[offset..size];
            let len = u32::from_ne_bytes(msg[0..4].try_into()?) as usize;
            let kind = u16::from_ne_bytes(msg[4..6].try_into()?);
            if len < NLMSG_HDR_LEN || len > msg.len() {
                bail!("bad sock_diag message (length {len})");
            }
            match kind {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {
                    let errno = msg
                        .get(NLMSG_HDR_LEN..NLMSG_HDR_LEN + 4)
                        .map_or(0, |b| i32::from_ne_bytes(b.try_into().unwrap_or([0; 4])));
                    bail!(
                        "sock_diag error: {}",
                        std::io::Error::from_raw_os_error(-errno)
                    );
                }
                TCPDIAG_GETSOCK => {
                    if let Some(s) = parse_diag_msg(&msg[NLMSG_HDR_LEN..len]) {
                        each(s);
                    }
                }
                _ => {}
            }
            // Messages are 4-byte aligned.
            offset += (len + 3) & !3;
        }
    }
}

/// One `struct inet_diag_msg` (None: too short, or not an IPv4/IPv6 socket).
fn parse_diag_msg(m: &[u8]) -> Option<DiagSocket> {
    if m.len() < DIAG_MSG_LEN {
        return None;
    }
    let u32_at = |at: usize| u32::from_ne_bytes([m[at], m[at + 1], m[at + 2], m[at + 3]]);
    let addr = |at: usize| -> Option<IpAddr> {
        match m[0] {
            AF_INET => Some(IpAddr::from([m[at], m[at + 1], m[at + 2], m[at + 3]])),
            AF_INET6 => Some(IpAddr::from(<[u8; 16]>::try_from(&m[at..at + 16]).ok()?)),
            _ => None,
        }
    };
    let expires = Duration::from_millis(u64::from(u32_at(52)));
    let timer = match m[2] {
        1 => Some(TimerLeft::Retransmit(expires)),
        2 => Some(TimerLeft::KeepAlive(expires)),
        3 => Some(TimerLeft::TimeWait(expires)),
        4 => Some(TimerLeft::Probe(expires)),
        _ => None,
    };
    Some(DiagSocket {
        state: TcpState::from_u8(m[1]),
        local: unmap(addr(8)?),
        lport: u16::from_be_bytes([m[4], m[5]]),
        remote: unmap(addr(24)?),
        rport: u16::from_be_bytes([m[6], m[7]]),
        inode: u64::from(u32_at(68)),
        uid: u32_at(64),
        timer,
        recv_queue: u32_at(56),
        send_queue: u32_at(60),
        netns: 0,
    })
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

#[cfg(test)]
mod tests {
    use std::{net::TcpListener, os::unix::fs::MetadataExt};

    use super::*;

    /// One request answers for both families, each socket with its ends and inode.
    #[test]
    fn one_dump_answers_for_both_families() {
        let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
        // A host without IPv6 has no ::1: then only the IPv4 listener is looked for.
        let v6 = TcpListener::bind("[::1]:0").ok();
        let inode = |l: &TcpListener| {
            use std::os::fd::AsRawFd;
            std::fs::metadata(format!("/proc/self/fd/{}", l.as_raw_fd()))
                .unwrap()
                .ino()
        };
        let mut socket = Diag::here().unwrap().socket;
        let mut found = Vec::new();
        dump_both(&mut socket, 1 << 10, &mut |s| found.push(s)).unwrap();
        let mut want = vec![&v4];
        want.extend(v6.as_ref());
        for l in want {
            let at = l.local_addr().unwrap();
            let s = found
                .iter()
                .find(|s| s.inode == inode(l))
                .unwrap_or_else(|| panic!("{at} not in the dump"));
            assert_eq!(
                (s.state, s.local, s.lport),
                (TcpState::Listen, at.ip(), at.port())
            );
        }
    }
}

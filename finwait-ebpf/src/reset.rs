//! Resets: `tcp:tcp_receive_reset` (the peer reset the socket), `tcp:tcp_send_reset` (this host
//! reset the connection).
use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use finwait_common::{EventKind, Site};

use crate::{
    OTHER_TP,
    event::{new_event, submit},
    read::{config, field},
};

#[inline(always)]
fn reset(ctx: &TracePointContext, site: Site, skaddr_offset: u32, kind: EventKind) {
    if let Some(sk) = field::<u64>(ctx, site, skaddr_offset) {
        if sk != 0 {
            let mut e = new_event(kind);
            e.sock = sk;
            submit(&e);
        }
    }
}

#[tracepoint]
fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    reset(
        &ctx,
        const { Site::of("tcp_receive_reset") },
        config(&OTHER_TP).receive_reset_skaddr,
        EventKind::ReceiveReset,
    );
    0
}

#[tracepoint]
fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    reset(
        &ctx,
        const { Site::of("tcp_send_reset") },
        config(&OTHER_TP).send_reset_skaddr,
        EventKind::SendReset,
    );
    0
}

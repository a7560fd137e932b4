//! Who is connected where, and how a frame reaches its target.
//!
//! Every user has an owner worker (`uid % workers`). All of a user's WebSocket connections live
//! on its owner (a connection upgraded elsewhere is handed over), so everything about one target
//! — its devices, its offline queue hand-off, its drain — is decided by one thread, in arrival
//! order, without locks. A frame from S to T travels sender worker -> owner(T) through one FIFO
//! inbox per worker, so frames from one sender to one target cannot overtake each other.
//!
//! A target with no live connection gets its frames appended to its offline queue (through the
//! writer, acknowledged after the commit). When it connects, the queue is drained through the
//! same writer — so the drain sees every append queued before it — one batch at a time, at most
//! one drain step in flight. New frames for it wait in memory behind the drain (appended in order
//! if they grow past a bound); when a drain read comes back empty with no append in flight, the
//! held frames are delivered and the user switches to live delivery.

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

use bytes::Bytes;

use crate::conn::ReplyTo;
use crate::server::WorkerCtx;
use crate::ws::Out;

/// Frames read from the offline queue per drain step, and their approximate byte budget.
pub const DRAIN_BATCH_FRAMES: usize = 256;
pub const DRAIN_BATCH_BYTES: usize = 1 << 20;
/// Known-registered uids cached per worker (users are never deleted, so a hit is always right).
pub const KNOWN_UIDS_CACHE: usize = 1 << 20;
/// Bytes of live frames held in memory per draining user before they are appended instead.
pub const HELD_BYTES: usize = 1 << 20;

/// Which worker owns a user's connections.
pub fn owner(uid: u64, workers: usize) -> usize {
    (uid % workers as u64) as usize
}

/// Who sent a frame, for its ACK or ERROR.
#[derive(Debug, Clone, Copy)]
pub struct SenderRef {
    pub conn: ReplyTo,
    pub uid: u64,
    pub want_ack: bool,
    pub timestamp: u64,
    pub crc: u32,
}

/// Where a frame in an outbound queue came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Relayed live; if no device gets it, it goes to the offline queue.
    Live,
    /// Read from the offline queue (sequence number); it stays there until written.
    Stored(u64),
}

/// One frame handed to every live device of its target. Shared by those devices' outbound
/// queues on the owner worker (single-threaded, hence `Rc`/`Cell`).
#[derive(Debug)]
pub struct FanOut {
    pub target: u64,
    pub origin: Origin,
    pub sender: Option<SenderRef>,
    /// Written to at least one socket.
    pub delivered: Cell<bool>,
    /// Devices still holding it unsent.
    pub holders: Cell<u32>,
}

impl FanOut {
    /// Written by some device, or given up by all of them.
    pub fn resolved(&self) -> bool {
        self.delivered.get() || self.holders.get() == 0
    }
}

/// Work a connection asks its worker to do once the connection is no longer borrowed.
pub enum Effect {
    /// A checked frame for `target`.
    Deliver {
        target: u64,
        frame: Bytes,
        sender: SenderRef,
    },
    /// A server frame (ACK or ERROR) for the connection `to`.
    ServerFrame { to: ReplyTo, frame: Bytes },
    /// A live frame no device of `target` got: it goes to the offline queue. With `tentative`,
    /// it may still get out on its way: then it is retracted (see [`Effect::Retract`]).
    Spill {
        target: u64,
        frame: Bytes,
        sender: Option<SenderRef>,
        tentative: Option<u64>,
    },
    /// The tentatively queued frame `id` did get out: delete the queued copy.
    Retract { id: u64 },
    /// The tentatively queued frame `id` did not get out: the queued copy stands.
    Keep { id: u64 },
    /// The connection `conn` no longer takes frames for `uid`.
    Left { uid: u64, conn: ReplyTo },
    /// A frame of `uid`'s drain batch was written or given up.
    DrainProgress { uid: u64 },
}

/// A connection handed to its user's owner worker after the upgrade.
pub struct Adopt {
    pub sock: mio::net::TcpStream,
    /// Bytes that arrived after the upgrade request: the start of the WebSocket stream.
    pub leftover: Vec<u8>,
    pub uid: u64,
    pub token_hash: [u8; 32],
    pub acks: bool,
}

/// Messages between workers (sent in batches, one wake per batch).
pub enum RelayMsg {
    Deliver {
        target: u64,
        frame: Bytes,
        sender: SenderRef,
    },
    ServerFrame {
        to: ReplyTo,
        frame: Bytes,
    },
    Adopt(Box<Adopt>),
    /// Close the connections of `uid` opened with this token (logout, refresh, token limit).
    Revoke {
        uid: u64,
        token_hash: [u8; 32],
    },
}

/// Context of a relay write, returned with its outcome to the owner worker.
#[derive(Debug)]
pub enum RelayJob {
    Append {
        target: u64,
        sender: Option<SenderRef>,
        tentative: Option<u64>,
    },
    Retract {
        uid: u64,
    },
    Drain {
        uid: u64,
        /// False for a delete-only step (its empty answer says nothing about the queue).
        read: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Frames go straight to the devices.
    Live,
    /// The offline queue is being sent; new frames are appended behind it.
    Draining,
    /// No device: frames are appended.
    Offline,
}

/// What the owner worker knows about one of its users.
#[derive(Debug)]
pub struct UserState {
    /// The live devices, oldest first.
    pub conns: Vec<ReplyTo>,
    pub mode: Mode,
    /// Appends submitted to the writer and not yet committed.
    pub pending_appends: u32,
    /// Tentatively queued frames not yet kept or retracted: no drain reads the queue until
    /// they are settled, so a retracted copy is never delivered.
    pub tentatives: u32,
    /// The drain batch being written, oldest first.
    pub batch: Vec<Rc<FanOut>>,
    /// A drain read is at the writer.
    pub drain_in_flight: bool,
    /// The last drain read came back empty while appends were in flight: read again when they
    /// are committed.
    pub drain_after_appends: bool,
    /// Frames that arrived while draining, held in memory behind the queue (bounded; beyond
    /// the bound they are appended to the queue in order).
    pub held: VecDeque<(Bytes, SenderRef)>,
    pub held_bytes: usize,
}

impl UserState {
    fn new() -> UserState {
        UserState {
            conns: Vec::new(),
            mode: Mode::Offline,
            pending_appends: 0,
            tentatives: 0,
            batch: Vec::new(),
            drain_in_flight: false,
            drain_after_appends: false,
            held: VecDeque::new(),
            held_bytes: 0,
        }
    }

    /// Nothing left to remember: no device and no write in flight.
    pub fn forgettable(&self) -> bool {
        self.conns.is_empty()
            && self.pending_appends == 0
            && self.tentatives == 0
            && !self.drain_in_flight
            && self.batch.is_empty()
            && self.held.is_empty()
    }
}

/// A frame queued ahead of time by a closing connection that was still writing it.
#[derive(Debug)]
pub struct Tentative {
    pub uid: u64,
    pub sender: Option<SenderRef>,
    /// The append's result: the sequence number, or `Err` if it was refused.
    pub seq: Option<Result<u64, ()>>,
    /// Whether the frame got out (`true`: retract the copy).
    pub got_out: Option<bool>,
}

/// The relay state of one worker.
pub struct Relay {
    pub users: HashMap<u64, UserState>,
    pub tentatives: HashMap<u64, Tentative>,
    /// Messages to other workers, sent at the end of the loop iteration.
    pub outbox: Vec<Vec<RelayMsg>>,
}

impl Relay {
    pub fn new(workers: usize) -> Relay {
        Relay {
            users: HashMap::new(),
            tentatives: HashMap::new(),
            outbox: (0..workers).map(|_| Vec::new()).collect(),
        }
    }

    pub fn user(&mut self, uid: u64) -> &mut UserState {
        self.users.entry(uid).or_insert_with(UserState::new)
    }

    /// A frame a session of worker `me` accepted for `target`: handed back if `me` owns the
    /// target (deliver it here), otherwise put in the batch for the target's owner.
    pub fn route(
        &mut self,
        me: usize,
        target: u64,
        frame: Bytes,
        sender: SenderRef,
    ) -> Option<(Bytes, SenderRef)> {
        let owner = owner(target, self.outbox.len());
        if owner == me {
            return Some((frame, sender));
        }
        self.outbox[owner].push(RelayMsg::Deliver {
            target,
            frame,
            sender,
        });
        None
    }

    pub fn forget_if_idle(&mut self, uid: u64) {
        if self.users.get(&uid).is_some_and(UserState::forgettable) {
            self.users.remove(&uid);
        }
    }
}

/// The connections a worker can hand frames to (its slab of sockets; in benches and fuzz
/// targets, sessions over in-memory streams).
pub trait Devices {
    /// Whether the connection `to` is still there and taking frames.
    fn accepts(&self, to: ReplyTo) -> bool;
    /// Queues `out` on the connection `to` (one that [`Devices::accepts`]).
    fn push(&mut self, to: ReplyTo, out: Out, ctx: &WorkerCtx);
}

/// What became of a frame handed to [`Relay::deliver`].
pub enum Routed {
    /// In the outbound queue of every live device of the target, held behind its drain, or
    /// (every listed device leaving) queued as an [`Effect::Spill`] behind their own spills.
    Done,
    /// No device can take it: append it to the target's offline queue (after everything held
    /// for the target, if `after_held`).
    Append {
        frame: Bytes,
        sender: Option<SenderRef>,
        after_held: bool,
    },
}

impl Relay {
    /// A frame for `target`, on its owner worker: to its live devices, held behind its drain,
    /// or back to the caller for the offline queue.
    pub fn deliver(
        &mut self,
        devices: &mut impl Devices,
        ctx: &WorkerCtx,
        target: u64,
        frame: Bytes,
        sender: Option<SenderRef>,
    ) -> Routed {
        let append = |frame, after_held| Routed::Append {
            frame,
            sender,
            after_held,
        };
        let Some(u) = self.users.get_mut(&target) else {
            return append(frame, false);
        };
        match u.mode {
            Mode::Live if !u.conns.is_empty() => {
                let fan = Rc::new(FanOut {
                    target,
                    origin: Origin::Live,
                    sender,
                    delivered: Cell::new(false),
                    holders: Cell::new(0),
                });
                if fan_out(devices, ctx, &u.conns, &frame, &fan) == 0 {
                    // Every listed device is leaving: the frames they had not sent are queued
                    // as effects not run yet, and this later frame must be stored behind them.
                    ctx.effect(Effect::Spill {
                        target,
                        frame,
                        sender,
                        tentative: None,
                    });
                }
                Routed::Done
            }
            Mode::Draining if !u.conns.is_empty() => {
                if let Some(s) = sender
                    && u.held_bytes + frame.len() <= HELD_BYTES
                {
                    u.held_bytes += frame.len();
                    u.held.push_back((frame, s));
                    return Routed::Done;
                }
                // Too much held: everything held goes to the queue first, in order.
                append(frame, true)
            }
            _ => append(frame, false),
        }
    }
}

/// Hands a frame to every device in `to` still taking frames; returns how many took it. A free
/// function so the caller can lend the user's device list without copying it per frame.
pub fn fan_out(
    devices: &mut impl Devices,
    ctx: &WorkerCtx,
    to: &[ReplyTo],
    frame: &Bytes,
    fan: &Rc<FanOut>,
) -> u32 {
    for &dest in to {
        if devices.accepts(dest) {
            fan.holders.set(fan.holders.get() + 1);
            devices.push(
                dest,
                Out::Relay {
                    frame: frame.clone(),
                    fan: fan.clone(),
                },
                ctx,
            );
        }
    }
    fan.holders.get()
}

/// The delivered prefix of a resolved batch: the last sequence number that can be deleted.
pub fn delivered_through(batch: &[Rc<FanOut>]) -> Option<u64> {
    let mut last = None;
    for f in batch {
        if !f.delivered.get() {
            break;
        }
        if let Origin::Stored(seq) = f.origin {
            last = Some(seq);
        }
    }
    last
}

/// Queue of outbound items for one connection.
pub type OutQueue = VecDeque<crate::ws::Out>;

#[cfg(test)]
mod tests {
    use super::*;

    fn fan(seq: u64, delivered: bool) -> Rc<FanOut> {
        Rc::new(FanOut {
            target: 1,
            origin: Origin::Stored(seq),
            sender: None,
            delivered: Cell::new(delivered),
            holders: Cell::new(0),
        })
    }

    #[test]
    fn delivered_prefix() {
        assert_eq!(delivered_through(&[]), None);
        assert_eq!(
            delivered_through(&[fan(4, true), fan(5, true), fan(6, false)]),
            Some(5)
        );
        assert_eq!(delivered_through(&[fan(4, false), fan(5, true)]), None);
    }

    #[test]
    fn owners_spread_users() {
        assert_eq!(owner(7, 2), 1);
        assert_eq!(owner(8, 2), 0);
        assert_eq!(owner(8, 1), 0);
    }
}

//! One worker: a mio event loop over its own listener, connections and inbox. Nothing here
//! blocks; password checks and writes are handed off and come back through the inbox, and so do
//! frames and connections from other workers.

use std::cell::Cell;
use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use super::{Completion, JobCtx, WorkerCtx};
use crate::api::Api;
use crate::conn::{Conn, Next, ReplyTo};
use crate::frame::{self, error_code};
use crate::relay::{
    self, Adopt, DRAIN_BATCH_BYTES, DRAIN_BATCH_FRAMES, Devices, Effect, FanOut, Mode, Origin,
    Relay, RelayJob, RelayMsg, Routed, SenderRef,
};
use crate::store::{WriteOp, WriteOutcome};
use crate::ws::{self, Out, WsSession};

pub(super) const LISTENER: Token = Token(usize::MAX - 1);
pub(super) const WAKER: Token = Token(usize::MAX - 2);
/// Readiness events taken from the kernel per poll call.
const EVENTS_PER_POLL: usize = 1024;
/// The worker's read buffer, shared by all its connections: idle connections own no buffer.
const SCRATCH_BYTES: usize = 64 * 1024;
/// Timers are checked this often at most (and at least every second).
const MAX_SWEEP_INTERVAL: Duration = Duration::from_secs(1);
const MIN_SWEEP_INTERVAL: Duration = Duration::from_millis(50);
/// "Connection limit reached" is logged at most this often per worker.
const FULL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// State shared by all workers.
#[derive(Clone)]
pub(super) struct Shared {
    pub stop: Arc<AtomicBool>,
    pub open_conns: Arc<AtomicUsize>,
    /// Workers that have begun draining; a worker exits only when all have, so no frame is
    /// sent to a worker that is gone.
    pub draining_workers: Arc<AtomicUsize>,
    pub mailboxes: Vec<(Sender<Completion>, Arc<Waker>)>,
}

pub(super) struct Worker {
    poll: Poll,
    listener: Option<TcpListener>,
    inbox: Receiver<Completion>,
    ctx: WorkerCtx,
    shared: Shared,
    conns: Slab<Conn>,
    relay: Relay,
    scratch: Vec<u8>,
    next_gen: u32,
    yielded: Vec<usize>,
    /// Connections with new output to write before the next poll.
    dirty: Vec<usize>,
    /// The relay effects being run (kept for its capacity, see [`WorkerCtx::swap_effects`]).
    effects: Vec<Effect>,
    sweep_every: Duration,
    last_full_log: Option<Instant>,
}

impl Worker {
    pub(super) fn new(
        poll: Poll,
        mut listener: TcpListener,
        inbox: Receiver<Completion>,
        ctx: WorkerCtx,
        shared: Shared,
    ) -> io::Result<Worker> {
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let c = &ctx.config;
        let shortest = c
            .request_timeout
            .min(c.idle_timeout)
            .min(c.ping_after)
            .min(c.ws_idle_timeout);
        let sweep_every = (shortest / 10).clamp(MIN_SWEEP_INTERVAL, MAX_SWEEP_INTERVAL);
        Ok(Worker {
            poll,
            listener: Some(listener),
            inbox,
            relay: Relay::new(ctx.workers),
            ctx,
            shared,
            conns: Slab::new(),
            scratch: vec![0; SCRATCH_BYTES],
            next_gen: 0,
            yielded: Vec::new(),
            dirty: Vec::new(),
            effects: Vec::new(),
            sweep_every,
            last_full_log: None,
        })
    }

    pub(super) fn run(mut self) {
        let mut events = Events::with_capacity(EVENTS_PER_POLL);
        let mut last_sweep = Instant::now();
        let mut drain_deadline: Option<Instant> = None;
        loop {
            let timeout = if self.yielded.is_empty() {
                self.sweep_every
            } else {
                Duration::ZERO
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                log::error!("worker {}: poll failed: {e}", self.ctx.id);
                break;
            }
            self.ctx.tick();
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    WAKER => {}
                    Token(key) => {
                        if let Some(conn) = self.conns.get_mut(key) {
                            conn.ready(
                                event.is_readable() || event.is_read_closed() || event.is_error(),
                                event.is_writable() || event.is_write_closed() || event.is_error(),
                                event.is_read_closed() || event.is_error(),
                            );
                            self.drive(key);
                        }
                    }
                }
            }
            self.completions();
            for key in std::mem::take(&mut self.yielded) {
                if self.conns.contains(key) {
                    self.drive(key);
                }
            }
            self.settle();
            let now = self.ctx.now();
            if drain_deadline.is_none() && self.shared.stop.load(Ordering::SeqCst) {
                drain_deadline = Some(now + self.ctx.config.shutdown_grace);
                self.begin_drain();
            }
            if let Some(deadline) = drain_deadline
                && (self.conns.is_empty() || now >= deadline)
                && self.shared.draining_workers.load(Ordering::SeqCst) == self.ctx.workers
            {
                break;
            }
            if now.duration_since(last_sweep) >= self.sweep_every {
                last_sweep = now;
                self.sweep();
                self.settle();
            }
        }
        self.finish();
    }

    /// Last steps at shutdown: drop what is left (unsent frames go to the offline queue),
    /// take what other workers sent before they stopped, hand the writes to the writer.
    fn finish(&mut self) {
        let left = self.conns.len();
        if left > 0 {
            log::warn!(
                "worker {}: closing {left} connections still busy at the end of the grace period",
                self.ctx.id
            );
        }
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.close(key);
        }
        self.completions();
        self.settle();
    }

    fn accept(&mut self) {
        loop {
            let Some(listener) = self.listener.as_ref() else {
                return;
            };
            match listener.accept() {
                Ok((sock, _peer)) => {
                    let max = self.ctx.config.max_connections;
                    if self.shared.open_conns.fetch_add(1, Ordering::Relaxed) >= max {
                        self.shared.open_conns.fetch_sub(1, Ordering::Relaxed);
                        drop(sock);
                        self.log_full();
                        continue;
                    }
                    if let Err(e) = sock.set_nodelay(true) {
                        log::debug!("TCP_NODELAY: {e}");
                    }
                    if self.insert(sock, Conn::new).is_none() {
                        self.shared.open_conns.fetch_sub(1, Ordering::Relaxed);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(e) => {
                    // EMFILE and friends: leave the connection in the queue; it is retried on
                    // the next listener event.
                    log::error!("worker {}: accept failed: {e}", self.ctx.id);
                    return;
                }
            }
        }
    }

    /// Registers a socket and stores its connection; returns its slab key.
    fn insert(
        &mut self,
        mut sock: mio::net::TcpStream,
        make: impl FnOnce(mio::net::TcpStream, ReplyTo, Instant) -> Conn,
    ) -> Option<usize> {
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        if let Err(e) = self.poll.registry().register(
            &mut sock,
            Token(key),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            log::error!("cannot register a connection: {e}");
            return None;
        }
        self.next_gen = self.next_gen.wrapping_add(1);
        let reply_to = ReplyTo {
            worker: self.ctx.id,
            key,
            generation: self.next_gen,
        };
        entry.insert(make(sock, reply_to, self.ctx.now()));
        Some(key)
    }

    fn log_full(&mut self) {
        let now = self.ctx.now();
        if self
            .last_full_log
            .is_none_or(|t| now.duration_since(t) >= FULL_LOG_INTERVAL)
        {
            self.last_full_log = Some(now);
            log::warn!(
                "connection limit ({}) reached: closing new connections",
                self.ctx.config.max_connections
            );
        }
    }

    fn drive(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        match conn.drive(&self.ctx, &mut self.scratch) {
            Next::Wait => {}
            Next::Yield => self.yielded.push(key),
            Next::Close => self.close(key),
            Next::Upgrade => self.upgrade(key),
        }
    }

    fn close(&mut self, key: usize) {
        if let Some(mut conn) = self.conns.try_remove(key) {
            conn.on_close(&self.ctx);
            let _ = self.poll.registry().deregister(conn.socket());
            self.shared.open_conns.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The 101 is written: the session starts here if this worker owns the user, otherwise the
    /// socket moves to the owner.
    fn upgrade(&mut self, key: usize) {
        let Some((grant, leftover)) = self.conns.get_mut(key).and_then(Conn::take_upgrade) else {
            return;
        };
        let owner = relay::owner(grant.uid, self.ctx.workers);
        if owner == self.ctx.id {
            let session = WsSession::new(
                leftover,
                grant.uid,
                grant.token_hash,
                grant.acks,
                self.ctx.session,
                self.ctx.now(),
            );
            if let Some(conn) = self.conns.get_mut(key) {
                conn.become_ws(session);
            }
            self.join(grant.uid, key);
            self.drive(key);
        } else {
            let mut conn = self.conns.remove(key);
            let _ = self.poll.registry().deregister(conn.socket());
            self.relay.outbox[owner].push(RelayMsg::Adopt(Box::new(Adopt {
                sock: conn.into_socket(),
                leftover,
                uid: grant.uid,
                token_hash: grant.token_hash,
                acks: grant.acks,
            })));
        }
    }

    fn adopt(&mut self, a: Adopt) {
        let Adopt {
            sock,
            leftover,
            uid,
            token_hash,
            acks,
        } = a;
        let session = WsSession::new(
            leftover,
            uid,
            token_hash,
            acks,
            self.ctx.session,
            self.ctx.now(),
        );
        let Some(key) = self.insert(sock, |sock, reply_to, now| {
            Conn::adopted(sock, reply_to, session, now)
        }) else {
            self.shared.open_conns.fetch_sub(1, Ordering::Relaxed);
            return;
        };
        self.join(uid, key);
        if self.ctx.draining()
            && let Some(conn) = self.conns.get_mut(key)
        {
            conn.drain_for_shutdown(&self.ctx);
        }
        self.drive(key);
    }

    /// A device of `uid` connected on this (its owner) worker.
    fn join(&mut self, uid: u64, key: usize) {
        // A device that left in this wakeup has queued its unsent frames and its departure:
        // they come first, so this join sees the user as it now is.
        self.settle_effects();
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let me = conn.reply_to();
        // The token was checked when the upgrade request was read; a logout or refresh may
        // have revoked it since (while the 101 waited behind other answers, or while the
        // socket was on its way here) and its revocation found no connection to close. A
        // revocation committed after this read reaches the device through `revoke`.
        let live = conn.session().is_some_and(|s| {
            self.ctx
                .api
                .store()
                .read()
                .and_then(|r| r.token(&s.token_hash))
                .map(|t| t.is_some_and(|t| t.is_live(crate::api::now_ms())))
                .unwrap_or_else(|e| {
                    log::error!("token check of a new WebSocket failed: {e}");
                    false
                })
        });
        if !live {
            conn.policy_close(&self.ctx, "token revoked");
            self.dirty.push(key);
            return;
        }
        // Frames another device of this user holds and no device has written yet go to the
        // new device first, in order, so that no later frame can overtake them on it (see
        // `WsSession::undelivered_live`). Before the device limit below, so a device this one
        // replaces hands them over instead of spilling them to the queue.
        let inherited = self.undelivered_of_devices(uid);
        if !inherited.is_empty()
            && let Some(conn) = self.conns.get_mut(key)
        {
            for (frame, fan) in inherited {
                fan.holders.set(fan.holders.get() + 1);
                conn.push_out(Out::Relay { frame, fan }, &self.ctx);
            }
            self.dirty.push(key);
        }
        let max_devices = self.ctx.config.max_devices;
        let oldest = {
            let user = self.relay.user(uid);
            (user.conns.len() >= max_devices).then(|| user.conns[0])
        };
        if let Some(old) = oldest
            && let Some(conn) = self.conns.get_mut(old.key)
            && conn.reply_to() == old
        {
            conn.policy_close(&self.ctx, "replaced by a newer device");
            self.dirty.push(old.key);
        }
        let user = self.relay.user(uid);
        user.conns.push(me);
        if user.mode == Mode::Offline {
            let queued = if user.pending_appends > 0 || user.tentatives > 0 || user.drain_in_flight
            {
                1
            } else {
                self.ctx
                    .api
                    .store()
                    .read()
                    .and_then(|r| r.queued_frames(uid))
                    .unwrap_or(1)
            };
            if queued == 0 {
                user.mode = Mode::Live;
            } else {
                user.mode = Mode::Draining;
                self.want_drain(uid);
            }
        }
    }

    /// The longest list of live frames one of `uid`'s devices holds unwritten by any device.
    /// Every device gets every live frame in order, so the device furthest behind holds all of
    /// them. Only while the user is live: while draining, later frames are held, not fanned out.
    fn undelivered_of_devices(&self, uid: u64) -> Vec<(Bytes, Rc<FanOut>)> {
        let Some(user) = self.relay.users.get(&uid) else {
            return Vec::new();
        };
        if user.mode != Mode::Live {
            return Vec::new();
        }
        let mut longest = Vec::new();
        for &to in &user.conns {
            if let Some(session) = self
                .conns
                .get(to.key)
                .filter(|c| c.reply_to() == to)
                .and_then(Conn::session)
            {
                let frames = session.undelivered_live();
                if frames.len() > longest.len() {
                    longest = frames;
                }
            }
        }
        longest
    }

    /// Starts a drain read unless one is already under way (its answer continues the drain).
    fn want_drain(&mut self, uid: u64) {
        let user = self.relay.user(uid);
        if user.drain_in_flight || !user.batch.is_empty() {
            return;
        }
        if user.tentatives > 0 {
            user.drain_after_appends = true;
            return;
        }
        self.submit_drain(uid, None, DRAIN_BATCH_FRAMES);
    }

    fn submit_drain(&mut self, uid: u64, delete_through: Option<u64>, max_frames: usize) {
        // A batch must fit under the slow-consumer limit with room to spare, or draining a
        // big queue would itself look like a slow consumer.
        let cfg = &self.ctx.config;
        let max_bytes =
            (cfg.slow_consumer_bytes.saturating_sub(cfg.max_frame) / 2).clamp(1, DRAIN_BATCH_BYTES);
        let op = WriteOp::Drain {
            uid,
            delete_through,
            max_frames,
            max_bytes,
        };
        let job = RelayJob::Drain {
            uid,
            read: max_frames > 0,
        };
        let ok = self
            .ctx
            .writer
            .submit(op, JobCtx::Relay(self.ctx.id, job))
            .is_ok();
        let user = self.relay.user(uid);
        if ok {
            user.drain_in_flight = true;
        } else {
            log::warn!("writer queue full: drain of uid {uid} retried later");
        }
    }

    /// A frame for `target`, on its owner worker.
    fn deliver(&mut self, target: u64, frame: Bytes, sender: Option<SenderRef>) {
        let mut devices = Slots {
            conns: &mut self.conns,
            dirty: &mut self.dirty,
        };
        if let Routed::Append {
            frame,
            sender,
            after_held,
        } = self
            .relay
            .deliver(&mut devices, &self.ctx, target, frame, sender)
        {
            if after_held {
                self.release_held(target);
            }
            self.append(target, frame, sender, None, Custody::Sender);
        }
    }

    /// Appends every frame held for `uid` to its queue, in order.
    fn release_held(&mut self, uid: u64) {
        let held = match self.relay.users.get_mut(&uid) {
            Some(u) => {
                u.held_bytes = 0;
                std::mem::take(&mut u.held)
            }
            None => return,
        };
        for (frame, sender) in held {
            self.append(uid, frame, Some(sender), None, Custody::Server);
        }
    }

    /// The queue is empty and nothing is on its way to it: deliver what was held, go live.
    fn go_live(&mut self, uid: u64) {
        let user = self.relay.user(uid);
        user.mode = Mode::Live;
        user.held_bytes = 0;
        let held = std::mem::take(&mut user.held);
        for (frame, sender) in held {
            self.deliver(uid, frame, Some(sender));
        }
    }

    /// Appends a frame to `target`'s offline queue; its sender hears back after the commit.
    fn append(
        &mut self,
        target: u64,
        frame: Bytes,
        sender: Option<SenderRef>,
        tentative: Option<u64>,
        custody: Custody,
    ) {
        if let Some(id) = tentative {
            self.relay.tentatives.insert(
                id,
                relay::Tentative {
                    uid: target,
                    sender,
                    seq: None,
                    got_out: None,
                },
            );
            self.relay.user(target).tentatives += 1;
        }
        let op = WriteOp::Append {
            uid: target,
            frame,
            limits: self.ctx.queue_limits,
        };
        // A tentative frame is acknowledged when it is settled, not when it is queued.
        let job = RelayJob::Append {
            target,
            sender: if tentative.is_some() { None } else { sender },
            tentative,
        };
        let ctx = JobCtx::Relay(self.ctx.id, job);
        let submitted = match custody {
            Custody::Sender => self.ctx.writer.submit(op, ctx),
            Custody::Server => self
                .ctx
                .writer
                .submit_wait(op, ctx, self.ctx.config.spill_wait),
        };
        match submitted {
            Ok(()) => {
                let user = self.relay.user(target);
                user.pending_appends += 1;
                if user.mode == Mode::Live && !user.conns.is_empty() {
                    // Stored while the user still has devices (one left with frames the
                    // others never had, or a newer device replaced it): those devices get it
                    // through a drain once it is committed, and later frames wait behind it;
                    // otherwise it would sit in the queue, overtaken, until a reconnect.
                    user.mode = Mode::Draining;
                    user.drain_after_appends = true;
                }
            }
            Err(_) => match tentative {
                Some(id) => self.tentative_update(id, Some(Err(())), None),
                None => {
                    log::warn!("writer queue full: a frame for uid {target} was refused");
                    self.refuse(sender, "offline queue unavailable, retry later");
                }
            },
        }
    }

    /// Records what is known of a tentatively queued frame; once both its append result and
    /// its fate are known, keeps or retracts the queued copy.
    fn tentative_update(&mut self, id: u64, seq: Option<Result<u64, ()>>, got_out: Option<bool>) {
        let Some(t) = self.relay.tentatives.get_mut(&id) else {
            return;
        };
        if seq.is_some() {
            t.seq = seq;
        }
        if got_out.is_some() {
            t.got_out = got_out;
        }
        let (Some(seq), Some(got_out)) = (t.seq, t.got_out) else {
            return;
        };
        let Some(t) = self.relay.tentatives.remove(&id) else {
            return;
        };
        match (seq, got_out) {
            (Ok(seq), true) => {
                let op = WriteOp::Retract { uid: t.uid, seq };
                let job = RelayJob::Retract { uid: t.uid };
                if self
                    .ctx
                    .writer
                    .submit(op, JobCtx::Relay(self.ctx.id, job))
                    .is_ok()
                {
                    self.relay.user(t.uid).pending_appends += 1;
                } else {
                    log::error!("writer queue full: uid {} may get frame {seq} twice", t.uid);
                }
            }
            (Ok(_), false) => {
                if let Some(s) = t.sender.filter(|s| s.want_ack) {
                    self.server_frame(s.conn, ws::ack(&s, frame::ack_status::STORED));
                }
            }
            (Err(()), false) => self.refuse(t.sender, "offline queue of the target is full"),
            (Err(()), true) => {}
        }
        let user = self.relay.user(t.uid);
        user.tentatives = user.tentatives.saturating_sub(1);
        self.maybe_redrain(t.uid);
        self.relay.forget_if_idle(t.uid);
    }

    /// Continues a drain that waited for appends or tentative frames to settle.
    fn maybe_redrain(&mut self, uid: u64) {
        let user = self.relay.user(uid);
        if user.pending_appends == 0
            && user.tentatives == 0
            && !user.conns.is_empty()
            && std::mem::take(&mut user.drain_after_appends)
        {
            self.want_drain(uid);
        }
    }

    /// Tells the sender (if still connected) that its frame could not be stored.
    fn refuse(&mut self, sender: Option<SenderRef>, reason: &str) {
        match sender {
            Some(s) => {
                let mut out = Vec::new();
                frame::encode_error(
                    &mut out,
                    s.uid,
                    crate::api::now_ms(),
                    error_code::QUEUE_FULL,
                    s.crc,
                    reason,
                );
                self.server_frame(s.conn, Bytes::from(out));
            }
            None => log::error!("a frame whose sender is gone could not be stored: {reason}"),
        }
    }

    fn server_frame(&mut self, to: ReplyTo, frame: Bytes) {
        if to.worker != self.ctx.id {
            self.relay.outbox[to.worker].push(RelayMsg::ServerFrame { to, frame });
            return;
        }
        if let Some(conn) = self.conns.get_mut(to.key)
            && conn.reply_to() == to
        {
            conn.push_out(Out::Server(frame), &self.ctx);
            self.dirty.push(to.key);
        }
    }

    fn relay_write_done(&mut self, job: RelayJob, outcome: WriteOutcome) {
        match job {
            RelayJob::Retract { uid } => {
                let user = self.relay.user(uid);
                user.pending_appends = user.pending_appends.saturating_sub(1);
                self.maybe_redrain(uid);
                self.relay.forget_if_idle(uid);
            }
            RelayJob::Append {
                target,
                sender: _,
                tentative: Some(id),
            } => {
                let user = self.relay.user(target);
                user.pending_appends = user.pending_appends.saturating_sub(1);
                let seq = match outcome {
                    WriteOutcome::Appended { seq } => Ok(seq),
                    _ => Err(()),
                };
                self.tentative_update(id, Some(seq), None);
                self.maybe_redrain(target);
                self.relay.forget_if_idle(target);
            }
            RelayJob::Append {
                target,
                sender,
                tentative: None,
            } => {
                let user = self.relay.user(target);
                user.pending_appends = user.pending_appends.saturating_sub(1);
                let redrain = user.pending_appends == 0
                    && user.tentatives == 0
                    && std::mem::take(&mut user.drain_after_appends);
                match outcome {
                    WriteOutcome::Appended { .. } => {
                        if let Some(s) = sender.filter(|s| s.want_ack) {
                            self.server_frame(s.conn, ws::ack(&s, frame::ack_status::STORED));
                        }
                    }
                    WriteOutcome::QueueFull => {
                        self.refuse(sender, "offline queue of the target is full")
                    }
                    other => {
                        log::error!("append failed: {other:?}");
                        self.refuse(sender, "storage error, retry later");
                    }
                }
                if redrain && !self.relay.user(target).conns.is_empty() {
                    self.want_drain(target);
                }
                self.relay.forget_if_idle(target);
            }
            RelayJob::Drain { uid, read } => {
                let frames = match outcome {
                    WriteOutcome::Drained { frames } => frames,
                    other => {
                        log::error!("drain of uid {uid} failed: {other:?}");
                        Vec::new()
                    }
                };
                let user = self.relay.user(uid);
                user.drain_in_flight = false;
                if user.conns.is_empty() {
                    user.mode = Mode::Offline;
                    self.release_held(uid);
                } else if !read {
                    // Only deleted; a device connected meanwhile: read on.
                    self.want_drain(uid);
                } else if frames.is_empty() {
                    if user.pending_appends == 0 && user.tentatives == 0 {
                        self.go_live(uid);
                    } else {
                        user.drain_after_appends = true;
                    }
                } else {
                    let holders = user.conns.clone();
                    let mut batch = Vec::with_capacity(frames.len());
                    for (seq, bytes) in frames {
                        let fan = Rc::new(FanOut {
                            target: uid,
                            origin: Origin::Stored(seq),
                            sender: None,
                            delivered: Cell::new(false),
                            holders: Cell::new(0),
                        });
                        relay::fan_out(
                            &mut Slots {
                                conns: &mut self.conns,
                                dirty: &mut self.dirty,
                            },
                            &self.ctx,
                            &holders,
                            &bytes,
                            &fan,
                        );
                        batch.push(fan);
                    }
                    self.relay.user(uid).batch = batch;
                    self.drain_progress(uid);
                }
                self.relay.forget_if_idle(uid);
            }
        }
    }

    /// When every frame of the batch is written (or given up), delete what was written and
    /// read the next batch.
    fn drain_progress(&mut self, uid: u64) {
        let Some(user) = self.relay.users.get_mut(&uid) else {
            return;
        };
        if user.batch.is_empty() || !user.batch.iter().all(|f| f.resolved()) {
            return;
        }
        let through = relay::delivered_through(&user.batch);
        user.batch.clear();
        if user.conns.is_empty() {
            user.mode = Mode::Offline;
            if through.is_some() {
                self.submit_drain(uid, through, 0);
            }
        } else {
            self.submit_drain(uid, through, DRAIN_BATCH_FRAMES);
        }
    }

    fn left(&mut self, uid: u64, conn: ReplyTo) {
        let user = self.relay.user(uid);
        user.conns.retain(|&c| c != conn);
        if user.conns.is_empty() {
            user.mode = Mode::Offline;
            self.release_held(uid);
        }
        self.relay.forget_if_idle(uid);
    }

    fn revoke(&mut self, uid: u64, token_hash: [u8; 32]) {
        let owner = relay::owner(uid, self.ctx.workers);
        if owner != self.ctx.id {
            self.relay.outbox[owner].push(RelayMsg::Revoke { uid, token_hash });
            return;
        }
        let keys = self
            .relay
            .users
            .get(&uid)
            .map(|u| u.conns.clone())
            .unwrap_or_default();
        for to in keys {
            if let Some(conn) = self.conns.get_mut(to.key)
                && conn.accepts(to)
                && conn.session().is_some_and(|s| s.token_hash == token_hash)
            {
                conn.policy_close(&self.ctx, "token revoked");
                self.dirty.push(to.key);
            }
        }
    }

    /// Runs what other threads sent. Relay effects queued before each message are run first:
    /// a frame a leaving device gave back must reach the offline queue before a frame that
    /// arrives after it, and a device must join after its predecessor has left.
    fn completions(&mut self) {
        self.settle_effects();
        while let Ok(done) = self.inbox.try_recv() {
            match done {
                Completion::Auth(to, verdict, pending) => {
                    self.resume(to, |api, p| api.after_auth(verdict, p), pending);
                }
                Completion::Write(to, outcome, pending) => {
                    for (uid, hash) in Api::revoked_tokens(&outcome, &pending) {
                        self.revoke(uid, hash);
                    }
                    self.resume(to, |api, p| api.after_write(outcome, p), pending);
                }
                Completion::RelayWrite(job, outcome) => self.relay_write_done(job, outcome),
                Completion::Relay(msgs) => {
                    for msg in msgs {
                        match msg {
                            RelayMsg::Deliver {
                                target,
                                frame,
                                sender,
                            } => self.deliver(target, frame, Some(sender)),
                            RelayMsg::ServerFrame { to, frame } => self.server_frame(to, frame),
                            RelayMsg::Adopt(a) => self.adopt(*a),
                            RelayMsg::Revoke { uid, token_hash } => self.revoke(uid, token_hash),
                        }
                        self.settle_effects();
                    }
                }
            }
            self.settle_effects();
        }
    }

    fn resume(
        &mut self,
        to: ReplyTo,
        next: impl FnOnce(&Api, crate::api::Pending) -> crate::api::Action,
        pending: crate::api::Pending,
    ) {
        let Some(conn) = self.conns.get_mut(to.key) else {
            return;
        };
        if conn.reply_to() != to {
            // The connection closed while its job ran; the slot was reused since.
            return;
        }
        let api = &self.ctx.api;
        conn.resume(&self.ctx, |p| next(api, p), pending);
        self.drive(to.key);
    }

    /// Runs the relay work connections asked for, until none is left.
    fn settle_effects(&mut self) {
        let mut effects = std::mem::take(&mut self.effects);
        loop {
            self.ctx.swap_effects(&mut effects);
            if effects.is_empty() {
                break;
            }
            for e in effects.drain(..) {
                match e {
                    Effect::Deliver {
                        target,
                        frame,
                        sender,
                    } => {
                        if let Some((frame, sender)) =
                            self.relay.route(self.ctx.id, target, frame, sender)
                        {
                            self.deliver(target, frame, Some(sender));
                        }
                    }
                    Effect::ServerFrame { to, frame } => self.server_frame(to, frame),
                    Effect::Spill {
                        target,
                        frame,
                        sender,
                        tentative,
                    } => self.append(target, frame, sender, tentative, Custody::Server),
                    Effect::Left { uid, conn } => self.left(uid, conn),
                    Effect::Retract { id } => self.tentative_update(id, None, Some(true)),
                    Effect::Keep { id } => self.tentative_update(id, None, Some(false)),
                    Effect::DrainProgress { uid } => self.drain_progress(uid),
                }
            }
        }
        self.effects = effects;
    }

    /// Effects, then writes to every connection that got output, until nothing changes; then
    /// the batches for other workers go out (one wake each).
    fn settle(&mut self) {
        loop {
            self.settle_effects();
            if self.dirty.is_empty() {
                break;
            }
            let mut dirty = std::mem::take(&mut self.dirty);
            dirty.sort_unstable();
            dirty.dedup();
            for key in dirty {
                self.drive(key);
            }
        }
        for (dest, msgs) in self.relay.outbox.iter_mut().enumerate() {
            if msgs.is_empty() {
                continue;
            }
            let (tx, waker) = &self.shared.mailboxes[dest];
            if tx.send(Completion::Relay(std::mem::take(msgs))).is_ok() {
                let _ = waker.wake();
            }
        }
    }

    fn sweep(&mut self) {
        let mut due = Vec::new();
        for (key, conn) in self.conns.iter_mut() {
            if let Some(next) = conn.check_timers(&self.ctx) {
                due.push((key, next));
            }
        }
        for (key, next) in due {
            match next {
                Next::Close => self.close(key),
                _ => self.drive(key),
            }
        }
        // A drain the writer could not take earlier (queue full) is retried here.
        let stalled: Vec<u64> = self
            .relay
            .users
            .iter()
            .filter(|(_, u)| {
                u.mode == Mode::Draining
                    && !u.drain_in_flight
                    && u.batch.is_empty()
                    && u.pending_appends == 0
                    && !u.conns.is_empty()
            })
            .map(|(uid, _)| *uid)
            .collect();
        for uid in stalled {
            self.relay.user(uid).drain_after_appends = false;
            self.want_drain(uid);
        }
    }

    fn begin_drain(&mut self) {
        log::debug!(
            "worker {}: draining {} connections",
            self.ctx.id,
            self.conns.len()
        );
        self.ctx.draining.set(true);
        // Connections the kernel already completed are in flight from the client's side:
        // closing the listener would reset them, so take them first.
        self.accept();
        if let Some(mut listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut listener);
        }
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            // Read what has arrived, so a request already sent counts as in flight. Its
            // readiness event may still be queued in the poller, so try the read regardless.
            if let Some(conn) = self.conns.get_mut(key) {
                conn.ready(true, true, false);
            }
            self.drive(key);
            let idle = self
                .conns
                .get_mut(key)
                .is_some_and(|c| c.drain_for_shutdown(&self.ctx));
            if idle {
                self.close(key);
            } else {
                self.drive(key);
            }
        }
        self.settle();
        let draining = self.shared.draining_workers.fetch_add(1, Ordering::SeqCst) + 1;
        if draining == self.ctx.workers {
            // The last one in: the others may be waiting for this to exit.
            for (_, waker) in &self.shared.mailboxes {
                let _ = waker.wake();
            }
        }
    }
}

/// Who holds a frame that is to be stored, which decides what a full writer queue means.
#[derive(Clone, Copy)]
enum Custody {
    /// Fresh from its sender, who is told to retry if the writer is full.
    Sender,
    /// Given back by a leaving device or held behind a drain: the server alone has it, so a
    /// full writer queue is waited out (up to `--spill-wait`) rather than refused.
    Server,
}

/// The worker's connections as the relay sees them; every connection handed a frame is
/// marked for writing before the next poll.
struct Slots<'a> {
    conns: &'a mut Slab<Conn>,
    dirty: &'a mut Vec<usize>,
}

impl Devices for Slots<'_> {
    fn accepts(&self, to: ReplyTo) -> bool {
        self.conns.get(to.key).is_some_and(|c| c.accepts(to))
    }

    fn push(&mut self, to: ReplyTo, out: Out, ctx: &WorkerCtx) {
        if let Some(conn) = self.conns.get_mut(to.key) {
            conn.push_out(out, ctx);
            self.dirty.push(to.key);
        }
    }
}

//! One worker: a mio event loop over its own listener, connections and inbox. Nothing here
//! blocks; password checks and writes are handed off and come back through the inbox.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use super::{Completion, WorkerCtx};
use crate::conn::{Conn, Next, ReplyTo};

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

pub(super) struct Worker {
    poll: Poll,
    listener: Option<TcpListener>,
    inbox: Receiver<Completion>,
    ctx: WorkerCtx,
    stop: Arc<AtomicBool>,
    open_conns: Arc<AtomicUsize>,
    conns: Slab<Conn>,
    scratch: Vec<u8>,
    next_gen: u32,
    yielded: Vec<usize>,
    sweep_every: Duration,
    last_full_log: Option<Instant>,
}

impl Worker {
    pub(super) fn new(
        poll: Poll,
        mut listener: TcpListener,
        inbox: Receiver<Completion>,
        ctx: WorkerCtx,
        stop: Arc<AtomicBool>,
        open_conns: Arc<AtomicUsize>,
    ) -> io::Result<Worker> {
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let shortest = ctx.config.request_timeout.min(ctx.config.idle_timeout);
        let sweep_every = (shortest / 10).clamp(MIN_SWEEP_INTERVAL, MAX_SWEEP_INTERVAL);
        Ok(Worker {
            poll,
            listener: Some(listener),
            inbox,
            ctx,
            stop,
            open_conns,
            conns: Slab::new(),
            scratch: vec![0; SCRATCH_BYTES],
            next_gen: 0,
            yielded: Vec::new(),
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
            self.ctx.now.set(Instant::now());
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    WAKER => {}
                    Token(key) => {
                        if let Some(conn) = self.conns.get_mut(key) {
                            conn.ready(
                                event.is_readable() || event.is_read_closed() || event.is_error(),
                                event.is_writable() || event.is_write_closed() || event.is_error(),
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
            let now = self.ctx.now();
            if drain_deadline.is_none() && self.stop.load(Ordering::SeqCst) {
                drain_deadline = Some(now + self.ctx.config.shutdown_grace);
                self.begin_drain();
            }
            if let Some(deadline) = drain_deadline
                && (self.conns.is_empty() || now >= deadline)
            {
                break;
            }
            if now.duration_since(last_sweep) >= self.sweep_every {
                last_sweep = now;
                self.sweep();
            }
        }
        let left = self.conns.len();
        if left > 0 {
            log::warn!(
                "worker {}: closing {left} connections still busy at the end of the grace period",
                self.ctx.id
            );
        }
        for conn in self.conns.drain() {
            drop(conn);
            self.open_conns.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn accept(&mut self) {
        loop {
            let Some(listener) = self.listener.as_ref() else {
                return;
            };
            match listener.accept() {
                Ok((mut sock, _peer)) => {
                    let max = self.ctx.config.max_connections;
                    if self.open_conns.fetch_add(1, Ordering::Relaxed) >= max {
                        self.open_conns.fetch_sub(1, Ordering::Relaxed);
                        drop(sock);
                        self.log_full();
                        continue;
                    }
                    if let Err(e) = sock.set_nodelay(true) {
                        log::debug!("TCP_NODELAY: {e}");
                    }
                    let entry = self.conns.vacant_entry();
                    let key = entry.key();
                    if let Err(e) = self.poll.registry().register(
                        &mut sock,
                        Token(key),
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        log::error!("cannot register a connection: {e}");
                        self.open_conns.fetch_sub(1, Ordering::Relaxed);
                        continue;
                    }
                    self.next_gen = self.next_gen.wrapping_add(1);
                    let reply_to = ReplyTo {
                        worker: self.ctx.id,
                        key,
                        generation: self.next_gen,
                    };
                    log::trace!("worker {}: accepted connection {key}", self.ctx.id);
                    entry.insert(Conn::new(sock, reply_to, self.ctx.now()));
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
        }
    }

    fn close(&mut self, key: usize) {
        if let Some(mut conn) = self.conns.try_remove(key) {
            log::trace!("worker {}: closing connection {key}", self.ctx.id);
            let _ = self.poll.registry().deregister(conn.socket());
            self.open_conns.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn completions(&mut self) {
        while let Ok(done) = self.inbox.try_recv() {
            let to = match &done {
                Completion::Auth(to, ..) | Completion::Write(to, ..) => *to,
            };
            let Some(conn) = self.conns.get_mut(to.key) else {
                continue;
            };
            if conn.reply_to() != to {
                // The connection closed while its job ran; the slot was reused since.
                continue;
            }
            let api = &self.ctx.api;
            match done {
                Completion::Auth(_, verdict, pending) => {
                    conn.resume(&self.ctx, |p| api.after_auth(verdict, p), pending);
                }
                Completion::Write(_, outcome, pending) => {
                    conn.resume(&self.ctx, |p| api.after_write(outcome, p), pending);
                }
            }
            self.drive(to.key);
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
                conn.ready(true, true);
            }
            self.drive(key);
            let idle = self
                .conns
                .get_mut(key)
                .is_some_and(|c| c.drain_for_shutdown());
            if idle {
                self.close(key);
            } else {
                self.drive(key);
            }
        }
    }
}

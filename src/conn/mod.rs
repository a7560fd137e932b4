//! One client connection: its buffers and its state machine.
//!
//! A connection serves HTTP/1.x requests in order. A request that needs work off the reactor
//! (a password hash, a durable write) parks the connection: nothing after it is parsed until its
//! answer is in the write buffer, so pipelined answers can never overtake each other, and the
//! worker serves other connections meanwhile. Closing goes through a lingering stage: the write
//! side is shut and unread input drained for a while, so the kernel does not reset the socket
//! and destroy an error answer the client has not read yet.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::time::Instant;

use mio::net::TcpStream;

use crate::api::{Action, Pending, WsGrant};
use crate::http::{self, Parsed, Request, Response, Status, encode_response};
use crate::server::{JobCtx, WorkerCtx};
use crate::ws::{self, Out, WsSession};

/// Input bytes one connection may consume per wakeup before others get their turn.
pub const READ_BUDGET: usize = 256 * 1024;
/// Size of each read into a connection's own buffer (when a partial request is pending).
const READ_CHUNK: usize = 16 * 1024;
/// Write buffers larger than this are released once flushed, instead of kept for reuse.
const KEEP_WBUF_CAPACITY: usize = 16 * 1024;

/// Where a completed off-reactor job must go back to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyTo {
    pub worker: usize,
    pub key: usize,
    pub generation: u32,
}

/// What the worker should do with the connection after driving it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Wait for the next readiness event or completion.
    Wait,
    /// The read budget ran out with input still available: drive it again soon.
    Yield,
    /// Done: deregister and drop.
    Close,
    /// The 101 answer is written: hand the socket to the WebSocket stage.
    Upgrade,
}

enum Phase {
    Http,
    /// Write side shut; input is read and discarded until EOF or the deadline.
    Lingering {
        until: Instant,
    },
    WebSocket(Box<WsSession>),
}

/// Reads once, keeping the connection's readiness, for both the HTTP and the WebSocket stage.
/// The poller is edge-triggered and signals every arrival of new data, so after a read that
/// returned less than asked for (or `WouldBlock`) nothing more is there until the next event:
/// no read syscall is made that would only fail, and a connection driven because it has output
/// does not read at all. Once the peer's FIN has been signalled (`peer_closed`) that edge is
/// spent, so reading goes on until the 0 that reports it; otherwise a FIN that arrived with the
/// last data would go unnoticed and frames would be written to a peer that is gone.
fn read_ready(
    sock: &mut TcpStream,
    buf: &mut [u8],
    readable: &mut bool,
    peer_closed: bool,
) -> io::Result<usize> {
    if !*readable {
        return Err(io::ErrorKind::WouldBlock.into());
    }
    loop {
        match sock.read(buf) {
            Ok(n) => {
                if n == 0 || (n < buf.len() && !peer_closed) {
                    *readable = false;
                }
                return Ok(n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                if e.kind() == io::ErrorKind::WouldBlock {
                    *readable = false;
                }
                return Err(e);
            }
        }
    }
}

/// The socket as a WebSocket session reads it (see [`read_ready`]).
struct Readiness<'a> {
    sock: &'a mut TcpStream,
    readable: &'a mut bool,
    peer_closed: bool,
}

impl Read for Readiness<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        read_ready(self.sock, buf, self.readable, self.peer_closed)
    }
}

impl Write for Readiness<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sock.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.sock.flush()
    }
}

/// One connection's state.
pub struct Conn {
    sock: TcpStream,
    reply_to: ReplyTo,
    phase: Phase,
    /// Unparsed input: empty (and unallocated) while the connection is idle.
    rbuf: Vec<u8>,
    /// Unsent output, from `wpos`.
    wbuf: Vec<u8>,
    wpos: usize,
    /// Edge-triggered readiness not yet used up (set by events, cleared by WouldBlock).
    can_read: bool,
    can_write: bool,
    /// A request waits for off-reactor work; holds its keep-alive flag.
    parked: Option<bool>,
    /// Close once the output is flushed.
    close_after: bool,
    peer_eof: bool,
    /// The poller reported the peer's FIN (or an error): read until EOF, see [`read_ready`].
    peer_closed: bool,
    /// When the first byte of the request now being received arrived.
    request_started: Option<Instant>,
    /// Last read or write progress.
    last_active: Instant,
    /// An accepted upgrade waiting for its 101 to be written.
    upgrade: Option<WsGrant>,
}

impl Conn {
    pub fn new(sock: TcpStream, reply_to: ReplyTo, now: Instant) -> Conn {
        Conn {
            sock,
            reply_to,
            phase: Phase::Http,
            rbuf: Vec::new(),
            wbuf: Vec::new(),
            wpos: 0,
            can_read: true,
            can_write: true,
            parked: None,
            close_after: false,
            peer_eof: false,
            peer_closed: false,
            request_started: None,
            last_active: now,
            upgrade: None,
        }
    }

    /// A connection that arrives already upgraded (handed over by another worker).
    pub fn adopted(sock: TcpStream, reply_to: ReplyTo, session: WsSession, now: Instant) -> Conn {
        let mut c = Conn::new(sock, reply_to, now);
        c.phase = Phase::WebSocket(Box::new(session));
        c
    }

    /// After [`Next::Upgrade`]: the grant and the bytes that followed the upgrade request.
    pub fn take_upgrade(&mut self) -> Option<(WsGrant, Vec<u8>)> {
        let grant = self.upgrade.take()?;
        Some((grant, std::mem::take(&mut self.rbuf)))
    }

    /// Turns this connection into a WebSocket session in place.
    pub fn become_ws(&mut self, session: WsSession) {
        self.phase = Phase::WebSocket(Box::new(session));
        self.rbuf = Vec::new();
        self.wbuf = Vec::new();
        self.wpos = 0;
    }

    /// Gives the socket up (to move it to another worker).
    pub fn into_socket(self) -> TcpStream {
        self.sock
    }

    pub fn session(&self) -> Option<&WsSession> {
        match &self.phase {
            Phase::WebSocket(ws) => Some(ws),
            _ => None,
        }
    }

    /// Whether this is the connection `to` and its session still takes frames.
    pub fn accepts(&self, to: ReplyTo) -> bool {
        self.reply_to == to && self.session().is_some_and(WsSession::accepting)
    }

    /// Hands a frame to this connection's WebSocket session (or back to the relay if it has
    /// none any more).
    pub fn push_out(&mut self, out: Out, ctx: &WorkerCtx) {
        match &mut self.phase {
            Phase::WebSocket(ws) => ws.push(out, ctx),
            _ => drop(out),
        }
    }

    /// Closes the WebSocket with 1008 (revoked token, device limit).
    pub fn policy_close(&mut self, ctx: &WorkerCtx, reason: &'static str) {
        let me = self.reply_to;
        if let Phase::WebSocket(ws) = &mut self.phase {
            ws.policy_close(&mut self.sock, ctx, me, reason);
        }
    }

    /// The connection is being dropped: a WebSocket session returns its unsent frames.
    pub fn on_close(&mut self, ctx: &WorkerCtx) {
        let me = self.reply_to;
        if let Phase::WebSocket(ws) = &mut self.phase {
            ws.finish(ctx, me);
        }
    }

    pub fn reply_to(&self) -> ReplyTo {
        self.reply_to
    }

    pub fn socket(&mut self) -> &mut TcpStream {
        &mut self.sock
    }

    /// Records a readiness event.
    pub fn ready(&mut self, readable: bool, writable: bool, peer_closed: bool) {
        self.can_read |= readable;
        self.peer_closed |= peer_closed;
        self.can_write |= writable;
    }

    fn has_output(&self) -> bool {
        self.wpos < self.wbuf.len()
    }

    fn pending_output(&self) -> usize {
        self.wbuf.len() - self.wpos
    }

    fn can_process(&self, ctx: &WorkerCtx) -> bool {
        matches!(self.phase, Phase::Http)
            && self.parked.is_none()
            && self.upgrade.is_none()
            && !self.close_after
            && self.pending_output() < ctx.config.max_pending_output
    }

    /// Makes all the progress possible without blocking: write, parse, serve, read.
    pub fn drive(&mut self, ctx: &WorkerCtx, scratch: &mut [u8]) -> Next {
        if let Phase::WebSocket(ws) = &mut self.phase {
            let mut sock = Readiness {
                sock: &mut self.sock,
                readable: &mut self.can_read,
                peer_closed: self.peer_closed,
            };
            return ws.drive(&mut sock, ctx, self.reply_to, scratch);
        }
        let mut budget = READ_BUDGET;
        loop {
            let mut progress = false;
            if self.has_output() && self.can_write {
                match self.flush() {
                    Ok(p) => {
                        if p {
                            // A client reading a long answer slowly is not idle.
                            self.last_active = ctx.now();
                        }
                        progress |= p;
                    }
                    Err(_) => return Next::Close,
                }
            }
            if let Phase::Lingering { .. } = self.phase {
                return self.linger(scratch);
            }
            if self.close_after && self.parked.is_none() && !self.has_output() {
                // Everything answered: shut our side and drain theirs before closing.
                let _ = self.sock.shutdown(Shutdown::Write);
                self.phase = Phase::Lingering {
                    until: ctx.now() + ctx.config.linger,
                };
                self.rbuf = Vec::new();
                self.wbuf = Vec::new();
                self.wpos = 0;
                if self.peer_eof {
                    return Next::Close;
                }
                continue;
            }
            if !self.rbuf.is_empty() && self.can_process(ctx) {
                let input = std::mem::take(&mut self.rbuf);
                let out_before = self.wbuf.len();
                let used = self.process(ctx, &input);
                self.rbuf = input;
                self.rbuf.drain(..used);
                progress |= used > 0 || self.wbuf.len() != out_before;
            }
            if self.can_read && !self.peer_eof && self.can_process(ctx) && budget > 0 {
                match self.read_more(ctx, scratch) {
                    Ok(0) => {}
                    Ok(n) => {
                        budget = budget.saturating_sub(n);
                        progress = true;
                    }
                    Err(_) => return Next::Close,
                }
            }
            if !progress {
                break;
            }
        }
        if self.upgrade.is_some() && !self.has_output() {
            return Next::Upgrade;
        }
        if self.peer_eof && self.parked.is_none() && !self.has_output() {
            // The client is gone (or half-closed with nothing complete left to answer).
            return Next::Close;
        }
        if self.wbuf.capacity() > KEEP_WBUF_CAPACITY && !self.has_output() {
            self.wbuf = Vec::new();
            self.wpos = 0;
        }
        if budget == 0 && self.can_read {
            Next::Yield
        } else {
            Next::Wait
        }
    }

    /// Reads once; returns the bytes read (0 on WouldBlock or EOF, which it records).
    fn read_more(&mut self, ctx: &WorkerCtx, scratch: &mut [u8]) -> io::Result<usize> {
        if self.rbuf.is_empty() {
            // The common case: nothing pending, so read into the worker's scratch buffer,
            // serve what is complete and keep only a partial tail.
            let n = match read(
                &mut self.sock,
                scratch,
                &mut self.can_read,
                self.peer_closed,
                &mut self.peer_eof,
            )? {
                0 => return Ok(0),
                n => n,
            };
            self.last_active = ctx.now();
            let used = self.process(ctx, &scratch[..n]);
            self.rbuf.extend_from_slice(&scratch[used..n]);
            Ok(n)
        } else {
            let len = self.rbuf.len();
            self.rbuf.resize(len + READ_CHUNK, 0);
            let r = read(
                &mut self.sock,
                &mut self.rbuf[len..],
                &mut self.can_read,
                self.peer_closed,
                &mut self.peer_eof,
            );
            let n = *r.as_ref().unwrap_or(&0);
            self.rbuf.truncate(len + n);
            if n > 0 {
                self.last_active = ctx.now();
            }
            r
        }
    }

    /// Writes buffered output; returns whether any byte went out.
    fn flush(&mut self) -> io::Result<bool> {
        let mut progress = false;
        while self.has_output() {
            match self.sock.write(&self.wbuf[self.wpos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.wpos += n;
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.can_write = false;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if !self.has_output() {
            self.wbuf.clear();
            self.wpos = 0;
        }
        Ok(progress)
    }

    /// Reads and discards input, at most [`READ_BUDGET`] bytes per wakeup, so a client that
    /// keeps sending cannot hold the worker.
    fn linger(&mut self, scratch: &mut [u8]) -> Next {
        let mut budget = READ_BUDGET;
        loop {
            if !self.can_read {
                return Next::Wait;
            }
            if budget == 0 {
                return Next::Yield;
            }
            match read(
                &mut self.sock,
                scratch,
                &mut self.can_read,
                self.peer_closed,
                &mut self.peer_eof,
            ) {
                Ok(_) if self.peer_eof => return Next::Close,
                Ok(n) => budget = budget.saturating_sub(n),
                Err(_) => return Next::Close,
            }
        }
    }

    /// Parses and serves complete requests from `input`; returns the bytes consumed.
    fn process(&mut self, ctx: &WorkerCtx, input: &[u8]) -> usize {
        let mut off = 0;
        while self.can_process(ctx) && off < input.len() {
            match http::parse_request(&input[off..], &ctx.limits) {
                Ok(Parsed::Partial) => {
                    if self.request_started.is_none() {
                        self.request_started = Some(ctx.now());
                    }
                    break;
                }
                Ok(Parsed::Complete(req, n)) => {
                    off += n;
                    self.request_started = None;
                    self.serve(ctx, &req);
                }
                Err(e) => {
                    let (status, msg) = e.status_and_msg();
                    log::debug!("closing {:?} after a bad request: {msg}", self.reply_to);
                    self.respond(&Response::error(status, msg), true);
                    return input.len();
                }
            }
        }
        off
    }

    fn serve(&mut self, ctx: &WorkerCtx, req: &Request<'_>) {
        if req.path == ws::PATH {
            return self.upgrade(ctx, req);
        }
        let keep_alive = req.keep_alive && !ctx.draining();
        let action = ctx.api.handle(req);
        self.run(ctx, action, keep_alive);
    }

    /// `GET /wsconn`: a valid handshake with a live token gets 101; the rest of the input then
    /// belongs to the WebSocket stream.
    fn upgrade(&mut self, ctx: &WorkerCtx, req: &Request<'_>) {
        if ctx.draining() {
            return self.respond(
                &Response::error(Status::ServiceUnavailable, "server shutting down"),
                true,
            );
        }
        let accept = match ws::check_upgrade(req) {
            Ok(a) => a,
            Err(ws::BadUpgrade(status, msg)) => {
                return self.respond(&Response::error(status, msg), true);
            }
        };
        match ctx.api.authorize_ws(req) {
            Ok(grant) => {
                ws::accept_response(&mut self.wbuf, &accept);
                self.upgrade = Some(grant);
            }
            Err(resp) => self.respond(&resp, true),
        }
    }

    fn run(&mut self, ctx: &WorkerCtx, action: Action, keep_alive: bool) {
        let submitted = match action {
            Action::Respond(resp) => {
                self.respond(&resp, !keep_alive);
                return;
            }
            Action::Auth(task, pending) => ctx
                .auth
                .submit(task, (self.reply_to, pending))
                .map_err(|busy| busy.0.1),
            Action::Write(op, pending) => ctx
                .writer
                .submit(op, JobCtx::Http(self.reply_to, pending))
                .map_err(|busy| match busy.0 {
                    JobCtx::Http(_, pending) => pending,
                    JobCtx::Relay(..) => unreachable!("submitted as HTTP"),
                }),
        };
        match submitted {
            Ok(()) => self.parked = Some(keep_alive),
            Err(pending) => {
                log::warn!("{} refused: work queue full", pending.kind());
                self.respond(
                    &Response::error(Status::ServiceUnavailable, "server busy, retry later"),
                    !keep_alive,
                );
            }
        }
    }

    /// Continues the parked request with the result of its off-reactor work.
    pub fn resume(
        &mut self,
        ctx: &WorkerCtx,
        next: impl FnOnce(Pending) -> Action,
        pending: Pending,
    ) {
        let Some(keep_alive) = self.parked.take() else {
            log::error!("completion for {:?}, which was not parked", self.reply_to);
            return;
        };
        self.run(ctx, next(pending), keep_alive && !ctx.draining());
    }

    fn respond(&mut self, resp: &Response, close: bool) {
        encode_response(&mut self.wbuf, resp.status, &resp.body, close);
        if close {
            self.close_after = true;
        }
    }

    /// Applies timeouts; returns `Close` when the connection must go now.
    pub fn check_timers(&mut self, ctx: &WorkerCtx) -> Option<Next> {
        let now = ctx.now();
        match self.phase {
            Phase::WebSocket(ref mut ws) => ws.check_timers(&mut self.sock, ctx, self.reply_to),
            Phase::Lingering { until } => (now >= until).then_some(Next::Close),
            Phase::Http if self.parked.is_some() => None,
            Phase::Http => {
                if let Some(started) = self.request_started
                    && now.duration_since(started) >= ctx.config.request_timeout
                    && !self.close_after
                {
                    self.request_started = None;
                    self.rbuf = Vec::new();
                    self.respond(
                        &Response::error(Status::RequestTimeout, "request not received in time"),
                        true,
                    );
                    return Some(Next::Wait);
                }
                if now.duration_since(self.last_active) >= ctx.config.idle_timeout {
                    return Some(Next::Close);
                }
                None
            }
        }
    }

    /// At shutdown: whether the connection can be dropped right away (nothing in flight);
    /// otherwise it is marked to close after its current answer.
    pub fn drain_for_shutdown(&mut self, ctx: &WorkerCtx) -> bool {
        match &mut self.phase {
            Phase::Lingering { .. } => return true,
            Phase::WebSocket(ws) => {
                ws.shutdown(&mut self.sock, ctx, self.reply_to);
                return false;
            }
            Phase::Http => {}
        }
        let idle = self.parked.is_none() && !self.has_output() && self.rbuf.is_empty();
        if !idle && self.parked.is_none() && self.rbuf.is_empty() {
            // Only output left: close once it is written. A parked request or a request still
            // arriving is answered first (with `Connection: close`, as the worker is draining).
            self.close_after = true;
        }
        idle
    }
}

/// One read that turns WouldBlock and EOF into flags, so callers only see real errors.
fn read(
    sock: &mut TcpStream,
    buf: &mut [u8],
    can_read: &mut bool,
    peer_closed: bool,
    eof: &mut bool,
) -> io::Result<usize> {
    match read_ready(sock, buf, can_read, peer_closed) {
        Ok(0) => {
            *eof = true;
            Ok(0)
        }
        Ok(n) => Ok(n),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
        Err(e) => Err(e),
    }
}

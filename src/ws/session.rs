//! One WebSocket session on its owner worker: tungstenite's protocol state over our socket, the
//! outbound queue, and the relay rules for inbound frames.
//!
//! tungstenite frames every outbound message, but into the session's own buffer: it is given a
//! stream that reads from the socket and writes into that buffer, so data frames, pongs and the
//! close frame keep their order and the session writes them to the socket itself, once per
//! wakeup. It remembers where each data frame ends in the buffer, so it always knows exactly which
//! frames have left user space (those are "delivered") and which have not (those go to the
//! offline queue if the connection dies).

use std::collections::VecDeque;
use std::io::{self, Cursor, Read, Write};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tungstenite::Message;
use tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
use tungstenite::protocol::frame::coding::{CloseCode, OpCode};
use tungstenite::protocol::frame::{CloseFrame, FrameHeader};
use tungstenite::protocol::{Role, WebSocketConfig, WebSocketContext};

use super::close_code;
use crate::conn::{Next, ReplyTo};
use crate::frame::{self, Frame, FrameError, error_code};
use crate::relay::{Effect, FanOut, Origin, SenderRef};
use crate::server::WorkerCtx;

/// Inbound messages handled per wakeup before other connections get their turn.
const READ_BUDGET_MESSAGES: usize = 256;
/// Room in tungstenite's write buffer beyond one frame, for pings, pongs and the close frame.
const CONTROL_ROOM: usize = 1024;
/// Encoded bytes waiting for the socket before no more frames are encoded: the rest stay in the
/// queue as frames, where they can still be handed back whole.
const ENCODE_AHEAD: usize = 64 * 1024;
/// The longest WebSocket frame header: 2 bytes, a 64-bit length and a mask (RFC 6455 5.2).
const MAX_HEADER: usize = 14;
/// A write buffer larger than this is released once it is empty.
const KEEP_WBUF: usize = 16 * 1024;

/// tungstenite's view of the connection: it reads from the socket and writes into the session's
/// buffer (which never blocks), so everything it sends is ordered with our frames. Every byte read
/// is also shown to `seen`, which knows where frames end.
struct Io<'a, S> {
    sock: &'a mut S,
    out: &'a mut Vec<u8>,
    seen: &'a mut Boundary,
}

impl<S: Read> Read for Io<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.sock.read(buf)?;
        self.seen.feed(&buf[..n]);
        Ok(n)
    }
}

impl<S> Write for Io<'_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Where the bytes read so far end, in WebSocket terms: inside a frame header, inside a
/// payload, inside a fragmented message, or exactly between messages. Headers are parsed with
/// tungstenite's own parser; only lengths and flags are looked at here.
///
/// tungstenite's context keeps a read buffer (and a write buffer as large as the largest frame
/// it wrote) for the life of the connection. Between messages it holds nothing else of value, so
/// an idle session can drop it and start a fresh one when data comes (HARD-PARTS 12); this tells
/// when that is safe.
#[derive(Debug, Default)]
struct Boundary {
    /// Payload bytes of the current frame not yet seen.
    payload_left: u64,
    /// The start of a header not yet complete.
    head: [u8; MAX_HEADER],
    head_len: usize,
    /// A data frame without FIN was seen; its message is not complete.
    fragmented: bool,
    /// Something tungstenite will refuse: never call this stream idle again.
    broken: bool,
}

impl Boundary {
    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() && !self.broken {
            if self.payload_left > 0 {
                let n = (data.len() as u64).min(self.payload_left);
                self.payload_left -= n;
                data = &data[n as usize..];
                continue;
            }
            let take = data.len().min(self.head.len() - self.head_len);
            let had = self.head_len;
            self.head[had..had + take].copy_from_slice(&data[..take]);
            let mut cursor = Cursor::new(&self.head[..had + take]);
            match FrameHeader::parse(&mut cursor) {
                Ok(Some((header, len))) => {
                    let used = cursor.position() as usize - had;
                    data = &data[used..];
                    self.head_len = 0;
                    self.payload_left = len;
                    // Control frames may come between a message's fragments; they change nothing.
                    if let OpCode::Data(_) = header.opcode {
                        self.fragmented = !header.is_final;
                    }
                }
                Ok(None) => {
                    self.head_len = had + take;
                    data = &data[take..];
                }
                Err(_) => self.broken = true,
            }
        }
    }

    /// Every byte read so far belongs to a complete message.
    fn between_messages(&self) -> bool {
        self.payload_left == 0 && self.head_len == 0 && !self.fragmented && !self.broken
    }
}

/// The session's tungstenite context, made afresh if it was released while idle.
fn context<'a>(
    slot: &'a mut Option<Box<WebSocketContext>>,
    config: &SessionConfig,
) -> &'a mut WebSocketContext {
    slot.get_or_insert_with(|| Box::new(new_context(Vec::new(), config)))
}

fn new_context(leftover: Vec<u8>, config: &SessionConfig) -> WebSocketContext {
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(config.read_buffer)
        .write_buffer_size(0)
        .max_write_buffer_size(config.max_frame + CONTROL_ROOM)
        .max_message_size(Some(config.max_frame))
        .max_frame_size(Some(config.max_frame));
    WebSocketContext::from_partially_read(leftover, Role::Server, Some(ws_config))
}

/// Session limits, from [`crate::config::Config`].
#[derive(Debug, Clone, Copy)]
pub struct SessionConfig {
    pub max_frame: usize,
    pub read_buffer: usize,
    pub rate_per_sec: u32,
    pub rate_burst: u32,
    pub slow_consumer_bytes: usize,
    pub linger: Duration,
    pub ping_after: Duration,
    pub idle_timeout: Duration,
    /// Quiet this long, an idle session releases its buffers ([`WsSession::release_buffers`]).
    pub release_after: Duration,
}

/// An outbound item.
pub enum Out {
    /// A frame from another user, shared with the target's other devices.
    Relay { frame: Bytes, fan: Rc<FanOut> },
    /// An ACK or ERROR for this connection.
    Server(Bytes),
}

impl Out {
    fn bytes(&self) -> &Bytes {
        match self {
            Out::Relay { frame, .. } => frame,
            Out::Server(b) => b,
        }
    }
}

/// Token bucket for inbound frames.
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn take(&mut self, now: Instant, rate: u32, burst: u32) -> bool {
        let refill = now.duration_since(self.last).as_secs_f64() * f64::from(rate);
        self.tokens = (self.tokens + refill).min(f64::from(burst));
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

pub struct WsSession {
    pub uid: u64,
    pub token_hash: [u8; 32],
    pub acks: bool,
    config: SessionConfig,
    /// tungstenite's protocol state and buffers; `None` while released (see [`Boundary`]).
    ws: Option<Box<WebSocketContext>>,
    seen: Boundary,
    /// The last read found the socket empty: tungstenite holds no complete frame.
    read_dry: bool,
    outq: VecDeque<Out>,
    queued_bytes: usize,
    /// Encoded bytes for the socket, written up to `wpos`.
    wbuf: Vec<u8>,
    wpos: usize,
    /// Data frames in `wbuf` not yet entirely written: (start, end, item), oldest first.
    encoded: VecDeque<(usize, usize, Out)>,
    /// tungstenite answered the peer's close: once `wbuf` is out, the connection is over.
    terminated: bool,
    bucket: Bucket,
    last_inbound: Instant,
    ping_sent: bool,
    /// Too much unsent output: closed with 1013 on the next drive.
    slow: bool,
    /// The half-written frame was queued ahead of time under this id (see [`Self::leave`]).
    tentative: Option<u64>,
    /// Our close frame is queued; the connection ends at the peer's answer or at this time.
    closing: Option<Instant>,
    /// The relay was told this connection takes no more frames.
    left: bool,
}

fn would_block(e: &WsError) -> bool {
    matches!(e, WsError::Io(io) if io.kind() == io::ErrorKind::WouldBlock)
}

impl WsSession {
    pub fn new(
        leftover: Vec<u8>,
        uid: u64,
        token_hash: [u8; 32],
        acks: bool,
        config: SessionConfig,
        now: Instant,
    ) -> WsSession {
        let mut seen = Boundary::default();
        seen.feed(&leftover);
        WsSession {
            uid,
            token_hash,
            acks,
            config,
            // No context (and no read buffer) until there is something to read.
            ws: (!leftover.is_empty()).then(|| Box::new(new_context(leftover, &config))),
            seen,
            read_dry: false,
            outq: VecDeque::new(),
            queued_bytes: 0,
            wbuf: Vec::new(),
            wpos: 0,
            encoded: VecDeque::new(),
            terminated: false,
            bucket: Bucket {
                tokens: f64::from(config.rate_burst),
                last: now,
            },
            last_inbound: now,
            ping_sent: false,
            slow: false,
            tentative: None,
            closing: None,
            left: false,
        }
    }

    /// Whether the relay may still hand this session frames (until it has left, frames keep
    /// their order in its queue even while closing).
    pub fn accepting(&self) -> bool {
        !self.left
    }

    /// The live frames this session holds that no device has written yet, oldest first (the
    /// one being written included). A device of the same user joining now gets them ahead of
    /// later frames: otherwise, if this session then ended with them unsent, they would go to
    /// the offline queue and reach the new device behind frames it already has.
    pub fn undelivered_live(&self) -> Vec<(Bytes, Rc<FanOut>)> {
        if self.left {
            return Vec::new();
        }
        self.encoded
            .iter()
            .map(|(_, _, out)| out)
            .chain(self.outq.iter())
            .filter_map(|out| match out {
                Out::Relay { frame, fan } if fan.origin == Origin::Live && !fan.delivered.get() => {
                    Some((frame.clone(), fan.clone()))
                }
                _ => None,
            })
            .collect()
    }

    /// Queues an outbound item (a relayed frame or a server frame).
    pub fn push(&mut self, out: Out, ctx: &WorkerCtx) {
        if self.left {
            self.give_up(out, ctx);
            return;
        }
        self.queued_bytes += out.bytes().len();
        self.outq.push_back(out);
        if self.queued_bytes + (self.wbuf.len() - self.wpos) > self.config.slow_consumer_bytes {
            self.slow = true;
        }
    }

    /// Reads, relays and writes as far as possible without blocking. `scratch` is the worker's
    /// read buffer, used while the session holds none of its own.
    pub fn drive<S: Read + Write>(
        &mut self,
        sock: &mut S,
        ctx: &WorkerCtx,
        me: ReplyTo,
        scratch: &mut [u8],
    ) -> Next {
        if self.slow && self.closing.is_none() {
            log::debug!("uid {}: slow consumer, closing with 1013", self.uid);
            self.close(
                sock,
                ctx,
                me,
                close_code::TRY_AGAIN_LATER,
                "too much unread; reconnect to receive the rest",
            );
        }
        let mut messages = 0;
        loop {
            if self.pump(sock, ctx, me).is_err() {
                return self.finish(ctx, me);
            }
            if self.terminated {
                return if self.wpos == self.wbuf.len() {
                    self.finish(ctx, me)
                } else {
                    Next::Wait
                };
            }
            if self.closing.is_some() {
                return self.read_until_closed(sock, ctx, me);
            }
            if messages >= READ_BUDGET_MESSAGES {
                return Next::Yield;
            }
            if self.ws.is_none() {
                // Released while idle: look for input with the worker's buffer first, so a
                // wakeup with nothing to read allocates nothing.
                match sock.read(scratch) {
                    Ok(0) => return self.finish(ctx, me),
                    Ok(n) => {
                        self.seen.feed(&scratch[..n]);
                        self.read_dry = false;
                        self.ws = Some(Box::new(new_context(scratch[..n].to_vec(), &self.config)));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.read_dry = true;
                        return match self.pump(sock, ctx, me) {
                            Ok(()) => Next::Wait,
                            Err(()) => self.finish(ctx, me),
                        };
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => return self.finish(ctx, me),
                }
            }
            let read = context(&mut self.ws, &self.config).read(&mut Io {
                sock: &mut *sock,
                out: &mut self.wbuf,
                seen: &mut self.seen,
            });
            match read {
                Ok(msg) => {
                    self.read_dry = false;
                    messages += 1;
                    self.last_inbound = ctx.now();
                    self.ping_sent = false;
                    match msg {
                        Message::Binary(b) => self.on_frame(b, ctx, me),
                        Message::Text(_) => self.close(
                            sock,
                            ctx,
                            me,
                            close_code::UNSUPPORTED_DATA,
                            "text messages are not accepted; send binary frames",
                        ),
                        Message::Close(_) => {
                            // tungstenite queued the reply; send it and stop taking frames.
                            self.leave(ctx, me);
                            self.closing = Some(ctx.now() + self.config.linger);
                        }
                        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                    }
                }
                Err(e) if would_block(&e) => {
                    self.read_dry = true;
                    if self.pump(sock, ctx, me).is_err() {
                        return self.finish(ctx, me);
                    }
                    return Next::Wait;
                }
                Err(WsError::Capacity(CapacityError::MessageTooLong { .. })) => self.close(
                    sock,
                    ctx,
                    me,
                    close_code::MESSAGE_TOO_BIG,
                    "message larger than the frame limit",
                ),
                Err(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake))
                | Err(WsError::ConnectionClosed)
                | Err(WsError::AlreadyClosed)
                | Err(WsError::Io(_)) => return self.finish(ctx, me),
                Err(e) => {
                    log::debug!("uid {}: protocol error: {e}", self.uid);
                    self.close(sock, ctx, me, close_code::PROTOCOL_ERROR, "protocol error");
                }
            }
        }
    }

    /// The relay rules for one inbound binary message, in order: parse, CRC, reserved types,
    /// sender, target, rate; a frame that passes becomes [`Effect::Deliver`] for the worker.
    pub fn on_frame(&mut self, bytes: Bytes, ctx: &WorkerCtx, me: ReplyTo) {
        let f = match Frame::parse(&bytes) {
            Ok(f) => f,
            Err(FrameError::TooShort) => {
                return self.error(ctx, error_code::TOO_SHORT, 0, "frame shorter than 29 bytes");
            }
            Err(FrameError::BadCrc) => {
                return self.error(
                    ctx,
                    error_code::BAD_CRC,
                    frame::crc_field(&bytes),
                    "CRC mismatch",
                );
            }
        };
        let crc = f.crc();
        if f.msg_type() >= frame::msg_type::RESERVED_MIN {
            return self.error(
                ctx,
                error_code::RESERVED_TYPE,
                crc,
                "message types 0xF0-0xFF are reserved for the server",
            );
        }
        if f.uid() != self.uid {
            return self.error(
                ctx,
                error_code::SPOOFED_SENDER,
                crc,
                "sender uid is not this connection's user",
            );
        }
        if !ctx.is_registered(f.target()) {
            return self.error(
                ctx,
                error_code::UNKNOWN_TARGET,
                crc,
                "target is not a registered user",
            );
        }
        let cfg = self.config;
        if !self
            .bucket
            .take(ctx.now(), cfg.rate_per_sec, cfg.rate_burst)
        {
            return self.error(ctx, error_code::RATE_LIMITED, crc, "rate limit exceeded");
        }
        let sender = SenderRef {
            conn: me,
            uid: self.uid,
            want_ack: self.acks,
            timestamp: f.timestamp(),
            crc,
        };
        let target = f.target();
        ctx.effect(Effect::Deliver {
            target,
            frame: bytes,
            sender,
        });
    }

    fn error(&mut self, ctx: &WorkerCtx, code: u8, bad_crc: u32, reason: &str) {
        let mut out = Vec::with_capacity(frame::MIN_FRAME + 5 + reason.len());
        frame::encode_error(
            &mut out,
            self.uid,
            crate::api::now_ms(),
            code,
            bad_crc,
            reason,
        );
        self.push(Out::Server(Bytes::from(out)), ctx);
    }

    /// Encodes queued frames and writes the buffer until the socket pushes back.
    /// Err: the connection is gone.
    fn pump<S: Read + Write>(
        &mut self,
        sock: &mut S,
        ctx: &WorkerCtx,
        _me: ReplyTo,
    ) -> Result<(), ()> {
        loop {
            while self.closing.is_none() && self.wbuf.len() - self.wpos < ENCODE_AHEAD {
                let Some(out) = self.outq.pop_front() else {
                    break;
                };
                self.queued_bytes -= out.bytes().len();
                let start = self.wbuf.len();
                let msg = Message::Binary(out.bytes().clone());
                let mut io = Io {
                    sock: &mut *sock,
                    out: &mut self.wbuf,
                    seen: &mut self.seen,
                };
                match context(&mut self.ws, &self.config).write(&mut io, msg) {
                    Ok(()) => self.encoded.push_back((start, self.wbuf.len(), out)),
                    Err(_) => {
                        self.wbuf.truncate(start);
                        self.give_up(out, ctx);
                    }
                }
            }
            // Pongs, or the answer to the peer's close, that tungstenite still holds.
            let mut io = Io {
                sock: &mut *sock,
                out: &mut self.wbuf,
                seen: &mut self.seen,
            };
            match self.ws.as_mut().map_or(Ok(()), |ws| ws.flush(&mut io)) {
                Ok(()) => {}
                Err(WsError::ConnectionClosed) | Err(WsError::AlreadyClosed) => {
                    self.terminated = true;
                }
                Err(_) => return Err(()),
            }
            // A write that fails after earlier ones of this loop went through must still
            // count those as delivered (below), or the frames would be stored and sent twice.
            let mut broken = false;
            while self.wpos < self.wbuf.len() {
                match sock.write(&self.wbuf[self.wpos..]) {
                    Ok(0) => broken = true,
                    Ok(n) => self.wpos += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => broken = true,
                }
                if broken {
                    break;
                }
            }
            while self
                .encoded
                .front()
                .is_some_and(|(_, end, _)| *end <= self.wpos)
            {
                let Some((_, _, out)) = self.encoded.pop_front() else {
                    break;
                };
                if let Some(id) = self.tentative.take() {
                    ctx.effect(Effect::Retract { id });
                }
                self.wrote(out, ctx);
            }
            if broken {
                return Err(());
            }
            if self.wpos == self.wbuf.len() {
                self.wbuf.clear();
                self.wpos = 0;
                if self.wbuf.capacity() > KEEP_WBUF {
                    self.wbuf = Vec::new();
                }
            } else if self.wpos >= ENCODE_AHEAD {
                // Drop what is written, but never the start of a frame still being written:
                // `leave` tells a half-written frame by its start lying before `wpos`.
                let done = self
                    .encoded
                    .front()
                    .map_or(self.wpos, |(start, _, _)| (*start).min(self.wpos));
                self.wbuf.drain(..done);
                for (start, end, _) in self.encoded.iter_mut() {
                    *start -= done;
                    *end -= done;
                }
                self.wpos -= done;
            }
            if !self.wbuf.is_empty() || self.outq.is_empty() || self.closing.is_some() {
                return Ok(());
            }
        }
    }

    /// `out` reached the kernel.
    fn wrote(&mut self, out: Out, ctx: &WorkerCtx) {
        let Out::Relay { fan, .. } = out else {
            return;
        };
        fan.holders.set(fan.holders.get().saturating_sub(1));
        if !fan.delivered.replace(true)
            && let Some(s) = fan
                .sender
                .filter(|s| s.want_ack && fan.origin == Origin::Live)
        {
            ctx.effect(Effect::ServerFrame {
                to: s.conn,
                frame: ack(&s, frame::ack_status::DELIVERED),
            });
        }
        if let Origin::Stored(_) = fan.origin {
            ctx.effect(Effect::DrainProgress { uid: fan.target });
        }
    }

    /// `out` will not be written by this connection.
    fn give_up(&mut self, out: Out, ctx: &WorkerCtx) {
        let Out::Relay { frame, fan } = out else {
            return;
        };
        fan.holders.set(fan.holders.get().saturating_sub(1));
        match fan.origin {
            Origin::Live if fan.holders.get() == 0 && !fan.delivered.get() => {
                ctx.effect(Effect::Spill {
                    target: fan.target,
                    frame,
                    sender: fan.sender,
                    tentative: None,
                });
            }
            Origin::Live => {}
            Origin::Stored(_) => ctx.effect(Effect::DrainProgress { uid: fan.target }),
        }
    }

    /// Stops taking frames: everything unsent goes back to the relay (and from there to the
    /// offline queue unless another device has it).
    pub fn leave(&mut self, ctx: &WorkerCtx, me: ReplyTo) {
        if self.left {
            return;
        }
        self.left = true;
        // Encoded frames not started yet are taken back out of the buffer (cut at the first
        // one's start, so no half-written control frame is cut); a frame already partly
        // written stays and will finish ahead of the close frame, or not.
        let cut = self
            .encoded
            .iter()
            .find(|(start, _, _)| *start >= self.wpos)
            .map_or(self.wbuf.len(), |(start, _, _)| *start);
        let mut unsent = Vec::new();
        while self
            .encoded
            .back()
            .is_some_and(|(start, _, _)| *start >= cut)
        {
            if let Some((_, _, out)) = self.encoded.pop_back() {
                unsent.push(out);
            }
        }
        unsent.reverse();
        self.wbuf.truncate(cut.max(self.wpos));
        // A half-written frame whose last holder this is goes to the queue now, ahead of the
        // frames behind it, tentatively: retracted if it does get out, kept if not.
        if let Some((_, _, Out::Relay { frame, fan })) = self.encoded.front()
            && fan.origin == Origin::Live
            && fan.holders.get() == 1
            && !fan.delivered.get()
        {
            let id = ctx.next_tentative();
            ctx.effect(Effect::Spill {
                target: fan.target,
                frame: frame.clone(),
                sender: fan.sender,
                tentative: Some(id),
            });
            self.tentative = Some(id);
        }
        for out in unsent {
            self.give_up(out, ctx);
        }
        while let Some(out) = self.outq.pop_front() {
            self.give_up(out, ctx);
        }
        self.queued_bytes = 0;
        ctx.effect(Effect::Left {
            uid: self.uid,
            conn: me,
        });
    }

    /// Starts the closing handshake with `code`.
    pub fn close<S: Read + Write>(
        &mut self,
        sock: &mut S,
        ctx: &WorkerCtx,
        me: ReplyTo,
        code: u16,
        reason: &'static str,
    ) {
        if self.closing.is_some() {
            return;
        }
        // Give what is already written a chance to leave before the close frame.
        let _ = self.pump(sock, ctx, me);
        self.leave(ctx, me);
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: reason.into(),
        };
        let mut io = Io {
            sock: &mut *sock,
            out: &mut self.wbuf,
            seen: &mut self.seen,
        };
        match context(&mut self.ws, &self.config).close(&mut io, Some(frame)) {
            Ok(()) => {}
            Err(e) if would_block(&e) => {}
            Err(e) => log::debug!("uid {}: close: {e}", self.uid),
        }
        self.closing = Some(ctx.now() + self.config.linger);
    }

    /// Discards what the peer still sends after our close, [`READ_BUDGET_MESSAGES`] per wakeup.
    fn read_until_closed<S: Read + Write>(
        &mut self,
        sock: &mut S,
        ctx: &WorkerCtx,
        me: ReplyTo,
    ) -> Next {
        for _ in 0..READ_BUDGET_MESSAGES {
            let read = context(&mut self.ws, &self.config).read(&mut Io {
                sock: &mut *sock,
                out: &mut self.wbuf,
                seen: &mut self.seen,
            });
            match read {
                Ok(_) => {}
                Err(e) if would_block(&e) => {
                    return match self.pump(sock, ctx, me) {
                        Ok(()) => Next::Wait,
                        Err(()) => self.finish(ctx, me),
                    };
                }
                Err(_) => {
                    // Best effort for the last bytes (the answer to the peer's close).
                    let _ = self.pump(sock, ctx, me);
                    return self.finish(ctx, me);
                }
            }
        }
        Next::Yield
    }

    /// The connection is over.
    pub fn finish(&mut self, ctx: &WorkerCtx, me: ReplyTo) -> Next {
        self.leave(ctx, me);
        while let Some((_, _, out)) = self.encoded.pop_front() {
            match self.tentative.take() {
                Some(id) => {
                    // Never got out: the copy queued ahead of time stands.
                    if let Out::Relay { fan, .. } = &out {
                        fan.holders.set(fan.holders.get().saturating_sub(1));
                    }
                    ctx.effect(Effect::Keep { id });
                }
                None => self.give_up(out, ctx),
            }
        }
        Next::Close
    }

    /// Keepalive and closing deadlines. `Some(Close)`: drop the connection now.
    pub fn check_timers<S: Read + Write>(
        &mut self,
        sock: &mut S,
        ctx: &WorkerCtx,
        me: ReplyTo,
    ) -> Option<Next> {
        let now = ctx.now();
        if let Some(until) = self.closing {
            return (now >= until).then(|| self.finish(ctx, me));
        }
        let silent = now.duration_since(self.last_inbound);
        if silent >= self.config.idle_timeout {
            log::debug!("uid {}: nothing received for {silent:?}, closing", self.uid);
            self.close(sock, ctx, me, close_code::GOING_AWAY, "idle timeout");
            return Some(self.finish(ctx, me));
        }
        // Output still to write (a pong the release found, say) needs a drive; the ping below
        // must not be skipped for it.
        let unwritten = silent >= self.config.release_after
            && !self.release_buffers()
            && self.wpos < self.wbuf.len();
        if silent >= self.config.ping_after && !self.ping_sent {
            self.ping_sent = true;
            let mut io = Io {
                sock: &mut *sock,
                out: &mut self.wbuf,
                seen: &mut self.seen,
            };
            if context(&mut self.ws, &self.config)
                .write(&mut io, Message::Ping(Bytes::new()))
                .is_err()
            {
                return Some(self.finish(ctx, me));
            }
            // Driving the connection writes it out.
            return Some(Next::Wait);
        }
        unwritten.then_some(Next::Wait)
    }

    /// Frees what an idle session does not need: tungstenite's context with its read and write
    /// buffers, and the session's own write buffer and queues. Only between messages, with
    /// nothing unread, unsent or pending; a fresh context is made when data comes. Returns
    /// whether the session now holds no buffers.
    pub fn release_buffers(&mut self) -> bool {
        if self.ws.is_none() {
            return true;
        }
        let idle = self.read_dry
            && self.seen.between_messages()
            && self.closing.is_none()
            && !self.terminated
            && !self.left
            && self.outq.is_empty()
            && self.encoded.is_empty()
            && self.wpos == self.wbuf.len();
        if !idle {
            return false;
        }
        // Anything tungstenite still holds to send (a pong) must go out first.
        let mut sink = Vec::new();
        if self.ws.as_mut().is_some_and(|ws| {
            ws.flush(&mut Io {
                sock: &mut io::empty(),
                out: &mut sink,
                seen: &mut Boundary::default(),
            })
            .is_err()
        }) || !sink.is_empty()
        {
            self.wbuf.extend_from_slice(&sink);
            return false;
        }
        self.ws = None;
        self.wbuf = Vec::new();
        self.wpos = 0;
        self.outq = VecDeque::new();
        self.encoded = VecDeque::new();
        true
    }

    /// At shutdown: write what can be written, then close with 1001 (the rest is stored).
    pub fn shutdown<S: Read + Write>(&mut self, sock: &mut S, ctx: &WorkerCtx, me: ReplyTo) {
        self.close(
            sock,
            ctx,
            me,
            close_code::GOING_AWAY,
            "server shutting down",
        );
    }

    /// Closes because the token was revoked or a newer device replaced this one.
    pub fn policy_close<S: Read + Write>(
        &mut self,
        sock: &mut S,
        ctx: &WorkerCtx,
        me: ReplyTo,
        reason: &'static str,
    ) {
        self.close(sock, ctx, me, close_code::POLICY_VIOLATION, reason);
    }
}

/// An ACK frame for the sender of a frame.
pub fn ack(s: &SenderRef, status: u8) -> Bytes {
    let mut out = Vec::with_capacity(frame::MIN_FRAME + 13);
    frame::encode_ack(
        &mut out,
        s.uid,
        crate::api::now_ms(),
        status,
        s.timestamp,
        s.crc,
    );
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(fin: bool, opcode: u8, len: usize) -> Vec<u8> {
        let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
        match len {
            0..=125 => out.push(0x80 | len as u8),
            126..=65535 => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&[1, 2, 3, 4]);
        out.resize(out.len() + len, 0xab);
        out
    }

    /// Fed in every possible split, the boundary is "between messages" exactly at the ends of
    /// complete messages (a ping inside a fragmented message is not one).
    #[test]
    fn boundary_knows_where_messages_end() {
        let parts = [
            (wire(true, 2, 29), true),
            (wire(false, 2, 200), false),
            (wire(true, 9, 4), false),
            (wire(true, 0, 70_000), true),
            (wire(true, 10, 0), true),
        ];
        let stream: Vec<u8> = parts.iter().flat_map(|(w, _)| w.clone()).collect();
        let mut ends = Vec::new();
        let mut at = 0;
        for (w, complete) in &parts {
            at += w.len();
            if *complete {
                ends.push(at);
            }
        }
        for chunk in [1, 2, 3, 7, 13, 14, 100, 4096, stream.len()] {
            let mut b = Boundary::default();
            let mut fed = 0;
            while fed < stream.len() {
                let n = chunk.min(stream.len() - fed);
                b.feed(&stream[fed..fed + n]);
                fed += n;
                let expect = ends.contains(&fed);
                assert_eq!(b.between_messages(), expect, "chunk {chunk}, at {fed}");
            }
        }
        let mut bad = Boundary::default();
        bad.feed(&[
            0x82, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0,
        ]);
        bad.feed(&[0; 64]);
        assert!(!bad.between_messages());
    }
}

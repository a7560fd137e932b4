//! The `relay` scenario: N sender/target pairs over WebSocket. Each sender sends frames of
//! `--size` bytes to its partner, closed loop (at most `--window` in flight per pair) or at a
//! total `--rate`. Every received frame is CRC-checked and accounted; the run ends with sent,
//! delivered, lost, duplicated, reordered, corrupted, foreign and refused counts, and fails on
//! any of them (refusals only without `--allow-refused`). A refusal (an ERROR frame to the
//! sender) is matched by the CRC it carries to a frame still in flight on that pair. A pair whose
//! connection fails (the server closing it with 1013, say) leaves the run and its frames in
//! flight count as lost; the others go on, and the totals are still printed and written.
//!
//! The frame's timestamp field carries the microsecond it was due to be sent (the server treats
//! it as opaque), so latency is measured from the frame itself, without coordinated omission.
//!
//! The clients are event-driven: each of `--threads` threads runs one mio loop over its share of
//! the pairs (both ends of a pair in the same loop), so a thousand pairs cost a thousand
//! sockets, not two thousand threads, and the generator does not become the bottleneck it would
//! be with a thread per connection (context switches on the load generator's core would show up
//! as server latency). In open loop the k-th frame of a loop is due at `start + k / rate` and goes
//! to pair `k mod pairs`: an exact, evenly spread schedule.

use std::collections::{BTreeMap, VecDeque};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Args;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use polyge::frame::{self, Frame, MIN_FRAME};
use serde::Serialize;
use tungstenite::{Message, WebSocket};

use crate::report::{self, Live, Series};
use crate::{Common, check_loopback, setup};

#[derive(Args)]
pub struct RelayArgs {
    #[command(flatten)]
    common: Common,
    /// Sender/target pairs (two connections each).
    #[arg(long, default_value_t = 100)]
    pairs: usize,
    /// Frame size in bytes (at least 37: the sequence number travels in the data).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Frames per second in total (open loop); 0 runs closed loop.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Frames in flight per pair in closed loop.
    #[arg(long, default_value_t = 16)]
    window: u64,
    /// How long targets wait for frames still in flight after the senders stop, in seconds.
    #[arg(long, default_value_t = 5)]
    grace: u64,
    /// Client event loops (threads); the pairs are split between them.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Drive `polyge-baseline` instead: no accounts; uids 1..=2N, the token is the uid.
    #[arg(long)]
    baseline: bool,
    /// The server's process id: report its CPU time per delivered frame (from /proc).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Refused frames (ERROR frames, a rate limit say) do not fail the run.
    #[arg(long)]
    allow_refused: bool,
}

/// User + system CPU time of a process, in seconds (Linux `/proc/<pid>/stat`).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

#[derive(Serialize, Default)]
struct Totals {
    sent: u64,
    delivered: u64,
    /// Sent and neither delivered nor refused by the end (a failed pair's outstanding frames
    /// included).
    lost: u64,
    /// Delivered twice.
    duplicated: u64,
    /// Delivered after a later frame of the same pair (order is promised).
    reordered: u64,
    /// Not a frame (bad CRC, too short).
    corrupted: u64,
    /// A valid frame that is not one this run sent on that pair: wrong sender, target, type or
    /// length, a sequence number never sent, or stamped before the run started (an earlier
    /// run's frame from an offline queue, say).
    foreign: u64,
    /// Refused frames by error code, each matched by CRC to a frame in flight on its pair.
    refused: BTreeMap<String, u64>,
    /// ERROR frames whose CRC matches no frame in flight on that pair.
    unmatched_refusals: u64,
    /// Pairs whose connection failed (a close by the server, say); the run goes on without them.
    failed_pairs: u64,
}

impl Totals {
    fn add(&mut self, o: Totals) {
        self.sent += o.sent;
        self.delivered += o.delivered;
        self.lost += o.lost;
        self.duplicated += o.duplicated;
        self.reordered += o.reordered;
        self.corrupted += o.corrupted;
        self.foreign += o.foreign;
        for (k, v) in o.refused {
            *self.refused.entry(k).or_default() += v;
        }
        self.unmatched_refusals += o.unmatched_refusals;
        self.failed_pairs += o.failed_pairs;
    }

    fn refused_total(&self) -> u64 {
        self.refused.values().sum()
    }

    /// Nothing lost, damaged, out of place or failed; refusals only if allowed.
    fn clean(&self, allow_refused: bool) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.reordered == 0
            && self.corrupted == 0
            && self.foreign == 0
            && self.unmatched_refusals == 0
            && self.failed_pairs == 0
            && (allow_refused || self.refused_total() == 0)
    }
}

/// The name of an ERROR frame's code, for the refused counts.
fn error_name(code: u8) -> String {
    use frame::error_code::*;
    match code {
        BAD_CRC => "bad_crc".into(),
        TOO_SHORT => "too_short".into(),
        SPOOFED_SENDER => "spoofed_sender".into(),
        UNKNOWN_TARGET => "unknown_target".into(),
        RESERVED_TYPE => "reserved_type".into(),
        RATE_LIMITED => "rate_limited".into(),
        QUEUE_FULL => "queue_full".into(),
        other => format!("error_{other}"),
    }
}

#[derive(Serialize)]
struct Results {
    scenario: &'static str,
    pairs: usize,
    size: usize,
    rate: u64,
    window: u64,
    threads: usize,
    seconds: f64,
    delivered_per_sec: f64,
    server_cpu_ns_per_frame: Option<f64>,
    /// The busiest client loop's share of the run spent working rather than waiting in poll
    /// (an open loop waits by polling without sleeping, so its CPU time says nothing): near 1.0
    /// the load generator, not the server, limits the rate and adds latency.
    generator_busy: f64,
    clean: bool,
    totals: Totals,
    latency: Vec<report::Row>,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn would_block(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock)
}

/// Connects and upgrades (blocking), then turns the socket non-blocking for the event loop.
fn connect(addr: SocketAddr, token: &str) -> Result<WebSocket<TcpStream>, String> {
    let stream = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut ws = setup::upgrade(stream, addr, token)?;
    ws.get_mut()
        .set_nonblocking(true)
        .map_err(|e| e.to_string())?;
    Ok(ws)
}

/// The frames of one pair that are neither delivered nor refused yet: frame `base + i` has
/// CRC `ring[i]`, `None` once accounted for. Sequence numbers start at 1 and only grow, and
/// frames leave roughly in the order they were sent, so the ring stays about as long as the
/// frames in flight.
#[derive(Debug)]
struct Flight {
    ring: VecDeque<Option<u32>>,
    base: u64,
    outstanding: u64,
}

impl Default for Flight {
    fn default() -> Flight {
        Flight {
            ring: VecDeque::new(),
            base: 1,
            outstanding: 0,
        }
    }
}

impl Flight {
    /// Frame `seq` (the next one: `base + ring.len()`) went out with `crc`.
    fn push(&mut self, seq: u64, crc: u32) {
        debug_assert_eq!(seq, self.base + self.ring.len() as u64);
        self.ring.push_back(Some(crc));
        self.outstanding += 1;
    }

    /// Accounts for frame `seq`; false if it is not in flight (never sent, or already taken).
    fn take(&mut self, seq: u64) -> bool {
        let Some(slot) = seq
            .checked_sub(self.base)
            .and_then(|i| self.ring.get_mut(usize::try_from(i).ok()?))
        else {
            return false;
        };
        if slot.take().is_none() {
            return false;
        }
        self.outstanding -= 1;
        while self.ring.front() == Some(&None) {
            self.ring.pop_front();
            self.base += 1;
        }
        true
    }

    /// Accounts for the oldest frame in flight whose CRC is `crc`; returns its sequence number.
    fn take_crc(&mut self, crc: u32) -> Option<u64> {
        let i = self.ring.iter().position(|c| *c == Some(crc))?;
        let seq = self.base + i as u64;
        self.take(seq);
        Some(seq)
    }
}

/// What became of a frame that reached the target.
#[derive(Debug, PartialEq, Eq)]
enum Arrival {
    Delivered,
    Duplicate,
    Reordered,
    /// A sequence number this pair never sent.
    Foreign,
}

/// One pair's accounting, apart from the sockets.
#[derive(Default, Debug)]
struct Ledger {
    /// Frames sent (the last sequence number).
    sent: u64,
    flight: Flight,
    /// The highest sequence number delivered.
    highest: u64,
}

impl Ledger {
    fn next_seq(&self) -> u64 {
        self.sent + 1
    }

    fn sent(&mut self, seq: u64, crc: u32) {
        self.sent = seq;
        self.flight.push(seq, crc);
    }

    fn arrived(&mut self, seq: u64) -> Arrival {
        if seq == 0 || seq > self.sent {
            Arrival::Foreign
        } else if !self.flight.take(seq) {
            Arrival::Duplicate
        } else if seq < self.highest {
            Arrival::Reordered
        } else {
            self.highest = seq;
            Arrival::Delivered
        }
    }

    /// A refusal carrying `crc`: the frame it refused, if one is in flight.
    fn refused(&mut self, crc: u32) -> Option<u64> {
        self.flight.take_crc(crc)
    }

    fn outstanding(&self) -> u64 {
        self.flight.outstanding
    }
}

/// One sender/target pair, driven by one loop.
struct Pair {
    tx: WebSocket<TcpStream>,
    rx: WebSocket<TcpStream>,
    sender: u64,
    target: u64,
    ledger: Ledger,
    /// The sender's socket pushed back: flush again when it is writable.
    tx_blocked: bool,
    /// Why the pair stopped (its sockets are out of the loop from then on).
    failed: Option<String>,
}

/// What one loop counted.
#[derive(Default)]
struct LoopResult {
    totals: Totals,
    latency: Series,
    last_delivery: Option<Instant>,
    /// Pairs that failed, with the reason.
    failures: Vec<String>,
    /// The loop itself failed (its poll): the counts are those up to then.
    fatal: Option<String>,
    /// Share of the loop's run spent outside poll.
    busy: f64,
}

struct Plan {
    size: usize,
    window: u64,
    /// Open loop: frames per second sent by this loop.
    rate: Option<f64>,
    duration: Duration,
    grace: Duration,
}

/// What a frame that reaches a pair's target must look like.
struct Expect {
    data_len: usize,
    /// Frames are stamped with microseconds since the epoch, never before the loop started.
    start_us: u64,
}

/// Sends the pair's next frame, stamped `stamp_us`.
fn send_one(
    p: &mut Pair,
    buf: &mut Vec<u8>,
    data: &mut Vec<u8>,
    padding: &[u8],
    stamp_us: u64,
) -> Result<(), String> {
    let seq = p.ledger.next_seq();
    data.clear();
    data.extend_from_slice(&seq.to_be_bytes());
    data.extend_from_slice(padding);
    buf.clear();
    frame::encode(
        buf,
        p.sender,
        p.target,
        frame::msg_type::TEXT,
        stamp_us,
        data,
    );
    match p
        .tx
        .write(Message::Binary(bytes::Bytes::copy_from_slice(buf)))
    {
        Ok(()) => {}
        // Queued in tungstenite's buffer; a flush writes it.
        Err(e) if would_block(&e) => p.tx_blocked = true,
        Err(e) => return Err(format!("send: {e}")),
    }
    p.ledger.sent(seq, frame::crc_field(buf));
    Ok(())
}

fn flush(p: &mut Pair) -> Result<(), String> {
    match p.tx.flush() {
        Ok(()) => {
            p.tx_blocked = false;
            Ok(())
        }
        Err(e) if would_block(&e) => {
            p.tx_blocked = true;
            Ok(())
        }
        Err(e) => Err(format!("send: {e}")),
    }
}

/// Accounts one message that reached the target; returns whether it was a delivery.
fn account_arrival(p: &mut Pair, bytes: &[u8], expect: &Expect, r: &mut LoopResult) -> bool {
    let Ok(f) = Frame::parse(bytes) else {
        r.totals.corrupted += 1;
        return false;
    };
    if f.uid() != p.sender
        || f.target() != p.target
        || f.msg_type() != frame::msg_type::TEXT
        || f.data().len() != expect.data_len
        || f.timestamp() < expect.start_us
    {
        r.totals.foreign += 1;
        return false;
    }
    let seq = u64::from_be_bytes(f.data()[..8].try_into().expect("8 bytes"));
    match p.ledger.arrived(seq) {
        Arrival::Delivered => {
            r.totals.delivered += 1;
            r.latency
                .record(true, now_us().saturating_sub(f.timestamp()));
            true
        }
        Arrival::Duplicate => {
            r.totals.duplicated += 1;
            false
        }
        Arrival::Reordered => {
            r.totals.reordered += 1;
            false
        }
        Arrival::Foreign => {
            r.totals.foreign += 1;
            false
        }
    }
}

/// Reads everything the target has; returns how many frames were delivered.
fn receive(p: &mut Pair, expect: &Expect, r: &mut LoopResult, live: &Live) -> Result<u64, String> {
    let mut got = 0;
    loop {
        match p.rx.read() {
            Ok(Message::Binary(b)) => {
                if account_arrival(p, &b, expect, r) {
                    got += 1;
                }
            }
            Ok(Message::Text(_)) => r.totals.foreign += 1,
            Ok(_) => {}
            Err(e) if would_block(&e) => break,
            Err(e) => return Err(format!("target read: {e}")),
        }
    }
    if got > 0 {
        live.done.fetch_add(got, Ordering::Relaxed);
        r.last_delivery = Some(Instant::now());
    }
    // tungstenite answers pings on read; the answer may still need a flush.
    match p.rx.flush() {
        Err(e) if !would_block(&e) => Err(format!("target write: {e}")),
        _ => Ok(got),
    }
}

/// Accounts one message the server sent the sender: an ERROR frame refusing one of its frames
/// (matched by the CRC it carries), or something that does not belong.
fn account_refusal(p: &mut Pair, bytes: &[u8], r: &mut LoopResult) -> bool {
    let f = match Frame::parse(bytes) {
        Ok(f) => f,
        Err(_) => {
            r.totals.corrupted += 1;
            return false;
        }
    };
    // ERROR: code (1 B), the refused frame's CRC field (4 B), a reason.
    if f.uid() != 0
        || f.target() != p.sender
        || f.msg_type() != frame::msg_type::ERROR
        || f.data().len() < 5
    {
        r.totals.foreign += 1;
        return false;
    }
    let code = f.data()[0];
    let crc = u32::from_be_bytes(f.data()[1..5].try_into().expect("4 bytes"));
    if p.ledger.refused(crc).is_some() {
        *r.totals.refused.entry(error_name(code)).or_default() += 1;
        true
    } else {
        r.totals.unmatched_refusals += 1;
        false
    }
}

/// Reads what the server sent the sender; returns how many frames it refused.
fn read_refusals(p: &mut Pair, r: &mut LoopResult) -> Result<u64, String> {
    let mut refused = 0;
    loop {
        match p.tx.read() {
            Ok(Message::Binary(b)) => {
                if account_refusal(p, &b, r) {
                    refused += 1;
                }
            }
            Ok(Message::Text(_)) => r.totals.foreign += 1,
            Ok(_) => {}
            Err(e) if would_block(&e) => return Ok(refused),
            Err(e) => return Err(format!("sender read: {e}")),
        }
    }
}

/// Closed loop: tops the pair's window up (frames in flight are those neither delivered nor
/// refused yet).
fn refill(
    p: &mut Pair,
    window: u64,
    buf: &mut Vec<u8>,
    data: &mut Vec<u8>,
    padding: &[u8],
) -> Result<(), String> {
    for _ in p.ledger.outstanding()..window {
        send_one(p, buf, data, padding, now_us())?;
    }
    flush(p)
}

/// Takes a failed pair out of the loop; its frames in flight will count as lost.
fn fail(p: &mut Pair, poll: &Poll, reason: String) {
    if p.failed.is_some() {
        return;
    }
    for fd in [p.tx.get_ref().as_raw_fd(), p.rx.get_ref().as_raw_fd()] {
        let _ = poll.registry().deregister(&mut SourceFd(&fd));
    }
    p.failed = Some(format!("pair {} -> {}: {reason}", p.sender, p.target));
}

/// One event loop over `pairs`, from `go` until every frame is accounted for (or the grace
/// runs out). A pair whose connection fails leaves the loop; the others go on.
fn run_loop(mut pairs: Vec<Pair>, plan: &Plan, go: &Barrier, live: &Live) -> LoopResult {
    let registered = (|| -> std::io::Result<Poll> {
        let poll = Poll::new()?;
        for (i, p) in pairs.iter().enumerate() {
            for (k, fd) in [p.tx.get_ref().as_raw_fd(), p.rx.get_ref().as_raw_fd()]
                .into_iter()
                .enumerate()
            {
                poll.registry().register(
                    &mut SourceFd(&fd),
                    Token(2 * i + k),
                    Interest::READABLE | Interest::WRITABLE,
                )?;
            }
        }
        Ok(poll)
    })();
    // Every loop reaches the barrier, even one that failed, so no other thread waits forever.
    go.wait();
    let mut r = LoopResult::default();
    match registered {
        Ok(mut poll) => {
            if let Err(e) = drive_loop(&mut pairs, &mut poll, plan, live, &mut r) {
                r.fatal = Some(e);
            }
        }
        Err(e) => r.fatal = Some(format!("poll: {e}")),
    }
    for p in &mut pairs {
        r.totals.sent += p.ledger.sent;
        // Anything neither delivered nor refused by the end is lost.
        r.totals.lost += p.ledger.outstanding();
        if let Some(why) = p.failed.take() {
            r.totals.failed_pairs += 1;
            r.failures.push(why);
        }
    }
    r
}

fn drive_loop(
    pairs: &mut [Pair],
    poll: &mut Poll,
    plan: &Plan,
    live: &Live,
    r: &mut LoopResult,
) -> Result<(), String> {
    let mut events = Events::with_capacity(1024);
    let mut polling = Duration::ZERO;
    let mut buf = Vec::with_capacity(plan.size);
    let mut data = Vec::with_capacity(plan.size);
    let padding = vec![0x5au8; plan.size - MIN_FRAME - 8];
    let mut touched: Vec<usize> = Vec::new();
    let start = Instant::now();
    let start_us = now_us();
    let expect = Expect {
        data_len: plan.size - MIN_FRAME,
        start_us,
    };
    let stop_at = start + plan.duration;
    let mut scheduled = 0u64;
    if plan.rate.is_none() {
        for p in pairs.iter_mut() {
            if let Err(e) = refill(p, plan.window, &mut buf, &mut data, &padding) {
                fail(p, poll, e);
            }
        }
    }
    loop {
        let now = Instant::now();
        let sending = now < stop_at;
        if !sending {
            let settled = pairs
                .iter()
                .all(|p| p.failed.is_some() || p.ledger.outstanding() == 0);
            if settled || now >= stop_at + plan.grace {
                return Ok(());
            }
        }
        // Open loop: send every frame now due, stamped with when it was due. A failed pair's
        // turns are skipped.
        let timeout = match plan.rate {
            Some(rate) if sending => {
                let due_at = |k: u64| Duration::from_secs_f64(k as f64 / rate);
                loop {
                    let due = due_at(scheduled);
                    if start + due > now || start + due >= stop_at {
                        break;
                    }
                    let i = (scheduled % pairs.len() as u64) as usize;
                    scheduled += 1;
                    let p = &mut pairs[i];
                    if p.failed.is_some() {
                        continue;
                    }
                    let stamp = start_us + due.as_micros() as u64;
                    match send_one(p, &mut buf, &mut data, &padding, stamp) {
                        Ok(()) => touched.push(i),
                        Err(e) => fail(p, poll, e),
                    }
                }
                for i in touched.drain(..) {
                    let p = &mut pairs[i];
                    if p.failed.is_none()
                        && let Err(e) = flush(p)
                    {
                        fail(p, poll, e);
                    }
                }
                // mio rounds a timeout up to whole milliseconds: a shorter wait would send
                // late (and count it as latency), so poll without sleeping instead.
                let wait = (start + due_at(scheduled)).saturating_duration_since(Instant::now());
                Some(if wait < Duration::from_millis(1) {
                    Duration::ZERO
                } else {
                    wait
                })
            }
            _ => Some(Duration::from_millis(50)),
        };
        let before = Instant::now();
        let polled = poll.poll(&mut events, timeout);
        polling += before.elapsed();
        r.busy = 1.0 - polling.as_secs_f64() / start.elapsed().as_secs_f64().max(1e-9);
        polled.map_err(|e| format!("poll: {e}"))?;
        for ev in events.iter() {
            let i = ev.token().0 / 2;
            let p = &mut pairs[i];
            if p.failed.is_some() {
                continue;
            }
            let refill_now = plan.rate.is_none() && Instant::now() < stop_at;
            let step = if ev.token().0 % 2 == 1 {
                receive(p, &expect, r, live).and_then(|got| {
                    if got > 0 && refill_now {
                        refill(p, plan.window, &mut buf, &mut data, &padding)?;
                    }
                    Ok(())
                })
            } else {
                (|| {
                    if ev.is_readable() {
                        // Refused frames leave the window too.
                        if read_refusals(p, r)? > 0 && refill_now {
                            refill(p, plan.window, &mut buf, &mut data, &padding)?;
                        }
                    }
                    if ev.is_writable() && p.tx_blocked {
                        flush(p)?;
                    }
                    Ok(())
                })()
            };
            if let Err(e) = step {
                fail(p, poll, e);
            }
        }
    }
}

pub fn run(args: RelayArgs) -> Result<bool, String> {
    let target = args.common.target;
    check_loopback(target)?;
    if args.size < MIN_FRAME + 8 {
        return Err(format!("--size must be at least {}", MIN_FRAME + 8));
    }
    if args.pairs == 0 || args.window == 0 || args.threads == 0 {
        return Err("--pairs, --window and --threads must be at least 1".into());
    }
    let threads = args.threads.min(args.pairs);
    let accounts: Vec<setup::Account> = if args.baseline {
        (1..=2 * args.pairs as u64)
            .map(|uid| (uid, uid.to_string()))
            .collect()
    } else {
        eprintln!("setting up {} accounts...", 2 * args.pairs);
        setup::accounts(
            target,
            &format!("relay{}", std::process::id()),
            2 * args.pairs,
        )?
    };
    let mut shares: Vec<Vec<Pair>> = (0..threads).map(|_| Vec::new()).collect();
    for (n, pair) in accounts.chunks(2).enumerate() {
        let (s, t) = (&pair[0], &pair[1]);
        shares[n % threads].push(Pair {
            rx: connect(target, &t.1)?,
            tx: connect(target, &s.1)?,
            sender: s.0,
            target: t.0,
            ledger: Ledger::default(),
            tx_blocked: false,
            failed: None,
        });
    }
    let live = Arc::new(Live::default());
    let stop = Arc::new(AtomicBool::new(false));
    let go = Arc::new(Barrier::new(threads + 1));
    let mut loops = Vec::new();
    for share in shares {
        let plan = Plan {
            size: args.size,
            window: args.window,
            rate: (args.rate > 0).then(|| args.rate as f64 / threads as f64),
            duration: Duration::from_secs(args.common.duration),
            grace: Duration::from_secs(args.grace),
        };
        let (go, live) = (go.clone(), live.clone());
        loops.push(std::thread::spawn(move || {
            run_loop(share, &plan, &go, &live)
        }));
    }
    let ticker = report::progress(live.clone(), stop.clone(), "frames");
    let cpu_before = args.server_pid.and_then(cpu_seconds);
    go.wait();
    let start = Instant::now();
    let mut totals = Totals::default();
    let mut latency = Series::default();
    // The rate counts frames delivered from the start to the last delivery (in-flight frames
    // arrive after the senders stop).
    let mut last_delivery = start;
    let mut failures = Vec::new();
    let mut fatal = Vec::new();
    let mut generator_busy: f64 = 0.0;
    for l in loops {
        let r = l.join().expect("client loop");
        totals.add(r.totals);
        latency.merge(r.latency);
        last_delivery = last_delivery.max(r.last_delivery.unwrap_or(start));
        failures.extend(r.failures);
        generator_busy = generator_busy.max(r.busy);
        fatal.extend(r.fatal);
    }
    stop.store(true, Ordering::Relaxed);
    let _ = ticker.join();
    let server_cpu = match (cpu_before, args.server_pid.and_then(cpu_seconds)) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let sending_time = last_delivery
        .duration_since(start)
        .max(Duration::from_millis(1));
    let mut series = BTreeMap::new();
    series.insert("frames".to_string(), latency);
    let rows = report::table(&series, sending_time);
    let per_sec = totals.delivered as f64 / sending_time.as_secs_f64();
    const SHOWN: usize = 5;
    for why in failures.iter().take(SHOWN) {
        eprintln!("failed: {why}");
    }
    if failures.len() > SHOWN {
        eprintln!("... and {} more failed pairs", failures.len() - SHOWN);
    }
    for e in &fatal {
        eprintln!("client loop failed: {e}");
    }
    println!(
        "sent {}  delivered {}  ({per_sec:.0}/s)  lost {}  duplicated {}  reordered {}  corrupted {}  foreign {}",
        totals.sent,
        totals.delivered,
        totals.lost,
        totals.duplicated,
        totals.reordered,
        totals.corrupted,
        totals.foreign,
    );
    println!(
        "refused {} {:?}{}  unmatched refusals {}  failed pairs {}",
        totals.refused_total(),
        totals.refused,
        if args.allow_refused { " (allowed)" } else { "" },
        totals.unmatched_refusals,
        totals.failed_pairs
    );
    let cpu_ns_per_frame = server_cpu
        .filter(|_| totals.delivered > 0)
        .map(|c| c * 1e9 / totals.delivered as f64);
    if let (Some(c), Some(ns)) = (server_cpu, cpu_ns_per_frame) {
        println!("server CPU {c:.2} s = {ns:.0} ns per delivered frame");
    }
    println!(
        "load generator busy {:.0}% (its busiest loop, time outside poll){}",
        generator_busy * 100.0,
        if generator_busy > 0.9 {
            ": saturated, so the rate and the latency are partly its own"
        } else {
            ""
        }
    );
    let ok = totals.clean(args.allow_refused) && fatal.is_empty();
    if let Some(path) = &args.common.json {
        report::write_json(
            path,
            &Results {
                scenario: "relay",
                pairs: args.pairs,
                size: args.size,
                rate: args.rate,
                window: args.window,
                threads,
                seconds: sending_time.as_secs_f64(),
                delivered_per_sec: per_sec,
                server_cpu_ns_per_frame: cpu_ns_per_frame,
                generator_busy,
                clean: ok,
                totals,
                latency: rows,
            },
        )?;
    }
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger_with(crcs: &[u32]) -> Ledger {
        let mut l = Ledger::default();
        for &crc in crcs {
            let seq = l.next_seq();
            l.sent(seq, crc);
        }
        l
    }

    #[test]
    fn each_frame_is_delivered_once_and_in_order() {
        let mut l = ledger_with(&[10, 11, 12]);
        assert_eq!(l.arrived(1), Arrival::Delivered);
        assert_eq!(l.arrived(3), Arrival::Delivered);
        assert_eq!(l.arrived(2), Arrival::Reordered);
        assert_eq!(l.arrived(3), Arrival::Duplicate);
        assert_eq!(l.arrived(1), Arrival::Duplicate);
        assert_eq!(l.outstanding(), 0);
        // The ring forgets what is accounted for.
        assert!(l.flight.ring.is_empty());
        assert_eq!(l.flight.base, 4);
    }

    #[test]
    fn a_sequence_number_never_sent_is_foreign() {
        let mut l = ledger_with(&[10, 11]);
        assert_eq!(l.arrived(0), Arrival::Foreign);
        assert_eq!(l.arrived(3), Arrival::Foreign);
        assert_eq!(l.arrived(u64::MAX), Arrival::Foreign);
        assert_eq!(l.outstanding(), 2);
    }

    #[test]
    fn a_refusal_takes_the_oldest_frame_in_flight_with_its_crc() {
        let mut l = ledger_with(&[7, 8, 7]);
        assert_eq!(l.refused(7), Some(1));
        assert_eq!(l.refused(7), Some(3));
        assert_eq!(l.refused(7), None);
        assert_eq!(l.refused(9), None);
        assert_eq!(l.outstanding(), 1);
        // A refused frame that arrives anyway is not delivered twice.
        assert_eq!(l.arrived(1), Arrival::Duplicate);
        assert_eq!(l.arrived(2), Arrival::Delivered);
        assert_eq!(l.outstanding(), 0);
    }

    #[test]
    fn what_is_left_in_flight_counts_as_lost() {
        let mut l = ledger_with(&[1, 2, 3, 4]);
        assert_eq!(l.arrived(2), Arrival::Delivered);
        assert_eq!(l.refused(4), Some(4));
        assert_eq!(l.outstanding(), 2);
    }

    #[test]
    fn totals_are_clean_only_without_loss_damage_or_unallowed_refusals() {
        let mut t = Totals {
            sent: 5,
            delivered: 5,
            ..Totals::default()
        };
        assert!(t.clean(false));
        t.refused.insert("rate_limited".into(), 1);
        assert!(!t.clean(false));
        assert!(t.clean(true));
        for bad in [
            Totals {
                lost: 1,
                ..Totals::default()
            },
            Totals {
                duplicated: 1,
                ..Totals::default()
            },
            Totals {
                reordered: 1,
                ..Totals::default()
            },
            Totals {
                corrupted: 1,
                ..Totals::default()
            },
            Totals {
                foreign: 1,
                ..Totals::default()
            },
            Totals {
                unmatched_refusals: 1,
                ..Totals::default()
            },
            Totals {
                failed_pairs: 1,
                ..Totals::default()
            },
        ] {
            assert!(!bad.clean(true));
        }
        let mut sum = Totals::default();
        sum.add(t);
        sum.add(Totals {
            refused: BTreeMap::from([("rate_limited".to_string(), 2)]),
            ..Totals::default()
        });
        assert_eq!(sum.refused_total(), 3);
    }
}

//! The `relay` scenario: N sender/target pairs over WebSocket. Each sender sends frames of
//! `--size` bytes to its partner, closed loop (at most `--window` in flight per pair) or at a
//! total `--rate`. Every received frame is CRC-checked and accounted; the run ends with sent,
//! delivered, lost, duplicated and corrupted counts, and fails on any loss or corruption.
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

use std::collections::BTreeMap;
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
    lost: u64,
    duplicated: u64,
    corrupted: u64,
    refused: BTreeMap<String, u64>,
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

/// One sender/target pair, driven by one loop.
struct Pair {
    tx: WebSocket<TcpStream>,
    rx: WebSocket<TcpStream>,
    sender: u64,
    target: u64,
    /// Frames sent (the last sequence number).
    sent: u64,
    /// The next sequence number the target expects.
    expected: u64,
    refused: u64,
    delivered: u64,
    /// The sender's socket pushed back: flush again when it is writable.
    tx_blocked: bool,
}

/// What one loop counted.
#[derive(Default)]
struct LoopResult {
    totals: Totals,
    latency: Series,
    last_delivery: Option<Instant>,
}

struct Plan {
    size: usize,
    window: u64,
    /// Open loop: frames per second sent by this loop.
    rate: Option<f64>,
    duration: Duration,
    grace: Duration,
}

/// Frame `seq` from the pair's sender, stamped `stamp_us`.
fn send_one(p: &mut Pair, buf: &mut Vec<u8>, padding: &[u8], stamp_us: u64) -> Result<(), String> {
    p.sent += 1;
    let mut data = Vec::with_capacity(8 + padding.len());
    data.extend_from_slice(&p.sent.to_be_bytes());
    data.extend_from_slice(padding);
    buf.clear();
    frame::encode(
        buf,
        p.sender,
        p.target,
        frame::msg_type::TEXT,
        stamp_us,
        &data,
    );
    match p
        .tx
        .write(Message::Binary(bytes::Bytes::copy_from_slice(buf)))
    {
        Ok(()) => Ok(()),
        Err(e) if would_block(&e) => {
            p.tx_blocked = true;
            Ok(())
        }
        Err(e) => Err(format!("send: {e}")),
    }
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

/// Reads everything the target has; returns how many frames arrived.
fn receive(p: &mut Pair, r: &mut LoopResult, live: &Live) -> Result<u64, String> {
    let mut got = 0;
    loop {
        let bytes = match p.rx.read() {
            Ok(Message::Binary(b)) => b,
            Ok(_) => continue,
            Err(e) if would_block(&e) => break,
            Err(e) => return Err(format!("target read: {e}")),
        };
        let Ok(f) = Frame::parse(&bytes) else {
            r.totals.corrupted += 1;
            continue;
        };
        if f.uid() != p.sender || f.data().len() < 8 {
            r.totals.corrupted += 1;
            continue;
        }
        let seq = u64::from_be_bytes(f.data()[..8].try_into().expect("8 bytes"));
        // Out of order counts as duplicated (order is promised); a gap shows up as frames
        // never delivered.
        if seq < p.expected {
            r.totals.duplicated += 1;
            continue;
        }
        p.expected = seq + 1;
        p.delivered += 1;
        got += 1;
        r.totals.delivered += 1;
        r.latency
            .record(true, now_us().saturating_sub(f.timestamp()));
    }
    if got > 0 {
        live.done.fetch_add(got, Ordering::Relaxed);
        r.last_delivery = Some(Instant::now());
    }
    Ok(got)
}

/// ERROR frames the server sent the sender (refused frames are accounted, not lost).
fn read_refusals(p: &mut Pair, r: &mut LoopResult) -> Result<(), String> {
    loop {
        match p.tx.read() {
            Ok(Message::Binary(b)) => {
                if let Ok(f) = Frame::parse(&b)
                    && f.msg_type() == frame::msg_type::ERROR
                    && !f.data().is_empty()
                {
                    p.refused += 1;
                    *r.totals
                        .refused
                        .entry(format!("error_{}", f.data()[0]))
                        .or_default() += 1;
                }
            }
            Ok(_) => {}
            Err(e) if would_block(&e) => return Ok(()),
            Err(e) => return Err(format!("sender read: {e}")),
        }
    }
}

/// Closed loop: tops the pair's window up (frames in flight are those neither delivered nor
/// refused yet).
fn refill(p: &mut Pair, window: u64, buf: &mut Vec<u8>, padding: &[u8]) -> Result<(), String> {
    let in_flight = p.sent.saturating_sub(p.delivered + p.refused);
    for _ in in_flight..window {
        send_one(p, buf, padding, now_us())?;
    }
    flush(p)
}

/// One event loop over `pairs`, from `go` until every frame is accounted for (or the grace
/// runs out).
fn run_loop(
    mut pairs: Vec<Pair>,
    plan: &Plan,
    go: &Barrier,
    live: &Live,
) -> Result<LoopResult, String> {
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
    let mut poll = registered.map_err(|e| format!("poll: {e}"))?;
    let mut r = LoopResult::default();
    let mut events = Events::with_capacity(1024);
    let mut buf = Vec::with_capacity(plan.size);
    let padding = vec![0x5au8; plan.size - MIN_FRAME - 8];
    let mut touched: Vec<usize> = Vec::new();
    let start = Instant::now();
    let start_us = now_us();
    let stop_at = start + plan.duration;
    let mut scheduled = 0u64;
    if plan.rate.is_none() {
        for p in pairs.iter_mut() {
            refill(p, plan.window, &mut buf, &padding)?;
        }
    }
    loop {
        let now = Instant::now();
        let sending = now < stop_at;
        if !sending {
            let settled = pairs.iter().all(|p| p.delivered + p.refused >= p.sent);
            if settled || now >= stop_at + plan.grace {
                break;
            }
        }
        // Open loop: send every frame now due, stamped with when it was due.
        let timeout = match plan.rate {
            Some(rate) if sending => {
                let due_at = |k: u64| Duration::from_secs_f64(k as f64 / rate);
                loop {
                    let due = due_at(scheduled);
                    if start + due > now || start + due >= stop_at {
                        break;
                    }
                    let i = (scheduled % pairs.len() as u64) as usize;
                    send_one(
                        &mut pairs[i],
                        &mut buf,
                        &padding,
                        start_us + due.as_micros() as u64,
                    )?;
                    touched.push(i);
                    scheduled += 1;
                }
                for i in touched.drain(..) {
                    flush(&mut pairs[i])?;
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
        poll.poll(&mut events, timeout).map_err(|e| e.to_string())?;
        for ev in events.iter() {
            let i = ev.token().0 / 2;
            let p = &mut pairs[i];
            if ev.token().0 % 2 == 1 {
                let got = receive(p, &mut r, live)?;
                // tungstenite answers pings on read; the answer may still need a flush.
                let _ = p.rx.flush();
                if got > 0 && plan.rate.is_none() && Instant::now() < stop_at {
                    refill(p, plan.window, &mut buf, &padding)?;
                }
            } else {
                if ev.is_readable() {
                    let before = p.refused;
                    read_refusals(p, &mut r)?;
                    // Refused frames leave the window too.
                    if p.refused > before && plan.rate.is_none() && Instant::now() < stop_at {
                        refill(p, plan.window, &mut buf, &padding)?;
                    }
                }
                if ev.is_writable() && p.tx_blocked {
                    flush(p)?;
                }
            }
        }
    }
    for p in &pairs {
        r.totals.sent += p.sent;
        // Anything neither delivered nor refused by the end is lost.
        r.totals.lost += p.sent.saturating_sub(p.delivered + p.refused);
    }
    Ok(r)
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
            sent: 0,
            expected: 1,
            refused: 0,
            delivered: 0,
            tx_blocked: false,
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
    for l in loops {
        let r = l.join().expect("client loop")?;
        totals.sent += r.totals.sent;
        totals.delivered += r.totals.delivered;
        totals.duplicated += r.totals.duplicated;
        totals.corrupted += r.totals.corrupted;
        totals.lost += r.totals.lost;
        for (k, v) in r.totals.refused {
            *totals.refused.entry(k).or_default() += v;
        }
        latency.merge(r.latency);
        last_delivery = last_delivery.max(r.last_delivery.unwrap_or(start));
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
    println!(
        "sent {}  delivered {}  ({per_sec:.0}/s)  lost {}  duplicated {}  corrupted {}  refused {:?}",
        totals.sent,
        totals.delivered,
        totals.lost,
        totals.duplicated,
        totals.corrupted,
        totals.refused
    );
    let cpu_ns_per_frame = server_cpu
        .filter(|_| totals.delivered > 0)
        .map(|c| c * 1e9 / totals.delivered as f64);
    if let (Some(c), Some(ns)) = (server_cpu, cpu_ns_per_frame) {
        println!("server CPU {c:.2} s = {ns:.0} ns per delivered frame");
    }
    let ok = totals.lost == 0 && totals.corrupted == 0 && totals.duplicated == 0;
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
                totals,
                latency: rows,
            },
        )?;
    }
    Ok(ok)
}

//! The `relay` scenario: N sender/target pairs over WebSocket. Each sender sends frames of
//! `--size` bytes to its partner, closed loop (at most `--window` in flight per pair) or at a
//! total `--rate`. Every received frame is CRC-checked and accounted; the run ends with sent,
//! delivered, lost, duplicated and corrupted counts, and fails on any loss or corruption.
//!
//! The frame's timestamp field carries the microsecond it was due to be sent (the server treats
//! it as opaque), so latency is measured from the frame itself, without coordinated omission.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Args;
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

fn connect(addr: SocketAddr, token: &str) -> Result<WebSocket<TcpStream>, String> {
    let stream = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    setup::upgrade(stream, addr, token)
}

/// Per-pair counters shared by its sender and target threads.
#[derive(Default)]
struct PairState {
    sent: AtomicU64,
    received: AtomicU64,
}

pub fn run(args: RelayArgs) -> Result<bool, String> {
    let target = args.common.target;
    check_loopback(target)?;
    if args.size < MIN_FRAME + 8 {
        return Err(format!("--size must be at least {}", MIN_FRAME + 8));
    }
    if args.pairs == 0 || args.window == 0 {
        return Err("--pairs and --window must be at least 1".into());
    }
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
    let live = Arc::new(Live::default());
    let stop = Arc::new(AtomicBool::new(false));
    let interval =
        (args.rate > 0).then(|| Duration::from_secs_f64(args.pairs as f64 / args.rate as f64));
    let mut targets = Vec::new();
    let mut senders = Vec::new();
    let sending = Arc::new(AtomicBool::new(true));
    for pair in accounts.chunks(2) {
        let (s, t) = (pair[0].clone(), pair[1].clone());
        let state = Arc::new(PairState::default());
        let mut rx = connect(target, &t.1)?;
        rx.get_mut()
            .set_read_timeout(Some(Duration::from_millis(200)))
            .map_err(|e| e.to_string())?;
        let mut tx = connect(target, &s.1)?;
        let (live_r, st_r, sending_r) = (live.clone(), state.clone(), sending.clone());
        let grace = Duration::from_secs(args.grace);
        let sender_uid = s.0;
        targets.push(std::thread::spawn(move || {
            receive(&mut rx, sender_uid, &st_r, &live_r, &sending_r, grace)
        }));
        let (st_s, sending_s, window, size) =
            (state.clone(), sending.clone(), args.window, args.size);
        senders.push(std::thread::spawn(move || {
            send(&mut tx, s.0, t.0, size, window, interval, &st_s, &sending_s)
        }));
    }
    let ticker = report::progress(live.clone(), stop.clone(), "frames");
    let cpu_before = args.server_pid.and_then(cpu_seconds);
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(args.common.duration));
    sending.store(false, Ordering::Relaxed);
    let mut totals = Totals::default();
    for s in senders {
        let (sent, refused) = s.join().expect("sender thread")?;
        totals.sent += sent;
        for (k, v) in refused {
            *totals.refused.entry(k).or_default() += v;
        }
    }
    let sending_time = start.elapsed();
    let mut latency = Series::default();
    for t in targets {
        let r = t.join().expect("target thread")?;
        totals.delivered += r.delivered;
        totals.duplicated += r.duplicated;
        totals.corrupted += r.corrupted;
        totals.lost += r.lost;
        latency.merge(r.latency);
    }
    stop.store(true, Ordering::Relaxed);
    let _ = ticker.join();
    let server_cpu = match (cpu_before, args.server_pid.and_then(cpu_seconds)) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let refused: u64 = totals.refused.values().sum();
    // Frames the server refused with an ERROR are accounted, not lost.
    totals.lost = totals
        .sent
        .saturating_sub(totals.delivered + refused)
        .max(totals.lost);
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

#[allow(clippy::too_many_arguments)]
fn send(
    ws: &mut WebSocket<TcpStream>,
    uid: u64,
    target: u64,
    size: usize,
    window: u64,
    interval: Option<Duration>,
    state: &PairState,
    sending: &AtomicBool,
) -> Result<(u64, BTreeMap<String, u64>), String> {
    let mut seq = 0u64;
    let mut buf = Vec::with_capacity(size);
    let padding = vec![0x5au8; size - MIN_FRAME - 8];
    let mut due = Instant::now();
    let due_us_base = now_us();
    let base = Instant::now();
    while sending.load(Ordering::Relaxed) {
        // Closed loop: fill the window, then flush once (one syscall for the batch).
        let burst = match interval {
            Some(iv) => {
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                due += iv;
                1
            }
            None => loop {
                let free = window.saturating_sub(seq - state.received.load(Ordering::Relaxed));
                if free > 0 || !sending.load(Ordering::Relaxed) {
                    break free;
                }
                std::thread::yield_now();
            },
        };
        if !sending.load(Ordering::Relaxed) {
            break;
        }
        for _ in 0..burst {
            let stamp = match interval {
                Some(iv) => due_us_base + (due - iv).duration_since(base).as_micros() as u64,
                None => now_us(),
            };
            seq += 1;
            buf.clear();
            let mut data = Vec::with_capacity(size);
            data.extend_from_slice(&seq.to_be_bytes());
            data.extend_from_slice(&padding);
            frame::encode(&mut buf, uid, target, frame::msg_type::TEXT, stamp, &data);
            ws.write(Message::Binary(bytes::Bytes::copy_from_slice(&buf)))
                .map_err(|e| format!("send: {e}"))?;
        }
        ws.flush().map_err(|e| format!("send: {e}"))?;
        state.sent.store(seq, Ordering::Relaxed);
    }
    // Collect what the server refused (ERROR frames), briefly.
    let mut refused = BTreeMap::new();
    ws.get_mut()
        .set_read_timeout(Some(Duration::from_millis(300)))
        .map_err(|e| e.to_string())?;
    while let Ok(Message::Binary(b)) = ws.read() {
        if let Ok(f) = Frame::parse(&b)
            && f.msg_type() == frame::msg_type::ERROR
            && !f.data().is_empty()
        {
            *refused.entry(format!("error_{}", f.data()[0])).or_default() += 1;
        }
    }
    Ok((seq, refused))
}

struct Received {
    delivered: u64,
    duplicated: u64,
    corrupted: u64,
    lost: u64,
    latency: Series,
}

fn receive(
    ws: &mut WebSocket<TcpStream>,
    sender: u64,
    state: &PairState,
    live: &Live,
    sending: &AtomicBool,
    grace: Duration,
) -> Result<Received, String> {
    let mut r = Received {
        delivered: 0,
        duplicated: 0,
        corrupted: 0,
        lost: 0,
        latency: Series::default(),
    };
    let mut expected = 1u64;
    let mut stopped_at: Option<Instant> = None;
    loop {
        if !sending.load(Ordering::Relaxed) {
            let at = *stopped_at.get_or_insert_with(Instant::now);
            if expected > state.sent.load(Ordering::Relaxed) || at.elapsed() > grace {
                break;
            }
        }
        let bytes = match ws.read() {
            Ok(Message::Binary(b)) => b,
            Ok(_) => continue,
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(e) => return Err(format!("target read: {e}")),
        };
        let Ok(f) = Frame::parse(&bytes) else {
            r.corrupted += 1;
            continue;
        };
        if f.uid() != sender || f.data().len() < 8 {
            r.corrupted += 1;
            continue;
        }
        let seq = u64::from_be_bytes(f.data()[..8].try_into().expect("8 bytes"));
        if seq < expected {
            r.duplicated += 1;
            continue;
        }
        if seq > expected {
            r.lost += seq - expected;
        }
        expected = seq + 1;
        r.delivered += 1;
        state.received.store(seq, Ordering::Relaxed);
        live.done.fetch_add(1, Ordering::Relaxed);
        r.latency
            .record(true, now_us().saturating_sub(f.timestamp()));
    }
    Ok(r)
}

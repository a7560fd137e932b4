//! The `connections` scenario: open N idle WebSocket connections, hold them, and report the
//! server's resident memory per connection (from `/proc/<pid>/status`, `--server-pid`).
//!
//! Client sockets are spread over source addresses 127.0.0.2, .3, ... (bound before connecting),
//! so N and repeated runs are not limited by one address's ephemeral ports and its TIME_WAIT
//! sockets.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use socket2::{Domain, Socket, Type};
use tungstenite::WebSocket;

use crate::{Common, check_loopback, setup};

#[derive(Args)]
pub struct ConnectionsArgs {
    #[command(flatten)]
    common: Common,
    /// Idle WebSocket connections to open.
    #[arg(long, default_value_t = 10_000)]
    count: usize,
    /// The server's process id, to read its resident memory.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Connections per account (the server allows 8 devices per user by default).
    #[arg(long, default_value_t = 8)]
    per_user: usize,
    /// Connections per source address before moving to the next 127.0.0.x.
    #[arg(long, default_value_t = 20_000)]
    per_source: usize,
    /// Connect to `polyge-baseline` instead: no accounts, the token is the uid.
    #[arg(long)]
    baseline: bool,
}

#[derive(Serialize)]
struct Results {
    scenario: &'static str,
    requested: usize,
    opened: usize,
    failures: usize,
    held_seconds: u64,
    server_rss_before_kib: Option<u64>,
    server_rss_held_kib: Option<u64>,
    bytes_per_connection: Option<f64>,
    projected_connections_per_24_gib: Option<f64>,
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn open(addr: SocketAddr, source: Ipv4Addr, token: &str) -> Result<WebSocket<TcpStream>, String> {
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None).map_err(|e| e.to_string())?;
    sock.bind(&SocketAddr::new(IpAddr::V4(source), 0).into())
        .map_err(|e| format!("bind {source}: {e}"))?;
    sock.connect(&addr.into())
        .map_err(|e| format!("connect: {e}"))?;
    let stream: TcpStream = sock.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    setup::upgrade(stream, addr, token)
}

pub fn run(args: ConnectionsArgs) -> Result<bool, String> {
    let target = args.common.target;
    check_loopback(target)?;
    if args.per_user == 0 || args.per_source == 0 {
        return Err("--per-user and --per-source must be at least 1".into());
    }
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if (limit as usize) < args.count + 64 => eprintln!(
            "warning: this process may open only about {limit} files; some connections will fail"
        ),
        Ok(_) => {}
        Err(e) => eprintln!("warning: cannot raise the open-file limit: {e}"),
    }
    let users = args.count.div_ceil(args.per_user);
    let accounts: Vec<setup::Account> = if args.baseline {
        (1..=users as u64)
            .map(|uid| (uid, uid.to_string()))
            .collect()
    } else {
        eprintln!("setting up {users} accounts...");
        setup::accounts(target, &format!("idle{}", std::process::id()), users)?
    };
    let before = args.server_pid.and_then(rss_kib);
    let mut held = Vec::with_capacity(args.count);
    let mut failures = 0;
    let mut first_error = None;
    let started = Instant::now();
    for i in 0..args.count {
        let source = Ipv4Addr::new(127, 0, 0, 2 + (i / args.per_source).min(252) as u8);
        match open(target, source, &accounts[i / args.per_user].1) {
            Ok(ws) => held.push(ws),
            Err(e) => {
                failures += 1;
                first_error.get_or_insert(e);
            }
        }
        if (i + 1) % 1000 == 0 {
            eprintln!(
                "{:>6} opened, {failures} failed ({:.1} s)",
                held.len(),
                started.elapsed().as_secs_f64()
            );
        }
    }
    if let Some(e) = &first_error {
        eprintln!("first failure: {e}");
    }
    eprintln!(
        "holding {} connections for {} s",
        held.len(),
        args.common.duration
    );
    std::thread::sleep(Duration::from_secs(args.common.duration));
    let during = args.server_pid.and_then(rss_kib);
    let per_conn = match (before, during) {
        (Some(b), Some(d)) if !held.is_empty() => {
            Some(d.saturating_sub(b) as f64 * 1024.0 / held.len() as f64)
        }
        _ => None,
    };
    let projected = per_conn.map(|b| (24u64 << 30) as f64 / b);
    println!(
        "opened {} of {}, {failures} failed; server RSS {:?} KiB -> {:?} KiB",
        held.len(),
        args.count,
        before,
        during
    );
    if let (Some(b), Some(p)) = (per_conn, projected) {
        println!(
            "{b:.0} bytes per idle connection; a 24 GiB server holds about {p:.0} (memory only)"
        );
    }
    if let Some(path) = &args.common.json {
        crate::report::write_json(
            path,
            &Results {
                scenario: "connections",
                requested: args.count,
                opened: held.len(),
                failures,
                held_seconds: args.common.duration,
                server_rss_before_kib: before,
                server_rss_held_kib: during,
                bytes_per_connection: per_conn,
                projected_connections_per_24_gib: projected,
            },
        )?;
    }
    drop(held);
    Ok(failures == 0)
}

//! The `connections` scenario: open N idle WebSocket connections, hold them, and report the
//! server's memory per connection (from `/proc/<pid>/status`, `--server-pid`).
//!
//! Client sockets are spread over source addresses 127.0.0.2, .3, ... (`--per-source` each),
//! so N and repeated runs are not limited by one address's ephemeral ports. Each socket is bound
//! with `IP_BIND_ADDRESS_NO_PORT`: the port is picked at `connect`, against the full 4-tuple, so
//! ports still in TIME_WAIT from an earlier run do not fail the bind with EADDRINUSE.
//!
//! Idle is not silent: the server pings a connection after 30 s without input and closes it
//! after 75 s, so the holding phase keeps reading every socket (tungstenite answers pings on
//! read and flush). Before the memory is sampled every socket is checked; the memory is divided
//! by the connections still open, and any the server dropped fail the run.
//!
//! Memory is reported as VmRSS and RssAnon. The per-connection figure uses RssAnon when the
//! kernel reports it: VmRSS also counts the file-mapped LMDB pages the server touches, which
//! have nothing to do with connections.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use socket2::{Domain, Socket, Type};
use tungstenite::{Message, WebSocket};

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
    #[arg(long, default_value_t = 5_000)]
    per_source: usize,
    /// Connect to `polyge-baseline` instead: no accounts, the token is the uid.
    #[arg(long)]
    baseline: bool,
}

/// How often open sockets are read (pings answered, closes noticed) while opening and holding.
const SERVICE_EVERY: Duration = Duration::from_millis(500);

#[derive(Serialize)]
struct Results {
    scenario: &'static str,
    requested: usize,
    opened: usize,
    /// Connections that could not be opened.
    failures: usize,
    /// Opened connections the server closed (or that broke) before the sample.
    dropped: usize,
    /// Connections open when the memory was sampled (the divisor of `bytes_per_connection`).
    live: usize,
    held_seconds: u64,
    server_rss_before_kib: Option<u64>,
    server_rss_held_kib: Option<u64>,
    server_rss_anon_before_kib: Option<u64>,
    server_rss_anon_held_kib: Option<u64>,
    bytes_per_connection: Option<f64>,
    /// `RssAnon` or `VmRSS`: which figure `bytes_per_connection` is from.
    bytes_per_connection_from: Option<&'static str>,
    projected_connections_per_24_gib: Option<f64>,
    clean: bool,
}

/// VmRSS and RssAnon of a process, in KiB.
#[derive(Clone, Copy, Default)]
struct Memory {
    rss: Option<u64>,
    anon: Option<u64>,
}

fn memory(pid: Option<u32>) -> Memory {
    let Some(status) = pid.and_then(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
    else {
        return Memory::default();
    };
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Memory {
        rss: field("VmRSS:"),
        anon: field("RssAnon:"),
    }
}

/// Lets `connect` choose the port of a socket bound to an address with port 0.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)] // one setsockopt call: socket2 has no safe setter for this option
fn bind_address_no_port(sock: &Socket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: `sock` is an open socket; the option value is a c_int and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn bind_address_no_port(_sock: &Socket) -> std::io::Result<()> {
    Ok(())
}

fn open(addr: SocketAddr, source: Ipv4Addr, token: &str) -> Result<WebSocket<TcpStream>, String> {
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None).map_err(|e| e.to_string())?;
    bind_address_no_port(&sock).map_err(|e| format!("IP_BIND_ADDRESS_NO_PORT: {e}"))?;
    sock.bind(&SocketAddr::new(IpAddr::V4(source), 0).into())
        .map_err(|e| format!("bind {source}: {e}"))?;
    sock.connect(&addr.into())
        .map_err(|e| format!("connect from {source}: {e}"))?;
    let stream: TcpStream = sock.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let ws = setup::upgrade(stream, addr, token)?;
    ws.get_ref()
        .set_nonblocking(true)
        .map_err(|e| e.to_string())?;
    Ok(ws)
}

/// An opened connection; `closed` says why it is no longer open.
struct Held {
    ws: WebSocket<TcpStream>,
    closed: Option<String>,
}

/// Reads everything each open socket has (answering pings) and flushes the answers; marks the
/// ones the server closed. Returns how many closed in this pass.
fn service(held: &mut [Held]) -> usize {
    let mut newly = 0;
    for h in held.iter_mut().filter(|h| h.closed.is_none()) {
        let closed = loop {
            match h.ws.read() {
                Ok(Message::Close(frame)) => {
                    break Some(match frame {
                        Some(f) => format!("closed by the server: {} {}", f.code, f.reason),
                        None => "closed by the server".to_string(),
                    });
                }
                // Pings are answered inside read; nothing else is expected on an idle socket.
                Ok(_) => {}
                Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    break None;
                }
                Err(e) => break Some(e.to_string()),
            }
        };
        let closed = closed.or_else(|| match h.ws.flush() {
            Ok(()) => None,
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => None,
            Err(e) => Some(e.to_string()),
        });
        if closed.is_some() {
            h.closed = closed;
            newly += 1;
        }
    }
    newly
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
    let before = memory(args.server_pid);
    let mut held: Vec<Held> = Vec::with_capacity(args.count);
    let mut failures = 0;
    let mut first_error = None;
    let started = Instant::now();
    let mut serviced = Instant::now();
    for i in 0..args.count {
        let source = Ipv4Addr::new(127, 0, 0, 2 + (i / args.per_source).min(252) as u8);
        match open(target, source, &accounts[i / args.per_user].1) {
            Ok(ws) => held.push(Held { ws, closed: None }),
            Err(e) => {
                failures += 1;
                first_error.get_or_insert(e);
            }
        }
        if serviced.elapsed() >= SERVICE_EVERY {
            service(&mut held);
            serviced = Instant::now();
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
    let until = Instant::now() + Duration::from_secs(args.common.duration);
    while Instant::now() < until {
        let newly = service(&mut held);
        if newly > 0 {
            eprintln!("{newly} connections closed while held");
        }
        std::thread::sleep(SERVICE_EVERY.min(until.saturating_duration_since(Instant::now())));
    }
    // Every socket is read once more right before the sample: only open ones are counted.
    service(&mut held);
    let live = held.iter().filter(|h| h.closed.is_none()).count();
    let dropped = held.len() - live;
    let during = memory(args.server_pid);
    let (basis, from) = match (before.anon, during.anon) {
        (Some(b), Some(d)) => (Some((b, d)), Some("RssAnon")),
        _ => match (before.rss, during.rss) {
            (Some(b), Some(d)) => (Some((b, d)), Some("VmRSS")),
            _ => (None, None),
        },
    };
    let per_conn = basis
        .filter(|_| live > 0)
        .map(|(b, d)| d.saturating_sub(b) as f64 * 1024.0 / live as f64);
    let projected = per_conn
        .filter(|&b| b > 0.0)
        .map(|b| (24u64 << 30) as f64 / b);
    let kib = |x: Option<u64>| x.map_or("?".to_string(), |k| k.to_string());
    println!(
        "opened {} of {}, {failures} failed to open, {dropped} dropped while held, {live} open at the sample",
        held.len(),
        args.count,
    );
    if let Some(h) = held.iter().find_map(|h| h.closed.as_ref()) {
        println!("first drop: {h}");
    }
    println!(
        "server VmRSS {} KiB -> {} KiB, RssAnon {} KiB -> {} KiB",
        kib(before.rss),
        kib(during.rss),
        kib(before.anon),
        kib(during.anon)
    );
    if let (Some(b), Some(from)) = (per_conn, from) {
        print!("{b:.0} bytes per idle connection ({from})");
        match projected {
            Some(p) => println!("; a 24 GiB server holds about {p:.0} (memory only)"),
            None => println!(),
        }
    }
    let clean = failures == 0 && dropped == 0;
    if let Some(path) = &args.common.json {
        crate::report::write_json(
            path,
            &Results {
                scenario: "connections",
                requested: args.count,
                opened: held.len(),
                failures,
                dropped,
                live,
                held_seconds: args.common.duration,
                server_rss_before_kib: before.rss,
                server_rss_held_kib: during.rss,
                server_rss_anon_before_kib: before.anon,
                server_rss_anon_held_kib: during.anon,
                bytes_per_connection: per_conn,
                bytes_per_connection_from: from,
                projected_connections_per_24_gib: projected,
                clean,
            },
        )?;
    }
    drop(held);
    Ok(clean)
}

//! The `http` scenario: N keep-alive connections sending a weighted mix of endpoints.
//!
//! Closed loop: each connection sends its next request (or batch, with `--pipeline`) when the
//! answers arrive; latency is measured from the send. Open loop (`--rate R`): requests are due
//! on a fixed schedule and latency is measured from when each was *due*, so a stalled server
//! shows up as queueing delay instead of being hidden by a client that waits.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

use crate::report::{self, Live, Series};
use crate::{Common, check_loopback, setup};

#[derive(Args)]
pub struct HttpArgs {
    #[command(flatten)]
    common: Common,
    /// Keep-alive connections.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Endpoint weights: check (check_user_exists), login (argon2!), teachers, health.
    #[arg(long, default_value = "check=80,login=5,teachers=15")]
    mix: String,
    /// Requests per second in total (open loop); 0 runs closed loop.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Requests sent back to back per connection before reading the answers (closed loop).
    #[arg(long, default_value_t = 1)]
    pipeline: usize,
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum Endpoint {
    Check,
    Login,
    Teachers,
    Health,
}

impl Endpoint {
    fn label(self) -> &'static str {
        match self {
            Endpoint::Check => "check",
            Endpoint::Login => "login",
            Endpoint::Teachers => "teachers",
            Endpoint::Health => "health",
        }
    }
}

pub(crate) fn parse_mix(mix: &str) -> Result<Vec<(Endpoint, u32)>, String> {
    let mut out = Vec::new();
    for part in mix.split(',').filter(|p| !p.is_empty()) {
        let (name, weight) = part
            .split_once('=')
            .ok_or_else(|| format!("--mix: expected name=weight, got {part:?}"))?;
        let weight: u32 = weight
            .parse()
            .map_err(|_| format!("--mix: bad weight in {part:?}"))?;
        let e = match name {
            "check" => Endpoint::Check,
            "login" => Endpoint::Login,
            "teachers" => Endpoint::Teachers,
            "health" => Endpoint::Health,
            other => return Err(format!("--mix: unknown endpoint {other:?}")),
        };
        out.push((e, weight));
    }
    if out.iter().map(|(_, w)| w).sum::<u32>() == 0 {
        return Err("--mix: weights add up to 0".into());
    }
    Ok(out)
}

#[derive(Serialize)]
struct Results {
    scenario: &'static str,
    connections: usize,
    rate: u64,
    pipeline: usize,
    mix: String,
    seconds: f64,
    rows: Vec<report::Row>,
}

pub fn run(args: HttpArgs) -> Result<bool, String> {
    check_loopback(args.common.target)?;
    if args.connections == 0 || args.pipeline == 0 {
        return Err("--connections and --pipeline must be at least 1".into());
    }
    let mix = parse_mix(&args.mix)?;
    let interval = (args.rate > 0)
        .then(|| Duration::from_secs_f64(args.connections as f64 / args.rate as f64));
    let plans = (0..args.connections)
        .map(|i| ConnPlan {
            mix: mix.clone(),
            interval,
            // Spread the open-loop schedules so connections do not fire in lockstep.
            offset: interval
                .map(|iv| iv.mul_f64(i as f64 / args.connections as f64))
                .unwrap_or_default(),
            pipeline: args.pipeline,
            seed: i as u64,
        })
        .collect();
    let out = drive(&args.common, plans)?;
    let clean = out.clean();
    if let Some(path) = &args.common.json {
        report::write_json(
            path,
            &Results {
                scenario: "http",
                connections: args.connections,
                rate: args.rate,
                pipeline: args.pipeline,
                mix: args.mix.clone(),
                seconds: out.elapsed.as_secs_f64(),
                rows: out.rows,
            },
        )?;
    }
    Ok(clean)
}

/// One connection of an HTTP scenario.
pub(crate) struct ConnPlan {
    pub mix: Vec<(Endpoint, u32)>,
    /// Open loop: one request due every `interval`, the first at `offset`; closed loop: `None`.
    pub interval: Option<Duration>,
    pub offset: Duration,
    /// Requests written back to back before the answers are read (closed loop only).
    pub pipeline: usize,
    /// Seeds the endpoint choice.
    pub seed: u64,
}

/// What an HTTP scenario measured.
pub(crate) struct Outcome {
    pub rows: Vec<report::Row>,
    pub elapsed: Duration,
    /// Answers other than 200.
    pub errors: u64,
    /// Connections that failed (connect, I/O, a closed connection).
    pub failures: usize,
}

impl Outcome {
    pub fn clean(&self) -> bool {
        self.errors == 0 && self.failures == 0
    }
}

/// Creates the accounts the requests use, then runs one thread per planned connection for
/// `--duration` seconds, printing progress every second and the table at the end.
pub(crate) fn drive(common: &Common, plans: Vec<ConnPlan>) -> Result<Outcome, String> {
    let target = common.target;
    setup::account(target, "load_student", 1)?;
    // The token for /show_teachers belongs to an account the run never logs in to: logins
    // issue tokens, and past 16 per user the oldest (this one) would be revoked.
    let (_, token) = setup::account(target, "load_teacher", 2)?;
    let requests = Arc::new(Requests::new(&token, target));
    let live = Arc::new(Live::default());
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(common.duration);
    let threads: Vec<_> = plans
        .into_iter()
        .map(|plan| {
            let (requests, live) = (requests.clone(), live.clone());
            std::thread::spawn(move || connection(target, &plan, &requests, &live, deadline))
        })
        .collect();
    let ticker = report::progress(live.clone(), stop.clone(), "req");
    let (series, failures) = join_connections(threads);
    stop.store(true, Ordering::Relaxed);
    let _ = ticker.join();
    let elapsed = start.elapsed();
    Ok(Outcome {
        rows: report::table(&series, elapsed),
        elapsed,
        errors: series.values().map(|s| s.errors).sum(),
        failures,
    })
}

/// Results of one connection thread, by endpoint.
type ConnResult = Result<BTreeMap<&'static str, Series>, String>;

/// Waits for the connection threads; merges their results per endpoint and counts the failed.
fn join_connections(
    threads: Vec<std::thread::JoinHandle<ConnResult>>,
) -> (BTreeMap<String, Series>, usize) {
    let mut series: BTreeMap<String, Series> = BTreeMap::new();
    let mut failures = 0;
    for t in threads {
        match t.join().expect("connection thread") {
            Ok(s) => {
                for (label, one) in s {
                    series.entry(label.to_string()).or_default().merge(one);
                }
            }
            Err(e) => {
                failures += 1;
                eprintln!("connection failed: {e}");
            }
        }
    }
    (series, failures)
}

/// The request bytes of each endpoint, built once.
struct Requests {
    check: Vec<u8>,
    login: Vec<u8>,
    teachers: Vec<u8>,
    health: Vec<u8>,
}

impl Requests {
    fn new(token: &str, host: std::net::SocketAddr) -> Requests {
        let get =
            |path: String| format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").into_bytes();
        Requests {
            check: get("/check_user_exists?user_name=load_student".into()),
            login: get("/login?user_name=load_student&pwd=load-test-pwd&client_id=load".into()),
            teachers: format!(
                "GET /show_teachers?limit=20 HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\r\n"
            )
            .into_bytes(),
            health: get("/health".into()),
        }
    }

    fn bytes(&self, e: Endpoint) -> &[u8] {
        match e {
            Endpoint::Check => &self.check,
            Endpoint::Login => &self.login,
            Endpoint::Teachers => &self.teachers,
            Endpoint::Health => &self.health,
        }
    }
}

/// A small xorshift generator: picking endpoints needs no cryptographic quality.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn pick(&mut self, mix: &[(Endpoint, u32)]) -> Endpoint {
        let total: u32 = mix.iter().map(|(_, w)| w).sum();
        let mut x = (self.next() % u64::from(total)) as u32;
        for &(e, w) in mix {
            if x < w {
                return e;
            }
            x -= w;
        }
        mix[0].0
    }
}

fn connection(
    target: std::net::SocketAddr,
    plan: &ConnPlan,
    requests: &Requests,
    live: &Live,
    deadline: Instant,
) -> ConnResult {
    let ConnPlan {
        ref mix,
        interval,
        offset,
        pipeline,
        seed,
    } = *plan;
    let mut sock = TcpStream::connect(target).map_err(|e| e.to_string())?;
    sock.set_nodelay(true).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut series: BTreeMap<&'static str, Series> = BTreeMap::new();
    let mut reader = Reader::default();
    let mut batch = Vec::new();
    let mut sent: Vec<Endpoint> = Vec::with_capacity(pipeline);
    let mut due = Instant::now() + offset;
    while Instant::now() < deadline {
        let started = match interval {
            Some(iv) => {
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                let intended = due;
                due += iv;
                intended
            }
            None => Instant::now(),
        };
        batch.clear();
        sent.clear();
        let depth = if interval.is_some() { 1 } else { pipeline };
        for _ in 0..depth {
            let e = rng.pick(mix);
            batch.extend_from_slice(requests.bytes(e));
            sent.push(e);
        }
        sock.write_all(&batch).map_err(|e| e.to_string())?;
        for &e in &sent {
            let status = reader.next_status(&mut sock)?;
            let micros = started.elapsed().as_micros() as u64;
            let ok = status == 200;
            series.entry(e.label()).or_default().record(ok, micros);
            live.done.fetch_add(1, Ordering::Relaxed);
            if !ok {
                live.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    Ok(series)
}

/// Reads answers off a keep-alive connection.
#[derive(Default)]
struct Reader {
    buf: Vec<u8>,
}

impl Reader {
    fn next_status(&mut self, sock: &mut TcpStream) -> Result<u16, String> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 16];
            let mut resp = httparse::Response::new(&mut headers);
            if let Ok(httparse::Status::Complete(head)) = resp.parse(&self.buf) {
                let len = resp
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| {
                        std::str::from_utf8(h.value)
                            .ok()?
                            .trim()
                            .parse::<usize>()
                            .ok()
                    })
                    .ok_or("answer without Content-Length")?;
                if self.buf.len() >= head + len {
                    let status = resp.code.unwrap_or(0);
                    self.buf.drain(..head + len);
                    return Ok(status);
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            match sock.read(&mut chunk) {
                Ok(0) => return Err("server closed the connection".into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}

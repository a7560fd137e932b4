//! The `http` scenario: N keep-alive connections sending a weighted mix of endpoints.
//!
//! Closed loop: each connection sends its next request (or batch, with `--pipeline`) when the
//! answers arrive; latency is measured from the send. Open loop (`--rate R`): requests are due
//! on a fixed schedule and latency is measured from when each was *due*, so a stalled server
//! shows up as queueing delay instead of being hidden by a client that waits. The open loop
//! runs on the schedule, not the wall clock: every request due before the deadline is sent,
//! however late, for up to [`TAIL_CAP`] after it; any still unsent then is counted as *not
//! sent*, with how long it had been due as a lower bound of its latency, and fails the run.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, OnceLock};
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
    /// Requests sent back to back per connection before reading the answers (closed loop; at
    /// most 1024, see MAX_PIPELINE).
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

/// Most requests written back to back on one connection (`--pipeline`). The client writes the
/// whole batch before it reads; the server stops reading a connection once 256 KiB of answers
/// wait to be written (`--max-pending-output`), so a batch whose answers outgrow that plus the
/// kernel's socket buffers would leave both ends waiting for each other. 1024 answers of about
/// 200 bytes stay under it.
pub(crate) const MAX_PIPELINE: usize = 1024;

/// How long after `--duration` an open loop keeps sending the requests that fell due before
/// it. A request still unsent then is recorded as not sent, with how long it had been due.
pub(crate) const TAIL_CAP: Duration = Duration::from_secs(30);

/// Longest wait for one answer, or for one batch to be written.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Most bytes buffered while waiting for one whole answer (the largest, a page of teachers, is a
/// few KiB).
const MAX_ANSWER_BUFFER: usize = 1 << 20;

/// Bytes asked for per read of answers.
const READ_CHUNK: usize = 16 * 1024;

#[derive(Serialize)]
struct Results {
    scenario: &'static str,
    connections: usize,
    rate: u64,
    pipeline: usize,
    mix: String,
    /// The sending window the per-second rates divide by.
    seconds: f64,
    failed_connections: usize,
    clean: bool,
    rows: Vec<report::Row>,
}

pub fn run(args: HttpArgs) -> Result<bool, String> {
    check_loopback(args.common.target)?;
    if args.connections == 0 || args.pipeline == 0 {
        return Err("--connections and --pipeline must be at least 1".into());
    }
    if args.pipeline > MAX_PIPELINE {
        return Err(format!("--pipeline is at most {MAX_PIPELINE}"));
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
                seconds: out.window.as_secs_f64(),
                failed_connections: out.failures,
                clean,
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
    /// From the start to the deadline, or to the last send if an open loop sent past it.
    pub window: Duration,
    /// Answers other than 200.
    pub errors: u64,
    /// Open-loop requests that fell due and were never sent.
    pub not_sent: u64,
    /// Connections that failed (connect, I/O, a closed connection).
    pub failures: usize,
}

impl Outcome {
    pub fn clean(&self) -> bool {
        self.errors == 0 && self.not_sent == 0 && self.failures == 0
    }
}

/// The common start: every connection is open before the clock starts, so the schedules and
/// the deadline do not include connecting.
struct Start {
    ready: Barrier,
    go: Barrier,
    at: OnceLock<Instant>,
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
    let duration = Duration::from_secs(common.duration);
    let start = Arc::new(Start {
        ready: Barrier::new(plans.len() + 1),
        go: Barrier::new(plans.len() + 1),
        at: OnceLock::new(),
    });
    let threads: Vec<_> = plans
        .into_iter()
        .map(|plan| {
            let (requests, live, start) = (requests.clone(), live.clone(), start.clone());
            std::thread::spawn(move || {
                connection(target, &plan, &requests, &live, &start, duration)
            })
        })
        .collect();
    start.ready.wait();
    let t0 = Instant::now();
    start.at.set(t0).expect("set once");
    start.go.wait();
    let ticker = report::progress(live.clone(), stop.clone(), "req");
    let (series, failures, last_send) = join_connections(threads);
    stop.store(true, Ordering::Relaxed);
    let _ = ticker.join();
    let window = sending_window(t0, duration, last_send);
    Ok(Outcome {
        rows: report::table(&series, window),
        window,
        errors: series.values().map(|s| s.errors).sum(),
        not_sent: series.values().map(|s| s.not_sent).sum(),
        failures,
    })
}

/// The time requests were sent over: the run's duration, longer only if an open loop was still
/// sending overdue requests after the deadline (a request that started before the deadline and
/// was answered after it does not stretch it).
fn sending_window(t0: Instant, duration: Duration, last_send: Option<Instant>) -> Duration {
    last_send.map_or(duration, |l| l.duration_since(t0).max(duration))
}

/// What one connection thread measured, by endpoint, and why it stopped early (if it did).
#[derive(Default)]
struct ConnOutput {
    series: BTreeMap<&'static str, Series>,
    /// When its last request went out.
    last_send: Option<Instant>,
    error: Option<String>,
}

/// Waits for the connection threads; merges their results per endpoint (a failed connection's
/// results too) and counts the failed.
fn join_connections(
    threads: Vec<std::thread::JoinHandle<ConnOutput>>,
) -> (BTreeMap<String, Series>, usize, Option<Instant>) {
    let mut series: BTreeMap<String, Series> = BTreeMap::new();
    let mut failures = 0;
    let mut last_send = None;
    for t in threads {
        let out = t.join().expect("connection thread");
        for (label, one) in out.series {
            series.entry(label.to_string()).or_default().merge(one);
        }
        last_send = last_send.max(out.last_send);
        if let Some(e) = out.error {
            failures += 1;
            eprintln!("connection failed: {e}");
        }
    }
    (series, failures, last_send)
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

/// An open-loop connection's schedule: its `k`-th request is due `offset + k * interval` after
/// the start (multiplied, not accumulated, so the schedule does not drift).
#[derive(Clone, Copy, Debug)]
struct Schedule {
    offset: Duration,
    interval: Duration,
}

impl Schedule {
    fn due(&self, k: u64) -> Duration {
        let iv = u64::try_from(self.interval.as_nanos()).unwrap_or(u64::MAX);
        self.offset + Duration::from_nanos(iv.saturating_mul(k))
    }

    /// The requests from the `next`-th on that fell due before `deadline`, each with how long it
    /// had been due at `end` (`None`: not due yet). Times count from the start.
    fn unsent(
        self,
        next: u64,
        deadline: Duration,
        end: Duration,
    ) -> impl Iterator<Item = Option<Duration>> {
        (next..)
            .map(move |k| self.due(k))
            .take_while(move |&due| due < deadline)
            .map(move |due| end.checked_sub(due))
    }
}

fn open_socket(target: std::net::SocketAddr) -> Result<TcpStream, String> {
    let sock = TcpStream::connect(target).map_err(|e| format!("connect: {e}"))?;
    sock.set_nodelay(true).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    sock.set_write_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    Ok(sock)
}

/// One connection's loop state.
struct State {
    series: BTreeMap<&'static str, Series>,
    rng: Rng,
    reader: Reader,
    /// Open loop: the index of the next request of the schedule.
    next: u64,
    last_send: Option<Instant>,
}

fn connection(
    target: std::net::SocketAddr,
    plan: &ConnPlan,
    requests: &Requests,
    live: &Live,
    start: &Start,
    duration: Duration,
) -> ConnOutput {
    let sock = open_socket(target);
    start.ready.wait();
    start.go.wait();
    let t0 = *start.at.get().expect("start set before go");
    let deadline = t0 + duration;
    let cap = deadline + TAIL_CAP;
    let schedule = plan.interval.map(|interval| Schedule {
        offset: plan.offset,
        interval,
    });
    let mut st = State {
        series: BTreeMap::new(),
        rng: Rng(plan.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1),
        reader: Reader::default(),
        next: 0,
        last_send: None,
    };
    let error = match sock {
        Ok(mut sock) => {
            let clock = Clock { t0, deadline, cap };
            exchange(&mut sock, plan, schedule, requests, live, clock, &mut st).err()
        }
        Err(e) => Some(e),
    };
    // Open loop: whatever fell due before the deadline and was never sent (the tail cap ran
    // out, or the connection failed) is recorded, with how long it had waited by then.
    if let Some(s) = schedule {
        let end = Instant::now().min(cap).duration_since(t0);
        for waited in s.unsent(st.next, duration, end) {
            let e = st.rng.pick(&plan.mix);
            st.series
                .entry(e.label())
                .or_default()
                .record_not_sent(waited.map(|w| w.as_micros() as u64));
        }
    }
    ConnOutput {
        series: st.series,
        last_send: st.last_send,
        error,
    }
}

/// The run's times: its start, the deadline, and the open loop's tail cap.
#[derive(Clone, Copy)]
struct Clock {
    t0: Instant,
    deadline: Instant,
    cap: Instant,
}

/// Sends and reads until the run is over: closed loop until the deadline; open loop until every
/// request due before the deadline is sent, or the tail cap.
fn exchange(
    sock: &mut TcpStream,
    plan: &ConnPlan,
    schedule: Option<Schedule>,
    requests: &Requests,
    live: &Live,
    clock: Clock,
    st: &mut State,
) -> Result<(), String> {
    let Clock { t0, deadline, cap } = clock;
    let mut batch = Vec::new();
    let mut sent: Vec<Endpoint> = Vec::with_capacity(plan.pipeline);
    loop {
        let started = match schedule {
            Some(s) => {
                let due = t0 + s.due(st.next);
                if due >= deadline {
                    return Ok(());
                }
                let now = Instant::now();
                if now >= cap {
                    return Ok(());
                }
                if due > now {
                    std::thread::sleep(due - now);
                }
                // Past the deadline, an answer is not waited for beyond the cap.
                let left = cap.saturating_duration_since(Instant::now());
                if left < IO_TIMEOUT {
                    sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))
                        .map_err(|e| e.to_string())?;
                }
                st.next += 1;
                due
            }
            None => {
                let now = Instant::now();
                if now >= deadline {
                    return Ok(());
                }
                now
            }
        };
        batch.clear();
        sent.clear();
        let depth = if schedule.is_some() { 1 } else { plan.pipeline };
        for _ in 0..depth {
            let e = st.rng.pick(&plan.mix);
            batch.extend_from_slice(requests.bytes(e));
            sent.push(e);
        }
        sock.write_all(&batch).map_err(|e| format!("write: {e}"))?;
        st.last_send = Some(Instant::now());
        for &e in &sent {
            let status = st.reader.next_status(sock)?;
            let micros = started.elapsed().as_micros() as u64;
            let ok = status == 200;
            st.series.entry(e.label()).or_default().record(ok, micros);
            live.done.fetch_add(1, Ordering::Relaxed);
            if !ok {
                live.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Reads answers off a keep-alive connection.
#[derive(Default)]
struct Reader {
    buf: Vec<u8>,
    /// Where the next answer starts in `buf`: answers are consumed by moving this, and the
    /// consumed bytes are dropped once per read, not once per answer (with `--pipeline` a read
    /// brings dozens of answers, and shifting the rest after each was quadratic).
    start: usize,
}

impl Reader {
    fn next_status(&mut self, sock: &mut TcpStream) -> Result<u16, String> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 16];
            let mut resp = httparse::Response::new(&mut headers);
            let pending = &self.buf[self.start..];
            let parsed = resp
                .parse(pending)
                .map_err(|e| format!("unparseable answer: {e}"))?;
            if let httparse::Status::Complete(head) = parsed {
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
                if pending.len() >= head + len {
                    let status = resp.code.unwrap_or(0);
                    self.start += head + len;
                    return Ok(status);
                }
            }
            if pending.len() > MAX_ANSWER_BUFFER {
                return Err(format!(
                    "more than {MAX_ANSWER_BUFFER} bytes without a whole answer"
                ));
            }
            self.buf.drain(..self.start);
            self.start = 0;
            let filled = self.buf.len();
            self.buf.resize(filled + READ_CHUNK, 0);
            let read = sock.read(&mut self.buf[filled..]);
            self.buf.truncate(filled + *read.as_ref().unwrap_or(&0));
            match read {
                Ok(0) => return Err("server closed the connection".into()),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err("no answer before the read timeout".into());
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_schedule_multiplies_instead_of_accumulating() {
        let s = Schedule {
            offset: 3 * MS,
            interval: Duration::from_nanos(333_333),
        };
        assert_eq!(s.due(0), 3 * MS);
        assert_eq!(
            s.due(3_000_000),
            3 * MS + Duration::from_nanos(999_999_000_000)
        );
    }

    #[test]
    fn requests_due_before_the_deadline_and_never_sent_are_all_counted() {
        let s = Schedule {
            offset: Duration::ZERO,
            interval: 10 * MS,
        };
        // Sent the first 5 (due 0..40 ms); the run ends at 100 ms and gives up at 125 ms.
        let unsent: Vec<_> = s.unsent(5, 100 * MS, 125 * MS).collect();
        assert_eq!(unsent.len(), 5);
        assert_eq!(unsent[0], Some(75 * MS));
        assert_eq!(unsent[4], Some(35 * MS));
        // Given up on before some were due: those have no latency to record.
        let early: Vec<_> = s.unsent(5, 100 * MS, 65 * MS).collect();
        assert_eq!(early.len(), 5);
        assert_eq!(early.iter().filter(|w| w.is_none()).count(), 3);
    }

    #[test]
    fn the_window_stretches_only_for_sends_after_the_deadline() {
        let t0 = Instant::now();
        let d = Duration::from_secs(2);
        assert_eq!(sending_window(t0, d, None), d);
        assert_eq!(sending_window(t0, d, Some(t0 + Duration::from_secs(1))), d);
        assert_eq!(
            sending_window(t0, d, Some(t0 + Duration::from_secs(3))),
            Duration::from_secs(3)
        );
    }

    #[test]
    fn the_mix_is_parsed_and_followed() {
        assert!(parse_mix("check=1,nope=2").is_err());
        assert!(parse_mix("check=0").is_err());
        assert!(parse_mix("check").is_err());
        let mix = parse_mix("check=3,health=1").unwrap();
        let mut rng = Rng(12345);
        let checks = (0..40_000)
            .filter(|_| matches!(rng.pick(&mix), Endpoint::Check))
            .count();
        assert!((29_000..31_000).contains(&checks), "{checks} of 40000");
    }
}

//! The `logins` scenario: a login flood (every login is an argon2id verification on the
//! server's password pool) next to a steady open-loop stream of `/check_user_exists`, whose
//! latency shows whether the flood stalls cheap requests.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

use crate::http::{Requests, connection, join_connections, parse_mix};
use crate::report::{self, Live};
use crate::{Common, check_loopback, setup};

#[derive(Args)]
pub struct LoginsArgs {
    #[command(flatten)]
    common: Common,
    /// Connections sending logins back to back.
    #[arg(long, default_value_t = 32)]
    flood: usize,
    /// Connections sending /check_user_exists.
    #[arg(long, default_value_t = 16)]
    probes: usize,
    /// /check_user_exists per second in total (open loop).
    #[arg(long, default_value_t = 2000)]
    probe_rate: u64,
}

#[derive(Serialize)]
struct Results {
    scenario: &'static str,
    flood: usize,
    probes: usize,
    probe_rate: u64,
    seconds: f64,
    rows: Vec<report::Row>,
}

pub fn run(args: LoginsArgs) -> Result<bool, String> {
    let target = args.common.target;
    check_loopback(target)?;
    if args.flood == 0 || args.probes == 0 || args.probe_rate == 0 {
        return Err("--flood, --probes and --probe-rate must be at least 1".into());
    }
    setup::account(target, "load_student", 1)?;
    let (_, token) = setup::account(target, "load_teacher", 2)?;
    let requests = Arc::new(Requests::new(&token, target));
    let live = Arc::new(Live::default());
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(args.common.duration);
    let interval = Duration::from_secs_f64(args.probes as f64 / args.probe_rate as f64);
    let mut threads = Vec::new();
    for i in 0..args.flood + args.probes {
        let (requests, live) = (requests.clone(), live.clone());
        let probe = i >= args.flood;
        let mix = parse_mix(if probe { "check=1" } else { "login=1" })?;
        let offset = interval.mul_f64((i % args.probes.max(1)) as f64 / args.probes as f64);
        threads.push(std::thread::spawn(move || {
            connection(
                target,
                &mix,
                &requests,
                &live,
                deadline,
                probe.then_some(interval),
                offset,
                1,
                i as u64 + 1,
            )
        }));
    }
    let ticker = report::progress(live.clone(), stop.clone(), "req");
    let (series, failures) = join_connections(threads);
    stop.store(true, Ordering::Relaxed);
    let _ = ticker.join();
    let elapsed = start.elapsed();
    let rows = report::table(&series, elapsed);
    if let Some(check) = rows.iter().find(|r| r.label == "check") {
        println!(
            "check_user_exists p99 during the login flood: {:.3} ms",
            check.p99_us as f64 / 1000.0
        );
    }
    let errors: u64 = series.values().map(|s| s.errors).sum();
    if let Some(path) = &args.common.json {
        report::write_json(
            path,
            &Results {
                scenario: "logins",
                flood: args.flood,
                probes: args.probes,
                probe_rate: args.probe_rate,
                seconds: elapsed.as_secs_f64(),
                rows,
            },
        )?;
    }
    Ok(errors == 0 && failures == 0)
}

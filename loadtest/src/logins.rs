//! The `logins` scenario: a login flood (every login is an argon2id verification on the
//! server's password pool) next to a steady open-loop stream of `/check_user_exists`, whose
//! latency shows whether the flood stalls cheap requests.

use std::time::Duration;

use clap::Args;
use serde::Serialize;

use crate::http::{ConnPlan, drive, parse_mix};
use crate::report;
use crate::{Common, check_loopback};

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
    failed_connections: usize,
    clean: bool,
    rows: Vec<report::Row>,
}

pub fn run(args: LoginsArgs) -> Result<bool, String> {
    let target = args.common.target;
    check_loopback(target)?;
    if args.flood == 0 || args.probes == 0 || args.probe_rate == 0 {
        return Err("--flood, --probes and --probe-rate must be at least 1".into());
    }
    let interval = Duration::from_secs_f64(args.probes as f64 / args.probe_rate as f64);
    let plans = (0..args.flood + args.probes)
        .map(|i| {
            let probe = i >= args.flood;
            Ok(ConnPlan {
                mix: parse_mix(if probe { "check=1" } else { "login=1" })?,
                interval: probe.then_some(interval),
                offset: interval.mul_f64((i % args.probes) as f64 / args.probes as f64),
                pipeline: 1,
                seed: i as u64 + 1,
            })
        })
        .collect::<Result<_, String>>()?;
    let out = drive(&args.common, plans)?;
    let clean = out.clean();
    let rows = out.rows;
    if let Some(check) = rows.iter().find(|r| r.label == "check") {
        println!(
            "check_user_exists p99 during the login flood: {:.3} ms",
            check.p99_us as f64 / 1000.0
        );
    }
    if let Some(path) = &args.common.json {
        report::write_json(
            path,
            &Results {
                scenario: "logins",
                flood: args.flood,
                probes: args.probes,
                probe_rate: args.probe_rate,
                seconds: out.window.as_secs_f64(),
                failed_connections: out.failures,
                clean,
                rows,
            },
        )?;
    }
    Ok(clean)
}

//! `polyge-load`: load scenarios against a polyge server on this machine.
//!
//! Every scenario stops by itself (a duration), prints progress every second and a final table,
//! and can write machine-readable results with `--json FILE`.

mod connections;
mod http;
mod logins;
mod relay;
mod report;
mod setup;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Args, Clone)]
pub struct Common {
    /// Server address (loopback only: 127.0.0.0/8 or ::1).
    #[arg(long, default_value = "127.0.0.1:5918")]
    pub target: SocketAddr,
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Scenario {
    /// Keep-alive HTTP connections sending a mix of endpoints, closed-loop or at a fixed rate.
    Http(http::HttpArgs),
    /// Sender/target pairs over WebSocket; every frame accounted and CRC-checked.
    Relay(relay::RelayArgs),
    /// A login flood (argon2) while measuring /check_user_exists latency on the same server.
    Logins(logins::LoginsArgs),
    /// Open N idle WebSocket connections, hold them, report server memory per connection.
    Connections(connections::ConnectionsArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.scenario {
        Scenario::Http(args) => http::run(args),
        Scenario::Relay(args) => relay::run(args),
        Scenario::Logins(args) => logins::run(args),
        Scenario::Connections(args) => connections::run(args),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("polyge-load: {e}");
            ExitCode::from(2)
        }
    }
}

/// Refuses targets off this machine: load is only ever sent to loopback.
pub fn check_loopback(addr: SocketAddr) -> Result<(), String> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(format!(
            "{addr} is not a loopback address; polyge-load only targets this machine"
        ))
    }
}

//! The scenarios run end to end: the `polyge-load` binary against a real polyge server (started
//! in this process on 127.0.0.1:0 with a temporary LMDB), checked through its exit code and its
//! `--json` results. Short runs: these check the accounting, not the speed.

use std::net::SocketAddr;
use std::process::{Command, Output};

use polyge::{Config, ServerHandle};
use serde_json::Value;

struct Server {
    handle: Option<ServerHandle>,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown();
        }
    }
}

fn server(tweak: impl FnOnce(&mut Config)) -> Server {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        workers: 2,
        data_dir: dir.path().join("data"),
        ..Config::default()
    };
    tweak(&mut config);
    let handle = polyge::start(config).expect("server starts");
    Server {
        addr: handle.local_addr(),
        handle: Some(handle),
        _dir: dir,
    }
}

/// Runs `polyge-load <args> --target ADDR --json FILE`; returns the exit code and the results.
fn load(addr: SocketAddr, args: &[&str]) -> (Option<i32>, Value, Output) {
    let dir = tempfile::tempdir().expect("temp dir");
    let json = dir.path().join("out.json");
    let out = Command::new(env!("CARGO_BIN_EXE_polyge-load"))
        .args(args)
        .args(["--target", &addr.to_string(), "--json"])
        .arg(&json)
        .output()
        .expect("polyge-load runs");
    let text = std::fs::read_to_string(&json).unwrap_or_else(|e| {
        panic!(
            "no JSON ({e}); stdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code(), serde_json::from_str(&text).unwrap(), out)
}

fn show(out: &Output) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn totals(v: &Value) -> (u64, u64, u64) {
    let t = &v["totals"];
    (
        t["sent"].as_u64().unwrap(),
        t["delivered"].as_u64().unwrap(),
        t["lost"].as_u64().unwrap(),
    )
}

#[test]
fn relay_closed_and_open_loop_account_for_every_frame() {
    // A closed loop sends as fast as frames come back, past the default per-sender rate limit.
    let s = server(|c| {
        c.rate_per_sec = 10_000_000;
        c.rate_burst = 10_000_000;
    });
    for extra in [
        &["--rate", "0"][..],
        &["--rate", "2000", "--threads", "2"][..],
    ] {
        let mut args = vec!["relay", "--pairs", "20", "--duration", "1"];
        args.extend_from_slice(extra);
        let (code, v, out) = load(s.addr, &args);
        assert_eq!(code, Some(0), "{extra:?}\n{}", show(&out));
        let (sent, delivered, lost) = totals(&v);
        assert!(sent > 100, "{extra:?}: only {sent} sent");
        assert_eq!((delivered, lost), (sent, 0), "{v}");
        assert_eq!(v["clean"], true);
        assert!(v["latency"][0]["p99_us"].as_u64().unwrap() > 0);
    }
}

#[test]
fn relay_refusals_are_matched_to_their_frames_and_fail_the_run_unless_allowed() {
    // 200 frames/s per sender with a burst of 20: a closed loop of 20 pairs is refused often.
    let s = server(|c| {
        c.rate_per_sec = 200;
        c.rate_burst = 20;
    });
    let args = ["relay", "--pairs", "20", "--duration", "1"];
    let (code, v, out) = load(s.addr, &args);
    assert_eq!(code, Some(1), "{}", show(&out));
    let (sent, delivered, lost) = totals(&v);
    let refused = v["totals"]["refused"]["rate_limited"].as_u64().unwrap_or(0);
    assert!(refused > 0, "{v}");
    // Every frame is either delivered or matched to its refusal: none lost, none unmatched.
    assert_eq!(lost, 0, "{v}");
    assert_eq!(v["totals"]["unmatched_refusals"], 0, "{v}");
    assert_eq!(delivered + refused, sent, "{v}");
    assert_eq!(v["clean"], false);

    let mut allowed = args.to_vec();
    allowed.push("--allow-refused");
    let (code, v, out) = load(s.addr, &allowed);
    assert_eq!(code, Some(0), "{}", show(&out));
    assert_eq!(v["clean"], true, "{v}");
}

#[test]
fn http_closed_pipelined_and_open_loop_runs_are_clean() {
    let s = server(|_| {});
    for extra in [
        &["--connections", "4"][..],
        &["--connections", "2", "--pipeline", "16"][..],
        &["--connections", "4", "--rate", "400"][..],
    ] {
        let mut args = vec![
            "http",
            "--duration",
            "1",
            "--mix",
            "check=80,teachers=15,login=5",
        ];
        args.extend_from_slice(extra);
        let (code, v, out) = load(s.addr, &args);
        assert_eq!(code, Some(0), "{extra:?}\n{}", show(&out));
        assert_eq!(v["clean"], true, "{v}");
        let rows = v["rows"].as_array().unwrap();
        let all = rows
            .iter()
            .find(|r| r["label"] == "all")
            .expect("an all row");
        assert!(all["ok"].as_u64().unwrap() > 50, "{v}");
        assert_eq!(all["errors"], 0, "{v}");
        assert_eq!(all["not_sent"], 0, "{v}");
    }
}

#[test]
fn an_open_loop_past_what_the_server_can_answer_fails_on_its_errors() {
    // Every login is an argon2 hash on one password thread with a two-slot queue: at 2,000
    // logins/s most are answered 503 or wait, and the tail cap is far away, so the run is
    // unclean through its errors (a 503 is an error, kept out of the success percentiles).
    let s = server(|c| {
        c.auth_threads = 1;
        c.auth_queue = 2;
    });
    let args = [
        "http",
        "--duration",
        "1",
        "--mix",
        "login=1",
        "--connections",
        "4",
        "--rate",
        "2000",
    ];
    let (code, v, out) = load(s.addr, &args);
    assert_eq!(code, Some(1), "{}", show(&out));
    assert_eq!(v["clean"], false);
    let row = &v["rows"][0];
    assert!(row["errors"].as_u64().unwrap() > 0, "{v}");
    assert!(row["error_p99_us"].as_u64().unwrap() > 0, "{v}");
}

#[test]
fn idle_connections_are_held_and_counted() {
    let s = server(|_| {});
    let args = [
        "connections",
        "--count",
        "40",
        "--per-source",
        "15",
        "--duration",
        "1",
    ];
    let (code, v, out) = load(s.addr, &args);
    assert_eq!(code, Some(0), "{}", show(&out));
    assert_eq!(v["opened"], 40, "{v}");
    assert_eq!(v["live"], 40, "{v}");
    assert_eq!(v["clean"], true, "{v}");
}

#[test]
fn targets_off_this_machine_are_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_polyge-load"))
        .args(["http", "--target", "192.0.2.1:80", "--duration", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a loopback address"));
}

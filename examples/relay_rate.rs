//! A quick relay throughput probe (the full load tool is `loadtest/`, issue 4): registers
//! `PAIRS` sender/target pairs on a running server, then every sender pushes `FRAMES` frames of
//! 64 bytes to its target over real WebSocket connections; targets CRC-check and count. Prints
//! delivered frames per second.
//!
//! Run a server with the rate limit lifted, then this:
//! `cargo run --release -- --data-dir /tmp/rate --rate-per-sec 1000000 --rate-burst 1000000`
//! `cargo run --release --example relay_rate -- 127.0.0.1:5918 50 20000`

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Barrier};
use std::time::Instant;

use polyge::frame::{self, Frame};
use tungstenite::Message;
use tungstenite::client::IntoClientRequest;

fn http(addr: SocketAddr, path: &str) -> serde_json::Value {
    let mut s = TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let at = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head")
        + 4;
    serde_json::from_slice(&buf[at..]).expect("JSON")
}

fn user(addr: SocketAddr, name: &str) -> (u64, String) {
    http(
        addr,
        &format!("/register?user_name={name}&user_type=1&pwd=secret12"),
    );
    let v = http(addr, &format!("/login?user_name={name}&pwd=secret12"));
    (
        v["result"]["uid"].as_u64().expect("login works"),
        v["result"]["token"].as_str().unwrap().to_string(),
    )
}

fn ws(addr: SocketAddr, token: &str) -> tungstenite::WebSocket<TcpStream> {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_nodelay(true).unwrap();
    let req = format!("ws://{addr}/wsconn?token={token}")
        .into_client_request()
        .unwrap();
    tungstenite::client::client(req, stream).expect("upgrade").0
}

fn main() {
    let mut args = std::env::args().skip(1);
    let addr: SocketAddr = args
        .next()
        .unwrap_or("127.0.0.1:5918".into())
        .parse()
        .expect("HOST:PORT");
    let pairs: usize = args.next().map_or(50, |a| a.parse().expect("pairs"));
    let frames: u64 = args.next().map_or(20_000, |a| a.parse().expect("frames"));
    let run = std::process::id();
    let users: Vec<((u64, String), (u64, String))> = (0..pairs)
        .map(|i| {
            (
                user(addr, &format!("s{run}x{i}")),
                user(addr, &format!("t{run}x{i}")),
            )
        })
        .collect();
    let barrier = Arc::new(Barrier::new(2 * pairs + 1));
    let mut threads = Vec::new();
    for (sender, target) in users {
        let b = barrier.clone();
        let mut rx = ws(addr, &target.1);
        threads.push(std::thread::spawn(move || {
            b.wait();
            let mut got = 0u64;
            while got < frames {
                if let Message::Binary(bytes) = rx.read().expect("read") {
                    Frame::parse(&bytes).expect("CRC intact");
                    got += 1;
                }
            }
            got
        }));
        let b = barrier.clone();
        let mut tx = ws(addr, &sender.1);
        threads.push(std::thread::spawn(move || {
            let mut f = Vec::new();
            frame::encode(
                &mut f,
                sender.0,
                target.0,
                0,
                0,
                &[0x5a; 64 - frame::MIN_FRAME],
            );
            let f = bytes::Bytes::from(f);
            b.wait();
            for i in 0..frames {
                tx.write(Message::Binary(f.clone())).expect("write");
                if i % 64 == 63 {
                    tx.flush().expect("flush");
                }
            }
            tx.flush().expect("flush");
            // Keep the connection open until the targets are done.
            let _ = tx
                .get_mut()
                .set_read_timeout(Some(std::time::Duration::from_secs(60)));
            let _ = tx.read();
            0
        }));
    }
    barrier.wait();
    let start = Instant::now();
    let mut delivered = 0u64;
    for (i, t) in threads.into_iter().enumerate() {
        if i % 2 == 0 {
            delivered += t.join().unwrap();
            if i + 2 >= 2 * pairs {
                break;
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{pairs} pairs x {frames} frames of 64 B: {delivered} delivered in {secs:.2} s = {:.0} frames/s",
        delivered as f64 / secs
    );
    std::process::exit(0);
}

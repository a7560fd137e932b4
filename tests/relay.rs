//! The relay over real WebSocket connections, with two workers so that senders and targets sit
//! on different workers (uid % 2 picks the owner).

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::ws::{Got, WsClient, parse_error};
use common::{TestServer, login, register};
use polyge::frame::{self, Frame, ack_status, error_code, msg_type};

/// Registers `n` users (u1..un) and returns their (uid, token).
fn users(s: &TestServer, n: usize) -> Vec<(u64, String)> {
    let mut c = s.client();
    (1..=n)
        .map(|i| {
            register(&mut c, &format!("u{i}"), 1, "secret1");
            login(&mut c, &format!("u{i}"), "secret1")
        })
        .collect()
}

fn connect(s: &TestServer, user: &(u64, String), acks: bool) -> WsClient {
    WsClient::connect(s.addr, user.0, &user.1, acks)
}

/// Waits until every device is registered with its owner worker (the hand-over after the
/// upgrade is asynchronous): probes until one probe reaches all of them.
fn sync_devices(a: &mut WsClient, target: u64, devices: &mut [WsClient]) {
    sync_devices_seen(a, target, devices);
}

/// [`sync_devices`], returning the other frames the devices read on the way, in order.
fn sync_devices_seen(a: &mut WsClient, target: u64, devices: &mut [WsClient]) -> Vec<Vec<u8>> {
    let mut seen = Vec::new();
    for attempt in 0..100u64 {
        let probe = a.send(target, 0, 1_000_000 + attempt, b"probe");
        let mut all = true;
        for d in devices.iter_mut() {
            d.set_timeout(Duration::from_millis(200));
            let got = loop {
                match d.next() {
                    Got::Frame(f) if f == probe => break true,
                    Got::Frame(f) => seen.push(f),
                    _ => break false,
                }
            };
            d.set_timeout(common::ANSWER_TIMEOUT);
            all &= got;
        }
        if all {
            return seen;
        }
    }
    panic!("devices never all registered");
}

#[test]
fn live_frames_arrive_byte_identical_across_workers() {
    let s = TestServer::start(|_| {});
    let u = users(&s, 2);
    assert_ne!(
        u[0].0 % 2,
        u[1].0 % 2,
        "sender and target on different workers"
    );
    let mut a = connect(&s, &u[0], false);
    let mut b = connect(&s, &u[1], false);
    for (i, size) in [0usize, 1, 100, 4000, 60_000].into_iter().enumerate() {
        let data: Vec<u8> = (0..size).map(|x| (x * 7 + i) as u8).collect();
        let sent = a.send(b.uid, msg_type::VOICE, 1_700_000_000_000 + i as u64, &data);
        assert_eq!(b.frame(), sent);
        let back = b.send(a.uid, msg_type::TEXT, 5, &data);
        assert_eq!(a.frame(), back);
    }
    // The original system's vector, relayed unchanged (uid 1 -> 2 here).
    let mut v = Vec::new();
    frame::encode(&mut v, a.uid, b.uid, 0, 1_435_473_323, b"123");
    a.send_raw(&v);
    assert_eq!(b.frame(), v);
}

#[test]
fn every_device_of_the_target_gets_the_frame() {
    let s = TestServer::start(|_| {});
    let u = users(&s, 2);
    let mut a = connect(&s, &u[0], false);
    let mut devices: Vec<WsClient> = (0..3).map(|_| connect(&s, &u[1], false)).collect();
    sync_devices(&mut a, u[1].0, &mut devices);
    let sent = a.send(u[1].0, 2, 1, b"picture bytes");
    for d in devices.iter_mut() {
        assert_eq!(d.frame(), sent);
    }
}

#[test]
fn a_ninth_device_closes_the_oldest_with_1008() {
    let s = TestServer::start(|_| {});
    let u = users(&s, 2);
    let mut a = connect(&s, &u[0], false);
    let mut devices: Vec<WsClient> = (0..8).map(|_| connect(&s, &u[1], false)).collect();
    sync_devices(&mut a, u[1].0, &mut devices);
    let _ninth = connect(&s, &u[1], false);
    assert_eq!(devices[0].close_code(), Some(1008));
}

#[test]
fn offline_frames_are_stored_acked_and_delivered_in_order_on_connect() {
    let s = TestServer::start(|_| {});
    let u = users(&s, 2);
    let mut a = connect(&s, &u[0], true);
    let mut sent = Vec::new();
    for i in 0..50u64 {
        sent.push(a.send(u[1].0, 0, i, format!("offline {i}").as_bytes()));
        let (t, data) = a.server_frame();
        assert_eq!(t, msg_type::ACK);
        assert_eq!(data[0], ack_status::STORED, "frame {i} stored");
        assert_eq!(&data[1..9], &i.to_be_bytes());
        assert_eq!(
            &data[9..13],
            &frame::crc_field(&sent[i as usize]).to_be_bytes()
        );
    }
    let mut b = connect(&s, &u[1], false);
    for want in &sent {
        assert_eq!(&b.frame(), want);
    }
    // Then live frames. Until the drain has confirmed the queue is empty they are still queued
    // (behind the drain, so in order); after that they are delivered directly.
    let mut delivered = false;
    for i in 100..200u64 {
        let live = a.send(u[1].0, 0, i, b"live");
        assert_eq!(b.frame(), live);
        let (t, data) = a.server_frame();
        assert_eq!(t, msg_type::ACK);
        if data[0] == ack_status::DELIVERED {
            delivered = true;
            break;
        }
    }
    assert!(delivered, "the target never went live");
    // The queue was emptied: a reconnect gets nothing old.
    drop(b);
    let mut b = connect(&s, &u[1], false);
    b.set_timeout(Duration::from_millis(300));
    assert!(matches!(b.next(), Got::Timeout));
}

#[test]
fn queued_frames_survive_a_restart() {
    let mut s = TestServer::start(|_| {});
    let u = users(&s, 2);
    let mut a = connect(&s, &u[0], true);
    let sent: Vec<Vec<u8>> = (0..20u64)
        .map(|i| {
            let f = a.send(u[1].0, 1, i, &[i as u8; 300]);
            assert_eq!(a.server_frame().1[0], ack_status::STORED);
            f
        })
        .collect();
    drop(a);
    s.restart();
    let mut b = connect(&s, &u[1], false);
    for want in &sent {
        assert_eq!(&b.frame(), want);
    }
}

#[test]
fn every_error_code() {
    let s = TestServer::start(|c| {
        c.rate_per_sec = 1;
        c.rate_burst = 3;
        c.queue_max_frames = 1;
    });
    let u = users(&s, 3);
    let mut a = connect(&s, &u[0], false);
    let target = u[1].0;
    let check = |a: &mut WsClient, code: u8, crc: u32| {
        let (t, data) = a.server_frame();
        assert_eq!(t, msg_type::ERROR);
        let (c, bad_crc, reason) = parse_error(&data);
        assert_eq!((c, bad_crc), (code, crc), "{reason}");
        assert!(!reason.is_empty());
    };
    a.send_raw(&[1, 2, 3]);
    check(&mut a, error_code::TOO_SHORT, 0);
    let mut bad = a.send_frame_bytes(target, 0, b"x");
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    a.send_raw(&bad);
    check(&mut a, error_code::BAD_CRC, frame::crc_field(&bad));
    let f = a.send(target, msg_type::ACK, 0, b"");
    check(&mut a, error_code::RESERVED_TYPE, frame::crc_field(&f));
    let mut spoof = Vec::new();
    frame::encode(&mut spoof, u[2].0, target, 0, 0, b"not me");
    a.send_raw(&spoof);
    check(&mut a, error_code::SPOOFED_SENDER, frame::crc_field(&spoof));
    let f = a.send(999_999, 0, 0, b"nobody");
    check(&mut a, error_code::UNKNOWN_TARGET, frame::crc_field(&f));
    // Target offline with a queue of 1: the first frame is stored, the second refused.
    a.send(target, 0, 1, b"stored");
    let f = a.send(target, 0, 2, b"refused");
    check(&mut a, error_code::QUEUE_FULL, frame::crc_field(&f));
    // Two frames passed every other check and took a token each; one more empties the
    // bucket (burst 3), and the next is rate limited.
    a.send(u[2].0, 0, 3, b"last token");
    let f = a.send(u[2].0, 0, 4, b"too fast");
    check(&mut a, error_code::RATE_LIMITED, frame::crc_field(&f));
    // Errors drop only the frame: the connection still works.
    let mut b = connect(&s, &u[1], false);
    assert_eq!(Frame::parse(&b.frame()).unwrap().data(), b"stored");
}

trait FrameBytes {
    fn send_frame_bytes(&self, target: u64, t: u8, data: &[u8]) -> Vec<u8>;
}

impl FrameBytes for WsClient {
    fn send_frame_bytes(&self, target: u64, t: u8, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        frame::encode(&mut out, self.uid, target, t, 0, data);
        out
    }
}

#[test]
fn text_oversized_and_malformed_messages_close_the_connection() {
    let s = TestServer::start(|c| c.max_frame = 1024);
    let u = users(&s, 2);
    let mut a = connect(&s, &u[0], false);
    a.ws.send(tungstenite::Message::Text("hello".into()))
        .unwrap();
    assert_eq!(a.close_code(), Some(1003));

    let mut a = connect(&s, &u[0], false);
    a.send(u[1].0, 0, 0, &[0u8; 2000]);
    assert_eq!(a.close_code(), Some(1009));

    // An unmasked client frame breaks RFC 6455: protocol error.
    let mut a = connect(&s, &u[0], false);
    use std::io::Write;
    a.ws.get_mut().write_all(&[0x82, 0x02, 0xaa, 0xbb]).unwrap();
    assert_eq!(a.close_code(), Some(1002));
}

#[test]
fn upgrade_refusals_are_http_answers() {
    let s = TestServer::start(|_| {});
    let u = users(&s, 1);
    let mut c = s.client();
    let head = |token: &str, extra: &str| {
        format!(
            "GET /wsconn?token={token} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        )
    };
    c.send(
        head(
            "00000000000000000000000000000000",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
        )
        .as_bytes(),
    );
    let r = c.read_response();
    assert_eq!(r.status, 403);
    assert_eq!(
        r.json(),
        serde_json::json!({"success": false, "msg": "invalid token"})
    );
    let mut c = s.client();
    c.send(head(&u[0].1, "Sec-WebSocket-Key: bm90IDE2IGJ5dGVz\r\n").as_bytes());
    assert_eq!(c.read_response().status, 400);
    let mut c = s.client();
    c.send(format!("GET /wsconn?token={} HTTP/1.1\r\n\r\n", u[0].1).as_bytes());
    assert_eq!(c.read_response().status, 400);
}

#[test]
fn frames_sent_with_the_upgrade_request_are_not_lost() {
    let s = TestServer::start(|_| {});
    let u = users(&s, 2);
    let mut b = connect(&s, &u[1], false);
    // Handshake and a first (masked) frame in one write.
    let mut f = Vec::new();
    frame::encode(&mut f, u[0].0, u[1].0, 0, 7, b"early");
    let mut raw = format!(
        "GET /wsconn?token={} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        u[0].1
    )
    .into_bytes();
    let mask = [1u8, 2, 3, 4];
    raw.push(0x82);
    raw.push(0x80 | f.len() as u8);
    raw.extend_from_slice(&mask);
    raw.extend(f.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    let mut c = s.client();
    c.send(&raw);
    assert_eq!(b.frame(), f);
}

#[test]
fn revoked_tokens_close_their_connections_on_any_worker() {
    let s = TestServer::start(|_| {});
    let u = users(&s, 2);
    for user in &u {
        let mut ws = connect(&s, user, false);
        let mut c = s.client();
        let r = c.get(&format!("/logout?token={}", user.1));
        assert_eq!(r.json()["success"], true);
        assert_eq!(ws.close_code(), Some(1008), "uid {}", user.0);
    }
    // Refresh revokes the old token too.
    let mut c = s.client();
    let (_, token) = login(&mut c, "u1", "secret1");
    let mut ws = WsClient::connect(s.addr, u[0].0, &token, false);
    let r = c.get(&format!("/refresh_token?token={token}&client_id=123"));
    assert_eq!(r.json()["success"], true);
    assert_eq!(ws.close_code(), Some(1008));
}

/// A target that never reads: once its unsent bytes pass the limit it is closed with 1013, the
/// rest goes to its offline queue, and after reconnecting it has every frame exactly once, in
/// order.
#[test]
fn slow_consumer_gets_1013_and_later_everything() {
    let s = TestServer::start(|c| {
        c.slow_consumer_bytes = 256 * 1024;
        c.rate_per_sec = 1_000_000;
        c.rate_burst = 1_000_000;
    });
    let u = users(&s, 2);
    let mut a = connect(&s, &u[0], false);
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(16 * 1024).unwrap();
    sock.connect(&s.addr.into()).unwrap();
    let mut b = WsClient::connect_with(sock.into(), s.addr, u[1].0, &u[1].1, false);
    let probe = a.send(u[1].0, 0, 0, b"probe");
    assert_eq!(b.frame(), probe);
    const N: u64 = 1500;
    let payload = vec![7u8; 8 * 1024];
    let sent: Vec<Vec<u8>> = (1..=N).map(|i| a.send(u[1].0, 0, i, &payload)).collect();
    // Now read: what reached B's socket before the close, then the close code.
    let mut got = Vec::new();
    let code = loop {
        match b.next() {
            Got::Frame(f) => got.push(f),
            Got::Closed(code) => break code,
            Got::Timeout => panic!("no 1013"),
        }
    };
    assert_eq!(code, Some(1013));
    assert!(got.len() < N as usize, "the target was not slow after all");
    let first_session = got.len();
    let mut b = connect(&s, &u[1], false);
    while got.len() < N as usize {
        got.push(b.frame());
    }
    let ts: Vec<u64> = got
        .iter()
        .map(|f| Frame::parse(f).unwrap().timestamp())
        .collect();
    let first_bad = ts.iter().enumerate().find(|(i, t)| **t != *i as u64 + 1);
    assert!(
        first_bad.is_none(),
        "{first_session} frames before the close; first out of place: {first_bad:?}; around it: {:?}",
        first_bad.map(|(i, _)| &ts[i.saturating_sub(3)..(i + 3).min(ts.len())])
    );
    assert_eq!(got, sent);
}

#[test]
fn ten_thousand_frames_from_many_senders_arrive_exactly_once_in_order() {
    const SENDERS: usize = 20;
    const PER_SENDER: u64 = 500;
    let s = TestServer::start(|_| {});
    let u = users(&s, SENDERS + 1);
    let target = u[SENDERS].clone();
    let mut b = connect(&s, &target, false);
    let probe_sender = &u[0];
    let mut p = connect(&s, probe_sender, false);
    let probe = p.send(target.0, 0, 0, b"probe");
    assert_eq!(b.frame(), probe);
    drop(p);
    let threads: Vec<_> = u[..SENDERS]
        .iter()
        .cloned()
        .map(|user| {
            let addr = s.addr;
            std::thread::spawn(move || {
                let mut ws = WsClient::connect(addr, user.0, &user.1, false);
                for seq in 1..=PER_SENDER {
                    ws.send(target.0, 0, seq, &seq.to_be_bytes());
                }
                ws
            })
        })
        .collect();
    let mut last: HashMap<u64, u64> = HashMap::new();
    for _ in 0..SENDERS as u64 * PER_SENDER {
        let bytes = b.frame();
        let f = Frame::parse(&bytes).unwrap();
        let prev = last.insert(f.uid(), f.timestamp()).unwrap_or(0);
        assert_eq!(
            f.timestamp(),
            prev + 1,
            "sender {} out of order or duplicated",
            f.uid()
        );
    }
    let _senders: Vec<WsClient> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(last.len(), SENDERS);
    assert!(last.values().all(|&v| v == PER_SENDER));
    b.set_timeout(Duration::from_millis(300));
    assert!(matches!(b.next(), Got::Timeout), "a duplicate arrived");
}

/// The race of HARD-PARTS 7: the target connects and disconnects over and over while a sender
/// keeps sending. Across all the target's sessions every frame arrives exactly once, in order.
#[test]
fn reconnect_races_keep_order_and_exactly_once() {
    const FRAMES: u64 = 3000;
    let s = TestServer::start(|_| {});
    let u = users(&s, 2);
    let (a_user, b_user) = (u[0].clone(), u[1].clone());
    let addr = s.addr;
    let sender = std::thread::spawn(move || {
        let mut a = WsClient::connect(addr, a_user.0, &a_user.1, true);
        for i in 1..=FRAMES {
            a.send(b_user.0, 0, i, &i.to_be_bytes());
        }
        // Every frame is acknowledged (delivered or stored): none is lost silently.
        for _ in 0..FRAMES {
            let (t, _) = a.server_frame();
            assert_eq!(t, msg_type::ACK);
        }
    });
    let mut got: Vec<u64> = Vec::new();
    let mut sessions = 0;
    while got.len() < FRAMES as usize {
        let mut b = WsClient::connect(addr, u[1].0, &u[1].1, false);
        sessions += 1;
        b.set_timeout(Duration::from_millis(5));
        for _ in 0..(sessions % 7) * 3 {
            match b.next() {
                Got::Frame(f) => got.push(Frame::parse(&f).unwrap().timestamp()),
                Got::Timeout => break,
                Got::Closed(c) => panic!("closed {c:?}"),
            }
        }
        b.set_timeout(common::ANSWER_TIMEOUT);
        for f in b.close_collect() {
            got.push(Frame::parse(&f).unwrap().timestamp());
        }
        assert!(sessions < 100_000, "no progress");
    }
    sender.join().unwrap();
    let first_bad = got.iter().enumerate().find(|(i, ts)| **ts != *i as u64 + 1);
    assert!(
        first_bad.is_none() && got.len() == FRAMES as usize,
        "after {sessions} sessions: {} frames, first out of place: {first_bad:?}",
        got.len()
    );
}

#[test]
fn silent_connections_are_pinged_then_closed() {
    let s = TestServer::start(|c| {
        c.ping_after = Duration::from_millis(200);
        c.ws_idle_timeout = Duration::from_millis(800);
    });
    let u = users(&s, 1);
    // A client that reads gets pings (and tungstenite answers them), so it stays open.
    let mut a = connect(&s, &u[0], false);
    a.set_timeout(Duration::from_millis(100));
    let mut pings = 0;
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_millis(1500) {
        match a.ws.read() {
            Ok(tungstenite::Message::Ping(_)) => pings += 1,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("closed although it answered pings: {e}"),
        }
    }
    assert!(pings >= 1);
    // A client that never answers is closed.
    let mut b = connect(&s, &u[0], false);
    std::thread::sleep(Duration::from_millis(1200));
    b.set_timeout(common::ANSWER_TIMEOUT);
    loop {
        match b.ws.read() {
            Ok(tungstenite::Message::Close(_)) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

/// Stop with frames in flight: targets get 1001, and every frame sent before the stop is either
/// received before it or waiting in the queue after the restart — exactly once, in order.
#[test]
fn shutdown_closes_with_1001_and_loses_nothing() {
    const FRAMES: u64 = 2000;
    let mut s = TestServer::start(|c| {
        c.rate_per_sec = 1_000_000;
        c.rate_burst = 1_000_000;
    });
    let u = users(&s, 2);
    let mut a = connect(&s, &u[0], true);
    let mut b = connect(&s, &u[1], false);
    let probe = a.send(u[1].0, 0, 0, b"probe");
    assert_eq!(b.frame(), probe);
    assert_eq!(a.server_frame().1[0], ack_status::DELIVERED);
    for i in 1..=FRAMES {
        a.send(u[1].0, 0, i, &[1u8; 200]);
    }
    // Every frame was handled (delivered or stored) once its ACK is back.
    for _ in 0..FRAMES {
        assert_eq!(a.server_frame().0, msg_type::ACK);
    }
    let mut got: Vec<u64> = Vec::new();
    // B reads a few, then the server stops.
    for _ in 0..10 {
        got.push(Frame::parse(&b.frame()).unwrap().timestamp());
    }
    let handle = s.take_handle();
    handle.stopper().stop();
    let code = loop {
        match b.next() {
            Got::Frame(f) => got.push(Frame::parse(&f).unwrap().timestamp()),
            Got::Closed(code) => break code,
            Got::Timeout => panic!("no close"),
        }
    };
    assert_eq!(code, Some(1001));
    handle.join();
    s.restart();
    let mut b = connect(&s, &u[1], false);
    while got.len() < FRAMES as usize {
        got.push(Frame::parse(&b.frame()).unwrap().timestamp());
    }
    let want: Vec<u64> = (1..=FRAMES).collect();
    assert!(
        got == want,
        "lost, duplicated or reordered across the restart"
    );
}

/// A client frame (masked, as RFC 6455 requires) built by hand, so the test can send it in
/// pieces: `fin` false for the first fragments of a message, `opcode` 0 for continuations.
fn masked_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x5a, 0xc3, 0x17, 0x9e];
    let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
    if payload.len() < 126 {
        out.push(0x80 | payload.len() as u8);
    } else {
        out.push(0x80 | 126);
        out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// Quiet sessions drop their buffers (tungstenite's context included) and make new ones when
/// data comes; a quiet spell in the middle of a frame, of a fragmented message or of a ping
/// must not lose or corrupt a byte.
#[test]
fn sessions_release_buffers_when_quiet_without_losing_bytes() {
    use std::io::Write;
    let s = TestServer::start(|c| {
        c.ws_release_after = Duration::ZERO;
        c.ping_after = Duration::from_millis(200);
        c.ws_idle_timeout = Duration::from_secs(30);
    });
    let u = users(&s, 2);
    let mut a = connect(&s, &u[0], false);
    let mut b = connect(&s, &u[1], false);
    sync_devices(&mut a, b.uid, std::slice::from_mut(&mut b));
    a.set_timeout(Duration::from_secs(5));
    b.set_timeout(Duration::from_secs(5));
    // Longer than a sweep (50 ms here), so a release is attempted at every pause.
    let pause = || std::thread::sleep(Duration::from_millis(120));
    for round in 0..4u64 {
        let data: Vec<u8> = (0..300).map(|x| (x as u64 * 31 + round) as u8).collect();
        let mut whole = Vec::new();
        frame::encode(&mut whole, a.uid, b.uid, msg_type::TEXT, round, &data);
        // One frame in three pieces: inside the header, inside the payload.
        let wire = masked_frame(true, 2, &whole);
        for piece in [&wire[..1], &wire[1..40], &wire[40..]] {
            a.ws.get_mut().write_all(piece).unwrap();
            pause();
        }
        assert_eq!(b.frame(), whole, "round {round}: frame sent in pieces");
        // One message in two fragments with a ping between them.
        let (head, tail) = whole.split_at(100);
        a.ws.get_mut()
            .write_all(&masked_frame(false, 2, head))
            .unwrap();
        pause();
        a.ws.get_mut()
            .write_all(&masked_frame(true, 9, b"ping"))
            .unwrap();
        pause();
        a.ws.get_mut()
            .write_all(&masked_frame(true, 0, tail))
            .unwrap();
        assert_eq!(b.frame(), whole, "round {round}: fragmented message");
        // And the other way, after a quiet spell on both sides.
        pause();
        let back = b.send(a.uid, msg_type::TEXT, round, &data);
        loop {
            match a.ws.read().expect("a reads") {
                tungstenite::Message::Binary(got) => {
                    assert_eq!(&got[..], &back[..]);
                    break;
                }
                tungstenite::Message::Pong(p) => assert_eq!(&p[..], b"ping"),
                tungstenite::Message::Ping(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}

/// A peer whose last frame and FIN arrive together is gone: the frame is relayed, the server
/// closes the connection at once (not at the next ping), and frames for that user are stored
/// from then on rather than written to a socket nobody reads.
#[test]
fn a_last_frame_sent_with_the_fin_is_relayed_and_the_peer_is_seen_gone() {
    use std::io::{Read, Write};
    use std::net::Shutdown;
    let s = TestServer::start(|c| {
        c.ping_after = Duration::from_secs(60);
        c.ws_idle_timeout = Duration::from_secs(120);
    });
    let u = users(&s, 2);
    let mut a = connect(&s, &u[0], true);
    let mut b = connect(&s, &u[1], false);
    sync_devices(&mut a, b.uid, std::slice::from_mut(&mut b));
    // b's last frame and its FIN, back to back: one readiness event on the server.
    let mut last = Vec::new();
    frame::encode(&mut last, b.uid, a.uid, msg_type::TEXT, 9, b"last words");
    let sock = b.ws.get_mut();
    sock.write_all(&masked_frame(true, 2, &last)).unwrap();
    sock.shutdown(Shutdown::Write).unwrap();
    // (a asked for ACKs: the probes' ACKs come first.)
    loop {
        let f = a.frame();
        if f == last {
            break;
        }
        assert_eq!(
            Frame::parse(&f).unwrap().msg_type(),
            msg_type::ACK,
            "only ACKs before it"
        );
    }
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut rest = Vec::new();
    match sock.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the server did not close the half-closed connection: {e}"),
    }
    // b has no live device now: a frame for b is stored.
    let stored = common::wait_until(Duration::from_secs(5), || {
        a.send(b.uid, 0, 10, b"later");
        let (t, data) = a.server_frame();
        assert_eq!(t, msg_type::ACK);
        data[0] == ack_status::STORED
    });
    assert!(
        stored,
        "frames for a departed peer are still written to its socket"
    );
}

/// HARD-PARTS 8 and 9 together: a target is reset (RST) while frames wait unsent in its
/// outbound queue and its sender keeps sending, then reconnects while the sender still sends.
/// The frames it gave back must be stored ahead of every later frame for it, on whichever
/// worker the sender sits: what the new session reads is in order, and every frame
/// acknowledged as stored arrives. (Frames acknowledged as delivered may die with the reset
/// socket's kernel buffer: delivered means handed to the kernel.)
#[test]
fn a_target_reset_with_unsent_frames_gets_them_ahead_of_later_ones() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    const FRAMES: u64 = 1500;
    const ROUNDS: usize = 8;
    let s = TestServer::start(|c| {
        c.rate_per_sec = 1_000_000;
        c.rate_burst = 1_000_000;
    });
    // u1 is on worker 1, u2 on worker 0, u3 on worker 1: the sender u1 reaches u2 across
    // workers and u3 on its own worker.
    let u = users(&s, 3);
    for round in 0..ROUNDS {
        let sender_user = u[0].clone();
        let target = u[1 + round % 2].clone();
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.set_recv_buffer_size(4 * 1024).unwrap();
        sock.connect(&s.addr.into()).unwrap();
        let mut t = WsClient::connect_with(sock.into(), s.addr, target.0, &target.1, false);
        let mut a = connect(&s, &sender_user, true);
        sync_devices(&mut a, target.0, std::slice::from_mut(&mut t));
        // The probes' ACKs.
        a.set_timeout(Duration::from_millis(200));
        while let Got::Frame(_) = a.next() {}
        a.set_timeout(common::ANSWER_TIMEOUT);
        let sent = Arc::new(AtomicU64::new(0));
        let sender = {
            let sent = sent.clone();
            let target = target.0;
            std::thread::spawn(move || {
                let payload = vec![round as u8; 1024];
                for ts in 1..=FRAMES {
                    a.send(target, 0, ts, &payload);
                    sent.store(ts, Ordering::SeqCst);
                }
                let mut stored = Vec::new();
                for _ in 0..FRAMES {
                    let (kind, data) = a.server_frame();
                    assert_eq!(kind, msg_type::ACK, "every frame is accepted");
                    if data[0] == ack_status::STORED {
                        stored.push(u64::from_be_bytes(data[1..9].try_into().unwrap()));
                    }
                }
                stored
            })
        };
        let wait_sent = |n: u64| {
            assert!(
                common::wait_until(common::ANSWER_TIMEOUT, || sent.load(Ordering::SeqCst) >= n),
                "the sender stalled"
            );
        };
        // A third of the way in, t has a full socket and a queue of unsent frames: reset it.
        wait_sent(FRAMES / 3);
        let raw = t.ws.get_mut();
        socket2::SockRef::from(&*raw)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(t);
        wait_sent(FRAMES * 2 / 3);
        let mut t = connect(&s, &target, false);
        let mut got = Vec::new();
        while got.last() != Some(&FRAMES) {
            let f = t.frame();
            let f = Frame::parse(&f).unwrap();
            assert_eq!(f.uid(), sender_user.0);
            got.push(f.timestamp());
        }
        let stored = sender.join().unwrap();
        let out_of_order = got.windows(2).find(|w| w[0] >= w[1]);
        // On failure, the runs of consecutive timestamps say which frames overtook which.
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &g in &got {
            match runs.last_mut() {
                Some(r) if r.1 + 1 == g => r.1 = g,
                _ => runs.push((g, g)),
            }
        }
        assert!(
            out_of_order.is_none(),
            "round {round}: the new session read {} frames, out of order at {out_of_order:?}; \
             runs {runs:?}; {} acknowledged as stored",
            got.len(),
            stored.len()
        );
        let missing: Vec<u64> = stored
            .iter()
            .filter(|ts| got.binary_search(ts).is_err())
            .copied()
            .collect();
        assert!(
            missing.is_empty(),
            "round {round}: {} frames acknowledged as stored never arrived, first {:?}",
            missing.len(),
            missing.first()
        );
        drop(t);
    }
}

/// HARD-PARTS 11 at the edge: a token revoked after its upgrade request was accepted but
/// before the connection joined the relay (its 101 still waiting behind earlier pipelined
/// answers the client has not read) must not leave a live WebSocket behind.
#[test]
fn a_token_revoked_while_its_101_waits_still_closes_the_websocket() {
    use std::io::{Read, Write};
    let s = TestServer::start(|c| c.max_pending_output = 64 << 20);
    // 100 teachers make each /show_teachers answer about 12 KB; 700 of them (8 MB) are more
    // than the kernel's socket buffers hold (about 3 MB here), so the 101 behind them waits.
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let addr = s.addr;
            std::thread::spawn(move || {
                let mut c = common::Client::connect(addr);
                for i in 0..25 {
                    register(&mut c, &format!("teacher{t}_{i}"), 2, "secret1");
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    let mut c = s.client();
    let u = users(&s, 1);
    let token = &u[0].1;
    // A client with a small receive window: the answers pile up on the server.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4 * 1024).unwrap();
    sock.connect(&s.addr.into()).unwrap();
    let mut raw: std::net::TcpStream = sock.into();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    const ANSWERS: usize = 700;
    let mut reqs = String::new();
    for _ in 0..ANSWERS {
        reqs.push_str(&format!(
            "GET /show_teachers?token={token} HTTP/1.1\r\nHost: t\r\n\r\n"
        ));
    }
    reqs.push_str(&format!(
        "GET /wsconn?token={token} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    ));
    raw.write_all(reqs.as_bytes()).unwrap();
    // The requests arrive in one read and are parsed before the first answer byte is
    // written: once a byte is here, the upgrade was accepted.
    let mut first = [0u8; 1];
    raw.read_exact(&mut first).unwrap();
    let r = c.get(&format!("/logout?token={token}"));
    assert_eq!(r.json()["success"], true);
    // Now read everything: the answers, the 101, and then the WebSocket's close.
    let mut got = first.to_vec();
    let mut buf = vec![0u8; 64 * 1024];
    let ws_start = loop {
        if let Some(at) = memchr::memmem::find(&got, b"HTTP/1.1 101")
            && let Some(end) = memchr::memmem::find(&got[at..], b"\r\n\r\n")
        {
            break at + end + 4;
        }
        let n = raw.read(&mut buf).expect("answers and the 101");
        assert!(n > 0, "closed before the 101");
        got.extend_from_slice(&buf[..n]);
    };
    assert_eq!(
        memchr::memmem::find_iter(&got[..ws_start], b"HTTP/1.1 200").count(),
        ANSWERS
    );
    while got.len() < ws_start + 4 {
        match raw.read(&mut buf) {
            Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
            other => panic!("the WebSocket of a revoked token stayed open ({other:?})"),
        }
    }
    let ws = &got[ws_start..];
    assert_eq!(ws[0], 0x88, "a close frame");
    assert_eq!(u16::from_be_bytes([ws[2], ws[3]]), 1008);
}

/// A device dies holding unsent frames while another device of the same user stays: the one
/// that connected after them (so was never sent them), or the newer device that replaced it
/// (`max_devices` 1). The device that stays gets every one of them, ahead of every later frame,
/// with none missing: it takes them over when it joins (and anything stored meanwhile comes
/// through a drain), instead of their waiting in the queue, overtaken, until a reconnect.
#[test]
fn frames_given_back_while_another_device_stays_reach_it_in_order() {
    const K: u64 = 6000;
    const PROBE: u64 = 1_000_000;
    for replace in [false, true] {
        let s = TestServer::start(|c| {
            c.rate_per_sec = 1_000_000;
            c.rate_burst = 1_000_000;
            c.slow_consumer_bytes = 64 << 20;
            if replace {
                c.max_devices = 1;
            }
        });
        // u1 sends to u2; u4 shares u2's owner worker (uid % 2), so a frame reaching u4 shows
        // that everything u1 sent before it has reached u2's devices.
        let u = users(&s, 4);
        let (target, witness) = (&u[1], &u[3]);
        let mut a = connect(&s, &u[0], true);
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.set_recv_buffer_size(4 * 1024).unwrap();
        sock.connect(&s.addr.into()).unwrap();
        let mut d1 = WsClient::connect_with(sock.into(), s.addr, target.0, &target.1, false);
        let mut w = connect(&s, witness, false);
        sync_devices(&mut a, target.0, std::slice::from_mut(&mut d1));
        sync_devices(&mut a, witness.0, std::slice::from_mut(&mut w));
        // More than the kernel's buffers hold: d1 keeps megabytes unsent.
        let payload = vec![5u8; 1024];
        for ts in 1..=K {
            a.send(target.0, 0, ts, &payload);
        }
        let mark = a.send(witness.0, 0, PROBE - 1, b"after them");
        loop {
            if w.frame() == mark {
                break;
            }
        }
        let mut d2 = connect(&s, target, false);
        // What d2 reads while it is being synced (the frames d1 held, taken over at the join).
        let mut early = Vec::new();
        if replace {
            // d2's arrival closed d1 (1008), which gave its unsent frames back.
        } else {
            early = sync_devices_seen(&mut a, target.0, std::slice::from_mut(&mut d2));
            socket2::SockRef::from(&*d1.ws.get_mut())
                .set_linger(Some(Duration::ZERO))
                .unwrap();
            drop(d1);
        }
        a.send(target.0, 0, K + 1, &payload);
        let mut got: Vec<u64> = early
            .iter()
            .map(|f| Frame::parse(f).unwrap().timestamp())
            .filter(|&ts| ts < PROBE - 1)
            .collect();
        while got.last() != Some(&(K + 1)) {
            let ts = Frame::parse(&d2.frame()).unwrap().timestamp();
            if ts < PROBE - 1 {
                got.push(ts);
            }
        }
        let mut stored = Vec::new();
        let mut acked = std::collections::HashSet::new();
        while (1..=K + 1).any(|ts| !acked.contains(&ts)) {
            let (kind, data) = a.server_frame();
            assert_eq!(kind, msg_type::ACK);
            let ts = u64::from_be_bytes(data[1..9].try_into().unwrap());
            acked.insert(ts);
            if data[0] == ack_status::STORED && ts <= K + 1 {
                stored.push(ts);
            }
        }
        // d1 held megabytes unsent when d2 came: d2 got them, then K + 1.
        assert!(
            got.len() > 1000,
            "replace {replace}: only {} frames reached the device that stayed",
            got.len()
        );
        let out_of_order = got.windows(2).find(|w| w[0] >= w[1]);
        assert!(
            out_of_order.is_none(),
            "replace {replace}: {} frames, out of order at {out_of_order:?}",
            got.len()
        );
        // From the first frame d2 got to the last, none is missing.
        let gaps = got.windows(2).filter(|w| w[1] != w[0] + 1).count();
        assert_eq!(
            gaps,
            0,
            "replace {replace}: frames missing between {:?} and {:?}",
            got.first(),
            got.last()
        );
        let missing = stored
            .iter()
            .filter(|ts| got.binary_search(ts).is_err())
            .count();
        assert_eq!(
            missing,
            0,
            "replace {replace}: of {} frames stored, {missing} never reached the device that stayed",
            stored.len()
        );
    }
}

/// A connection that dies with thousands of unsent frames gives them all back at once, more
/// than the writer's queue holds (`write_queue` 8 here): the worker waits for room rather than
/// refusing frames only the server still has. Every frame is acknowledged (delivered or
/// stored, no ERROR), and every stored one reaches the target when it reconnects.
#[test]
fn frames_given_back_beyond_the_writer_queue_are_stored_not_refused() {
    const K: u64 = 6000;
    let s = TestServer::start(|c| {
        c.rate_per_sec = 1_000_000;
        c.rate_burst = 1_000_000;
        c.slow_consumer_bytes = 64 << 20;
        c.write_queue = 8;
    });
    // u4 shares u2's owner worker: a frame reaching u4 shows that every frame u1 sent
    // before it is in u2's outbound queue.
    let u = users(&s, 4);
    let mut a = connect(&s, &u[0], true);
    let mut w = connect(&s, &u[3], false);
    sync_devices(&mut a, u[3].0, std::slice::from_mut(&mut w));
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4 * 1024).unwrap();
    sock.connect(&s.addr.into()).unwrap();
    let mut t = WsClient::connect_with(sock.into(), s.addr, u[1].0, &u[1].1, false);
    sync_devices(&mut a, u[1].0, std::slice::from_mut(&mut t));
    let payload = vec![9u8; 1024];
    for ts in 1..=K {
        a.send(u[1].0, 0, ts, &payload);
    }
    let mark = a.send(u[3].0, 0, K + 1, b"after them");
    while w.frame() != mark {}
    let mut acked = std::collections::HashMap::new();
    socket2::SockRef::from(&*t.ws.get_mut())
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(t);
    while (1..=K).any(|ts| !acked.contains_key(&ts)) {
        let (kind, data) = a.server_frame();
        assert_eq!(kind, msg_type::ACK, "refused: {:?}", parse_error(&data));
        let ts = u64::from_be_bytes(data[1..9].try_into().unwrap());
        acked.insert(ts, data[0]);
    }
    let stored: Vec<u64> = (1..=K)
        .filter(|ts| acked[ts] == ack_status::STORED)
        .collect();
    assert!(
        stored.len() > 100,
        "only {} frames were given back",
        stored.len()
    );
    let mut t = connect(&s, &u[1], false);
    for &ts in &stored {
        assert_eq!(Frame::parse(&t.frame()).unwrap().timestamp(), ts);
    }
}

//! The HTTP layer over real sockets: pipelining, partial input, keep-alive rules and every limit.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use common::{Client, TestServer, post_bytes, register};
use serde_json::json;

#[test]
fn pipelined_requests_answered_in_order() {
    let s = TestServer::start(|_| {});
    let mut c = s.client();
    register(&mut c, "ann", 1, "secret1");
    let mut batch = Vec::new();
    for q in ["ann", "bob", "ann", "nobody"] {
        batch.extend_from_slice(
            format!("GET /check_user_exists?user_name={q} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes(),
        );
    }
    batch.extend_from_slice(b"GET /health HTTP/1.1\r\n\r\n");
    c.send(&batch);
    for want in [true, false, true, false] {
        assert_eq!(c.read_response().json(), json!({"result": want}));
    }
    assert_eq!(c.read_response().json(), json!({"status": "ok"}));
}

/// A request that waits on the writer (register) followed in the same write by one answered at
/// once (check_user_exists for the same name): the second answer must not overtake the first,
/// and must see the first's committed effect.
#[test]
fn slow_request_before_fast_one_keeps_order() {
    let s = TestServer::start(|_| {});
    let mut c = s.client();
    let mut batch = post_bytes("/register", "user_name=zed&user_type=1&pwd=secret1").into_bytes();
    batch.extend_from_slice(b"GET /check_user_exists?user_name=zed HTTP/1.1\r\n\r\n");
    batch.extend_from_slice(post_bytes("/login", "user_name=zed&pwd=secret1").as_bytes());
    batch.extend_from_slice(b"GET /check_user_exists?user_name=zed HTTP/1.1\r\n\r\n");
    c.send(&batch);
    assert_eq!(c.read_response().json(), json!({"success": true}));
    assert_eq!(c.read_response().json(), json!({"result": true}));
    assert_eq!(c.read_response().json()["success"], true);
    assert_eq!(c.read_response().json(), json!({"result": true}));
}

#[test]
fn request_sent_one_byte_at_a_time() {
    let s = TestServer::start(|_| {});
    let mut c = s.client();
    let req = post_bytes("/check_user_exists", "user_name=nobody");
    for b in req.as_bytes() {
        c.send(&[*b]);
    }
    assert_eq!(c.read_response().json(), json!({"result": false}));
}

#[test]
fn keep_alive_and_close_rules() {
    let s = TestServer::start(|_| {});
    // HTTP/1.1 keeps the connection open by default.
    let mut c = s.client();
    for _ in 0..3 {
        assert_eq!(c.get("/health").status, 200);
    }
    // Connection: close is answered, then the server closes.
    c.send(b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n");
    let r = c.read_response();
    assert_eq!(r.header("connection"), Some("close"));
    assert!(c.closed_by_server());
    // HTTP/1.0 closes by default...
    let mut c = s.client();
    c.send(b"GET /health HTTP/1.0\r\n\r\n");
    assert_eq!(c.read_response().status, 200);
    assert!(c.closed_by_server());
    // ...unless it asks for keep-alive.
    let mut c = s.client();
    c.send(b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    assert_eq!(c.read_response().status, 200);
    assert_eq!(c.get("/health").status, 200);
}

fn expect_error_then_close(c: &mut Client, status: u16) {
    let r = c.read_response();
    assert_eq!(r.status, status, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["success"], false);
    assert!(r.json()["msg"].as_str().is_some_and(|m| !m.is_empty()));
    assert_eq!(r.header("connection"), Some("close"));
    assert!(c.closed_by_server());
}

#[test]
fn malformed_request_gets_400_and_close() {
    let s = TestServer::start(|_| {});
    let mut c = s.client();
    c.send(b"THIS IS NOT HTTP\r\n\r\n");
    expect_error_then_close(&mut c, 400);
    let mut c = s.client();
    c.send(b"GET / HTTP/1.1\r\nContent-Length: abc\r\n\r\n");
    expect_error_then_close(&mut c, 400);
}

#[test]
fn transfer_encoding_gets_501() {
    let s = TestServer::start(|_| {});
    let mut c = s.client();
    c.send(b"POST /login HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n");
    expect_error_then_close(&mut c, 501);
}

#[test]
fn oversized_head_gets_431() {
    let s = TestServer::start(|_| {});
    let mut c = s.client();
    let mut req = b"GET /health HTTP/1.1\r\nX-Big: ".to_vec();
    req.resize(9 * 1024, b'a');
    req.extend_from_slice(b"\r\n\r\n");
    c.send(&req);
    expect_error_then_close(&mut c, 431);
    // Too many header lines is the same answer.
    let mut c = s.client();
    let mut req = b"GET /health HTTP/1.1\r\n".to_vec();
    for i in 0..40 {
        req.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    c.send(&req);
    expect_error_then_close(&mut c, 431);
}

/// The client sends a whole 1 MiB body after a Content-Length the server refuses: the server
/// answers 413 and closes, and the client still reads the answer (the lingering close keeps the
/// kernel from resetting the connection while unread bytes are in its receive buffer).
#[test]
fn oversized_body_gets_413_and_the_answer_survives_the_close() {
    let s = TestServer::start(|_| {});
    for _ in 0..5 {
        let mut c = s.client();
        let body = vec![b'a'; 1 << 20];
        let mut req = format!(
            "POST /register HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(&body);
        let mut stream = c.stream.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            // The server stops reading after the head; the write may fail once it closes.
            let _ = stream.write_all(&req);
        });
        writer.join().unwrap();
        let r = c.read_response();
        assert_eq!(r.status, 413);
        assert_eq!(
            r.json(),
            json!({"success": false, "msg": "request body too large"})
        );
        // A plain close() with unread input sends a reset, which on a real network can destroy
        // the answer before the client reads it; the server must end with a FIN instead.
        c.clean_eof().expect("a clean close after the 413");
    }
}

#[test]
fn slow_request_gets_408() {
    let s = TestServer::start(|c| c.request_timeout = Duration::from_millis(500));
    let mut c = s.client();
    c.send(b"GET /health HTTP/1.1\r\nHost:");
    expect_error_then_close(&mut c, 408);
    // A complete request in time is not affected.
    let mut c = s.client();
    assert_eq!(c.get("/health").status, 200);
}

#[test]
fn idle_keep_alive_connection_is_closed() {
    let s = TestServer::start(|c| c.idle_timeout = Duration::from_millis(500));
    let mut c = s.client();
    assert_eq!(c.get("/health").status, 200);
    let started = std::time::Instant::now();
    assert!(c.closed_by_server());
    assert!(started.elapsed() >= Duration::from_millis(400));
}

#[test]
fn connections_beyond_the_limit_are_closed_at_once() {
    let s = TestServer::start(|c| {
        c.max_connections = 2;
        c.workers = 1;
    });
    let mut a = s.client();
    let mut b = s.client();
    assert_eq!(a.get("/health").status, 200);
    assert_eq!(b.get("/health").status, 200);
    let mut third = s.client();
    third.send(b"GET /health HTTP/1.1\r\n\r\n");
    assert!(third.try_read_response().is_err());
    // A slot frees when a connection closes.
    drop(a);
    assert!(common::wait_until(common::ANSWER_TIMEOUT, || {
        let mut c = Client::connect(s.addr);
        c.send(b"GET /health HTTP/1.1\r\n\r\n");
        c.try_read_response().is_ok_and(|r| r.status == 200)
    }));
    assert_eq!(b.get("/health").status, 200);
}

#[test]
fn bodies_up_to_the_limit_are_accepted() {
    let s = TestServer::start(|c| c.max_body_bytes = 64);
    let mut c = s.client();
    let body = format!("user_name=nobody&pad={}", "x".repeat(64 - 21));
    assert_eq!(body.len(), 64);
    assert_eq!(
        c.post("/check_user_exists", &body).json(),
        json!({"result": false})
    );
    let mut c = s.client();
    c.send(post_bytes("/check_user_exists", &format!("{body}x")).as_bytes());
    expect_error_then_close(&mut c, 413);
}

#[test]
fn peer_closing_mid_request_frees_the_connection() {
    let s = TestServer::start(|c| {
        c.max_connections = 1;
        c.workers = 1;
    });
    for _ in 0..20 {
        let mut raw = TcpStream::connect(s.addr).unwrap();
        raw.write_all(b"GET /health HTTP/1.1\r\nHo").unwrap();
        drop(raw);
        // The slot is released, so the next connection (the only one allowed) is served.
        assert!(common::wait_until(common::ANSWER_TIMEOUT, || {
            let mut c = Client::connect(s.addr);
            c.send(b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n");
            c.try_read_response().is_ok_and(|r| r.status == 200)
        }));
    }
}

//! Races and floods: concurrent registrations, a login flood next to cheap requests, and
//! graceful shutdown with requests in flight.

mod common;

use std::sync::{Arc, Barrier};
use std::time::Instant;

use common::{Client, TestServer, form, login, register};
use serde_json::json;

#[test]
fn fifty_threads_register_the_same_name_exactly_one_wins() {
    let s = TestServer::start(|_| {});
    let barrier = Arc::new(Barrier::new(50));
    let threads: Vec<_> = (0..50)
        .map(|i| {
            let addr = s.addr;
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut c = Client::connect(addr);
                let body = form(&[
                    ("user_name", if i % 2 == 0 { "Racer" } else { "racer" }),
                    ("user_type", "1"),
                    ("pwd", &format!("secret{i}")),
                ]);
                barrier.wait();
                c.post("/register", &body).json()
            })
        })
        .collect();
    let answers: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let wins = answers
        .iter()
        .filter(|a| **a == json!({"success": true}))
        .count();
    let taken = answers
        .iter()
        .filter(|a| **a == json!({"success": false, "msg": "user_name already taken"}))
        .count();
    assert_eq!((wins, taken), (1, 49), "{answers:?}");
}

/// With one worker, a flood of logins (each an argon2id verification on the pool) must not stall
/// cheap requests on that same worker: all the cheap requests are answered while the flood is
/// still being worked through.
#[test]
fn login_flood_does_not_stall_cheap_requests_on_the_same_worker() {
    let s = TestServer::start(|c| {
        c.workers = 1;
        c.auth_threads = 1;
    });
    let mut c = s.client();
    register(&mut c, "flood", 1, "secret1");
    const LOGINS: usize = 40;
    let barrier = Arc::new(Barrier::new(LOGINS + 1));
    let floods: Vec<_> = (0..LOGINS)
        .map(|_| {
            let addr = s.addr;
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut c = Client::connect(addr);
                barrier.wait();
                let v = c.post("/login", "user_name=flood&pwd=secret1").json();
                assert_eq!(v["success"], true, "{v}");
                Instant::now()
            })
        })
        .collect();
    barrier.wait();
    let mut cheap_done = Instant::now();
    for _ in 0..200 {
        assert_eq!(
            c.get("/check_user_exists?user_name=flood").json(),
            json!({"result": true})
        );
        cheap_done = Instant::now();
    }
    let last_login = floods.into_iter().map(|t| t.join().unwrap()).max().unwrap();
    assert!(
        cheap_done < last_login,
        "the cheap requests finished only after the login flood"
    );
}

#[test]
fn shutdown_answers_requests_in_flight_and_commits_them() {
    let mut s = TestServer::start(|_| {});
    let mut clients: Vec<Client> = (0..8).map(|_| s.client()).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.send(
            common::post_bytes(
                "/register",
                &form(&[
                    ("user_name", &format!("late{i}")),
                    ("user_type", "1"),
                    ("pwd", "secret1"),
                ]),
            )
            .as_bytes(),
        );
    }
    // Each registration is at the argon2 pool or the writer now; stop while they are in flight.
    let handle = s.take_handle();
    let stopper = handle.stopper();
    stopper.stop();
    for c in clients.iter_mut() {
        let r = c.read_response();
        assert_eq!(r.json(), json!({"success": true}));
        assert_eq!(r.header("connection"), Some("close"));
    }
    handle.join();
    s.restart();
    let mut c = s.client();
    for i in 0..8 {
        login(&mut c, &format!("late{i}"), "secret1");
    }
}

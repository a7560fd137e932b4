//! Shared test harness: a real server on 127.0.0.1:0 with a temporary data directory, and a
//! minimal HTTP/1.1 client over a plain TcpStream (so tests control every byte sent).
#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

pub mod ws;

use polyge::{Config, ServerHandle};
use serde_json::Value;

/// How long a test waits for an answer before failing (generous: CI machines are shared).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

pub struct TestServer {
    handle: Option<ServerHandle>,
    pub addr: SocketAddr,
    pub config: Config,
    pub dir: tempfile::TempDir,
}

impl TestServer {
    /// Starts a server with two workers; `tweak` adjusts the configuration.
    pub fn start(tweak: impl FnOnce(&mut Config)) -> TestServer {
        let _ = env_logger::builder().is_test(true).try_init();
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            workers: 2,
            data_dir: dir.path().join("data"),
            ..Config::default()
        };
        tweak(&mut config);
        let handle = polyge::start(config.clone()).expect("server starts");
        TestServer {
            addr: handle.local_addr(),
            handle: Some(handle),
            config,
            dir,
        }
    }

    /// Stops gracefully and waits (the store is closed when this returns).
    pub fn stop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown();
        }
    }

    /// Stops, then starts again on the same data directory (a new port).
    pub fn restart(&mut self) {
        self.stop();
        let mut config = self.config.clone();
        config.listen = "127.0.0.1:0".parse().unwrap();
        let handle = polyge::start(config).expect("server restarts");
        self.addr = handle.local_addr();
        self.handle = Some(handle);
    }

    pub fn client(&self) -> Client {
        Client::connect(self.addr)
    }

    pub fn stopper(&self) -> polyge::Stopper {
        self.handle.as_ref().expect("running").stopper()
    }

    pub fn take_handle(&mut self) -> ServerHandle {
        self.handle.take().expect("running")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One parsed answer.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub struct Client {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_nodelay(true).unwrap();
        stream.set_read_timeout(Some(ANSWER_TIMEOUT)).unwrap();
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send");
    }

    /// Reads one response; panics on timeout or EOF.
    pub fn read_response(&mut self) -> Resp {
        self.try_read_response()
            .unwrap_or_else(|e| panic!("no response: {e}"))
    }

    /// Reads one response, or says why there is none (EOF, reset, timeout).
    pub fn try_read_response(&mut self) -> Result<Resp, String> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(head) =
                resp.parse(&self.buf).map_err(|e| e.to_string())?
            {
                let headers: Vec<(String, String)> = resp
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_string(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                let len: usize = headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                    .map(|(_, v)| v.parse().expect("numeric content-length"))
                    .expect("content-length present");
                if self.buf.len() >= head + len {
                    let status = resp.code.unwrap();
                    let body = self.buf[head..head + len].to_vec();
                    self.buf.drain(..head + len);
                    return Ok(Resp {
                        status,
                        headers,
                        body,
                    });
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err("EOF".into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// Whether the server closed the connection (EOF or reset) within the read timeout.
    pub fn closed_by_server(&mut self) -> bool {
        let mut chunk = [0u8; 1024];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }

    /// Whether the server ended the connection with a clean FIN (read returns 0), not a reset.
    /// A reset is what a close with unread input produces, and it can destroy the answer.
    pub fn clean_eof(&mut self) -> Result<(), String> {
        let mut chunk = [0u8; 1024];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(()),
                Ok(n) => return Err(format!("{n} unexpected bytes")),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    pub fn get(&mut self, path_and_query: &str) -> Resp {
        self.send(format!("GET {path_and_query} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
        self.read_response()
    }

    pub fn post(&mut self, path: &str, form: &str) -> Resp {
        self.send(post_bytes(path, form).as_bytes());
        self.read_response()
    }

    pub fn get_bearer(&mut self, path_and_query: &str, token: &str) -> Resp {
        self.send(
            format!(
                "GET {path_and_query} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\n\r\n"
            )
            .as_bytes(),
        );
        self.read_response()
    }
}

pub fn post_bytes(path: &str, form: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{form}",
        form.len()
    )
}

/// Builds a form/query string with proper percent-encoding.
pub fn form(pairs: &[(&str, &str)]) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    s.finish()
}

/// Registers a user by name and returns nothing; panics unless it succeeds.
pub fn register(c: &mut Client, user_name: &str, user_type: u8, pwd: &str) {
    let r = c.post(
        "/register",
        &form(&[
            ("user_name", user_name),
            ("user_type", &user_type.to_string()),
            ("pwd", pwd),
        ]),
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json(),
        serde_json::json!({"success": true}),
        "register {user_name}"
    );
}

/// Logs in by name and returns (uid, token).
pub fn login(c: &mut Client, user_name: &str, pwd: &str) -> (u64, String) {
    let r = c.post(
        "/login",
        &form(&[("user_name", user_name), ("pwd", pwd), ("client_id", "123")]),
    );
    let v = r.json();
    assert_eq!(v["success"], true, "login {user_name}: {v}");
    (
        v["result"]["uid"].as_u64().unwrap(),
        v["result"]["token"].as_str().unwrap().to_string(),
    )
}

/// Polls `cond` until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}

//! Accounts a scenario needs, created through the server's own API.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use tungstenite::WebSocket;
use tungstenite::client::IntoClientRequest;
use tungstenite::protocol::WebSocketConfig;

/// The client's WebSocket read buffer. tungstenite's default is 128 KiB, and it zero-fills the
/// free part of that buffer before every read: on thousands of sockets that was the client's
/// largest cost, and the first reads after the start (page faults on every fresh buffer) held
/// up the run's first frames by up to 100 ms. Frames larger than this take more than one read.
pub const CLIENT_READ_BUFFER: usize = 8 * 1024;

/// The WebSocket upgrade to `/wsconn` over an already connected stream.
pub fn upgrade(
    stream: TcpStream,
    addr: SocketAddr,
    token: &str,
) -> Result<WebSocket<TcpStream>, String> {
    let req = format!("ws://{addr}/wsconn?token={token}")
        .into_client_request()
        .map_err(|e| e.to_string())?;
    let config = WebSocketConfig::default().read_buffer_size(CLIENT_READ_BUFFER);
    tungstenite::client::client_with_config(req, stream, Some(config))
        .map(|(ws, _)| ws)
        .map_err(|e| format!("upgrade: {e}"))
}

/// One request on a fresh connection; returns (status, JSON body).
pub fn request(addr: SocketAddr, path_and_query: &str) -> Result<(u16, serde_json::Value), String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    write!(
        s,
        "GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(|e| e.to_string())?;
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut resp = httparse::Response::new(&mut headers);
    let head = match resp.parse(&buf) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return Err(format!("bad answer to {path_and_query}")),
    };
    let body =
        serde_json::from_slice(&buf[head..]).map_err(|e| format!("{path_and_query}: {e}"))?;
    Ok((resp.code.unwrap_or(0), body))
}

/// Registers (if needed) and logs in `name`; returns (uid, token).
pub fn account(addr: SocketAddr, name: &str, user_type: u8) -> Result<(u64, String), String> {
    const PWD: &str = "load-test-pwd";
    let (_, v) = request(
        addr,
        &format!("/register?user_name={name}&user_type={user_type}&pwd={PWD}"),
    )?;
    if v["success"] != true && v["msg"] != "user_name already taken" {
        return Err(format!("register {name}: {v}"));
    }
    let (_, v) = request(
        addr,
        &format!("/login?user_name={name}&pwd={PWD}&client_id=load"),
    )?;
    match (v["result"]["uid"].as_u64(), v["result"]["token"].as_str()) {
        (Some(uid), Some(token)) => Ok((uid, token.to_string())),
        _ => Err(format!("login {name}: {v}")),
    }
}

/// A logged-in account: (uid, token).
pub type Account = (u64, String);

/// `count` accounts named `{prefix}_{i}`, created on a few threads at once (each registration
/// and login is an argon2 hash on the server's pool).
pub fn accounts(
    addr: SocketAddr,
    prefix: &str,
    count: usize,
) -> Result<Vec<(u64, String)>, String> {
    const THREADS: usize = 8;
    let names: Vec<String> = (0..count).map(|i| format!("{prefix}_{i}")).collect();
    let chunks: Vec<Vec<(usize, String)>> = (0..THREADS)
        .map(|t| {
            names
                .iter()
                .cloned()
                .enumerate()
                .filter(|(i, _)| i % THREADS == t)
                .collect()
        })
        .collect();
    let mut out: Vec<Option<Account>> = vec![None; count];
    let results: Vec<Result<Vec<(usize, Account)>, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                s.spawn(move || {
                    chunk
                        .into_iter()
                        .map(|(i, name)| account(addr, &name, 1).map(|a| (i, a)))
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("setup thread"))
            .collect()
    });
    for r in results {
        for (i, a) in r? {
            out[i] = Some(a);
        }
    }
    Ok(out.into_iter().map(|a| a.expect("every account")).collect())
}

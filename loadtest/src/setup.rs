//! Accounts a scenario needs, created through the server's own API.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

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

//! The WebSocket stage: the upgrade checks, and one session driven non-blocking over
//! tungstenite on the owner worker's loop, applying the relay rules to each inbound frame.

mod mem;
mod session;

pub use mem::MemStream;
pub use session::{Out, SessionConfig, WsSession, ack};

use crate::http::{Method, Request, Status};

/// Path of the relay endpoint.
pub const PATH: &str = "/wsconn";

/// Close codes the server uses.
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const UNSUPPORTED_DATA: u16 = 1003;
    pub const POLICY_VIOLATION: u16 = 1008;
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

/// Why an upgrade request is refused (answered with HTTP, before any WebSocket byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadUpgrade(pub Status, pub &'static str);

/// Checks the handshake headers; returns the `Sec-WebSocket-Accept` value.
pub fn check_upgrade(req: &Request<'_>) -> Result<String, BadUpgrade> {
    if req.method != Method::Get {
        return Err(BadUpgrade(
            Status::MethodNotAllowed,
            "the WebSocket upgrade takes GET",
        ));
    }
    if !req.upgrade_websocket {
        return Err(BadUpgrade(
            Status::BadRequest,
            "expected Upgrade: websocket and Connection: upgrade",
        ));
    }
    if req.ws_version != Some(&b"13"[..]) {
        return Err(BadUpgrade(
            Status::BadRequest,
            "Sec-WebSocket-Version must be 13",
        ));
    }
    let key = req.ws_key.unwrap_or_default();
    let valid_key = data_encoding::BASE64
        .decode(key)
        .is_ok_and(|decoded| decoded.len() == 16);
    if !valid_key {
        return Err(BadUpgrade(
            Status::BadRequest,
            "Sec-WebSocket-Key must be base64 of 16 bytes",
        ));
    }
    Ok(tungstenite::handshake::derive_accept_key(key))
}

/// The 101 answer.
pub fn accept_response(out: &mut Vec<u8>, accept: &str) {
    out.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ",
    );
    out.extend_from_slice(accept.as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{Limits, Parsed, parse_request};

    fn check(raw: &[u8]) -> Result<String, BadUpgrade> {
        let limits = Limits {
            max_head: 8192,
            max_body: 0,
            max_headers: 32,
        };
        match parse_request(raw, &limits) {
            Ok(Parsed::Complete(req, _)) => check_upgrade(&req),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rfc_6455_example_key() {
        let accept = check(b"GET /wsconn HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").unwrap();
        assert_eq!(accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn refuses_bad_handshakes() {
        let bad = [
            &b"GET /wsconn HTTP/1.1\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"[..],
            b"GET /wsconn HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n",
            b"GET /wsconn HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: c2hvcnQ=\r\nSec-WebSocket-Version: 13\r\n\r\n",
            b"GET /wsconn HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n",
        ];
        for raw in bad {
            assert_eq!(check(raw).unwrap_err().0, Status::BadRequest);
        }
    }
}

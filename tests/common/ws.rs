//! A real WebSocket client (tungstenite, blocking) for relay tests.
#![allow(dead_code)]

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use polyge::frame::{self, Frame};
use tungstenite::client::IntoClientRequest;
use tungstenite::protocol::CloseFrame;
use tungstenite::{Message, WebSocket};

pub struct WsClient {
    pub ws: WebSocket<TcpStream>,
    pub uid: u64,
}

/// What a read produced.
#[derive(Debug)]
pub enum Got {
    Frame(Vec<u8>),
    Closed(Option<u16>),
    Timeout,
}

impl WsClient {
    pub fn connect(addr: SocketAddr, uid: u64, token: &str, acks: bool) -> WsClient {
        Self::connect_with(
            TcpStream::connect(addr).expect("connect"),
            addr,
            uid,
            token,
            acks,
        )
    }

    /// Connects over a socket prepared by the caller (small receive buffer, say).
    pub fn connect_with(
        stream: TcpStream,
        addr: SocketAddr,
        uid: u64,
        token: &str,
        acks: bool,
    ) -> WsClient {
        stream.set_nodelay(true).unwrap();
        stream
            .set_read_timeout(Some(super::ANSWER_TIMEOUT))
            .unwrap();
        let url = format!(
            "ws://{addr}/wsconn?token={token}{}",
            if acks { "&acks=1" } else { "" }
        );
        let (ws, resp) = tungstenite::client::client(url.into_client_request().unwrap(), stream)
            .expect("WebSocket handshake");
        assert_eq!(resp.status(), 101);
        WsClient { ws, uid }
    }

    /// Sends a frame from this user; returns its bytes.
    pub fn send(&mut self, target: u64, msg_type: u8, ts: u64, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        frame::encode(&mut out, self.uid, target, msg_type, ts, data);
        self.send_raw(&out);
        out
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.ws
            .send(Message::Binary(bytes.to_vec().into()))
            .expect("send");
    }

    pub fn set_timeout(&mut self, t: Duration) {
        self.ws.get_mut().set_read_timeout(Some(t)).unwrap();
    }

    /// The next binary message, a close, or a timeout.
    pub fn next(&mut self) -> Got {
        loop {
            match self.ws.read() {
                Ok(Message::Binary(b)) => return Got::Frame(b.to_vec()),
                Ok(Message::Close(c)) => return Got::Closed(c.map(|c| u16::from(c.code))),
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut =>
                {
                    return Got::Timeout;
                }
                Err(tungstenite::Error::ConnectionClosed)
                | Err(tungstenite::Error::AlreadyClosed) => return Got::Closed(None),
                Err(e) => panic!("read failed: {e}"),
            }
        }
    }

    /// The next frame; panics on anything else.
    pub fn frame(&mut self) -> Vec<u8> {
        match self.next() {
            Got::Frame(f) => f,
            other => panic!("uid {}: expected a frame, got {other:?}", self.uid),
        }
    }

    /// The next server frame (ACK or ERROR), checked: (type, data).
    pub fn server_frame(&mut self) -> (u8, Vec<u8>) {
        let bytes = self.frame();
        let f = Frame::parse(&bytes).expect("server frames have a valid CRC");
        assert_eq!(f.uid(), 0, "server frames come from uid 0");
        assert_eq!(f.target(), self.uid);
        (f.msg_type(), f.data().to_vec())
    }

    /// The close code the server sent (reading past any frames still in flight).
    pub fn close_code(&mut self) -> Option<u16> {
        loop {
            match self.next() {
                Got::Frame(_) => {}
                Got::Closed(code) => return code,
                Got::Timeout => panic!("uid {}: no close within the timeout", self.uid),
            }
        }
    }

    /// Closes from the client side and collects every frame that arrives until the server's
    /// answer.
    pub fn close_collect(mut self) -> Vec<Vec<u8>> {
        let _ = self.ws.close(Some(CloseFrame {
            code: 1000u16.into(),
            reason: "bye".into(),
        }));
        let mut got = Vec::new();
        loop {
            match self.next() {
                Got::Frame(f) => got.push(f),
                Got::Closed(_) => return got,
                Got::Timeout => panic!("no close answer"),
            }
        }
    }
}

/// (type, data) of an ERROR frame: code, the offending CRC field, reason.
pub fn parse_error(data: &[u8]) -> (u8, u32, String) {
    (
        data[0],
        u32::from_be_bytes(data[1..5].try_into().unwrap()),
        String::from_utf8(data[5..].to_vec()).unwrap(),
    )
}

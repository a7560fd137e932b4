//! Response encoding straight into a connection's write buffer.

use std::borrow::Cow;

/// The statuses the server answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    SwitchingProtocols,
    BadRequest,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    RequestTimeout,
    PayloadTooLarge,
    UnsupportedMediaType,
    HeaderFieldsTooLarge,
    InternalError,
    NotImplemented,
    ServiceUnavailable,
}

impl Status {
    pub fn code(self) -> u16 {
        match self {
            Status::Ok => 200,
            Status::SwitchingProtocols => 101,
            Status::BadRequest => 400,
            Status::Forbidden => 403,
            Status::NotFound => 404,
            Status::MethodNotAllowed => 405,
            Status::RequestTimeout => 408,
            Status::PayloadTooLarge => 413,
            Status::UnsupportedMediaType => 415,
            Status::HeaderFieldsTooLarge => 431,
            Status::InternalError => 500,
            Status::NotImplemented => 501,
            Status::ServiceUnavailable => 503,
        }
    }

    fn status_line(self) -> &'static [u8] {
        match self {
            Status::Ok => b"HTTP/1.1 200 OK\r\n",
            Status::SwitchingProtocols => b"HTTP/1.1 101 Switching Protocols\r\n",
            Status::BadRequest => b"HTTP/1.1 400 Bad Request\r\n",
            Status::Forbidden => b"HTTP/1.1 403 Forbidden\r\n",
            Status::NotFound => b"HTTP/1.1 404 Not Found\r\n",
            Status::MethodNotAllowed => b"HTTP/1.1 405 Method Not Allowed\r\nAllow: GET, POST\r\n",
            Status::RequestTimeout => b"HTTP/1.1 408 Request Timeout\r\n",
            Status::PayloadTooLarge => b"HTTP/1.1 413 Payload Too Large\r\n",
            Status::UnsupportedMediaType => b"HTTP/1.1 415 Unsupported Media Type\r\n",
            Status::HeaderFieldsTooLarge => b"HTTP/1.1 431 Request Header Fields Too Large\r\n",
            Status::InternalError => b"HTTP/1.1 500 Internal Server Error\r\n",
            Status::NotImplemented => b"HTTP/1.1 501 Not Implemented\r\n",
            Status::ServiceUnavailable => b"HTTP/1.1 503 Service Unavailable\r\n",
        }
    }
}

/// A JSON answer: status plus body bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: Status,
    /// Constant answers (`{"result":true}`) are borrowed: no allocation per request.
    pub body: Cow<'static, [u8]>,
}

impl Response {
    /// 200 with a JSON body.
    pub fn ok(body: impl Into<Cow<'static, [u8]>>) -> Response {
        Response {
            status: Status::Ok,
            body: body.into(),
        }
    }

    /// `{"success":false,"msg":...}` with the given status.
    pub fn error(status: Status, msg: &str) -> Response {
        #[derive(serde::Serialize)]
        struct Failure<'a> {
            success: bool,
            msg: &'a str,
        }
        let body = serde_json::to_vec(&Failure {
            success: false,
            msg,
        })
        .expect("a bool and a string always serialize");
        Response {
            status,
            body: body.into(),
        }
    }
}

/// Appends a complete response with a JSON body to `out`.
pub fn encode_response(out: &mut Vec<u8>, status: Status, body: &[u8], close: bool) {
    let mut len = itoa::Buffer::new();
    let len = len.format(body.len());
    out.reserve(128 + body.len());
    out.extend_from_slice(status.status_line());
    out.extend_from_slice(b"Content-Type: application/json; charset=utf-8\r\nContent-Length: ");
    out.extend_from_slice(len.as_bytes());
    if close {
        out.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
    } else {
        out.extend_from_slice(b"\r\n\r\n");
    }
    out.extend_from_slice(body);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_keep_alive_and_close() {
        let mut out = Vec::new();
        encode_response(&mut out, Status::Ok, b"{}", false);
        assert_eq!(
            out,
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: 2\r\n\r\n{}"
        );
        out.clear();
        encode_response(&mut out, Status::NotFound, b"{}", true);
        assert!(out.starts_with(b"HTTP/1.1 404 Not Found\r\n"));
        assert!(out.ends_with(b"Connection: close\r\n\r\n{}"));
    }

    #[test]
    fn error_body_is_json() {
        let r = Response::error(Status::BadRequest, "a \"quoted\" reason");
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["success"], false);
        assert_eq!(v["msg"], "a \"quoted\" reason");
    }
}

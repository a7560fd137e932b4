//! HTTP/1.x for the reactor: request parsing over httparse, parameter decoding, response encoding.
//!
//! Nothing here does I/O: the connection hands in the bytes it has buffered and gets back either a
//! complete request borrowing those bytes, "need more", or an error that maps to one status code.

mod form;
mod response;

pub use form::{FormError, Params};
pub use response::{Response, Status, encode_response};

/// The most header lines any configuration may allow (the parser's header array is this long).
pub const MAX_HEADERS_CAP: usize = 64;

/// Per-request size limits, from [`crate::config::Config`].
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_head: usize,
    pub max_body: usize,
    pub max_headers: usize,
}

/// Request methods the API knows; anything else is answered 405.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
    Other,
}

/// One parsed request, borrowing the connection's read buffer.
#[derive(Debug)]
pub struct Request<'a> {
    pub method: Method,
    /// The path without the query string.
    pub path: &'a str,
    /// Raw (still percent-encoded) query string, without the `?`.
    pub query: &'a [u8],
    /// Raw body (`Content-Length` bytes).
    pub body: &'a [u8],
    /// Whether the connection stays open after the answer.
    pub keep_alive: bool,
    /// Whether the body is form-encoded (or absent / no content type given).
    pub form_body: bool,
    /// Token from `Authorization: Bearer <token>`.
    pub bearer: Option<&'a str>,
    /// `Upgrade: websocket` and `Connection: upgrade` were both present.
    pub upgrade_websocket: bool,
    /// `Sec-WebSocket-Key`, untrimmed of nothing but surrounding blanks.
    pub ws_key: Option<&'a [u8]>,
    /// `Sec-WebSocket-Version`.
    pub ws_version: Option<&'a [u8]>,
}

/// Result of looking at the buffered bytes.
#[derive(Debug)]
pub enum Parsed<'a> {
    /// More bytes are needed; not an error.
    Partial,
    /// A whole request and the number of buffered bytes it used.
    Complete(Request<'a>, usize),
}

/// Why a request cannot be served; each maps to one status and closes the connection,
/// because after it the request framing can no longer be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// Malformed request line, header or length: 400.
    Malformed(&'static str),
    /// Head longer than the limit, or too many header lines: 431.
    HeadTooLarge,
    /// `Content-Length` above the limit: 413.
    BodyTooLarge,
    /// `Transfer-Encoding` (chunked bodies are not supported): 501.
    TransferEncoding,
}

impl ParseError {
    /// The status and the JSON `msg` to answer with.
    pub fn status_and_msg(self) -> (Status, &'static str) {
        match self {
            ParseError::Malformed(m) => (Status::BadRequest, m),
            ParseError::HeadTooLarge => (
                Status::HeaderFieldsTooLarge,
                "request head too large or too many headers",
            ),
            ParseError::BodyTooLarge => (Status::PayloadTooLarge, "request body too large"),
            ParseError::TransferEncoding => (
                Status::NotImplemented,
                "Transfer-Encoding is not supported; send Content-Length",
            ),
        }
    }
}

/// Parses one request from the start of `buf`.
pub fn parse_request<'a>(buf: &'a [u8], limits: &Limits) -> Result<Parsed<'a>, ParseError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS_CAP];
    let max_headers = limits.max_headers.clamp(1, MAX_HEADERS_CAP);
    let mut req = httparse::Request::new(&mut headers[..max_headers]);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() >= limits.max_head {
                return Err(ParseError::HeadTooLarge);
            }
            return Ok(Parsed::Partial);
        }
        Err(httparse::Error::TooManyHeaders) => return Err(ParseError::HeadTooLarge),
        Err(httparse::Error::Version) => {
            return Err(ParseError::Malformed("unsupported HTTP version"));
        }
        Err(_) => return Err(ParseError::Malformed("malformed request")),
    };
    if head_len > limits.max_head {
        return Err(ParseError::HeadTooLarge);
    }
    let method = match req.method {
        Some("GET") => Method::Get,
        Some("POST") => Method::Post,
        _ => Method::Other,
    };
    let target = req.path.unwrap_or("/");
    let (path, query) = match memchr::memchr(b'?', target.as_bytes()) {
        Some(i) => (&target[..i], &target.as_bytes()[i + 1..]),
        None => (target, &b""[..]),
    };
    let http10 = req.version == Some(0);

    let mut content_length: Option<usize> = None;
    let mut conn_close = false;
    let mut conn_keep_alive = false;
    let mut conn_upgrade = false;
    let mut upgrade_ws = false;
    let mut form_body = true;
    let mut bearer = None;
    let mut ws_key = None;
    let mut ws_version = None;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            let n = parse_content_length(h.value)?;
            if content_length.is_some_and(|prev| prev != n) {
                return Err(ParseError::Malformed("conflicting Content-Length headers"));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(ParseError::TransferEncoding);
        } else if name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|&b| b == b',') {
                let t = trim(token);
                if t.eq_ignore_ascii_case(b"close") {
                    conn_close = true;
                } else if t.eq_ignore_ascii_case(b"keep-alive") {
                    conn_keep_alive = true;
                } else if t.eq_ignore_ascii_case(b"upgrade") {
                    conn_upgrade = true;
                }
            }
        } else if name.eq_ignore_ascii_case("content-type") {
            let v = trim(h.value);
            let essence = v.split(|&b| b == b';').next().map(trim).unwrap_or(b"");
            form_body = essence.eq_ignore_ascii_case(b"application/x-www-form-urlencoded");
        } else if name.eq_ignore_ascii_case("authorization") {
            let v = trim(h.value);
            if v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ") {
                bearer = std::str::from_utf8(trim(&v[7..])).ok();
            }
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade_ws = h
                .value
                .split(|&b| b == b',')
                .any(|t| trim(t).eq_ignore_ascii_case(b"websocket"));
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            ws_key = Some(trim(h.value));
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            ws_version = Some(trim(h.value));
        }
    }
    let body_len = content_length.unwrap_or(0);
    if body_len > limits.max_body {
        return Err(ParseError::BodyTooLarge);
    }
    let total = head_len + body_len;
    if buf.len() < total {
        return Ok(Parsed::Partial);
    }
    let keep_alive = if http10 {
        conn_keep_alive && !conn_close
    } else {
        !conn_close
    };
    Ok(Parsed::Complete(
        Request {
            method,
            path,
            query,
            body: &buf[head_len..total],
            keep_alive,
            form_body,
            bearer,
            upgrade_websocket: upgrade_ws && conn_upgrade,
            ws_key,
            ws_version,
        },
        total,
    ))
}

/// A `Content-Length` value: decimal digits only (no sign, no blanks inside, no list).
fn parse_content_length(v: &[u8]) -> Result<usize, ParseError> {
    let v = trim(v);
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return Err(ParseError::Malformed("invalid Content-Length"));
    }
    let mut n: usize = 0;
    for &d in v {
        n = n * 10 + usize::from(d - b'0');
    }
    Ok(n)
}

fn trim(v: &[u8]) -> &[u8] {
    v.trim_ascii()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_head: 8192,
        max_body: 16384,
        max_headers: 32,
    };

    fn complete(buf: &[u8]) -> (Request<'_>, usize) {
        match parse_request(buf, &LIMITS) {
            Ok(Parsed::Complete(r, n)) => (r, n),
            other => panic!("expected a complete request, got {other:?}"),
        }
    }

    fn error(buf: &[u8]) -> ParseError {
        match parse_request(buf, &LIMITS) {
            Err(e) => e,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn get_with_query() {
        let buf = b"GET /check_user_exists?user_name=a HTTP/1.1\r\nHost: x\r\n\r\nGET";
        let (r, n) = complete(buf);
        assert_eq!(r.method, Method::Get);
        assert_eq!(r.path, "/check_user_exists");
        assert_eq!(r.query, b"user_name=a");
        assert!(r.keep_alive);
        assert_eq!(n, buf.len() - 3);
    }

    #[test]
    fn post_waits_for_body() {
        let req = b"POST /login HTTP/1.1\r\nContent-Length: 5\r\n\r\nab";
        assert!(matches!(parse_request(req, &LIMITS), Ok(Parsed::Partial)));
        let (r, n) = complete(b"POST /login HTTP/1.1\r\nContent-Length: 5\r\n\r\nabcdeGET");
        assert_eq!(r.body, b"abcde");
        assert_eq!(n, 48);
    }

    #[test]
    fn keep_alive_rules() {
        assert!(!complete(b"GET / HTTP/1.0\r\n\r\n").0.keep_alive);
        assert!(
            complete(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                .0
                .keep_alive
        );
        assert!(
            !complete(b"GET / HTTP/1.1\r\nConnection: Close\r\n\r\n")
                .0
                .keep_alive
        );
    }

    #[test]
    fn bearer_and_content_type() {
        let (r, _) = complete(
            b"POST / HTTP/1.1\r\nAuthorization: Bearer  123 \r\nContent-Type: application/json\r\n\r\n",
        );
        assert_eq!(r.bearer, Some("123"));
        assert!(!r.form_body);
        let (r, _) = complete(
            b"POST / HTTP/1.1\r\nContent-Type: application/x-www-form-urlencoded; charset=utf-8\r\n\r\n",
        );
        assert!(r.form_body);
    }

    #[test]
    fn errors() {
        assert_eq!(
            error(b"GARBAGE\r\n\r\n"),
            ParseError::Malformed("malformed request")
        );
        assert_eq!(
            error(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            ParseError::TransferEncoding
        );
        assert_eq!(
            error(b"POST / HTTP/1.1\r\nContent-Length: 16385\r\n\r\n"),
            ParseError::BodyTooLarge
        );
        assert_eq!(
            error(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            ParseError::Malformed("conflicting Content-Length headers")
        );
        assert_eq!(
            error(b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
            ParseError::Malformed("invalid Content-Length")
        );
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.resize(9000, b'a');
        assert_eq!(error(&big), ParseError::HeadTooLarge);
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..40 {
            many.extend_from_slice(format!("X{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(error(&many), ParseError::HeadTooLarge);
    }

    #[test]
    fn websocket_upgrade_headers() {
        let (r, _) = complete(
            b"GET /wsconn HTTP/1.1\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        );
        assert!(r.upgrade_websocket);
        assert_eq!(r.ws_key, Some(&b"dGhlIHNhbXBsZSBub25jZQ=="[..]));
        assert_eq!(r.ws_version, Some(&b"13"[..]));
    }
}

//! The relay's binary frame: `uid | target uid | msgType | timestamp | data | CRC32`, big-endian.
//!
//! [`Frame`] borrows the message bytes: parsing checks the length and the CRC and allocates
//! nothing; the accessors read fields in place. [`encode`] builds a frame (the server's ACK and
//! ERROR frames). This module depends on nothing else in the crate.

/// Offsets and sizes of the fields.
pub const UID_AT: usize = 0;
pub const TARGET_AT: usize = 8;
pub const TYPE_AT: usize = 16;
pub const TIMESTAMP_AT: usize = 17;
pub const DATA_AT: usize = 25;
pub const CRC_LEN: usize = 4;
/// The shortest frame: every field present, no data.
pub const MIN_FRAME: usize = DATA_AT + CRC_LEN;

/// Message types. Clients use 0-0xEF; 0xF0-0xFF are the server's.
pub mod msg_type {
    pub const TEXT: u8 = 0;
    pub const VOICE: u8 = 1;
    pub const PICTURE: u8 = 2;
    /// First type reserved for the server.
    pub const RESERVED_MIN: u8 = 0xF0;
    /// Acknowledgement of a frame (only on connections opened with `acks=1`).
    pub const ACK: u8 = 0xF0;
    /// A frame was refused.
    pub const ERROR: u8 = 0xF1;
}

/// Codes carried by ERROR frames.
pub mod error_code {
    pub const BAD_CRC: u8 = 1;
    pub const TOO_SHORT: u8 = 2;
    pub const SPOOFED_SENDER: u8 = 3;
    pub const UNKNOWN_TARGET: u8 = 4;
    pub const RESERVED_TYPE: u8 = 6;
    pub const RATE_LIMITED: u8 = 7;
    pub const QUEUE_FULL: u8 = 8;
}

/// ACK status byte.
pub mod ack_status {
    /// Written to at least one live connection of the target.
    pub const DELIVERED: u8 = 0;
    /// Committed to the target's offline queue.
    pub const STORED: u8 = 1;
}

/// Why bytes are not a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// Fewer than [`MIN_FRAME`] bytes.
    TooShort,
    /// The CRC field does not match the CRC of the bytes before it.
    BadCrc,
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FrameError::TooShort => "frame shorter than 29 bytes",
            FrameError::BadCrc => "frame CRC mismatch",
        })
    }
}

impl std::error::Error for FrameError {}

/// A checked frame borrowing its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// Invariant: at least `MIN_FRAME` long with a valid CRC.
    bytes: &'a [u8],
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

/// The CRC field of `bytes` as sent (0 when too short to have one), for ERROR frames.
pub fn crc_field(bytes: &[u8]) -> u32 {
    match bytes.len().checked_sub(CRC_LEN) {
        Some(at) if bytes.len() >= MIN_FRAME => {
            let mut x = [0u8; 4];
            x.copy_from_slice(&bytes[at..]);
            u32::from_be_bytes(x)
        }
        _ => 0,
    }
}

impl<'a> Frame<'a> {
    /// Checks length and CRC.
    pub fn parse(bytes: &'a [u8]) -> Result<Frame<'a>, FrameError> {
        if bytes.len() < MIN_FRAME {
            return Err(FrameError::TooShort);
        }
        let body = &bytes[..bytes.len() - CRC_LEN];
        if crc32fast::hash(body) != crc_field(bytes) {
            return Err(FrameError::BadCrc);
        }
        Ok(Frame { bytes })
    }

    pub fn uid(&self) -> u64 {
        be_u64(self.bytes, UID_AT)
    }

    pub fn target(&self) -> u64 {
        be_u64(self.bytes, TARGET_AT)
    }

    pub fn msg_type(&self) -> u8 {
        self.bytes[TYPE_AT]
    }

    /// Milliseconds, as the sender wrote them (opaque to the server).
    pub fn timestamp(&self) -> u64 {
        be_u64(self.bytes, TIMESTAMP_AT)
    }

    pub fn data(&self) -> &'a [u8] {
        &self.bytes[DATA_AT..self.bytes.len() - CRC_LEN]
    }

    pub fn crc(&self) -> u32 {
        crc_field(self.bytes)
    }

    /// The whole frame, exactly as received.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }
}

/// Appends a frame with a computed CRC to `out`.
pub fn encode(out: &mut Vec<u8>, uid: u64, target: u64, msg_type: u8, timestamp: u64, data: &[u8]) {
    let start = out.len();
    out.reserve(MIN_FRAME + data.len());
    out.extend_from_slice(&uid.to_be_bytes());
    out.extend_from_slice(&target.to_be_bytes());
    out.push(msg_type);
    out.extend_from_slice(&timestamp.to_be_bytes());
    out.extend_from_slice(data);
    let crc = crc32fast::hash(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// An ACK frame for the connection of `to`.
pub fn encode_ack(
    out: &mut Vec<u8>,
    to: u64,
    now_ms: u64,
    status: u8,
    acked_ts: u64,
    acked_crc: u32,
) {
    let mut data = [0u8; 13];
    data[0] = status;
    data[1..9].copy_from_slice(&acked_ts.to_be_bytes());
    data[9..13].copy_from_slice(&acked_crc.to_be_bytes());
    encode(out, 0, to, msg_type::ACK, now_ms, &data);
}

/// An ERROR frame for the connection of `to`.
pub fn encode_error(out: &mut Vec<u8>, to: u64, now_ms: u64, code: u8, bad_crc: u32, reason: &str) {
    let mut data = Vec::with_capacity(5 + reason.len());
    data.push(code);
    data.extend_from_slice(&bad_crc.to_be_bytes());
    data.extend_from_slice(reason.as_bytes());
    encode(out, 0, to, msg_type::ERROR, now_ms, &data);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector from the original system.
    const SEED: [u8; 32] = [
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x09, 0x00, 0x00, 0x00, 0x00, 0x00, 0x55, 0x8f, 0x95, 0xab, 0x31, 0x32, 0x33, 0x48, 0x99,
        0x98, 0xce,
    ];

    #[test]
    fn parses_the_original_vector() {
        let f = Frame::parse(&SEED).unwrap();
        assert_eq!(f.uid(), 8);
        assert_eq!(f.target(), 9);
        assert_eq!(f.msg_type(), msg_type::TEXT);
        assert_eq!(f.timestamp(), 1_435_473_323);
        assert_eq!(f.data(), b"123");
        assert_eq!(f.crc(), 0x4899_98ce);
        assert_eq!(f.as_bytes(), &SEED[..]);
    }

    #[test]
    fn encode_round_trips() {
        let mut out = Vec::new();
        encode(&mut out, 8, 9, 0, 1_435_473_323, b"123");
        assert_eq!(out, SEED);
        for len in [0, 1, 64, 4096] {
            let data = vec![0xa5; len];
            let mut out = Vec::new();
            encode(&mut out, u64::MAX, 1, 2, 7, &data);
            let f = Frame::parse(&out).unwrap();
            assert_eq!(
                (f.uid(), f.target(), f.msg_type(), f.timestamp()),
                (u64::MAX, 1, 2, 7)
            );
            assert_eq!(f.data(), &data[..]);
        }
    }

    #[test]
    fn rejects_short_and_corrupt() {
        for len in 0..MIN_FRAME {
            assert_eq!(Frame::parse(&SEED[..len]), Err(FrameError::TooShort));
            assert_eq!(crc_field(&SEED[..len]), 0);
        }
        for i in 0..SEED.len() {
            let mut bad = SEED;
            bad[i] ^= 0x01;
            assert_eq!(
                Frame::parse(&bad),
                Err(FrameError::BadCrc),
                "flipped byte {i}"
            );
        }
        assert_eq!(crc_field(&SEED), 0x4899_98ce);
    }

    #[test]
    fn server_frames() {
        let mut out = Vec::new();
        encode_ack(
            &mut out,
            9,
            1000,
            ack_status::STORED,
            1_435_473_323,
            0x4899_98ce,
        );
        let f = Frame::parse(&out).unwrap();
        assert_eq!(
            (f.uid(), f.target(), f.msg_type(), f.timestamp()),
            (0, 9, msg_type::ACK, 1000)
        );
        assert_eq!(f.data()[0], ack_status::STORED);
        assert_eq!(&f.data()[1..9], &1_435_473_323u64.to_be_bytes());
        assert_eq!(&f.data()[9..], &0x4899_98ceu32.to_be_bytes());
        out.clear();
        encode_error(
            &mut out,
            9,
            1000,
            error_code::BAD_CRC,
            0xdead_beef,
            "bad CRC",
        );
        let f = Frame::parse(&out).unwrap();
        assert_eq!(f.msg_type(), msg_type::ERROR);
        assert_eq!(f.data()[0], error_code::BAD_CRC);
        assert_eq!(&f.data()[1..5], &0xdead_beefu32.to_be_bytes());
        assert_eq!(&f.data()[5..], b"bad CRC");
    }
}

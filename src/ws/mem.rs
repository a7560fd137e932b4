//! An in-memory stream, for driving a [`super::WsSession`] without a socket: the relay bench
//! and the `ws_session` fuzz target use it, so both run the server's own session code.

use std::io::{self, Read, Write};

/// Reads come from `input` (at most `max_read` bytes per call when it is non-zero), then
/// `WouldBlock` like a drained non-blocking socket, or end of stream once `eof` is set.
/// Writes go to `output` (at most `max_write` bytes per call when non-zero, then `WouldBlock`
/// until `output` is taken, like a full socket buffer).
#[derive(Debug, Default)]
pub struct MemStream {
    pub input: Vec<u8>,
    pub read_pos: usize,
    pub max_read: usize,
    pub eof: bool,
    pub output: Vec<u8>,
    pub max_write: usize,
}

impl MemStream {
    /// Adds bytes for the session to read.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.read_pos == self.input.len() {
            self.input.clear();
            self.read_pos = 0;
        }
        self.input.extend_from_slice(bytes);
    }

    /// Whether every byte fed has been read.
    pub fn consumed(&self) -> bool {
        self.read_pos == self.input.len()
    }
}

impl Read for MemStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = &self.input[self.read_pos..];
        if left.is_empty() {
            return if self.eof {
                Ok(0)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            };
        }
        let mut n = left.len().min(buf.len());
        if self.max_read > 0 {
            n = n.min(self.max_read);
        }
        buf[..n].copy_from_slice(&left[..n]);
        self.read_pos += n;
        Ok(n)
    }
}

impl Write for MemStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut n = buf.len();
        if self.max_write > 0 {
            let room = self.max_write.saturating_sub(self.output.len());
            if room == 0 && n > 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            n = n.min(room);
        }
        self.output.extend_from_slice(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

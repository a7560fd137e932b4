//! Parse, re-encode from the parsed fields, compare bytes; and encode-then-parse from fields.
#![no_main]

use libfuzzer_sys::fuzz_target;
use polyge::frame::{self, Frame};

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = Frame::parse(data) {
        let mut again = Vec::new();
        frame::encode(
            &mut again,
            f.uid(),
            f.target(),
            f.msg_type(),
            f.timestamp(),
            f.data(),
        );
        assert_eq!(again, data);
    }
    if data.len() >= 25 {
        let word = |at: usize| u64::from_be_bytes(data[at..at + 8].try_into().unwrap());
        let mut out = Vec::new();
        frame::encode(&mut out, word(0), word(8), data[16], word(17), &data[25..]);
        let f = Frame::parse(&out).expect("an encoded frame parses");
        assert_eq!(
            (f.uid(), f.target(), f.msg_type(), f.timestamp()),
            (word(0), word(8), data[16], word(17))
        );
        assert_eq!(f.data(), &data[25..]);
    }
});

//! Any bytes: parsing never panics, and a frame that parses has consistent fields.
#![no_main]

use libfuzzer_sys::fuzz_target;
use polyge::frame::{Frame, MIN_FRAME, crc_field};

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = Frame::parse(data) {
        assert!(data.len() >= MIN_FRAME);
        assert_eq!(f.data().len(), data.len() - MIN_FRAME);
        assert_eq!(f.crc(), crc_field(data));
        let _ = (f.uid(), f.target(), f.msg_type(), f.timestamp());
    }
});

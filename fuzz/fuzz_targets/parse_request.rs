//! Any bytes through the HTTP layer: request parsing, parameter decoding and routing against a
//! real (temporary) store never panic, and every answer encodes.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use polyge::api::{Action, Api, ApiConfig};
use polyge::http::{Limits, Params, Parsed, encode_response, parse_request};
use polyge::store::Store;

const LIMITS: Limits = Limits {
    max_head: 8192,
    max_body: 16384,
    max_headers: 32,
};

fn api() -> &'static Api {
    static API: OnceLock<Api> = OnceLock::new();
    API.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("polyge-fuzz-{}", std::process::id()));
        let store = Store::open(&dir, 1 << 26).expect("temp store");
        Api::new(
            store,
            ApiConfig {
                token_ttl_ms: 1000,
                refresh_grace_ms: 1000,
                max_tokens_per_user: 16,
                max_teachers_page: 100,
            },
        )
    })
}

fuzz_target!(|data: &[u8]| {
    let mut off = 0;
    let mut out = Vec::new();
    while off < data.len() {
        match parse_request(&data[off..], &LIMITS) {
            Ok(Parsed::Complete(req, n)) => {
                assert!(n > 0 && off + n <= data.len());
                off += n;
                let _ = Params::decode(req.query, Some(req.body));
                if let Action::Respond(resp) = api().handle(&req) {
                    encode_response(&mut out, resp.status, &resp.body, !req.keep_alive);
                }
            }
            Ok(Parsed::Partial) => break,
            Err(e) => {
                let (status, msg) = e.status_and_msg();
                assert!(status.code() >= 400 && !msg.is_empty());
                break;
            }
        }
    }
});

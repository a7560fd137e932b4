//! Arbitrary bytes after a valid upgrade, fed to the server's own WebSocket session (in pieces
//! of a size the input picks, its buffers released between pieces) and relayed by the server's
//! own relay code. Checked against tungstenite reading the same bytes in one go: exactly the
//! binary messages that pass the relay rules reach their target, in order, byte for byte; every
//! byte the server writes is valid WebSocket; nothing panics.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use polyge::Config;
use polyge::conn::Next;
use polyge::frame::{Frame, msg_type};
use polyge::relay::Relay;
use polyge::server::standalone::{Sessions, Settled, Standalone, settle};
use polyge::ws::MemStream;
use tungstenite::Message;
use tungstenite::protocol::{Role, WebSocketConfig, WebSocketContext};

/// Users 1 and 2 exist; the connection under test is user 1's, user 2 is its peer.
const A: u64 = 1;
const B: u64 = 2;

fn world() -> &'static Standalone {
    static WORLD: OnceLock<Standalone> = OnceLock::new();
    WORLD.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("polyge-fuzz-ws-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let sa = Standalone::open(Config {
            data_dir: dir,
            workers: 1,
            map_size: 1 << 24,
            max_frame: 1024,
            rate_per_sec: u32::MAX,
            rate_burst: u32::MAX,
            ..Config::default()
        })
        .expect("store");
        assert_eq!(sa.register("a"), Some(A));
        assert_eq!(sa.register("b"), Some(B));
        sa
    })
}

/// Every message in `bytes` as a peer (`role`) reads them, until the stream ends or breaks.
fn messages(bytes: &[u8], role: Role, max: usize) -> Vec<Message> {
    let config = WebSocketConfig::default()
        .max_message_size(Some(max))
        .max_frame_size(Some(max));
    let mut ws = WebSocketContext::new(role, Some(config));
    let mut stream = MemStream {
        input: bytes.to_vec(),
        ..MemStream::default()
    };
    let mut out = Vec::new();
    while let Ok(m) = ws.read(&mut stream) {
        let last = matches!(m, Message::Text(_) | Message::Close(_));
        out.push(m);
        if last {
            break;
        }
    }
    out
}

fn binaries(ms: Vec<Message>) -> Vec<Vec<u8>> {
    ms.into_iter()
        .filter_map(|m| match m {
            Message::Binary(b) => Some(b.to_vec()),
            _ => None,
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Some((&piece, input)) = data.split_first() else {
        return;
    };
    let sa = world();
    let max = sa.config.max_frame;
    let ctx = sa.ctx(0);
    let mut relay = Relay::new(1);
    let mut sessions = Sessions::default();
    let ka = sessions.connect(&mut relay, &ctx, A, piece & 1 == 1, Vec::new());
    let kb = sessions.connect(&mut relay, &ctx, B, false, Vec::new());
    let mut settled = Settled::default();

    let piece = usize::from(piece >> 1).max(1);
    let mut closed = false;
    for part in input.chunks(piece) {
        ctx.tick();
        sessions.devices[ka].stream.feed(part);
        while !closed {
            match sessions.drive(ka, &ctx) {
                Next::Yield => {}
                Next::Close => closed = true,
                _ => break,
            }
        }
        settle(&ctx, &mut relay, &mut sessions, &mut settled);
        for key in std::mem::take(&mut settled.dirty) {
            if key != ka || !closed {
                sessions.drive(key, &ctx);
            }
        }
        if closed {
            break;
        }
        sessions.devices[ka].session.release_buffers();
    }
    assert!(settled.spilled.is_empty(), "both users stay connected");

    // What should have been relayed: the binary messages that pass the relay rules.
    let mut want = [Vec::new(), Vec::new()];
    for m in binaries(messages(input, Role::Server, max)) {
        if let Ok(f) = Frame::parse(&m)
            && f.uid() == A
            && (f.target() == A || f.target() == B)
            && f.msg_type() < msg_type::RESERVED_MIN
        {
            want[(f.target() - 1) as usize].push(m.clone());
        }
    }
    let got_b = binaries(messages(
        &sessions.devices[kb].stream.output,
        Role::Client,
        usize::MAX >> 1,
    ));
    assert_eq!(got_b, want[1], "frames for the peer");
    let mut relayed_a = Vec::new();
    for m in binaries(messages(
        &sessions.devices[ka].stream.output,
        Role::Client,
        usize::MAX >> 1,
    )) {
        let f = Frame::parse(&m).expect("the server sends only valid frames");
        if f.msg_type() < msg_type::RESERVED_MIN {
            relayed_a.push(m);
        }
    }
    assert_eq!(relayed_a, want[0], "frames the user sent itself");
});

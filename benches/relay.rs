//! The relay path for one frame without sockets, through the server's own session and relay
//! code (`polyge::server::standalone`): parse, CRC verify, authorization (sender is the
//! connection's user, target is registered, rate), route lookup, and hand-off to the target
//! connection's outbound queue — on the same worker, and on another worker through the batch
//! a worker sends per loop iteration. `end_to_end` adds what the sockets would see: masked
//! WebSocket bytes in, tungstenite decoding, and the target's encoded bytes out.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use polyge::Config;
use polyge::frame;
use polyge::relay::{Relay, RelayMsg};
use polyge::server::standalone::{Sessions, Settled, Standalone, deliver, settle};
use polyge::ws::MemStream;
use tungstenite::Message;
use tungstenite::protocol::{Role, WebSocketContext};

const SIZES: [usize; 3] = [64, 1024, 16 * 1024];
/// Frames between two drains of the target's queue (about one wakeup's worth).
const BATCH: u64 = 64;

fn open(workers: usize) -> (tempfile::TempDir, Arc<Standalone>, u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        data_dir: dir.path().to_path_buf(),
        workers,
        map_size: 1 << 26,
        rate_per_sec: u32::MAX,
        rate_burst: u32::MAX,
        ..Config::default()
    };
    let sa = Standalone::open(config).unwrap();
    let a = sa.register("sender").unwrap();
    let b = sa.register("target").unwrap();
    (dir, Arc::new(sa), a, b)
}

/// A frame of `size` bytes in total from `a` to `b`.
fn frame(a: u64, b: u64, size: usize) -> Bytes {
    let mut out = Vec::new();
    frame::encode(&mut out, a, b, 1, 1, &vec![7u8; size - frame::MIN_FRAME]);
    Bytes::from(out)
}

fn same_worker(c: &mut Criterion) {
    let (_dir, sa, a, b) = open(1);
    let ctx = sa.ctx(0);
    let mut relay = Relay::new(1);
    let mut sessions = Sessions::default();
    let ka = sessions.connect(&mut relay, &ctx, a, false, Vec::new());
    let kb = sessions.connect(&mut relay, &ctx, b, false, Vec::new());
    let me_a = sessions.devices[ka].me;
    let mut settled = Settled::default();
    let mut g = c.benchmark_group("relay/same_worker");
    for size in SIZES {
        let f = frame(a, b, size);
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::from_parameter(size), &f, |bench, f| {
            bench.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                let mut done = 0;
                while done < iters {
                    let n = BATCH.min(iters - done);
                    ctx.tick();
                    let t = Instant::now();
                    for _ in 0..n {
                        sessions.devices[ka].session.on_frame(f.clone(), &ctx, me_a);
                        settle(&ctx, &mut relay, &mut sessions, &mut settled);
                    }
                    spent += t.elapsed();
                    done += n;
                    // The target's queue is written out (untimed) so it never looks slow.
                    assert!(settled.spilled.is_empty());
                    settled.dirty.clear();
                    sessions.drive(kb, &ctx);
                    black_box(&sessions.devices[kb].stream.output);
                    sessions.devices[kb].stream.output.clear();
                }
                spent
            })
        });
    }
    g.finish();
}

fn other_worker(c: &mut Criterion) {
    let (_dir, sa, a, b) = open(2);
    assert_ne!(a % 2, b % 2, "sender and target owned by different workers");
    let (wa, wb) = ((a % 2) as usize, (b % 2) as usize);
    let (tx, rx) = crossbeam_channel::unbounded::<Vec<RelayMsg>>();
    let received = Arc::new(AtomicU64::new(0));
    // The target's worker: takes each batch, delivers, writes the target's queue out.
    let target_worker = {
        let (sa, received) = (sa.clone(), received.clone());
        std::thread::spawn(move || {
            let ctx = sa.ctx(wb);
            let mut relay = Relay::new(2);
            let mut sessions = Sessions::default();
            let kb = sessions.connect(&mut relay, &ctx, b, false, Vec::new());
            let mut settled = Settled::default();
            for batch in rx {
                ctx.tick();
                let n = batch.len() as u64;
                for msg in batch {
                    if let RelayMsg::Deliver {
                        target,
                        frame,
                        sender,
                    } = msg
                    {
                        deliver(
                            &ctx,
                            &mut relay,
                            &mut sessions,
                            &mut settled,
                            target,
                            frame,
                            Some(sender),
                        );
                    }
                }
                assert!(settled.spilled.is_empty());
                settled.dirty.clear();
                sessions.drive(kb, &ctx);
                sessions.devices[kb].stream.output.clear();
                received.fetch_add(n, Ordering::Release);
            }
        })
    };
    let ctx = sa.ctx(wa);
    let mut relay = Relay::new(2);
    let mut sessions = Sessions::default();
    let ka = sessions.connect(&mut relay, &ctx, a, false, Vec::new());
    let me_a = sessions.devices[ka].me;
    let mut settled = Settled::default();
    let mut g = c.benchmark_group("relay/other_worker");
    for size in SIZES {
        let f = frame(a, b, size);
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::from_parameter(size), &f, |bench, f| {
            bench.iter_custom(|iters| {
                let goal = received.load(Ordering::Acquire) + iters;
                let t = Instant::now();
                let mut done = 0;
                while done < iters {
                    let n = BATCH.min(iters - done);
                    ctx.tick();
                    for _ in 0..n {
                        sessions.devices[ka].session.on_frame(f.clone(), &ctx, me_a);
                        settle(&ctx, &mut relay, &mut sessions, &mut settled);
                    }
                    tx.send(std::mem::take(&mut relay.outbox[wb])).unwrap();
                    done += n;
                }
                while received.load(Ordering::Acquire) < goal {
                    std::hint::spin_loop();
                }
                t.elapsed()
            })
        });
    }
    g.finish();
    drop(tx);
    target_worker.join().unwrap();
}

fn end_to_end(c: &mut Criterion) {
    let (_dir, sa, a, b) = open(1);
    let ctx = sa.ctx(0);
    let mut relay = Relay::new(1);
    let mut sessions = Sessions::default();
    let ka = sessions.connect(&mut relay, &ctx, a, false, Vec::new());
    let kb = sessions.connect(&mut relay, &ctx, b, false, Vec::new());
    let mut settled = Settled::default();
    let mut g = c.benchmark_group("relay/end_to_end");
    for size in SIZES {
        // BATCH frames as a client sends them (masked), read in one wakeup.
        let mut client = WebSocketContext::new(Role::Client, None);
        let mut wire = MemStream::default();
        for _ in 0..BATCH {
            client
                .write(&mut wire, Message::Binary(frame(a, b, size)))
                .unwrap();
        }
        client.flush(&mut wire).unwrap();
        let wire = wire.output;
        g.throughput(Throughput::Bytes(size as u64 * BATCH));
        g.bench_with_input(BenchmarkId::from_parameter(size), &wire, |bench, wire| {
            bench.iter(|| {
                ctx.tick();
                sessions.devices[ka].stream.feed(wire);
                sessions.drive(ka, &ctx);
                settle(&ctx, &mut relay, &mut sessions, &mut settled);
                settled.dirty.clear();
                sessions.drive(kb, &ctx);
                let out = &mut sessions.devices[kb].stream.output;
                assert!(out.len() >= BATCH as usize * size);
                out.clear();
            })
        });
    }
    g.finish();
}

criterion_group!(benches, same_worker, other_worker, end_to_end);
criterion_main!(benches);

//! The store: token lookup in a read transaction, and registrations per second through the
//! group-committing writer with 1, 16 and 256 writers waiting on it at once (each commit
//! fsyncs; more concurrent writers share each fsync).

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use crossbeam_channel::Sender;
use polyge::store::writer::{TokenPolicy, commit_direct};
use polyge::store::{NewUser, Store, WriteOp, WriteOutcome, Writer, WriterConfig};

fn new_user(n: u64) -> WriteOp {
    let name = format!("bench{n}");
    WriteOp::Register(NewUser {
        user_name: Some(name.clone()),
        name_key: Some(name),
        phone: None,
        email: None,
        user_type: 1,
        pwd_hash: "$argon2id$v=19$m=19456,t=2,p=1$bench".into(),
        now_ms: 0,
    })
}

fn token_lookup(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 1 << 28).unwrap();
    let policy = TokenPolicy {
        now_ms: 0,
        ttl_ms: u64::MAX / 4,
        grace_ms: 0,
        max_per_user: 16,
    };
    let mut ops = vec![new_user(0)];
    for i in 0..10_000u32 {
        let mut hash = [0u8; 32];
        hash[..4].copy_from_slice(&i.to_be_bytes());
        ops.push(WriteOp::IssueToken {
            uid: 1,
            client_id: "123".into(),
            token_hash: hash,
            policy,
        });
    }
    commit_direct(&store, &ops);
    let mut probe = [0u8; 32];
    probe[..4].copy_from_slice(&9_999u32.to_be_bytes());
    c.bench_function("store/token_lookup", |b| {
        b.iter(|| {
            let r = store.read().unwrap();
            r.token(black_box(&probe)).unwrap().map(|t| t.uid)
        })
    });
}

fn registrations(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 1 << 30).unwrap();
    let (writer, thread) = Writer::<Sender<WriteOutcome>>::start(
        store.clone(),
        WriterConfig {
            queue: 65_536,
            max_batch: 4096,
        },
        Box::new(|outcomes| {
            for (outcome, reply) in outcomes {
                let _ = reply.send(outcome);
            }
        }),
    )
    .unwrap();
    let next = AtomicU64::new(1);
    let mut g = c.benchmark_group("store/register_group_commit");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(5));
    for writers in [1usize, 16, 256] {
        g.throughput(Throughput::Elements(1));
        g.bench_with_input(
            BenchmarkId::from_parameter(writers),
            &writers,
            |b, &writers| {
                b.iter_custom(|iters| {
                    let per = iters.div_ceil(writers as u64);
                    let start = Instant::now();
                    std::thread::scope(|s| {
                        for _ in 0..writers {
                            let writer = writer.clone();
                            let next = &next;
                            s.spawn(move || {
                                let (tx, rx) = crossbeam_channel::bounded(1);
                                for _ in 0..per {
                                    let n = next.fetch_add(1, Ordering::Relaxed);
                                    if writer.submit(new_user(n), tx.clone()).is_err() {
                                        panic!("writer queue full");
                                    }
                                    let outcome = rx.recv().unwrap();
                                    assert!(matches!(outcome, WriteOutcome::Registered { .. }));
                                }
                            });
                        }
                    });
                    // Time per registration, as if `iters` were done.
                    start
                        .elapsed()
                        .mul_f64(iters as f64 / (per * writers as u64) as f64)
                })
            },
        );
    }
    g.finish();
    drop(writer);
    thread.join().unwrap();
}

criterion_group!(benches, token_lookup, registrations);
criterion_main!(benches);

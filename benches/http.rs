//! The HTTP path without sockets: parse + route + handle + encode `/check_user_exists`, one
//! request and a pipelined batch of 16, against a real LMDB store.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use polyge::api::{Action, Api, ApiConfig};
use polyge::http::{Limits, Parsed, encode_response, parse_request};
use polyge::store::{NewUser, Store, WriteOp};

const LIMITS: Limits = Limits {
    max_head: 8192,
    max_body: 16384,
    max_headers: 32,
};

/// Serves every complete request in `input` into `out`; returns how many.
fn serve_all(api: &Api, input: &[u8], out: &mut Vec<u8>) -> usize {
    let mut off = 0;
    let mut served = 0;
    while let Ok(Parsed::Complete(req, n)) = parse_request(&input[off..], &LIMITS) {
        off += n;
        match api.handle(&req) {
            Action::Respond(resp) => encode_response(out, resp.status, &resp.body, !req.keep_alive),
            _ => unreachable!("check_user_exists answers at once"),
        }
        served += 1;
    }
    served
}

fn check_user_exists(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 1 << 26).unwrap();
    polyge::store::writer::commit_direct(
        &store,
        &[WriteOp::Register(NewUser {
            user_name: Some("lankc".into()),
            name_key: Some("lankc".into()),
            phone: None,
            email: None,
            user_type: 1,
            pwd_hash: "$argon2id$bench".into(),
            now_ms: 0,
        })],
    );
    let api = Api::new(
        store,
        ApiConfig {
            token_ttl_ms: 1,
            refresh_grace_ms: 1,
            max_tokens_per_user: 16,
            max_teachers_page: 1000,
        },
    );
    let one = b"GET /check_user_exists?user_name=lankc HTTP/1.1\r\nHost: 127.0.0.1:5918\r\nUser-Agent: wrk\r\n\r\n";
    let batch: Vec<u8> = one.repeat(16);
    let mut out = Vec::with_capacity(64 * 1024);
    let mut g = c.benchmark_group("http/check_user_exists");
    g.throughput(Throughput::Bytes(one.len() as u64));
    g.bench_function("one", |b| {
        b.iter(|| {
            out.clear();
            serve_all(&api, black_box(one), &mut out)
        })
    });
    g.throughput(Throughput::Bytes(batch.len() as u64));
    g.bench_function("pipelined_16", |b| {
        b.iter(|| {
            out.clear();
            assert_eq!(serve_all(&api, black_box(&batch), &mut out), 16);
        })
    });
    g.finish();
}

criterion_group!(benches, check_user_exists);
criterion_main!(benches);

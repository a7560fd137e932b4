//! Frame parsing (length + CRC-32 check, zero-copy) and encoding, by frame size.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use polyge::frame::{self, Frame, MIN_FRAME};

const SIZES: [usize; 5] = [29, 64, 1024, 16 * 1024, 64 * 1024];

fn frame_of(size: usize) -> Vec<u8> {
    let data: Vec<u8> = (0..size - MIN_FRAME).map(|i| i as u8).collect();
    let mut f = Vec::with_capacity(size);
    frame::encode(&mut f, 8, 9, frame::msg_type::VOICE, 1_435_473_323, &data);
    f
}

fn parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame/parse_verify");
    for size in SIZES {
        let f = frame_of(size);
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::from_parameter(size), &f, |b, f| {
            b.iter(|| {
                let parsed = Frame::parse(black_box(f)).expect("valid");
                (parsed.uid(), parsed.target(), parsed.msg_type())
            })
        });
    }
    g.finish();
}

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame/encode");
    for size in SIZES {
        let data = vec![0x5a; size - MIN_FRAME];
        let mut out = Vec::with_capacity(size);
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::from_parameter(size), &data, |b, data| {
            b.iter(|| {
                out.clear();
                frame::encode(&mut out, 8, 9, 0, 1, black_box(data));
                out.len()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, parse, encode);
criterion_main!(benches);

//! Codec throughput: one response of 0 B, 1 KiB, 64 KiB and 1 MiB encoded and decoded as v1
//! (OpenChoreo's JSON with a base64 body) and as v2 (`ResponseHead`, one `Data`, `End`).

use std::time::Duration;

use buildplane_benches::{KIB, MIB};
use buildplane_tunnel::{
    V1Message, decode_v1, encode_v1,
    v1::HttpTunnelResponse,
    v2::{self, Frame, Limits},
};
use criterion::{
    BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};

const SIZES: [usize; 4] = [0, KIB, 64 * KIB, MIB];

fn headers() -> Vec<(String, String)> {
    vec![
        ("content-type".into(), "application/json".into()),
        (
            "audit-id".into(),
            "4b5c7a0e-7d43-4a5f-9a2d-1f0e6a3c9b21".into(),
        ),
    ]
}

fn v1_response(size: usize) -> V1Message {
    V1Message::Response(HttpTunnelResponse {
        request_id: "0f8e2c1a-9b7d-4e3f-8a6b-5c4d3e2f1a0b".into(),
        status_code: 200,
        headers: Some(
            headers()
                .into_iter()
                .map(|(name, value)| (name, vec![value]))
                .collect(),
        ),
        body: (size > 0).then(|| vec![b'x'; size]),
        error: None,
    })
}

fn v2_response(size: usize) -> Vec<Frame> {
    let mut frames = vec![Frame::ResponseHead {
        stream: 1,
        status: 200,
        headers: headers(),
        end_stream: size == 0,
    }];
    if size > 0 {
        frames.push(Frame::Data {
            stream: 1,
            chunk: vec![b'x'; size].into(),
        });
        frames.push(Frame::End { stream: 1 });
    }
    frames
}

fn codec(c: &mut Criterion) {
    let limits = Limits::with_max_frame(2 * MIB);
    let mut group = c.benchmark_group("codec");
    if buildplane_benches::quick() {
        // The CI smoke runs unoptimised, where a 1 MiB v1 message takes milliseconds: a fixed
        // number of iterations per sample keeps it to seconds.
        group
            .sampling_mode(SamplingMode::Flat)
            .sample_size(10)
            .warm_up_time(Duration::from_millis(50))
            .measurement_time(Duration::from_millis(200));
    } else {
        group
            .sample_size(20)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1));
    }
    for size in SIZES {
        // Bytes counts the body so v1 and v2 compare per payload byte (0 B: one message).
        group.throughput(Throughput::Bytes(size.max(1) as u64));
        let message = v1_response(size);
        let text = encode_v1(&message);
        group.bench_with_input(BenchmarkId::new("v1_encode", size), &message, |b, m| {
            b.iter(|| encode_v1(std::hint::black_box(m)))
        });
        group.bench_with_input(BenchmarkId::new("v1_decode", size), &text, |b, t| {
            b.iter(|| decode_v1(std::hint::black_box(t)).expect("valid v1"))
        });
        let frames = v2_response(size);
        let encoded: Vec<Vec<u8>> = frames.iter().map(v2::to_vec).collect();
        group.bench_with_input(BenchmarkId::new("v2_encode", size), &frames, |b, f| {
            // A fresh buffer per frame, as the agent and the gateway send them.
            b.iter(|| {
                for frame in std::hint::black_box(f) {
                    std::hint::black_box(v2::to_vec(frame));
                }
            })
        });
        group.bench_with_input(BenchmarkId::new("v2_decode", size), &encoded, |b, e| {
            b.iter(|| {
                for bytes in std::hint::black_box(e) {
                    std::hint::black_box(v2::decode(bytes, limits).expect("valid v2"));
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);

//! Golden v1 fixtures, v2 round trips, hostile input, and the no-I/O boundary.

use buildplane_tunnel::{
    v1,
    v2::{self, DecodeError, Frame, Limits},
};
use proptest::prelude::*;

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/test_data/v1/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("fixture")
}

/// OpenChoreo's JSON decodes into the types and encodes back to the same JSON.
#[test]
fn v1_golden_fixtures_round_trip() {
    for name in ["request.json", "response.json", "error-response.json"] {
        let text = fixture(name);
        let message = v1::decode(&text, 1 << 20).unwrap_or_else(|e| panic!("{name}: {e}"));
        let again: serde_json::Value = serde_json::from_str(&v1::encode(&message)).expect("JSON");
        let original: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        assert_eq!(again, original, "{name}");
    }
    let v1::Message::Request(request) =
        v1::decode(&fixture("request.json"), 1 << 20).expect("request")
    else {
        panic!("a request")
    };
    assert_eq!(
        request.body.as_deref(),
        Some(&br#"{"kind":"ConfigMap"}"#[..]),
        "base64 body decoded"
    );
    assert_eq!(
        request.headers.expect("headers")["Accept"],
        vec!["application/json".to_owned()]
    );
}

/// v1 rejects oversized text before parsing, and shapes that are neither message.
#[test]
fn v1_rejects_oversized_and_shapeless_messages() {
    assert!(matches!(
        v1::decode(&fixture("request.json"), 10),
        Err(v1::DecodeError::TooLarge { .. })
    ));
    assert!(v1::decode(r#"{"hello":1}"#, 1024).is_err());
    assert!(
        v1::decode(r#"{"requestID":"x","statusCode":200,"body":"!!"}"#, 1024).is_err(),
        "bad base64"
    );
    assert!(v1::decode("not json", 1024).is_err());
}

/// v2 rejects a declared length over the limit before reading the payload.
#[test]
fn v2_rejects_oversized_frames_before_allocation() {
    let mut bytes = vec![0x04, 0, 0, 0, 1];
    bytes.extend_from_slice(&u32::MAX.to_be_bytes());
    assert_eq!(
        v2::decode(&bytes, Limits::default()),
        Err(DecodeError::TooLarge {
            len: u32::MAX as usize,
            limit: v2::DEFAULT_MAX_FRAME
        })
    );
}

/// v2 rejects bytes after the frame and after the payload's fields.
#[test]
fn v2_rejects_trailing_bytes() {
    let mut bytes = v2::to_vec(&Frame::Ping { nonce: 7 });
    bytes.push(0);
    assert_eq!(
        v2::decode(&bytes, Limits::default()),
        Err(DecodeError::TrailingBytes(1))
    );
    // A ping whose payload declares 9 bytes: one byte after the nonce.
    let mut inner = vec![0x08, 0, 0, 0, 0, 0, 0, 0, 9];
    inner.extend_from_slice(&[0; 9]);
    assert_eq!(
        v2::decode(&inner, Limits::default()),
        Err(DecodeError::TrailingBytes(1))
    );
    assert_eq!(
        v2::decode(&[0x42, 0, 0, 0, 0, 0, 0, 0, 0], Limits::default()),
        Err(DecodeError::UnknownType(0x42))
    );
}

/// The wire layout of one frame, as documented in the crate.
#[test]
fn v2_wire_layout_is_stable() {
    let bytes = v2::to_vec(&Frame::WindowUpdate {
        stream: 3,
        credits: 65_536,
    });
    assert_eq!(bytes, [0x07, 0, 0, 0, 3, 0, 0, 0, 4, 0, 1, 0, 0]);
    let hello = v2::to_vec(&Frame::Hello {
        version: 2,
        plane_id: "p".into(),
    });
    assert_eq!(hello, [0x01, 0, 0, 0, 0, 0, 0, 0, 5, 0, 2, 0, 1, b'p']);
}

/// The protocol crate depends on no I/O crate.
#[test]
fn tunnel_crate_does_no_io() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = std::process::Command::new(cargo)
        .args([
            "tree",
            "-p",
            "buildplane-tunnel",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let tree = String::from_utf8_lossy(&output.stdout);
    for line in tree.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        assert!(
            ![
                "tokio",
                "rustls",
                "tungstenite",
                "tokio-tungstenite",
                "kube",
                "hyper",
                "mio"
            ]
            .contains(&name),
            "buildplane-tunnel must not depend on {name}"
        );
    }
    assert!(tree.contains("serde_json"), "the tree was read: {tree}");
}

fn text() -> impl Strategy<Value = String> {
    "[ -~é]{0,40}"
}

fn headers() -> impl Strategy<Value = Vec<(String, String)>> {
    prop::collection::vec((text(), text()), 0..6)
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (any::<u16>(), text()).prop_map(|(version, plane_id)| Frame::Hello { version, plane_id }),
        (
            any::<u32>(),
            text(),
            text(),
            text(),
            text(),
            headers(),
            any::<bool>()
        )
            .prop_map(
                |(stream, method, target, path, query, headers, end_stream)| Frame::RequestHead {
                    stream,
                    method,
                    target,
                    path,
                    query,
                    headers,
                    end_stream
                }
            ),
        (any::<u32>(), any::<u16>(), headers(), any::<bool>()).prop_map(
            |(stream, status, headers, end_stream)| Frame::ResponseHead {
                stream,
                status,
                headers,
                end_stream
            }
        ),
        (any::<u32>(), prop::collection::vec(any::<u8>(), 0..512)).prop_map(|(stream, chunk)| {
            Frame::Data {
                stream,
                chunk: chunk.into(),
            }
        }),
        any::<u32>().prop_map(|stream| Frame::End { stream }),
        (any::<u32>(), any::<u16>(), text()).prop_map(|(stream, code, reason)| Frame::Reset {
            stream,
            code,
            reason
        }),
        (any::<u32>(), any::<u32>())
            .prop_map(|(stream, credits)| Frame::WindowUpdate { stream, credits }),
        any::<u64>().prop_map(|nonce| Frame::Ping { nonce }),
        any::<u64>().prop_map(|nonce| Frame::Pong { nonce }),
        text().prop_map(|reason| Frame::GoAway { reason }),
    ]
}

proptest! {
    /// Every frame decodes to itself.
    #[test]
    fn v2_frames_round_trip(frame in frame()) {
        let bytes = v2::to_vec(&frame);
        prop_assert_eq!(v2::decode(&bytes, Limits::default()), Ok(frame));
    }

    /// Every truncation of a valid frame is an error, never a panic.
    #[test]
    fn v2_truncations_are_errors(frame in frame(), cut in 0usize..64) {
        let bytes = v2::to_vec(&frame);
        let cut = cut.min(bytes.len().saturating_sub(1));
        prop_assert!(v2::decode(&bytes[..cut], Limits::default()).is_err());
    }

    /// Arbitrary bytes never panic the decoder.
    #[test]
    fn v2_arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = v2::decode(&bytes, Limits::default());
    }

    /// v1 requests round-trip through OpenChoreo's JSON.
    #[test]
    fn v1_requests_round_trip(id in "[a-f0-9-]{1,36}", path in "/[a-z/]{0,30}", body in prop::option::of(prop::collection::vec(any::<u8>(), 0..64))) {
        let message = v1::Message::Request(v1::HttpTunnelRequest {
            request_id: id, gateway_request_id: None, target: "k8s".into(), method: "GET".into(), path, query: None, headers: None, body,
        });
        prop_assert_eq!(v1::decode(&v1::encode(&message), 1 << 20).expect("decodes"), message);
    }

    /// Arbitrary text never panics the v1 decoder.
    #[test]
    fn v1_arbitrary_text_never_panics(text in ".{0,200}") {
        let _ = v1::decode(&text, 1 << 20);
    }
}

//! Exact v1 bytes, Go's nulls, hostile v2 payloads behind valid headers, and `try_encode`.

use buildplane_tunnel::{
    V1Message, decode_v1, encode_v1,
    v1::{self, HttpTunnelRequest, HttpTunnelResponse, TunnelError},
    v2::{self, DecodeError, EncodeError, Frame, HEADER_LEN, Limits, MAX_HEADERS},
};
use proptest::prelude::*;

fn fixture(name: &str) -> String {
    let path = format!("{}/test_data/v1/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Our JSON is byte-for-byte what the fixtures hold: Go's field order (struct order), the
/// exact key spellings (`requestID`, `gatewayRequestID`, `statusCode`), absent optional fields
/// omitted. Renaming a field or reordering the struct breaks this test.
#[test]
fn v1_encoding_is_byte_identical_to_the_fixtures() {
    for name in [
        "request.json",
        "response.json",
        "error-response.json",
        "minimal-response.json",
    ] {
        let text = fixture(name);
        let message = decode_v1(text.trim_end()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(encode_v1(&message), text.trim_end(), "{name}");
    }
    let V1Message::Response(response) = decode_v1(&fixture("error-response.json")).expect("ok")
    else {
        panic!("a response")
    };
    assert_eq!(
        response.error,
        Some(TunnelError {
            code: Some(502),
            message: "failed to reach the Kubernetes API".into(),
            details: Some(serde_json::Value::String(
                "dial tcp 10.43.0.1:443: connect: connection refused".into()
            )),
        })
    );
}

/// A Go agent without `omitempty` sends `null` headers and bodies and empty strings; they
/// decode as absent, not as errors.
#[test]
fn v1_accepts_go_nulls() {
    let V1Message::Request(request) = decode_v1(&fixture("go-nulls-request.json")).expect("ok")
    else {
        panic!("a request")
    };
    assert_eq!(request.headers, None);
    assert_eq!(request.body, None);
    assert_eq!(request.query.as_deref(), Some(""));
    assert_eq!(request.method, "GET");
}

/// The message kind comes from the fields, as OpenChoreo has no type tag: a response needs
/// `statusCode`, a request `method`; a message missing a required field is refused.
#[test]
fn v1_kind_is_decided_by_fields() {
    assert!(matches!(
        decode_v1(r#"{"requestID":"a","statusCode":200}"#),
        Ok(V1Message::Response(_))
    ));
    assert!(matches!(
        decode_v1(r#"{"requestID":"a","target":"k8s","method":"GET","path":"/"}"#),
        Ok(V1Message::Request(_))
    ));
    for bad in [
        r#"{"requestID":"a","method":"GET","path":"/"}"#,
        r#"{"statusCode":200}"#,
        r#"{"requestID":"a","statusCode":"200"}"#,
        r#"[]"#,
        r#"null"#,
        "",
    ] {
        assert!(decode_v1(bad).is_err(), "{bad:?} must be refused");
    }
}

fn valid_header(kind: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut bytes = vec![kind];
    bytes.extend_from_slice(&stream.to_be_bytes());
    bytes.extend_from_slice(&u32::try_from(payload.len()).expect("small").to_be_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

/// A head claiming more headers than the limit, or more than the bytes present, is refused
/// before any header is allocated; invalid UTF-8 is refused with the field's name.
#[test]
fn v2_header_counts_and_utf8_are_checked() {
    let mut payload = 200u16.to_be_bytes().to_vec();
    payload.extend_from_slice(&u16::MAX.to_be_bytes());
    payload.push(0);
    assert_eq!(
        v2::decode(&valid_header(0x03, 1, &payload), Limits::default()),
        Err(DecodeError::TooManyHeaders(u16::MAX as usize))
    );
    let mut payload = 200u16.to_be_bytes().to_vec();
    payload.extend_from_slice(&(MAX_HEADERS as u16).to_be_bytes());
    payload.push(0);
    assert_eq!(
        v2::decode(&valid_header(0x03, 1, &payload), Limits::default()),
        Err(DecodeError::Truncated("headers"))
    );
    let mut payload = 2u16.to_be_bytes().to_vec();
    payload.extend_from_slice(&[0, 2, 0xff, 0xfe]);
    assert_eq!(
        v2::decode(&valid_header(0x01, 0, &payload), Limits::default()),
        Err(DecodeError::InvalidUtf8("plane id"))
    );
    // The limit is the caller's: a 16-byte limit refuses a 17-byte data frame.
    assert_eq!(
        v2::decode(&valid_header(0x04, 1, &[0; 17]), Limits::with_max_frame(16)),
        Err(DecodeError::TooLarge { len: 17, limit: 16 })
    );
}

/// `try_encode` refuses what `encode` would cut or what the peer would reject, leaving the
/// buffer untouched; what it accepts decodes to the same frame.
#[test]
fn try_encode_refuses_lossy_frames() {
    let mut out = vec![0xAA];
    let long = "x".repeat(u16::MAX as usize + 1);
    assert_eq!(
        v2::try_encode(
            &Frame::GoAway {
                reason: long.clone()
            },
            &mut out,
            Limits::default()
        ),
        Err(EncodeError::StringTooLong {
            field: "reason",
            len: long.len()
        })
    );
    let headers = vec![("a".to_owned(), "b".to_owned()); MAX_HEADERS + 1];
    let head = Frame::ResponseHead {
        stream: 1,
        status: 200,
        headers,
        end_stream: false,
    };
    assert_eq!(
        v2::try_encode(&head, &mut out, Limits::default()),
        Err(EncodeError::TooManyHeaders(MAX_HEADERS + 1))
    );
    let data = Frame::Data {
        stream: 1,
        chunk: vec![0; 33].into(),
    };
    assert_eq!(
        v2::try_encode(&data, &mut out, Limits::with_max_frame(32)),
        Err(EncodeError::TooLarge { len: 33, limit: 32 })
    );
    assert_eq!(out, [0xAA], "refused frames leave the buffer as it was");
    v2::try_encode(&data, &mut out, Limits::default()).expect("fits");
    assert_eq!(
        v2::decode(&out[1..], Limits::default()),
        Ok(data),
        "appended after existing bytes"
    );
    // `encode` itself never fails: it cuts the string at a char boundary.
    let cut = v2::to_vec(&Frame::GoAway {
        reason: format!("{}é", "x".repeat(u16::MAX as usize - 1)),
    });
    match v2::decode(&cut, Limits::default()) {
        Ok(Frame::GoAway { reason }) => assert_eq!(reason.len(), u16::MAX as usize - 1),
        other => panic!("{other:?}"),
    }
}

/// Connection frames are written on stream 0 whatever the caller had in mind.
#[test]
fn connection_frames_use_stream_zero() {
    for frame in [
        Frame::Hello {
            version: buildplane_tunnel::version::CURRENT,
            plane_id: "p".into(),
        },
        Frame::Ping { nonce: 1 },
        Frame::Pong { nonce: 1 },
        Frame::GoAway { reason: "r".into() },
    ] {
        assert_eq!(v2::to_vec(&frame)[1..5], [0, 0, 0, 0], "{frame:?}");
    }
    assert_eq!(HEADER_LEN, 9);
}

fn text() -> impl Strategy<Value = String> {
    "\\PC{0,24}"
}

fn v1_headers() -> impl Strategy<Value = Option<v1::Headers>> {
    prop::option::of(prop::collection::btree_map(
        "[A-Za-z-]{1,16}",
        prop::collection::vec(text(), 0..3),
        0..4,
    ))
}

fn body() -> impl Strategy<Value = Option<Vec<u8>>> {
    prop::option::of(prop::collection::vec(any::<u8>(), 0..64))
}

proptest! {
    /// Every v1 request, with every optional field present or absent, round-trips.
    #[test]
    fn v1_full_requests_round_trip(
        id in text(), gw in prop::option::of(text()), target in text(), method in text(),
        path in text(), query in prop::option::of(text()), headers in v1_headers(), body in body(),
    ) {
        let message = V1Message::Request(HttpTunnelRequest {
            request_id: id, gateway_request_id: gw, target, method, path, query, headers, body,
        });
        prop_assert_eq!(decode_v1(&encode_v1(&message)).expect("decodes"), message);
    }

    /// Every v1 response, with or without headers, body and error, round-trips.
    #[test]
    fn v1_responses_round_trip(
        id in text(), status in any::<u16>(), headers in v1_headers(), body in body(),
        error in prop::option::of((prop::option::of(any::<i32>()), text(), prop::option::of(text()))),
    ) {
        let message = V1Message::Response(HttpTunnelResponse {
            request_id: id, status_code: status, headers, body,
            error: error.map(|(code, message, details)| TunnelError {
                code, message, details: details.map(serde_json::Value::String),
            }),
        });
        prop_assert_eq!(decode_v1(&encode_v1(&message)).expect("decodes"), message);
    }

    /// Arbitrary payloads behind a valid header of every known (and some unknown) type reach
    /// the field parsers and never panic; what decodes re-encodes to a frame that decodes the
    /// same (flags bits other than bit 0 are dropped, so bytes may differ).
    #[test]
    fn v2_arbitrary_payloads_never_panic(
        kind in 0u8..=12, stream in any::<u32>(), payload in prop::collection::vec(any::<u8>(), 0..128),
    ) {
        let bytes = valid_header(kind, stream, &payload);
        if let Ok(frame) = v2::decode(&bytes, Limits::default()) {
            let again = v2::to_vec(&frame);
            prop_assert_eq!(v2::decode(&again, Limits::default()), Ok(frame));
        }
    }

    /// Flipping any byte of a valid frame never panics the decoder.
    #[test]
    fn v2_mutated_frames_never_panic(
        reason in text(), index in any::<prop::sample::Index>(), byte in any::<u8>(),
    ) {
        let mut bytes = v2::to_vec(&Frame::RequestHead {
            stream: 1, method: "GET".into(), target: "k8s".into(), path: "/api".into(),
            query: reason, headers: vec![("Accept".into(), "*/*".into())], end_stream: true,
        });
        let i = index.index(bytes.len());
        bytes[i] = byte;
        let _ = v2::decode(&bytes, Limits::default());
    }
}

//! v2 binary frames: `decode`, `decode_shared` and the `Frames` reader never panic, agree with
//! each other, respect the limits, and what decodes re-encodes (`encode`, `try_encode`) to a frame
//! of the same length that decodes to the same value.
#![no_main]

use buildplane_tunnel::v2::{self, DecodeError, Frame, Frames, Limits};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

/// A frame limit small enough that ordinary inputs cross it.
const SMALL: usize = 64;

fn check_round_trip(frame: &Frame, input_len: usize, limits: Limits) {
    let wire = v2::to_vec(frame);
    assert_eq!(
        wire.len(),
        input_len,
        "re-encoding {frame:?} changed its length"
    );
    assert_eq!(v2::decode(&wire, limits).as_ref(), Ok(frame), "round trip");
    // A frame the peer could decode is one `try_encode` accepts under the same limits.
    let mut strict = Vec::new();
    v2::try_encode(frame, &mut strict, limits).expect("try_encode of a decoded frame");
    assert_eq!(strict, wire, "try_encode and encode disagree");
}

fuzz_target!(|data: &[u8]| {
    let bytes = Bytes::copy_from_slice(data);
    for limits in [Limits::default(), Limits::with_max_frame(SMALL)] {
        let decoded = v2::decode(data, limits);
        let shared = v2::decode_shared(&bytes, limits);
        // They may name a different truncated field, but agree on what is a frame.
        assert_eq!(
            decoded.as_ref().ok(),
            shared.as_ref().ok(),
            "decode and decode_shared disagree"
        );
        match &decoded {
            Ok(frame) => check_round_trip(frame, data.len(), limits),
            Err(DecodeError::TooLarge { len, limit }) => assert!(len > limit),
            Err(_) => {}
        }

        // The frames of one message: each is what `decode` makes of its bytes; an error ends it.
        let mut offset = 0;
        let mut frames = Frames::new(bytes.clone(), limits);
        let mut count = 0usize;
        for item in frames.by_ref() {
            count += 1;
            match item {
                Ok(frame) => {
                    let wire = v2::to_vec(&frame);
                    offset += wire.len();
                    assert!(offset <= data.len());
                }
                Err(_) => {
                    assert!(offset < data.len(), "an error with no bytes left");
                    break;
                }
            }
        }
        assert!(
            frames.next().is_none(),
            "frames go on after an error or the end"
        );
        assert!(count <= data.len() / v2::HEADER_LEN + 1);
        if count == 1 && decoded.is_ok() {
            assert_eq!(offset, data.len());
        }
    }

    // What passes the small limit passes the default one, as the same frame.
    if let Ok(frame) = v2::decode(data, Limits::with_max_frame(SMALL)) {
        assert_eq!(v2::decode(data, Limits::default()), Ok(frame));
    }
});

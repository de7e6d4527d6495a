//! v1 JSON messages: `decode` never panics, honours its size limit, and what decodes survives
//! `encode` and a second `decode` unchanged.
#![no_main]

use buildplane_tunnel::v1::{self, DecodeError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let decoded = v1::decode(text, v1::DEFAULT_MAX_MESSAGE);
    assert_eq!(
        format!("{decoded:?}"),
        format!("{:?}", buildplane_tunnel::decode_v1(text)),
        "decode_v1 is decode with the default limit"
    );

    // A limit below the text's length refuses it before parsing; one at its length does not.
    let tight = text.len() / 2;
    match v1::decode(text, tight) {
        Err(DecodeError::TooLarge { len, limit }) => {
            assert!(len == text.len() && limit == tight && len > limit)
        }
        other => {
            assert!(text.len() <= tight, "a text over the limit was not refused");
            assert_eq!(format!("{other:?}"), format!("{decoded:?}"));
        }
    }
    if !text.is_empty() {
        let exact = v1::decode(text, text.len());
        assert_eq!(format!("{exact:?}"), format!("{decoded:?}"));
    }

    if let Ok(message) = decoded {
        let encoded = buildplane_tunnel::encode_v1(&message);
        let again = v1::decode(&encoded, v1::DEFAULT_MAX_MESSAGE)
            .unwrap_or_else(|err| panic!("re-decoding {encoded:?} failed: {err}"));
        assert_eq!(again, message, "round trip through {encoded:?}");
    }
});

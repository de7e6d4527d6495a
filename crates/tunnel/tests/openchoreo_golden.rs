//! Golden files of every v1 message shape OpenChoreo v1.2.3 sends (`test_data/openchoreo-v1.2.3`):
//! each decodes to the kind its receivers would see, what we understand of it is snapshotted,
//! and our encoder writes the same bytes back. A codec change that breaks compatibility with
//! OpenChoreo's gateway or agent fails here.

use buildplane_tunnel::v1::{self, Message};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/test_data/openchoreo-v1.2.3");

/// Every golden file, sorted by name: (name without `.json`, text without the newline).
fn goldens() -> Vec<(String, String)> {
    let mut files: Vec<(String, String)> = std::fs::read_dir(DIR)
        .unwrap_or_else(|e| panic!("{DIR}: {e}"))
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let name = path
                .file_name()?
                .to_str()?
                .strip_suffix(".json")?
                .to_owned();
            let text = std::fs::read_to_string(&path).ok()?;
            Some((name, text.trim_end_matches('\n').to_owned()))
        })
        .collect();
    files.sort();
    assert_eq!(
        files.len(),
        18,
        "the golden files of every shape are present"
    );
    files
}

/// The kind a golden file must decode to, from its name.
fn expected_kind(name: &str) -> &'static str {
    match name {
        n if n.contains("stream-init") => "StreamInit",
        n if n.contains("stream-chunk") => "StreamChunk",
        n if n.starts_with("gateway-request") => "Request",
        _ => "Response",
    }
}

fn kind(message: &Message) -> &'static str {
    match message {
        Message::Request(_) => "Request",
        Message::Response(_) => "Response",
        Message::StreamChunk(_) => "StreamChunk",
        Message::StreamInit(_) => "StreamInit",
        _ => "unknown",
    }
}

/// The decoded message for a snapshot, its bytes (body, stream data) shown as text.
fn readable(mut message: Message) -> String {
    let bytes = match &mut message {
        Message::Request(request) => request.body.take(),
        Message::Response(response) => response.body.take(),
        Message::StreamChunk(chunk) => chunk.data.take(),
        _ => None,
    };
    let shown = bytes.map(|b| String::from_utf8_lossy(&b).into_owned());
    format!("{message:#?}\nbytes (body or data, taken out above): {shown:?}\n")
}

/// Each of OpenChoreo's messages decodes to the kind its own receivers take it for (stream
/// init, then stream chunk, then response or request), and what we read of it is the snapshot.
#[test]
fn openchoreo_messages_decode_to_their_kind() {
    for (name, text) in goldens() {
        let message =
            v1::decode(&text, v1::DEFAULT_MAX_MESSAGE).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(kind(&message), expected_kind(&name), "{name}");
        insta::assert_snapshot!(name.clone(), readable(message));
    }
}

/// Our encoder writes OpenChoreo's bytes: Go's field order, `omitempty`, `null` stream data,
/// base64 bodies, and Go's escapes of `<`, `>` and `&`.
#[test]
fn our_encoding_is_byte_identical_to_openchoreos() {
    for (name, text) in goldens() {
        let message =
            v1::decode(&text, v1::DEFAULT_MAX_MESSAGE).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(v1::encode(&message), text, "{name}");
    }
}

/// `error.details` is whatever JSON the peer sends (OpenChoreo's type is an object): it decodes
/// and keeps its value.
#[test]
fn error_details_may_be_an_object() {
    let text = std::fs::read_to_string(format!("{DIR}/agent-error-details.json")).unwrap();
    let Ok(Message::Response(response)) = v1::decode(&text, v1::DEFAULT_MAX_MESSAGE) else {
        panic!("a response")
    };
    let error = response.error.expect("an error");
    assert_eq!(error.code, Some(500));
    assert_eq!(
        error.details,
        Some(serde_json::json!({"attempts": 1, "method": "GET\n", "retryable": false}))
    );
}

/// Header names in the messages we send are Go's canonical keys, which OpenChoreo's
/// `http.Header.Get` finds; names with characters outside a token stay as they are.
#[test]
fn header_keys_are_canonicalised_as_go_does() {
    for (name, canonical) in [
        ("content-type", "Content-Type"),
        ("x-request-id", "X-Request-Id"),
        ("ACCEPT", "Accept"),
        ("www-authenticate", "Www-Authenticate"),
        ("a--b", "A--B"),
        ("with space", "with space"),
        ("", ""),
    ] {
        assert_eq!(v1::canonical_header_key(name), canonical, "{name:?}");
    }
}

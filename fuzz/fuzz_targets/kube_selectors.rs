//! kube-sim's request parsers: label and field selectors, continue tokens, `fieldValidation`,
//! patch content types, `DeleteOptions` bodies, the protobuf decoder and the strategic merge
//! patch. None panics; refusals are 400s; continue tokens round-trip; an empty strategic patch
//! changes nothing.
//!
//! Every input goes to every parser (text ones when it is UTF-8); for the strategic patch the
//! input is `original\npatch`, two JSON documents.
#![no_main]

use std::sync::LazyLock;

use kube_sim::api::{self, DeleteOptions, FieldValidation, PatchKind};
use kube_sim::selector::{FieldSelector, LabelSelector};
use kube_sim::store::{ObjectKey, ResourceKey};
use kube_sim::{protobuf, strategic};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

/// Objects the parsed selectors are matched against.
static OBJECTS: LazyLock<Vec<Value>> = LazyLock::new(|| {
    vec![
        json!({}),
        json!({"metadata": {"name": "web-0", "namespace": "build",
            "labels": {"app": "web", "tier": "front", "": "", "a/b": "c"}},
            "spec": {"nodeName": "node-1"}, "status": {"phase": "Running"}}),
        json!({"metadata": {"name": "e", "labels": null}, "involvedObject": {"kind": "Pod"},
            "source": {"component": "kubelet"}, "type": 7}),
    ]
});

fn selectors(text: &str) {
    match LabelSelector::parse(text) {
        Ok(selector) => OBJECTS.iter().for_each(|o| {
            let _ = selector.matches(o);
        }),
        Err(err) => assert_eq!(err.code, 400, "{err:?}"),
    }
    for (group, plural) in [("", ""), ("", "pods"), ("", "events"), ("", "secrets")] {
        match FieldSelector::parse_for(text, group, plural) {
            Ok(selector) => OBJECTS.iter().for_each(|o| {
                let _ = selector.matches(o);
            }),
            Err(err) => assert_eq!(err.code, 400, "{err:?}"),
        }
    }
    assert_eq!(
        FieldSelector::parse(text).is_ok(),
        FieldSelector::parse_for(text, "", "").is_ok()
    );
}

fn tokens(text: &str) {
    let resource = ResourceKey {
        group: "apps".into(),
        plural: "deployments".into(),
    };
    if let Err(err) = api::decode_continue(text, &resource) {
        assert_eq!(err.code, 400, "{err:?}");
    }
    // Any key survives a continue token.
    let (namespace, name) = text.split_once('/').unwrap_or(("", text));
    let key = ObjectKey {
        resource: resource.clone(),
        namespace: namespace.into(),
        name: name.into(),
    };
    let token = api::encode_continue(&key, text.len() as u64);
    assert_eq!(api::decode_continue(&token, &resource).ok(), Some(key));

    let _ = FieldValidation::parse(Some(text));
    let _ = PatchKind::from_content_type(text);
}

fn strategic_patch(text: &str) {
    let Some((original, patch)) = text.split_once('\n') else {
        return;
    };
    let (Ok(original), Ok(patch)) = (
        serde_json::from_str::<Value>(original),
        serde_json::from_str::<Value>(patch),
    ) else {
        return;
    };
    if let Ok(merged) = strategic::apply(&original, &patch) {
        assert!(merged.is_object(), "a patched object is an object");
    }
    if original.is_object() {
        let same = strategic::apply(&original, &json!({})).expect("an empty patch applies");
        assert_eq!(same, original, "an empty patch changes nothing");
    }
    let _ = strategic::strip_directives(&patch);
}

fuzz_target!(|data: &[u8]| {
    if let Ok(object) = protobuf::decode(data) {
        assert!(object.is_object());
    }
    let _ = DeleteOptions::from_body(data, false);
    if let Ok(text) = std::str::from_utf8(data) {
        selectors(text);
        tokens(text);
        strategic_patch(text);
    }
});

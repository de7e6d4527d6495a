//! The gateway's proxy path policy: `check` never panics, and no path it forwards reaches a
//! denied resource once an independent model resolves it as a server behind the agent might
//! (percent-decoding, empty and `.` segments, `..`, the legacy `watch/` segment).
//!
//! Input: a path, checked against the default policy; or `rules\npath`, where `rules` are
//! comma-separated `--proxy-deny` values, checked against the policy they build.
#![no_main]

use std::sync::LazyLock;

use cluster_gateway::policy::{DEFAULT_DENY, ProxyPolicy, Refusal};
use libfuzzer_sys::fuzz_target;

static DEFAULT: LazyLock<ProxyPolicy> = LazyLock::new(ProxyPolicy::default);

/// Percent-decodes until nothing changes (a server further on may decode again).
fn percent_decode(text: &str) -> String {
    let mut current = text.to_owned();
    for _ in 0..8 {
        let bytes = current.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if bytes[i] == b'%'
                && i + 2 < bytes.len()
                && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
            {
                out.push((h * 16 + l) as u8);
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        let next = String::from_utf8_lossy(&out).into_owned();
        if next == current {
            break;
        }
        current = next;
    }
    current
}

/// The segments a path addresses, resolved independently of the policy's own code.
fn model(path: &str) -> Vec<String> {
    let decoded = percent_decode(path);
    let mut segments: Vec<String> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            other => segments.push(other.to_owned()),
        }
    }
    let watch_at = match segments.first().map(String::as_str) {
        Some("api") => 2,
        Some("apis") => 3,
        _ => return segments,
    };
    if segments.get(watch_at).map(String::as_str) == Some("watch") {
        segments.remove(watch_at);
    }
    segments
}

/// Whether `rule` (segments, `*` for any one) names `segments` or a path above them.
fn covers(rule: &str, segments: &[String]) -> bool {
    let rule: Vec<&str> = rule.split('/').filter(|s| !s.is_empty()).collect();
    rule.len() <= segments.len() && rule.iter().zip(segments).all(|(r, s)| *r == "*" || r == s)
}

/// Checks `path` against `policy`, whose rules (as written) are `rules`.
fn check(policy: &ProxyPolicy, rules: &[String], path: &str) {
    match policy.check(path) {
        Ok(forwarded) => {
            for target in [path, forwarded.as_str()] {
                let addressed = model(target);
                for rule in rules {
                    assert!(
                        !covers(rule, &addressed),
                        "{path:?} forwarded as {forwarded:?} addresses {addressed:?}, denied by {rule}"
                    );
                }
            }
            // The forwarded path is already normal: checking it again forwards it unchanged.
            assert_eq!(policy.check(&forwarded), Ok(forwarded.clone()));
            assert!(forwarded.starts_with('/'));
        }
        Err(Refusal::Blocked { rule }) => {
            assert!(rules.contains(&rule), "blocked by {rule}, not a rule");
        }
        Err(Refusal::Invalid(_)) => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let defaults: Vec<String> = DEFAULT_DENY.iter().map(|r| (*r).to_owned()).collect();
    check(&DEFAULT, &defaults, text);

    if let Some((flags, path)) = text.split_once('\n') {
        let values: Vec<&str> = flags.split(',').collect();
        if let Ok(policy) = ProxyPolicy::from_flags(&values) {
            let rules: Vec<String> = policy.rules().iter().map(ToString::to_string).collect();
            check(&policy, &rules, path);
            // No rule lets the path it names through (a `*` segment stands for any segment).
            for rule in &rules {
                let named: Vec<&str> = rule
                    .split('/')
                    .map(|s| if s == "*" { "x" } else { s })
                    .collect();
                let named = named.join("/");
                // A rule naming a path no request may spell (`a..b`) is refused as invalid.
                assert!(
                    policy.check(&named).is_err(),
                    "{named:?} forwarded despite {rule}"
                );
            }
        }
    }
});

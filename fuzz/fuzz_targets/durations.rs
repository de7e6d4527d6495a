//! Duration flags and `Retry-After`: the parsers never panic, every result lies within its
//! bounds (`MAX_DURATION`, the caller's range, `MAX_RETRY_AFTER`), and a parsed duration written
//! back in milliseconds parses to itself.
#![no_main]

use std::time::Duration;

use buildplane_runtime::duration::{
    MAX_DURATION, parse_duration, parse_duration_in, parse_positive_duration,
};
use cluster_agent::backoff::{Backoff, MAX_RETRY_AFTER, parse_retry_after};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };

    let any = parse_duration(text);
    if let Ok(d) = any {
        assert!(d <= MAX_DURATION, "{text:?} parsed to {d:?}");
        if d.subsec_nanos() % 1_000_000 == 0 {
            let written = format!("{}ms", d.as_millis());
            assert_eq!(parse_duration(&written), Ok(d), "{text:?} as {written:?}");
        }
    }
    match parse_positive_duration(text) {
        Ok(d) => {
            assert!(!d.is_zero() && d <= MAX_DURATION);
            assert_eq!(any.as_ref().ok(), Some(&d), "positive agrees with any");
        }
        Err(_) => assert!(any.as_ref().map_or(true, Duration::is_zero)),
    }
    let (min, max) = (Duration::from_millis(250), Duration::from_secs(3600));
    match parse_duration_in(text, min, max) {
        Ok(d) => {
            assert!(min <= d && d <= max, "{text:?} parsed to {d:?}");
            assert_eq!(any.as_ref().ok(), Some(&d));
        }
        Err(_) => assert!(any.as_ref().map_or(true, |d| *d < min || *d > max)),
    }

    let retry = parse_retry_after(text);
    if let Some(after) = retry {
        assert!(after <= MAX_RETRY_AFTER, "{text:?} gave {after:?}");
    }
    // Honouring it adds jitter of at most as much again, and never exceeds the backoff's cap
    // when there is no Retry-After.
    let cap = Duration::from_secs(30);
    let mut backoff = Backoff::new(Duration::from_millis(500), cap);
    for status in [401, 429, 503] {
        let delay = backoff.after_refusal(status, retry);
        assert!(
            delay <= (MAX_RETRY_AFTER * 2).max(cap),
            "{status} with {retry:?} waits {delay:?}"
        );
    }

    // The harness's own duration syntax (scenario files) and its helpers.
    if let Ok(d) = text.parse::<buildplane_harness::duration::Dur>() {
        let _ = buildplane_harness::duration::pretty(d.into());
    }
    let floor = buildplane_harness::duration::char_floor(text, data.len() / 2);
    assert!(floor <= text.len() && text.is_char_boundary(floor));
});

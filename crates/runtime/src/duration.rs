//! Duration flags: `500ms`, `15s`, `2m`, `1h`, `1d`, or a bare number of seconds, parsed exactly
//! (no floating point) and bounded, so no flag can make a timer panic.
//!
//! `tokio::time::interval` panics on a zero period and `Instant + Duration` panics on overflow:
//! [`parse_positive_duration`] refuses both at the command line, where the message names the
//! flag, instead of in a task hours later.

use std::time::Duration;

/// The longest duration a flag takes (100 years): far beyond any sensible interval or validity,
/// far below what `Instant + Duration` overflows at.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 86_400);

/// Why a duration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// Not a number followed by a known unit.
    #[error("invalid duration {text:?}: use a number with ms, s, m, h or d (e.g. 500ms, 15s, 1d)")]
    Invalid {
        /// The text given.
        text: String,
    },
    /// Longer than the bound.
    #[error("duration {text:?} is too long: at most {max:?}")]
    TooLong {
        /// The text given.
        text: String,
        /// The longest accepted.
        max: Duration,
    },
    /// Shorter than the bound (zero where a positive duration is needed).
    #[error("duration {text:?} is too short: at least {min:?}")]
    TooShort {
        /// The text given.
        text: String,
        /// The shortest accepted.
        min: Duration,
    },
}

/// Parses a duration from zero to [`MAX_DURATION`].
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    parse_duration_in(text, Duration::ZERO, MAX_DURATION)
}

/// Parses a duration above zero and at most [`MAX_DURATION`]: what every interval and timeout
/// flag takes.
pub fn parse_positive_duration(text: &str) -> Result<Duration, DurationError> {
    parse_duration_in(text, Duration::from_nanos(1), MAX_DURATION)
}

/// Parses a duration within `min..=max`.
pub fn parse_duration_in(
    text: &str,
    min: Duration,
    max: Duration,
) -> Result<Duration, DurationError> {
    let invalid = || DurationError::Invalid {
        text: text.to_owned(),
    };
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let nanos_per_unit: u128 = match unit {
        "ms" => 1_000_000,
        "" | "s" => 1_000_000_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        "d" => 86_400_000_000_000,
        _ => return Err(invalid()),
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() {
        return Err(invalid());
    }
    let digits = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || !digits(fraction) {
        return Err(invalid());
    }
    let too_long = || DurationError::TooLong {
        text: text.to_owned(),
        max,
    };
    // Digits beyond the nanosecond are dropped; a whole part this long is too long anyway.
    let whole: u128 = if whole.is_empty() {
        0
    } else if whole.len() > 30 {
        return Err(too_long());
    } else {
        whole.parse().map_err(|_| invalid())?
    };
    let fraction = &fraction[..fraction.len().min(18)];
    let fraction_nanos = if fraction.is_empty() {
        0
    } else {
        let value: u128 = fraction.parse().map_err(|_| invalid())?;
        value * nanos_per_unit / 10u128.pow(fraction.len() as u32)
    };
    let nanos = whole
        .checked_mul(nanos_per_unit)
        .and_then(|n| n.checked_add(fraction_nanos))
        .ok_or_else(too_long)?;
    let duration = u64::try_from(nanos / 1_000_000_000)
        .map(|secs| Duration::new(secs, (nanos % 1_000_000_000) as u32))
        .map_err(|_| too_long())?;
    if duration > max {
        return Err(too_long());
    }
    if duration < min {
        return Err(DurationError::TooShort {
            text: text.to_owned(),
            min,
        });
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every unit, decimals and bare seconds parse exactly.
    #[test]
    fn parses_every_unit_exactly() {
        let cases = [
            ("500ms", Duration::from_millis(500)),
            ("15s", Duration::from_secs(15)),
            ("15", Duration::from_secs(15)),
            (" 2m ", Duration::from_secs(120)),
            ("1h", Duration::from_secs(3600)),
            ("1d", Duration::from_secs(86_400)),
            ("1.5s", Duration::from_millis(1500)),
            ("0.1s", Duration::from_millis(100)),
            (".25h", Duration::from_secs(900)),
            ("2.5ms", Duration::from_micros(2500)),
            ("0s", Duration::ZERO),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_duration(text), Ok(expected), "{text}");
        }
    }

    /// Garbage, negative numbers and unknown units are refused with the accepted forms.
    #[test]
    fn rejects_malformed_durations() {
        for text in [
            "", "s", "-1s", "1x", "1.2.3s", "1e3s", "ms", ".", "1 s", "NaN",
        ] {
            let err = parse_duration(text).expect_err(text);
            assert!(
                matches!(err, DurationError::Invalid { .. }),
                "{text}: {err}"
            );
            assert!(err.to_string().contains("ms, s, m, h or d"), "{err}");
        }
    }

    /// A positive duration refuses zero (which panics `tokio::time::interval`) with a clear
    /// message, and accepts the smallest positive value.
    #[test]
    fn positive_duration_rejects_zero() {
        for text in ["0s", "0", "0ms", "0.0h", "0.0000000001s"] {
            let err = parse_positive_duration(text).expect_err(text);
            assert!(
                matches!(err, DurationError::TooShort { .. }),
                "{text}: {err}"
            );
            assert!(err.to_string().contains("too short"), "{err}");
        }
        assert_eq!(
            parse_positive_duration("0.000000001s"),
            Ok(Duration::from_nanos(1))
        );
    }

    /// Huge values are refused instead of overflowing `Instant + Duration` (or panicking in
    /// `Duration::from_secs_f64`, as the parser this replaces did).
    #[test]
    fn rejects_durations_beyond_the_bound() {
        let huge = format!("{}s", u64::MAX);
        for text in [
            "36501d",
            "999999999999999999999999999999999999d",
            "99999999999999999999999999d",
            huge.as_str(),
        ] {
            let err = parse_positive_duration(text).expect_err(text);
            assert!(
                matches!(err, DurationError::TooLong { .. }),
                "{text}: {err}"
            );
        }
        assert_eq!(parse_duration("36500d"), Ok(MAX_DURATION));
        let now = std::time::SystemTime::UNIX_EPOCH;
        assert!(now.checked_add(MAX_DURATION).is_some());
    }

    /// A custom range reports its own bounds.
    #[test]
    fn custom_range_reports_its_bounds() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(300);
        assert_eq!(
            parse_duration_in("50ms", min, max),
            Err(DurationError::TooShort {
                text: "50ms".into(),
                min
            })
        );
        assert_eq!(
            parse_duration_in("6m", min, max),
            Err(DurationError::TooLong {
                text: "6m".into(),
                max
            })
        );
        assert_eq!(parse_duration_in("5m", min, max), Ok(max));
    }
}

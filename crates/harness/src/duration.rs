//! Human-readable durations (`500ms`, `5s`, `2m`, `1h30m`) for scenario files.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration written as in Go or Kubernetes: a sequence of `<number><unit>` with units
/// `ms`, `s`, `m`, `h` (for example `1m30s`, `250ms`, `0.5s`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Dur(pub Duration);

/// Why a duration string could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid duration `{input}`: {reason} (expected e.g. `500ms`, `5s`, `2m`, `1h30m`)")]
pub struct DurationError {
    input: String,
    reason: &'static str,
}

impl Dur {
    /// Builds a duration from whole seconds.
    pub const fn secs(secs: u64) -> Dur {
        Dur(Duration::from_secs(secs))
    }

    /// Builds a duration from milliseconds.
    pub const fn millis(ms: u64) -> Dur {
        Dur(Duration::from_millis(ms))
    }
}

impl From<Dur> for Duration {
    fn from(dur: Dur) -> Duration {
        dur.0
    }
}

impl FromStr for Dur {
    type Err = DurationError;

    fn from_str(input: &str) -> Result<Dur, DurationError> {
        let err = |reason| DurationError {
            input: input.to_string(),
            reason,
        };
        let text = input.trim();
        if text.is_empty() {
            return Err(err("empty"));
        }
        if text == "0" {
            return Ok(Dur(Duration::ZERO));
        }
        let mut total = 0f64;
        let mut rest = text;
        while !rest.is_empty() {
            let n_digits = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .ok_or_else(|| err("missing unit"))?;
            if n_digits == 0 {
                return Err(err("expected a number"));
            }
            let number: f64 = rest[..n_digits].parse().map_err(|_| err("bad number"))?;
            rest = &rest[n_digits..];
            let n_unit = rest
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(rest.len());
            let factor = match &rest[..n_unit] {
                "ms" => 0.001,
                "s" => 1.0,
                "m" => 60.0,
                "h" => 3600.0,
                _ => return Err(err("unknown unit")),
            };
            rest = &rest[n_unit..];
            total += number * factor;
        }
        // `from_secs_f64` panics past `Duration::MAX` (a long enough number is even infinite).
        Duration::try_from_secs_f64(total)
            .map(Dur)
            .map_err(|_| err("too long"))
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms == 0 {
            write!(f, "0s")
        } else if ms.is_multiple_of(60_000) {
            write!(f, "{}m", ms / 60_000)
        } else if ms.is_multiple_of(1000) {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Dur, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl schemars::JsonSchema for Dur {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": "^([0-9]+(\\.[0-9]+)?(ms|s|m|h))+$|^0$",
            "description": "A duration such as `500ms`, `5s`, `2m` or `1h30m`."
        })
    }
}

/// The largest char boundary at or below `n` (`str::floor_char_boundary` needs a newer Rust).
pub fn char_floor(text: &str, n: usize) -> usize {
    let mut n = n.min(text.len());
    while !text.is_char_boundary(n) {
        n -= 1;
    }
    n
}

/// Formats a std duration the way reports show it (`1.23s`, `45ms`).
pub fn pretty(duration: Duration) -> String {
    if duration.as_millis() < 1000 {
        format!("{}ms", duration.as_millis())
    } else {
        format!("{:.2}s", duration.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every unit and compound form parses to the expected length.
    #[test]
    fn parses_units_and_compounds() {
        let check = |text: &str, ms: u64| {
            assert_eq!(text.parse::<Dur>().unwrap(), Dur::millis(ms), "{text}")
        };
        check("500ms", 500);
        check("5s", 5000);
        check("0.5s", 500);
        check("2m", 120_000);
        check("1h30m", 5_400_000);
        check("1m30s", 90_000);
        check("0", 0);
    }

    /// Numbers without units, unknown units and empty strings are rejected with the input named.
    #[test]
    fn rejects_missing_or_unknown_units() {
        for bad in ["5", "5 sec", "", "s", "3d"] {
            let err = bad.parse::<Dur>().unwrap_err();
            assert!(err.to_string().contains(&format!("`{bad}`")), "{err}");
        }
    }

    /// A number too large for a `Duration` is an error, not a panic (found by fuzzing).
    #[test]
    fn rejects_durations_beyond_the_largest() {
        let huge = format!("{}h", "9".repeat(400));
        for bad in [
            "666666666666666666666s",
            "1000000000000000000h",
            huge.as_str(),
        ] {
            let err = bad.parse::<Dur>().unwrap_err();
            assert!(err.to_string().contains("too long"), "{err}");
        }
    }

    /// Display round-trips through parsing.
    #[test]
    fn display_round_trips() {
        for text in ["250ms", "5s", "2m", "90s"] {
            let dur: Dur = text.parse().unwrap();
            assert_eq!(dur.to_string().parse::<Dur>().unwrap(), dur);
        }
    }
}

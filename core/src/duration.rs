//! The one way every command line of the project reads a duration.
//!
//! A duration is one or more numbers, each with a unit: `250ms`, `5s`, `1.5s`, `1m30s`,
//! `1h 30m`, `2h`, `0s` (the forms of the `humantime` crate). A bare number is refused: the Node
//! original's `acquireInterval` is in milliseconds while most tools read seconds, so `5` would
//! be a guess either way. Units: `ns`, `us`/`µs`, `ms`, `s`, `m`, `h`, `d`, `w`, `M` (30.44 d),
//! `y` (365.25 d), and their long names (`msec`, `sec`, `secs`, `min`, `mins`, `hours`, ...).
//! A duration is at most [`MAX_DURATION`] and a whole number of microseconds, the resolution
//! of every clock here.

use std::time::Duration;

/// The longest duration [`parse_duration`] accepts: 10 000 days.
pub const MAX_DURATION: Duration = Duration::from_secs(10_000 * 86_400);

/// Why a text is not a duration. The messages are the ones every CLI of the project prints.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DurationError {
    /// Nothing but whitespace.
    #[error("empty duration: write e.g. 5s or 250ms")]
    Empty,
    /// A number with no unit, such as `5`.
    #[error("`{number}` has no unit: write {number}s or {number}ms")]
    NoUnit {
        /// The number as written.
        number: String,
    },
    /// A leading minus sign.
    #[error("`{text}` is negative: a duration is 0s or more")]
    Negative {
        /// The text as written (trimmed).
        text: String,
    },
    /// A unit that is none of the known ones.
    #[error("`{unit}` in `{text}` is not a unit: use ns, us, ms, s, m, h, d or w")]
    UnknownUnit {
        /// The text as written (trimmed).
        text: String,
        /// The unknown unit.
        unit: String,
    },
    /// Neither a number with a unit nor a sequence of them.
    #[error("`{text}` is not a duration: write a number and a unit, e.g. 250ms, 5s, 1m30s, 2h")]
    Invalid {
        /// The text as written (trimmed).
        text: String,
    },
    /// More than [`MAX_DURATION`].
    #[error("`{text}` is too large: at most 10000d")]
    TooLarge {
        /// The text as written (trimmed).
        text: String,
    },
    /// Not a whole number of microseconds.
    #[error("`{text}` is finer than a microsecond, the resolution of every clock here")]
    TooPrecise {
        /// The text as written (trimmed).
        text: String,
    },
}

/// Nanoseconds per `unit`, for the units `humantime` knows.
fn unit_nanos(unit: &str) -> Option<u128> {
    const SECOND: u128 = 1_000_000_000;
    Some(match unit {
        "nanos" | "nsec" | "ns" => 1,
        "usec" | "us" | "µs" => 1_000,
        "millis" | "msec" | "ms" => 1_000_000,
        "seconds" | "second" | "secs" | "sec" | "s" => SECOND,
        "minutes" | "minute" | "min" | "mins" | "m" => 60 * SECOND,
        "hours" | "hour" | "hr" | "hrs" | "h" => 3_600 * SECOND,
        "days" | "day" | "d" => 86_400 * SECOND,
        "weeks" | "week" | "wk" | "wks" | "w" => 7 * 86_400 * SECOND,
        "months" | "month" | "M" => 2_630_016 * SECOND,
        "years" | "year" | "yr" | "yrs" | "y" => 31_557_600 * SECOND,
        _ => return None,
    })
}

/// Parses a duration by the project's one rule, which every command line of the project uses.
///
/// One or more numbers, each with a unit: `250ms`, `5s`, `1.5s`, `1m30s`, `1h 30m`, `2h`, `0s`
/// (the forms of the `humantime` crate). A bare number is refused: the Node original's
/// `acquireInterval` is in milliseconds while most tools read seconds, so `5` would be a guess
/// either way. Units: `ns`, `us`/`µs`, `ms`, `s`, `m`, `h`, `d`, `w`, `M` (30.44 d), `y`
/// (365.25 d), and their long names (`msec`, `sec`, `secs`, `min`, `mins`, `hours`, ...). The
/// result is at most [`MAX_DURATION`] and a whole number of microseconds, the resolution of
/// every clock here.
///
/// Never panics; every refusal is a [`DurationError`] whose message says what to write.
///
/// ```
/// use pgiplock_core::{parse_duration, DurationError};
/// use std::time::Duration;
///
/// assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
/// assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
/// assert_eq!(parse_duration(" 1h 30m "), Ok(Duration::from_secs(5_400)));
/// let bare = parse_duration("5").unwrap_err();
/// assert_eq!(bare, DurationError::NoUnit { number: "5".into() });
/// assert_eq!(bare.to_string(), "`5` has no unit: write 5s or 5ms");
/// ```
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let text = text.trim();
    let owned = || text.to_owned();
    if text.is_empty() {
        return Err(DurationError::Empty);
    }
    if text.starts_with('-') {
        return Err(DurationError::Negative { text: owned() });
    }
    let max_nanos = MAX_DURATION.as_nanos();
    let mut total: u128 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        if int_len == 0 {
            return Err(DurationError::Invalid { text: owned() });
        }
        let (int, after) = rest.split_at(int_len);
        let (fraction, after) = match after.strip_prefix('.') {
            Some(digits) => {
                let len = digits.bytes().take_while(u8::is_ascii_digit).count();
                if len == 0 {
                    return Err(DurationError::Invalid { text: owned() });
                }
                digits.split_at(len)
            }
            None => ("", after),
        };
        let number = &rest[..rest.len() - after.len()];
        let after = after.trim_start();
        let unit_len = after
            .char_indices()
            .find(|&(_, c)| !(c.is_ascii_alphabetic() || c == 'µ'))
            .map_or(after.len(), |(i, _)| i);
        let (unit, after) = after.split_at(unit_len);
        if unit.is_empty() {
            return Err(if after.is_empty() {
                DurationError::NoUnit {
                    number: number.to_owned(),
                }
            } else {
                DurationError::Invalid { text: owned() }
            });
        }
        let per = unit_nanos(unit).ok_or_else(|| DurationError::UnknownUnit {
            text: owned(),
            unit: unit.to_owned(),
        })?;
        // Digits only, so parsing fails only when the number overflows.
        let whole = int
            .parse::<u128>()
            .ok()
            .and_then(|n| n.checked_mul(per))
            .ok_or_else(|| DurationError::TooLarge { text: owned() })?;
        let mut nanos = whole;
        let digits = fraction.trim_end_matches('0');
        if !digits.is_empty() {
            // Twenty digits are finer than a nanosecond of any unit, and keep the product in range.
            if digits.len() > 20 {
                return Err(DurationError::TooPrecise { text: owned() });
            }
            let scale = 10u128.pow(digits.len() as u32);
            let scaled = digits.parse::<u128>().unwrap_or(0) * per;
            if scaled % scale != 0 {
                return Err(DurationError::TooPrecise { text: owned() });
            }
            nanos += scaled / scale;
        }
        total = total
            .checked_add(nanos)
            .filter(|&t| t <= max_nanos)
            .ok_or_else(|| DurationError::TooLarge { text: owned() })?;
        rest = after.trim_start();
    }
    if total % 1_000 != 0 {
        return Err(DurationError::TooPrecise { text: owned() });
    }
    // At most MAX_DURATION, so the microseconds fit in a u64.
    Ok(Duration::from_micros((total / 1_000) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table every CLI's test runs too: input, then the microseconds or the message.
    const CASES: &[(&str, Result<u64, &str>)] = include!("duration_cases.rs");

    #[test]
    fn the_shared_table_holds() {
        for &(input, expected) in CASES {
            let got = parse_duration(input)
                .map(|d| d.as_micros() as u64)
                .map_err(|e| e.to_string());
            assert_eq!(got, expected.map_err(str::to_owned), "input {input:?}");
        }
    }

    #[test]
    fn every_humantime_unit_name_is_known() {
        let names = [
            ("nanos", 1),
            ("nsec", 1),
            ("ns", 1),
            ("usec", 1_000),
            ("us", 1_000),
            ("µs", 1_000),
            ("millis", 1_000_000),
            ("msec", 1_000_000),
            ("ms", 1_000_000),
            ("seconds", 1_000_000_000),
            ("second", 1_000_000_000),
            ("secs", 1_000_000_000),
            ("sec", 1_000_000_000),
            ("s", 1_000_000_000),
            ("minutes", 60_000_000_000),
            ("minute", 60_000_000_000),
            ("mins", 60_000_000_000),
            ("min", 60_000_000_000),
            ("m", 60_000_000_000),
            ("hours", 3_600_000_000_000),
            ("hour", 3_600_000_000_000),
            ("hrs", 3_600_000_000_000),
            ("hr", 3_600_000_000_000),
            ("h", 3_600_000_000_000),
            ("days", 86_400_000_000_000),
            ("day", 86_400_000_000_000),
            ("d", 86_400_000_000_000),
            ("weeks", 604_800_000_000_000),
            ("week", 604_800_000_000_000),
            ("wks", 604_800_000_000_000),
            ("wk", 604_800_000_000_000),
            ("w", 604_800_000_000_000),
            ("months", 2_630_016_000_000_000),
            ("month", 2_630_016_000_000_000),
            ("M", 2_630_016_000_000_000),
            ("years", 31_557_600_000_000_000),
            ("year", 31_557_600_000_000_000),
            ("yrs", 31_557_600_000_000_000),
            ("yr", 31_557_600_000_000_000),
            ("y", 31_557_600_000_000_000),
        ];
        for (name, nanos) in names {
            assert_eq!(unit_nanos(name), Some(nanos), "{name}");
        }
        assert_eq!(unit_nanos("S"), None);
        assert_eq!(unit_nanos("mo"), None);
    }

    #[test]
    fn the_largest_accepted_duration_is_the_maximum() {
        assert_eq!(parse_duration("10000d"), Ok(MAX_DURATION));
        assert_eq!(parse_duration("9999d 24h"), Ok(MAX_DURATION));
        assert!(matches!(
            parse_duration("10000d 1us"),
            Err(DurationError::TooLarge { .. })
        ));
    }

    #[test]
    fn errors_name_the_text_as_written() {
        assert_eq!(
            parse_duration("  1m 30 "),
            Err(DurationError::NoUnit { number: "30".into() })
        );
        assert_eq!(
            parse_duration("5 parsecs"),
            Err(DurationError::UnknownUnit {
                text: "5 parsecs".into(),
                unit: "parsecs".into()
            })
        );
    }

    proptest::proptest! {
        /// Anything at all is answered without a panic, and what is accepted is in range.
        #[test]
        fn any_text_is_answered(text in "\\PC{0,24}") {
            if let Ok(d) = parse_duration(&text) {
                proptest::prop_assert!(d <= MAX_DURATION);
            }
        }

        /// Whole microseconds written in the sim's and the worker's style parse back exactly.
        #[test]
        fn written_durations_parse_back(micros in 0u64..=MAX_DURATION.as_micros() as u64) {
            let (secs, sub) = (micros / 1_000_000, micros % 1_000_000);
            let text = format!("{secs}s {sub}us");
            proptest::prop_assert_eq!(parse_duration(&text), Ok(Duration::from_micros(micros)));
            let text = format!("{secs}.{sub:06}s");
            proptest::prop_assert_eq!(parse_duration(&text), Ok(Duration::from_micros(micros)));
        }
    }
}

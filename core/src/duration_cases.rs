// The durations every command line of the project is tested with: the input, then the whole
// microseconds it means or the message it is refused with. Included by the tests of
// `pgiplock_core::parse_duration`, of `pgiplock` and of `pgiplock-sim`, so that both binaries
// are held to one table (not a module of the crate).
&[
    // Valid: numbers with units, alone or in sequence.
    ("5s", Ok(5_000_000)),
    ("250ms", Ok(250_000)),
    ("1m30s", Ok(90_000_000)),
    ("2h", Ok(7_200_000_000)),
    ("0s", Ok(0)),
    ("0ms", Ok(0)),
    ("1.5s", Ok(1_500_000)),
    ("1h 30m", Ok(5_400_000_000)),
    (" 15m ", Ok(900_000_000)),
    ("5 s", Ok(5_000_000)),
    ("250us", Ok(250)),
    ("1000ns", Ok(1)),
    ("1d", Ok(86_400_000_000)),
    ("2min 3sec", Ok(123_000_000)),
    ("10000d", Ok(864_000_000_000_000)),
    // Bare numbers: the unit is not guessed.
    ("5", Err("`5` has no unit: write 5s or 5ms")),
    ("0", Err("`0` has no unit: write 0s or 0ms")),
    ("30000", Err("`30000` has no unit: write 30000s or 30000ms")),
    ("1.5", Err("`1.5` has no unit: write 1.5s or 1.5ms")),
    ("1m 30", Err("`30` has no unit: write 30s or 30ms")),
    // Negative.
    ("-1s", Err("`-1s` is negative: a duration is 0s or more")),
    ("-5", Err("`-5` is negative: a duration is 0s or more")),
    // Empty.
    ("", Err("empty duration: write e.g. 5s or 250ms")),
    ("   ", Err("empty duration: write e.g. 5s or 250ms")),
    // Overflow.
    ("10001d", Err("`10001d` is too large: at most 10000d")),
    ("100y", Err("`100y` is too large: at most 10000d")),
    (
        "99999999999999999999999999999999999999999s",
        Err("`99999999999999999999999999999999999999999s` is too large: at most 10000d"),
    ),
    // Finer than the clocks.
    ("1ns", Err("`1ns` is finer than a microsecond, the resolution of every clock here")),
    ("0.5us", Err("`0.5us` is finer than a microsecond, the resolution of every clock here")),
    // Junk.
    ("soon", Err("`soon` is not a duration: write a number and a unit, e.g. 250ms, 5s, 1m30s, 2h")),
    ("ms", Err("`ms` is not a duration: write a number and a unit, e.g. 250ms, 5s, 1m30s, 2h")),
    ("5s!", Err("`5s!` is not a duration: write a number and a unit, e.g. 250ms, 5s, 1m30s, 2h")),
    ("1.s", Err("`1.s` is not a duration: write a number and a unit, e.g. 250ms, 5s, 1m30s, 2h")),
    (".5s", Err("`.5s` is not a duration: write a number and a unit, e.g. 250ms, 5s, 1m30s, 2h")),
    ("5x", Err("`x` in `5x` is not a unit: use ns, us, ms, s, m, h, d or w")),
    ("5S", Err("`S` in `5S` is not a unit: use ns, us, ms, s, m, h, d or w")),
]

//! The seed corpus, built deterministically: meaningful hand-made sequences plus a few seeded
//! random ones. `tests/replay.rs` checks that `corpus/` holds them (regenerate with
//! `PGIPLOCK_WRITE_CORPUS=1 cargo test -p pgiplock-fuzz`); the fuzzer adds its own finds beside.

use std::time::Duration;

use pgiplock_core::{AcquireReply, DbError, FenceToken, Marker, Reply, SplitMix64, StaleHolder, TerminateOutcome};

use crate::lock_events::{encode, IdChoice, SessionChoice, Step};

/// Header byte: Lease, short timings.
const LEASE: u8 = 0;
/// Header byte: Classic, short timings.
const CLASSIC: u8 = 1;
/// Header byte: Lease, default timings.
const LEASE_DEFAULTS: u8 = 2;
/// Header byte: Lease, zero jitter and timeouts (clamped).
const LEASE_ZERO: u8 = 4;
/// Header byte: Lease, a handover buffer of two messages.
const LEASE_TINY: u8 = 8;
/// Header byte: Lease, fence_margin = lease_ttl (never usable).
const LEASE_UNUSABLE: u8 = 12;
/// Header byte: Lease, short timings, the drain marker before the release
/// (`drain_in_release` off).
const LEASE_TWO_STEP: u8 = 16;

/// Delta bytes.
const NOW: u8 = 0;
const MS1: u8 = 10;
const MS20: u8 = 127; // 12.7 ms
const MS450: u8 = 136; // 9 * 50 ms
const MS1100: u8 = 149; // 22 * 50 ms
const S5: u8 = 227; // 100 * 50 ms
const BACK_1S: u8 = 249; // 10 * 100 ms backwards

const L: SessionChoice = SessionChoice::Latest;

fn reply(r: Reply) -> Step {
    Step::Result(IdChoice::Latest, Ok(r))
}

fn fail(e: DbError) -> Step {
    Step::Result(IdChoice::Latest, Err(e))
}

fn acquired(token: Option<u64>) -> Step {
    acquired_from(token, None)
}

fn acquired_from(token: Option<u64>, stale: Option<i32>) -> Step {
    reply(Reply::Acquire(AcquireReply {
        acquired: true,
        token: token.map(FenceToken),
        lease_remaining: None,
        stale_holder: stale.map(|pid| StaleHolder {
            pid,
            app: format!("app-{pid}"),
        }),
        ..AcquireReply::locked()
    }))
}

fn locked(remaining_ms: Option<u64>) -> Step {
    reply(Reply::Acquire(AcquireReply {
        acquired: false,
        token: None,
        lease_remaining: remaining_ms.map(Duration::from_millis),
        stale_holder: None,
        ..AcquireReply::locked()
    }))
}

fn marker(m: Marker) -> Step {
    Step::Marker(L, m.payload())
}

fn data(n: u8) -> Step {
    Step::Data(L, n)
}

fn t(n: u64) -> Option<FenceToken> {
    Some(FenceToken(n))
}

/// A hand-made input: file name, header byte, steps.
type Seed = (&'static str, u8, Vec<(u8, Step)>);

/// Session up, start, acquired with `token`.
fn holding(token: Option<u64>) -> Vec<(u8, Step)> {
    vec![(NOW, Step::SessionUpNext), (NOW, Step::Start), (MS1, acquired(token))]
}

fn with(mut head: Vec<(u8, Step)>, tail: Vec<(u8, Step)>) -> Vec<(u8, Step)> {
    head.extend(tail);
    head
}

/// The `lock_events` seed corpus: `(file name, bytes)`.
pub fn lock_events() -> Vec<(String, Vec<u8>)> {
    let mut corpus: Vec<Seed> = Vec::new();
    let renew_ok = |n: usize| -> Vec<(u8, Step)> {
        (0..n)
            .flat_map(|i| {
                [
                    (MS450, Step::Tick),
                    (MS1, reply(Reply::Renew { owned: true })),
                    (MS1, data(i as u8)),
                ]
            })
            .collect()
    };
    corpus.push(("lease_hold_and_renew", LEASE, with(holding(Some(1)), renew_ok(6))));
    corpus.push((
        "lease_graceful_release",
        LEASE_TWO_STEP,
        with(
            holding(Some(1)),
            vec![
                (MS1, data(1)),
                (MS1, Step::Release),
                (NOW, data(2)),
                (MS1, reply(Reply::Drained)),
                (NOW, data(3)),
                (MS1, marker(Marker::Draining(t(1)))),
                (NOW, data(4)),
                (MS1, reply(Reply::Release { released: true })),
                (MS1, marker(Marker::Released(t(1)))),
                (MS20, Step::Tick),
                (S5, Step::Tick),
                (MS1, acquired(Some(2))),
            ],
        ),
    ));
    corpus.push((
        "lease_release_as_drain_point",
        LEASE,
        with(
            holding(Some(1)),
            vec![
                (MS1, data(1)),
                (MS1, Step::Release),
                (NOW, data(2)),
                (MS1, reply(Reply::Release { released: true })),
                (NOW, data(3)),
                (MS1, marker(Marker::Released(t(1)))),
                (NOW, data(4)),
                (MS1, reply(Reply::Drained)),
                (MS20, Step::Tick),
                (S5, Step::Tick),
                (MS1, acquired(Some(2))),
            ],
        ),
    ));
    corpus.push((
        "lease_self_fence",
        LEASE,
        with(
            holding(Some(3)),
            (0..5)
                .flat_map(|_| [(MS450, Step::Tick), (MS1, fail(DbError::Failed("x".into())))])
                .chain([(NOW, data(9))])
                .collect(),
        ),
    ));
    corpus.push((
        "lease_request_timeout",
        LEASE,
        with(
            holding(Some(1)),
            vec![
                (MS450, Step::Tick),
                (MS1100, Step::Tick),
                (NOW, Step::SessionDown(L)),
                (MS1, reply(Reply::Renew { owned: true })),
                (MS1, Step::SessionUpNext),
                (MS20, Step::Tick),
                (MS1, acquired(Some(2))),
            ],
        ),
    ));
    corpus.push((
        "lease_standby_handover",
        LEASE,
        vec![
            (NOW, Step::SessionUpNext),
            (NOW, Step::Start),
            (MS1, locked(Some(1_500))),
            (MS1, data(1)),
            (MS1, marker(Marker::Draining(t(1)))),
            (NOW, data(2)),
            (NOW, data(3)),
            (MS1, marker(Marker::Released(t(1)))),
            (NOW, data(4)),
            (MS20, Step::Tick),
            (MS1, marker(Marker::Acquired(FenceToken(2)))),
            (NOW, data(5)),
            (MS1, acquired(Some(2))),
            (NOW, data(6)),
        ],
    ));
    corpus.push((
        "lease_peer_wins",
        LEASE,
        vec![
            (NOW, Step::SessionUpNext),
            (NOW, Step::Start),
            (MS1, locked(Some(1_500))),
            (MS1, marker(Marker::Released(t(1)))),
            (NOW, data(1)),
            (MS20, Step::Tick),
            (MS1, marker(Marker::Acquired(FenceToken(2)))),
            (MS1, locked(Some(2_000))),
            (NOW, data(2)),
            (S5, Step::Tick),
        ],
    ));
    corpus.push((
        "lease_superseded",
        LEASE,
        with(
            holding(Some(2)),
            vec![
                (MS1, marker(Marker::Acquired(FenceToken(2)))),
                (MS1, marker(Marker::Acquired(FenceToken(1)))),
                // A newer term's marker is only a warning; the renewal's answer ends the term.
                (MS1, marker(Marker::Acquired(FenceToken(5)))),
                (NOW, data(1)),
                (MS450, Step::Tick),
                (MS1, reply(Reply::Renew { owned: false })),
                (NOW, data(2)),
            ],
        ),
    ));
    corpus.push((
        "stop_during_attempt",
        LEASE,
        vec![
            (NOW, Step::SessionUpNext),
            (NOW, Step::Start),
            (NOW, Step::Stop),
            (MS1, acquired(Some(1))),
            (MS1, reply(Reply::Release { released: true })),
            (MS1, Step::Start),
            (MS1, Step::TryAcquire),
        ],
    ));
    corpus.push((
        "signal_while_holding",
        LEASE,
        with(
            holding(Some(1)),
            vec![
                (MS1, Step::Signal),
                (MS1, reply(Reply::Drained)),
                (MS1, marker(Marker::Draining(t(1)))),
                (MS1, reply(Reply::Release { released: true })),
                (MS1, Step::Tick),
            ],
        ),
    ));
    corpus.push((
        "stop_unanswered",
        LEASE,
        with(
            holding(Some(1)),
            vec![(MS1, Step::Stop), (MS1100, Step::Tick), (MS1100, Step::Tick)],
        ),
    ));
    corpus.push((
        "old_sessions_and_late_replies",
        LEASE,
        with(
            holding(Some(1)),
            vec![
                (MS1, Step::SessionDown(SessionChoice::Fixed(0))),
                (MS1, Step::SessionUp(0)),
                (MS1, Step::Data(SessionChoice::Fixed(0), 1)),
                (
                    MS1,
                    Step::Result(IdChoice::Offset(-1), Ok(Reply::Renew { owned: false })),
                ),
                (MS1, Step::Result(IdChoice::Offset(2), Ok(Reply::Drained))),
                (MS1, Step::SessionUpNext),
                (MS1, Step::SessionDown(SessionChoice::Fixed(1))),
                (MS20, Step::Tick),
                (MS1, acquired(Some(2))),
            ],
        ),
    ));
    corpus.push((
        "time_goes_back",
        LEASE,
        with(
            holding(Some(1)),
            vec![
                (BACK_1S, Step::Tick),
                (BACK_1S, data(1)),
                (MS450, Step::Tick),
                (BACK_1S, reply(Reply::Renew { owned: true })),
                (MS1100, Step::Tick),
            ],
        ),
    ));
    corpus.push((
        "terminate_stale",
        LEASE,
        vec![
            (NOW, Step::SessionUpNext),
            (NOW, Step::TryAcquire),
            (MS1, acquired_from(Some(4), Some(2))),
            (MS450, Step::Tick),
            (MS1, reply(Reply::Terminate(TerminateOutcome::NotPermitted))),
            (MS1, reply(Reply::Renew { owned: true })),
            (MS1, marker(Marker::Acquired(FenceToken(5)))),
            (MS1, Step::TryAcquire),
            (MS1, acquired_from(Some(6), Some(1))),
            (MS1, fail(DbError::PermissionDenied("no".into()))),
        ],
    ));
    corpus.push((
        "classic_hold_and_superseded",
        CLASSIC,
        with(
            holding(None),
            vec![
                (S5, Step::Tick),
                (MS1, reply(Reply::Renew { owned: true })),
                (NOW, data(1)),
                (S5, Step::Tick),
                (MS1, reply(Reply::Renew { owned: false })),
                (NOW, data(2)),
            ],
        ),
    ));
    corpus.push((
        "classic_graceful_release",
        CLASSIC,
        with(
            holding(None),
            vec![
                (MS1, Step::Release),
                (MS1, reply(Reply::Drained)),
                (MS1, marker(Marker::Draining(None))),
                (NOW, data(1)),
                (MS1, marker(Marker::Released(None))),
                (MS1, reply(Reply::Release { released: true })),
                (MS20, Step::Tick),
                (S5, Step::Tick),
                (MS1, locked(None)),
            ],
        ),
    ));
    corpus.push((
        "classic_standby_woken_by_node_release",
        CLASSIC,
        vec![
            (NOW, Step::SessionUpNext),
            (NOW, Step::Start),
            (NOW, Step::Marker(L, "1".into())),
            (MS1, locked(None)),
            (NOW, data(1)),
            (MS20, Step::Tick),
            (MS1, acquired(None)),
            (MS1, Step::SessionDown(L)),
        ],
    ));
    corpus.push((
        "zero_timings_clamped",
        LEASE_ZERO,
        with(
            holding(Some(1)),
            vec![
                (MS1, Step::Tick),
                (MS1, Step::Tick),
                (NOW, marker(Marker::Released(t(7)))),
                (MS1, Step::SessionUpNext),
                (NOW, marker(Marker::Released(t(8)))),
                (MS1, Step::Tick),
            ],
        ),
    ));
    corpus.push((
        "tiny_buffer_overflow",
        LEASE_TINY,
        vec![
            (NOW, Step::SessionUpNext),
            (NOW, Step::Start),
            (MS1, locked(Some(100))),
            (MS1, marker(Marker::Draining(t(1)))),
            (NOW, data(1)),
            (NOW, data(2)),
            (NOW, data(3)),
            (NOW, data(4)),
            (NOW, data(5)),
            (MS450, Step::Tick),
            (MS1, acquired(Some(2))),
        ],
    ));
    corpus.push((
        "lease_never_usable",
        LEASE_UNUSABLE,
        with(
            holding(Some(1)),
            vec![(NOW, data(1)), (S5, Step::Tick), (MS1, acquired(Some(2)))],
        ),
    ));
    // A holder stands down: it drains and releases as a graceful release does, then makes no
    // attempt of its own (the reply after the long wait answers the release, not an attempt);
    // with `Start` it competes again and wins.
    let stand_down = || {
        with(
            holding(Some(1)),
            vec![
                (MS1, data(1)),
                (MS1, Step::StandDown),
                (NOW, data(2)),
                (MS1, reply(Reply::Drained)),
                (MS1, marker(Marker::Draining(t(1)))),
                (MS1, reply(Reply::Release { released: true })),
                (MS1, marker(Marker::Released(t(1)))),
                (MS20, Step::Tick),
                (S5, Step::Tick),
                (MS1, acquired(Some(2))),
            ],
        )
    };
    corpus.push(("lease_stand_down", LEASE, stand_down()));
    corpus.push((
        "lease_stand_down_and_compete",
        LEASE,
        with(
            stand_down(),
            vec![
                (MS1, Step::Start),
                (MS20, Step::Tick),
                (MS1, acquired(Some(2))),
                (MS1, data(3)),
            ],
        ),
    ));
    // A standby stands down before a release: it hears the release and does not attempt (so
    // the reply after the wake jitter answers nothing).
    corpus.push((
        "lease_standby_stands_down",
        LEASE,
        vec![
            (NOW, Step::SessionUpNext),
            (NOW, Step::Start),
            (MS1, locked(Some(1500))),
            (MS1, Step::StandDown),
            (MS1, marker(Marker::Released(t(4)))),
            (MS20, Step::Tick),
            (MS1, acquired(Some(5))),
        ],
    ));
    corpus.push((
        "defaults_hold_long",
        LEASE_DEFAULTS,
        with(holding(Some(1)), renew_ok(20)),
    ));

    let mut out: Vec<(String, Vec<u8>)> = corpus
        .into_iter()
        .map(|(name, header, steps)| (name.to_owned(), encode(header, 0x5eed, &steps)))
        .collect();
    // A few random inputs of various lengths.
    let mut rng = SplitMix64::new(0x00c0_ffee);
    for i in 0..6 {
        let len = 64 + 80 * i;
        let bytes = (0..len).map(|_| rng.next_u64() as u8).collect();
        out.push((format!("random_{i}"), bytes));
    }
    out
}

/// The `names` seed corpus: `(file name, bytes)`.
pub fn names() -> Vec<(String, Vec<u8>)> {
    let mut names: Vec<(&str, Vec<u8>)> = vec![
        ("plain", b"jobs".to_vec()),
        ("empty", Vec::new()),
        ("nul", b"a\0b".to_vec()),
        ("channel_50", vec![b'x'; 50]),
        ("channel_51", vec![b'x'; 51]),
        ("identifier_63", vec![b'a'; 63]),
        ("identifier_64", vec![b'a'; 64]),
        ("reserved_prefix", b"__PgIpLock__:jobs".to_vec()),
        ("quotes_and_unicode", "Orders \"EU\" \u{2713}".as_bytes().to_vec()),
        ("multibyte_over_limit", "\u{2713}".repeat(17).into_bytes()),
        ("multibyte_at_limit", "\u{2713}".repeat(16).into_bytes()),
        ("tab", b"tab\there".to_vec()),
        ("only_quotes", b"\"\"\"".to_vec()),
        ("invalid_utf8", vec![0xff, 0xfe, b'a', 0xc3]),
        ("marker_draining", b"draining:7".to_vec()),
        ("marker_released", b"released:3".to_vec()),
        ("marker_acquired", b"acquired:18446744073709551615".to_vec()),
        ("marker_overflow", b"released:18446744073709551616".to_vec()),
        ("marker_bad_token", b"draining:abc".to_vec()),
        ("classic_release", b"1".to_vec()),
        ("protocol", b"CLASSIC".to_vec()),
        ("app_like_uuid", b"3f2a8a3e-58c1-4d5b-9b6f-0d7c2f1e9a10".to_vec()),
    ];
    names.sort();
    names.into_iter().map(|(n, b)| (n.to_owned(), b)).collect()
}

/// The seed corpus of [`scenario`](crate::scenario): both protocols, each fault kind alone at a
/// high rate, all of them together (the process and server faults, then the connection faults),
/// small and larger fleets, and processes that stand down and compete again.
pub fn scenario() -> Vec<(String, Vec<u8>)> {
    // protocol, processes, minutes, interval, ttl, stop, crash, cut, terminate, restart
    let shapes: [(&str, [u8; 10]); 10] = [
        ("quiet", [0, 1, 0, 1, 1, 0, 0, 0, 0, 0]),
        ("stops", [0, 3, 1, 1, 1, 7, 0, 0, 0, 0]),
        ("crashes", [0, 3, 1, 1, 1, 0, 7, 0, 0, 0]),
        ("cuts", [0, 3, 1, 0, 1, 0, 0, 7, 0, 0]),
        ("terminations", [0, 3, 1, 1, 0, 0, 0, 0, 7, 0]),
        ("restarts", [0, 2, 1, 0, 1, 0, 0, 0, 0, 7]),
        ("everything", [0, 4, 3, 0, 0, 3, 3, 3, 3, 3]),
        ("long_interval", [0, 4, 2, 3, 2, 2, 2, 2, 2, 1]),
        ("pair", [0, 0, 1, 0, 0, 5, 5, 5, 5, 0]),
        ("large", [0, 4, 1, 1, 1, 4, 4, 4, 4, 1]),
    ];
    // The same ten bytes, then: connect hang, connect blip, setup reply loss, schema drop, read-only.
    let connection_shapes: [(&str, [u8; 15]); 6] = [
        ("connect_hangs", [0, 3, 1, 1, 1, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0]),
        ("connect_blips", [0, 3, 1, 1, 1, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0]),
        ("setup_reply_losses", [0, 3, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0]),
        ("schema_drops", [0, 3, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 7, 0]),
        ("read_only", [0, 3, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7]),
        ("connection_faults", [0, 4, 3, 0, 0, 2, 2, 2, 2, 1, 3, 3, 3, 3, 3]),
    ];
    // The fifteen bytes, then up to four stand-downs (process `b % 8`, at second `5 + b / 4`).
    let stand_down_shapes: [(&str, [u8; 19]); 2] = [
        (
            "stand_downs",
            [0, 3, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 41, 80, 122, 0],
        ),
        (
            "stand_downs_with_faults",
            [0, 4, 2, 1, 1, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 40, 41, 42, 43],
        ),
    ];
    let mut corpus = Vec::new();
    for (protocol, name) in [(0u8, "lease"), (1u8, "classic")] {
        let all = shapes
            .iter()
            .map(|(shape, bytes)| (*shape, bytes.as_slice()))
            .chain(
                connection_shapes
                    .iter()
                    .map(|(shape, bytes)| (*shape, bytes.as_slice())),
            )
            .chain(
                stand_down_shapes
                    .iter()
                    .map(|(shape, bytes)| (*shape, bytes.as_slice())),
            );
        for (i, (shape, bytes)) in all.enumerate() {
            let seed = 1000 + i as u64 + u64::from(protocol) * 100;
            let mut data = seed.to_le_bytes().to_vec();
            data.extend_from_slice(bytes);
            data[8] = protocol;
            corpus.push((format!("{name}_{shape}"), data));
        }
    }
    corpus
}

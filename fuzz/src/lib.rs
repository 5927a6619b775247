//! Fuzz targets of `pgiplock`, as plain functions.
//!
//! Each target takes the fuzzer's bytes and panics when an invariant breaks. The libFuzzer entry
//! points in `fuzz_targets/` (built only with the `libfuzzer` feature, on nightly, by
//! `cargo fuzz`) call these, and so does the ordinary test run, which replays the committed
//! corpus in `corpus/<target>/` on stable Rust.
//!
//! - [`lock_events`]: a sequence of `(delta, input)` decoded from bytes into one
//!   [`Lock`](pgiplock_core::Lock), with tiny key spaces (request ids near the latest, five
//!   session ids, tokens up to six) so that replies, sessions and markers collide.
//! - [`names`]: channel, application and schema name validation, identifier quoting and
//!   lock-channel payload parsing.
//!
//! - [`scenario`]: a whole fleet decoded from bytes through the simulator (the real core in every
//!   process, the database model, the network, faults) with every checker after every event.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod bytes;
pub mod corpus;
pub mod lock_events;
pub mod names;
pub mod scenario;

pub use bytes::Reader;
pub use lock_events::lock_events;
pub use names::names;
pub use scenario::scenario;

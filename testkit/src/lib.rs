//! Test kit of the pgiplock workspace: what the integration tests, the calibration and the demo
//! need around the library, kept out of the library so that embedding it pulls none of it.
//!
//! - [`cluster::TempCluster`]: a throwaway PostgreSQL cluster from the local server binaries.
//! - [`replica::ReplicaPair`]: a throwaway primary with a streaming replica (async or sync),
//!   to crash, promote and partition.
//! - [`proxy::BlackholeProxy`]: a TCP forwarder that can silently stop forwarding (a network
//!   cut).
//! - `sql` (feature `sql`): the library's own SQL executor and schema bootstrap, to run the
//!   protocols' operations directly on a connection.
//!
//! Not published, and without any stability promise.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cluster;
pub mod proxy;
pub mod replica;

/// The library's SQL: [`execute`](sql::execute) runs one operation of a lock's protocol,
/// [`bootstrap`](sql::bootstrap) creates (or checks) its schema, as a session would.
#[cfg(feature = "sql")]
pub mod sql {
    pub use pgiplock::testkit::{
        await_holder, balance, bootstrap, execute, execute_batch, unlisten, warm_up, BatchOp, BatchTarget, Target,
    };
}

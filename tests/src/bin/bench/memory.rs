//! Memory: the resident set of worker processes (`VmRSS`, and its peak `VmHWM`, from
//! `/proc/<pid>/status`), next to a `raw-listen` process as the floor; of one process holding
//! and one waiting on many channels (`hold-many`); and the bytes of one core lock state,
//! counted by this binary's global allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use pgiplock_core::{
    ChannelName, Input, Lock, LockConfig, LockKey, Protocol, SchemaName, Session, SessionConfig, SessionId,
};
use pgiplock_tests::{unique_channel, unique_hex, Fleet, TestSchema, WorkerOpts};
use tokio::process::Command;

use crate::{progress, BoxError};

/// Bound on waits for workers (a thousand locks take a while to set up).
const WAIT: Duration = Duration::from_secs(120);
/// Time after set-up before the resident set is read.
const SETTLE: Duration = Duration::from_secs(2);

/// The system allocator, counting the bytes live on the heap.
struct Counting;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            LIVE_BYTES.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Bytes live on the heap now (this binary's global allocator counts them).
pub fn live_bytes() -> isize {
    LIVE_BYTES.load(Ordering::SeqCst)
}

/// Bytes of core state per lock.
#[derive(Debug, Clone, Copy)]
pub struct CoreBytes {
    /// `size_of::<Lock>()`.
    pub inline: usize,
    /// Heap of one started lock (channel names, output queue), averaged over `count`.
    pub lock_heap: f64,
    /// Heap of a core `Session` per lock it was given (the lock, its entry, its channel routes),
    /// averaged over `count`.
    pub session_per_lock: f64,
    /// The same session connected, every lock set up and holding (its first batch of attempts
    /// won), averaged over `count`.
    pub holding_per_lock: f64,
    /// Locks per measurement.
    pub count: usize,
}

/// Counts the heap of `count` started locks, and of one session with `count` locks. Runs on a
/// thread of its own while the rest of the bench waits, so that nothing else allocates.
pub fn core_bytes(count: usize) -> Result<CoreBytes, BoxError> {
    let channels: Vec<ChannelName> = (0..count)
        .map(|i| ChannelName::new(&format!("channel_{i:06}")))
        .collect::<Result<_, _>>()?;
    let schema = SchemaName::new("pgiplock_lease")?;
    let mut locks: Vec<Lock> = Vec::with_capacity(count);
    let before = live_bytes();
    for (i, channel) in channels.iter().enumerate() {
        let mut lock = Lock::new(channel.clone(), LockConfig::new(Protocol::Lease), i as u64);
        lock.handle_input(pgiplock_core::Timestamp::ZERO, Input::SessionUp(SessionId(1)));
        lock.handle_input(pgiplock_core::Timestamp::ZERO, Input::Start);
        while lock.poll_output().is_some() {}
        locks.push(lock);
    }
    let lock_heap = (live_bytes() - before) as f64 / count as f64;
    drop(locks);

    let before = live_bytes();
    let mut session = Session::new(SessionConfig::default(), 1);
    for (i, channel) in channels.iter().enumerate() {
        session.add_lock(
            LockKey(i as u64),
            channel.clone(),
            schema.clone(),
            LockConfig::new(Protocol::Lease),
            i as u64,
        )?;
    }
    let session_per_lock = (live_bytes() - before) as f64 / count as f64;
    hold_all(&mut session, count)?;
    let holding_per_lock = (live_bytes() - before) as f64 / count as f64;
    drop(session);
    Ok(CoreBytes {
        inline: std::mem::size_of::<Lock>(),
        lock_heap,
        session_per_lock,
        holding_per_lock,
        count,
    })
}

/// Drives `session` (its `count` locks keyed 0..count) as a driver would until every lock
/// holds: connect, bootstrap, listen, and every attempt won.
fn hold_all(session: &mut Session, count: usize) -> Result<(), BoxError> {
    use pgiplock_core::{
        AcquireReply, CallId, FenceToken, LockCall, OpReply, Reply, SessionInput, SessionOp, SessionOutput, Timestamp,
    };
    let mut now = Timestamp::from_millis(1);
    let mut pending = std::collections::VecDeque::new();
    for i in 0..count {
        let call = SessionInput::Call {
            call: CallId(i as u64),
            lock: LockKey(i as u64),
            request: LockCall::Init,
        };
        pending.push_back(call);
    }
    let mut token = 0u64;
    for _ in 0..1_000_000 {
        let input = match pending.pop_front() {
            Some(input) => input,
            None if session.locks().all(|(_, l)| l.state().phase.is_holder()) => return Ok(()),
            None => {
                now = session.poll_timeout().ok_or("nothing to wait for")?.max(now);
                SessionInput::Tick
            }
        };
        session.handle_input(now, input);
        while let Some(output) = session.poll_output() {
            match output {
                SessionOutput::Connect { session: id } => pending.push_back(SessionInput::Connected {
                    session: id,
                    app: "bench".into(),
                    pid: 1,
                }),
                SessionOutput::Execute(request) => {
                    let won = |token: &mut u64| {
                        *token += 1;
                        Reply::Acquire(AcquireReply::won(Some(FenceToken(*token))))
                    };
                    let result = match &request.op {
                        SessionOp::AcquireMany { entries, .. } => {
                            OpReply::Batch(entries.iter().map(|_| won(&mut token)).collect())
                        }
                        SessionOp::Lock { .. } => OpReply::Lock(won(&mut token)),
                        _ => OpReply::Done,
                    };
                    pending.push_back(SessionInput::Reply {
                        id: request.id,
                        result: Ok(result),
                    });
                }
                _ => {}
            }
        }
    }
    Err("the session did not hold every lock".into())
}

/// `VmRSS` and `VmHWM` of a process, in kB.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rss {
    /// Resident now.
    pub rss_kb: u64,
    /// Peak resident.
    pub hwm_kb: u64,
}

/// Reads `/proc/<pid>/status`.
pub fn rss_of(pid: i32) -> Result<Rss, BoxError> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
    };
    match (field("VmRSS:"), field("VmHWM:")) {
        (Some(rss_kb), Some(hwm_kb)) => Ok(Rss { rss_kb, hwm_kb }),
        _ => Err(format!("no VmRSS/VmHWM in /proc/{pid}/status").into()),
    }
}

/// One trial of the one-lock processes.
#[derive(Debug, Clone, Copy, Default)]
pub struct OneLock {
    /// A worker holding its lock.
    pub holder: Rss,
    /// A worker waiting on the same lock.
    pub standby: Rss,
    /// A plain `LISTEN` session printing what it receives.
    pub raw: Rss,
}

/// A holder worker, a standby worker and a raw listener on one channel of `url`.
pub async fn one_lock(url: &str) -> Result<OneLock, BoxError> {
    let schema = TestSchema::named(url, &format!("bench_{}", unique_hex()));
    let channel = unique_channel();
    let mut fleet = Fleet::new(WorkerOpts::new(url, &channel, Some(schema.name()), Protocol::Lease));
    let holder = fleet.spawn();
    fleet.wait_holder(WAIT).await;
    let standby = fleet.spawn();
    fleet.wait_ready(standby, WAIT).await;
    let mut raw = Command::new(std::env::current_exe()?);
    raw.args(["raw-listen", "--database-url", url, "--channel", &channel]);
    let raw_index = fleet.spawn_command(raw);
    fleet.wait_ready(raw_index, WAIT).await;
    tokio::time::sleep(SETTLE).await;
    let out = OneLock {
        holder: rss_of(fleet.worker(holder).pid)?,
        standby: rss_of(fleet.worker(standby).pid)?,
        raw: rss_of(fleet.worker(raw_index).pid)?,
    };
    fleet.shutdown(WAIT).await;
    Ok(out)
}

/// One process holding `channels` locks and one waiting on the same ones.
#[derive(Debug, Clone, Copy, Default)]
pub struct ManyLocks {
    /// Channels per process.
    pub channels: usize,
    /// The process holding every lock.
    pub holder: Rss,
    /// The process waiting on every lock.
    pub waiter: Rss,
}

/// Runs two `hold-many` processes on `url`: the first takes every lock, the second waits.
pub async fn many_locks(url: &str, channels: usize) -> Result<ManyLocks, BoxError> {
    let schema = TestSchema::named(url, &format!("bench_{}", unique_hex()));
    let prefix = format!("m{}_", unique_hex());
    let command = |expect_all: bool| -> Result<Command, BoxError> {
        let mut c = Command::new(std::env::current_exe()?);
        c.args(["hold-many", "--database-url", url, "--schema", schema.name()])
            .args(["--channel-prefix", &prefix, "--channels", &channels.to_string()]);
        if expect_all {
            c.arg("--expect-all");
        }
        Ok(c)
    };
    let mut fleet = Fleet::new(WorkerOpts::new(url, &prefix, Some(schema.name()), Protocol::Lease));
    let holder = fleet.spawn_command(command(true)?);
    fleet.wait_ready(holder, WAIT).await;
    progress(&format!("  holder: {}", crate::helpers::report(&fleet, holder).trim()));
    let waiter = fleet.spawn_command(command(false)?);
    fleet.wait_ready(waiter, WAIT).await;
    progress(&format!("  waiter: {}", crate::helpers::report(&fleet, waiter).trim()));
    tokio::time::sleep(SETTLE).await;
    let out = ManyLocks {
        channels,
        holder: rss_of(fleet.worker(holder).pid)?,
        waiter: rss_of(fleet.worker(waiter).pid)?,
    };
    fleet.shutdown(WAIT).await;
    Ok(out)
}

//! The SQL of both protocols: schema bootstrap, the operations of [`DbOp`], and status queries.
//!
//! Identifiers are always quoted with [`quote_ident`]; values are always bound parameters. The
//! only text spliced into statements is validated schema names (quoted) and fixed function
//! bodies; inside the bootstrap's `DO` block the schema name also appears as a string literal,
//! escaped as an `E''` literal, and every dollar-quote tag is chosen so that it does not occur
//! in the text it encloses.

use std::time::Duration;

use pgiplock_core::{
    quote_ident, AcquireReply, BalanceCounts, ChannelName, DbError, DbOp, FenceToken, Marker, PreviousTerm, Protocol,
    Reply, SchemaName, StaleHolder, TerminateOutcome, LOCK_CHANNEL_PREFIX,
};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Client;

/// The default schema of the `Classic` protocol (shared with `@imqueue/pg-pubsub`).
pub(crate) const DEFAULT_CLASSIC_SCHEMA: &str = "pgip_lock";
/// The default schema of the `Lease` protocol.
pub(crate) const DEFAULT_LEASE_SCHEMA: &str = "pgiplock_lease";

/// The default schema of `protocol`.
pub(crate) fn default_schema(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Classic => DEFAULT_CLASSIC_SCHEMA,
        Protocol::Lease => DEFAULT_LEASE_SCHEMA,
    }
}

/// Maps a driver error to the core's error data.
pub(crate) fn db_error(e: &tokio_postgres::Error) -> DbError {
    if e.is_closed() {
        return DbError::SessionLost;
    }
    match e.as_db_error() {
        Some(db) => DbError::server(db.code().code(), db.message()),
        None => DbError::Failed(crate::error::Why(e).to_string()),
    }
}

/// Quotes `text` as an escape-string literal (`E'..'`), safe whatever
/// `standard_conforming_strings` says.
pub(crate) fn quote_literal(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 3);
    out.push_str("E'");
    for ch in text.chars() {
        match ch {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            _ => out.push(ch),
        }
    }
    out.push('\'');
    out
}

/// Encloses `body` in dollar quotes with a tag derived from `base` that does not occur in it.
fn dollar_quote(body: &str, base: &str) -> String {
    let mut n = 0u32;
    loop {
        let tag = if n == 0 {
            format!("${base}$")
        } else {
            format!("${base}{n}$")
        };
        if !body.contains(&tag) {
            return format!("{tag}{body}{tag}");
        }
        n += 1;
    }
}

/// A stable advisory-lock key for bootstrapping `schema` (FNV-1a). Per schema, not per protocol:
/// both protocols' bootstraps create the schema, so they must not run at once on the same one.
fn advisory_key(schema: &SchemaName) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in "pgiplock bootstrap:".bytes().chain(schema.as_str().bytes()) {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    i64::from_ne_bytes(hash.to_ne_bytes())
}

/// The first key of the session advisory lock every `Lease` session of `schema` holds (with its
/// backend pid as the second), so that the crash watch of other processes can wait for its
/// session to end: FNV-1a of `"pgiplock holder:" + schema`, folded to a non-negative int4 (so
/// that it reads the same in `pg_locks.classid`).
pub fn holder_key(schema: &SchemaName) -> i32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in "pgiplock holder:".bytes().chain(schema.as_str().bytes()) {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    ((hash ^ (hash >> 32)) & 0x7fff_ffff) as i32
}

/// The crash watch's wait, a procedure (see [`SessionOp::AwaitHolder`](pgiplock_core::SessionOp)).
/// Bounded by `p_max_us`; it re-reads the holder's earliest lease expiry whenever its lock wait
/// times out (the holder renews meanwhile), and commits before every wait, so that the lock it
/// takes on the lease table to read it is not held while it waits (DDL on the table, a
/// `DROP SCHEMA`, would otherwise queue behind it and block every lock statement).
///
/// A dying backend releases its advisory locks before its `pg_stat_activity` entry goes, so
/// `gone` is answered only once the entry is gone too (the standby's attempt then finds the
/// holder's session gone): after the lock wait ends, and also when the holder's lock is missing
/// at the start, because its session ended (or began to) before the wait looked. A holder still
/// listed without the lock 1 s later never took it (an older version): `unwatched`. The 1 s
/// bounds both polls; the window between the two steps of a backend's exit is normally far
/// shorter.
fn lease_await_holder_body(qs: &str) -> String {
    format!(
        r#"
DECLARE
  v_end timestamptz := clock_timestamp() + p_max_us * INTERVAL '1 microsecond';
  v_expiry timestamptz;
  v_wait_ms bigint;
  v_gone boolean;
BEGIN
  IF NOT {held} THEN
    FOR i IN 1..200 LOOP
      PERFORM pg_stat_clear_snapshot();
      IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a WHERE a.pid = p_pid) THEN
        outcome := 'gone';
        RETURN;
      END IF;
      EXIT WHEN {held};
      PERFORM pg_sleep(0.005);
    END LOOP;
    IF NOT {held} THEN
      outcome := 'unwatched';
      RETURN;
    END IF;
  END IF;
  LOOP
    SELECT min(r.expires_at) INTO v_expiry FROM {qs}.lease r WHERE r.holder_pid = p_pid AND r.holder IS NOT NULL;
    IF v_expiry IS NULL THEN
      outcome := 'released';
      RETURN;
    END IF;
    IF v_expiry <= clock_timestamp() THEN
      outcome := 'expired';
      RETURN;
    END IF;
    IF clock_timestamp() >= v_end THEN
      outcome := 'timeout';
      RETURN;
    END IF;
    COMMIT;
    v_wait_ms := GREATEST(1, ceil(EXTRACT(EPOCH FROM (LEAST(v_end, v_expiry) - clock_timestamp())) * 1000))::bigint;
    PERFORM set_config('lock_timeout', v_wait_ms || 'ms', true);
    BEGIN
      PERFORM pg_advisory_lock_shared(p_key, p_pid);
      PERFORM pg_advisory_unlock_shared(p_key, p_pid);
      v_gone := true;
    EXCEPTION WHEN lock_not_available THEN
      v_gone := false;
    END;
    IF v_gone THEN
      FOR i IN 1..200 LOOP
        PERFORM pg_stat_clear_snapshot();
        EXIT WHEN NOT EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a WHERE a.pid = p_pid);
        PERFORM pg_sleep(0.005);
      END LOOP;
      outcome := 'gone';
      RETURN;
    END IF;
  END LOOP;
END
"#,
        held = "EXISTS (SELECT 1 FROM pg_catalog.pg_locks l \
                WHERE l.locktype = 'advisory' AND l.classid = p_key::oid AND l.objid = p_pid::oid \
                  AND l.objsubid = 2 AND l.pid = p_pid AND l.mode = 'ExclusiveLock' AND l.granted \
                  AND l.database = (SELECT d.oid FROM pg_catalog.pg_database d WHERE d.datname = current_database()))"
    )
}

/// `IF NOT EXISTS (function) THEN CREATE ...` for one function. With `replace` (our own schema)
/// an existing function whose body or `SET` clause (`Some("name=value")`) differs from ours is
/// replaced; without, an existing one is left alone (the Classic schema may have been created
/// by Node processes).
fn ensure_function(
    schema: &SchemaName,
    name: &str,
    signature_and_body: &str,
    body: &str,
    replace: Option<Option<&str>>,
) -> String {
    let mut check = format!(
        "SELECT 1 FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
         WHERE n.nspname = {} AND p.proname = {}",
        quote_literal(schema.as_str()),
        quote_literal(name)
    );
    if let Some(setting) = replace {
        check.push_str(&format!(" AND p.prosrc = {}", quote_literal(body)));
        match setting {
            Some(setting) => check.push_str(&format!(
                " AND p.proconfig IS NOT DISTINCT FROM ARRAY[{}]::text[]",
                quote_literal(setting)
            )),
            None => check.push_str(" AND p.proconfig IS NULL"),
        }
    }
    format!(
        "IF NOT EXISTS ({check}) THEN\n  CREATE OR REPLACE FUNCTION {}.{}{signature_and_body};\nEND IF;\n",
        quote_ident(schema.as_str()),
        quote_ident(name)
    )
}

/// The `SET` clause of the Lease functions that wait for row locks, as `pg_proc.proconfig`
/// shows it.
const LEASE_LOCK_TIMEOUT: &str = "lock_timeout=2s";

fn classic_notify_body() -> String {
    "BEGIN PERFORM PG_NOTIFY(OLD.channel, '1'); RETURN OLD; END;".to_owned()
}

fn classic_deadlock_body() -> String {
    "DECLARE num_apps INTEGER; BEGIN SELECT count(query) INTO num_apps FROM pg_stat_activity \
     WHERE application_name = old_app; IF num_apps > 0 THEN RAISE EXCEPTION 'Duplicate channel for app %', \
     new_app USING DETAIL = 'LOCKED'; END IF; RETURN new_app; END;"
        .to_owned()
}

fn lease_acquire_body(qs: &str) -> String {
    format!(
        r#"
#variable_conflict use_column
DECLARE
  r {qs}.lease%ROWTYPE;
  row_found boolean;
  holder_alive boolean := false;
  free_at timestamptz;
BEGIN
  acquired := false;
  -- Losers cost a read: a live, unexpired holder is reported without writing or locking.
  SELECT * INTO r FROM {qs}.lease l WHERE l.channel = p_channel;
  row_found := FOUND;
  IF row_found AND r.holder IS NOT NULL AND r.holder IS DISTINCT FROM p_app AND r.expires_at > now() THEN
    SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a
                   WHERE a.pid = r.holder_pid AND a.application_name = r.holder) INTO holder_alive;
    IF holder_alive THEN
      free_at := r.expires_at;
    -- A term of an older timeline was held through another server: its session cannot be seen
    -- here, so only its lease's end frees it, capped at one ttl from its first sighting here.
    -- Not sighted yet: the locked path below records the sighting.
    ELSIF {qs}.older_timeline(r.token) AND r.seen_token IS NOT DISTINCT FROM r.token THEN
      free_at := {qs}.old_timeline_free_at(r.expires_at, r.seen_at, p_ttl_us);
    END IF;
    IF free_at > now() THEN
      remaining_us := GREATEST(0, (EXTRACT(EPOCH FROM (free_at - now())) * 1000000)::bigint);
      holder_token := r.token;
      holder_pid := r.holder_pid;
      {note_waiter}
      RETURN;
    END IF;
  END IF;
  IF NOT row_found THEN
    INSERT INTO {qs}.lease (channel, token) VALUES (p_channel, 0) ON CONFLICT (channel) DO NOTHING;
  END IF;
  -- Decide again under the row lock: a concurrent acquirer may have won meanwhile.
  SELECT * INTO r FROM {qs}.lease l WHERE l.channel = p_channel FOR UPDATE;
  holder_alive := false;
  free_at := NULL;
  IF r.holder IS NOT NULL AND r.holder IS DISTINCT FROM p_app THEN
    SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a
                   WHERE a.pid = r.holder_pid AND a.application_name = r.holder) INTO holder_alive;
    IF r.expires_at > now() THEN
      IF holder_alive THEN
        free_at := r.expires_at;
      ELSIF {qs}.older_timeline(r.token) THEN
        IF r.seen_token IS DISTINCT FROM r.token THEN
          -- The first sighting of this term on this server: the cap counts from here.
          UPDATE {qs}.lease l SET seen_token = r.token, seen_at = now() WHERE l.channel = p_channel;
          r.seen_at := now();
        END IF;
        free_at := {qs}.old_timeline_free_at(r.expires_at, r.seen_at, p_ttl_us);
      END IF;
      IF free_at > now() THEN
        remaining_us := GREATEST(0, (EXTRACT(EPOCH FROM (free_at - now())) * 1000000)::bigint);
        holder_token := r.token;
        holder_pid := r.holder_pid;
        {note_waiter}
        RETURN;
      END IF;
    END IF;
  END IF;
  -- The term before ours, for the winner's replay: its token, the backend that sent its
  -- markers (kept after a release), and whether it was released rather than taken over.
  IF r.token > 0 THEN
    prev_token := r.token;
    prev_pid := r.holder_pid;
    prev_released := r.holder IS NULL;
  END IF;
  UPDATE {qs}.lease l
     SET holder = p_app, holder_pid = pg_backend_pid(), token = {qs}.next_token(l.token),
         expires_at = now() + p_ttl_us * INTERVAL '1 microsecond', acquired_at = now()
   WHERE l.channel = p_channel
  RETURNING l.token INTO token;
  acquired := true;
  holder_pid := pg_backend_pid();
  -- The winner waits no more (best effort, as the waiter's record: see note_waiter_sql).
  BEGIN
    DELETE FROM {qs}.lease_waiter w WHERE w.channel = p_channel AND w.app = p_app;
  EXCEPTION WHEN insufficient_privilege THEN NULL;
  END;
  IF holder_alive THEN
    stale_pid := r.holder_pid;
    stale_app := r.holder;
  END IF;
  PERFORM pg_notify(p_lock_channel, 'acquired:' || token);
END
"#,
        note_waiter = note_waiter_sql(qs)
    )
}

/// A refused standby records itself as a waiter of the channel (once per backend: later
/// refusals only read), so that a release can name it the successor ([`lease_release_body`]).
/// Best effort: on a read-only server, or without rights on the table (a role set up for an
/// earlier version), the attempt is refused as before and nobody names it.
fn note_waiter_sql(qs: &str) -> String {
    format!(
        r#"BEGIN
        IF NOT EXISTS (SELECT 1 FROM {qs}.lease_waiter w
                        WHERE w.channel = p_channel AND w.app = p_app AND w.pid = pg_backend_pid()) THEN
          INSERT INTO {qs}.lease_waiter AS w (channel, app, pid, since)
            VALUES (p_channel, p_app, pg_backend_pid(), now())
            ON CONFLICT (channel, app) DO UPDATE SET pid = EXCLUDED.pid, since = EXCLUDED.since;
        END IF;
      EXCEPTION WHEN read_only_sql_transaction OR insufficient_privilege THEN NULL;
      END;"#
    )
}

/// When a held row of an older timeline, whose holder's session is not on this server, is free:
/// at its replicated expiry `p_expires`, but no later than one ttl (`p_ttl_us`, the attempting
/// process's) after it was first sighted on this server (`p_seen`), so that a long lease or a
/// clock ahead on the old primary costs at most one ttl of outage after a failover.
/// `pgiplock.old_timeline_takeover = 'expiry'` waits for the replicated expiry alone.
fn lease_old_timeline_free_at_body() -> String {
    "SELECT CASE WHEN COALESCE(current_setting('pgiplock.old_timeline_takeover', true), '') = 'expiry' \
     THEN p_expires ELSE LEAST(p_expires, p_seen + p_ttl_us * INTERVAL '1 microsecond') END"
        .to_owned()
}

/// The timeline the server writes on, from its current WAL file's name (any role may read it;
/// `pg_control_checkpoint()` lags a promotion until the next checkpoint); NULL in recovery, where
/// every write fails as read-only anyway.
fn lease_timeline_body() -> String {
    "SELECT CASE WHEN pg_is_in_recovery() THEN NULL \
     ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::bigint END"
        .to_owned()
}

/// The one rule of token issue: the token after `p_prev` on the current timeline. A token is
/// `(timeline - 1) << 40 | counter` ([`FenceToken::timeline`]): on the timeline of `p_prev` it is
/// `p_prev + 1`; on a later one the counter goes on under the new timeline, so it exceeds every
/// token of the earlier timelines, also those a lost replication tail took with it. Never less
/// than `p_prev + 1`. Every statement that acquires calls it.
fn lease_next_token_body(qs: &str) -> String {
    format!(
        "SELECT GREATEST(p_prev + 1, \
         ((COALESCE({qs}.timeline(), 1) - 1) << {bits}) + (p_prev & {mask}) + 1)",
        bits = pgiplock_core::TOKEN_COUNTER_BITS,
        mask = (1u64 << pgiplock_core::TOKEN_COUNTER_BITS) - 1
    )
}

/// Whether `p_token` was issued on an older timeline than the current one: its holder's session
/// lived on another server, so "its session is gone" proves nothing here. Configurable per
/// session or role: `pgiplock.old_timeline_takeover = 'session_gone'` takes such a row over as
/// any other (at once, when its holder's session is not on this server).
fn lease_older_timeline_body(qs: &str) -> String {
    format!(
        "SELECT COALESCE(current_setting('pgiplock.old_timeline_takeover', true), '') <> 'session_gone' \
         AND COALESCE((p_token >> {bits}) + 1 < {qs}.timeline(), false)",
        bits = pgiplock_core::TOKEN_COUNTER_BITS
    )
}

fn lease_renew_body(qs: &str) -> String {
    format!(
        r#"
BEGIN
  -- A renewal here makes the term this server's own again: an older sighting no longer counts.
  UPDATE {qs}.lease l SET expires_at = now() + p_ttl_us * INTERVAL '1 microsecond', seen_token = NULL
   WHERE l.channel = p_channel AND l.holder = p_app AND l.token = p_token;
  IF NOT FOUND THEN
    RETURN false;
  END IF;
  -- The progress marker commits with the renewal, from this backend: standbys accept it from
  -- the holder's pid only.
  IF p_seq IS NOT NULL THEN
    PERFORM pg_notify(p_lock_channel, 'progress:' || p_token || ':' || p_seq || COALESCE(':' || p_ack, ''));
  END IF;
  RETURN true;
END
"#
    )
}

/// The release names its successor: the live waiter that waited longest (first refused by a
/// holder of the channel), by its backend pid in the marker (`released:<token>:<pid>`). It
/// attempts at once, the other standbys only after a wake jitter more, so one attempt usually
/// suffices; waiters whose session is gone are forgotten here.
fn lease_release_body(qs: &str) -> String {
    format!(
        r#"
DECLARE
  v_next integer;
BEGIN
  -- holder_pid stays: the next winner learns which backend sent this term's markers.
  UPDATE {qs}.lease l SET holder = NULL, expires_at = NULL
   WHERE l.channel = p_channel AND l.holder = p_app AND l.token = p_token;
  IF NOT FOUND THEN
    RETURN false;
  END IF;
  -- The commit need not wait for its WAL flush: a release lost to a server crash only leaves
  -- the lease to expire, and the successor's acquisition, which commits after it and waits for
  -- its own flush (and a synchronous standby), makes it durable too.
  PERFORM set_config('synchronous_commit', 'off', true);
  BEGIN
    DELETE FROM {qs}.lease_waiter w
     WHERE w.channel = p_channel
       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a WHERE a.pid = w.pid AND a.application_name = w.app);
    SELECT w.pid INTO v_next FROM {qs}.lease_waiter w
     WHERE w.channel = p_channel AND w.app IS DISTINCT FROM p_app
     ORDER BY w.since, w.app COLLATE "C" LIMIT 1;
  EXCEPTION WHEN insufficient_privilege THEN
    v_next := NULL;
  END;
  PERFORM pg_notify(p_lock_channel, 'released:' || p_token || COALESCE(':' || v_next, ''));
  RETURN true;
END
"#
    )
}

/// Renews many leases of one session in one statement: each row exactly as `renew_v2` renews it
/// (its own holder and token condition, its progress marker from this backend when renewed),
/// one result row per channel in the arrays' order.
fn lease_renew_many_body(qs: &str) -> String {
    format!(
        r#"
BEGIN
  FOR i IN 1 .. COALESCE(array_length(p_channels, 1), 0) LOOP
    channel := p_channels[i];
    renewed := {qs}.renew_v2(p_channels[i], p_lock_channels[i], p_app, p_tokens[i], p_ttl_us[i], p_seqs[i], p_acks[i]);
    RETURN NEXT;
  END LOOP;
END
"#
    )
}

/// Many acquisition attempts of one session in one statement: each channel exactly as
/// `acquire_v2` decides it, one result row per channel in the arrays' order.
fn lease_acquire_many_body(qs: &str) -> String {
    format!(
        r#"
BEGIN
  FOR i IN 1 .. COALESCE(array_length(p_channels, 1), 0) LOOP
    channel := p_channels[i];
    SELECT a.acquired, a.token, a.remaining_us, a.stale_pid, a.stale_app, a.holder_token, a.holder_pid,
           a.prev_token, a.prev_pid, a.prev_released
      INTO acquired, token, remaining_us, stale_pid, stale_app, holder_token, holder_pid,
           prev_token, prev_pid, prev_released
      FROM {qs}.acquire_v2(p_channels[i], p_lock_channels[i], p_app, p_ttl_us[i]) a;
    RETURN NEXT;
  END LOOP;
END
"#
    )
}

/// Fair share: records (or forgets, on `p_leave`) this session as a member of `p_group` and
/// `p_channels` as the group's, forgets members whose session is gone (the rule the lease uses
/// for "its holder's session is gone"), and returns one row per live member in bytewise
/// application-name order: the channels of the group whose unexpired lease it holds, the
/// group's channel count, whether it is the caller, and (on every row) up to
/// `MAX_FREE_LISTED` of the group's channels that nobody holds (no live holder with an
/// unexpired lease), in bytewise order.
fn lease_balance_body(qs: &str) -> String {
    format!(
        r#"
#variable_conflict use_column
DECLARE
  n bigint;
  f text[];
BEGIN
  IF p_leave THEN
    DELETE FROM {qs}.balance_member m WHERE m.grp = p_group AND m.app = p_app;
  ELSE
    INSERT INTO {qs}.balance_member AS m (grp, app, pid) VALUES (p_group, p_app, pg_backend_pid())
      ON CONFLICT (grp, app) DO UPDATE SET pid = EXCLUDED.pid WHERE m.pid IS DISTINCT FROM EXCLUDED.pid;
    IF COALESCE(array_length(p_channels, 1), 0) > 0 THEN
      INSERT INTO {qs}.balance_channel (grp, channel)
        SELECT p_group, c FROM unnest(p_channels) AS c ON CONFLICT DO NOTHING;
    END IF;
  END IF;
  DELETE FROM {qs}.balance_member m
   WHERE m.grp = p_group
     AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a
                     WHERE a.pid = m.pid AND a.application_name = m.app);
  SELECT count(*) INTO n FROM {qs}.balance_channel c WHERE c.grp = p_group;
  SELECT COALESCE(array_agg(x.channel), '{{}}') INTO f FROM (
    SELECT c.channel FROM {qs}.balance_channel c
     WHERE c.grp = p_group
       AND NOT EXISTS (SELECT 1 FROM {qs}.lease l
                        JOIN pg_catalog.pg_stat_activity a
                          ON a.pid = l.holder_pid AND a.application_name = l.holder
                       WHERE l.channel = c.channel AND l.expires_at > now())
     ORDER BY c.channel COLLATE "C" LIMIT {max_free}) x;
  RETURN QUERY
    SELECT m.app, COALESCE(h.held, 0)::bigint, n, m.app = p_app, f
      FROM {qs}.balance_member m
      LEFT JOIN (SELECT l.holder, l.holder_pid, count(*) AS held
                   FROM {qs}.lease l
                   JOIN {qs}.balance_channel c ON c.grp = p_group AND c.channel = l.channel
                  WHERE l.holder IS NOT NULL AND l.expires_at > now()
                  GROUP BY l.holder, l.holder_pid) h
        ON h.holder = m.app AND h.holder_pid = m.pid
     WHERE m.grp = p_group
     ORDER BY m.app COLLATE "C";
END
"#,
        max_free = pgiplock_core::MAX_FREE_LISTED
    )
}

fn lease_terminate_body() -> String {
    r#"
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a
                 WHERE a.pid = p_pid AND a.application_name = p_app) THEN
    RETURN 'gone';
  END IF;
  BEGIN
    IF pg_terminate_backend(p_pid) THEN
      RETURN 'terminated';
    END IF;
    RETURN 'gone';
  EXCEPTION WHEN insufficient_privilege THEN
    RETURN 'not_permitted';
  END;
END
"#
    .to_owned()
}

/// The bootstrap statement of `schema` under `protocol`: one `DO` block that serialises
/// concurrent bootstraps with a transaction-scoped advisory lock and creates only what is
/// missing, so it needs no privileges at all when everything exists and never takes a table
/// lock that would stall running lock operations.
fn bootstrap_sql(protocol: Protocol, schema: &SchemaName) -> String {
    let qs = quote_ident(schema.as_str());
    let schema_lit = quote_literal(schema.as_str());
    let mut body = String::new();
    body.push_str("BEGIN\n");
    // A bootstrap stuck behind someone's lock fails (and `init` reports it) instead of hanging.
    body.push_str("PERFORM set_config('lock_timeout', '10s', true);\n");
    body.push_str(&format!("PERFORM pg_advisory_xact_lock({});\n", advisory_key(schema)));
    body.push_str(&format!(
        "IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = {schema_lit}) THEN\n  CREATE SCHEMA {qs};\nEND IF;\n"
    ));
    match protocol {
        Protocol::Classic => {
            let table_lit = quote_literal(&format!("{qs}.lock"));
            body.push_str(&format!(
                "IF to_regclass({table_lit}) IS NULL THEN\n  CREATE TABLE {qs}.lock (channel CHARACTER VARYING NOT NULL PRIMARY KEY, app CHARACTER VARYING NOT NULL);\nEND IF;\n"
            ));
            let notify = classic_notify_body();
            body.push_str(&ensure_function(
                schema,
                "notify_lock",
                &format!("() RETURNS TRIGGER LANGUAGE plpgsql AS {}", dollar_quote(&notify, "fn")),
                &notify,
                None,
            ));
            body.push_str(&format!(
                "IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger WHERE tgrelid = to_regclass({table_lit}) AND tgname = 'notify_release_lock_trigger') THEN\n  \
                 CREATE CONSTRAINT TRIGGER notify_release_lock_trigger AFTER DELETE ON {qs}.lock DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE PROCEDURE {qs}.notify_lock();\nEND IF;\n"
            ));
            let deadlock = classic_deadlock_body();
            body.push_str(&ensure_function(
                schema,
                "deadlock_check",
                &format!(
                    "(old_app TEXT, new_app TEXT) RETURNS TEXT LANGUAGE plpgsql AS {}",
                    dollar_quote(&deadlock, "fn")
                ),
                &deadlock,
                None,
            ));
        }
        Protocol::Lease => {
            let table_lit = quote_literal(&format!("{qs}.lease"));
            body.push_str(&format!(
                "IF to_regclass({table_lit}) IS NULL THEN\n  CREATE TABLE {qs}.lease (channel text PRIMARY KEY, holder text, holder_pid integer, token bigint NOT NULL, expires_at timestamptz, acquired_at timestamptz, seen_token bigint, seen_at timestamptz);\nEND IF;\n"
            ));
            // Tables of earlier versions get the sighting columns; checked first, as the ALTER
            // takes the table's lock.
            for (column, kind) in [("seen_token", "bigint"), ("seen_at", "timestamptz")] {
                body.push_str(&format!(
                    "IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute WHERE attrelid = to_regclass({table_lit}) \
                     AND attname = {} AND NOT attisdropped) THEN\n  ALTER TABLE {qs}.lease ADD COLUMN {} {kind};\nEND IF;\n",
                    quote_literal(column),
                    quote_ident(column)
                ));
            }
            // The standbys waiting on each channel, for a release to name its successor.
            let waiter_lit = quote_literal(&format!("{qs}.lease_waiter"));
            body.push_str(&format!(
                "IF to_regclass({waiter_lit}) IS NULL THEN\n  CREATE TABLE {qs}.lease_waiter (channel text NOT NULL, app text NOT NULL, pid integer NOT NULL, since timestamptz NOT NULL, PRIMARY KEY (channel, app));\nEND IF;\n"
            ));
            // Fair share: the members of each balance group and the group's channels.
            let member_lit = quote_literal(&format!("{qs}.balance_member"));
            let channel_lit = quote_literal(&format!("{qs}.balance_channel"));
            body.push_str(&format!(
                "IF to_regclass({member_lit}) IS NULL THEN\n  CREATE TABLE {qs}.balance_member (grp text NOT NULL, app text NOT NULL, pid integer NOT NULL, PRIMARY KEY (grp, app));\nEND IF;\n\
                 IF to_regclass({channel_lit}) IS NULL THEN\n  CREATE TABLE {qs}.balance_channel (grp text NOT NULL, channel text NOT NULL, PRIMARY KEY (grp, channel));\nEND IF;\n"
            ));
            // Row-lock waits are bounded: an operation stuck behind a foreign transaction fails
            // and is retried, instead of being abandoned by a session reset and left blocked on
            // the server.
            let functions = [
                (
                    "acquire_v2",
                    "(p_channel text, p_lock_channel text, p_app text, p_ttl_us bigint, OUT acquired boolean, \
                     OUT token bigint, OUT remaining_us bigint, OUT stale_pid integer, OUT stale_app text, \
                     OUT holder_token bigint, OUT holder_pid integer, OUT prev_token bigint, OUT prev_pid integer, \
                     OUT prev_released boolean) \
                     LANGUAGE plpgsql SET lock_timeout = '2s' AS ",
                    lease_acquire_body(&qs),
                    Some(LEASE_LOCK_TIMEOUT),
                ),
                (
                    "renew_v2",
                    "(p_channel text, p_lock_channel text, p_app text, p_token bigint, p_ttl_us bigint, p_seq bigint, \
                     p_ack bigint) RETURNS boolean LANGUAGE plpgsql SET lock_timeout = '2s' AS ",
                    lease_renew_body(&qs),
                    Some(LEASE_LOCK_TIMEOUT),
                ),
                (
                    "release_v2",
                    "(p_channel text, p_lock_channel text, p_app text, p_token bigint) RETURNS boolean \
                     LANGUAGE plpgsql SET lock_timeout = '2s' AS ",
                    lease_release_body(&qs),
                    Some(LEASE_LOCK_TIMEOUT),
                ),
                (
                    "renew_many",
                    "(p_app text, p_channels text[], p_lock_channels text[], p_tokens bigint[], p_ttl_us bigint[], \
                     p_seqs bigint[], p_acks bigint[], OUT channel text, OUT renewed boolean) RETURNS SETOF record \
                     LANGUAGE plpgsql SET lock_timeout = '2s' AS ",
                    lease_renew_many_body(&qs),
                    Some(LEASE_LOCK_TIMEOUT),
                ),
                (
                    "acquire_many",
                    "(p_app text, p_channels text[], p_lock_channels text[], p_ttl_us bigint[], OUT channel text, \
                     OUT acquired boolean, OUT token bigint, OUT remaining_us bigint, OUT stale_pid integer, \
                     OUT stale_app text, OUT holder_token bigint, OUT holder_pid integer, OUT prev_token bigint, \
                     OUT prev_pid integer, OUT prev_released boolean) RETURNS SETOF record \
                     LANGUAGE plpgsql SET lock_timeout = '2s' AS ",
                    lease_acquire_many_body(&qs),
                    Some(LEASE_LOCK_TIMEOUT),
                ),
                (
                    "balance_v1",
                    "(p_group text, p_app text, p_channels text[], p_leave boolean, OUT app text, OUT held bigint, \
                     OUT channels bigint, OUT is_self boolean, OUT free text[]) RETURNS SETOF record \
                     LANGUAGE plpgsql SET lock_timeout = '2s' AS ",
                    lease_balance_body(&qs),
                    Some(LEASE_LOCK_TIMEOUT),
                ),
                (
                    "terminate_stale",
                    "(p_pid integer, p_app text) RETURNS text LANGUAGE plpgsql AS ",
                    lease_terminate_body(),
                    None,
                ),
                (
                    "timeline",
                    "() RETURNS bigint LANGUAGE sql AS ",
                    lease_timeline_body(),
                    None,
                ),
                (
                    "next_token",
                    "(p_prev bigint) RETURNS bigint LANGUAGE sql AS ",
                    lease_next_token_body(&qs),
                    None,
                ),
                (
                    "old_timeline_free_at",
                    "(p_expires timestamptz, p_seen timestamptz, p_ttl_us bigint) RETURNS timestamptz LANGUAGE sql AS ",
                    lease_old_timeline_free_at_body(),
                    None,
                ),
                (
                    "older_timeline",
                    "(p_token bigint) RETURNS boolean LANGUAGE sql AS ",
                    lease_older_timeline_body(&qs),
                    None,
                ),
            ];
            for (name, signature, fn_body, setting) in functions {
                let def = format!("{signature}{}", dollar_quote(&fn_body, "fn"));
                body.push_str(&ensure_function(schema, name, &def, &fn_body, Some(setting)));
            }
            // The crash watch's wait: a procedure, so that it can commit between its waits.
            let wait = lease_await_holder_body(&qs);
            let def = format!(
                "(p_key integer, p_pid integer, p_max_us bigint, INOUT outcome text DEFAULT NULL) LANGUAGE plpgsql AS {}",
                dollar_quote(&wait, "fn")
            );
            body.push_str(
                &ensure_function(schema, "await_holder", &def, &wait, Some(None))
                    .replace("CREATE OR REPLACE FUNCTION", "CREATE OR REPLACE PROCEDURE"),
            );
        }
    }
    body.push_str("END\n");
    format!("DO {}", dollar_quote(&body, "pgiplock_bootstrap"))
}

/// Creates (or checks) the lock schema of `protocol`. Idempotent and safe to run from many
/// sessions at once.
pub async fn bootstrap(client: &Client, protocol: Protocol, schema: &SchemaName) -> Result<(), DbError> {
    client
        .batch_execute(&bootstrap_sql(protocol, schema))
        .await
        .map_err(|e| db_error(&e))?;
    if protocol == Protocol::Lease {
        // Best effort: on a read-only server the no-op UPDATEs fail after compiling, which is
        // all this is for; a lost connection shows at the next operation.
        if let Err(e) = warm_up(client, schema).await {
            tracing::debug!(error = %e, "warming up the lock functions failed");
        }
    }
    Ok(())
}

/// Runs every path of the `Lease` lock functions of `schema` once on this connection, rolled
/// back ([`warm_up_sql`]); [`bootstrap`] does, and ignores its failure.
pub async fn warm_up(client: &Client, schema: &SchemaName) -> Result<(), DbError> {
    client
        .batch_execute(&warm_up_sql(schema))
        .await
        .map_err(|e| db_error(&e))
}

/// Runs every path of the lock functions once when the session starts, so that each statement
/// in them is planned then rather than when it matters: a backend plans a PL/pgSQL statement at
/// its first execution, and the first winning `acquire_v2` of a session took 8.6 ms against 1.2 ms
/// after, its first refusal 4.2 ms against 1.0, its first `release_v2` 3.8 ms against 1.2
/// (psql on PostgreSQL 15, the same server): a graceful handover runs a first release and a
/// first win back to back. The takeovers (of a holder whose session is gone, and of a live
/// holder's expired lease) run the branches a crash failover and a silent disconnect need.
///
/// The calls work on a channel of this backend's own (`__pgiplock_warm_up__:<pid>`, nobody
/// listens on its lock channel) inside a block that raises at its end, so everything they
/// wrote, and their notifications, are rolled back; the plans stay. On a read-only server the
/// first write fails after compiling what came before, which is all this is for.
///
/// First, the session takes its holder advisory lock ([`holder_key`]) if it does not hold it
/// yet: no extra round trip, and it works on a read-only server too.
fn warm_up_sql(schema: &SchemaName) -> String {
    let qs = quote_ident(schema.as_str());
    let key = holder_key(schema);
    format!(
        r#"SELECT pg_advisory_lock({key}, pg_backend_pid()) WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_locks l
 WHERE l.locktype = 'advisory' AND l.classid = {key}::oid AND l.objid = pg_backend_pid()::oid AND l.objsubid = 2
 AND l.pid = pg_backend_pid() AND l.granted);
DO $pgiplock_warm_up$
DECLARE
  ch text := '__pgiplock_warm_up__:' || pg_backend_pid();
  lc text := '__pgiplock_warm_up__';
  me text := current_setting('application_name');
  t bigint;
BEGIN
  SELECT a.token INTO t FROM {qs}.acquire_v2(ch, lc, me, 10000000) a;
  PERFORM * FROM {qs}.acquire_v2(ch, lc, me || ' (warm-up)', 10000000);
  PERFORM * FROM {qs}.acquire_many(me || ' (warm-up)', ARRAY[ch], ARRAY[lc], ARRAY[10000000::bigint]);
  PERFORM {qs}.renew_v2(ch, lc, me, t, 10000000, 1, NULL);
  PERFORM * FROM {qs}.renew_many(me, ARRAY[ch], ARRAY[lc], ARRAY[t], ARRAY[10000000::bigint], ARRAY[2::bigint], ARRAY[1::bigint]);
  PERFORM {qs}.release_v2(ch, lc, me, t);
  -- A takeover: of a holder whose session is gone (a crash), then of a live holder's expired
  -- lease (a silent disconnect; this backend plays the holder).
  UPDATE {qs}.lease l SET holder = me || ' (gone)', holder_pid = 0, expires_at = now() + INTERVAL '1 hour'
   WHERE l.channel = ch;
  PERFORM * FROM {qs}.acquire_v2(ch, lc, me || ' (warm-up)', 10000000);
  UPDATE {qs}.lease l SET holder = me, holder_pid = pg_backend_pid(), expires_at = now() - INTERVAL '1 second'
   WHERE l.channel = ch;
  PERFORM * FROM {qs}.acquire_v2(ch, lc, me || ' (warm-up)', 10000000);
  RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'pgiplock warm-up: rolled back';
EXCEPTION WHEN raise_exception THEN NULL;
END
$pgiplock_warm_up$"#
    )
}

/// The crash watch's wait on the session of backend `pid` (its advisory lock of `schema`), at
/// most `max`.
pub async fn await_holder(
    client: &Client,
    schema: &SchemaName,
    pid: i32,
    max: Duration,
) -> Result<pgiplock_core::AwaitOutcome, DbError> {
    let qs = quote_ident(schema.as_str());
    let max_us = i64::try_from(max.as_micros()).unwrap_or(i64::MAX);
    // The simple protocol: a procedure that commits may not run in an extended-protocol
    // statement's transaction.
    let sql = format!("CALL {qs}.await_holder({}, {pid}, {max_us})", holder_key(schema));
    let messages = client.simple_query(&sql).await.map_err(|e| db_error(&e))?;
    let word = messages
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .unwrap_or_default();
    pgiplock_core::AwaitOutcome::parse(&word).ok_or_else(|| DbError::Failed(format!("await_holder answered {word:?}")))
}

/// `LISTEN` on the channels of a lock under `protocol` ([`ChannelName::listened`]).
pub(crate) async fn listen(client: &Client, channel: &ChannelName, protocol: Protocol) -> Result<(), DbError> {
    client
        .batch_execute(&statements("LISTEN", channel, protocol))
        .await
        .map_err(|e| db_error(&e))
}

/// `LISTEN` on the channels of several locks, in one multi-statement batch.
pub(crate) async fn listen_many(client: &Client, channels: &[(ChannelName, Protocol)]) -> Result<(), DbError> {
    let sql = channels
        .iter()
        .map(|(channel, protocol)| statements("LISTEN", channel, *protocol))
        .collect::<Vec<_>>()
        .join("; ");
    client.batch_execute(&sql).await.map_err(|e| db_error(&e))
}

/// `UNLISTEN` the channels of a lock under `protocol`; under `Lease` the backend also leaves
/// the channel's waiters in `schema` ([`forget_waiter_sql`]).
pub async fn unlisten(
    client: &Client,
    channel: &ChannelName,
    protocol: Protocol,
    schema: &SchemaName,
) -> Result<(), DbError> {
    let mut sql = statements("UNLISTEN", channel, protocol);
    if protocol == Protocol::Lease {
        sql.push_str("; ");
        sql.push_str(&forget_waiter_sql(schema, channel));
    }
    client.batch_execute(&sql).await.map_err(|e| db_error(&e))
}

/// Deletes this backend's waiter row of `channel`, so that a release does not name a backend
/// that stopped listening. Best effort, as the row itself ([`note_waiter_sql`]): a missing
/// table or schema, a role without rights on it or a read-only server leave it as it is,
/// and the `UNLISTEN` of the same batch (one implicit transaction) still commits.
fn forget_waiter_sql(schema: &SchemaName, channel: &ChannelName) -> String {
    let body = format!(
        "BEGIN DELETE FROM {}.lease_waiter w WHERE w.channel = {} AND w.pid = pg_backend_pid(); \
         EXCEPTION WHEN OTHERS THEN NULL; END",
        quote_ident(schema.as_str()),
        quote_literal(channel.as_str())
    );
    format!("DO {}", dollar_quote(&body, "pgiplock_unlisten"))
}

/// `LISTEN "a"; LISTEN "b"; ...` over the channels of a lock.
fn statements(verb: &str, channel: &ChannelName, protocol: Protocol) -> String {
    channel
        .listened(protocol)
        .map(|c| format!("{verb} {}", quote_ident(c)))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Everything an operation needs to know about its lock and session.
#[derive(Debug, Clone)]
pub struct Target {
    /// The lock's protocol.
    pub protocol: Protocol,
    /// The schema of the lock table.
    pub schema: SchemaName,
    /// The lock's channel.
    pub channel: ChannelName,
    /// The session's `application_name` (the holder identity).
    pub app: String,
    /// Lease length (`Lease`).
    pub lease_ttl: Duration,
}

fn token_param(token: Option<FenceToken>) -> Result<i64, DbError> {
    let token = token.ok_or_else(|| DbError::Failed("a Lease operation without a token".to_owned()))?;
    i64::try_from(token.0).map_err(|_| DbError::Failed(format!("token {token} out of range")))
}

fn ttl_micros(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX)
}

/// Runs one operation of `target`'s protocol on `client`, whose session must have
/// `application_name = target.app`. Implements the semantics documented on [`DbOp`].
pub async fn execute(client: &Client, target: &Target, op: &DbOp) -> Result<Reply, DbError> {
    let qs = quote_ident(target.schema.as_str());
    let lock_channel = target.channel.lock_channel();
    let text = |s: &str| s.to_owned();
    let result = match (target.protocol, op) {
        (Protocol::Classic, DbOp::Acquire) => {
            let sql = format!(
                "INSERT INTO {qs}.lock AS l (channel, app) VALUES ($1, $2) ON CONFLICT (channel) DO UPDATE \
                 SET app = CASE WHEN l.app = $2 THEN $2 ELSE {qs}.deadlock_check(l.app, $2) END"
            );
            let params: [(&(dyn ToSql + Sync), Type); 2] = [(&lock_channel, Type::TEXT), (&target.app, Type::TEXT)];
            match client.execute_typed(&sql, &params).await {
                Ok(_) => Ok(Reply::Acquire(AcquireReply::won(None))),
                Err(e) if is_locked(&e) => Ok(Reply::Acquire(AcquireReply::locked())),
                Err(e) => Err(e),
            }
        }
        (Protocol::Classic, DbOp::Renew { .. }) => {
            let sql = format!("SELECT app FROM {qs}.lock WHERE channel = $1");
            let rows = client.query_typed(&sql, &[(&lock_channel, Type::TEXT)]).await;
            rows.map(|rows| {
                let owned = rows
                    .first()
                    .and_then(|r| r.try_get::<_, String>(0).ok())
                    .is_some_and(|app| app == target.app);
                Reply::Renew { owned }
            })
        }
        (Protocol::Classic, DbOp::Drain { .. }) => {
            // On the drain channel: Node standbys would read anything on the lock channel as a
            // release and attempt while we still hold.
            let marker = Marker::Draining(None);
            notify(
                client,
                marker.channel(Protocol::Classic, &target.channel),
                &marker.payload(),
            )
            .await
        }
        (Protocol::Classic, DbOp::Release { .. }) => {
            let sql = format!("DELETE FROM {qs}.lock WHERE channel = $1 AND app = $2");
            let params: [(&(dyn ToSql + Sync), Type); 2] = [(&lock_channel, Type::TEXT), (&target.app, Type::TEXT)];
            client
                .execute_typed(&sql, &params)
                .await
                .map(|n| Reply::Release { released: n == 1 })
        }
        (Protocol::Classic, DbOp::TerminateStale { pid, app }) => {
            // Classic never reports stale holders; kept for completeness without a function.
            let sql = "SELECT pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity \
                       WHERE pid = $1 AND application_name = $2";
            let params: [(&(dyn ToSql + Sync), Type); 2] = [(pid, Type::INT4), (app, Type::TEXT)];
            match client.query_typed(sql, &params).await {
                Ok(rows) if rows.first().and_then(|r| r.try_get::<_, bool>(0).ok()) == Some(true) => {
                    Ok(Reply::Terminate(TerminateOutcome::Terminated))
                }
                Ok(_) => Ok(Reply::Terminate(TerminateOutcome::Gone)),
                Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {
                    Ok(Reply::Terminate(TerminateOutcome::NotPermitted))
                }
                Err(e) => Err(e),
            }
        }
        (Protocol::Lease, DbOp::Acquire) => {
            let sql =
                format!("SELECT acquired, token, remaining_us, stale_pid, stale_app, holder_token, holder_pid, prev_token, prev_pid, prev_released FROM {qs}.acquire_v2($1, $2, $3, $4)");
            let channel = text(target.channel.as_str());
            let ttl = ttl_micros(target.lease_ttl);
            let params: [(&(dyn ToSql + Sync), Type); 4] = [
                (&channel, Type::TEXT),
                (&lock_channel, Type::TEXT),
                (&target.app, Type::TEXT),
                (&ttl, Type::INT8),
            ];
            match client.query_typed(&sql, &params).await {
                Ok(rows) => return lease_acquire_reply(rows.first()),
                Err(e) => Err(e),
            }
        }
        (Protocol::Lease, DbOp::Renew { token, progress }) => {
            let sql = format!("SELECT {qs}.renew_v2($1, $2, $3, $4, $5, $6, $7)");
            let channel = text(target.channel.as_str());
            let token = token_param(*token)?;
            let ttl = ttl_micros(target.lease_ttl);
            let number = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
            let seq = progress.map(|p| number(p.seq));
            let ack = progress.and_then(|p| p.ack).map(number);
            let params: [(&(dyn ToSql + Sync), Type); 7] = [
                (&channel, Type::TEXT),
                (&lock_channel, Type::TEXT),
                (&target.app, Type::TEXT),
                (&token, Type::INT8),
                (&ttl, Type::INT8),
                (&seq, Type::INT8),
                (&ack, Type::INT8),
            ];
            match client.query_typed(&sql, &params).await {
                Ok(rows) => return single_bool(rows.first()).map(|owned| Reply::Renew { owned }),
                Err(e) => Err(e),
            }
        }
        (Protocol::Lease, DbOp::Drain { token }) => {
            let payload = Marker::Draining(*token).payload();
            notify(client, lock_channel, &payload).await
        }
        (Protocol::Lease, DbOp::Drained { token }) => {
            let payload = Marker::Drained(*token).payload();
            notify(client, lock_channel, &payload).await
        }
        (Protocol::Lease, DbOp::Release { token }) => {
            let sql = format!("SELECT {qs}.release_v2($1, $2, $3, $4)");
            let channel = text(target.channel.as_str());
            let token = token_param(*token)?;
            let params: [(&(dyn ToSql + Sync), Type); 4] = [
                (&channel, Type::TEXT),
                (&lock_channel, Type::TEXT),
                (&target.app, Type::TEXT),
                (&token, Type::INT8),
            ];
            match client.query_typed(&sql, &params).await {
                Ok(rows) => return single_bool(rows.first()).map(|released| Reply::Release { released }),
                Err(e) => Err(e),
            }
        }
        (Protocol::Lease, DbOp::TerminateStale { pid, app }) => {
            let sql = format!("SELECT {qs}.terminate_stale($1, $2)");
            let params: [(&(dyn ToSql + Sync), Type); 2] = [(pid, Type::INT4), (app, Type::TEXT)];
            match client.query_typed(&sql, &params).await {
                Ok(rows) => {
                    let outcome = rows.first().and_then(|r| r.try_get::<_, String>(0).ok());
                    return match outcome.as_deref() {
                        Some("terminated") => Ok(Reply::Terminate(TerminateOutcome::Terminated)),
                        Some("not_permitted") => Ok(Reply::Terminate(TerminateOutcome::NotPermitted)),
                        Some("gone") => Ok(Reply::Terminate(TerminateOutcome::Gone)),
                        other => Err(DbError::Failed(format!("unexpected terminate_stale result {other:?}"))),
                    };
                }
                Err(e) => Err(e),
            }
        }
        (_, op) => return Err(DbError::Failed(format!("operation {} is not supported", op.name()))),
    };
    result.map_err(|e| db_error(&e))
}

/// Which batched operation [`execute_batch`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchOp {
    /// Every entry's `DbOp::Renew` (`renew_many`).
    Renew,
    /// Every entry's `DbOp::Acquire` (`acquire_many`).
    Acquire,
}

/// One lock of a batch: its channel, lease length and operation.
#[derive(Debug, Clone)]
pub struct BatchTarget {
    /// The lock's channel.
    pub channel: ChannelName,
    /// Lease length.
    pub lease_ttl: Duration,
    /// Its operation (`DbOp::Renew` or `DbOp::Acquire`, as `op` says).
    pub op: DbOp,
}

/// Runs the `Lease` operations of many locks of `app`'s session whose tables are in `schema` as
/// one statement (`renew_many` or `acquire_many`: each entry exactly as its own `DbOp` would
/// run, in one transaction); returns one reply per entry, in order. Implements
/// `SessionOp::RenewMany` and `SessionOp::AcquireMany`.
pub async fn execute_batch(
    client: &Client,
    schema: &SchemaName,
    app: &str,
    op: BatchOp,
    entries: &[BatchTarget],
) -> Result<Vec<Reply>, DbError> {
    let qs = quote_ident(schema.as_str());
    let channels: Vec<&str> = entries.iter().map(|e| e.channel.as_str()).collect();
    let lock_channels: Vec<&str> = entries.iter().map(|e| e.channel.lock_channel()).collect();
    let ttls: Vec<i64> = entries.iter().map(|e| ttl_micros(e.lease_ttl)).collect();
    let rows = match op {
        BatchOp::Renew => {
            let number = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
            let mut tokens = Vec::with_capacity(entries.len());
            let mut seqs = Vec::with_capacity(entries.len());
            let mut acks = Vec::with_capacity(entries.len());
            for entry in entries {
                let DbOp::Renew { token, progress } = &entry.op else {
                    return Err(DbError::Failed(format!("{} in a renewal batch", entry.op.name())));
                };
                tokens.push(token_param(*token)?);
                seqs.push(progress.map(|p| number(p.seq)));
                acks.push(progress.and_then(|p| p.ack).map(number));
            }
            let sql = format!("SELECT channel, renewed FROM {qs}.renew_many($1, $2, $3, $4, $5, $6, $7)");
            let params: [(&(dyn ToSql + Sync), Type); 7] = [
                (&app, Type::TEXT),
                (&channels, Type::TEXT_ARRAY),
                (&lock_channels, Type::TEXT_ARRAY),
                (&tokens, Type::INT8_ARRAY),
                (&ttls, Type::INT8_ARRAY),
                (&seqs, Type::INT8_ARRAY),
                (&acks, Type::INT8_ARRAY),
            ];
            client.query_typed(&sql, &params).await
        }
        BatchOp::Acquire => {
            if let Some(entry) = entries.iter().find(|e| e.op != DbOp::Acquire) {
                return Err(DbError::Failed(format!("{} in an acquisition batch", entry.op.name())));
            }
            let sql = format!(
                "SELECT channel, acquired, token, remaining_us, stale_pid, stale_app, holder_token, holder_pid, \
                 prev_token, prev_pid, prev_released FROM {qs}.acquire_many($1, $2, $3, $4)"
            );
            let params: [(&(dyn ToSql + Sync), Type); 4] = [
                (&app, Type::TEXT),
                (&channels, Type::TEXT_ARRAY),
                (&lock_channels, Type::TEXT_ARRAY),
                (&ttls, Type::INT8_ARRAY),
            ];
            client.query_typed(&sql, &params).await
        }
    }
    .map_err(|e| db_error(&e))?;
    if rows.len() != entries.len() {
        return Err(DbError::Failed(format!(
            "{} rows for a batch of {}",
            rows.len(),
            entries.len()
        )));
    }
    // The function returns the rows in the arrays' order; each names its channel, checked.
    let mut replies = Vec::with_capacity(rows.len());
    for (row, entry) in rows.iter().zip(entries) {
        let channel: Option<String> = row.try_get("channel").map_err(|e| db_error(&e))?;
        if channel.as_deref() != Some(entry.channel.as_str()) {
            return Err(DbError::Failed(format!(
                "a batch row for channel {channel:?} where {:?} was expected",
                entry.channel.as_str()
            )));
        }
        replies.push(match op {
            BatchOp::Renew => {
                let renewed: Option<bool> = row.try_get("renewed").map_err(|e| db_error(&e))?;
                Reply::Renew {
                    owned: renewed.unwrap_or(false),
                }
            }
            BatchOp::Acquire => lease_acquire_reply(Some(row))?,
        });
    }
    Ok(replies)
}

/// Runs `SessionOp::Balance` for `app`'s session: records it as a member of `group` in
/// `schema` (or forgets it, `leave`) with `register` as the group's channels, and returns the
/// group's counts as the table has them.
pub async fn balance(
    client: &Client,
    schema: &SchemaName,
    app: &str,
    group: &str,
    register: &[ChannelName],
    leave: bool,
) -> Result<BalanceCounts, DbError> {
    let qs = quote_ident(schema.as_str());
    let channels: Vec<&str> = register.iter().map(|c| c.as_str()).collect();
    let sql = format!("SELECT app, held, channels, is_self, free FROM {qs}.balance_v1($1, $2, $3, $4)");
    let params: [(&(dyn ToSql + Sync), Type); 4] = [
        (&group, Type::TEXT),
        (&app, Type::TEXT),
        (&channels, Type::TEXT_ARRAY),
        (&leave, Type::BOOL),
    ];
    let rows = client.query_typed(&sql, &params).await.map_err(|e| db_error(&e))?;
    let bad = |e: tokio_postgres::Error| db_error(&e);
    let mut counts = BalanceCounts::default();
    for (i, row) in rows.iter().enumerate() {
        let held: Option<i64> = row.try_get("held").map_err(bad)?;
        let channels: Option<i64> = row.try_get("channels").map_err(bad)?;
        let is_self: Option<bool> = row.try_get("is_self").map_err(bad)?;
        counts
            .members
            .push(held.and_then(|h| u64::try_from(h).ok()).unwrap_or(0));
        counts.channels = channels.and_then(|n| u64::try_from(n).ok()).unwrap_or(0);
        if is_self == Some(true) {
            counts.own = Some(i);
        }
        if i == 0 {
            let free: Option<Vec<String>> = row.try_get("free").map_err(bad)?;
            counts.free = free.unwrap_or_default();
        }
    }
    if rows.is_empty() {
        // No live member listed (we just left): the group's size is unknown and irrelevant.
        counts.channels = 0;
    }
    Ok(counts)
}

/// Classic's "locked": `deadlock_check` raised P0001 with detail `LOCKED`.
fn is_locked(e: &tokio_postgres::Error) -> bool {
    e.as_db_error()
        .is_some_and(|db| db.code() == &SqlState::RAISE_EXCEPTION && db.detail() == Some("LOCKED"))
}

async fn notify(client: &Client, channel: &str, payload: &str) -> Result<Reply, tokio_postgres::Error> {
    let params: [(&(dyn ToSql + Sync), Type); 2] = [(&channel, Type::TEXT), (&payload, Type::TEXT)];
    client
        .query_typed("SELECT pg_notify($1, $2)", &params)
        .await
        .map(|_| Reply::Drained)
}

fn single_bool(row: Option<&tokio_postgres::Row>) -> Result<bool, DbError> {
    let row = row.ok_or_else(|| DbError::Failed("no row returned".to_owned()))?;
    row.try_get::<_, Option<bool>>(0)
        .map(|b| b.unwrap_or(false))
        .map_err(|e| db_error(&e))
}

fn lease_acquire_reply(row: Option<&tokio_postgres::Row>) -> Result<Reply, DbError> {
    let row = row.ok_or_else(|| DbError::Failed("acquire returned no row".to_owned()))?;
    let bad = |e: tokio_postgres::Error| db_error(&e);
    let acquired: Option<bool> = row.try_get("acquired").map_err(bad)?;
    let token: Option<i64> = row.try_get("token").map_err(bad)?;
    let remaining: Option<i64> = row.try_get("remaining_us").map_err(bad)?;
    let stale_pid: Option<i32> = row.try_get("stale_pid").map_err(bad)?;
    let stale_app: Option<String> = row.try_get("stale_app").map_err(bad)?;
    let holder_token: Option<i64> = row.try_get("holder_token").map_err(bad)?;
    let holder_pid: Option<i32> = row.try_get("holder_pid").map_err(bad)?;
    let prev_token: Option<i64> = row.try_get("prev_token").map_err(bad)?;
    let prev_pid: Option<i32> = row.try_get("prev_pid").map_err(bad)?;
    let prev_released: Option<bool> = row.try_get("prev_released").map_err(bad)?;
    let acquired = acquired.unwrap_or(false);
    let as_token = |t: Option<i64>| t.and_then(|t| u64::try_from(t).ok()).map(FenceToken);
    let token = as_token(token);
    if acquired && token.is_none() {
        return Err(DbError::Failed("acquired without a token".to_owned()));
    }
    Ok(Reply::Acquire(AcquireReply {
        acquired,
        token: if acquired { token } else { None },
        lease_remaining: remaining.map(|us| Duration::from_micros(u64::try_from(us).unwrap_or(0))),
        stale_holder: match (stale_pid, stale_app) {
            (Some(pid), Some(app)) => Some(StaleHolder { pid, app }),
            _ => None,
        },
        holder_pid,
        holder_token: if acquired { None } else { as_token(holder_token) },
        previous: as_token(prev_token).filter(|_| acquired).map(|token| PreviousTerm {
            token,
            holder_pid: prev_pid,
            released: prev_released.unwrap_or(false),
        }),
    }))
}

/// One row of the lock table, as `pgiplock status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockStatus {
    /// The user's channel (without the lock-channel prefix).
    pub channel: String,
    /// The holder's application name (`None` when released, under `Lease`).
    pub holder: Option<String>,
    /// The holder's backend pid (`Lease`).
    pub holder_pid: Option<i32>,
    /// Whether the holder's session is still in `pg_stat_activity`.
    pub holder_alive: bool,
    /// The current or last term's fencing token (`Lease`).
    pub token: Option<FenceToken>,
    /// Time left on the lease by the server's clock; zero when expired (`Lease`, held rows).
    pub lease_remaining: Option<Duration>,
}

/// Reads every lock row of `schema` (the protocol's default when `None`) over a fresh
/// connection. Returns an empty list when the schema or its table does not exist.
pub async fn lock_status(
    config: tokio_postgres::Config,
    protocol: Protocol,
    schema: Option<&str>,
) -> Result<Vec<LockStatus>, crate::Error> {
    let schema = SchemaName::new(schema.unwrap_or(default_schema(protocol)))?;
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(crate::Error::Connect)?;
    let driver = tokio::spawn(async move {
        // Status reads need no notifications: the ordinary way of driving the connection is fine.
        let _ = connection.await;
    });
    let result = lock_status_on(&client, protocol, &schema).await;
    drop(client);
    let _ = driver.await;
    result
}

/// [`lock_status`] on an existing client.
pub async fn lock_status_on(
    client: &Client,
    protocol: Protocol,
    schema: &SchemaName,
) -> Result<Vec<LockStatus>, crate::Error> {
    let qs = quote_ident(schema.as_str());
    let table = match protocol {
        Protocol::Classic => format!("{qs}.lock"),
        Protocol::Lease => format!("{qs}.lease"),
    };
    let exists = client
        .query_typed("SELECT to_regclass($1) IS NOT NULL", &[(&table, Type::TEXT)])
        .await?;
    if !exists.first().is_some_and(|r| r.get::<_, bool>(0)) {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    match protocol {
        Protocol::Classic => {
            let sql = format!(
                "SELECT l.channel::text, l.app::text, EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a \
                 WHERE a.application_name = l.app) FROM {table} l ORDER BY l.channel"
            );
            for row in client.query(&sql, &[]).await? {
                let channel: String = row.try_get(0)?;
                out.push(LockStatus {
                    channel: channel
                        .strip_prefix(LOCK_CHANNEL_PREFIX)
                        .map_or(channel.clone(), str::to_owned),
                    holder: row.try_get(1)?,
                    holder_pid: None,
                    holder_alive: row.try_get(2)?,
                    token: None,
                    lease_remaining: None,
                });
            }
        }
        Protocol::Lease => {
            let sql = format!(
                "SELECT l.channel, l.holder, CASE WHEN l.holder IS NULL THEN NULL ELSE l.holder_pid END, l.token, \
                 EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a WHERE a.pid = l.holder_pid AND a.application_name = l.holder), \
                 CASE WHEN l.holder IS NULL THEN NULL ELSE GREATEST(0, (EXTRACT(EPOCH FROM (l.expires_at - now())) * 1000000)::bigint) END \
                 FROM {table} l ORDER BY l.channel"
            );
            for row in client.query(&sql, &[]).await? {
                let token: i64 = row.try_get(3)?;
                let remaining: Option<i64> = row.try_get(5)?;
                out.push(LockStatus {
                    channel: row.try_get(0)?,
                    holder: row.try_get(1)?,
                    holder_pid: row.try_get(2)?,
                    holder_alive: row.try_get(4)?,
                    token: u64::try_from(token).ok().filter(|t| *t > 0).map(FenceToken),
                    lease_remaining: remaining.map(|us| Duration::from_micros(u64::try_from(us).unwrap_or(0))),
                });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_and_dollar_quotes() {
        assert_eq!(quote_literal("a'b\\c"), "E'a''b\\\\c'");
        assert_eq!(dollar_quote("x", "fn"), "$fn$x$fn$");
        assert_eq!(dollar_quote("x $fn$ y", "fn"), "$fn1$x $fn$ y$fn1$");
    }

    #[test]
    fn forget_waiter_quotes_hostile_names() {
        let schema = SchemaName::new("s$pgiplock_unlisten$\"").unwrap();
        let channel = ChannelName::new("c'$pgiplock_unlisten$\\").unwrap();
        let sql = forget_waiter_sql(&schema, &channel);
        assert!(
            sql.starts_with("DO $pgiplock_unlisten1$BEGIN DELETE FROM \"s$pgiplock_unlisten$\"\"\".lease_waiter"),
            "{sql}"
        );
        assert!(sql.contains("w.channel = E'c''$pgiplock_unlisten$\\\\'"), "{sql}");
        assert!(sql.ends_with("END$pgiplock_unlisten1$"), "{sql}");
    }

    #[test]
    fn bootstrap_quotes_hostile_schema() {
        let schema = SchemaName::new("we$pgiplock_bootstrap$ird\"'").unwrap();
        let sql = bootstrap_sql(Protocol::Lease, &schema);
        assert!(sql.starts_with("DO $pgiplock_bootstrap1$"));
        assert!(sql.contains("\"we$pgiplock_bootstrap$ird\"\"'\""));
    }
}

//! Conformance of the simulator's model of fair share (`SimDb::balance`) with the real
//! `balance_v1` on a real server: one fixed sequence of memberships, acquisitions, a leave and a
//! session that ends, after each of which both worlds must report the same counts (the group's
//! channel count, every live member's holdings in member order, the caller's place, the free
//! channels).

use std::time::Duration;

use pgiplock_core::{BalanceCounts, ChannelName, DbOp, Protocol, Reply, SchemaName};
use pgiplock_sim::db::{DbConfig, SimDb};
use pgiplock_testkit::sql::{balance, bootstrap, execute, Target};
use pgiplock_tests::{database_url, unique_hex, Listener, TestSchema};

const TTL: Duration = Duration::from_secs(60);

#[tokio::test]
async fn the_model_counts_as_the_server_does() {
    let url = database_url();
    let schema = TestSchema::new();
    let schema_name = SchemaName::new(schema.name()).expect("schema name");
    let hex = unique_hex();
    // Application names in the order the table lists members (bytewise).
    let apps: Vec<String> = (0..3).map(|i| format!("bal{i}-{hex}")).collect();
    let channels: Vec<ChannelName> = (0..4)
        .map(|i| ChannelName::new(&format!("bc{i}_{hex}")).expect("channel"))
        .collect();
    let group = format!("g{hex}");
    let sep = if url.contains('?') { '&' } else { '?' };
    let mut real = Vec::new();
    let mut model = SimDb::new(DbConfig::default());
    let mut sim = Vec::new();
    for app in &apps {
        real.push(Some(
            Listener::connect(&format!("{url}{sep}application_name={app}"), &[]).await,
        ));
        sim.push(model.open_session(app).0);
    }
    fn client(real: &[Option<Listener>], s: usize) -> &tokio_postgres::Client {
        real[s].as_ref().expect("open").client()
    }
    bootstrap(client(&real, 0), Protocol::Lease, &schema_name)
        .await
        .expect("bootstrap");
    model
        .bootstrap(sim[0], Protocol::Lease, &schema_name)
        .expect("model bootstrap");

    // Both worlds run `balance` for session `s`; they must agree.
    async fn compare(
        step: &str,
        real: &[Option<Listener>],
        model: &mut SimDb,
        sim: &[pgiplock_core::SessionId],
        (schema, app, group, s): (&SchemaName, &str, &str, usize),
        register: &[ChannelName],
        leave: bool,
    ) -> BalanceCounts {
        let client = real[s].as_ref().expect("open").client();
        let got = balance(client, schema, app, group, register, leave)
            .await
            .unwrap_or_else(|e| panic!("{step}: {e}"));
        let want = model
            .balance(sim[s], group, register, leave)
            .unwrap_or_else(|e| panic!("{step}: model: {e}"));
        let mut want_free = want.free.clone();
        want_free.sort();
        let mut got_free = got.free.clone();
        got_free.sort();
        assert_eq!(
            (got.channels, &got.members, got.own, got_free),
            (want.channels, &want.members, want.own, want_free),
            "{step}: server vs model"
        );
        got
    }
    let names = |s: usize| (&schema_name, apps[s].as_str(), group.as_str(), s);

    // s0 joins with every channel; nobody holds anything yet.
    let c = compare("s0 joins", &real, &mut model, &sim, names(0), &channels, false).await;
    assert_eq!(
        (c.channels, c.members.clone(), c.own, c.free.len()),
        (4, vec![0], Some(0), 4)
    );
    // s0 acquires two channels, s1 one.
    for (s, ch) in [(0usize, 0usize), (0, 1), (1, 2)] {
        let target = Target {
            protocol: Protocol::Lease,
            schema: schema_name.clone(),
            channel: channels[ch].clone(),
            app: apps[s].clone(),
            lease_ttl: TTL,
        };
        let got = execute(client(&real, s), &target, &DbOp::Acquire)
            .await
            .expect("acquire");
        let want = model
            .execute(sim[s], Protocol::Lease, &channels[ch], TTL, &DbOp::Acquire)
            .expect("model acquire");
        let won = |r: &Reply| matches!(r, Reply::Acquire(a) if a.acquired);
        assert!(won(&got) && won(&want), "s{s} acquires channel {ch}");
    }
    compare("s1 joins", &real, &mut model, &sim, names(1), &[], false).await;
    let c = compare("s2 joins", &real, &mut model, &sim, names(2), &[], false).await;
    assert_eq!((c.members.clone(), c.own, c.free.len()), (vec![2, 1, 0], Some(2), 1));
    // s1 leaves: listed no more, though it still holds its lease.
    let c = compare("s1 leaves", &real, &mut model, &sim, names(1), &[], true).await;
    assert_eq!(c.own, None);
    let c = compare("after the leave", &real, &mut model, &sim, names(0), &[], false).await;
    assert_eq!(c.members, vec![2, 0]);
    // s0's session ends: it is forgotten, and its channels are free.
    if let Some(listener) = real[0].take() {
        drop(listener);
    }
    model.close_session(sim[0]);
    // The server forgets the backend once it has exited; wait (bounded) for that.
    let probe = client(&real, 2);
    let mut gone = false;
    for _ in 0..100 {
        let row = probe
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                &[&apps[0]],
            )
            .await
            .expect("pg_stat_activity");
        if row.get::<_, i64>(0) == 0 {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(gone, "s0's backend never left pg_stat_activity");
    let c = compare("after s0 ended", &real, &mut model, &sim, names(2), &[], false).await;
    assert_eq!((c.members.clone(), c.free.len()), (vec![0], 3));
    drop(schema);
}

//! A server that turns read-only under a holder: the session reports it, resets, and with a
//! multi-host connection string (`target_session_attrs=read-write`) moves on to the writable
//! host and holds there. The first host is a throwaway cluster; the second the test server.

use std::time::Duration;

use pgiplock::{LockMessage, LockOptions, Session, Subscription, Warning};
use pgiplock_testkit::cluster::TempCluster;
use pgiplock_tests::{backends_of_app, connect, database_url, unique_channel, TestSchema};
use tokio::time::Instant;
use tokio_postgres::config::{Host, TargetSessionAttrs};
use tokio_postgres::Config;

const WAIT: Duration = Duration::from_secs(30);

async fn next_matching(sub: &mut Subscription, what: &str, pred: impl Fn(&LockMessage) -> bool) -> LockMessage {
    pgiplock_tests::next_message(sub, what, WAIT, pred).await
}

#[tokio::test]
async fn a_holder_whose_server_turns_read_only_moves_to_the_writable_host() {
    let _heavy = pgiplock_tests::heavy_guard().await;
    let cluster = tokio::task::spawn_blocking(TempCluster::start)
        .await
        .expect("join")
        .expect("throwaway cluster");
    let main_url = database_url();
    let main: Config = main_url.parse().expect("database URL");
    let user = main.get_user().unwrap_or("postgres").to_owned();
    let dbname = main.get_dbname().unwrap_or("postgres").to_owned();
    let Host::Tcp(main_host) = &main.get_hosts()[0] else {
        panic!("the test server is reached over TCP");
    };
    let main_port = main.get_ports().first().copied().unwrap_or(5432);

    // The first host gets the test server's role and database, so one string fits both.
    let first = connect(&cluster.url()).await;
    let quote = pgiplock_core::quote_ident;
    if user != "postgres" {
        first
            .batch_execute(&format!("CREATE ROLE {} LOGIN SUPERUSER", quote(&user)))
            .await
            .expect("role");
    }
    if dbname != "postgres" {
        first
            .batch_execute(&format!("CREATE DATABASE {}", quote(&dbname)))
            .await
            .expect("database");
    }

    let mut both = Config::new();
    both.user(&user)
        .dbname(&dbname)
        .host("127.0.0.1")
        .port(cluster.port())
        .host(main_host)
        .port(main_port)
        .target_session_attrs(TargetSessionAttrs::ReadWrite);
    if let Some(password) = main.get_password() {
        both.password(password);
    }

    let schema = TestSchema::on(&main_url); // drops the schema on the test server afterwards
    let options = LockOptions::new()
        .schema(schema.name())
        .lease_ttl(Duration::from_secs(3))
        .acquire_interval(Duration::from_secs(1));
    let session = Session::connect(both).await.expect("connect");
    let lock = session.lock(&unique_channel(), options).expect("lock");
    let mut sub = lock.subscribe();
    lock.init().await.expect("init");
    next_matching(&mut sub, "acquired on the first host", |m| {
        matches!(m, LockMessage::Acquired { .. })
    })
    .await;
    let first_app = session.app_name();
    let first_db = connect(&format!("postgres://postgres@127.0.0.1:{}/{dbname}", cluster.port())).await;
    assert_eq!(
        backends_of_app(&first_db, &first_app).await.len(),
        1,
        "holds on the first host"
    );

    let turned = Instant::now();
    for statement in [
        "ALTER SYSTEM SET default_transaction_read_only = on",
        "SELECT pg_reload_conf()",
    ] {
        first_db.batch_execute(statement).await.expect("turn read-only");
    }
    next_matching(&mut sub, "a read-only warning", |m| {
        matches!(m, LockMessage::Warning(Warning::ServerReadOnly))
    })
    .await;
    let warned = turned.elapsed();
    next_matching(&mut sub, "acquired on the writable host", |m| {
        matches!(m, LockMessage::Acquired { .. })
    })
    .await;
    let moved = turned.elapsed();
    let main_client = connect(&main_url).await;
    let app = session.app_name();
    assert_ne!(app, first_app);
    assert_eq!(
        backends_of_app(&main_client, &app).await.len(),
        1,
        "holds on the writable host"
    );
    println!("server turned read-only: warned after {warned:?}, holding on the writable host after {moved:?}");

    session.close().await;
    drop(first_db);
    drop(first);
    tokio::task::spawn_blocking(move || drop(cluster)).await.expect("join");
}

//! Error messages say why: the server's message and SQLSTATE, or the driver's cause, each once.
//!
//! Needs the server of `PGIPLOCK_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`).

mod common;

use std::error::Error as _;

use pgiplock::{Error, PgError, Session};

/// A loopback port nothing listens on: bound, then released.
fn unused_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    listener.local_addr().expect("local address").port()
}

/// The error and its causes as a chain printer without any de-duplication shows them.
fn naive_chain(error: &(dyn std::error::Error + 'static)) -> Vec<String> {
    let mut texts = vec![error.to_string()];
    let mut source = error.source();
    while let Some(cause) = source {
        texts.push(cause.to_string());
        source = cause.source();
    }
    texts
}

/// No cause repeats what the error or an earlier cause already said.
fn assert_each_fact_once(error: &(dyn std::error::Error + 'static)) {
    let texts = naive_chain(error);
    for (i, text) in texts.iter().enumerate().skip(1) {
        let said = texts[..i].join(": ");
        assert!(!said.contains(text.as_str()), "cause {text:?} repeats {said:?}");
    }
    let all = texts.join(": ");
    for noise in ["db error", "FATAL", "ERROR:"] {
        assert!(!all.contains(noise), "{all:?} contains {noise:?}");
    }
}

#[tokio::test]
async fn a_server_refusal_says_the_message_and_sqlstate() {
    let mut config = common::config();
    config.dbname("no_such_db_xyz");
    let error = Session::connect(config.clone()).await.expect_err("no such database");
    assert!(matches!(error, Error::Connect(_)), "{error:?}");
    assert_eq!(
        error.to_string(),
        r#"cannot connect to PostgreSQL: database "no_such_db_xyz" does not exist (SQLSTATE 3D000)"#
    );
    assert_eq!(error.sqlstate(), Some("3D000"));
    assert!(error.source().is_none(), "the message already says it all");
    assert_each_fact_once(&error);

    let raw = config
        .connect(tokio_postgres::NoTls)
        .await
        .err()
        .expect("no such database");
    let wrapped = PgError::from(raw);
    assert_eq!(
        wrapped.to_string(),
        r#"database "no_such_db_xyz" does not exist (SQLSTATE 3D000)"#
    );
    assert_eq!(wrapped.code(), Some("3D000"));
    assert!(wrapped.as_db_error().is_some());
    assert_each_fact_once(&wrapped);
}

#[tokio::test]
async fn a_statement_error_carries_detail_and_hint() {
    let admin = common::admin().await;
    let raw = admin
        .client
        .batch_execute(
            "DO $$ BEGIN RAISE EXCEPTION 'lock broke' USING DETAIL = 'row 7 vanished', \
             HINT = 'run it again', ERRCODE = 'P0001'; END $$",
        )
        .await
        .expect_err("the block raises");
    let wrapped = PgError::from(raw);
    assert_eq!(
        wrapped.to_string(),
        "lock broke (SQLSTATE P0001); detail: row 7 vanished; hint: run it again"
    );
    assert_each_fact_once(&wrapped);
    let error = Error::from(wrapped.into_inner());
    assert_eq!(
        error.to_string(),
        "database error: lock broke (SQLSTATE P0001); detail: row 7 vanished; hint: run it again"
    );
    assert_eq!(error.sqlstate(), Some("P0001"));
    assert_each_fact_once(&error);
}

#[tokio::test]
async fn a_refused_connection_says_refused_once() {
    // A fresh config: `host` and `port` append to the test server's, they do not replace them.
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(unused_port())
        .user("postgres")
        .dbname("test");
    let error = Session::connect(config.clone()).await.expect_err("nothing listens");
    assert!(matches!(error, Error::Connect(_)), "{error:?}");
    let text = error.to_string();
    assert!(
        text.starts_with("cannot connect to PostgreSQL: error connecting to server: "),
        "{text}"
    );
    #[cfg(target_os = "linux")]
    assert_eq!(
        text,
        "cannot connect to PostgreSQL: error connecting to server: Connection refused (os error 111)"
    );
    assert_eq!(error.sqlstate(), None);
    assert!(error.postgres().is_some());
    assert_each_fact_once(&error);

    let raw = config
        .connect(tokio_postgres::NoTls)
        .await
        .err()
        .expect("nothing listens");
    let wrapped = PgError::from(raw);
    assert!(
        wrapped.to_string().starts_with("error connecting to server: "),
        "{wrapped}"
    );
    assert_eq!(wrapped.code(), None);
    assert_each_fact_once(&wrapped);
}

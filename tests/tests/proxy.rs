//! The blackhole proxy in front of a real PostgreSQL: queries flow, a cut stalls them without
//! closing anything (the server still sees the session), a heal lets them complete.

use std::time::Duration;

use pgiplock_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_blackholes_a_postgres_session_and_heals() {
    let url = database_url();
    let proxy = BlackholeProxy::for_url(&url).await.expect("proxy");
    let app = format!("proxy_{}", unique_hex());
    let proxied = format!("{}?application_name={app}", proxy.url(&url));
    let client = connect(&proxied).await;
    let admin = connect(&url).await;
    let one: i32 = client
        .query_one("SELECT 1", &[])
        .await
        .expect("query through the proxy")
        .get(0);
    assert_eq!(one, 1);

    proxy.cut();
    let stalled = tokio::time::timeout(Duration::from_millis(500), client.query_one("SELECT 2", &[])).await;
    assert!(stalled.is_err(), "a query completed across a cut");
    assert!(!client.is_closed(), "the client saw no close");
    assert_eq!(
        backends_of_app(&admin, &app).await.len(),
        1,
        "the server still has the session"
    );

    proxy.heal();
    let two: i32 = tokio::time::timeout(Duration::from_secs(5), client.query_one("SELECT 3", &[]))
        .await
        .expect("a query completes after the heal")
        .expect("query")
        .get(0);
    assert_eq!(two, 3);
}

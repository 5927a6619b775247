//! The grants the README lists are enough: a role that owns nothing, given exactly them on a
//! schema an owner set up, competes, holds, hands over and releases under both protocols.

mod common;

use std::time::Duration;

use common::*;
use pgiplock::{LockOptions, Protocol, Session};

async fn a_non_owner_role_with_the_documented_grants_works(protocol: Protocol) {
    let schema = unique("t_grants");
    let _cleanup = SchemaGuard::new(&schema);
    let role = unique("pgiplock_role");
    let _role_cleanup = RoleGuard(role.clone());
    let channel = unique("Jobs");
    let options = || {
        LockOptions::new()
            .protocol(protocol)
            .schema(&schema)
            .acquire_interval(Duration::from_secs(2))
            .lease_ttl(Duration::from_secs(3))
    };
    let admin = admin().await;
    // The owner sets the schema up once (what a migration would do).
    let owner = Session::connect(config()).await.unwrap();
    owner.lock(&unique("setup"), options()).unwrap().init().await.unwrap();
    owner.close().await;
    let qr = pgiplock_core::quote_ident(&role);
    admin
        .client
        .batch_execute(&format!("CREATE ROLE {qr} LOGIN; {}", grants(protocol, &schema, &role)))
        .await
        .expect("create the role and grant");

    let mut as_role = config();
    as_role.user(&role);
    let s1 = Session::connect(as_role.clone()).await.expect("connect as the role");
    let s2 = Session::connect(as_role).await.expect("connect as the role");
    let l1 = s1.lock(&channel, options()).unwrap();
    let l2 = s2.lock(&channel, options()).unwrap();
    l1.init().await.expect("init as a non-owner");
    let term = tokio::time::timeout(WAIT, l1.next_term())
        .await
        .expect("no term")
        .unwrap();
    l2.init().await.expect("init as a non-owner");
    l1.release().await.expect("release as a non-owner");
    assert!(term.is_over());
    tokio::time::timeout(WAIT, l2.next_term())
        .await
        .expect("no handover")
        .unwrap();
    l2.destroy().await.unwrap();
    s1.close().await;
    s2.close().await;
}

#[tokio::test]
async fn a_non_owner_role_with_the_documented_grants_works_lease() {
    a_non_owner_role_with_the_documented_grants_works(Protocol::Lease).await;
}

#[tokio::test]
async fn a_non_owner_role_with_the_documented_grants_works_classic() {
    a_non_owner_role_with_the_documented_grants_works(Protocol::Classic).await;
}

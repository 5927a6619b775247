//! A holder over TLS: the session connects (and reconnects) through `tokio-postgres-rustls`,
//! pure-Rust TLS with the `ring` provider, trusting the CA certificate in `PGSSLROOTCERT`.
//!
//! ```sh
//! PGSSLROOTCERT=root.crt DATABASE_URL='postgres://postgres@db.example:5432/test?sslmode=require' \
//!   cargo run -p pgiplock --example tls                 # until Ctrl-C
//! PGIPLOCK_EXAMPLE_RUN_FOR_MS=2000 ... cargo run -p pgiplock --example tls
//! ```
//! `sslmode=require` (the default URL's) refuses a connection without TLS; the server's
//! certificate must name the URL's host (a DNS name or an IP address in its subjectAltName)
//! and chain to the CA in `PGSSLROOTCERT`. The channel is `PGIPLOCK_EXAMPLE_CHANNEL` (default
//! `jobs`), the schema `PGIPLOCK_EXAMPLE_SCHEMA` (default `pgiplock_lease`).

use std::sync::Arc;
use std::time::Duration;

use pgiplock::{LockMessage, LockOptions, Session, SessionOptions, Shutdown};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_util::sync::CancellationToken;

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// A TLS connector trusting the PEM certificates in `ca_file` and nothing else.
fn tls_connector(ca_file: &str) -> Result<MakeRustlsConnect, Box<dyn std::error::Error>> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file).map_err(|e| format!("{ca_file}: {e}"))? {
        roots.add(cert.map_err(|e| format!("{ca_file}: {e}"))?)?;
    }
    if roots.is_empty() {
        return Err(format!("{ca_file}: no certificate").into());
    }
    let config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = env(
        "DATABASE_URL",
        "postgres://postgres@127.0.0.1:5432/test?sslmode=require",
    );
    let ca_file =
        std::env::var("PGSSLROOTCERT").map_err(|_| "set PGSSLROOTCERT to the server's CA certificate (PEM)")?;
    let tls = tls_connector(&ca_file)?;
    // The connector is kept for every reconnection; the connect timeout bounds TLS too.
    let options = SessionOptions::new().connect_timeout(Duration::from_secs(5));
    let session = Session::connect_with(url.parse()?, tls, options).await?;
    let lock_options = LockOptions::new().schema(&env("PGIPLOCK_EXAMPLE_SCHEMA", "pgiplock_lease"));
    let lock = session.lock(&env("PGIPLOCK_EXAMPLE_CHANNEL", "jobs"), lock_options)?;
    let stop = CancellationToken::new();
    let shutdown = tokio::spawn(Shutdown::install(stop.clone())?.wait());
    if let Ok(ms) = env("PGIPLOCK_EXAMPLE_RUN_FOR_MS", "").parse::<u64>() {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            stop.cancel();
        });
    }

    let mut messages = lock.subscribe();
    lock.init().await?;
    while let Some(message) = messages.next().await {
        match message {
            LockMessage::Acquired { token } => println!("holding over TLS, fence token {token:?}"),
            LockMessage::Message { payload, replay } => println!("message {payload} (replay: {replay})"),
            LockMessage::Lost { reason } => println!("lost: {}", reason.as_str()),
            LockMessage::Released => println!("released"),
            LockMessage::Stopped => break,
            _ => {}
        }
    }
    println!("stopped by {:?}", shutdown.await?);
    Ok(())
}

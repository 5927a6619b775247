//! `pgiplock status`: the lock tables as an aligned, readable table.

use std::time::Duration;

use clap::{Args, ValueEnum};
use pgiplock::{lock_status_on, Protocol};
use pgiplock_core::{quote_ident, SchemaName};
use tokio_postgres::Client;

use super::{CliError, DatabaseArgs};

/// Schema of the classic table unless `--schema` says otherwise.
const CLASSIC_SCHEMA: &str = "pgip_lock";
/// Schema of the lease table unless `--schema` says otherwise.
const LEASE_SCHEMA: &str = "pgiplock_lease";
/// Bound on connecting, when the URL sets none.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Which tables to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum StatusProtocol {
    /// The lease table only.
    Lease,
    /// The classic table only.
    Classic,
    /// Both tables.
    Both,
}

/// Options of `pgiplock status`.
#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    #[command(flatten)]
    database: DatabaseArgs,
    /// Which lock table(s) to show.
    #[arg(long, value_enum, default_value_t = StatusProtocol::Both)]
    protocol: StatusProtocol,
    /// Schema of the lock table(s) [default: pgiplock_lease for lease, pgip_lock for classic].
    #[arg(long, value_name = "NAME")]
    schema: Option<String>,
}

/// Prints the requested lock tables.
pub(crate) async fn run(args: StatusArgs) -> Result<(), CliError> {
    let mut config = args.database.config()?;
    let schema = |default: &str| {
        SchemaName::new(args.schema.as_deref().unwrap_or(default))
            .map_err(|e| CliError::Usage(format!("invalid --schema: {e}")))
    };
    let (lease_schema, classic_schema) = (schema(LEASE_SCHEMA)?, schema(CLASSIC_SCHEMA)?);
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| CliError::database("connecting to the database", e))?;
    let connection = tokio::spawn(connection);

    let mut report = String::new();
    if matches!(args.protocol, StatusProtocol::Lease | StatusProtocol::Both) {
        report.push_str(&lease_table(&client, &lease_schema).await?);
    }
    if matches!(args.protocol, StatusProtocol::Classic | StatusProtocol::Both) {
        if !report.is_empty() {
            report.push('\n');
        }
        report.push_str(&classic_table(&client, &classic_schema).await?);
    }
    print!("{report}");
    drop(client);
    let _ = connection.await;
    Ok(())
}

/// Whether `schema.table` exists.
async fn table_exists(client: &Client, schema: &str, table: &str) -> Result<bool, CliError> {
    let name = format!("{}.{}", quote_ident(schema), quote_ident(table));
    let row = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
        .await
        .map_err(|e| CliError::database(format!("looking up {name}"), e))?;
    Ok(row.get(0))
}

async fn lease_table(client: &Client, schema: &SchemaName) -> Result<String, CliError> {
    let title = format!("lease locks (schema {schema})\n");
    if !table_exists(client, schema.as_str(), "lease").await? {
        return Ok(format!(
            "{title}  no lease table: no lease lock has been initialised here\n"
        ));
    }
    let rows = lock_status_on(client, Protocol::Lease, schema).await?;
    let mut table = vec![vec![
        "CHANNEL".to_string(),
        "HOLDER".into(),
        "BACKEND PID".into(),
        "ALIVE".into(),
        "TOKEN".into(),
        "LEASE".into(),
    ]];
    for row in &rows {
        let held = row.holder.is_some();
        table.push(vec![
            row.channel.clone(),
            row.holder.clone().unwrap_or_else(|| "-".into()),
            row.holder_pid.map_or_else(|| "-".into(), |p| p.to_string()),
            if held { yes_no(row.holder_alive) } else { "-".into() },
            row.token.map_or_else(|| "-".into(), |t| t.to_string()),
            lease_text(held, row.lease_remaining),
        ]);
    }
    Ok(format!("{title}{}", render(&table, rows.is_empty())))
}

async fn classic_table(client: &Client, schema: &SchemaName) -> Result<String, CliError> {
    let title = format!("classic locks (schema {schema})\n");
    if !table_exists(client, schema.as_str(), "lock").await? {
        return Ok(format!(
            "{title}  no lock table: no classic lock has been initialised here\n"
        ));
    }
    let rows = lock_status_on(client, Protocol::Classic, schema).await?;
    let mut table = vec![vec!["CHANNEL".to_string(), "HOLDER".into(), "ALIVE".into()]];
    for row in &rows {
        table.push(vec![
            row.channel.clone(),
            row.holder.clone().unwrap_or_else(|| "-".into()),
            yes_no(row.holder_alive),
        ]);
    }
    Ok(format!("{title}{}", render(&table, rows.is_empty())))
}

fn yes_no(value: bool) -> String {
    if value { "yes" } else { "no" }.into()
}

/// "8.2s left", "expired", or "released".
fn lease_text(held: bool, remaining: Option<Duration>) -> String {
    match (held, remaining) {
        (false, _) => "released".into(),
        (true, None) => "-".into(),
        (true, Some(left)) if left.is_zero() => "expired".into(),
        (true, Some(left)) => format!("{:.1}s left", left.as_secs_f64()),
    }
}

/// Left-aligned columns separated by two spaces, indented by two.
fn render(table: &[Vec<String>], empty: bool) -> String {
    if empty {
        return "  no locks\n".into();
    }
    let columns = table.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            table
                .iter()
                .filter_map(|row| row.get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in table {
        let mut line = String::from("  ");
        for (c, cell) in row.iter().enumerate() {
            let width = widths.get(c).copied().unwrap_or(0);
            line.push_str(&format!("{cell:<width$}  "));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align() {
        let table = vec![
            vec!["CHANNEL".to_string(), "ALIVE".into()],
            vec!["a_long_channel".to_string(), "yes".into()],
        ];
        let text = render(&table, false);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0].find("ALIVE"), lines[1].find("yes"));
    }

    #[test]
    fn lease_remaining_reads_well() {
        assert_eq!(lease_text(true, Some(Duration::from_millis(8210))), "8.2s left");
        assert_eq!(lease_text(true, Some(Duration::ZERO)), "expired");
        assert_eq!(lease_text(false, None), "released");
    }
}

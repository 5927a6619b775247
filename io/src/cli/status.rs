//! `pgiplock status`: the lock tables as an aligned, readable table.

use std::time::Duration;

use clap::{Args, ValueEnum};
use pgiplock_core::{quote_ident, SchemaName, LOCK_CHANNEL_PREFIX};
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
    /// Schema of the lock table(s) (default: pgiplock_lease for lease, pgip_lock for classic).
    #[arg(long, value_name = "NAME")]
    schema: Option<String>,
}

/// Prints the requested lock tables.
pub(crate) async fn run(args: StatusArgs) -> Result<(), CliError> {
    let mut config = args.database.config()?;
    if let Some(schema) = &args.schema {
        SchemaName::new(schema).map_err(|e| CliError::Usage(format!("invalid --schema: {e}")))?;
    }
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
        let schema = args.schema.as_deref().unwrap_or(LEASE_SCHEMA);
        report.push_str(&lease_table(&client, schema).await?);
    }
    if matches!(args.protocol, StatusProtocol::Classic | StatusProtocol::Both) {
        if !report.is_empty() {
            report.push('\n');
        }
        let schema = args.schema.as_deref().unwrap_or(CLASSIC_SCHEMA);
        report.push_str(&classic_table(&client, schema).await?);
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

async fn lease_table(client: &Client, schema: &str) -> Result<String, CliError> {
    let title = format!("lease locks (schema {schema})\n");
    if !table_exists(client, schema, "lease").await? {
        return Ok(format!(
            "{title}  no lease table: no lease lock has been initialised here\n"
        ));
    }
    // Casts keep this query independent of the exact column types; liveness is judged the way
    // the protocol judges it (same pid and application name).
    let sql = format!(
        "SELECT l.channel::text, l.holder::text, l.holder_pid::int4, l.token::int8, \
                l.holder IS NOT NULL AND EXISTS (SELECT 1 FROM pg_stat_activity a \
                    WHERE a.pid = l.holder_pid AND a.application_name = l.holder), \
                extract(epoch FROM (l.expires_at - now()))::float8 \
         FROM {}.lease l ORDER BY 1",
        quote_ident(schema)
    );
    let rows = client
        .query(&sql, &[])
        .await
        .map_err(|e| CliError::database("reading the lease table", e))?;
    let mut table = vec![vec![
        "CHANNEL".to_string(),
        "HOLDER".into(),
        "BACKEND PID".into(),
        "ALIVE".into(),
        "TOKEN".into(),
        "LEASE".into(),
    ]];
    for row in &rows {
        let holder: Option<String> = row.get(1);
        let pid: Option<i32> = row.get(2);
        let token: Option<i64> = row.get(3);
        let alive: bool = row.get(4);
        let remaining: Option<f64> = row.get(5);
        let held = holder.is_some();
        table.push(vec![
            row.get(0),
            holder.unwrap_or_else(|| "-".into()),
            pid.map_or_else(|| "-".into(), |p| p.to_string()),
            if held { yes_no(alive) } else { "-".into() },
            token.map_or_else(|| "-".into(), |t| t.to_string()),
            lease_text(held, remaining),
        ]);
    }
    Ok(format!("{title}{}", render(&table, rows.is_empty())))
}

async fn classic_table(client: &Client, schema: &str) -> Result<String, CliError> {
    let title = format!("classic locks (schema {schema})\n");
    if !table_exists(client, schema, "lock").await? {
        return Ok(format!(
            "{title}  no lock table: no classic lock has been initialised here\n"
        ));
    }
    let sql = format!(
        "SELECT l.channel::text, l.app::text, \
                EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.application_name = l.app) \
         FROM {}.lock l ORDER BY 1",
        quote_ident(schema)
    );
    let rows = client
        .query(&sql, &[])
        .await
        .map_err(|e| CliError::database("reading the classic lock table", e))?;
    let mut table = vec![vec!["CHANNEL".to_string(), "HOLDER".into(), "ALIVE".into()]];
    for row in &rows {
        let lock_channel: String = row.get(0);
        // The table is keyed by the lock channel; show the user's channel.
        let channel = lock_channel
            .strip_prefix(LOCK_CHANNEL_PREFIX)
            .map_or_else(|| lock_channel.clone(), str::to_string);
        table.push(vec![channel, row.get(1), yes_no(row.get(2))]);
    }
    Ok(format!("{title}{}", render(&table, rows.is_empty())))
}

fn yes_no(value: bool) -> String {
    if value { "yes" } else { "no" }.into()
}

/// "8.2s left", "expired 3.0s ago", or "released".
fn lease_text(held: bool, remaining_secs: Option<f64>) -> String {
    match (held, remaining_secs) {
        (false, _) => "released".into(),
        (true, None) => "-".into(),
        (true, Some(left)) if left > 0.0 => format!("{left:.1}s left"),
        (true, Some(left)) => format!("expired {:.1}s ago", -left),
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
        assert_eq!(lease_text(true, Some(8.21)), "8.2s left");
        assert_eq!(lease_text(true, Some(-3.0)), "expired 3.0s ago");
        assert_eq!(lease_text(false, None), "released");
    }
}

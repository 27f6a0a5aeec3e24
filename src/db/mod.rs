//! SQLite access, grouped by table. The pool runs in WAL mode with foreign keys on; the
//! embedded migrations are applied when it opens.

pub mod datasets;
pub mod epochs;
pub mod models;
pub mod runs;
pub mod status;

use std::str::FromStr;
use std::time::Duration;

use sqlx::SqlitePool;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

/// The migrations in `migrations/`, compiled in.
pub static MIGRATOR: Migrator = sqlx::migrate!();

/// The SQL expression for "now" used in every `updated_at`.
pub const NOW: &str = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";

/// Opens (creating if needed) the database and applies pending migrations.
pub async fn connect(url: &str) -> anyhow::Result<SqlitePool> {
    use anyhow::Context;
    let options = SqliteConnectOptions::from_str(url)
        .with_context(|| format!("invalid database URL {url}"))?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .foreign_keys(true)
        .busy_timeout(Duration::from_secs(10));
    let pool = SqlitePoolOptions::new()
        .max_connections(8)
        .connect_with(options)
        .await
        .with_context(|| format!("opening the database {url}"))?;
    MIGRATOR
        .run(&pool)
        .await
        .context("applying database migrations")?;
    Ok(pool)
}

/// A write transaction. `BEGIN IMMEDIATE` takes SQLite's write lock at the start, so two
/// writers wait for each other under the busy timeout instead of one failing with
/// `SQLITE_BUSY` when its deferred transaction tries to upgrade.
pub async fn write(
    pool: &SqlitePool,
) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, sqlx::Error> {
    pool.begin_with("BEGIN IMMEDIATE").await
}

/// Parses a JSON column written by this program.
pub(crate) fn json<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, sqlx::Error> {
    serde_json::from_str(text).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

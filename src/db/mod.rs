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

/// A page of a list, newest first: at most `limit` rows, created before the row `after`
/// names (the last one of the previous page) when given. Keyset paging, so a page costs the
/// same however deep it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub limit: usize,
    /// (`created_at`, `id`) of the last row already seen.
    pub after: Option<(String, String)>,
}

impl Page {
    /// Every row (internal callers).
    pub const ALL: Page = Page {
        limit: i64::MAX as usize,
        after: None,
    };

    /// The SQL for "after the cursor, newest first, one page", with parameters ?A (the
    /// cursor's time), ?B (its id) and ?L (the limit) renumbered from `first`.
    fn clause(first: usize) -> String {
        let (t, i, l) = (first, first + 1, first + 2);
        format!(
            "(?{t} IS NULL OR (created_at, id) < (?{t}, ?{i})) \
             ORDER BY created_at DESC, id DESC LIMIT ?{l}"
        )
    }

    fn time(&self) -> Option<&str> {
        self.after.as_ref().map(|(t, _)| t.as_str())
    }

    fn id(&self) -> Option<&str> {
        self.after.as_ref().map(|(_, i)| i.as_str())
    }

    fn limit(&self) -> i64 {
        i64::try_from(self.limit).unwrap_or(i64::MAX)
    }
}

/// Parses a JSON column written by this program.
pub(crate) fn json<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, sqlx::Error> {
    serde_json::from_str(text).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

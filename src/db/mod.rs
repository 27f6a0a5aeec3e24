//! The database, grouped by table: SQLite (the embedded default, WAL mode, foreign keys on)
//! or PostgreSQL (several processes on several machines). Each query is written once in SQL
//! both engines read the same way (`$N` parameters, timestamps made in Rust by [`now`]) and
//! run on whichever pool [`Db`] holds; where the engines really differ (taking the write
//! lock, claiming from the queue) the difference sits next to the query, in one `match`.
//! Each engine's migrations are applied when the pool opens.

pub mod cancel;
pub mod datasets;
pub mod epochs;
pub mod models;
pub mod queue;
pub mod runs;
pub mod status;
mod time;
mod url;

use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{PgPool, Postgres, Sqlite, SqlitePool, Transaction};

pub use self::time::{now, now_millis};
pub use self::url::redacted;

/// The SQLite migrations in `migrations/sqlite`, compiled in.
pub static SQLITE_MIGRATOR: Migrator = sqlx::migrate!("migrations/sqlite");
/// The PostgreSQL migrations in `migrations/postgres`, compiled in.
pub static POSTGRES_MIGRATOR: Migrator = sqlx::migrate!("migrations/postgres");

/// A pool on one of the two engines; cheap to clone.
#[derive(Debug, Clone)]
pub enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

impl From<SqlitePool> for Db {
    fn from(pool: SqlitePool) -> Self {
        Db::Sqlite(pool)
    }
}

impl From<PgPool> for Db {
    fn from(pool: PgPool) -> Self {
        Db::Postgres(pool)
    }
}

/// Runs `$body` with `$pool` bound to the engine's own pool type. The body is written once
/// and type-checked for each engine, so a query cannot drift between them.
macro_rules! on_pool {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            $crate::db::Db::Sqlite($pool) => $body,
            $crate::db::Db::Postgres($pool) => $body,
        }
    };
}

/// [`on_pool`] for a write transaction: `$conn` is the engine's connection inside it.
macro_rules! on_tx {
    ($tx:expr, $conn:ident => $body:expr) => {
        match $tx {
            $crate::db::Tx::Sqlite(t) => {
                let $conn = &mut **t;
                $body
            }
            $crate::db::Tx::Postgres(t) => {
                let $conn = &mut **t;
                $body
            }
        }
    };
}

pub(crate) use {on_pool, on_tx};

/// A write transaction on either engine.
pub enum Tx {
    Sqlite(Transaction<'static, Sqlite>),
    Postgres(Transaction<'static, Postgres>),
}

impl Tx {
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            Tx::Sqlite(t) => t.commit().await,
            Tx::Postgres(t) => t.commit().await,
        }
    }
}

/// The advisory lock every PostgreSQL write transaction takes (an arbitrary constant).
const WRITE_LOCK: i64 = 0x7472_616e_7366; // "transf"

/// A write transaction that runs alone among write transactions, on both engines, so that a
/// check and the write it guards (a queue bound, "is this dataset in use", "is this the
/// default model") cannot interleave with another writer's. SQLite: `BEGIN IMMEDIATE` takes
/// the write lock at the start (two writers wait under the busy timeout instead of one
/// failing when its deferred transaction upgrades). PostgreSQL: a transaction-scoped
/// advisory lock. The queue's claim does not go through here: it locks only the row it
/// takes (`FOR UPDATE SKIP LOCKED`), so workers never wait on each other.
pub async fn write(db: &Db) -> Result<Tx, sqlx::Error> {
    match db {
        Db::Sqlite(pool) => Ok(Tx::Sqlite(pool.begin_with("BEGIN IMMEDIATE").await?)),
        Db::Postgres(pool) => {
            let mut tx = pool.begin().await?;
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(WRITE_LOCK)
                .execute(&mut *tx)
                .await?;
            Ok(Tx::Postgres(tx))
        }
    }
}

/// Why the database could not be opened. The URL in each message has its password masked.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid database URL {url}: {source}")]
    Url { url: String, source: sqlx::Error },
    #[error("cannot reach the database at {url}: {source}")]
    Unreachable { url: String, source: sqlx::Error },
    #[error("applying the database migrations at {url}: {source}")]
    Migrate {
        url: String,
        source: sqlx::migrate::MigrateError,
    },
}

/// Whether `url` names a PostgreSQL database (otherwise it is a SQLite file).
pub fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// Opens the database (creating a SQLite file if needed) and applies pending migrations.
pub async fn connect(url: &str) -> Result<Db, ConnectError> {
    let shown = redacted(url);
    let bad_url = |source| ConnectError::Url {
        url: shown.clone(),
        source,
    };
    let unreachable = |source| ConnectError::Unreachable {
        url: shown.clone(),
        source,
    };
    let migrate = |source| ConnectError::Migrate {
        url: shown.clone(),
        source,
    };
    if is_postgres(url) {
        let options = PgConnectOptions::from_str(url).map_err(bad_url)?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(unreachable)?;
        POSTGRES_MIGRATOR.run(&pool).await.map_err(migrate)?;
        return Ok(Db::Postgres(pool));
    }
    let options = SqliteConnectOptions::from_str(url)
        .map_err(bad_url)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .foreign_keys(true)
        .busy_timeout(Duration::from_secs(10));
    let pool = SqlitePoolOptions::new()
        .max_connections(8)
        .connect_with(options)
        .await
        .map_err(unreachable)?;
    SQLITE_MIGRATOR.run(&pool).await.map_err(migrate)?;
    Ok(Db::Sqlite(pool))
}

impl Db {
    /// A round trip to the database (readiness probes).
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        on_pool!(self, pool => sqlx::query("SELECT 1").execute(pool).await.map(|_| ()))
    }

    /// Closes the pool (shutdown).
    pub async fn close(&self) {
        on_pool!(self, pool => pool.close().await)
    }

    /// Which engine this is, for logs and `/readyz`.
    pub fn engine(&self) -> &'static str {
        match self {
            Db::Sqlite(_) => "sqlite",
            Db::Postgres(_) => "postgres",
        }
    }
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

    /// The SQL for "after the cursor, newest first, one page", with parameters $A (the
    /// cursor's time), $B (its id) and $L (the limit) numbered from `first`.
    fn clause(first: usize) -> String {
        let (t, i, l) = (first, first + 1, first + 2);
        format!(
            "(${t} IS NULL OR (created_at, id) < (${t}, ${i})) \
             ORDER BY created_at DESC, id DESC LIMIT ${l}"
        )
    }

    /// The rows of `sql`, which ends in [`Page::clause`]`(1)` (its only parameters).
    async fn rows<R>(&self, db: &Db, sql: &str) -> Result<Vec<R>, sqlx::Error>
    where
        R: for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow>
            + for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>
            + Send
            + Unpin,
    {
        on_pool!(db, pool => {
            sqlx::query_as(sql)
                .bind(self.time())
                .bind(self.id())
                .bind(self.limit())
                .fetch_all(pool)
                .await
        })
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

//! The queue: claiming runs, leases, ends and cancels. A claimed run names the worker that
//! holds it (`worker_id`) and when that claim lapses (`lease_expires_at`, Unix ms on the
//! database's clock, so workers on machines whose clocks disagree still agree on it); the
//! worker renews the lease while it trains. Every write that ends or re-queues a run says
//! who may do it ([`Guard`]), so a worker that lost its lease cannot overwrite the run's new
//! life.

use std::time::Duration;

use sqlx::FromRow;

use super::runs::position;
use super::status::{PhaseStatus, RunStatus};
use super::{Db, Tx, now, on_pool, on_tx};
use crate::ml::events::Phase;

/// A run a worker has claimed.
#[derive(Debug, Clone, FromRow)]
pub struct Claimed {
    pub id: String,
    pub dataset_id: Option<String>,
    pub config: String,
    pub attempts: i64,
}

/// Who may end or re-queue a run.
#[derive(Debug, Clone, Copy)]
pub enum Guard<'a> {
    /// Anyone (the API, for a queued run or an explicit cancel).
    Anyone,
    /// Only this worker, and only while the run is still `running` under its lease.
    Holder(&'a str),
    /// Anyone, if the run is `running` and its lease has lapsed.
    Lapsed,
}

/// "Now" in Unix milliseconds on the database's clock, as each engine writes it.
const SQLITE_MILLIS: &str = "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)";
const POSTGRES_MILLIS: &str = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)";

fn db_millis(db: &Db) -> &'static str {
    match db {
        Db::Sqlite(_) => SQLITE_MILLIS,
        Db::Postgres(_) => POSTGRES_MILLIS,
    }
}

fn tx_millis(tx: &Tx) -> &'static str {
    match tx {
        Tx::Sqlite(_) => SQLITE_MILLIS,
        Tx::Postgres(_) => POSTGRES_MILLIS,
    }
}

impl Guard<'_> {
    /// The guard's condition on `runs`: its parameter is number `holder` (bound by
    /// [`Guard::holder`]), the running status `running`, the clock `millis`.
    fn clause(&self, holder: usize, running: usize, millis: &str) -> String {
        let lapsed = matches!(self, Guard::Lapsed);
        format!(
            "(${holder} IS NULL OR (status = ${running} AND worker_id = ${holder})) \
             AND ({} OR (status = ${running} AND \
             (lease_expires_at IS NULL OR lease_expires_at < {millis})))",
            if lapsed { "FALSE" } else { "TRUE" }
        )
    }

    fn holder(&self) -> Option<&str> {
        match self {
            Guard::Holder(w) => Some(w),
            _ => None,
        }
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Moves the oldest queued run to `running` under `worker`'s lease and returns it. On
/// PostgreSQL the candidate row is taken with `FOR UPDATE SKIP LOCKED`, so workers racing
/// for the queue each get a different run and never wait on each other; SQLite's single
/// writer makes the one statement atomic by itself.
pub async fn claim_next(
    db: &Db,
    worker: &str,
    lease: Duration,
) -> Result<Option<Claimed>, sqlx::Error> {
    let lock = match db {
        Db::Sqlite(_) => "",
        Db::Postgres(_) => " FOR UPDATE SKIP LOCKED",
    };
    let sql = format!(
        "UPDATE runs SET status = $1, attempts = attempts + 1, error = NULL, \
         worker_id = $3, lease_expires_at = {} + $4, started_at = COALESCE(started_at, $5), \
         updated_at = $5 \
         WHERE id = (SELECT id FROM runs WHERE status = $2 ORDER BY created_at, id LIMIT 1{lock}) \
         RETURNING id, dataset_id, config, attempts",
        db_millis(db)
    );
    let time = now();
    on_pool!(db, pool => {
        sqlx::query_as(&sql)
            .bind(RunStatus::Running)
            .bind(RunStatus::Queued)
            .bind(worker)
            .bind(millis(lease))
            .bind(&time)
            .fetch_optional(pool)
            .await
    })
}

/// What a heartbeat found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    /// Renewed; `cancel` is whether someone asked, through any API process, to stop it.
    Held { cancel: bool },
    /// The run is no longer this worker's (its lease lapsed and it was reaped or claimed
    /// again, or it ended): stop training it and write nothing more.
    Lost,
}

/// Renews `worker`'s lease on run `id` for another `lease`.
pub async fn heartbeat(
    db: &Db,
    id: &str,
    worker: &str,
    lease: Duration,
) -> Result<Lease, sqlx::Error> {
    let sql = format!(
        "UPDATE runs SET lease_expires_at = {} + $1 \
         WHERE id = $2 AND worker_id = $3 AND status = $4 RETURNING cancel_requested",
        db_millis(db)
    );
    let cancel: Option<bool> = on_pool!(db, pool => {
        sqlx::query_scalar(&sql)
            .bind(millis(lease))
            .bind(id)
            .bind(worker)
            .bind(RunStatus::Running)
            .fetch_optional(pool)
            .await
    })?;
    Ok(cancel.map_or(Lease::Lost, |cancel| Lease::Held { cancel }))
}

/// A `running` run whose lease lapsed: its worker died or lost touch with the database.
#[derive(Debug, Clone, FromRow)]
pub struct Lapsed {
    pub id: String,
    /// Lapses before this one.
    pub lapses: i64,
}

/// The runs whose lease has lapsed, oldest first.
pub async fn lapsed(db: &Db) -> Result<Vec<Lapsed>, sqlx::Error> {
    let sql = format!(
        "SELECT id, lapses FROM runs WHERE status = $1 \
         AND (lease_expires_at IS NULL OR lease_expires_at < {}) ORDER BY created_at, id",
        db_millis(db)
    );
    on_pool!(db, pool => {
        sqlx::query_as(&sql)
            .bind(RunStatus::Running)
            .fetch_all(pool)
            .await
    })
}

/// Ends a run with `status` (one that [`RunStatus::is_over`]) if `guard` allows; phases that
/// never finished end with it, as [`PhaseStatus::on_run_end`] says. `false` if the guard
/// did not match (nothing was written).
pub async fn finish(
    db: &Db,
    id: &str,
    status: RunStatus,
    error: Option<&str>,
    guard: Guard<'_>,
) -> Result<bool, sqlx::Error> {
    let mut tx = super::write(db).await?;
    let done = finish_in(&mut tx, id, status, error, guard).await?;
    tx.commit().await?;
    Ok(done)
}

/// [`finish`] inside a caller's write transaction.
pub async fn finish_in(
    tx: &mut Tx,
    id: &str,
    status: RunStatus,
    error: Option<&str>,
    guard: Guard<'_>,
) -> Result<bool, sqlx::Error> {
    debug_assert!(status.is_over(), "{status} does not end a run");
    let sql = format!(
        "UPDATE runs SET status = $1, error = $2, eta_seconds = NULL, lease_expires_at = NULL, \
         percent = CASE WHEN $1 = $4 THEN 100 ELSE percent END, \
         finished_at = $5, updated_at = $5 WHERE id = $3 AND {}",
        guard.clause(6, 7, tx_millis(tx))
    );
    let time = now();
    let (running_to, pending_to) = PhaseStatus::on_run_end(status);
    on_tx!(tx, conn => {
        let ended = sqlx::query(&sql)
            .bind(status)
            .bind(error)
            .bind(id)
            .bind(RunStatus::Succeeded)
            .bind(&time)
            .bind(guard.holder())
            .bind(RunStatus::Running)
            .execute(&mut *conn)
            .await?;
        if ended.rows_affected() == 0 {
            return Ok(false);
        }
        sqlx::query(
            "UPDATE run_phases SET status = CASE status WHEN $3 THEN $1 ELSE $2 END, \
             updated_at = $6 WHERE run_id = $5 AND status IN ($3, $4)",
        )
        .bind(running_to)
        .bind(pending_to)
        .bind(PhaseStatus::Running)
        .bind(PhaseStatus::Pending)
        .bind(id)
        .bind(&time)
        .execute(&mut *conn)
        .await?;
    });
    Ok(true)
}

/// Puts a run back in the queue if `guard` allows, keeping the phases before `from_phase`
/// (their metrics and status) and forgetting everything from it on. A re-queue of a lapsed
/// lease counts as a lapse.
pub async fn requeue(
    db: &Db,
    id: &str,
    from_phase: Phase,
    guard: Guard<'_>,
) -> Result<bool, sqlx::Error> {
    let mut tx = super::write(db).await?;
    let sql = format!(
        "UPDATE runs SET status = $1, phase = NULL, stage = NULL, step = NULL, \
         steps_total = NULL, epoch = NULL, epochs_total = NULL, eta_seconds = NULL, \
         lease_expires_at = NULL, lapses = lapses + {}, updated_at = $2 WHERE id = $3 AND {}",
        i64::from(matches!(guard, Guard::Lapsed)),
        guard.clause(4, 5, tx_millis(&tx))
    );
    let time = now();
    let moved = on_tx!(&mut tx, conn => {
        sqlx::query(&sql)
            .bind(RunStatus::Queued)
            .bind(&time)
            .bind(id)
            .bind(guard.holder())
            .bind(RunStatus::Running)
            .execute(&mut *conn)
            .await?
            .rows_affected()
    });
    if moved == 0 {
        return Ok(false);
    }
    reset_phases_in(&mut tx, id, from_phase).await?;
    tx.commit().await?;
    Ok(true)
}

/// Forgets the phases from `from_phase` on (status back to pending, their epochs deleted),
/// before `worker` starts them again; `false` (nothing done) if the run is not its own.
pub async fn reset_phases_from(
    db: &Db,
    id: &str,
    worker: &str,
    from_phase: Phase,
) -> Result<bool, sqlx::Error> {
    let mut tx = super::write(db).await?;
    let holds: Option<String> = on_tx!(&mut tx, conn => {
        sqlx::query_scalar("SELECT id FROM runs WHERE id = $1 AND worker_id = $2 AND status = $3")
            .bind(id)
            .bind(worker)
            .bind(RunStatus::Running)
            .fetch_optional(&mut *conn)
            .await?
    });
    if holds.is_none() {
        return Ok(false);
    }
    reset_phases_in(&mut tx, id, from_phase).await?;
    tx.commit().await?;
    Ok(true)
}

async fn reset_phases_in(tx: &mut Tx, id: &str, from_phase: Phase) -> Result<(), sqlx::Error> {
    let position = position(from_phase);
    let time = now();
    on_tx!(tx, conn => {
        sqlx::query(
            "DELETE FROM epoch_metrics WHERE run_id = $1 AND phase IN \
             (SELECT phase FROM run_phases WHERE run_id = $1 AND position >= $2)",
        )
        .bind(id)
        .bind(position)
        .execute(&mut *conn)
        .await?;
        sqlx::query(
            "UPDATE run_phases SET status = $1, epochs_run = 0, best_epoch = NULL, \
             best_val_loss = NULL, best_val_accuracy = NULL, seconds = NULL, updated_at = $5 \
             WHERE run_id = $2 AND position >= $3 AND status != $4",
        )
        .bind(PhaseStatus::Pending)
        .bind(id)
        .bind(position)
        .bind(PhaseStatus::Skipped)
        .bind(&time)
        .execute(&mut *conn)
        .await?;
    });
    Ok(())
}

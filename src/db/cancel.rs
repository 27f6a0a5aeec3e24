//! Cancelling a run: a queued one ends at once; a running one is flagged, and the worker
//! that holds it sees the flag at its next heartbeat (`jobs::lease`), in whichever process.

use super::queue::{Guard, finish_in};
use super::status::RunStatus;
use super::{Db, now, on_pool, on_tx};

/// What a cancel request did.
#[derive(Debug, PartialEq, Eq)]
pub enum CancelOutcome {
    NotFound,
    /// It was queued and is now cancelled.
    Cancelled,
    /// It is running; the worker that holds it stops it at its next heartbeat.
    Requested,
    /// It had already ended with this status.
    AlreadyEnded(RunStatus),
}

pub async fn cancel(db: &Db, id: &str) -> Result<CancelOutcome, sqlx::Error> {
    // One write transaction: no worker can claim the run between the check and the end.
    let mut tx = super::write(db).await?;
    let time = now();
    let flagged: Option<RunStatus> = on_tx!(&mut tx, conn => {
        sqlx::query_scalar(
            "UPDATE runs SET cancel_requested = TRUE, updated_at = $2 \
             WHERE id = $1 AND status IN ($3, $4) RETURNING status",
        )
        .bind(id)
        .bind(&time)
        .bind(RunStatus::Queued)
        .bind(RunStatus::Running)
        .fetch_optional(&mut *conn)
        .await?
    });
    let outcome = match flagged {
        Some(RunStatus::Queued) => {
            finish_in(&mut tx, id, RunStatus::Cancelled, None, Guard::Anyone).await?;
            CancelOutcome::Cancelled
        }
        Some(_) => CancelOutcome::Requested,
        None => {
            let status: Option<RunStatus> = on_tx!(&mut tx, conn => {
                sqlx::query_scalar("SELECT status FROM runs WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&mut *conn)
                    .await?
            });
            status.map_or(CancelOutcome::NotFound, CancelOutcome::AlreadyEnded)
        }
    };
    tx.commit().await?;
    Ok(outcome)
}

/// Whether someone asked to cancel the run.
pub async fn cancel_requested(db: &Db, id: &str) -> Result<bool, sqlx::Error> {
    on_pool!(db, pool => {
        sqlx::query_scalar("SELECT cancel_requested FROM runs WHERE id = $1")
            .bind(id)
            .fetch_one(pool)
            .await
    })
}

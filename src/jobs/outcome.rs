//! How a run a worker holds ends: succeeded (model stored, then recorded), cancelled, failed,
//! or back in the queue (a graceful shutdown, or an object store that cannot be reached).
//! Every write is guarded by the worker's lease, and the files and events that follow a
//! write (deleting checkpoints, announcing the end) happen only when the write landed, so a
//! worker that lost its run disturbs nothing its new holder owns.

use std::time::Duration;

use anyhow::Context;

use super::compute::{Failure, Finished};
use super::lease::Held;
use super::worker::WorkerContext;
use crate::db::queue::{self, Guard};
use crate::db::status::{RunStatus, restart_from};
use crate::db::{self, models::Success};
use crate::objects::Kind;

/// Tries to record a finished model before the run is given up (0.25 s, then doubling).
const RECORD_ATTEMPTS: u32 = 6;

/// Stores the model, then records it and ends the run.
pub(super) async fn succeeded(
    ctx: &WorkerContext,
    me: &str,
    claim: (&str, i64),
    dataset_id: Option<&str>,
    done: &Finished,
    held: &Held,
) -> anyhow::Result<()> {
    let id = claim.0;
    // Stored before the row that points at it, under the run's name: only while the run is
    // ours. (The worker keeps the folder out of the cache's evictions until then.)
    if held.lost() {
        return Ok(());
    }
    if let Err(e) = ctx.objects.publish_model(id).await {
        tracing::warn!(error = %e, "could not store the model");
        let why = "the object store failed while storing the model";
        return back_to_queue(ctx, me, claim, why).await;
    }
    let success = Success {
        run_id: id,
        dataset_id,
        classes: &done.classes,
        input_size: done.input_size,
        val_accuracy: done.accuracy,
        evaluation: &done.evaluation,
    };
    // The model is stored: a passing database fault must not orphan it.
    let mut wait = Duration::from_millis(250);
    let mut attempt = 1;
    let recorded = loop {
        match db::models::record_success(&ctx.db, &success, me).await {
            Ok(recorded) => break recorded,
            Err(e) if attempt == RECORD_ATTEMPTS => {
                // The stored model stays: whether the run is still ours cannot be known
                // without the database, and start-up sweeps away a model no row names.
                return Err(e.into());
            }
            Err(e) => {
                tracing::warn!(error = %e, attempt, "recording the model failed; retrying");
                tokio::time::sleep(wait).await;
                (wait, attempt) = (wait * 2, attempt + 1);
            }
        }
    };
    if !recorded {
        // The run is another worker's now, and its model goes under the same name: leave
        // the files alone.
        tracing::warn!("the run's lease was lost before its model was recorded; discarded");
        return Ok(());
    }
    forget(ctx, Kind::Run, id).await;
    tracing::info!(val_accuracy = done.accuracy, "run succeeded");
    ctx.jobs.publish_status(id, RunStatus::Succeeded, None);
    Ok(())
}

/// The trainer stopped at a cancel: the user's (the run ends cancelled) or this process's
/// shutdown (the run goes back to the queue to resume elsewhere).
pub(super) async fn stopped(
    ctx: &WorkerContext,
    me: &str,
    id: &str,
    for_shutdown: bool,
) -> anyhow::Result<()> {
    let user = crate::db::cancel::cancel_requested(&ctx.db, id).await?;
    if for_shutdown && !user {
        return requeue(ctx, me, id, "run left queued to resume at the next start").await;
    }
    if queue::finish(&ctx.db, id, RunStatus::Cancelled, None, Guard::Holder(me)).await? {
        forget(ctx, Kind::Run, id).await;
        tracing::info!("run cancelled");
        ctx.jobs.publish_status(id, RunStatus::Cancelled, None);
    }
    Ok(())
}

/// Ends the run as failed with `failure`'s public message.
pub(super) async fn fail(
    ctx: &WorkerContext,
    me: &str,
    id: &str,
    failure: &Failure,
) -> anyhow::Result<()> {
    match &failure.detail {
        Some(detail) => tracing::error!(error = %detail, "run failed"),
        None => tracing::warn!(error = %failure.public, "run failed"),
    }
    let message = failure.public.as_str();
    if queue::finish(
        &ctx.db,
        id,
        RunStatus::Failed,
        Some(message),
        Guard::Holder(me),
    )
    .await?
    {
        forget(ctx, Kind::Run, id).await;
        ctx.jobs
            .publish_status(id, RunStatus::Failed, Some(message.to_string()));
    }
    Ok(())
}

/// How long a worker waits after giving a run back for the object store's sake, so that it
/// does not claim it straight back while the store is still down.
pub(super) const STORE_BACKOFF: Duration = Duration::from_secs(5);

/// Claims after which a run the object store keeps failing fails instead of going back.
const STORE_ATTEMPTS: i64 = 5;

/// The object store cannot be reached: the run goes back to the queue (after its warm-up if
/// the checkpoint is stored) rather than failing, and the worker pauses; after
/// [`STORE_ATTEMPTS`] claims it fails. `claim` is the run's id and its claim count.
pub(super) async fn back_to_queue(
    ctx: &WorkerContext,
    me: &str,
    claim: (&str, i64),
    why: &str,
) -> anyhow::Result<()> {
    let (id, attempts) = claim;
    if attempts >= STORE_ATTEMPTS {
        let message = format!("{why} ({attempts} attempts)");
        return fail(ctx, me, id, &Failure::plain(message)).await;
    }
    requeue(ctx, me, id, why).await?;
    tokio::time::sleep(STORE_BACKOFF).await;
    Ok(())
}

async fn requeue(ctx: &WorkerContext, me: &str, id: &str, why: &str) -> anyhow::Result<()> {
    let run = db::runs::get(&ctx.db, id)
        .await?
        .context("running run vanished")?;
    let stored = ctx.objects.has_checkpoint(id).await.unwrap_or(false);
    let from = restart_from(&run.phase_states(), stored);
    if queue::requeue(&ctx.db, id, from, Guard::Holder(me)).await? {
        tracing::info!(resume_from = %from, why, "run re-queued");
        ctx.jobs.publish_status(id, RunStatus::Queued, None);
    }
    Ok(())
}

/// Deletes a run's checkpoints or an unrecorded model, locally and in the store; a failure
/// only leaves garbage behind, so it is logged.
async fn forget(ctx: &WorkerContext, what: Kind, id: &str) {
    if let Err(e) = ctx.objects.remove(what, id).await {
        tracing::warn!(error = %e, ?what, "could not delete leftover files");
    }
}

//! Run events across processes on PostgreSQL: every event a process publishes goes out with
//! `NOTIFY` on one channel, and every process `LISTEN`s and feeds what arrives to its own
//! subscribers (SSE streams) and idle workers. So an SSE client on any API replica sees the
//! progress of a run that trains on any worker. Each payload is one event's JSON (a few
//! hundred bytes; PostgreSQL allows 8,000); what an event summarises stays in the tables.
//! With SQLite in one process, events stay in-process (`Jobs::new`).

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use super::events::{EventKind, RunEvent};
use crate::db::status::RunStatus;

/// The channel name.
pub const CHANNEL: &str = "transferd_events";
/// PostgreSQL's payload limit is 8,000 bytes; events are far smaller.
const MAX_PAYLOAD: usize = 7_900;

/// Sends each event of `outbox` with `NOTIFY`, one after another (so they arrive in the
/// order they were published).
pub(super) async fn send(pool: PgPool, mut outbox: mpsc::UnboundedReceiver<RunEvent>) {
    while let Some(event) = outbox.recv().await {
        let payload = serde_json::to_string(&event).expect("serialisable");
        if payload.len() > MAX_PAYLOAD {
            tracing::warn!(run_id = %event.run_id, bytes = payload.len(), "event too large to notify; dropped");
            continue;
        }
        if let Err(e) = sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(&payload)
            .execute(&pool)
            .await
        {
            metrics::counter!("transferd_event_notify_failures_total").increment(1);
            tracing::warn!(error = %e, run_id = %event.run_id, "could not notify an event");
        }
    }
}

/// Listens on the channel until `shutdown`, publishing each event locally and waking idle
/// workers when a run is queued. A lost connection is re-opened by sqlx; events sent
/// while it was down are missed (a stream's next event, or a poll, catches up).
pub(super) async fn listen(
    mut listener: PgListener,
    local: broadcast::Sender<RunEvent>,
    wake: impl Fn(),
    shutdown: CancellationToken,
) {
    loop {
        let note = tokio::select! {
            _ = shutdown.cancelled() => return,
            note = listener.recv() => note,
        };
        let note = match note {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "event listener lost the database; retrying");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
        };
        match serde_json::from_str::<RunEvent>(note.payload()) {
            Ok(event) => {
                if let EventKind::Status {
                    status: RunStatus::Queued,
                    ..
                } = event.kind
                {
                    wake();
                }
                let _ = local.send(event);
            }
            Err(e) => tracing::warn!(error = %e, "unreadable event notification"),
        }
    }
}

/// A listener subscribed to the channel.
pub(super) async fn subscribe(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

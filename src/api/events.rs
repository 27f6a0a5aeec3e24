//! `GET /api/runs/{id}/events`: Server-Sent Events of one run. The stream opens with a
//! `snapshot` (the run as `GET /api/runs/{id}` shows it), then carries `progress`, `epoch`,
//! `phase_finished` and `status` events, and ends after the status that ends the run (or when
//! the server shuts down).

use std::convert::Infallible;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, KeepAliveStream, Sse};
use axum::routing::get;
use futures_util::stream::{self, BoxStream, StreamExt};
use tokio_stream::wrappers::BroadcastStream;

use crate::db;
use crate::error::{ApiError, ErrorBody};
use crate::jobs::RunEvent;
use crate::jobs::events::EventKind;
use crate::state::AppState;

/// How often a live stream checks the database for the end of its run.
const POLL_ENDED: Duration = Duration::from_secs(10);

/// The live stream: it reads, and lasts as long as the run (no request timeout).
pub fn streams() -> Router<AppState> {
    Router::new().route("/runs/{id}/events", get(events))
}

/// Live events of a run.
#[utoipa::path(get, path = "/api/runs/{id}/events", tag = "runs",
    params(("id" = String, Path, description = "Run id")),
    responses(
        (status = 200, description = "text/event-stream: `snapshot`, then `progress`, `epoch`, `phase_finished` and `status` events (data: RunEvent JSON)", content_type = "text/event-stream", body = crate::jobs::RunEvent),
        (status = 404, body = ErrorBody),
        (status = 503, description = "Too many streams open", body = ErrorBody)))]
pub async fn events(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Sse<KeepAliveStream<BoxStream<'static, Result<Event, Infallible>>>>, ApiError> {
    // Each stream holds a place until it ends, so idle watchers cannot pile up.
    let place = state
        .streams
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::Busy {
            message: format!(
                "{} live event streams are open, the limit (--max-event-streams); poll \
             GET /api/runs/{{id}} instead, or retry later",
                state.settings.max_event_streams
            ),
            retry_after: 5,
        })?;
    // Subscribe before reading the snapshot so nothing falls between the two.
    let rx = state.jobs.subscribe();
    let run = db::runs::get(&state.db, &id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("run {id} not found")))?;
    let ended = run.status.is_over();
    let snapshot = Event::default()
        .event("snapshot")
        .json_data(&run)
        .map_err(|e| ApiError::internal("encoding an event", e))?;
    let first = stream::once(async move { Ok(snapshot) });
    let stream: BoxStream<'static, Result<Event, Infallible>> = if ended {
        first.boxed()
    } else {
        // This run's live events, and, should the one that ends it be missed (a database
        // listener reconnecting, a reaper in a process without subscribers), its end as
        // the database has it, looked up every POLL_ENDED.
        let live = BroadcastStream::new(rx).filter_map({
            let id = id.clone();
            move |e| {
                // Other runs' events, or a lag that cost some progress events, are skipped.
                let mine = e.ok().filter(|e| e.run_id == id);
                std::future::ready(mine)
            }
        });
        let db = state.db.clone();
        let from_db = stream::unfold((), move |()| {
            let (db, id) = (db.clone(), id.clone());
            async move {
                tokio::time::sleep(POLL_ENDED).await;
                let end = match db::runs::get(&db, &id).await {
                    Ok(Some(run)) if run.status.is_over() => Some(RunEvent {
                        run_id: id,
                        kind: EventKind::Status {
                            status: run.status,
                            error: run.error,
                        },
                    }),
                    _ => None,
                };
                Some((end, ()))
            }
        })
        .filter_map(std::future::ready);
        // Ends right after the event that ends the run.
        let live = stream::select(live, from_db)
            .scan(false, |over, e| {
                if *over {
                    return std::future::ready(None);
                }
                *over = e.kind.is_final();
                std::future::ready(Some(e))
            })
            .map(move |e| {
                let _place = &place;
                Ok(Event::default()
                    .event(e.kind.name())
                    .json_data(&e)
                    .unwrap_or_else(|_| Event::default().comment("unencodable event")))
            })
            .take_until(state.shutdown.clone().cancelled_owned());
        first.chain(live).boxed()
    };
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

//! `/api/runs`: queue a run, follow it, read its metrics and evaluation, cancel it.

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::body::json_request;
use crate::db::status::RunStatus;
use crate::db::{self, cancel::CancelOutcome, runs::Run};
use crate::error::{ApiError, ErrorBody};
use crate::ml::config::TrainConfig;
use crate::ml::evaluate::{Calibration, ClassReport, Evaluation};
use crate::ml::events::EpochMetrics;
use crate::ml::plan::Plan;
use crate::ml::plan::TrainingReport;
use crate::state::AppState;

/// Routes that read.
pub fn reads() -> Router<AppState> {
    Router::new()
        .route("/runs", get(list))
        .route("/config", get(default_config))
        .route("/runs/{id}", get(show))
        .route("/runs/{id}/metrics", get(metrics))
        .route("/runs/{id}/evaluation", get(evaluation))
}

/// Routes that change state.
pub fn writes() -> Router<AppState> {
    Router::new()
        .route("/runs", post(create))
        .route("/runs/{id}/cancel", post(cancel))
}

/// Largest accepted run request.
const MAX_BODY: u64 = 64 << 10;

/// A run to queue.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRun {
    pub dataset_id: String,
    /// Training settings; every field left out takes its default. `finetune.enabled` is
    /// `"auto"` (fine-tune only on enough data, kept only when it helps), `true` or `false`;
    /// `baseline.enabled` `true` also trains from scratch for comparison.
    #[serde(default)]
    pub config: TrainConfig,
}

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound(format!("run {id} not found"))
}

/// Queue a training run.
#[utoipa::path(post, path = "/api/runs", tag = "runs", request_body = CreateRun,
    responses(
        (status = 202, description = "Queued", body = Run),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 415, body = ErrorBody),
        (status = 422, body = ErrorBody), (status = 429, description = "Too many runs queued", body = ErrorBody),
    ))]
pub async fn create(
    State(state): State<AppState>,
    request: Request,
) -> Result<(StatusCode, Json<Run>), ApiError> {
    let req: CreateRun = json_request(request, MAX_BODY, "the run request").await?;
    req.config
        .validate()
        .map_err(|e| ApiError::invalid(format!("config.{}", e.field), e.message))?;
    let dataset = db::datasets::get(&state.db, &req.dataset_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("dataset {} not found", req.dataset_id)))?;
    if let Some(small) = dataset
        .classes
        .iter()
        .find(|c| c.count < req.config.min_images_per_class.max(2))
    {
        return Err(ApiError::invalid(
            "config.min_images_per_class",
            format!(
                "class {:?} of the dataset has {} images, fewer than the {} this config needs",
                small.name,
                small.count,
                req.config.min_images_per_class.max(2)
            ),
        ));
    }
    // A run whose frozen pass cannot fit in memory is refused now, not left to abort the
    // process (and, after the restart, the next one).
    let counts: Vec<usize> = dataset.classes.iter().map(|c| c.count).collect();
    let estimate = Plan::new(&req.config, &counts).cache_bytes(&req.config, &counts);
    let budget = state.settings.max_cache_bytes;
    if estimate > budget {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        return Err(ApiError::unprocessable(format!(
            "this run would cache about {:.1} GiB of features and activations for {} photos; \
             the server's budget is {:.1} GiB (--max-cache-bytes). Lower views, input_size \
             or finetune.unfreeze",
            gib(estimate),
            dataset.total_images,
            gib(budget)
        )));
    }
    let id = uuid::Uuid::new_v4().to_string();
    let max = state.settings.max_queued_runs;
    let Some(run) = db::runs::create_bounded(&state.db, &id, &dataset.id, &req.config, max).await?
    else {
        return Err(ApiError::TooManyRequests(format!(
            "{max} runs are already queued, the limit (--max-queued-runs); wait for some to \
             finish or cancel them"
        )));
    };
    state.jobs.queued(&id);
    tracing::info!(run_id = %id, dataset_id = %dataset.id, "run queued");
    Ok((StatusCode::ACCEPTED, Json(run)))
}

/// The default training config: what every field of a run's `config` is when left out.
#[utoipa::path(get, path = "/api/config", tag = "runs",
    responses((status = 200, body = TrainConfig)))]
pub async fn default_config() -> Json<TrainConfig> {
    Json(TrainConfig::default())
}

/// Filter of the run list.
#[derive(Debug, Deserialize, IntoParams)]
pub struct ListQuery {
    /// Only runs with this status.
    pub status: Option<String>,
}

/// Runs, newest first, a page at a time (`X-Next-Cursor` when more follow).
#[utoipa::path(get, path = "/api/runs", tag = "runs", params(ListQuery, super::page::PageQuery),
    responses((status = 200, body = Vec<Run>), (status = 422, body = ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    Query(q): Query<ListQuery>,
    Query(paging): Query<super::page::PageQuery>,
) -> Result<axum::response::Response, ApiError> {
    let status = match q.status.as_deref() {
        None => None,
        Some(s) => Some(RunStatus::parse(s).ok_or_else(|| {
            let names: Vec<&str> = RunStatus::ALL.iter().map(|r| r.as_str()).collect();
            ApiError::invalid("status", format!("unknown status {s:?}; one of {names:?}"))
        })?),
    };
    let page = paging.page()?;
    let rows = db::runs::list(&state.db, status, &page).await?;
    Ok(super::page::respond(rows, &page, |r| {
        (r.created_at.as_str(), r.id.as_str())
    }))
}

/// One run: status, phase, progress, ETA, best metrics, error.
#[utoipa::path(get, path = "/api/runs/{id}", tag = "runs",
    params(("id" = String, Path, description = "Run id")),
    responses((status = 200, body = Run), (status = 404, body = ErrorBody)))]
pub async fn show(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Run>, ApiError> {
    db::runs::get(&state.db, &id)
        .await?
        .map(Json)
        .ok_or_else(|| not_found(&id))
}

/// The per-epoch rows of every phase, in order.
#[utoipa::path(get, path = "/api/runs/{id}/metrics", tag = "runs",
    params(("id" = String, Path, description = "Run id")),
    responses((status = 200, body = Vec<EpochMetrics>), (status = 404, body = ErrorBody)))]
pub async fn metrics(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Vec<EpochMetrics>>, ApiError> {
    if db::runs::get(&state.db, &id).await?.is_none() {
        return Err(not_found(&id));
    }
    Ok(Json(db::epochs::metrics(&state.db, &id).await?))
}

/// A validation image the model got wrong, with a link to it.
#[derive(Debug, Serialize, ToSchema)]
pub struct MisclassifiedImage {
    /// Id of the image in the run's dataset (`None` once the dataset is deleted).
    pub file_id: Option<i64>,
    /// Where to fetch the image.
    pub image_url: Option<String>,
    pub original_name: Option<String>,
    pub true_label: String,
    pub predicted: String,
    /// Calibrated probabilities per class, in class order.
    pub probabilities: Vec<f32>,
}

/// The evaluation of a run's model on its validation split.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunEvaluation {
    pub run_id: String,
    pub classes: Vec<String>,
    pub accuracy: f64,
    /// `confusion[true][predicted]`.
    pub confusion: Vec<Vec<usize>>,
    pub per_class: Vec<ClassReport>,
    pub calibration: Calibration,
    pub misclassified: Vec<MisclassifiedImage>,
    /// How the figures were measured (k-fold or holdout) and what the run decided (backbone,
    /// fine-tune kept or not, and why; head penalty; photos the served model saw). Absent
    /// for runs from before it was recorded.
    pub training: Option<TrainingReport>,
    /// How "unknown" answers are decided: the out-of-distribution method and threshold
    /// (absent for runs from before they existed).
    pub ood: Option<crate::ml::ood::OodSummary>,
    /// How many likely label errors, near-duplicates and outliers the audit found (the
    /// findings: `GET /api/runs/{id}/audit`).
    pub audit: Option<crate::ml::audit::AuditCounts>,
}

/// A run and its stored evaluation: 404 for an unknown run, 409 (naming `what` the caller
/// wanted) while it has not succeeded.
pub(super) async fn succeeded_evaluation(
    state: &AppState,
    id: &str,
    what: &str,
) -> Result<(Run, Evaluation), ApiError> {
    let run = db::runs::get(&state.db, id)
        .await?
        .ok_or_else(|| not_found(id))?;
    let Some(report) = db::epochs::evaluation(&state.db, id).await? else {
        return Err(ApiError::Conflict(format!(
            "run {id} is {}; its {what} exists once it has succeeded",
            run.status
        )));
    };
    Ok((run, db::json(&report)?))
}

/// Confusion matrix, per-class precision/recall/F1, calibration and the misclassified images.
#[utoipa::path(get, path = "/api/runs/{id}/evaluation", tag = "runs",
    params(("id" = String, Path, description = "Run id")),
    responses((status = 200, body = RunEvaluation), (status = 404, body = ErrorBody),
        (status = 409, description = "The run has not succeeded (yet)", body = ErrorBody)))]
pub async fn evaluation(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<RunEvaluation>, ApiError> {
    let (run, eval) = succeeded_evaluation(&state, &id, "evaluation").await?;
    let photos = super::photos::Photos::of(&state.db, run.dataset_id.as_deref()).await?;
    let misclassified = eval
        .misclassified
        .into_iter()
        .map(|m| {
            let link = photos.link(&m.path);
            MisclassifiedImage {
                file_id: link.as_ref().map(|l| l.file_id),
                original_name: link.as_ref().map(|l| l.original_name.clone()),
                image_url: link.map(|l| l.image_url),
                true_label: m.true_label,
                predicted: m.predicted,
                probabilities: m.probabilities,
            }
        })
        .collect();
    Ok(Json(RunEvaluation {
        run_id: id,
        classes: eval.classes,
        accuracy: eval.accuracy,
        confusion: eval.confusion,
        per_class: eval.per_class,
        calibration: eval.calibration,
        misclassified,
        training: eval.training,
        ood: eval.ood,
        audit: eval.audit.map(|a| a.counts),
    }))
}

/// Cancel a run: a queued one at once, a running one at its next step (its metrics so far
/// stay).
#[utoipa::path(post, path = "/api/runs/{id}/cancel", tag = "runs",
    params(("id" = String, Path, description = "Run id")),
    responses((status = 202, description = "Cancelled or stopping", body = Run),
        (status = 404, body = ErrorBody), (status = 409, description = "Already ended", body = ErrorBody)))]
pub async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Run>), ApiError> {
    match db::cancel::cancel(&state.db, &id).await? {
        CancelOutcome::NotFound => return Err(not_found(&id)),
        CancelOutcome::AlreadyEnded(status) => {
            return Err(ApiError::Conflict(format!(
                "run {id} has already ended: {status}"
            )));
        }
        CancelOutcome::Cancelled => {
            state.jobs.publish_status(&id, RunStatus::Cancelled, None);
        }
        CancelOutcome::Requested => {
            state.jobs.stop(&id);
        }
    }
    let run = db::runs::get(&state.db, &id)
        .await?
        .ok_or_else(|| not_found(&id))?;
    Ok((StatusCode::ACCEPTED, Json(run)))
}

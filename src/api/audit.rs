//! `GET /api/runs/{id}/audit`: the dataset audit a finished run made (likely label errors,
//! near-duplicates, outliers; see `ml::audit`), with a link to every image it names.

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::routing::get;
use serde::Serialize;
use utoipa::ToSchema;

use super::photos::Photos;
use crate::error::{ApiError, ErrorBody};
use crate::ml::audit::{AuditCounts, AuditPhoto, AuditThresholds, PairKind, Split};
use crate::state::AppState;

pub fn reads() -> Router<AppState> {
    Router::new().route("/runs/{id}/audit", get(audit))
}

/// A photo the audit names, with where to fetch it.
#[derive(Debug, Serialize, ToSchema)]
pub struct PhotoRef {
    /// Id in the run's dataset, the id `POST /api/datasets/{id}/versions` takes (`null`
    /// once the dataset is deleted).
    pub file_id: Option<i64>,
    pub image_url: Option<String>,
    pub original_name: Option<String>,
    /// The label the photo was given.
    pub label: String,
    pub split: Split,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LabelIssueRef {
    pub photo: PhotoRef,
    pub given: String,
    pub suggested: String,
    /// Out-of-fold probability of the given label (the ranking: lowest first).
    pub given_probability: f64,
    pub suggested_probability: f64,
    /// `1 − given_probability`.
    pub score: f64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct NearDuplicateRef {
    pub a: PhotoRef,
    pub b: PhotoRef,
    pub similarity: f64,
    pub kind: PairKind,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OutlierRef {
    pub photo: PhotoRef,
    pub score: f64,
}

/// The audit of a run's dataset, each list most suspicious first.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunAudit {
    pub run_id: String,
    pub dataset_id: Option<String>,
    /// Photos audited.
    pub photos: usize,
    pub label_issues: Vec<LabelIssueRef>,
    pub near_duplicates: Vec<NearDuplicateRef>,
    pub outliers: Vec<OutlierRef>,
    /// Totals (each list stops at `ml::audit::MAX_LISTED`).
    pub counts: AuditCounts,
    pub thresholds: AuditThresholds,
}

/// Likely label errors (out-of-fold confident learning), near-duplicate pairs (across
/// classes, or across the training/validation split) and outliers of a run's photos.
#[utoipa::path(get, path = "/api/runs/{id}/audit", tag = "runs",
    params(("id" = String, Path, description = "Run id")),
    responses((status = 200, body = RunAudit),
        (status = 404, description = "No such run, or it finished before audits existed", body = ErrorBody),
        (status = 409, description = "The run has not succeeded (yet)", body = ErrorBody)))]
pub async fn audit(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<RunAudit>, ApiError> {
    let (run, eval) = super::runs::succeeded_evaluation(&state, &id, "audit").await?;
    let audit = eval.audit.ok_or_else(|| {
        ApiError::NotFound(format!("run {id} finished before runs audited their data"))
    })?;
    let photos = Photos::of(&state.db, run.dataset_id.as_deref()).await?;
    let photo = |p: AuditPhoto| {
        let link = photos.link(&p.path);
        PhotoRef {
            file_id: link.as_ref().map(|l| l.file_id),
            original_name: link.as_ref().map(|l| l.original_name.clone()),
            image_url: link.map(|l| l.image_url),
            label: p.label,
            split: p.split,
        }
    };
    Ok(Json(RunAudit {
        run_id: id,
        dataset_id: run.dataset_id.clone(),
        photos: audit.photos,
        label_issues: audit
            .label_issues
            .into_iter()
            .map(|l| LabelIssueRef {
                given: l.photo.label.clone(),
                photo: photo(l.photo),
                suggested: l.suggested,
                score: 1.0 - l.given_probability,
                given_probability: l.given_probability,
                suggested_probability: l.suggested_probability,
            })
            .collect(),
        near_duplicates: audit
            .near_duplicates
            .into_iter()
            .map(|d| NearDuplicateRef {
                a: photo(d.a),
                b: photo(d.b),
                similarity: d.similarity,
                kind: d.kind,
            })
            .collect(),
        outliers: audit
            .outliers
            .into_iter()
            .map(|o| OutlierRef {
                photo: photo(o.photo),
                score: o.score,
            })
            .collect(),
        counts: audit.counts,
        thresholds: audit.thresholds,
    }))
}

//! `POST /api/datasets/{id}/versions`: a new dataset made from a stored one, with some images
//! left out and some filed under another class (what a run's audit suggests). The original
//! stays as it is; the version trains like any dataset.

use std::collections::{BTreeMap, HashSet};

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::post;
use serde::Deserialize;
use utoipa::ToSchema;

use super::datasets::store;
use crate::db::{self, datasets::Dataset, datasets::Origin};
use crate::error::{ApiError, ErrorBody};
use crate::ingest::{Kept, derive_version};
use crate::state::AppState;

pub fn writes() -> Router<AppState> {
    Router::new().route("/datasets/{id}/versions", post(create))
}

/// An image to file under another class.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Relabel {
    pub file_id: i64,
    /// One of the dataset's classes.
    pub label: String,
}

/// The changes, by file id (`GET /api/runs/{id}/audit` lists them).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VersionRequest {
    /// Name of the new dataset; "<parent name> (fixed)" when left out.
    pub name: Option<String>,
    #[serde(default)]
    pub exclude: Vec<i64>,
    #[serde(default)]
    pub relabel: Vec<Relabel>,
}

/// Create a dataset version without the chosen images, or with their labels fixed.
#[utoipa::path(post, path = "/api/datasets/{id}/versions", tag = "datasets",
    params(("id" = String, Path, description = "Dataset id")),
    request_body = VersionRequest,
    responses(
        (status = 201, description = "The new dataset, with `origin`", body = Dataset),
        (status = 404, body = ErrorBody),
        (status = 422, description = "Unknown file ids or labels, no change, or a class left too small", body = ErrorBody),
    ))]
pub async fn create(
    State(state): State<AppState>,
    Path(id): Path<String>,
    request: axum::extract::Request,
) -> Result<(StatusCode, Json<Dataset>), ApiError> {
    // Room for a few hundred thousand file ids.
    let request: VersionRequest =
        super::body::json_request(request, 4 << 20, "the version request").await?;
    let parent = db::datasets::get(&state.db, &id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("dataset {id} not found")))?;
    let classes: HashSet<&str> = parent.classes.iter().map(|c| c.name.as_str()).collect();
    let files = db::datasets::files(&state.db, &id).await?;
    let known: HashSet<i64> = files.iter().map(|f| f.id).collect();
    let unknown = |field: &str, ids: &mut dyn Iterator<Item = i64>| {
        let unknown: Vec<i64> = ids.filter(|f| !known.contains(f)).collect();
        if unknown.is_empty() {
            Ok(())
        } else {
            Err(ApiError::invalid(
                field,
                format!("file ids not in dataset {id}: {unknown:?}"),
            ))
        }
    };
    unknown("exclude", &mut request.exclude.iter().copied())?;
    unknown("relabel", &mut request.relabel.iter().map(|r| r.file_id))?;
    let excluded: HashSet<i64> = request.exclude.iter().copied().collect();
    let mut relabels: BTreeMap<i64, &str> = BTreeMap::new();
    for r in &request.relabel {
        if !classes.contains(r.label.as_str()) {
            return Err(ApiError::invalid(
                "relabel",
                format!("{:?} is not a class of dataset {id}", r.label),
            ));
        }
        if excluded.contains(&r.file_id) {
            return Err(ApiError::invalid(
                "relabel",
                format!("file {} is both excluded and relabelled", r.file_id),
            ));
        }
        if relabels.insert(r.file_id, &r.label).is_some() {
            return Err(ApiError::invalid(
                "relabel",
                format!("file {} is relabelled twice", r.file_id),
            ));
        }
    }
    let relabelled = files
        .iter()
        .filter(|f| relabels.get(&f.id).is_some_and(|l| *l != f.class))
        .count();
    if excluded.is_empty() && relabelled == 0 {
        return Err(ApiError::invalid(
            "exclude",
            "nothing to change: exclude or relabel at least one image",
        ));
    }
    let name = super::datasets::dataset_name(request.name, &format!("{} (fixed)", parent.name))?;
    let kept: Vec<Kept> = files
        .iter()
        .filter(|f| !excluded.contains(&f.id))
        .map(|f| Kept {
            class: relabels
                .get(&f.id)
                .map_or(f.class.clone(), |l| l.to_string()),
            original_name: f.original_name.clone(),
            sha256: f.sha256.clone(),
            format: f.format.clone(),
            width: f.width as u32,
            height: f.height as u32,
            bytes: f.bytes as u64,
        })
        .collect();
    // A version keeps every class: leaving one out would be another problem, not a fix.
    for class in &parent.classes {
        if !kept.iter().any(|k| k.class == class.name) {
            return Err(ApiError::invalid(
                "exclude",
                format!(
                    "this would leave class {:?} with no images; a version keeps every class",
                    class.name
                ),
            ));
        }
    }
    let names: Vec<String> = files
        .iter()
        .filter(|f| !excluded.contains(&f.id))
        .map(|f| f.file_name())
        .collect();
    // Kept out of the cache's evictions until the version's own copy is stored.
    let _parent = state.objects.fetch_dataset(&id, &names).await?;
    let origin = Origin {
        parent_id: id.clone(),
        excluded: excluded.len(),
        relabelled,
    };
    let new_id = uuid::Uuid::new_v4().to_string();
    let staging = state.storage.tmp().join(format!("dataset-{new_id}"));
    let source = state.storage.dataset(&id);
    let limits = state.settings.limits.clone();
    let staged = staging.clone();
    let note = format!(
        "version of dataset {id} ({}): {} image(s) left out, {} relabelled",
        parent.name, origin.excluded, origin.relabelled
    );
    let ingested = tokio::task::spawn_blocking(move || {
        derive_version(&source, kept, &staged, vec![note], &limits)
    })
    .await
    .map_err(|e| ApiError::internal("making a dataset version", e))?;
    let ingested = match ingested {
        Ok(i) => i,
        Err(e) => {
            let _ = tokio::fs::remove_dir_all(&staging).await;
            return Err(e.into());
        }
    };
    let dataset = store(&state, &new_id, &name, &staging, &ingested, Some(&origin)).await?;
    Ok((StatusCode::CREATED, Json(dataset)))
}

//! `GET /api/models/{id}/export`: a trained model as a file to run elsewhere: ONNX (the
//! whole network, softmax included) or safetensors (the weights, with the config JSON).

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use utoipa::IntoParams;

use crate::db;
use crate::error::{ApiError, ErrorBody};
use crate::ml::export::{self, ExportFormat};
use crate::state::AppState;

pub fn reads() -> Router<AppState> {
    Router::new().route("/models/{id}/export", get(export_model))
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct ExportQuery {
    /// `onnx` (the default) or `safetensors`.
    pub format: Option<String>,
}

/// Download a model as ONNX or safetensors.
#[utoipa::path(get, path = "/api/models/{id}/export", tag = "models",
    params(("id" = String, Path, description = "Model id"), ExportQuery),
    responses(
        (status = 200, description = "The file, as an attachment", content_type = "application/octet-stream"),
        (status = 404, body = ErrorBody),
        (status = 422, description = "Unknown format (the message lists the formats)", body = ErrorBody),
    ))]
pub async fn export_model(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<ExportQuery>,
) -> Result<Response, ApiError> {
    let format: ExportFormat = match q.format.as_deref() {
        None => ExportFormat::Onnx,
        Some(f) => f
            .parse()
            .map_err(|e: export::UnknownFormat| ApiError::invalid("format", e.to_string()))?,
    };
    db::models::get(&state.db, &id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("model {id} not found")))?;
    let (dir, kept) = state.objects.fetch_model(&id).await?;
    // Loading and folding the network is burn compute: never on the async executor.
    let bytes = tokio::task::spawn_blocking(move || {
        let _kept = kept;
        export::export_dir(&dir, format)
    })
    .await
    .map_err(|e| ApiError::internal("exporting a model", e))?
    .map_err(|e| ApiError::internal("exporting a model", e))?;
    let name = format!("model-{id}.{}", format.extension());
    Ok((
        [
            (header::CONTENT_TYPE, format.media_type().to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
        ],
        Body::from(bytes),
    )
        .into_response())
}

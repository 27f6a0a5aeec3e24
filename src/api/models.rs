//! `/api/models`: the trained classifiers, and which one predictions use by default.

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::routing::{get, post};

use crate::db::{self, models::Model};
use crate::error::{ApiError, ErrorBody};
use crate::state::AppState;

/// Routes that read.
pub fn reads() -> Router<AppState> {
    Router::new().route("/models", get(list))
}

/// Routes that change state.
pub fn writes() -> Router<AppState> {
    Router::new().route("/models/{id}/promote", post(promote))
}

/// Every model, newest first; `is_default` marks the one predictions use.
#[utoipa::path(get, path = "/api/models", tag = "models",
    responses((status = 200, body = Vec<Model>)))]
pub async fn list(State(state): State<AppState>) -> Result<Json<Vec<Model>>, ApiError> {
    Ok(Json(db::models::list(&state.db).await?))
}

/// Make a model the default for predictions.
#[utoipa::path(post, path = "/api/models/{id}/promote", tag = "models",
    params(("id" = String, Path, description = "Model id")),
    responses((status = 200, body = Model), (status = 404, body = ErrorBody)))]
pub async fn promote(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Model>, ApiError> {
    if !db::models::promote(&state.db, &id).await? {
        return Err(ApiError::NotFound(format!("model {id} not found")));
    }
    tracing::info!(model_id = %id, "model promoted");
    db::models::get(&state.db, &id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("model {id} not found")))
}

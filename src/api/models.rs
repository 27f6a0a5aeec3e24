//! `/api/models`: the trained classifiers, and which one predictions use by default.

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::routing::{delete, get, post};

use crate::db::{self, models::Model};
use crate::error::{ApiError, ErrorBody};
use crate::state::AppState;

/// Routes that read.
pub fn reads() -> Router<AppState> {
    Router::new().route("/models", get(list))
}

/// Routes that change state.
pub fn writes() -> Router<AppState> {
    Router::new()
        .route("/models/{id}/promote", post(promote))
        .route("/models/{id}", delete(remove))
}

/// Delete a model: its row and its files. The run that made it keeps its record. The
/// default model cannot be deleted; promote another one first.
#[utoipa::path(delete, path = "/api/models/{id}", tag = "models",
    params(("id" = String, Path, description = "Model id")),
    responses((status = 204, description = "Deleted"), (status = 404, body = ErrorBody),
        (status = 409, description = "It is the default model", body = ErrorBody)))]
pub async fn remove(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<axum::http::StatusCode, ApiError> {
    match db::models::delete(&state.db, &id).await? {
        db::models::DeleteModel::NotFound => {
            Err(ApiError::NotFound(format!("model {id} not found")))
        }
        db::models::DeleteModel::IsDefault => Err(ApiError::Conflict(format!(
            "model {id} is the default for predictions; promote another model first"
        ))),
        db::models::DeleteModel::Deleted => {
            // The row is gone, so nothing serves it any more; the files follow.
            if let Err(e) = state.objects.remove(crate::objects::Kind::Model, &id).await {
                tracing::warn!(model_id = %id, error = %e, "model files not removed");
            }
            tracing::info!(model_id = %id, "model deleted");
            Ok(axum::http::StatusCode::NO_CONTENT)
        }
    }
}

/// Models, newest first, a page at a time (`X-Next-Cursor` when more follow);
/// `is_default` marks the one predictions use.
#[utoipa::path(get, path = "/api/models", tag = "models", params(super::page::PageQuery),
    responses((status = 200, body = Vec<Model>), (status = 422, body = ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    axum::extract::Query(q): axum::extract::Query<super::page::PageQuery>,
) -> Result<axum::response::Response, ApiError> {
    let page = q.page()?;
    let rows = db::models::list(&state.db, &page).await?;
    Ok(super::page::respond(rows, &page, |m| {
        (m.created_at.as_str(), m.id.as_str())
    }))
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

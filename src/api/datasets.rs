//! `/api/datasets`: zip uploads (multipart field `file` or a raw `application/zip` body),
//! their reports, deletion, and the stored images.

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{self, get};
use futures_util::StreamExt;
use serde::Deserialize;
use utoipa::IntoParams;

use super::body::{check_length, media_type, too_large, write_chunk};
use super::page::{self, PageQuery};
use crate::db::{self, datasets::Dataset};
use crate::error::{ApiError, ErrorBody};
use crate::ingest::ingest_zip;
use crate::objects::Kind;
use crate::state::AppState;

/// Routes that read.
pub fn reads() -> Router<AppState> {
    Router::new()
        .route("/datasets", get(list))
        .route("/datasets/{id}", get(show))
        .route("/datasets/{id}/files/{file_id}", get(file))
}

/// Routes that change state.
pub fn writes() -> Router<AppState> {
    Router::new().route("/datasets/{id}", routing::delete(delete))
}

/// The upload: it changes state, and runs as long as the upload takes (no request timeout).
pub fn uploads() -> Router<AppState> {
    Router::new().route("/datasets", routing::post(upload))
}

/// Query of a raw upload.
#[derive(Debug, Deserialize, IntoParams)]
pub struct UploadQuery {
    /// A name for the dataset (a multipart `name` field works too).
    pub name: Option<String>,
}

const MAX_NAME: usize = 200;
/// Bytes the multipart `name` field may carry (read no further).
const MAX_NAME_FIELD: usize = 1024;

/// Awaits the next piece of an upload's body, unless the client stalls longer than
/// `--upload-stall-timeout` (408) or the server is shutting down (503): a slow upload never
/// holds a connection or a shutdown for ever.
async fn stalled<T>(
    state: &AppState,
    next: impl std::future::Future<Output = T>,
) -> Result<T, ApiError> {
    let limit = state.settings.upload_stall_timeout;
    tokio::select! {
        got = tokio::time::timeout(limit, next) => got.map_err(|_| {
            ApiError::RequestTimeout(format!(
                "the upload sent nothing for {:.0} s; it was abandoned",
                limit.as_secs_f64()
            ))
        }),
        _ = state.shutdown.cancelled() => Err(ApiError::Unavailable(
            "the server is shutting down; upload again once it is back".into(),
        )),
    }
}
const ZIP_TYPES: [&str; 4] = [
    "application/zip",
    "application/x-zip-compressed",
    "application/x-zip",
    "application/octet-stream",
];

/// Refuses an upload the data disk or the quota has no room for (507), before a byte is
/// stored: it may take its size as a temporary zip plus about as much again as images.
async fn room_for_upload(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // A body of unknown length (chunked) is judged by the headroom alone; the upload limit
    // still stops it while it streams.
    let size = declared.unwrap_or(0);
    let storage = state.storage.clone();
    let quota = state.settings.data_quota_bytes;
    let (free, used) = tokio::task::spawn_blocking(move || {
        let used = quota.map(|_| storage.used_bytes()).transpose()?;
        Ok::<_, std::io::Error>((storage.free_bytes()?, used))
    })
    .await
    .map_err(|e| ApiError::internal("checking free space", e))?
    .map_err(|e| ApiError::internal("checking free space", e))?;
    let mib = |b: u64| b >> 20;
    let need = size
        .saturating_mul(2)
        .saturating_add(state.settings.min_free_bytes);
    if free < need {
        return Err(ApiError::InsufficientStorage(format!(
            "the data disk has {} MiB free; an upload of {} MiB needs about {} MiB (twice its \
             size, plus the {} MiB kept free)",
            mib(free),
            mib(size),
            mib(need),
            mib(state.settings.min_free_bytes)
        )));
    }
    if let (Some(quota), Some(used)) = (quota, used) {
        if used.saturating_add(size) > quota {
            return Err(ApiError::InsufficientStorage(format!(
                "datasets and models use {} MiB of the data directory's {} MiB quota \
                 (--data-quota-bytes); delete some before uploading {} MiB more",
                mib(used),
                mib(quota),
                mib(size)
            )));
        }
    }
    Ok(())
}

/// Streams the zip to a temporary file under the upload limit.
async fn receive(
    state: &AppState,
    headers: &HeaderMap,
    request: Request,
    name: &mut Option<String>,
) -> Result<tempfile::TempPath, ApiError> {
    let limit = state.settings.max_upload_bytes;
    check_length(headers, limit, "the upload")?;
    let path = tempfile::Builder::new()
        .prefix("upload-")
        .suffix(".zip")
        .tempfile_in(state.storage.tmp())
        .map_err(|e| ApiError::internal("creating an upload file", e))?
        .into_temp_path();
    let mut out = tokio::fs::File::create(&path)
        .await
        .map_err(|e| ApiError::internal("opening an upload file", e))?;
    let mut written = 0u64;
    match media_type(headers).as_deref() {
        Some("multipart/form-data") => {
            let request = super::body::capped(request, limit);
            let mut multipart = Multipart::from_request(request, state)
                .await
                .map_err(|e| ApiError::BadRequest(e.body_text()))?;
            let (mut got_file, mut got_name) = (false, false);
            // Every byte of every field counts against the upload limit.
            let mut counted = 0u64;
            while let Some(mut field) = stalled(state, multipart.next_field())
                .await?
                .map_err(|e| super::body::multipart_error("the upload", limit, e))?
            {
                let field_name = field.name().unwrap_or("").to_string();
                match field_name.as_str() {
                    "file" if !got_file => {
                        got_file = true;
                        if name.is_none() {
                            *name = field
                                .file_name()
                                .map(|f| f.trim_end_matches(".zip").to_string());
                        }
                        while let Some(chunk) =
                            stalled(state, field.chunk()).await?.map_err(|e| {
                                ApiError::BadRequest(format!("reading the `file` field: {e}"))
                            })?
                        {
                            counted += chunk.len() as u64;
                            write_chunk(&mut out, &mut written, &chunk, limit, "the upload")
                                .await?;
                        }
                    }
                    "name" if !got_name => {
                        got_name = true;
                        let mut text = Vec::new();
                        while let Some(chunk) =
                            stalled(state, field.chunk()).await?.map_err(|e| {
                                ApiError::BadRequest(format!("reading the `name` field: {e}"))
                            })?
                        {
                            counted += chunk.len() as u64;
                            if text.len() + chunk.len() > MAX_NAME_FIELD {
                                return Err(ApiError::invalid(
                                    "name",
                                    format!("longer than {MAX_NAME_FIELD} bytes"),
                                ));
                            }
                            text.extend_from_slice(&chunk);
                        }
                        let text = String::from_utf8(text)
                            .map_err(|_| ApiError::invalid("name", "not UTF-8 text"))?;
                        *name = Some(text);
                    }
                    "file" | "name" => {
                        return Err(ApiError::BadRequest(format!(
                            "the multipart body has more than one `{field_name}` field"
                        )));
                    }
                    _ => {
                        return Err(ApiError::BadRequest(format!(
                            "unknown multipart field {field_name:?}; send `file` (the zip) \
                             and optionally `name`"
                        )));
                    }
                }
                if counted > limit {
                    return Err(too_large("the upload", limit));
                }
            }
            if !got_file {
                return Err(ApiError::invalid(
                    "file",
                    "the multipart body has no `file` field with the zip",
                ));
            }
        }
        Some(t) if ZIP_TYPES.contains(&t) => {
            let mut stream = request.into_body().into_data_stream();
            while let Some(chunk) = stalled(state, stream.next()).await? {
                let chunk =
                    chunk.map_err(|e| ApiError::BadRequest(format!("reading the body: {e}")))?;
                write_chunk(&mut out, &mut written, &chunk, limit, "the upload").await?;
            }
        }
        other => {
            return Err(ApiError::UnsupportedMediaType(format!(
                "send the zip as multipart/form-data (field `file`) or as an application/zip \
                 body, not {}",
                other.unwrap_or("a body without Content-Type")
            )));
        }
    }
    if written == 0 {
        return Err(ApiError::BadRequest(
            "the upload is empty; expected a zip".into(),
        ));
    }
    out.sync_all()
        .await
        .map_err(|e| ApiError::internal("flushing an upload", e))?;
    Ok(path)
}

/// Upload a zip with one folder of images per class.
#[utoipa::path(post, path = "/api/datasets", tag = "datasets", params(UploadQuery),
    request_body(content = Vec<u8>, description = "The zip, raw (`application/zip`) or as multipart field `file` (with an optional `name` field)", content_type = "application/zip"),
    responses(
        (status = 201, description = "The dataset report", body = Dataset),
        (status = 400, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 415, body = ErrorBody), (status = 422, body = ErrorBody),
    ))]
pub async fn upload(
    State(state): State<AppState>,
    Query(query): Query<UploadQuery>,
    headers: HeaderMap,
    request: Request,
) -> Result<(StatusCode, Json<Dataset>), ApiError> {
    let mut name = query.name;
    room_for_upload(&state, &headers).await?;
    let zip = receive(&state, &headers, request, &mut name).await?;
    let name = dataset_name(name, "dataset")?;
    let id = uuid::Uuid::new_v4().to_string();
    let staging = state.storage.tmp().join(format!("dataset-{id}"));
    let limits = state.settings.limits.clone();
    let staged = staging.clone();
    let ingested = tokio::task::spawn_blocking(move || {
        let result = ingest_zip(&zip, &staged, &limits);
        drop(zip); // the upload itself is no longer needed
        result
    })
    .await
    .map_err(|e| ApiError::internal("checking an upload", e))?;
    let ingested = match ingested {
        Ok(i) => i,
        Err(e) => {
            let _ = tokio::fs::remove_dir_all(&staging).await;
            return Err(e.into());
        }
    };
    let dataset = store(&state, &id, &name, &staging, &ingested, None).await?;
    Ok((StatusCode::CREATED, Json(dataset)))
}

/// A dataset's name: the one given, trimmed, at most [`MAX_NAME`] characters; else
/// `default`, cut to that length.
pub(super) fn dataset_name(given: Option<String>, default: &str) -> Result<String, ApiError> {
    match given
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
    {
        Some(n) if n.chars().count() > MAX_NAME => Err(ApiError::invalid(
            "name",
            format!("longer than {MAX_NAME} characters"),
        )),
        Some(n) => Ok(n),
        None => Ok(default.chars().take(MAX_NAME).collect()),
    }
}

/// Moves a checked dataset folder (`staging`) into place, publishes it to the object store
/// and records its rows; on failure nothing of it is left behind.
pub(super) async fn store(
    state: &AppState,
    id: &str,
    name: &str,
    staging: &std::path::Path,
    ingested: &crate::ingest::Ingested,
    origin: Option<&db::datasets::Origin>,
) -> Result<Dataset, ApiError> {
    // The folder gets its final name before the rows commit; a crash in between leaves an
    // orphan folder that start-up removes, never a row without its files.
    let dir = state.storage.dataset(id);
    // Out of the cache's evictions from the moment it has its name until it is stored.
    let _kept = state.objects.keep(Kind::Dataset, id);
    let (from, to) = (staging.to_path_buf(), dir.clone());
    let moved = tokio::task::spawn_blocking(move || crate::durable::rename(&from, &to))
        .await
        .map_err(|e| ApiError::internal("moving an upload into place", e))?;
    if let Err(e) = moved {
        let _ = tokio::fs::remove_dir_all(&staging).await;
        return Err(ApiError::internal("moving an upload into place", e));
    }
    // With a shared object store the files are there before any row names them.
    if let Err(e) = state.objects.publish_dataset(id).await {
        let _ = tokio::fs::remove_dir_all(&dir).await;
        return Err(e.into());
    }
    match db::datasets::insert(&state.db, id, name, ingested, origin).await {
        Ok(dataset) => {
            tracing::info!(dataset_id = %id, images = dataset.total_images,
                skipped = dataset.skipped.len(), "dataset stored");
            Ok(dataset)
        }
        Err(e) => {
            if let Err(cleanup) = state.objects.remove(Kind::Dataset, id).await {
                tracing::warn!(dataset_id = %id, error = %cleanup, "could not remove an unrecorded upload");
            }
            Err(e.into())
        }
    }
}

/// Datasets, newest first, a page at a time (`X-Next-Cursor` when more follow). The list
/// leaves out each upload's skipped files (`skipped_count` says how many); the dataset's
/// own route has them.
#[utoipa::path(get, path = "/api/datasets", tag = "datasets", params(PageQuery),
    responses((status = 200, body = Vec<Dataset>), (status = 422, body = ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    Query(q): Query<PageQuery>,
) -> Result<Response, ApiError> {
    let page = q.page()?;
    let mut rows = db::datasets::list(&state.db, &page).await?;
    for d in &mut rows {
        d.skipped.clear();
    }
    Ok(page::respond(rows, &page, |d| {
        (d.created_at.as_str(), d.id.as_str())
    }))
}

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound(format!("dataset {id} not found"))
}

/// One dataset and its upload report.
#[utoipa::path(get, path = "/api/datasets/{id}", tag = "datasets",
    params(("id" = String, Path, description = "Dataset id")),
    responses((status = 200, body = Dataset), (status = 404, body = ErrorBody)))]
pub async fn show(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Dataset>, ApiError> {
    db::datasets::get(&state.db, &id)
        .await?
        .map(Json)
        .ok_or_else(|| not_found(&id))
}

/// Delete a dataset and its images. Refused while a queued or running run uses it; the
/// models of finished runs stay usable.
#[utoipa::path(delete, path = "/api/datasets/{id}", tag = "datasets",
    params(("id" = String, Path, description = "Dataset id")),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    match db::datasets::delete(&state.db, &id).await? {
        db::datasets::Delete::Deleted => {
            if let Err(e) = state.objects.remove(Kind::Dataset, &id).await {
                // The rows are gone; leftovers are orphans that start-up clears away.
                tracing::warn!(dataset_id = %id, error = %e, "could not remove the dataset's files");
            }
            Ok(StatusCode::NO_CONTENT)
        }
        db::datasets::Delete::NotFound => Err(not_found(&id)),
        db::datasets::Delete::InUse(n) => Err(ApiError::Conflict(format!(
            "dataset {id} is used by {n} queued or running run(s); cancel them first"
        ))),
    }
}

/// One stored image, as uploaded.
#[utoipa::path(get, path = "/api/datasets/{id}/files/{file_id}", tag = "datasets",
    params(("id" = String, Path, description = "Dataset id"), ("file_id" = i64, Path, description = "File id")),
    responses((status = 200, description = "The image bytes", content_type = "image/*"), (status = 404, body = ErrorBody)))]
pub async fn file(
    State(state): State<AppState>,
    Path((id, file_id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let missing = || ApiError::NotFound(format!("file {file_id} of dataset {id} not found"));
    let file_id: i64 = file_id.parse().map_err(|_| missing())?;
    let file = db::datasets::file(&state.db, &id, file_id)
        .await?
        .ok_or_else(missing)?;
    let name = file.file_name();
    state
        .objects
        .fetch_dataset(&id, std::slice::from_ref(&name))
        .await?;
    let path = state.storage.dataset(&id).join(name);
    let bytes = tokio::fs::read(&path)
        .await
        .map_err(|e| ApiError::internal("reading a dataset image", e))?;
    let content_type = format!("image/{}", file.format);
    // Content-addressed, so cacheable for ever; but under --protect-reads a shared cache
    // must not hand it to someone without a key.
    let access = &state.settings.access;
    let cache = if access.needs_key(crate::keys::Guard::Read) {
        "private, no-store"
    } else {
        "public, max-age=31536000, immutable"
    };
    Ok((
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, cache.to_string()),
            (header::VARY, "Authorization".to_string()),
        ],
        Body::from(bytes),
    )
        .into_response())
}

//! Request bodies read under our own limits (so a too-large body is a JSON 413, not a bare
//! one) and JSON parsed so that errors name the field at fault.

use axum::body::Body;
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use tokio::io::AsyncWriteExt;

use crate::error::ApiError;

/// The media type of a request, lower-cased and without parameters.
pub fn media_type(headers: &axum::http::HeaderMap) -> Option<String> {
    headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
}

/// Refuses early when `Content-Length` already says the body is too large.
pub fn check_length(
    headers: &axum::http::HeaderMap,
    limit: u64,
    what: &str,
) -> Result<(), ApiError> {
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(n) if n > limit => Err(too_large(what, limit)),
        _ => Ok(()),
    }
}

pub fn too_large(what: &str, limit: u64) -> ApiError {
    ApiError::TooLarge(format!("{what} is larger than the {limit}-byte limit"))
}

/// Reads a whole body, refusing more than `limit` bytes.
pub async fn read_limited(body: Body, limit: u64, what: &str) -> Result<Vec<u8>, ApiError> {
    let mut stream = body.into_data_stream();
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("reading the body: {e}")))?;
        if (out.len() + chunk.len()) as u64 > limit {
            return Err(too_large(what, limit));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Appends one chunk to `file`, counting against `limit`.
pub async fn write_chunk(
    file: &mut tokio::fs::File,
    written: &mut u64,
    chunk: &[u8],
    limit: u64,
    what: &str,
) -> Result<(), ApiError> {
    *written += chunk.len() as u64;
    if *written > limit {
        return Err(too_large(what, limit));
    }
    file.write_all(chunk)
        .await
        .map_err(|e| ApiError::internal("writing an upload to disk", e))
}

/// A JSON request body of at most `limit` bytes. Only `application/json` is taken: a form
/// or a `no-cors` fetch cannot send that type, which keeps other sites out too.
pub async fn json_request<T: DeserializeOwned>(
    request: axum::extract::Request,
    limit: u64,
    what: &str,
) -> Result<T, ApiError> {
    if media_type(request.headers()).as_deref() != Some("application/json") {
        return Err(ApiError::UnsupportedMediaType(format!(
            "send {what} as JSON, with Content-Type: application/json"
        )));
    }
    let bytes = read_limited(request.into_body(), limit, what).await?;
    parse_json(&bytes)
}

/// Parses JSON; a mistake comes back as a 422 naming its field (`config.finetune.epochs`).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.is_empty() {
        return Err(ApiError::BadRequest(
            "the request body is empty; expected JSON".into(),
        ));
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::BadRequest(format!("malformed JSON: {inner}"))
        } else if path == "." {
            ApiError::unprocessable(inner.to_string())
        } else {
            ApiError::invalid(path, inner.to_string())
        }
    })
}

/// Reads and throws away a refused request's body, up to `limit` bytes and while it keeps
/// coming: the client then reads its answer on a connection that stays open, instead of a
/// reset from a server that stopped reading mid-upload. Nothing is kept.
pub async fn discard(body: Body, limit: u64) {
    let mut stream = body.into_data_stream();
    let mut seen = 0u64;
    while let Ok(Some(Ok(chunk))) =
        tokio::time::timeout(std::time::Duration::from_secs(5), stream.next()).await
    {
        seen += chunk.len() as u64;
        if seen > limit {
            break;
        }
    }
}

/// The request with its body capped at `limit` bytes in all, whatever reads it: multipart
/// parsing buffers part headers with no limit of its own, so without this a single endless
/// header line would grow until the client stopped.
pub fn capped(request: axum::extract::Request, limit: u64) -> axum::extract::Request {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    request.map(|body| Body::new(http_body_util::Limited::new(body, limit)))
}

/// The answer to a failure while reading a capped multipart body: 413 when the cap was hit.
pub fn multipart_error(
    what: &str,
    limit: u64,
    e: axum::extract::multipart::MultipartError,
) -> ApiError {
    if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        too_large(what, limit)
    } else {
        ApiError::BadRequest(format!("reading {what}: {}", e.body_text()))
    }
}

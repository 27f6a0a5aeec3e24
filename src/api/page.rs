//! Paging of the list routes: `?limit=` (default 100, at most 1,000) and `?cursor=` (from
//! the previous page's `X-Next-Cursor` header). The body stays a JSON array; the header is
//! there only when more rows follow.

use axum::Json;
use axum::http::{HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use utoipa::IntoParams;

use crate::db::Page;
use crate::error::ApiError;

/// Rows per page when `limit` is left out.
pub const DEFAULT_LIMIT: usize = 100;
/// The largest `limit` accepted.
pub const MAX_LIMIT: usize = 1_000;

/// The header that carries the next page's cursor.
pub const NEXT_CURSOR: HeaderName = HeaderName::from_static("x-next-cursor");

/// Which page of a list.
#[derive(Debug, Deserialize, IntoParams)]
pub struct PageQuery {
    /// Rows per page (1 to 1,000; default 100).
    pub limit: Option<usize>,
    /// Where to go on: the previous page's `X-Next-Cursor`.
    pub cursor: Option<String>,
}

impl PageQuery {
    /// The page asked for, with one extra row to learn whether another page follows.
    pub fn page(&self) -> Result<Page, ApiError> {
        let limit = self.limit.unwrap_or(DEFAULT_LIMIT);
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(ApiError::invalid(
                "limit",
                format!("must be between 1 and {MAX_LIMIT}"),
            ));
        }
        let after = match self.cursor.as_deref() {
            None => None,
            Some(c) => Some(
                c.split_once('_')
                    .filter(|(t, id)| !t.is_empty() && !id.is_empty())
                    .map(|(t, id)| (t.to_string(), id.to_string()))
                    .ok_or_else(|| {
                        ApiError::invalid("cursor", "not a cursor from X-Next-Cursor")
                    })?,
            ),
        };
        Ok(Page {
            limit: limit + 1,
            after,
        })
    }
}

/// The rows of a page as a JSON array, with `X-Next-Cursor` when more follow. `key` gives
/// a row's (`created_at`, `id`).
pub fn respond<T: serde::Serialize>(
    mut rows: Vec<T>,
    page: &Page,
    key: impl Fn(&T) -> (&str, &str),
) -> Response {
    let more = rows.len() >= page.limit;
    if more {
        rows.truncate(page.limit - 1);
    }
    let next = more
        .then(|| rows.last().map(|r| key(r)))
        .flatten()
        .map(|(t, id)| format!("{t}_{id}"));
    let mut res = Json(rows).into_response();
    if let Some(value) = next.and_then(|n| HeaderValue::from_str(&n).ok()) {
        res.headers_mut().insert(NEXT_CURSOR, value);
    }
    res
}

//! `POST /api/predict`: class probabilities of one image (multipart `image` or a raw body) or
//! of several (repeated multipart `image` fields), from the default or a named model.

use axum::Json;
use axum::Router;
use axum::extract::{FromRequest, Multipart, Query, Request, State};
use axum::http::HeaderMap;
use axum::routing::post;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::body::{check_length, media_type, read_limited, too_large};
use crate::db;
use crate::error::{ApiError, ErrorBody};
use crate::jobs::inference::Admitted;
use crate::ml::evaluate::argmax;
use crate::ml::preprocess::{self, Preprocessing};
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/predict", post(predict))
}

use crate::config::MAX_PREDICT_IMAGES as MAX_IMAGES;

/// Which model, and how many top classes to list.
#[derive(Debug, Deserialize, IntoParams)]
pub struct PredictQuery {
    /// Model id; the default model when left out.
    pub model: Option<String>,
    /// Classes listed in `top_k` (default 5, at most the number of classes).
    pub top_k: Option<usize>,
    /// Out-of-distribution score above which the answer is "none of the classes"; the
    /// model's own threshold (calibrated at training) when left out.
    pub unknown_threshold: Option<f64>,
}

/// A class and its probability.
#[derive(Debug, Serialize, ToSchema)]
pub struct Scored {
    pub label: String,
    pub probability: f32,
}

/// The prediction for one image.
#[derive(Debug, Serialize, ToSchema)]
pub struct ImagePrediction {
    /// The multipart file name, when one was sent.
    pub filename: Option<String>,
    /// The most probable class; `null` when the image looks like none of the classes.
    pub label: Option<String>,
    /// True when the out-of-distribution score is above the threshold: the probabilities
    /// are still listed, but the image is probably none of the classes.
    pub unknown: bool,
    /// Distance of the image's features from the nearest class (squared Mahalanobis over
    /// the feature count); `null` for models trained before it existed.
    pub ood_score: Option<f64>,
    /// The threshold the answer used (the request's, else the model's).
    pub unknown_threshold: Option<f64>,
    /// Probability of the most probable class.
    pub confidence: f32,
    /// Calibrated probability of every class; they sum to 1.
    pub probabilities: std::collections::BTreeMap<String, f32>,
    /// The most probable classes, best first.
    pub top_k: Vec<Scored>,
}

/// Predictions of a request.
#[derive(Debug, Serialize, ToSchema)]
pub struct Prediction {
    pub model_id: String,
    pub classes: Vec<String>,
    pub predictions: Vec<ImagePrediction>,
}

/// The images of a request: (file name, bytes). `admitted` holds a place for the first;
/// each further image takes its place before it is read.
async fn receive(
    state: &AppState,
    headers: &HeaderMap,
    request: Request,
    admitted: &mut Admitted,
) -> Result<Vec<(Option<String>, Vec<u8>)>, ApiError> {
    let per_image = state.settings.max_predict_image_bytes;
    let total = per_image.saturating_mul(MAX_IMAGES as u64);
    check_length(headers, total, "the request")?;
    let mut images = Vec::new();
    if media_type(headers).as_deref() == Some("multipart/form-data") {
        // Room for every image plus their part headers.
        let cap = total.saturating_add(1 << 20);
        let request = super::body::capped(request, cap);
        let mut multipart = Multipart::from_request(request, state)
            .await
            .map_err(|e| ApiError::BadRequest(e.body_text()))?;
        while let Some(mut field) = multipart
            .next_field()
            .await
            .map_err(|e| super::body::multipart_error("the request", cap, e))?
        {
            if !matches!(field.name(), Some("image" | "images" | "file")) {
                continue;
            }
            if images.len() == MAX_IMAGES {
                return Err(ApiError::TooLarge(format!(
                    "at most {MAX_IMAGES} images per request"
                )));
            }
            if !images.is_empty() {
                state.inference.grow(admitted, 1)?;
            }
            let name = field.file_name().map(str::to_string);
            let mut bytes = Vec::new();
            while let Some(chunk) = field
                .chunk()
                .await
                .map_err(|e| ApiError::BadRequest(format!("reading an image field: {e}")))?
            {
                if (bytes.len() + chunk.len()) as u64 > per_image {
                    return Err(too_large("an image", per_image));
                }
                bytes.extend_from_slice(&chunk);
            }
            images.push((name, bytes));
        }
        if images.is_empty() {
            return Err(ApiError::invalid(
                "image",
                "the multipart body has no `image` field",
            ));
        }
    } else {
        let bytes = read_limited(request.into_body(), per_image, "the image").await?;
        images.push((None, bytes));
    }
    if let Some(i) = images.iter().position(|(_, b)| b.is_empty()) {
        return Err(ApiError::BadRequest(format!(
            "image {} is empty",
            images[i].0.clone().unwrap_or_else(|| (i + 1).to_string())
        )));
    }
    Ok(images)
}

/// Predict the class of one or several images.
#[utoipa::path(post, path = "/api/predict", tag = "predict", params(PredictQuery),
    request_body(content = Vec<u8>, description = "One image as the raw body, or multipart `image` fields (one or many)", content_type = "image/*"),
    responses(
        (status = 200, body = Prediction),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "No model exists yet", body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 422, body = ErrorBody),
        (status = 503, description = "The prediction queue is full (see `Retry-After`), or the request timed out", body = ErrorBody),
    ))]
pub async fn predict(
    State(state): State<AppState>,
    Query(q): Query<PredictQuery>,
    headers: HeaderMap,
    request: Request,
) -> Result<Json<Prediction>, ApiError> {
    let model = match q.model.as_deref() {
        Some(id) => db::models::get(&state.db, id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("model {id} not found")))?,
        None => db::models::default_model(&state.db)
            .await?
            .ok_or_else(|| ApiError::Conflict("no trained model yet: train a run first".into()))?,
    };
    if q.top_k == Some(0) {
        return Err(ApiError::invalid("top_k", "must be at least 1"));
    }
    if q.unknown_threshold
        .is_some_and(|t| !t.is_finite() || t < 0.0)
    {
        return Err(ApiError::invalid(
            "unknown_threshold",
            "must be a finite number, 0 or more",
        ));
    }
    let started = std::time::Instant::now();
    // A place in the queue before the body is read: under overload a refusal costs neither
    // the upload's buffering nor a decode.
    let mut admitted = match state.inference.admit(1) {
        Ok(a) => a,
        Err(e) => {
            super::body::discard(
                request.into_body(),
                2 * state.settings.max_predict_image_bytes,
            )
            .await;
            return Err(e.into());
        }
    };
    let images = receive(&state, &headers, request, &mut admitted).await?;
    let max_dim = state.settings.limits.max_image_dimension;
    let max_pixels = state.settings.max_predict_pixels;
    let pre = Preprocessing::for_size(model.input_size as usize);
    let names: Vec<Option<String>> = images.iter().map(|(n, _)| n.clone()).collect();
    let names_len = names.len();
    // Decodes run a few at a time (one per core): a decoded photo can take hundreds of MB.
    let decoding = state.inference.decode_permit().await;
    let views = tokio::task::spawn_blocking(move || {
        let _decoding = decoding;
        images
            .iter()
            .enumerate()
            .map(|(i, (name, bytes))| {
                let which = || name.clone().unwrap_or_else(|| format!("#{}", i + 1));
                let refuse =
                    |e: String| ApiError::invalid("image", format!("image {}: {e}", which()));
                // The header says how large the decode would be; refuse before allocating.
                let (w, h) = preprocess::dimensions(bytes).map_err(|e| refuse(e.to_string()))?;
                if u64::from(w) * u64::from(h) > max_pixels {
                    return Err(refuse(format!(
                        "{w}x{h} is {:.1} megapixels, more than the {:.1} megapixel limit",
                        (u64::from(w) * u64::from(h)) as f64 / 1e6,
                        max_pixels as f64 / 1e6
                    )));
                }
                let image =
                    preprocess::decode(bytes, max_dim).map_err(|e| refuse(e.to_string()))?;
                Ok(preprocess::eval_view(&image, &pre))
            })
            .collect::<Result<Vec<_>, ApiError>>()
    })
    .await
    .map_err(|e| ApiError::internal("decoding images", e))??;
    // Any replica serves any model: fetched from the shared store on first use.
    let (dir, _kept) = state.objects.fetch_model(&model.id).await?;
    let probabilities = state
        .inference
        .predict(admitted, &model.id, dir, views)
        .await?;
    let k = q.top_k.unwrap_or(5).min(model.classes.len());
    let predictions = probabilities
        .into_iter()
        .zip(names)
        .map(|(view, filename)| {
            let (threshold, unknown) = view.unknown(q.unknown_threshold);
            let ood_score = view.ood.map(|o| o.0);
            let p = view.probabilities;
            let best = argmax(&p);
            let mut order: Vec<usize> = (0..p.len()).collect();
            order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
            ImagePrediction {
                filename,
                label: (!unknown).then(|| model.classes[best].clone()),
                unknown,
                ood_score,
                unknown_threshold: threshold,
                confidence: p[best],
                probabilities: model
                    .classes
                    .iter()
                    .cloned()
                    .zip(p.iter().copied())
                    .collect(),
                top_k: order
                    .into_iter()
                    .take(k)
                    .map(|i| Scored {
                        label: model.classes[i].clone(),
                        probability: p[i],
                    })
                    .collect(),
            }
        })
        .collect();
    metrics::histogram!("transferd_predict_duration_seconds")
        .record(started.elapsed().as_secs_f64());
    metrics::counter!("transferd_predict_images_total").increment(names_len as u64);
    Ok(Json(Prediction {
        model_id: model.id.clone(),
        classes: model.classes.clone(),
        predictions,
    }))
}

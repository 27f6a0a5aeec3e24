//! transferd turns a zip of labelled photos into an image classifier by transfer learning from
//! a pretrained EfficientNet-Lite, then serves predictions.
//!
//! - [`api`]: the HTTP routes, one module per resource; [`error`]: their error type.
//! - [`ingest`]: zip and image validation; [`db`]: SQLite or PostgreSQL queries; [`storage`]:
//!   the data dir;
//!   [`durable`]: renames that survive a power cut.
//! - [`jobs`]: the training queue's workers, live events and the inference thread.
//! - [`ml`]: the learning core (backbone, data, training, evaluation, inference).
//! - [`cli`] and [`config`]: the command line and the service's settings; [`keys`]: API keys.

pub mod api;
pub mod cli;
pub mod config;
pub mod db;
pub mod durable;
pub mod error;
pub mod ingest;
pub mod jobs;
pub mod keys;
pub mod ml;
pub mod objects;
pub mod server;
pub mod state;
pub mod storage;
pub mod telemetry;

use anyhow::Context;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use api::app;
pub use config::Settings;
pub use state::{AppState, Service};

/// Serves on `listener` until `shutdown` fires, then finishes in-flight requests, stops the
/// training run at its next step (leaving it queued to resume) and returns.
pub async fn run(
    listener: TcpListener,
    settings: Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let service = Service::start(settings, shutdown.clone()).await?;
    let router: Router = match service.state.settings.role {
        config::Role::Api => app(service.state.clone()),
        config::Role::Worker => api::probes(service.state.clone()),
    };
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "listening");
    if !addr.ip().is_loopback() && service.state.settings.access.keys.is_empty() {
        tracing::warn!(
            %addr,
            "listening beyond this machine with no API keys: anyone who can reach it can \
             upload, train and delete; set --api-key"
        );
    }
    server::serve(
        listener,
        router,
        service.state.settings.max_connections,
        service.state.settings.header_read_timeout,
        shutdown.clone(),
    )
    .await
    .context("serving HTTP")?;
    tracing::info!("HTTP server stopped; waiting for the workers");
    for worker in service.workers {
        if let Err(e) = worker.await {
            tracing::error!(error = %e, "a worker task panicked");
        }
    }
    service.state.db.close().await;
    tracing::info!("shut down cleanly");
    Ok(())
}

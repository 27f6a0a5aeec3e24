//! The shared state every handler gets, and the start-up that builds it: data folders,
//! weights, device, database and migrations, recovery of interrupted runs, workers.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use serde::Serialize;
use sqlx::SqlitePool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

use crate::config::Settings;
use crate::db;
use crate::jobs::inference::Inference;
use crate::jobs::{Jobs, WorkerContext, recover, spawn_workers};
use crate::ml::backbone::Backbone;
use crate::ml::backbones::Backbones;
use crate::ml::device;
use crate::storage::{Orphans, Storage};

/// The compute device in use, as `/readyz` shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DeviceInfo {
    /// `wgpu` or `flex`.
    pub backend: String,
    pub adapter: Option<String>,
}

/// Cloned into every handler with `.with_state`.
#[derive(Clone)]
pub struct AppState {
    pub db: SqlitePool,
    pub settings: Arc<Settings>,
    pub storage: Storage,
    pub jobs: Jobs,
    pub inference: Inference,
    pub device: Arc<DeviceInfo>,
    /// Verified pretrained weights, when present.
    pub weights: Option<PathBuf>,
    /// Fires when the server shuts down; long-lived responses (SSE) end with it.
    pub shutdown: CancellationToken,
    /// Places for live event streams (`--max-event-streams`).
    pub streams: Arc<tokio::sync::Semaphore>,
}

/// A started service: its state and its background tasks.
pub struct Service {
    pub state: AppState,
    pub workers: Vec<JoinHandle<()>>,
}

impl Service {
    /// Everything `serve` does before it listens.
    pub async fn start(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<Self> {
        let storage = Storage::new(&settings.data_dir);
        storage.prepare().with_context(|| {
            format!(
                "preparing the data directory {}",
                settings.data_dir.display()
            )
        })?;
        let data_dir = settings.data_dir.clone();
        let explicit = settings.weights.clone();
        let backbones = Backbones::new(data_dir, explicit);
        // Lite0 is the default backbone: have it before accepting runs. Lite1 and Lite2 are
        // fetched by the first run that asks for them.
        let lite0 = backbones.clone();
        let weights = tokio::task::spawn_blocking(move || lite0.path(Backbone::Lite0, true))
            .await?
            .context("the pretrained weights")?;
        let selected = device::select(settings.device).context("choosing the compute device")?;
        tracing::info!(backend = selected.backend, adapter = ?selected.adapter, "compute device");
        let pool = db::connect(&settings.database_url).await?;
        let known = db::datasets::ids(&pool).await?;
        match storage
            .quarantine_orphan_datasets(&known)
            .context("quarantining orphaned dataset folders")?
        {
            Orphans::None => {}
            Orphans::Quarantined(ids) => tracing::warn!(
                ?ids,
                to = %storage.quarantine().display(),
                "moved dataset folders no database row points at to the quarantine folder"
            ),
            Orphans::LeftAlone(ids) => tracing::warn!(
                ?ids,
                database = %settings.database_url,
                "the database has no dataset but the data directory has dataset folders: \
                 is this the right database? The folders are left as they are"
            ),
        }
        let (requeued, failed) = recover(&pool, &storage).await?;
        if requeued + failed > 0 {
            tracing::warn!(
                requeued,
                failed,
                "recovered runs interrupted by the last shutdown"
            );
        }
        let jobs = Jobs::new();
        let inference = Inference::start(
            selected.device.clone(),
            settings.model_cache,
            settings.predict_batch,
            settings.predict_queue,
        );
        let workers = spawn_workers(
            WorkerContext {
                db: pool.clone(),
                jobs: jobs.clone(),
                storage: storage.clone(),
                device: selected.device.clone(),
                backbones,
            },
            settings.concurrent_runs,
            shutdown.clone(),
        );
        let state = AppState {
            db: pool,
            storage,
            jobs,
            inference,
            device: Arc::new(DeviceInfo {
                backend: selected.backend.to_string(),
                adapter: selected.adapter,
            }),
            weights: Some(weights),
            streams: Arc::new(tokio::sync::Semaphore::new(
                settings.max_event_streams.max(1),
            )),
            settings: Arc::new(settings),
            shutdown,
        };
        Ok(Self { state, workers })
    }
}

impl AppState {
    /// State without workers or weights, for handler tests: runs stay queued.
    pub fn for_tests(db: SqlitePool, settings: Settings) -> Self {
        let storage = Storage::new(&settings.data_dir);
        storage.prepare().expect("test data directory");
        Self {
            db,
            storage,
            jobs: Jobs::new(),
            inference: Inference::start(
                burn::prelude::Device::flex(),
                settings.model_cache,
                settings.predict_batch,
                settings.predict_queue,
            ),
            device: Arc::new(DeviceInfo {
                backend: "flex".into(),
                adapter: None,
            }),
            weights: None,
            streams: Arc::new(tokio::sync::Semaphore::new(
                settings.max_event_streams.max(1),
            )),
            settings: Arc::new(settings),
            shutdown: CancellationToken::new(),
        }
    }
}

//! The shared state every handler gets, and the start-up that builds it: data folders,
//! weights, device, database and migrations, recovery of interrupted runs, workers.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use serde::Serialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

use crate::config::Settings;
use crate::db::{self, Db};
use crate::jobs::inference::Inference;
use crate::jobs::{Jobs, WorkerContext, reap, spawn_workers};
use crate::ml::backbone::Backbone;
use crate::ml::backbones::Backbones;
use crate::ml::device;
use crate::objects::Objects;
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
    pub db: Db,
    /// Datasets, checkpoints and models: the data directory or a shared store.
    pub objects: Objects,
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
        // Separate API and worker processes share run events and cancels only through
        // PostgreSQL; on SQLite an SSE stream would never hear of another process's run.
        let split = settings.role == crate::config::Role::Worker || settings.workers == 0;
        anyhow::ensure!(
            !split || db::is_postgres(&settings.database_url),
            "`serve --no-worker` and `worker` run beside other processes and need a shared \
             PostgreSQL database (--database-url postgres://…); with SQLite, run `serve`"
        );
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
        let objects = match &settings.object_store {
            None => Objects::local(storage.clone()),
            Some(url) => Objects::open(url, storage.clone(), settings.local_cache_bytes).await?,
        };
        let pool = db::connect(&settings.database_url).await?;
        tracing::info!(engine = pool.engine(), url = %db::redacted(&settings.database_url), "database");
        let known = db::datasets::ids(&pool).await?;
        if objects.is_shared() {
            clear_orphan_objects(&objects, &known).await;
        } else {
            quarantine_orphans(&storage, &known, &settings.database_url)?;
        }
        let jobs = Jobs::connect(&pool, &shutdown)
            .await
            .context("listening for run events on the database")?;
        let (requeued, failed) = reap(&pool, &objects, &jobs).await?;
        if requeued + failed > 0 {
            tracing::warn!(requeued, failed, "recovered runs whose worker stopped");
        }
        let inference = Inference::start(
            selected.device.clone(),
            settings.model_cache,
            settings.predict_batch,
            settings.predict_queue,
        );
        let workers = spawn_workers(
            WorkerContext {
                db: pool.clone(),
                objects: objects.clone(),
                name: crate::jobs::process_name(),
                lease: settings.lease,
                jobs: jobs.clone(),
                storage: storage.clone(),
                device: selected.device.clone(),
                backbones,
            },
            settings.workers,
            shutdown.clone(),
        );
        let state = AppState {
            db: pool,
            objects,
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

/// Local dataset folders no row names (a crash between the folder's rename and the
/// insert's commit) go to the quarantine folder.
fn quarantine_orphans(
    storage: &Storage,
    known: &[String],
    database_url: &str,
) -> anyhow::Result<()> {
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
            database = %db::redacted(database_url),
            "the database has no dataset but the data directory has dataset folders: \
             is this the right database? The folders are left as they are"
        ),
    }
    Ok(())
}

/// Dataset objects no row names, left by an upload that failed between its publish and its
/// insert. Only those older than an hour: a younger one may be another replica's upload
/// whose rows are about to commit. A database with no dataset at all is more likely the
/// wrong database than a crash, so then nothing is deleted. A failure is logged; the next
/// start-up tries again.
async fn clear_orphan_objects(objects: &Objects, known: &[String]) {
    if known.is_empty() {
        return;
    }
    let stored = match objects
        .stored_datasets(std::time::Duration::from_secs(3600))
        .await
    {
        Ok(ids) => ids,
        Err(e) => return tracing::warn!(error = %e, "could not list stored datasets"),
    };
    for id in stored.iter().filter(|id| !known.contains(id)) {
        match objects.remove(crate::objects::Kind::Dataset, id).await {
            Ok(()) => tracing::warn!(dataset_id = %id, "deleted stored files no dataset row names"),
            Err(e) => {
                tracing::warn!(dataset_id = %id, error = %e, "could not delete orphaned objects")
            }
        }
    }
}

impl AppState {
    /// State without workers or weights, for handler tests: runs stay queued.
    pub fn for_tests(db: impl Into<Db>, settings: Settings) -> Self {
        let db = db.into();
        let storage = Storage::new(&settings.data_dir);
        storage.prepare().expect("test data directory");
        Self {
            db,
            objects: Objects::local(storage.clone()),
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

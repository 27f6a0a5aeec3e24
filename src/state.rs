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
use crate::jobs::{Jobs, WorkerContext, reap, spawn_reaper, spawn_workers};
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
    /// The training workers and the lease reaper: awaited at shutdown.
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
            clear_orphan_objects(&pool, &objects, &known).await?;
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
        let mut workers = spawn_workers(
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
        // Every process, API replicas included, reaps lapsed leases: a run whose worker died
        // is back in the queue within a lease and REAP_EVERY, even if every worker is busy.
        workers.push(spawn_reaper(
            pool.clone(),
            objects.clone(),
            jobs.clone(),
            shutdown.clone(),
        ));
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

/// Objects no row names: a dataset whose upload failed between its publish and its
/// insert, a model whose record failed, a run's checkpoint left by a crash. Only folders
/// untouched for an hour: a younger one may belong to another process's upload or run
/// about to commit. A database with no dataset at all is more likely the wrong database
/// than a crash, so then nothing is deleted. Failures are logged; the next start-up tries
/// again.
async fn clear_orphan_objects(
    db: &Db,
    objects: &Objects,
    datasets: &[String],
) -> anyhow::Result<()> {
    use crate::db::status::RunStatus;
    use crate::objects::Kind;
    if datasets.is_empty() {
        return Ok(());
    }
    let models: Vec<String> = db::models::list(db, &db::Page::ALL)
        .await?
        .into_iter()
        .map(|m| m.id)
        .collect();
    // A run's checkpoint is needed only while the run can still train.
    let mut live: Vec<String> = Vec::new();
    for status in [RunStatus::Queued, RunStatus::Running] {
        live.extend(
            db::runs::list(db, Some(status), &db::Page::ALL)
                .await?
                .into_iter()
                .map(|r| r.id),
        );
    }
    for (what, known) in [
        (Kind::Dataset, datasets),
        (Kind::Model, &models[..]),
        (Kind::Run, &live[..]),
    ] {
        let stored = match objects
            .stored(what, std::time::Duration::from_secs(3600))
            .await
        {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(error = %e, ?what, "could not list stored objects");
                continue;
            }
        };
        for id in stored.iter().filter(|id| !known.contains(id)) {
            match objects.remove(what, id).await {
                Ok(()) => tracing::warn!(id = %id, ?what, "deleted stored files no row needs"),
                Err(e) => {
                    tracing::warn!(id = %id, ?what, error = %e, "could not delete orphaned objects")
                }
            }
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[sqlx::test(migrations = "migrations/sqlite")]
    async fn only_old_objects_no_row_needs_are_cleared(pool: sqlx::SqlitePool) {
        let db = Db::from(pool);
        let ingested = crate::ingest::Ingested::empty(&["a", "b"]);
        db::datasets::insert(&db, "kept", "kept", &ingested, None)
            .await
            .unwrap();
        let (cache, shared) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let storage = Storage::new(cache.path());
        storage.prepare().unwrap();
        let url = format!("file://{}", shared.path().display());
        let objects = Objects::open(&url, storage, u64::MAX).await.unwrap();
        let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        let put = |key: &str, old: bool| {
            let file = shared.path().join(key);
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(&file, b"x").unwrap();
            if old {
                let f = std::fs::File::options().write(true).open(&file).unwrap();
                f.set_modified(hour_ago).unwrap();
            }
        };
        for (key, old) in [
            ("datasets/kept/a.jpg", true),
            ("datasets/orphan/a.jpg", true),
            ("datasets/uploading/a.jpg", false),
            ("models/unrecorded/model.bpk", true),
            ("runs/ended/warmup-head.bpk", true),
        ] {
            put(key, old);
        }
        let known = db::datasets::ids(&db).await.unwrap();
        clear_orphan_objects(&db, &objects, &known).await.unwrap();
        let left = |key: &str| shared.path().join(key).exists();
        assert!(left("datasets/kept/a.jpg"), "a dataset with its row stays");
        assert!(left("datasets/uploading/a.jpg"), "a young upload stays");
        assert!(!left("datasets/orphan/a.jpg"));
        assert!(!left("models/unrecorded/model.bpk"));
        assert!(!left("runs/ended/warmup-head.bpk"));

        // With no dataset rows at all (a wrong database?), nothing is touched.
        put("datasets/orphan/a.jpg", true);
        clear_orphan_objects(&db, &objects, &[]).await.unwrap();
        assert!(left("datasets/orphan/a.jpg"));
    }
}

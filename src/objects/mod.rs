//! Where datasets, warm-up checkpoints and models are kept for good: the data directory
//! itself (the default: one machine), or an object store every process shares
//! (`--object-store s3://bucket/prefix`, or `file:///shared/folder`), through the
//! `object_store` crate. With a store, the data directory is only a cache: files are
//! fetched into it when a process needs them (a worker its run's dataset and checkpoint, an
//! API replica a model it predicts with), so it can be deleted at any time.
//!
//! Keys mirror the data directory: `datasets/<id>/<file>`, `models/<id>/<file>`,
//! `runs/<id>/<file>`. A folder is published file by file after it is complete on local
//! disk and before any database row points at it, so a row never names missing objects;
//! a failed publish deletes what it wrote.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::{StreamExt, TryStreamExt};
use object_store::ObjectStore;
use object_store::path::Path as Key;

use crate::storage::Storage;

mod cache;
mod remote;

use self::cache::Cache;
pub use self::cache::Pin;
use self::remote::Remote;

/// Files moved at once in a publish or a fetch.
const PARALLEL: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("invalid object store URL {url}: {reason}")]
    Url { url: String, reason: String },
    #[error("the object store at {url} failed: {source}")]
    Store {
        url: String,
        source: object_store::Error,
    },
    #[error("the local cache: {0}")]
    Io(#[from] std::io::Error),
}

impl ObjectError {
    /// The store could not be reached or refused for now (worth waiting for), as opposed to
    /// an object that is not there or a local disk problem.
    pub fn is_outage(&self) -> bool {
        matches!(self, ObjectError::Store { source, .. }
            if !matches!(source, object_store::Error::NotFound { .. }))
    }
}

/// The data directory, and the shared store when there is one. Cheap to clone.
#[derive(Clone)]
pub struct Objects {
    storage: Storage,
    remote: Option<Arc<Remote>>,
    /// The local copies of a shared store's folders.
    cache: Arc<Cache>,
}

impl Objects {
    /// Everything on the data directory (no store).
    pub fn local(storage: Storage) -> Self {
        Self {
            storage,
            remote: None,
            cache: Arc::new(Cache::new(u64::MAX)),
        }
    }

    /// Opens `url` (`s3://bucket/prefix` with the endpoint and credentials from the
    /// standard `AWS_*` variables, or `file:///folder`) and checks that it answers. Local
    /// copies of its datasets and models are kept up to `cache_bytes`.
    pub async fn open(url: &str, storage: Storage, cache_bytes: u64) -> Result<Self, ObjectError> {
        let bad = |reason: String| ObjectError::Url {
            url: url.to_string(),
            reason,
        };
        let (store, prefix): (Arc<dyn ObjectStore>, Key) = if let Some(rest) =
            url.strip_prefix("s3://")
        {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad("no bucket named".into()));
            }
            let store = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_retry(retry())
                .build()
                .map_err(|e| bad(e.to_string()))?;
            let prefix = Key::parse(prefix.trim_matches('/')).map_err(|e| bad(e.to_string()))?;
            (Arc::new(store), prefix)
        } else if let Some(dir) = url.strip_prefix("file://") {
            std::fs::create_dir_all(dir).map_err(|e| bad(e.to_string()))?;
            let store = object_store::local::LocalFileSystem::new_with_prefix(dir)
                .map_err(|e| bad(e.to_string()))?;
            (Arc::new(store), Key::default())
        } else {
            return Err(bad("expected s3://BUCKET/PREFIX or file:///FOLDER".into()));
        };
        let remote = Remote {
            store,
            prefix,
            url: url.to_string(),
        };
        // Fails now, naming the URL, rather than at the first upload.
        remote
            .store
            .list_with_delimiter(Some(&remote.prefix))
            .await
            .map_err(|e| remote.failed(e))?;
        Ok(Self {
            storage,
            remote: Some(Arc::new(remote)),
            cache: Arc::new(Cache::new(cache_bytes)),
        })
    }

    pub fn is_shared(&self) -> bool {
        self.remote.is_some()
    }

    /// Keeps a local folder out of the cache's evictions while the pin lives (a fresh upload
    /// or model being published); `None` without a store, where nothing is evicted.
    pub fn keep(&self, what: Kind, id: &str) -> Option<Pin> {
        self.remote.as_ref()?;
        Some(self.cache.pin(&self.folder_of(what, id)))
    }

    fn folder_of(&self, what: Kind, id: &str) -> PathBuf {
        match what {
            Kind::Dataset => self.storage.dataset(id),
            Kind::Model => self.storage.model(id),
            Kind::Run => self.storage.run_dir(id),
        }
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// Publishes a dataset's folder (complete on local disk).
    pub async fn publish_dataset(&self, id: &str) -> Result<(), ObjectError> {
        self.publish(&format!("datasets/{id}"), &self.storage.dataset(id))
            .await
    }

    /// Makes sure the dataset's files `names` are in the local cache, and keeps them there
    /// while the returned pin lives.
    pub async fn fetch_dataset(
        &self,
        id: &str,
        names: &[String],
    ) -> Result<Option<Pin>, ObjectError> {
        let Some(remote) = &self.remote else {
            return Ok(None);
        };
        let dir = self.storage.dataset(id);
        tokio::fs::create_dir_all(&dir).await?;
        let pin = self.cache.pin(&dir);
        let missing: Vec<(String, PathBuf)> = names
            .iter()
            .map(|name| (format!("datasets/{id}/{name}"), dir.join(name)))
            .filter(|(_, path)| !path.is_file())
            .collect();
        let fetched = missing.len();
        futures_util::stream::iter(missing)
            .map(|(key, path)| {
                let (remote, storage) = (remote.clone(), self.storage.clone());
                async move { remote.download(&key, &path, &storage).await }
            })
            .buffer_unordered(PARALLEL)
            .try_collect::<Vec<_>>()
            .await?;
        if fetched > 0 {
            self.trim().await;
        }
        Ok(Some(pin))
    }

    /// Publishes a model's folder (complete on local disk).
    pub async fn publish_model(&self, id: &str) -> Result<(), ObjectError> {
        self.publish(&format!("models/{id}"), &self.storage.model(id))
            .await
    }

    /// The model's folder in the local cache, fetched first if needed, and kept there while
    /// the returned pin lives.
    pub async fn fetch_model(&self, id: &str) -> Result<(PathBuf, Option<Pin>), ObjectError> {
        let dir = self.storage.model(id);
        let Some(remote) = &self.remote else {
            return Ok((dir, None));
        };
        let pin = self.cache.pin(&dir);
        if !dir.is_dir() {
            remote
                .download_dir(&format!("models/{id}"), &dir, &self.storage)
                .await?;
            // The rename made a new folder: mark it used now.
            let fresh = self.cache.pin(&dir);
            self.trim().await;
            return Ok((dir, Some(fresh)));
        }
        Ok((dir, Some(pin)))
    }

    /// Deletes the least recently used cached folders beyond the budget.
    async fn trim(&self) {
        let cache = self.cache.clone();
        let roots = vec![self.storage.datasets(), self.storage.models()];
        let evicted = tokio::task::spawn_blocking(move || cache.trim(&roots)).await;
        if let Ok(evicted) = evicted
            && !evicted.is_empty()
        {
            tracing::info!(
                ?evicted,
                "local cache over its budget: least recently used copies deleted"
            );
        }
    }

    /// Publishes a run's warm-up checkpoint (written on local disk).
    pub async fn publish_checkpoint(&self, run_id: &str) -> Result<(), ObjectError> {
        let Some(remote) = &self.remote else {
            return Ok(());
        };
        let file = self.storage.warmup_checkpoint(run_id);
        remote.upload(&checkpoint_key(run_id), &file).await
    }

    /// Whether the run's warm-up checkpoint is stored.
    pub async fn has_checkpoint(&self, run_id: &str) -> Result<bool, ObjectError> {
        let Some(remote) = &self.remote else {
            return Ok(self.storage.warmup_checkpoint(run_id).is_file());
        };
        match remote
            .store
            .head(&remote.key(&checkpoint_key(run_id)))
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(remote.failed(e)),
        }
    }

    /// Whether the run's warm-up checkpoint is stored; fetched into the local cache if so.
    pub async fn fetch_checkpoint(&self, run_id: &str) -> Result<bool, ObjectError> {
        if !self.has_checkpoint(run_id).await? {
            return Ok(false);
        }
        if let Some(remote) = &self.remote {
            let file = self.storage.warmup_checkpoint(run_id);
            remote
                .download(&checkpoint_key(run_id), &file, &self.storage)
                .await?;
        }
        Ok(true)
    }

    /// Deletes a dataset's, model's or run's objects and local files.
    pub async fn remove(&self, what: Kind, id: &str) -> Result<(), ObjectError> {
        let local = self.folder_of(what, id);
        if let Err(e) = tokio::fs::remove_dir_all(&local).await
            && e.kind() != std::io::ErrorKind::NotFound
        {
            return Err(e.into());
        }
        if let Some(remote) = &self.remote {
            remote
                .delete_all(&format!("{}/{id}", what.folder()))
                .await?;
        }
        Ok(())
    }

    /// Ids of the folders under `what`'s prefix in the store whose newest object is older
    /// than `age` (orphans are then those no database row names); empty without a store.
    pub async fn stored(
        &self,
        what: Kind,
        age: std::time::Duration,
    ) -> Result<Vec<String>, ObjectError> {
        let Some(remote) = &self.remote else {
            return Ok(Vec::new());
        };
        let cutoff = crate::db::now_millis() - age.as_millis() as i64;
        let listed = remote
            .store
            .list_with_delimiter(Some(&remote.key(what.folder())))
            .await
            .map_err(|e| remote.failed(e))?;
        let mut ids = Vec::new();
        for dir in listed.common_prefixes {
            let Some(id) = dir.filename().map(str::to_string) else {
                continue;
            };
            let newest = remote
                .store
                .list(Some(&dir))
                .map_ok(|m| m.last_modified.timestamp_millis())
                .try_fold(None, |acc: Option<_>, t| async move {
                    Ok(Some(acc.map_or(t, |a| t.max(a))))
                })
                .await
                .map_err(|e| remote.failed(e))?;
            if newest.is_none_or(|t| t < cutoff) {
                ids.push(id);
            }
        }
        Ok(ids)
    }

    async fn publish(&self, key: &str, dir: &Path) -> Result<(), ObjectError> {
        let Some(remote) = &self.remote else {
            return Ok(());
        };
        let mut files = Vec::new();
        let mut entries = tokio::fs::read_dir(dir).await?;
        while let Some(entry) = entries.next_entry().await? {
            if entry.file_type().await?.is_file() {
                files.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        let jobs: Vec<(String, PathBuf)> = files
            .iter()
            .map(|name| (format!("{key}/{name}"), dir.join(name)))
            .collect();
        let uploaded = futures_util::stream::iter(jobs)
            .map(|(key, path)| {
                let remote = remote.clone();
                async move { remote.upload(&key, &path).await }
            })
            .buffer_unordered(PARALLEL)
            .try_collect::<Vec<_>>()
            .await;
        if let Err(e) = uploaded {
            // Leaves no half folder behind for a row to point at later.
            if let Err(cleanup) = remote.delete_all(key).await {
                tracing::warn!(error = %cleanup, key, "could not delete a half-published folder");
            }
            return Err(e);
        }
        Ok(())
    }
}

/// A few quick retries of a failed request: a store that is down gets a 503 to the client
/// within seconds, not after object_store's default three minutes.
fn retry() -> object_store::RetryConfig {
    object_store::RetryConfig {
        backoff: object_store::BackoffConfig::default(),
        max_retries: 3,
        retry_timeout: std::time::Duration::from_secs(15),
    }
}

/// What [`Objects::remove`] deletes.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Dataset,
    Model,
    Run,
}

impl Kind {
    fn folder(self) -> &'static str {
        match self {
            Kind::Dataset => "datasets",
            Kind::Model => "models",
            Kind::Run => "runs",
        }
    }
}

fn checkpoint_key(run_id: &str) -> String {
    format!("runs/{run_id}/warmup-head.bpk")
}

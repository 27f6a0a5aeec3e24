//! One shared object store: keys under a prefix, and the transfers between it and the
//! local cache (files land under a temporary name and are renamed into place).

use std::path::Path;
use std::sync::Arc;

use futures_util::{StreamExt, TryStreamExt};
use object_store::ObjectStore;
use object_store::path::Path as Key;

use super::ObjectError;
use crate::storage::Storage;

pub(super) struct Remote {
    pub(super) store: Arc<dyn ObjectStore>,
    pub(super) prefix: Key,
    /// The URL, for messages.
    pub(super) url: String,
}

impl Remote {
    pub(super) fn key(&self, relative: &str) -> Key {
        relative
            .split('/')
            .fold(self.prefix.clone(), |k, part| k.child(part))
    }

    pub(super) fn failed(&self, source: object_store::Error) -> ObjectError {
        ObjectError::Store {
            url: self.url.clone(),
            source,
        }
    }

    pub(super) async fn upload(&self, relative: &str, file: &Path) -> Result<(), ObjectError> {
        let bytes = tokio::fs::read(file).await?;
        self.store
            .put(&self.key(relative), bytes.into())
            .await
            .map_err(|e| self.failed(e))?;
        Ok(())
    }

    /// Downloads one object to `file`, through a temporary file renamed into place (a
    /// reader never sees half a file).
    pub(super) async fn download(
        &self,
        relative: &str,
        file: &Path,
        storage: &Storage,
    ) -> Result<(), ObjectError> {
        let bytes = self
            .store
            .get(&self.key(relative))
            .await
            .map_err(|e| self.failed(e))?
            .bytes()
            .await
            .map_err(|e| self.failed(e))?;
        let tmp = storage
            .tmp()
            .join(format!("fetch-{}", uuid::Uuid::new_v4().simple()));
        tokio::fs::write(&tmp, &bytes).await?;
        if let Some(parent) = file.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        tokio::fs::rename(&tmp, file).await?;
        Ok(())
    }

    /// Downloads every object under `relative/` into a staging folder renamed to `dir`.
    pub(super) async fn download_dir(
        &self,
        relative: &str,
        dir: &Path,
        storage: &Storage,
    ) -> Result<(), ObjectError> {
        let listed: Vec<_> = self
            .store
            .list(Some(&self.key(relative)))
            .try_collect()
            .await
            .map_err(|e| self.failed(e))?;
        if listed.is_empty() {
            return Err(self.failed(object_store::Error::NotFound {
                path: relative.to_string(),
                source: "no objects under this key".into(),
            }));
        }
        let staging = storage
            .tmp()
            .join(format!("fetch-{}", uuid::Uuid::new_v4().simple()));
        tokio::fs::create_dir_all(&staging).await?;
        for meta in &listed {
            let name = meta.location.filename().unwrap_or("file").to_string();
            let rel = format!("{relative}/{name}");
            self.download(&rel, &staging.join(&name), storage).await?;
        }
        if let Some(parent) = dir.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        match tokio::fs::rename(&staging, dir).await {
            Ok(()) => Ok(()),
            // Another request fetched it first: theirs is as good as ours.
            Err(_) if dir.is_dir() => {
                let _ = tokio::fs::remove_dir_all(&staging).await;
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    pub(super) async fn delete_all(&self, relative: &str) -> Result<(), ObjectError> {
        let keys = self
            .store
            .list(Some(&self.key(relative)))
            .map_ok(|m| m.location)
            .boxed();
        self.store
            .delete_stream(keys)
            .try_collect::<Vec<_>>()
            .await
            .map_err(|e| self.failed(e))?;
        Ok(())
    }
}

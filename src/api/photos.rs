//! Links from the paths a run stored (misclassified images, audit findings) to the dataset's
//! image routes. Images are stored as `<sha256>.<format>`, so the file name finds the row.

use std::collections::HashMap;

use crate::db::{self, Db, datasets::DatasetFile};
use crate::error::ApiError;

/// The files of a run's dataset by stored name (none once the dataset is deleted).
pub struct Photos(HashMap<String, DatasetFile>);

/// Where to fetch one image, when its dataset still exists.
pub struct Link {
    pub file_id: i64,
    pub image_url: String,
    pub original_name: String,
}

impl Photos {
    pub async fn of(db: &Db, dataset_id: Option<&str>) -> Result<Self, ApiError> {
        let files = match dataset_id {
            Some(d) => db::datasets::files(db, d).await?,
            None => Vec::new(),
        };
        Ok(Self(
            files.into_iter().map(|f| (f.file_name(), f)).collect(),
        ))
    }

    pub fn link(&self, path: &str) -> Option<Link> {
        let name = std::path::Path::new(path).file_name()?.to_string_lossy();
        self.0.get(name.as_ref()).map(|f| Link {
            file_id: f.id,
            image_url: format!("/api/datasets/{}/files/{}", f.dataset_id, f.id),
            original_name: f.original_name.clone(),
        })
    }
}

//! `datasets` and `dataset_files`.

use serde::{Deserialize, Serialize};
use sqlx::FromRow;
use utoipa::ToSchema;

use super::status::RunStatus;
use super::{Db, json, now, on_pool, on_tx};
use crate::ingest::{Ingested, Skipped, stored_name};

/// Images of one class.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ClassCount {
    pub name: String,
    pub count: usize,
}

/// A dataset and what its upload reported.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Dataset {
    pub id: String,
    pub name: String,
    pub classes: Vec<ClassCount>,
    pub total_images: usize,
    /// How many files of the upload were left out.
    pub skipped_count: usize,
    /// Those files, with the reason (empty in the dataset list; the dataset's own route has
    /// them).
    pub skipped: Vec<Skipped>,
    pub warnings: Vec<String>,
    /// For a version made from another dataset: which, and what changed.
    pub origin: Option<Origin>,
    pub created_at: String,
    pub updated_at: String,
}

/// Where a dataset version came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Origin {
    pub parent_id: String,
    /// Images of the parent left out.
    pub excluded: usize,
    /// Images filed under another class than in the parent.
    pub relabelled: usize,
}

/// The `report` column.
#[derive(Debug, Serialize, Deserialize)]
struct Report {
    counts: Vec<usize>,
    skipped: Vec<Skipped>,
    warnings: Vec<String>,
    #[serde(default)]
    origin: Option<Origin>,
}

#[derive(FromRow)]
struct DatasetRow {
    id: String,
    name: String,
    classes: String,
    image_count: i64,
    report: String,
    created_at: String,
    updated_at: String,
}

impl DatasetRow {
    fn into_dataset(self) -> Result<Dataset, sqlx::Error> {
        let classes: Vec<String> = json(&self.classes)?;
        let report: Report = json(&self.report)?;
        Ok(Dataset {
            id: self.id,
            name: self.name,
            classes: classes
                .into_iter()
                .zip(report.counts)
                .map(|(name, count)| ClassCount { name, count })
                .collect(),
            total_images: self.image_count as usize,
            skipped_count: report.skipped.len(),
            skipped: report.skipped,
            warnings: report.warnings,
            origin: report.origin,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}

/// One stored image.
#[derive(Debug, Clone, FromRow, Serialize, ToSchema)]
pub struct DatasetFile {
    pub id: i64,
    pub dataset_id: String,
    pub class: String,
    pub original_name: String,
    pub sha256: String,
    pub format: String,
    pub width: i64,
    pub height: i64,
    pub bytes: i64,
}

impl DatasetFile {
    /// Name of the file in the dataset's folder.
    pub fn file_name(&self) -> String {
        stored_name(&self.sha256, &self.format)
    }
}

/// Inserts a dataset and all its files in one transaction.
pub async fn insert(
    db: &Db,
    id: &str,
    name: &str,
    ingested: &Ingested,
    origin: Option<&Origin>,
) -> Result<Dataset, sqlx::Error> {
    let report = Report {
        counts: ingested.dataset().counts(),
        skipped: ingested.skipped.clone(),
        warnings: ingested.warnings.clone(),
        origin: origin.cloned(),
    };
    let time = now();
    let mut tx = super::write(db).await?;
    on_tx!(&mut tx, conn => {
        sqlx::query(
            "INSERT INTO datasets (id, name, classes, image_count, report, created_at, \
             updated_at) VALUES ($1, $2, $3, $4, $5, $6, $6)",
        )
        .bind(id)
        .bind(name)
        .bind(serde_json::to_string(&ingested.classes).expect("serialisable"))
        .bind(ingested.images.len() as i64)
        .bind(serde_json::to_string(&report).expect("serialisable"))
        .bind(&time)
        .execute(&mut *conn)
        .await?;
        // Many rows per statement (SQLite binds at most 32,766 values, PostgreSQL 65,535;
        // 10 per row).
        for chunk in ingested.images.chunks(500) {
            let mut insert = sqlx::QueryBuilder::new(
                "INSERT INTO dataset_files (dataset_id, class, original_name, sha256, format, \
                 width, height, bytes, created_at, updated_at) ",
            );
            insert.push_values(chunk, |mut row, image| {
                row.push_bind(id)
                    .push_bind(&image.class)
                    .push_bind(&image.original_name)
                    .push_bind(&image.sha256)
                    .push_bind(image.format)
                    .push_bind(image.width as i64)
                    .push_bind(image.height as i64)
                    .push_bind(image.bytes as i64)
                    .push_bind(&time)
                    .push_bind(&time);
            });
            insert.build().execute(&mut *conn).await?;
        }
    });
    tx.commit().await?;
    get(db, id).await?.ok_or(sqlx::Error::RowNotFound)
}

pub async fn list(db: &Db, page: &super::Page) -> Result<Vec<Dataset>, sqlx::Error> {
    let sql = format!("SELECT * FROM datasets WHERE {}", super::Page::clause(1));
    let rows: Vec<DatasetRow> = page.rows(db, &sql).await?;
    rows.into_iter().map(DatasetRow::into_dataset).collect()
}

pub async fn get(db: &Db, id: &str) -> Result<Option<Dataset>, sqlx::Error> {
    let row: Option<DatasetRow> = on_pool!(db, pool => {
        sqlx::query_as("SELECT * FROM datasets WHERE id = $1")
            .bind(id)
            .fetch_optional(pool)
            .await
    })?;
    row.map(DatasetRow::into_dataset).transpose()
}

pub async fn ids(db: &Db) -> Result<Vec<String>, sqlx::Error> {
    on_pool!(db, pool => sqlx::query_scalar("SELECT id FROM datasets").fetch_all(pool).await)
}

#[derive(Debug, PartialEq, Eq)]
pub enum Delete {
    Deleted,
    NotFound,
    /// Queued or running runs use it.
    InUse(i64),
}

/// Deletes a dataset unless a queued or running run uses it; checked in the same transaction.
pub async fn delete(db: &Db, id: &str) -> Result<Delete, sqlx::Error> {
    let mut tx = super::write(db).await?;
    let outcome = on_tx!(&mut tx, conn => {
        let active: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM runs WHERE dataset_id = $1 AND status IN ($2, $3)",
        )
        .bind(id)
        .bind(RunStatus::Queued)
        .bind(RunStatus::Running)
        .fetch_one(&mut *conn)
        .await?;
        if active > 0 {
            Delete::InUse(active)
        } else {
            let done = sqlx::query("DELETE FROM datasets WHERE id = $1")
                .bind(id)
                .execute(&mut *conn)
                .await?;
            if done.rows_affected() == 0 {
                Delete::NotFound
            } else {
                Delete::Deleted
            }
        }
    });
    tx.commit().await?;
    Ok(outcome)
}

/// The columns of a [`DatasetFile`].
const FILE_COLUMNS: &str =
    "id, dataset_id, class, original_name, sha256, format, width, height, bytes";

pub async fn files(db: &Db, dataset_id: &str) -> Result<Vec<DatasetFile>, sqlx::Error> {
    let sql = format!(
        "SELECT {FILE_COLUMNS} FROM dataset_files WHERE dataset_id = $1 \
         ORDER BY class, original_name, id"
    );
    on_pool!(db, pool => sqlx::query_as(&sql).bind(dataset_id).fetch_all(pool).await)
}

pub async fn file(
    db: &Db,
    dataset_id: &str,
    file_id: i64,
) -> Result<Option<DatasetFile>, sqlx::Error> {
    let sql = format!("SELECT {FILE_COLUMNS} FROM dataset_files WHERE dataset_id = $1 AND id = $2");
    on_pool!(db, pool => {
        sqlx::query_as(&sql)
            .bind(dataset_id)
            .bind(file_id)
            .fetch_optional(pool)
            .await
    })
}

//! `models`: one per succeeded run. The default for predictions is the most recently promoted
//! model, or the newest one when none has been promoted.

use serde::Serialize;
use sqlx::{FromRow, SqlitePool};
use utoipa::ToSchema;

use super::{json, runs};

#[derive(FromRow)]
struct ModelRow {
    id: String,
    dataset_id: Option<String>,
    classes: String,
    input_size: i64,
    val_accuracy: f64,
    promoted_at: Option<String>,
    created_at: String,
    updated_at: String,
    is_default: bool,
}

/// A trained classifier.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Model {
    /// Also the id of the run that produced it.
    pub id: String,
    pub run_id: String,
    pub dataset_id: Option<String>,
    pub classes: Vec<String>,
    pub input_size: i64,
    pub val_accuracy: f64,
    /// Whether predictions use it when no model is named.
    pub is_default: bool,
    pub promoted_at: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

impl ModelRow {
    fn into_model(self) -> Result<Model, sqlx::Error> {
        Ok(Model {
            run_id: self.id.clone(),
            classes: json(&self.classes)?,
            id: self.id,
            dataset_id: self.dataset_id,
            input_size: self.input_size,
            val_accuracy: self.val_accuracy,
            is_default: self.is_default,
            promoted_at: self.promoted_at,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}

const DEFAULT_ID: &str = "(SELECT id FROM models ORDER BY promoted_at IS NULL, promoted_at DESC, \
                          created_at DESC, rowid DESC LIMIT 1)";

fn select(filter: &str) -> String {
    format!(
        "SELECT id, dataset_id, classes, input_size, val_accuracy, promoted_at, created_at, \
         updated_at, id = {DEFAULT_ID} AS is_default FROM models {filter}"
    )
}

/// What a succeeded run leaves behind.
pub struct Success<'a> {
    pub run_id: &'a str,
    pub dataset_id: Option<&'a str>,
    pub classes: &'a [String],
    pub input_size: usize,
    pub val_accuracy: f64,
    /// The evaluation as JSON.
    pub evaluation: &'a str,
}

/// Stores the evaluation and the model and marks the run succeeded, all in one transaction.
pub async fn record_success(pool: &SqlitePool, s: &Success<'_>) -> Result<(), sqlx::Error> {
    let mut tx = super::write(pool).await?;
    sqlx::query("INSERT OR REPLACE INTO evaluations (run_id, accuracy, report) VALUES (?, ?, ?)")
        .bind(s.run_id)
        .bind(s.val_accuracy)
        .bind(s.evaluation)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT OR REPLACE INTO models (id, dataset_id, classes, input_size, val_accuracy) \
         VALUES (?, ?, ?, ?, ?)",
    )
    .bind(s.run_id)
    .bind(s.dataset_id)
    .bind(serde_json::to_string(s.classes).expect("serialisable"))
    .bind(s.input_size as i64)
    .bind(s.val_accuracy)
    .execute(&mut *tx)
    .await?;
    runs::finish_in(&mut tx, s.run_id, super::status::RunStatus::Succeeded, None).await?;
    tx.commit().await
}

pub async fn list(pool: &SqlitePool, page: &super::Page) -> Result<Vec<Model>, sqlx::Error> {
    sqlx::query_as::<_, ModelRow>(&select(&format!("WHERE {}", super::Page::clause(1))))
        .bind(page.time())
        .bind(page.id())
        .bind(page.limit())
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(ModelRow::into_model)
        .collect()
}

pub async fn get(pool: &SqlitePool, id: &str) -> Result<Option<Model>, sqlx::Error> {
    sqlx::query_as::<_, ModelRow>(&select("WHERE id = ?"))
        .bind(id)
        .fetch_optional(pool)
        .await?
        .map(ModelRow::into_model)
        .transpose()
}

/// The model predictions use when none is named.
pub async fn default_model(pool: &SqlitePool) -> Result<Option<Model>, sqlx::Error> {
    sqlx::query_as::<_, ModelRow>(&select(&format!("WHERE id = {DEFAULT_ID}")))
        .fetch_optional(pool)
        .await?
        .map(ModelRow::into_model)
        .transpose()
}

/// Makes a model the default. Returns `false` when there is no such model.
pub async fn promote(pool: &SqlitePool, id: &str) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE models SET promoted_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), \
         updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE id = ?",
    )
    .bind(id)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// What deleting a model did.
#[derive(Debug, PartialEq, Eq)]
pub enum DeleteModel {
    Deleted,
    NotFound,
    /// It is the default model: promote another first.
    IsDefault,
}

/// Deletes a model's row unless it is the default; checked in the same transaction.
pub async fn delete(pool: &SqlitePool, id: &str) -> Result<DeleteModel, sqlx::Error> {
    let mut tx = super::write(pool).await?;
    let default: Option<String> = sqlx::query_scalar(&format!("SELECT {DEFAULT_ID}"))
        .fetch_one(&mut *tx)
        .await?;
    if default.as_deref() == Some(id) {
        return Ok(DeleteModel::IsDefault);
    }
    let done = sqlx::query("DELETE FROM models WHERE id = ?")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(if done.rows_affected() == 1 {
        DeleteModel::Deleted
    } else {
        DeleteModel::NotFound
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::Ingested;
    use crate::ml::config::TrainConfig;

    async fn succeed(pool: &SqlitePool, id: &str) {
        runs::create(pool, id, "d", &TrainConfig::default())
            .await
            .unwrap();
        runs::claim_next(pool).await.unwrap().unwrap();
        let classes = vec!["a".to_string(), "b".to_string()];
        let s = Success {
            run_id: id,
            dataset_id: Some("d"),
            classes: &classes,
            input_size: 224,
            val_accuracy: 0.9,
            evaluation: "{}",
        };
        record_success(pool, &s).await.unwrap();
    }

    #[sqlx::test]
    async fn newest_model_is_default_until_one_is_promoted(pool: SqlitePool) {
        let ingested = Ingested {
            classes: vec!["a".into(), "b".into()],
            images: Vec::new(),
            skipped: Vec::new(),
            warnings: Vec::new(),
            dir: ".".into(),
        };
        crate::db::datasets::insert(&pool, "d", "d", &ingested)
            .await
            .unwrap();
        assert!(default_model(&pool).await.unwrap().is_none());
        succeed(&pool, "first").await;
        succeed(&pool, "second").await;
        assert_eq!(default_model(&pool).await.unwrap().unwrap().id, "second");
        let run = runs::get(&pool, "first").await.unwrap().unwrap();
        assert_eq!(run.status, crate::db::status::RunStatus::Succeeded);
        assert_eq!(run.model_id.as_deref(), Some("first"));

        assert!(promote(&pool, "first").await.unwrap());
        assert!(!promote(&pool, "missing").await.unwrap());
        assert_eq!(default_model(&pool).await.unwrap().unwrap().id, "first");
        succeed(&pool, "third").await;
        assert_eq!(
            default_model(&pool).await.unwrap().unwrap().id,
            "first",
            "a promotion outlasts newer models"
        );
        let listed: Vec<(String, bool)> = list(&pool, &crate::db::Page::ALL)
            .await
            .unwrap()
            .into_iter()
            .map(|m| (m.id, m.is_default))
            .collect();
        assert_eq!(listed.iter().filter(|(_, d)| *d).count(), 1);
    }
}

//! `models`: one per succeeded run. The default for predictions is the most recently promoted
//! model, or the newest one when none has been promoted.

use serde::Serialize;
use sqlx::FromRow;
use utoipa::ToSchema;

use super::queue::{self, Guard};
use super::{Db, json, now, on_pool, on_tx};

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
                          created_at DESC, id DESC LIMIT 1)";

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
/// Stores a succeeded run's evaluation and model row and ends the run, in one transaction,
/// if `worker` still holds the run. `false` (and nothing written) if it lost the lease.
pub async fn record_success(db: &Db, s: &Success<'_>, worker: &str) -> Result<bool, sqlx::Error> {
    let mut tx = super::write(db).await?;
    let ended = queue::finish_in(
        &mut tx,
        s.run_id,
        super::status::RunStatus::Succeeded,
        None,
        Guard::Holder(worker),
    )
    .await?;
    if !ended {
        return Ok(false);
    }
    let time = now();
    on_tx!(&mut tx, conn => {
        sqlx::query(
            "INSERT INTO evaluations (run_id, accuracy, report, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $4) ON CONFLICT (run_id) DO UPDATE SET \
             accuracy = excluded.accuracy, report = excluded.report, updated_at = excluded.updated_at",
        )
        .bind(s.run_id)
        .bind(s.val_accuracy)
        .bind(s.evaluation)
        .bind(&time)
        .execute(&mut *conn)
        .await?;
        sqlx::query(
            "INSERT INTO models (id, dataset_id, classes, input_size, val_accuracy, created_at, \
             updated_at) VALUES ($1, $2, $3, $4, $5, $6, $6) ON CONFLICT (id) DO UPDATE SET \
             dataset_id = excluded.dataset_id, classes = excluded.classes, \
             input_size = excluded.input_size, val_accuracy = excluded.val_accuracy, \
             updated_at = excluded.updated_at",
        )
        .bind(s.run_id)
        .bind(s.dataset_id)
        .bind(serde_json::to_string(s.classes).expect("serialisable"))
        .bind(s.input_size as i64)
        .bind(s.val_accuracy)
        .bind(&time)
        .execute(&mut *conn)
        .await?;
    });
    tx.commit().await?;
    Ok(true)
}

pub async fn list(db: &Db, page: &super::Page) -> Result<Vec<Model>, sqlx::Error> {
    let sql = select(&format!("WHERE {}", super::Page::clause(1)));
    let rows: Vec<ModelRow> = page.rows(db, &sql).await?;
    rows.into_iter().map(ModelRow::into_model).collect()
}

pub async fn get(db: &Db, id: &str) -> Result<Option<Model>, sqlx::Error> {
    let sql = select("WHERE id = $1");
    let row: Option<ModelRow> =
        on_pool!(db, pool => sqlx::query_as(&sql).bind(id).fetch_optional(pool).await)?;
    row.map(ModelRow::into_model).transpose()
}

/// The model predictions use when none is named. Every API process reads it here, so a
/// promotion through one is seen by all of them at their next lookup.
pub async fn default_model(db: &Db) -> Result<Option<Model>, sqlx::Error> {
    let sql = select(&format!("WHERE id = {DEFAULT_ID}"));
    let row: Option<ModelRow> =
        on_pool!(db, pool => sqlx::query_as(&sql).fetch_optional(pool).await)?;
    row.map(ModelRow::into_model).transpose()
}

pub async fn promote(db: &Db, id: &str) -> Result<bool, sqlx::Error> {
    let time = now();
    let done = on_pool!(db, pool => {
        sqlx::query("UPDATE models SET promoted_at = $1, updated_at = $1 WHERE id = $2")
            .bind(&time)
            .bind(id)
            .execute(pool)
            .await?
            .rows_affected()
    });
    Ok(done == 1)
}

#[derive(Debug, PartialEq, Eq)]
pub enum DeleteModel {
    Deleted,
    NotFound,
    IsDefault,
}

pub async fn delete(db: &Db, id: &str) -> Result<DeleteModel, sqlx::Error> {
    let mut tx = super::write(db).await?;
    let default_sql = format!("SELECT {DEFAULT_ID}");
    let outcome = on_tx!(&mut tx, conn => {
        let default: Option<String> = sqlx::query_scalar(&default_sql)
            .fetch_one(&mut *conn)
            .await?;
        if default.as_deref() == Some(id) {
            DeleteModel::IsDefault
        } else {
            let done = sqlx::query("DELETE FROM models WHERE id = $1")
                .bind(id)
                .execute(&mut *conn)
                .await?;
            if done.rows_affected() == 1 {
                DeleteModel::Deleted
            } else {
                DeleteModel::NotFound
            }
        }
    });
    tx.commit().await?;
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::Ingested;
    use crate::ml::config::TrainConfig;

    async fn succeed(pool: &Db, id: &str) {
        crate::db::runs::create(pool, id, "d", &TrainConfig::default())
            .await
            .unwrap();
        let lease = std::time::Duration::from_secs(30);
        queue::claim_next(pool, "w", lease).await.unwrap().unwrap();
        let classes = vec!["a".to_string(), "b".to_string()];
        let s = Success {
            run_id: id,
            dataset_id: Some("d"),
            classes: &classes,
            input_size: 224,
            val_accuracy: 0.9,
            evaluation: "{}",
        };
        assert!(record_success(pool, &s, "w").await.unwrap());
        assert!(
            !record_success(pool, &s, "w").await.unwrap(),
            "a run that ended cannot be recorded twice"
        );
    }

    #[sqlx::test(migrations = "migrations/sqlite")]
    async fn newest_model_is_default_until_one_is_promoted(pool: sqlx::SqlitePool) {
        let pool = Db::from(pool);
        let ingested = Ingested::empty(&["a", "b"]);
        crate::db::datasets::insert(&pool, "d", "d", &ingested, None)
            .await
            .unwrap();
        assert!(default_model(&pool).await.unwrap().is_none());
        succeed(&pool, "first").await;
        succeed(&pool, "second").await;
        assert_eq!(default_model(&pool).await.unwrap().unwrap().id, "second");
        let run = crate::db::runs::get(&pool, "first").await.unwrap().unwrap();
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

//! The training queue under concurrent workers: `cargo run --release --bin queue_bench --
//! [--postgres URL] [--runs N]`. For SQLite (a fresh file) and, given its URL, PostgreSQL
//! (the database is emptied first), it queues N runs, lets 1, 2 and 4 workers claim them
//! at once (each claimer is a task with its own connections, claiming with the service's
//! own `db::queue::claim_next` until the queue is empty), and prints claims per second and
//! the double claims found (a run claimed twice; there must be none). `bench/scale.sh` runs
//! it against a throwaway PostgreSQL cluster.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::Context;
use transferd::db::{self, Db, queue};
use transferd::ingest::Ingested;
use transferd::ml::config::TrainConfig;

const LEASE: Duration = Duration::from_secs(600);

struct Round {
    engine: &'static str,
    workers: usize,
    claims: usize,
    doubles: usize,
    seconds: f64,
}

async fn empty(db: &Db) -> anyhow::Result<()> {
    // Runs first (their phases and metrics cascade), then the dataset.
    let statements = [
        "DELETE FROM models",
        "DELETE FROM runs",
        "DELETE FROM datasets",
    ];
    for sql in statements {
        match db {
            Db::Sqlite(p) => sqlx::query(sql).execute(p).await.map(|_| ())?,
            Db::Postgres(p) => sqlx::query(sql).execute(p).await.map(|_| ())?,
        }
    }
    Ok(())
}

async fn round(
    db: &Db,
    engine: &'static str,
    runs: usize,
    workers: usize,
) -> anyhow::Result<Round> {
    empty(db).await?;
    let ingested = Ingested::empty(&["a", "b"]);
    db::datasets::insert(db, "bench", "bench", &ingested, None).await?;
    let config = TrainConfig::default();
    for i in 0..runs {
        db::runs::create(db, &format!("run-{i:06}"), "bench", &config).await?;
    }
    let started = Instant::now();
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let db = db.clone();
            tokio::spawn(async move {
                let me = format!("bench-{w}");
                let mut mine = Vec::new();
                while let Some(run) = queue::claim_next(&db, &me, LEASE).await? {
                    mine.push(run.id);
                }
                anyhow::Ok(mine)
            })
        })
        .collect();
    let mut claimed = Vec::new();
    for t in tasks {
        claimed.extend(t.await??);
    }
    let seconds = started.elapsed().as_secs_f64();
    let distinct: HashSet<&String> = claimed.iter().collect();
    anyhow::ensure!(
        distinct.len() == runs,
        "{} of {runs} runs claimed",
        distinct.len()
    );
    Ok(Round {
        engine,
        workers,
        claims: claimed.len(),
        doubles: claimed.len() - distinct.len(),
        seconds,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let runs: usize = value("--runs")
        .map_or(Ok(2000), |v| v.parse())
        .context("--runs")?;
    let dir = tempfile::tempdir()?;
    let sqlite = format!("sqlite://{}", dir.path().join("queue.db").display());
    let mut engines: Vec<(&'static str, Db)> = vec![("sqlite", db::connect(&sqlite).await?)];
    if let Some(url) = value("--postgres") {
        engines.push(("postgres", db::connect(&url).await?));
    }
    println!("{runs} queued runs, claimed by W concurrent workers until the queue is empty\n");
    println!("| engine | workers | claims | seconds | claims/s | double claims |");
    println!("|---|---|---|---|---|---|");
    for (engine, db) in &engines {
        for workers in [1, 2, 4] {
            let r = round(db, engine, runs, workers).await?;
            println!(
                "| {} | {} | {} | {:.2} | {:.0} | {} |",
                r.engine,
                r.workers,
                r.claims,
                r.seconds,
                r.claims as f64 / r.seconds,
                r.doubles
            );
        }
    }
    Ok(())
}

//! Background work: the training queue's workers, the live event fan-out that feeds SSE, and
//! the inference thread. The HTTP layer talks to these through the typed handles here and
//! never calls burn itself.

mod compute;
pub mod events;
pub mod inference;
mod lease;
mod notify;
mod outcome;
mod progress;
mod record;
mod recovery;
mod worker;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::db::Db;
use crate::db::status::RunStatus;
use crate::ml::events::Cancel;

pub use self::events::RunEvent;
pub use self::recovery::{MAX_LAPSES, REAP_EVERY, reap, spawn_reaper};
pub use self::worker::{WorkerContext, process_name, spawn_workers};

/// Handle to the training queue, cloned into every handler.
#[derive(Clone)]
pub struct Jobs {
    inner: Arc<Inner>,
}

struct Inner {
    wake: Notify,
    events: broadcast::Sender<RunEvent>,
    /// Stop flags of the runs training now.
    running: Mutex<HashMap<String, Cancel>>,
    /// Where events go when processes share them (PostgreSQL `NOTIFY`); `None`: in-process.
    outbox: Option<mpsc::UnboundedSender<RunEvent>>,
}

impl Default for Jobs {
    fn default() -> Self {
        Self::new()
    }
}

impl Jobs {
    /// Events stay in this process (SQLite: one process).
    pub fn new() -> Self {
        Self::with_outbox(None)
    }

    fn with_outbox(outbox: Option<mpsc::UnboundedSender<RunEvent>>) -> Self {
        let (events, _) = broadcast::channel(1024);
        Self {
            inner: Arc::new(Inner {
                wake: Notify::new(),
                events,
                running: Mutex::new(HashMap::new()),
                outbox,
            }),
        }
    }

    /// In-process events on SQLite; on PostgreSQL, events shared by every process on the
    /// database (`NOTIFY`/`LISTEN`) until `shutdown`.
    pub async fn connect(db: &Db, shutdown: &CancellationToken) -> Result<Self, sqlx::Error> {
        let Db::Postgres(pool) = db else {
            return Ok(Self::new());
        };
        let listener = notify::subscribe(pool).await?;
        let (outbox, rx) = mpsc::unbounded_channel();
        let jobs = Self::with_outbox(Some(outbox));
        tokio::spawn(notify::send(pool.clone(), rx));
        let waker = jobs.clone();
        tokio::spawn(notify::listen(
            listener,
            jobs.inner.events.clone(),
            move || waker.wake_here(),
            shutdown.clone(),
        ));
        Ok(jobs)
    }

    /// Tells an idle worker, in any process, that run `run_id` was queued.
    pub fn queued(&self, run_id: &str) {
        self.wake_here();
        if self.inner.outbox.is_some() {
            self.publish_status(run_id, RunStatus::Queued, None);
        }
    }

    fn wake_here(&self) {
        // Wakes one idle worker, or leaves a permit for the next one to wait.
        self.inner.wake.notify_one();
    }

    /// Live events of every run, from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<RunEvent> {
        self.inner.events.subscribe()
    }

    pub(crate) fn publish(&self, event: RunEvent) {
        match &self.inner.outbox {
            // Comes back through the listener, to this process's subscribers too.
            Some(outbox) => {
                let _ = outbox.send(event);
            }
            // No subscribers is fine: nobody is watching.
            None => {
                let _ = self.inner.events.send(event);
            }
        }
    }

    /// Announces a run's new status.
    pub fn publish_status(&self, run_id: &str, status: RunStatus, error: Option<String>) {
        self.publish(RunEvent {
            run_id: run_id.to_string(),
            kind: events::EventKind::Status { status, error },
        });
    }

    /// Asks a running run to stop at its next step boundary. `false` if it is not running here.
    pub fn stop(&self, run_id: &str) -> bool {
        let running = self.inner.running.lock().expect("not poisoned");
        running.get(run_id).map(Cancel::cancel).is_some()
    }

    fn register(&self, run_id: &str, cancel: Cancel) {
        let mut running = self.inner.running.lock().expect("not poisoned");
        running.insert(run_id.to_string(), cancel);
    }

    fn unregister(&self, run_id: &str) {
        let mut running = self.inner.running.lock().expect("not poisoned");
        running.remove(run_id);
    }
}

//! Background work: the training queue's workers, the live event fan-out that feeds SSE, and
//! the inference thread. The HTTP layer talks to these through the typed handles here and
//! never calls burn itself.

mod compute;
pub mod events;
pub mod inference;
mod progress;
mod recovery;
mod worker;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, broadcast};

use crate::db::status::RunStatus;
use crate::ml::events::Cancel;

pub use self::events::RunEvent;
pub use self::recovery::recover;
pub use self::worker::{WorkerContext, spawn_workers};

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
}

impl Default for Jobs {
    fn default() -> Self {
        Self::new()
    }
}

impl Jobs {
    pub fn new() -> Self {
        let (events, _) = broadcast::channel(1024);
        Self {
            inner: Arc::new(Inner {
                wake: Notify::new(),
                events,
                running: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Tells an idle worker that a run was queued.
    pub fn wake(&self) {
        // Wakes one idle worker, or leaves a permit for the next one to wait.
        self.inner.wake.notify_one();
    }

    /// Live events of every run, from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<RunEvent> {
        self.inner.events.subscribe()
    }

    pub(crate) fn publish(&self, event: RunEvent) {
        // No subscribers is fine: nobody is watching.
        let _ = self.inner.events.send(event);
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

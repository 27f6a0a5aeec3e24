//! The inference thread: trained models stay loaded in a small LRU cache, and requests that
//! arrive while the thread is busy are answered together, in forward passes of at most
//! `--predict-batch` images per model (micro-batching). Decoding happens before, on the
//! blocking pool, so this thread only runs the network.
//!
//! The queue to the thread is bounded by images (`--predict-queue`): a request is admitted
//! only when its images fit, and is refused at once otherwise, so overload turns into fast
//! refusals instead of an ever longer wait and ever more memory.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};

use burn::prelude::Device;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::ml::infer::{Predictor, ViewPrediction};

/// One request: preprocessed views for one model.
struct Job {
    model_id: String,
    dir: PathBuf,
    views: Vec<Vec<f32>>,
    reply: oneshot::Sender<Result<Vec<ViewPrediction>, String>>,
    /// The request's place in the queue, given back when it is answered.
    _admitted: Admitted,
}

/// What the inference thread is sent.
enum Message {
    Predict(Job),
    /// Answered at once: the thread is alive and taking messages.
    Ping(oneshot::Sender<()>),
}

/// Handle to the inference thread.
#[derive(Clone)]
pub struct Inference {
    tx: mpsc::Sender<Message>,
    queue: Queue,
    /// False once the thread has ended for good.
    alive: Arc<std::sync::atomic::AtomicBool>,
    /// Decodes of photos to predict running at once: one per core.
    decodes: Arc<Semaphore>,
}

/// Why a prediction was not made.
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    #[error("the inference thread has stopped")]
    Stopped,
    #[error("loading the model failed: {0}")]
    Model(String),
    #[error("the prediction queue is full ({capacity} images); retry shortly or send fewer images")]
    Full { capacity: usize },
    #[error(
        "{images} images are more than the prediction queue holds ({capacity}); send fewer per request"
    )]
    TooMany { images: usize, capacity: usize },
}

/// The bounded queue: one permit per image waiting for, or in, a forward pass.
#[derive(Clone)]
pub struct Queue {
    permits: Arc<Semaphore>,
    capacity: usize,
}

/// Images admitted to the queue; dropping it frees their places.
pub struct Admitted(OwnedSemaphorePermit);

impl Admitted {
    /// How many images it holds places for.
    pub fn images(&self) -> usize {
        self.0.num_permits()
    }
}

impl Queue {
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            permits: Arc::new(Semaphore::new(capacity)),
            capacity,
        }
    }

    /// Admits `images` now, or says why not; never waits.
    pub fn admit(&self, images: usize) -> Result<Admitted, InferenceError> {
        self.permits(images, images).map(Admitted)
    }

    /// Takes places for `more` images on top of `admitted`, or says why not; never waits.
    pub fn grow(&self, admitted: &mut Admitted, more: usize) -> Result<(), InferenceError> {
        let permit = self.permits(more, admitted.images() + more)?;
        admitted.0.merge(permit);
        Ok(())
    }

    /// `images` more permits for a request that would then hold `total`.
    fn permits(&self, images: usize, total: usize) -> Result<OwnedSemaphorePermit, InferenceError> {
        if total > self.capacity {
            metrics::counter!("transferd_predict_refused_total", "reason" => "too_many")
                .increment(1);
            return Err(InferenceError::TooMany {
                images: total,
                capacity: self.capacity,
            });
        }
        let n = u32::try_from(images).expect("bounded by the capacity");
        match self.permits.clone().try_acquire_many_owned(n) {
            Ok(permit) => Ok(permit),
            Err(_) => {
                metrics::counter!("transferd_predict_refused_total", "reason" => "queue_full")
                    .increment(1);
                Err(InferenceError::Full {
                    capacity: self.capacity,
                })
            }
        }
    }

    /// Images queued or being predicted now.
    pub fn queued(&self) -> usize {
        self.capacity - self.permits.available_permits()
    }
}

impl Inference {
    /// Starts the thread, with forward passes of at most `max_batch` images and a queue of
    /// at most `queue` images. It ends when every handle is dropped.
    pub fn start(device: Device, cache_size: usize, max_batch: usize, queue: usize) -> Self {
        let (tx, rx) = mpsc::channel::<Message>();
        let alive = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let flag = alive.clone();
        std::thread::Builder::new()
            .name("inference".into())
            .spawn(move || {
                supervise(&rx, &device, cache_size.max(1), max_batch.max(1));
                flag.store(false, std::sync::atomic::Ordering::SeqCst);
            })
            .expect("spawning the inference thread");
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            tx,
            queue: Queue::new(queue),
            alive,
            decodes: Arc::new(Semaphore::new(cores)),
        }
    }

    /// Waits for a decode slot; the request already holds its queue places, so the wait is
    /// bounded by the queue.
    pub async fn decode_permit(&self) -> OwnedSemaphorePermit {
        self.decodes
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }

    /// Whether the inference thread answers a ping within `within`: it is running and not
    /// stuck (it takes messages between forward passes, so a busy one answers within a
    /// pass).
    pub async fn responds(&self, within: std::time::Duration) -> bool {
        if !self.alive.load(std::sync::atomic::Ordering::SeqCst) {
            return false;
        }
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Message::Ping(tx)).is_err() {
            return false;
        }
        matches!(tokio::time::timeout(within, rx).await, Ok(Ok(())))
    }

    /// Takes places in the queue for `images` images before they are read and decoded: a
    /// refused request costs neither.
    pub fn admit(&self, images: usize) -> Result<Admitted, InferenceError> {
        self.queue.admit(images)
    }

    /// Places for `more` images of a request already admitted (the next multipart image).
    pub fn grow(&self, admitted: &mut Admitted, more: usize) -> Result<(), InferenceError> {
        self.queue.grow(admitted, more)
    }

    /// Images queued or being predicted now.
    pub fn queued(&self) -> usize {
        self.queue.queued()
    }

    /// Calibrated probabilities (and out-of-distribution scores) of `views` under the model in
    /// `dir`.
    pub async fn predict(
        &self,
        admitted: Admitted,
        model_id: &str,
        dir: PathBuf,
        views: Vec<Vec<f32>>,
    ) -> Result<Vec<ViewPrediction>, InferenceError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Message::Predict(Job {
                model_id: model_id.to_string(),
                dir,
                views,
                reply,
                _admitted: admitted,
            }))
            .map_err(|_| InferenceError::Stopped)?;
        answer
            .await
            .map_err(|_| InferenceError::Stopped)?
            .map_err(InferenceError::Model)
    }
}

/// Most-recently-used first.
struct Cache {
    models: VecDeque<(String, Predictor)>,
    capacity: usize,
}

impl Cache {
    fn get(&mut self, id: &str, dir: &Path, device: &Device) -> Result<&Predictor, String> {
        if let Some(pos) = self.models.iter().position(|(m, _)| m == id) {
            metrics::counter!("transferd_model_cache_total", "result" => "hit").increment(1);
            let entry = self.models.remove(pos).expect("present");
            self.models.push_front(entry);
        } else {
            metrics::counter!("transferd_model_cache_total", "result" => "miss").increment(1);
            let predictor = Predictor::load(dir, device).map_err(|e| e.to_string())?;
            tracing::info!(model_id = id, "model loaded for prediction");
            self.models.push_front((id.to_string(), predictor));
            self.models.truncate(self.capacity);
        }
        Ok(&self.models[0].1)
    }
}

/// Runs [`serve`] again, with a fresh model cache, if it ever panics outside a batch.
fn supervise(rx: &mpsc::Receiver<Message>, device: &Device, capacity: usize, max_batch: usize) {
    loop {
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            serve(rx, device, capacity, max_batch)
        }));
        match run {
            Ok(()) => break,
            Err(_) => {
                metrics::counter!("transferd_inference_restarts_total").increment(1);
                tracing::error!("the inference thread panicked; restarting it");
            }
        }
    }
}

fn serve(rx: &mpsc::Receiver<Message>, device: &Device, capacity: usize, max_batch: usize) {
    let mut cache = Cache {
        models: VecDeque::new(),
        capacity,
    };
    let mut jobs = Vec::new();
    let take = |m: Message, jobs: &mut Vec<Job>| match m {
        Message::Predict(job) => jobs.push(job),
        Message::Ping(reply) => {
            let _ = reply.send(());
        }
    };
    while let Ok(first) = rx.recv() {
        // Everything already waiting joins this round.
        take(first, &mut jobs);
        while let Ok(more) = rx.try_recv() {
            take(more, &mut jobs);
        }
        while !jobs.is_empty() {
            let model_id = jobs[0].model_id.clone();
            let (mine, rest): (Vec<Job>, Vec<Job>) =
                jobs.into_iter().partition(|j| j.model_id == model_id);
            jobs = rest;
            run_batch(&mut cache, device, mine, max_batch);
        }
    }
    tracing::info!("inference thread stopped");
}

/// Runs the jobs of one model together in forward passes of at most `max_batch` images
/// (a job's images may span passes), answering each job as soon as its images are done.
fn run_batch(cache: &mut Cache, device: &Device, jobs: Vec<Job>, max_batch: usize) {
    // A requester that gave up (timed out, disconnected) frees its places unpredicted.
    let jobs: Vec<Job> = jobs.into_iter().filter(|j| !j.reply.is_closed()).collect();
    if jobs.is_empty() {
        return;
    }
    let predictor = match cache.get(&jobs[0].model_id, &jobs[0].dir, device) {
        Ok(p) => p,
        Err(e) => {
            for job in jobs {
                answer(job, Err(e.clone()));
            }
            return;
        }
    };
    let mut waiting: VecDeque<(Job, usize)> = VecDeque::new();
    let mut views = Vec::new();
    for mut job in jobs {
        let n = job.views.len();
        views.append(&mut job.views);
        waiting.push_back((job, n));
    }
    let mut done: VecDeque<ViewPrediction> = VecDeque::with_capacity(views.len());
    for pass in forward_passes(views.len(), max_batch) {
        metrics::histogram!("transferd_predict_batch_size").record(pass.len() as f64);
        // A panic in a forward pass fails this batch's requests, not every later one.
        let probs = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            predictor.probabilities_of_views(&views[pass], max_batch)
        }));
        let Ok(probs) = probs else {
            metrics::counter!("transferd_inference_panics_total").increment(1);
            tracing::error!(
                requests = waiting.len(),
                "a forward pass panicked; failing its batch"
            );
            for (job, _) in waiting {
                answer(job, Err("the forward pass crashed".into()));
            }
            return;
        };
        done.extend(probs);
        while waiting.front().is_some_and(|(_, n)| *n <= done.len()) {
            let (job, n) = waiting.pop_front().expect("checked");
            answer(job, Ok(done.drain(..n).collect()));
        }
    }
    debug_assert!(waiting.is_empty());
}

/// Frees the job's queue places, then replies (so a requester that has its answer sees
/// its places given back). A requester that gave up is not an error.
fn answer(job: Job, result: Result<Vec<ViewPrediction>, String>) {
    let Job {
        reply, _admitted, ..
    } = job;
    drop(_admitted);
    let _ = reply.send(result);
}

/// The forward passes of `images` queued images: consecutive ranges of at most `max_batch`.
fn forward_passes(images: usize, max_batch: usize) -> Vec<std::ops::Range<usize>> {
    let step = max_batch.max(1);
    (0..images)
        .step_by(step)
        .map(|start| start..(start + step).min(images))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_passes_never_exceed_the_batch() {
        assert_eq!(forward_passes(70, 32), vec![0..32, 32..64, 64..70]);
        assert_eq!(forward_passes(3, 32), vec![0..3]);
        assert!(forward_passes(0, 32).is_empty());
        assert_eq!(forward_passes(2, 1), vec![0..1, 1..2]);
    }

    #[test]
    fn the_queue_admits_what_fits_refuses_the_rest_and_frees_on_drop() {
        let q = Queue::new(4);
        let a = q.admit(3).unwrap();
        assert_eq!(q.queued(), 3);
        assert!(matches!(
            q.admit(2),
            Err(InferenceError::Full { capacity: 4 })
        ));
        let b = q.admit(1).unwrap();
        assert_eq!(q.queued(), 4);
        assert!(matches!(q.admit(1), Err(InferenceError::Full { .. })));
        drop(a);
        assert_eq!(q.queued(), 1);
        assert!(q.admit(3).is_ok(), "freed places are reused");
        drop(b);
        let mut c = q.admit(1).unwrap();
        q.grow(&mut c, 2).unwrap();
        assert_eq!((c.images(), q.queued()), (3, 3));
        assert!(matches!(
            q.grow(&mut c, 2),
            Err(InferenceError::TooMany { images: 5, .. })
        ));
        let d = q.admit(1).unwrap();
        assert!(matches!(
            q.grow(&mut c, 1),
            Err(InferenceError::Full { .. })
        ));
        drop((c, d));
        assert!(matches!(
            q.admit(5),
            Err(InferenceError::TooMany {
                images: 5,
                capacity: 4
            })
        ));
    }
}

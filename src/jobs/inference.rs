//! The inference thread: trained models stay loaded in a small LRU cache, and requests that
//! arrive while the thread is busy are answered together, in one forward pass per model
//! (micro-batching). Decoding happens before, on the blocking pool, so this thread only runs
//! the network.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use burn::prelude::Device;
use tokio::sync::oneshot;

use crate::ml::infer::Predictor;

/// One request: preprocessed views for one model.
struct Job {
    model_id: String,
    dir: PathBuf,
    views: Vec<Vec<f32>>,
    reply: oneshot::Sender<Result<Vec<Vec<f32>>, String>>,
}

/// Handle to the inference thread.
#[derive(Clone)]
pub struct Inference {
    tx: mpsc::Sender<Job>,
}

/// Why a prediction failed on the server side.
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    #[error("the inference thread has stopped")]
    Stopped,
    #[error("loading the model failed: {0}")]
    Model(String),
}

impl Inference {
    /// Starts the thread. It ends when every handle is dropped.
    pub fn start(device: Device, cache_size: usize, max_batch: usize) -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("inference".into())
            .spawn(move || serve(rx, device, cache_size.max(1), max_batch.max(1)))
            .expect("spawning the inference thread");
        Self { tx }
    }

    /// Calibrated probabilities of `views` under the model in `dir`.
    pub async fn predict(
        &self,
        model_id: &str,
        dir: PathBuf,
        views: Vec<Vec<f32>>,
    ) -> Result<Vec<Vec<f32>>, InferenceError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Job {
                model_id: model_id.to_string(),
                dir,
                views,
                reply,
            })
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

fn serve(rx: mpsc::Receiver<Job>, device: Device, capacity: usize, max_batch: usize) {
    let mut cache = Cache {
        models: VecDeque::new(),
        capacity,
    };
    while let Ok(first) = rx.recv() {
        // Everything already waiting joins this round.
        let mut jobs = vec![first];
        while let Ok(more) = rx.try_recv() {
            jobs.push(more);
        }
        while !jobs.is_empty() {
            let model_id = jobs[0].model_id.clone();
            let (mine, rest): (Vec<Job>, Vec<Job>) =
                jobs.into_iter().partition(|j| j.model_id == model_id);
            jobs = rest;
            run_batch(&mut cache, &device, mine, max_batch);
        }
    }
    tracing::info!("inference thread stopped");
}

/// Runs the jobs of one model together, at most `max_batch` images per forward pass.
fn run_batch(cache: &mut Cache, device: &Device, jobs: Vec<Job>, max_batch: usize) {
    let predictor = match cache.get(&jobs[0].model_id, &jobs[0].dir, device) {
        Ok(p) => p,
        Err(e) => {
            for job in jobs {
                let _ = job.reply.send(Err(e.clone()));
            }
            return;
        }
    };
    let mut pending: Vec<(Job, usize)> = Vec::new();
    let mut views = Vec::new();
    let flush = |pending: &mut Vec<(Job, usize)>, views: &mut Vec<Vec<f32>>| {
        metrics::histogram!("transferd_predict_batch_size").record(views.len() as f64);
        let mut probs = predictor
            .probabilities_of_views(std::mem::take(views))
            .into_iter();
        for (job, n) in pending.drain(..) {
            let mine: Vec<Vec<f32>> = probs.by_ref().take(n).collect();
            // A requester that gave up is not an error.
            let _ = job.reply.send(Ok(mine));
        }
    };
    for mut job in jobs {
        let n = job.views.len();
        if !views.is_empty() && views.len() + n > max_batch {
            flush(&mut pending, &mut views);
        }
        views.append(&mut job.views);
        pending.push((job, n));
    }
    if !pending.is_empty() {
        flush(&mut pending, &mut views);
    }
}
